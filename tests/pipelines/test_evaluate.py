"""Evaluation end to end (local loop and Ray Data), pair analysis buckets, the dpo-dino cdns mode, bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import ImageFilter

from pipelines import cdns, evaluate, evaluate_methods, pair_analysis
from pipelines.config import ConfigError, load_config
from pipelines.evaluate import EvaluateConfig, read_images, run
from pipelines.evaluate_methods import MethodConfig
from pipelines.pair_analysis import PairAnalysisConfig, assign_buckets
from pipelines.synthetic import synthetic_triplets
from sfo.metrics import RANDOM_ENCODERS_NOTE
from sfo.records import QUADRUPLET_SCHEMA, TRIPLET_SCHEMA, encode_png
from tests.sfo.test_dreambench import write_dreambench

FAST = ["eval.size=32", "eval.steps=2", "eval.seeds=2", "eval.subjects=2", "eval.prompts=2", "eval.batch_size=4",
        "scaling.cpus_per_worker=0.5"]
METRICS = ("dino", "clip_i", "clip_t")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dreambench(tmp_path_factory.mktemp("dreambench") / "dataset")


def config(output: Path, *overrides: str) -> EvaluateConfig:
    return load_config(EvaluateConfig, None, [f"output={output}", *FAST, *overrides])


@pytest.fixture(scope="module")
def local_run(dataset, ref_adapter, tmp_path_factory):
    output = tmp_path_factory.mktemp("eval-local")
    cfg = config(output, "runner=local", f"eval.dreambench={dataset}")
    cfg.methods = [MethodConfig("base"), MethodConfig("sft", ref_adapter=str(ref_adapter), active=["ref"])]
    return output, run(cfg)


def test_local_rows_and_summary_are_row_means(local_run, capsys):
    output, summary = local_run
    table = read_images(output, ["base", "sft"])
    assert table.num_rows == 2 * 2 * 2 * 2  # methods x subjects x prompts x seeds
    rows = table.to_pylist()
    assert {(r["subject"], r["prompt"], r["seed"]) for r in rows if r["method"] == "base"} == {
        (s, p, seed) for s, ps in {"backpack": ["a backpack in the jungle", "a backpack in the snow"],
                                   "dog": ["a fluffy dog wearing a red hat", "a fluffy dog in the snow"]}.items()
        for p in ps for seed in (0, 1)}
    assert all(-1 <= r[m] <= 1 for r in rows for m in METRICS) and all(r["random_encoders"] for r in rows)
    base = {(r["subject"], r["prompt"], r["seed"]): r["image_png"] for r in rows if r["method"] == "base"}
    sft = {(r["subject"], r["prompt"], r["seed"]): r["image_png"] for r in rows if r["method"] == "sft"}
    assert base.keys() == sft.keys() and base != sft  # same seeds, the adapter changes the images
    for method in ("base", "sft"):
        mine = [r for r in rows if r["method"] == method]
        for m in METRICS:
            assert summary["methods"][method][m] == pytest.approx(np.mean([r[m] for r in mine]), abs=1e-6)
            dog = [r[m] for r in mine if r["subject"] == "dog"]
            assert summary["subjects"][method]["dog"][m] == pytest.approx(np.mean(dog), abs=1e-6)
    assert summary["note"] == RANDOM_ENCODERS_NOTE
    assert json.loads((output / "summary.json").read_text())["note"] == RANDOM_ENCODERS_NOTE
    assert RANDOM_ENCODERS_NOTE in (output / "summary.csv").read_text()
    assert "NOTE: " + RANDOM_ENCODERS_NOTE in evaluate.format_table(summary)


def test_ray_matches_local(ray_local, local_run, dataset, tmp_path):
    """Same evaluator class on a Ray Data actor pool: the same images and scores as the local loop."""
    output, _ = local_run
    summary = run(config(tmp_path, "runner=ray", f"eval.dreambench={dataset}"))
    key = lambda r: (r["subject"], r["prompt"], r["seed"])  # noqa: E731
    remote = {key(r): r for r in read_images(tmp_path, ["base"]).to_pylist()}
    local = {key(r): r for r in read_images(output, ["base"]).to_pylist()}
    assert remote.keys() == local.keys() and len(remote) == 8
    for k, r in remote.items():
        assert r["image_png"] == local[k]["image_png"]
        assert r["dino"] == pytest.approx(local[k]["dino"], abs=1e-5)
    assert summary["methods"]["base"]["images"] == 8


def test_synthetic_default_runs(tmp_path):
    summary = run(config(tmp_path, "runner=local", "eval.seeds=1"))  # no dreambench: embedded subjects
    assert summary["methods"]["base"]["images"] == 2 and summary["random_encoders"]


@pytest.mark.parametrize("override,field", [
    ("eval.seeds=0", r"eval\.seeds"), ("runner=spark", "runner"), ("eval.size=40", r"eval\.size"),
    ("eval.image_guidance=-1", r"eval\.image_guidance"),
])
def test_bad_values_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=field):
        config(tmp_path, override)


def test_bad_inputs_fail_before_any_work(tmp_path, monkeypatch, dataset):
    def no_work(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(evaluate_methods, "run_local", no_work)
    monkeypatch.setattr(evaluate_methods, "run_ray", no_work)
    cfg = config(tmp_path, f"eval.dreambench={dataset}")
    cfg.methods = [MethodConfig("sft", ref_adapter=str(tmp_path / "nope"), active=["ref"])]
    with pytest.raises(ConfigError, match=r"methods\[0\]\.ref_adapter: no pytorch_lora_weights"):
        run(cfg)
    with pytest.raises(ConfigError, match=r"eval\.dreambench: .*does not exist"):
        run(config(tmp_path, f"eval.dreambench={tmp_path / 'absent'}"))
    with pytest.raises(ConfigError, match=r"eval\.subjects: unknown subject"):
        run(config(tmp_path, f"eval.dreambench={dataset}", "eval.subjects=backpack,cat"))


def test_yaml_loads():
    root = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
    text = (root / "evaluate.yaml").read_text()
    assert text.startswith("# python -m pipelines.evaluate --config pipelines/configs/evaluate.yaml\n")
    assert evaluate.main(["--config", str(root / "evaluate.yaml"), "--print-config"]) == 0
    assert pair_analysis.main(["--config", str(root / "pair_analysis.yaml"), "--print-config"]) == 0


def _triplets(rows: int) -> pa.Table:
    return pa.Table.from_pylist([
        {"sample_id": t.sample_id, "item": t.item, "target_text": t.target_text, "reference_png": encode_png(t.reference),
         "target_png": encode_png(t.target), "source": "synthetic"} for t in synthetic_triplets(rows, 32, seed=5)],
        schema=TRIPLET_SCHEMA)


def test_pair_analysis_buckets(tmp_path):
    """Negatives = the target blurred by radius 0..5: tertiles give 2/2/2 pairs; files split by bucket."""
    triplets = synthetic_triplets(6, 32, seed=5)
    table = _triplets(6).to_pydict()
    blank = {f.name: [None] * 6 for f in QUADRUPLET_SCHEMA if f.name not in table}
    blank.update(negative_png=[encode_png(t.target.filter(ImageFilter.GaussianBlur(r))) for r, t in enumerate(triplets)],
                 negative_mode=["cdns"] * 6, negative_image_degradation=["blur"] * 6, negative_text_degradation=["generic"] * 6,
                 negative_prompt=["p"] * 6, negative_seed=[0] * 6, negative_steps=[2] * 6, negative_guidance=[3.5] * 6,
                 negative_adapter_sha256=["none"] * 6)
    pq.write_table(pa.Table.from_pydict({**table, **blank}, schema=QUADRUPLET_SCHEMA), tmp_path / "q.parquet")
    result = pair_analysis.run(load_config(PairAnalysisConfig, None, [f"analysis.input={tmp_path / 'q.parquet'}",
                                                                      f"analysis.output={tmp_path / 'out'}"]))
    assert result["counts"] == {"low": 2, "mid": 2, "high": 2} and sum(result["histogram"]["counts"]) == 6
    out = pq.read_table(tmp_path / "out" / "quadruplets.parquet")
    scores = np.array(out.column("pair_dino").to_pylist())
    assert scores[0] == pytest.approx(1.0, abs=1e-5)  # radius 0: the negative is the positive
    assert out.column("pair_bucket").to_pylist() == assign_buckets(scores, *result["thresholds"])
    high = pq.read_table(tmp_path / "out" / "bucket=high.parquet")
    assert high.num_rows == 2 and set(high.column("pair_bucket").to_pylist()) == {"high"}
    assert assign_buckets(np.array([0.1, 0.5, 0.9]), 0.3, 0.9) == ["low", "mid", "high"]
    with pytest.raises(ConfigError, match=r"analysis\.thresholds"):
        load_config(PairAnalysisConfig, None, ["analysis.thresholds=[0.9,0.1]"])


def test_dpo_dino_mode_in_cdns(tmp_path):
    """Two SFT samples per triplet; the positive has the higher DINO similarity to the reference."""
    from pipelines.dpo_dino import second_seed
    from sfo.metrics import Scorer
    from sfo.records import decode_png

    pq.write_table(_triplets(2), tmp_path / "t.parquet")
    cfg = load_config(cdns.CdnsConfig, None, [f"data.input={tmp_path / 't.parquet'}", f"data.output={tmp_path / 'out'}",
                                              "cdns.mode=dpo-dino", "cdns.size=32", "cdns.steps=2", "runner=local"])
    assert cdns.run(cfg)["written"] == 2
    scorer = Scorer.tiny()
    for row in pq.read_table(tmp_path / "out").to_pylist():
        assert row["negative_mode"] == "dpo-dino" and row["negative_prompt"] == row["target_text"]
        seed = cdns.sample_seed(0, row["sample_id"])
        assert row["negative_seed"] in (seed, second_seed(seed))
        ref = decode_png(row["reference_png"]).resize((32, 32))
        pos, neg = decode_png(row["target_png"]), decode_png(row["negative_png"])
        assert float(scorer.dino([pos], [ref])[0]) >= float(scorer.dino([neg], [ref])[0]) - 1e-6


def test_synthetic_evaluation_subjects_are_held_out_from_training():
    from pipelines.evaluate import EvalSection, load_benchmark

    bench = load_benchmark(EvalSection(size=32, subjects=4))
    trained = {t.sample_id for t in synthetic_triplets(16, 32, seed=0)}  # prepare.yaml's embedded source
    assert len(bench.prompts) == 4 and not set(bench.prompts) & trained


def test_one_model_for_all_methods_equals_each_method_alone(ref_adapter, tmp_path):
    """A batch mixing methods on one model (adapters switched per method) gives each row the image
    that an evaluator holding only that method gives it."""
    from dataclasses import replace

    cfg = config(tmp_path, "runner=local", "eval.seeds=1")
    cfg.methods = [MethodConfig("base"), MethodConfig("sft", ref_adapter=str(ref_adapter), active=["ref"])]
    bench = evaluate.load_benchmark(cfg.eval)
    rows = [r for m in ("sft", "base") for r in evaluate.work_rows(cfg, bench, m)]
    rows = rows[::2] + rows[1::2]  # interleave the methods inside one batch
    mixed = evaluate.Evaluator(cfg)(pa.Table.from_pylist(rows)).to_pylist()
    assert {r["method"] for r in mixed} == {"base", "sft"}
    for method in ("base", "sft"):
        alone = evaluate.Evaluator(replace(cfg, methods=[m for m in cfg.methods if m.name == method]))
        expected = alone(pa.Table.from_pylist([r for r in rows if r["method"] == method])).to_pylist()
        assert [r["image_png"] for r in mixed if r["method"] == method] == [r["image_png"] for r in expected]


def test_folded_adapters_give_the_images_of_the_lora_layers(ref_adapter, tmp_path):
    """model.fuse_adapters (default) samples with "ref" folded into the base weights; false applies it as LoRA
    layers. The images agree to one PNG level and differ from the base model's."""
    from sfo import adapters
    from sfo.records import decode_png

    images = {}
    for fuse in (True, False):
        cfg = config(tmp_path, "runner=local", "eval.seeds=1", f"model.fuse_adapters={str(fuse).lower()}")
        assert cfg.model.adapter_context() is (adapters.fused_adapters if fuse else adapters.use_adapters)
        cfg.methods = [MethodConfig("base"), MethodConfig("sft", ref_adapter=str(ref_adapter), active=["ref"])]
        bench = evaluate.load_benchmark(cfg.eval)
        rows = [r for m in ("sft", "base") for r in evaluate.work_rows(cfg, bench, m)]
        out = evaluate.Evaluator(cfg)(pa.Table.from_pylist(rows)).to_pylist()
        images[fuse] = {m: np.stack([np.asarray(decode_png(r["image_png"]), dtype=np.int16) for r in out
                                     if r["method"] == m]) for m in ("sft", "base")}
    assert np.abs(images[True]["sft"] - images[False]["sft"]).max() <= 1
    assert np.array_equal(images[True]["base"], images[False]["base"])
    assert np.abs(images[True]["sft"] - images[True]["base"]).max() > 1
    with pytest.raises(ConfigError, match="model.fuse_adapters"):
        config(tmp_path, "model.fuse_adapters=maybe")


