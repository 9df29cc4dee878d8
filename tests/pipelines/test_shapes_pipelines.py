"""The shapes world through the project's jobs: pretrain, prepare, evaluate_shapes, cdns's oracle filter, and the
experiments that judge the world model and the SFT base (the reproduction: test_reproduce.py)."""

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import evaluate_shapes, prepare, pretrain
from pipelines.config import load_config
from sfo.codec import PixelCodec
from sfo.records import decode_png
from sfo.shapes.oracle import judge, read_image
from sfo.shapes.world import SIZE, world_triplets


def test_pretrain_caches_the_model_and_skips_a_second_run(shapes_pretrained, capsys):
    from sfo.models import load_flux

    assert pretrain.pretrained_steps(shapes_pretrained) == 2
    stamp = (shapes_pretrained / "pretrain.json").stat().st_mtime_ns
    assert pretrain.pretrain(pretrain.PretrainConfig(steps=2, batch_size=4)) == shapes_pretrained
    assert "already holds" in capsys.readouterr().out
    assert (shapes_pretrained / "pretrain.json").stat().st_mtime_ns == stamp
    model = load_flux("shapes", device="cpu")
    assert isinstance(model.vae, PixelCodec) and model.text_max_length == 16


def test_a_cached_model_older_than_the_shipped_one_is_set_aside_not_retrained(shapes_pretrained, tmp_path,
                                                                             monkeypatch):
    import shutil

    from sfo.shapes import model as shapes_model

    monkeypatch.setenv("SFO_CACHE_DIR", str(tmp_path))
    stale = shapes_model.pretrained_folder()
    shutil.copytree(shapes_pretrained, stale)  # 2 steps, as an older release's cache would hold fewer than shipped
    printed = []
    assert pretrain.pretrain(pretrain.PretrainConfig(), log=printed.append) == shapes_model.SHIPPED
    assert not stale.exists() and pretrain.pretrained_steps(stale.with_name(stale.name + ".2-steps")) == 2
    assert "moved to" in printed[0] and "using the shipped shapes model" in printed[1]
    assert shapes_model.require_pretrained() == shapes_model.SHIPPED


def test_load_flux_shapes_names_the_pretrain_command_when_nothing_is_there(tmp_path, monkeypatch):
    from sfo.models import load_flux
    from sfo.shapes import model as shapes_model

    monkeypatch.setenv("SFO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(shapes_model, "SHIPPED", tmp_path / "no-shipped-model")
    with pytest.raises(FileNotFoundError, match="python -m pipelines.pretrain"):
        load_flux("shapes", device="cpu")


def test_the_shipped_model_matches_its_manifest_and_loads_without_a_cache(tmp_path, monkeypatch, capsys):
    """A fresh machine (empty cache) reads the shipped model; pretrain then trains nothing."""
    from sfo.models import load_flux
    from sfo.shapes import model as shapes_model

    assert shapes_model.verify_shipped() == []
    manifest = shapes_model.shipped_manifest()
    steps = manifest["config"]["steps"]
    assert steps >= pretrain.PretrainConfig().steps and "python -m pipelines.pretrain" in manifest["command"]
    monkeypatch.setenv("SFO_CACHE_DIR", str(tmp_path))
    assert shapes_model.require_pretrained() == shapes_model.SHIPPED
    model = load_flux("shapes", device="cpu")
    assert model.transformer.config.num_single_layers == manifest["sizes"]["num_single_layers"]
    assert pretrain.pretrain(pretrain.PretrainConfig(steps=steps)) == shapes_model.SHIPPED
    assert "using the shipped shapes model" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())  # nothing was trained or written


