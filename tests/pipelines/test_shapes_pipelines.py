"""The shapes world through the project's jobs: pretrain, prepare, evaluate_shapes, App. A, reproduce."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from experiments import colour_shift, reproduce, tables
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
                              "--eval", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert all(0 <= result[k] <= 1 for k in ("subject", "fine", "coarse", "text", "pattern", "accent", "off_pixels"))
    assert result["subject"] <= min(result["fine"], result["coarse"]) and "--steps 1" in result["command"]
    assert (tmp_path / "ref" / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "grid.png").is_file()
    with pytest.raises(SystemExit):
        sft_strength.main(["--rank", "0"])


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
                               "--text-guidance", "1,2", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "world_quality.json").read_text())
    assert set(record["results"]) == {"1", "2"}
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


def test_colour_shift_machinery(shapes_pretrained):
    config = colour_shift.ColourShiftConfig(steps=1, eval_every=1, samples=3, sample_steps=2, batch_size=2)
    result = colour_shift.run(config, log=lambda _: None)
    for arm in colour_shift.ARMS:
        assert [point["step"] for point in result[arm]] == [0, 1]
        assert all(abs(sum(point["share"].values()) - 1) < 1e-9 for point in result[arm])
    assert result["sft"][0]["share"] == result["sfo"][0]["share"]  # both start from the same base and seeds
    assert "App. A" in colour_shift.format_curves(result)
    with pytest.raises(ValueError, match="colour_shift.colour"):
        colour_shift.ColourShiftConfig(colour="pink")


def test_plan_runs_only_what_the_experiments_need():
    budget = reproduce.BUDGETS["full"]
    assert reproduce.plan(["appA"], budget).arms == {}
    table4 = reproduce.plan(["table4"], budget)
    assert set(table4.arms) == {"sft-additional", "sfo-self-play", "sfo-cdns"}
    assert table4.arm_negatives["sft-additional"] is None and set(table4.negatives) == {"self-play", "cdns-r2"}
    sweep = reproduce.plan(["tableB"], budget)
    assert set(sweep.arms) == {"sfo-cdns", "sfo-cdns-r0.5", "sfo-cdns-r1", "sfo-cdns-r4"}
    assert sweep.negatives["cdns-r0.5"] == {"cdns.mode": "cdns", "cdns.blur_radius": 0.5}
    assert reproduce.plan(["tableC"], budget).arms["sfo-cdns-uniform"] == ["sfo.scheme=uniform"]
    assert reproduce.plan(["beta"], budget).arms == {"sfo-cdns-beta100": ["sfo.beta=100.0"],
                                                     "sfo-cdns-beta10000": ["sfo.beta=10000.0"]}


def test_a_negative_set_shared_by_arms_stores_the_reference_errors():
    budget = reproduce.BUDGETS["full"]  # 150 steps x batch 8 over 512 triplets: 3 epochs, one draw each
    assert "cdns.score.draws" not in reproduce.plan(["table4"], budget).negatives["cdns-r2"]  # one arm: its own pass
    shared = reproduce.plan(["table4", "tableC", "beta"], budget)  # sfo-cdns, beta100, beta10000 (+ uniform)
    assert shared.negatives["cdns-r2"]["cdns.score.draws"] == 3
    assert "cdns.score.draws" not in shared.negatives["self-play"]
    # the uniform-timestep arm alone does not make a set shared: stored draws follow the default scheme
    assert "cdns.score.draws" not in reproduce.plan(["table4", "tableC"], budget).negatives["cdns-r2"]
    # --set sfo.scheme=... gives every arm its own timesteps: nothing is stored
    assert "cdns.score.draws" not in reproduce.plan(["table4", "beta"], budget, overrides=["sfo.scheme=uniform"]).negatives["cdns-r2"]


def test_reproduce_refuses_unknown_experiments():
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--only", "table9"])


def test_plan_new_experiments():
    budget = reproduce.BUDGETS["full"]
    negatives = reproduce.plan(["negatives"], budget)
    assert negatives.arm_negatives == {"sfo-image-only": "image-only-r2", "sfo-oracle": reproduce.ORACLE}
    assert negatives.negatives["image-only-r2"] == {"cdns.mode": "image-only", "cdns.blur_radius": 2.0}
    anchors = reproduce.plan(["anchor"], budget).arms
    assert anchors["sfo-cdns-dpop"] == ["sfo.anchor=dpop", "sfo.anchor_weight=5.0"] and len(anchors) == 3
    assert reproduce.plan(["scope"], budget).arms == {"sfo-cdns-condition": ["lora.scope=condition"]}
    world = reproduce.plan(["table4", "scope"], budget, "world").arms
    assert world["sfo-cdns"] == ["lora.scope=condition"]
    assert world["sft-additional"] == ["lora.scope=condition", "sfo.variant=sft-additional"]
    assert world["sfo-cdns-all"] == ["lora.scope=condition", "lora.scope=all"]  # the arm's own override wins
    filtered = reproduce.plan(["filter"], budget)
    assert filtered.arm_negatives == {"sfo-cdns-filtered": "cdns-r2-filtered"}
    assert filtered.negatives["cdns-r2-filtered"]["cdns.oracle_filter"] is True
    strength = reproduce.plan(["sft-strength"], budget)
    assert strength.sft_runs == {"sft-600": 600, "sft-1200": 1200} and not strength.arms


def test_modes_experiment_names_and_samples_each_method_in_each_mode():
    from experiments import modes
    from pipelines.evaluate_methods import MethodConfig

    sweep = modes.sweep((0.9, 0.6), (3, 5))
    assert [(s.mode, s.switch, s.min_rounds, s.max_rounds) for s in sweep] == [
        ("decoupled", 0.9, 3, 5), ("decoupled", 0.6, 3, 5), ("dual-branch", 0.9, 3, 5), ("dual-branch", 0.6, 3, 5)]
    methods = [MethodConfig("base"), MethodConfig("sft@0", ref_adapter="r", active=["ref"]),
               MethodConfig("sfo-self-play@0", ref_adapter="r", sfo_adapter="s", active=["ref", "sfo"])]
    moded = modes.mode_methods(methods, sweep)
    assert [m.name for m in moded] == ["sft~decoupled0.9@0", "sft~decoupled0.6@0", "sft~dual-branch0.9@0",
                                       "sft~dual-branch0.6@0"]
    assert moded[3].sampling == sweep[3] and moded[3].ref_adapter == "r" and methods[1].sampling is None
    assert reproduce.plan(["modes"], reproduce.BUDGETS["full"]).arms.keys() == {"sfo-cdns"}
    svg = modes.scatter_svg({"sft": (0.66, 0.19), "sfo-cdns~decoupled0.6": (0.5, 0.3)})
    assert svg.count("<circle") == 2 and ">0.190</text>" in svg and ">0.660</text>" in svg


def test_seeds_are_parsed_and_checked():
    assert reproduce.parse_args(["--seeds", "0,1,2"]).seeds == [0, 1, 2]
    for bad in ("0,0", "a", ""):
        with pytest.raises(SystemExit):
            reproduce.parse_args(["--seeds", bad])


def test_set_overrides_every_sfo_arm_after_the_preset_and_is_checked_before_any_stage(capsys):
    args = reproduce.parse_args(["--set", "sfo.anchor=dpop", "--set", "sfo.anchor_weight=1", "--only", "table4,anchor"])
    assert args.sfo_set == ["sfo.anchor=dpop", "sfo.anchor_weight=1"]
    arms = reproduce.plan(args.experiments, reproduce.BUDGETS["full"], "world", args.sfo_set).arms
    assert arms["sfo-self-play"] == ["lora.scope=condition", "sfo.anchor=dpop", "sfo.anchor_weight=1"]
    assert arms["sfo-cdns-rpo"][-2:] == ["sfo.anchor=rpo", "sfo.anchor_weight=1000.0"]  # the arm's own win
    for bad, named in (["sfo.anchor=dpx"], "sfo.anchor"), (["sfo.anchr=dpop"], "anchr"), (["sfo.anchor"], "section.key=value"):
        with pytest.raises(SystemExit):
            reproduce.parse_args(["--set", *bad])
        assert "--set" in (err := capsys.readouterr().err) and named in err


def test_cores_size_the_local_ray_unless_it_is_given():
    assert reproduce.parse_args(["--cores", "3"]).num_cpus == 6  # one 0.5-CPU actor per core, room for Ray Data's tasks
    assert reproduce.parse_args(["--cores", "1"]).num_cpus == 4
    assert reproduce.parse_args(["--cores", "3", "--num-cpus", "8"]).num_cpus == 8
    assert reproduce.parse_args([]).cores == reproduce.CORES >= 1
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--cores", "0"])
    # inside a Ray the caller started: two logical CPUs per core, at least one core
    assert [reproduce.cores_that_fit(16, cpus) for cpus in (4, 5, 64, 1)] == [2, 2, 16, 1]


def test_report_keeps_blur_radii_and_anchors_apart():
    """Table B and the anchors in one run: sfo-cdns-rpo is the RPO anchor, not a blur radius ("po")."""
    entry = {"images": 512, "stderr": dict.fromkeys(("subject", "fine", "coarse", "text"), 0.01), "paired_vs_sft": {},
             **dict.fromkeys(("subject", "fine", "coarse", "text"), 0.2)}
    names = ["sft", "sfo-cdns", "sfo-cdns-r4", "sfo-cdns-r0.5", "sfo-cdns-rpo", "sfo-cdns-dpop"]
    report = tables.format_results({"budget": {"beta": 1000.0}, "seconds": {}, "methods": dict.fromkeys(names, entry)})
    table_b = report.split("## Table B")[1].split("##")[0]
    assert [line.split(" | ")[0] for line in table_b.splitlines() if line.startswith("| sfo")] == [
        "| sfo-cdns-r0.5", "| sfo-cdns-r4", "| sfo-cdns"]
    assert "| sfo-cdns-rpo |" in report.split("## Positive anchors")[1]


def test_aggregate_pairs_each_seed_with_its_own_sft():
    """Two seeds, two cells each. subject: sft@0 = [1, 0], x@0 = [1, 1]; sft@1 = [0, 0], x@1 = [1, 0].
    Per-seed paired diffs: +0.5 (d = [0, 1]) and +0.5 (d = [1, 0]), each se 0.5 -> mean +0.5,
    sampling se sqrt(0.25 + 0.25) / 2 = 0.354, seed se 0; rate of x = (1 + 0.5) / 2 = 0.75."""
    import pyarrow as pa

    def rows(method, subject):
        return [{"method": method, "sample_id": f"c{i}", "seed": 0, "subject": bool(v), "fine": bool(v),
                 "coarse": True, "text": True} for i, v in enumerate(subject)]

    table = pa.Table.from_pylist(rows("base", [0, 0]) + rows("sft@0", [1, 0]) + rows("x@0", [1, 1])
                                 + rows("sft@1", [0, 0]) + rows("x@1", [1, 0]))
    out = tables.aggregate(table, [0, 1], ["base", "sft", "x"], {"x": ["base", "absent"]})
    x = out["x"]
    assert x["images"] == 4 and x["subject"] == 0.75 and x["per_seed"]["subject"] == {"0": 1.0, "1": 0.5}
    paired = x["paired_vs_sft"]["subject"]
    assert paired["diffs"] == [0.5, 0.5] and paired["seed_se"] == 0.0
    assert paired["cell_se"] == 0.0  # each cell's diff averaged over the seeds: 0.5 and 0.5
    assert paired["sampling_se"] == pytest.approx(0.5**0.5 / 2) and paired["claim"] == "no difference shown"
    assert out["base"]["images"] == 2 and out["base"]["paired_vs_sft"]["subject"]["diffs"] == [-0.5, 0.0]
    assert "paired_vs_sft" in out["sft"] and out["sft"]["paired_vs_sft"] == {}
    assert x["paired_vs"]["base"]["subject"]["diffs"] == [1.0, 0.5] and "absent" not in x["paired_vs"]


def test_oracle_quadruplets_differ_from_the_positive_in_fine_details_only(tmp_path):
    import pyarrow.parquet as pq

    triplets = tmp_path / "triplets"
    prepare.run(load_config(prepare.PrepareConfig, None, ["data.source=shapes", f"data.size={SIZE}", "data.limit=12",
                                                           f"data.output={triplets}"]))
    assert reproduce.oracle_quadruplets(triplets, tmp_path / "q", seed=3) == 12
    rows = pq.read_table(tmp_path / "q").to_pylist()
    for row, t in zip(rows, world_triplets(12, seed=0), strict=True):
        negative = read_image(decode_png(row["negative_png"]))
        verdict = judge(negative, t.subject, t.context)
        assert verdict["coarse"] and verdict["text"] and not verdict["fine"]


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


def test_reproduce_tiny_budget_runs_every_experiment(shapes_pretrained, ray_local, tmp_path, capsys):
    out = tmp_path / "run"
    # --cores 8 in the fixture's Ray of 4 logical CPUs: 2 cores (two 0.5-CPU actors, two training jobs side by side)
    assert reproduce.main(["--budget", "tiny", "--preset", "paper", "--cores", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--cores 8 -> 2" in printed and "training: 12 jobs, 2 at a time" in printed
    assert "no shipped SFT base matches the model in use" in printed  # the fixture's 2-step model: trained per seed
    results = json.loads((out / "results.json").read_text())
    assert results["sft_base"] == "trained per seed: 1 steps"
    assert set(results["methods"]) == {"base", "sft", "sft-additional", "sfo-self-play", "sfo-cdns",
                                       "sfo-cdns-uniform", "sfo-cdns-r1", "sfo-cdns-beta100", "sfo-image-only",
                                       "sfo-oracle", "sfo-cdns-sdpo", "sfo-cdns-condition", "sfo-cdns-filtered", "sft-2",
                                       "sft-ig2", "sfo-cdns-ig2", "sft~decoupled0.6", "sft~dual-branch0.6",
                                       "sfo-cdns~decoupled0.6", "sfo-cdns~dual-branch0.6"}
    assert all(m["images"] == 2 for m in results["methods"].values())
    assert set(results["mode_throughput"]) == {"standard", "decoupled0.6", "dual-branch0.6"}
    assert "sfo-cdns" in results["methods"]["sfo-cdns~decoupled0.6"]["paired_vs"]
    assert (out / "modes.svg").read_text().count("<circle") == 6  # sft and sfo-cdns, each standard + 2 modes
    assert {"pretrain", "prepare", "sft", "cdns self-play", "cdns cdns-r2", "cdns cdns-r1", "sfo sfo-cdns-uniform",
            "negatives oracle-fine", "cdns image-only-r2", "sfo sfo-cdns-condition", "evaluate", "evaluate-ig2",
            "appA", "sft-2", "cdns cdns-r2-filtered", "sfo sfo-cdns-filtered", "evaluate-modes",
            "modes throughput", "training"} <= set(results["seconds"])  # "training": the jobs side by side
    assert results["wall_seconds"] >= results["seconds"]["training"]
    assert [p["step"] for p in results["appA"]["sfo"]] == [0, 1]
    assert set(results["methods"]["sfo-cdns"]["paired_vs_sft"]) == {"subject", "fine", "coarse", "text"}
    assert results["pairs"]["oracle-fine@0"]["fine"] == 1.0 and results["pairs"]["oracle-fine@0"]["context"] == 0.0
    assert results["pairs"]["cdns-r2@0"]["pairs"] == 4
    # cdns-r2 serves several arms: it stored the reference's errors (plan.share_reference_errors); r1 serves one
    assert "score_ref_err_pos" in pq.read_schema(next((out / "data" / "cdns-r2").glob("*.parquet"))).names
    assert "score_ref_err_pos" not in pq.read_schema(next((out / "data" / "cdns-r1").glob("*.parquet"))).names
    report = (out / "report.md").read_text()
    assert "SFT base: trained per seed" in report
    for title in ("Table 4", "Table C", "Table B", "beta (SFO", "Negatives in", "Positive anchors", "LoRA scope",
                  "What separates the pairs", "Image guidance 2", "filtered by the oracles", "SFT strength",
                  "App. A", "Wall time", "Δ subject vs SFT", "Inference modes", "](modes.svg)"):
        assert title in report


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