def test_cdns_samples_negatives_in_the_configured_mode(tmp_path):
    pq.write_table(_triplets(2), tmp_path / "t.parquet")
    made = {}
    for mode in ("standard", "dual-branch"):
        cfg = load_config(cdns.CdnsConfig, None, [f"data.input={tmp_path / 't.parquet'}", f"data.output={tmp_path / mode}",
                                                  "cdns.size=32", "cdns.steps=2", f"cdns.sampling.mode={mode}",
                                                  "cdns.sampling.switch=0.5", "runner=local"])
        assert cdns.run(cfg)["written"] == 2
        made[mode] = sorted((r["sample_id"], r["negative_png"]) for r in pq.read_table(tmp_path / mode).to_pylist())
    assert [i for i, _ in made["standard"]] == [i for i, _ in made["dual-branch"]]
    assert all(a != b for (_, a), (_, b) in zip(made["standard"], made["dual-branch"]))


def _methods(cfg: EvaluateConfig, ref_adapter: Path) -> EvaluateConfig:
    cfg.methods = [MethodConfig("base"), MethodConfig("sft", ref_adapter=str(ref_adapter), active=["ref"])]
    return cfg


def test_rerun_keeps_images_and_generates_only_the_missing_ones(local_run, dataset, ref_adapter, tmp_path, capsys):
    """The local run's 16 images in 4 files (batches of 4): one file lost, one cut short by a kill, one holding
    2 of its 4 rows. The rerun keeps the 6 images left, moves the cut file aside, generates the 10 missing ones
    (the half-kept batch whole, writing only its 2 missing rows), and its images and summary equal the
    uninterrupted run's, bit for bit."""
    import shutil

    from pipelines.resume import parquet_files

    straight, summary = local_run
    output = tmp_path / "eval"
    shutil.copytree(straight, output)
    files = [Path(p) for p in parquet_files(output / "images")]
    assert len(files) == 4
    files[1].unlink()
    files[2].write_bytes(files[2].read_bytes()[:200])
    pq.write_table(pq.read_table(files[3]).slice(0, 2), files[3])
    kept = {p: p.stat().st_mtime_ns for p in (files[0], files[3])}
    capsys.readouterr()
    resumed = run(_methods(config(output, "runner=local", f"eval.dreambench={dataset}"), ref_adapter))
    out = capsys.readouterr().out
    assert "6 image(s) already in" in out and "10 to generate" in out and "moved unreadable" in out
    assert files[2].with_name(files[2].name + ".incomplete").is_file()  # moved aside, not deleted
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    rows = [r for p in parquet_files(output / "images") for r in pq.read_table(p).to_pylist()]
    keys = [tuple(r[c] for c in evaluate.IMAGE_KEY) for r in rows]
    assert len(keys) == len(set(keys)) == 16  # each image once
    assert read_images(output, ["base", "sft"]).to_pylist() == read_images(straight, ["base", "sft"]).to_pylist()
    assert resumed == summary


