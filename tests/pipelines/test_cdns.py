"""The cdns stage: Ray Data and the plain loop give the same quadruplets; resume; configs fail early."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import cdns
from pipelines.cdns import CdnsConfig, run
from pipelines.config import ConfigError, load_config
from pipelines.synthetic import synthetic_triplets
from sfo.records import QUADRUPLET_SCHEMA, TRIPLET_SCHEMA, check_schema, decode_png, encode_png

ROWS = 4
SIZE = 32
FAST = [f"cdns.size={SIZE}", "cdns.steps=2", "cdns.batch_size=4", "scaling.num_workers=1",
        "scaling.cpus_per_worker=0.5"]


@pytest.fixture(scope="module")
def triplets(tmp_path_factory) -> Path:
    """4 synthetic triplets at 32 px as one Parquet file (the prepare stage's layout)."""
    rows = synthetic_triplets(ROWS, SIZE, seed=3)
    table = pa.Table.from_pylist([
        {"sample_id": t.sample_id, "item": t.item, "target_text": t.target_text,
         "reference_png": encode_png(t.reference), "target_png": encode_png(t.target), "source": "synthetic"}
        for t in rows], schema=TRIPLET_SCHEMA)
    path = tmp_path_factory.mktemp("triplets") / "part-0.parquet"
    pq.write_table(table, path)
    return path


def config(triplets: Path, output: Path, *overrides: str) -> CdnsConfig:
    return load_config(CdnsConfig, None, [f"data.input={triplets}", f"data.output={output}", *FAST, *overrides])


def read(output: Path) -> pa.Table:
    return pq.ParquetDataset(cdns.parquet_files(output)).read()


@pytest.fixture(scope="module")
def ray_output(ray_local, triplets, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("cdns-ray")
    result = run(config(triplets, output, "runner=ray", "cdns.rows_per_file=2"))
    assert result == {"skipped": 0, "written": ROWS, "dropped": 0, "output": output}
    return output


def test_ray_writes_a_file_per_rows_per_file_whatever_the_input_layout(ray_output):
    """The 4 triplets sit in one input file (one block as read); with rows_per_file 2 they come out as two
    files of two rows, each written when its rows were done, so a kill loses at most one file's rows."""
    files = cdns.parquet_files(ray_output)
    assert [pq.read_metadata(f).num_rows for f in files] == [2, 2]


def test_ray_output_keeps_the_input_order_whatever_actor_finishes_first(ray_local, triplets, tmp_path, monkeypatch):
    """Training reads the files in name order: with two actors, the names must follow the input, or the same
    negatives reach the sfo job in another order from run to run. The pipeline runs with Ray Data's
    ``preserve_order`` (which actor finishes first is timing, so the flag is checked, then a real run's order)."""
    import ray

    context = ray.data.DataContext.get_current()
    seen = []
    monkeypatch.setattr(cdns, "_write_negatives", lambda *a: seen.append(context.execution_options.preserve_order))
    before = context.execution_options.preserve_order
    run(config(triplets, tmp_path / "flag", "runner=ray"))
    assert seen and all(seen) and context.execution_options.preserve_order == before  # set for the write, restored
    monkeypatch.undo()
    out = tmp_path / "ordered"
    run(config(triplets, out, "runner=ray", "cdns.rows_per_file=1", "scaling.num_workers=2"))
    assert read(out).column("sample_id").to_pylist() == pq.read_table(triplets).column("sample_id").to_pylist()


def test_ray_writes_quadruplets_with_provenance(ray_output, triplets):
    table = read(ray_output)
    check_schema(table, QUADRUPLET_SCHEMA, "cdns output")
    source = pq.read_table(triplets).to_pylist()
    assert sorted(table.column("sample_id").to_pylist()) == sorted(r["sample_id"] for r in source)
    by_id = {r["sample_id"]: r for r in table.to_pylist()}
    for row in source:
        out = by_id[row["sample_id"]]
        assert out["target_png"] == row["target_png"] and out["target_text"] == row["target_text"]
        assert out["negative_mode"] == "cdns" and out["negative_image_degradation"] == "blur"
        assert out["negative_text_degradation"] == "generic" and out["negative_noise_std"] is None
        assert out["negative_blur_radius"] == 5.0  # paper Sec. 4.1
        assert out["negative_prompt"] == f"a photo of {row['item']}"
        assert out["negative_steps"] == 2 and out["negative_guidance"] == pytest.approx(3.5)
        assert out["negative_adapter_sha256"] == cdns.NO_ADAPTER
        assert out["negative_seed"] == cdns.sample_seed(0, row["sample_id"])
        assert decode_png(out["negative_png"]).size == (SIZE, SIZE)


def test_local_loop_matches_ray_and_resumes(ray_output, triplets, tmp_path):
    """Same generator, same seeds: the plain loop reproduces Ray's PNG bytes, across a resume."""
    first = run(config(triplets, tmp_path, "runner=local", "data.limit=2"))
    assert first["written"] == 2 and first["skipped"] == 0
    (tmp_path / "cdns-interrupted_000000.parquet").write_bytes(b"PAR1 cut short")  # an interrupted write
    second = run(config(triplets, tmp_path, "runner=local"))
    assert second == {"skipped": 2, "written": 2, "dropped": 0, "output": tmp_path}
    assert (tmp_path / "cdns-interrupted_000000.parquet.incomplete").exists()
    ids = read(tmp_path).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == ROWS
    local = {r["sample_id"]: r["negative_png"] for r in read(tmp_path).to_pylist()}
    remote = {r["sample_id"]: r["negative_png"] for r in read(ray_output).to_pylist()}
    assert local == remote
    assert run(config(triplets, tmp_path, "runner=local")) == {"skipped": ROWS, "written": 0, "dropped": 0, "output": tmp_path}


def test_ray_rerun_writes_nothing_new(ray_output, triplets):
    files = cdns.parquet_files(ray_output)
    assert run(config(triplets, ray_output, "runner=ray"))["written"] == 0
    assert cdns.parquet_files(ray_output) == files


def test_self_play_keeps_the_prompt_and_blur_sweep_is_recorded(triplets, tmp_path):
    run(config(triplets, tmp_path / "sp", "runner=local", "cdns.mode=self-play", "data.limit=1"))
    row = read(tmp_path / "sp").to_pylist()[0]
    source = pq.read_table(triplets).to_pylist()[0]
    assert row["negative_prompt"] == source["target_text"]
    assert row["negative_image_degradation"] == "none" and row["negative_blur_radius"] is None
    run(config(triplets, tmp_path / "sweep", "runner=local", "cdns.blur_radius=2.5", "data.limit=1"))
    assert read(tmp_path / "sweep").column("negative_blur_radius").to_pylist() == [2.5]


@pytest.mark.parametrize("override,field", [
    ("cdns.mode=dreambooth", "cdns.mode"),
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("cdns.size=40", "cdns.size"),
    ("cdns.steps=0", "cdns.steps"),
    ("cdns.blur_radius=-1", "cdns.blur_radius"),
    ("cdns.image_guidance=nan", "cdns.image_guidance"),
    ("runner=spark", "runner"),
    ("cdns.oracle_filter=true", "cdns.oracle_filter"),  # the tiny model has no oracle
])
def test_bad_values_name_the_field(triplets, tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config(triplets, tmp_path, override)


def test_bad_inputs_fail_before_any_work(triplets, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(cdns, "run_ray", no_work)
    with pytest.raises(ConfigError, match=r"data\.input: .*does not exist"):
        run(config(tmp_path / "absent.parquet", tmp_path / "out"))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(triplets).drop_columns(["target_png"]), bad)
    with pytest.raises(ConfigError, match="data.input .*missing column 'target_png'"):
        run(config(bad, tmp_path / "out"))


def test_help_and_yaml_load(capsys):
    with pytest.raises(SystemExit) as exit_:
        cdns.main(["--help"])
    assert exit_.value.code == 0 and "cdns" in capsys.readouterr().out
    yaml_path = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "cdns.yaml"
    assert yaml_path.read_text().startswith("# python -m pipelines.cdns --config pipelines/configs/cdns.yaml\n")
    assert cdns.main(["--config", str(yaml_path), "--print-config"]) == 0


def test_a_job_given_an_unreachable_address_exits_2_naming_it(triplets, tmp_path, capsys, monkeypatch):
    import socket

    import ray

    from pipelines import common

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh job process
    monkeypatch.setattr(common, "_address", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = cdns.main(["--address", f"127.0.0.1:{port}", f"data.input={triplets}", f"data.output={tmp_path / 'out'}",
                      f"cdns.size={SIZE}", "cdns.steps=1"])
    assert code == 2 and f"--address '127.0.0.1:{port}'" in capsys.readouterr().err


def test_generators_report_progress_every_rows_per_file(triplets, tmp_path, capsys):
    run(config(triplets, tmp_path, "runner=local", "cdns.rows_per_file=2"))
    out = capsys.readouterr().out
    assert ": 2 rows generated" in out and ": 4 rows generated" in out and ": 3 rows generated" not in out
    assert out.count("[cdns] memory plan per GPU: sample") == 1  # printed once, before the model loads


def test_a_plan_above_the_gpus_memory_is_refused_naming_the_batch_before_any_work(triplets, tmp_path, monkeypatch):
    import sfo.models

    def must_not_run(*args, **kwargs):
        raise AssertionError("the job went past its memory check")

    monkeypatch.setattr(sfo.models, "load_flux", must_not_run)
    monkeypatch.setattr(cdns, "run_ray", must_not_run)
    cfg = config(triplets, tmp_path / "out", "scaling.use_gpu=true", "cdns.batch_size=64", "model.fuse_adapters=false")
    plan = cdns.plan_memory(cfg, cdns.model_shape(cfg.model.source))
    cfg.scaling.gpu_memory_gib = (plan.weights + plan.cache) / 0.9 / 2**30  # the weights fit, the batch does not
    with pytest.raises(ConfigError, match=r"memory plan: sample needs .*lower cdns\.batch_size \(now 64\)"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_samples_whose_file_a_killed_writer_cut_short_are_generated_again(triplets, tmp_path, monkeypatch, capsys):
    """A pass that leaves a truncated file (a worker killed while writing it, Ray retrying elsewhere): the job
    moves it aside and generates its samples once more, so it ends with every sample exactly once."""
    passes = []

    def one_pass(cfg, files, todo, prefix):  # stands in for Ray Data: the first pass's second file is cut short
        passes.append(list(todo))
        cfg.data.output.mkdir(parents=True, exist_ok=True)
        for k, ids in enumerate([todo[:2], todo[2:]]):
            path = cfg.data.output / f"{prefix}_{k:06d}.parquet"
            pq.write_table(pa.table({"sample_id": ids}), path)
            if len(passes) == 1 and k == 1:
                path.write_bytes(path.read_bytes()[:20])

    monkeypatch.setattr(cdns, "run_ray", one_pass)
    out = tmp_path / "out"
    result = run(config(triplets, out, "runner=ray"))
    ids = [f"synthetic-3-{i:06d}" for i in range(ROWS)]
    assert passes == [ids, ids[2:]] and result["written"] == ROWS
    assert sorted(read(out)["sample_id"].to_pylist()) == ids
    assert "2 sample(s) missing after the pass" in capsys.readouterr().out
    assert len(list(out.glob("*.incomplete"))) == 1  # kept aside, not deleted