def test_pretraining_into_the_shipped_folder_writes_its_manifest(shapes_pretrained, tmp_path, monkeypatch):
    import shutil

    from sfo.shapes import model as shapes_model

    shipped = tmp_path / "pretrained"
    monkeypatch.setattr(shapes_model, "SHIPPED", shipped)
    monkeypatch.setattr(pretrain, "SHIPPED", shipped)
    assert pretrain.pretrain(pretrain.PretrainConfig(steps=2, batch_size=4, lr=0.002, output=str(shipped)),
                             log=lambda _: None) == shipped
    manifest = shapes_model.shipped_manifest()
    assert manifest["command"] == "python -m pipelines.pretrain output=sfo/shapes/pretrained force=true steps=2 batch_size=4 lr=0.002"
    assert shapes_model.verify_shipped() == [] and "pretrain.json" in manifest["files"]
    (shipped / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"changed")
    assert shapes_model.verify_shipped() == ["transformer/diffusion_pytorch_model.safetensors"]
    shutil.rmtree(shipped)


def test_sft_strength_trains_a_ref_and_judges_held_out_cells(shapes_pretrained, tmp_path, capsys):
    from experiments import sft_strength

    assert sft_strength.main(["--model", str(shapes_pretrained), "--steps", "1", "--triplets", "2", "--batch-size", "2",
                              "--eval", "2", "--world-seed", "3000", "--text-guidance", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["world_seed"], result["text_guidance"]) == (3000, 2.0)
    assert np.mean(result["subject_per_cell"]) == result["subject"] and len(result["subject_per_cell"]) == 2
    counts = Counter(c.subject.pattern for c in world_triplets(2, 3000))
    by_pattern = result["pattern_by_reference"]
    assert set(by_pattern) == set(counts)
    assert sum(by_pattern[p] * n for p, n in counts.items()) / 2 == pytest.approx(result["pattern"])
    assert all(0 <= result[k] <= 1 for k in ("subject", "fine", "coarse", "text", "pattern", "accent", "off_pixels"))
    assert result["subject"] <= min(result["fine"], result["coarse"]) and "--steps 1" in result["command"]
    assert (tmp_path / "ref" / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "grid.png").is_file()
    with pytest.raises(SystemExit):
        sft_strength.main(["--rank", "0"])
    with pytest.raises(SystemExit):
        sft_strength.main(["--world-seed", "0"])  # the training triplets' own cells


def test_pretrain_config_names_bad_fields():
    with pytest.raises(ValueError, match="ema"):
        pretrain.PretrainConfig(ema=1.0)
    with pytest.raises(ValueError, match="steps"):
        pretrain.PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="caption_dropout"):
        pretrain.PretrainConfig(caption_dropout=1.0)


def test_caption_dropout_trains_that_share_on_the_empty_caption(shapes_pretrained):
    import torch

    from sfo.models import load_flux
    from sfo.text import encode_prompts

    model = load_flux(str(shapes_pretrained))
    empty = encode_prompts(model, [pretrain.UNCONDITIONAL]).prompt_embeds[0]
    is_empty = lambda batch: [torch.equal(e, empty) for e in batch.text.prompt_embeds]  # noqa: E731
    dropped = is_empty(pretrain.WorldData(model, caption_dropout=0.5).batch(400, torch.Generator().manual_seed(0)))
    assert 160 < sum(dropped) < 240  # binomial(400, 0.5): mean 200, sd 10
    kept = pretrain.WorldData(model).batch(400, torch.Generator().manual_seed(0))
    assert not any(is_empty(kept))
    # without dropout the random stream is the one every earlier model was trained on: the targets match
    assert torch.equal(kept.target, pretrain.WorldData(model, caption_dropout=0.5).batch(400, torch.Generator().manual_seed(0)).target)