def test_finished_rerun_generates_nothing_and_an_added_method_only_its_images(local_run, dataset, ref_adapter,
                                                                            tmp_path, monkeypatch, capsys):
    import shutil

    straight, summary = local_run
    output = tmp_path / "eval"
    shutil.copytree(straight, output)
    monkeypatch.setattr(evaluate, "Evaluator", lambda *a, **k: pytest.fail("a finished rerun loaded the model"))
    assert run(_methods(config(output, "runner=local", f"eval.dreambench={dataset}"), ref_adapter)) == summary
    assert "16 image(s) already in" in capsys.readouterr().out
    monkeypatch.undo()
    cfg = _methods(config(output, "runner=local", f"eval.dreambench={dataset}"), ref_adapter)
    cfg.methods.append(MethodConfig("sft-again", ref_adapter=str(ref_adapter), active=["ref"]))
    capsys.readouterr()
    grown = run(cfg)
    assert "16 image(s) already in" in capsys.readouterr().out and grown["methods"]["sft-again"]["images"] == 8
    assert {k: grown["methods"][k] for k in ("base", "sft")} == summary["methods"]
    assert grown["methods"]["sft-again"] == summary["methods"]["sft"]  # the same adapter: the same images


def test_rerun_with_another_config_names_the_field_and_changes_nothing(local_run, dataset, ref_adapter, tmp_path):
    import shutil

    from sfo import adapters

    straight, _ = local_run
    output = tmp_path / "eval"
    shutil.copytree(straight, output)
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"^eval\.steps: .*another config.*new output="):
        run(_methods(config(output, "runner=local", f"eval.dreambench={dataset}", "eval.steps=3"), ref_adapter))
    other = tmp_path / "other-ref"
    shutil.copytree(ref_adapter, other)
    weights = other / adapters.LORA_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))  # retrained, say
    with pytest.raises(ConfigError, match=r"^methods\[sft\]\.ref_adapter: "):
        run(_methods(config(output, "runner=local", f"eval.dreambench={dataset}"), other))
    assert {p: p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
