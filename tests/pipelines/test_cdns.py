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


def counts(result: dict) -> tuple[int, int, int]:
    """(skipped, written, dropped) of a cdns result."""
    return result["skipped"], result["written"], result["dropped"]


@pytest.fixture(scope="module")
def ray_output(ray_local, triplets, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("cdns-ray")
    result = run(config(triplets, output, "runner=ray", "cdns.rows_per_file=2"))
    assert counts(result) == (0, ROWS, 0) and result["output"] == str(output) and result["bytes_per_row"] > 0
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


def test_local_loop_matches_ray_and_resumes(ray_output, triplets, tmp_path, torch_threads):
    """Same generator, same seeds, same torch threads: the plain loop reproduces Ray's PNG bytes, across a resume.

    Ray gives its 0.5-CPU actor one torch thread; the loop here runs with one too (``scaling.torch_threads=1``):
    a sum split over two threads may round a pixel the other way (seen on a 2-core AMD EPYC, 2026-12-06)."""
    first = run(config(triplets, tmp_path, "runner=local", "data.limit=2", "scaling.torch_threads=1"))
    assert first["written"] == 2 and first["skipped"] == 0
    (tmp_path / "cdns-interrupted_000000.parquet").write_bytes(b"PAR1 cut short")  # an interrupted write
    second = run(config(triplets, tmp_path, "runner=local", "scaling.torch_threads=1"))
    assert counts(second) == (2, 2, 0) and second["output"] == str(tmp_path)
    assert (tmp_path / "cdns-interrupted_000000.parquet.incomplete").exists()
    ids = read(tmp_path).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == ROWS
    local = {r["sample_id"]: r["negative_png"] for r in read(tmp_path).to_pylist()}
    remote = {r["sample_id"]: r["negative_png"] for r in read(ray_output).to_pylist()}
    assert local == remote
    assert counts(run(config(triplets, tmp_path, "runner=local"))) == (ROWS, 0, 0)


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

    def one_pass(cfg, files, todo, prefix, keep_cache):  # stands in for Ray Data: the first pass's 2nd file is cut short
        passes.append(list(todo))
        Path(cfg.data.output).mkdir(parents=True, exist_ok=True)
        for k, ids in enumerate([todo[:2], todo[2:]]):
            path = Path(cfg.data.output) / f"{prefix}_{k:06d}.parquet"
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


def test_the_config_is_recorded_and_a_rerun_making_other_negatives_fails_naming_the_field(triplets, tmp_path):
    """``<output>/_cdns.json`` holds what the negatives depend on; a rerun asking for other ones (seed, mode) is
    refused before any work, naming the field; batch size, runner and limit may change (they cut the work)."""
    import json

    out = tmp_path / "out"
    run(config(triplets, out, "runner=local", "data.limit=1"))
    recorded = json.loads((out / "_cdns.json").read_text())["config"]
    assert recorded["cdns.seed"] == 0 and recorded["data.input"] == str(triplets) and recorded["model.ref_adapter"] is None
    assert not {"cdns.batch_size", "data.limit", "runner", "data.output"} & set(recorded)
    before = cdns.parquet_files(out)
    for override, field in [("cdns.seed=1", "cdns.seed"), ("cdns.mode=self-play", "cdns.mode")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ".*another config"):
            run(config(triplets, out, "runner=local", override))
    assert cdns.parquet_files(out) == before  # nothing written by the refused runs
    assert counts(run(config(triplets, out, "runner=local", "cdns.batch_size=2", "data.limit=2"))) == (1, 1, 0)


def test_an_output_without_a_record_is_refused(triplets, tmp_path):
    out = tmp_path / "old"
    run(config(triplets, out, "runner=local", "data.limit=1"))
    (out / "_cdns.json").unlink()  # written before cdns recorded its config
    with pytest.raises(ConfigError, match=r"data\.output: .*no record of the config"):
        run(config(triplets, out, "runner=local"))


def cached_triplets(triplets: Path, path: Path, dtype: str = "bf16") -> Path:
    """``triplets`` with the tiny model's encoder caches (``sfo.records.CACHE_FIELDS``) in ``dtype``, as prepare's
    ``cache.enabled`` writes them: target/reference latents, T5 embeddings and the pooled CLIP embedding."""
    from sfo.latents import encode_images
    from sfo.models import load_flux, model_identity
    from sfo.records import CACHE_FIELDS, cache_bytes, decode_images
    from sfo.text import encode_prompts

    model = load_flux("tiny", device="cpu")
    table = pq.read_table(triplets)
    target = encode_images(model, decode_images(table["target_png"].to_pylist(), SIZE)).float()  # (N, L, 64)
    reference = encode_images(model, decode_images(table["reference_png"].to_pylist(), SIZE)).float()
    text = encode_prompts(model, table["target_text"].to_pylist())
    embeds, pooled = text.prompt_embeds.float(), text.pooled.float()  # (N, Lt, D), (N, P)
    n = table.num_rows
    columns = {
        "cache_target_latents": [cache_bytes(x.numpy(), dtype) for x in target],
        "cache_reference_latents": [cache_bytes(x.numpy(), dtype) for x in reference],
        "cache_prompt_embeds": [cache_bytes(x.numpy(), dtype) for x in embeds],
        "cache_pooled": [cache_bytes(x.numpy(), dtype) for x in pooled],
        "cache_latent_tokens": [target.shape[1]] * n, "cache_text_tokens": [embeds.shape[1]] * n,
        "cache_model": [model_identity("tiny")] * n, "cache_size": [SIZE] * n, "cache_dtype": [dtype] * n,
    }
    for field in CACHE_FIELDS:
        table = table.append_column(field, pa.array(columns[field.name], field.type))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_cached_triplets_give_quadruplets_that_refer_to_their_tensors_by_sample_id(triplets, tmp_path, capsys):
    """With a cache that fits, the output is ``CACHED_QUADRUPLET_SCHEMA``: the triplet's small cache columns and the
    negatives' latents in the row's ``cache_dtype`` (bf16 here), not the triplet's four tensors; its bytes per row
    stay within the PNGs + the negative's latents + the file's overhead, well below the cached triplets'."""
    import numpy as np
    import torch

    from sfo.latents import encode_images
    from sfo.models import load_flux
    from sfo.records import CACHE_META_COLUMNS, CACHE_TENSOR_COLUMNS, CACHED_QUADRUPLET_SCHEMA, decode_images

    source = cached_triplets(triplets, tmp_path / "cached" / "part-0.parquet")
    out = tmp_path / "out"
    result = run(config(source, out, "runner=local", f"cdns.rows_per_file={ROWS}"))
    printed = capsys.readouterr().out
    assert "the triplets' tensors are referred to by sample_id" in printed
    assert f"{ROWS} row(s), {result['bytes_per_row'] / 1024:.1f} KiB per row" in printed
    table = read(out)
    assert table.schema.equals(CACHED_QUADRUPLET_SCHEMA) and not set(CACHE_TENSOR_COLUMNS) & set(table.column_names)
    inputs = {r["sample_id"]: r for r in pq.read_table(source).to_pylist()}
    rows = table.to_pylist()
    assert all(r[c] == inputs[r["sample_id"]][c] for r in rows for c in CACHE_META_COLUMNS)
    assert {r["cache_dtype"] for r in rows} == {"bf16"}
    latents = encode_images(load_flux("tiny", device="cpu"),
                            decode_images(table["negative_png"].to_pylist(), SIZE)).float()  # (N, L, 64)
    stored = np.stack([(np.frombuffer(r["cache_negative_latents"], "<u2").astype("<u4") << 16).view("<f4") for r in rows])
    torch.testing.assert_close(torch.from_numpy(stored).reshape(latents.shape), latents, rtol=2 ** -8, atol=1e-6)

    png = sum(len(r[c]) for r in rows for c in ("reference_png", "target_png", "negative_png")) / len(rows)
    negative = len(rows[0]["cache_negative_latents"])
    overhead = 24 * 1024 / ROWS  # one file of ROWS rows: its footer (schema, min/max statistics) and page headers
    assert result["bytes_per_row"] < png + negative + overhead  # measured: 8.8 KiB < 3.6 + 6 KiB
    tensors = sum(len(r[c]) for r in inputs.values() for c in CACHE_TENSOR_COLUMNS) / len(rows)  # 5 KiB at 32 px
    triplet_bytes = source.stat().st_size / len(rows)  # the cached triplets' file, tensors included
    assert result["bytes_per_row"] < triplet_bytes - tensors / 2 + len(rows[0]["negative_png"]) + negative


def test_triplets_cached_before_cache_dtype_read_as_fp32(triplets, tmp_path):
    """Triplets whose cache predates the ``cache_dtype`` column (fp32 bytes): the output says fp32."""
    legacy = cached_triplets(triplets, tmp_path / "legacy" / "part-0.parquet", "fp32")
    pq.write_table(pq.read_table(legacy).drop_columns(["cache_dtype"]), legacy)
    out = tmp_path / "out"
    run(config(legacy, out, "runner=local", "data.limit=2"))
    table = read(out)
    assert table["cache_dtype"].to_pylist() == ["fp32", "fp32"]
    assert len(table["cache_negative_latents"][0].as_py()) == (SIZE // 16) ** 2 * 64 * 4