def test_world_quality_reads_back_text_to_image_samples(shapes_pretrained, tmp_path, capsys):
    from experiments import world_quality

    assert world_quality.main(["--model", str(shapes_pretrained), "--samples", "4", "--steps", "2",
                               "--text-guidance", "1,2", "--world-seed", "3000", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "world_quality.json").read_text())
    assert set(record["results"]) == {"1", "2"} and record["world_seed"] == 3000
    for summary in record["results"].values():
        assert np.mean(summary["text_per_sample"]) == summary["text"] and len(summary["text_per_sample"]) == 4
    for summary in record["results"].values():
        assert sum(summary["patterns"].values()) == 4
        assert all(0 <= summary[k] <= 1 for k in ("text", "complete", "clean", "off_pixels", "shape", "colour"))
        assert summary["clean"] <= min(summary["text"], summary["complete"])
    assert (tmp_path / "samples_2.png").is_file() and "| 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        world_quality.main(["--text-guidance", "one"])


def test_prepare_writes_the_world_triplets(tmp_path):
    config = load_config(prepare.PrepareConfig, None, ["data.source=shapes", f"data.size={SIZE}", "data.limit=5",
                                                        f"data.output={tmp_path / 'triplets'}"])
    prepare.run(config)
    rows = pq.read_table(tmp_path / "triplets").to_pylist()
    for row, triplet in zip(rows, world_triplets(5, seed=0), strict=True):
        assert row["sample_id"] == triplet.sample_id and row["target_text"] == triplet.target_text
        assert judge(read_image(decode_png(row["target_png"])), triplet.subject, triplet.context)["subject"]
        assert judge(read_image(decode_png(row["reference_png"]), reference=True), triplet.subject, None)["subject"]
    with pytest.raises(Exception, match=f"data.size={SIZE}"):
        load_config(prepare.PrepareConfig, None, ["data.source=shapes", "data.size=64"])


def test_evaluate_shapes_judges_every_image_it_writes(shapes_pretrained, tmp_path):
    config = load_config(evaluate_shapes.ShapesEvaluateConfig, None, [
        "eval.subjects=2", "eval.seeds=2", "eval.steps=2", "runner=local", f"output={tmp_path}"])
    summary = evaluate_shapes.run(config)
    table = evaluate_shapes.read_images(tmp_path, ["base"]).to_pylist()
    assert summary["base"]["images"] == len(table) == 4
    triplets = evaluate_shapes.eval_triplets(config.eval)
    for row in table:
        t = triplets[row["sample_id"]]
        verdict = judge(read_image(decode_png(row["image_png"])), t.subject, t.context)
        assert {k: row[k] for k in evaluate_shapes.JUDGEMENTS} == {k: verdict[k] for k in evaluate_shapes.JUDGEMENTS}
    assert summary["base"]["text"] == np.mean([r["text"] for r in table])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_base_subjects_limits_the_floor_row_to_the_first_subjects(tmp_path):
    """eval.base_subjects: methods with no adapter active sample the first N held-out subjects only; the
    methods compared keep every subject, and the base's cells are theirs (so pairs against it stay paired)."""
    methods = f"methods=[{{name: base}}, {{name: sft, ref_adapter: {tmp_path}, active: [ref]}}]"
    config = load_config(evaluate_shapes.ShapesEvaluateConfig, None, [
        "eval.subjects=5", "eval.seeds=2", "eval.base_subjects=2", methods, f"output={tmp_path}"])
    base, sft = (evaluate_shapes.work_rows(config, m) for m in ("base", "sft"))
    assert len(base) == 4 and len(sft) == 10
    assert base == [r | {"method": "base"} for r in sft[:4]]
    every = load_config(evaluate_shapes.ShapesEvaluateConfig, None, ["eval.subjects=5", methods, f"output={tmp_path}"])
    assert len(evaluate_shapes.work_rows(every, "base")) == 10
    for bad in ("0", "6"):
        with pytest.raises(ValueError, match="eval.base_subjects"):
            load_config(evaluate_shapes.ShapesEvaluateConfig, None, ["eval.subjects=5", f"eval.base_subjects={bad}"])


def test_cdns_oracle_filter_drops_the_pairs_whose_negative_kept_the_reference_details(shapes_pretrained, tmp_path,
                                                                                       monkeypatch, capsys):
    """The sampler is replaced by one that returns, for even rows, the positive itself (the reference's
    pattern and accent: dropped) and, for odd rows, its fine-detail twin (kept); the run reports the drops."""
    import sfo.sampler
    from pipelines import cdns
    from sfo.shapes.world import fine_twin, render

    triplets = tmp_path / "triplets"
    prepare.run(load_config(prepare.PrepareConfig, None, ["data.source=shapes", f"data.size={SIZE}", "data.limit=6",
                                                           f"data.output={triplets}"]))
    world = world_triplets(6, seed=0)
    rng = np.random.default_rng(0)
    negatives = {t.target_text: (t.target if i % 2 == 0 else render(fine_twin(t.subject, rng), t.context))
                 for i, t in enumerate(world)}
    assert len(negatives) == 6  # target texts identify the rows

    def fake_generate(model, prompts, seeds, config, references, auxiliary_prompts=None):
        return [negatives[p] for p in prompts]

    monkeypatch.setattr(sfo.sampler, "generate", fake_generate)
    overrides = ["model.source=shapes", f"data.input={triplets}", f"cdns.size={SIZE}", "cdns.steps=1",
                 "cdns.mode=image-only", "cdns.batch_size=2", "runner=local"]  # image-only keeps the target text
    result = cdns.run(load_config(cdns.CdnsConfig, None, [*overrides, "cdns.oracle_filter=true",
                                                          f"data.output={tmp_path / 'kept'}"]))
    assert result["written"] == 3 and result["dropped"] == 3
    assert "dropped 3 pair(s) whose negative kept the reference's details" in capsys.readouterr().out
    kept = pq.read_table(tmp_path / "kept").column("sample_id").to_pylist()
    assert sorted(kept) == sorted(t.sample_id for i, t in enumerate(world) if i % 2 == 1)
    unfiltered = cdns.run(load_config(cdns.CdnsConfig, None, [*overrides, f"data.output={tmp_path / 'all'}"]))
    assert unfiltered["written"] == 6 and unfiltered["dropped"] == 0
    with pytest.raises(Exception, match="cdns.oracle_filter: .*cdns.size=32"):
        load_config(cdns.CdnsConfig, None, ["model.source=shapes", "cdns.oracle_filter=true", "cdns.size=64"])


def test_evaluate_shapes_samples_each_method_in_its_own_mode(shapes_pretrained, tmp_path):
    """A method's ``sampling`` overrides the eval section's: one evaluator holding a standard and a decoupled
    method gives the decoupled one the images an evaluator whose section default is decoupled gives."""
    import pyarrow as pa

    common = ["eval.subjects=2", "eval.seeds=1", "eval.steps=4", "runner=local", f"output={tmp_path}"]
    mixed = load_config(evaluate_shapes.ShapesEvaluateConfig, None, common + [
        "methods=[{name: standard}, {name: decoupled, sampling: {mode: decoupled, switch: 0.6, max_rounds: 1, "
        "min_rounds: 1}}]"])
    section = load_config(evaluate_shapes.ShapesEvaluateConfig, None, common + [
        "eval.sampling.mode=decoupled", "eval.sampling.switch=0.6", "eval.sampling.max_rounds=1",
        "eval.sampling.min_rounds=1"])
    rows = [r for m in ("standard", "decoupled") for r in evaluate_shapes.work_rows(mixed, m)]
    out = evaluate_shapes.ShapesEvaluator(mixed)(pa.Table.from_pylist(rows)).to_pylist()
    expected = evaluate_shapes.ShapesEvaluator(section)(pa.Table.from_pylist(evaluate_shapes.work_rows(section, "base")))
    images = {m: [r["image_png"] for r in out if r["method"] == m] for m in ("standard", "decoupled")}
    assert images["decoupled"] == expected["image_png"].to_pylist()
    assert images["decoupled"] != images["standard"]
