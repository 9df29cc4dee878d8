import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import ConfigError, load_config
from pipelines.prepare import PrepareConfig, main, run
from sfo.records import CACHE_FIELDS, TRIPLET_SCHEMA, check_schema, decode_cache, decode_png
from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path, *overrides):
    return load_config(PrepareConfig, None, [f"data.output={tmp_path / 'out'}", *overrides])


def test_synthetic_source_writes_the_triplet_schema(tmp_path):
    out = run(_config(tmp_path, "data.limit=5", "data.size=32"))
    table = pq.read_table(out)
    check_schema(table, TRIPLET_SCHEMA, "triplets")
    assert table.num_rows == 5 and len(set(table.column("sample_id").to_pylist())) == 5
    assert decode_png(table.column("target_png")[0].as_py()).size == (32, 32)
    again = run(_config(tmp_path / "again", "data.limit=5", "data.size=32"))
    assert pq.read_table(again).column("target_png").to_pylist() == table.column("target_png").to_pylist()


def test_cache_columns_decode_to_the_encoders_outputs(ray_local, tmp_path, tiny_flux):
    """3 rows at 32 px, encoded 2 at a time by a Ray Data actor, stored as fp32: (32/16)^2 = 4 tokens of 64
    features per image."""
    import torch

    from sfo.latents import encode_images
    from sfo.models import model_identity
    from sfo.text import encode_prompts

    out = run(_config(tmp_path, "data.limit=3", "data.size=32", "cache.enabled=true", "cache.batch_size=2",
                      "cache.store_dtype=fp32"))
    table = pq.read_table(out)
    check_schema(table, pa.schema(list(TRIPLET_SCHEMA) + CACHE_FIELDS), "cached triplets")
    assert table.column("cache_dtype").to_pylist() == ["fp32"] * 3
    assert set(table.column("cache_model").to_pylist()) == {model_identity("tiny")}
    assert table.column("cache_size").to_pylist() == [32] * 3
    assert table.column("cache_latent_tokens").to_pylist() == [4] * 3
    cached = {k: torch.from_numpy(v) for k, v in decode_cache(table.to_pydict()).items()}
    text = encode_prompts(tiny_flux, table.column("target_text").to_pylist())
    assert cached["target"].shape == (3, 4, 64) and cached["reference"].shape == (3, 4, 64)
    assert cached["prompt_embeds"].shape == text.prompt_embeds.shape == (3, tiny_flux.text_max_length, 32)
    assert cached["pooled"].shape == text.pooled.shape == (3, 32)
    for key, column in (("target", "target_png"), ("reference", "reference_png")):
        images = [decode_png(b) for b in table.column(column).to_pylist()]
        # one batch of 3 here vs 2 + 1 in prepare: conv reductions differ in the last float32 bits
        torch.testing.assert_close(cached[key], encode_images(tiny_flux, images), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached["prompt_embeds"], text.prompt_embeds)
    torch.testing.assert_close(cached["pooled"], text.pooled)


def test_cache_at_another_size_resizes_first(ray_local, tmp_path, tiny_flux):
    import torch

    from sfo.latents import encode_images

    table = pq.read_table(run(_config(tmp_path, "data.limit=1", "data.size=32", "cache.enabled=true", "cache.size=48",
                                      "cache.store_dtype=fp32")))
    assert table.column("cache_size").to_pylist() == [48] and table.column("cache_latent_tokens").to_pylist() == [9]
    image = decode_png(table.column("target_png")[0].as_py()).resize((48, 48))
    # encoded in a Ray actor (its own torch threads): conv reductions differ in the last float32 bits
    torch.testing.assert_close(torch.from_numpy(decode_cache(table.to_pydict())["target"]),
                               encode_images(tiny_flux, [image]), rtol=1e-4, atol=1e-4)


def _pair_folder(tmp_path, scores):
    folder = tmp_path / "pairs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, score in enumerate(scores):
        Image.fromarray(rng.integers(0, 256, (528, 1056, 3), dtype=np.uint8)).save(folder / f"pair{i}.png")
        (folder / f"pair{i}.txt").write_text(f"Instance: thing {i}\nDescription1: left {i}\nDescription2: right {i}\n")
        if score is not None:
            (folder / f"pair{i}.json").write_text(json.dumps(dict.fromkeys(
                ["compositeStructure", "objectConsistency", "imageQuality"], 5) | {"imageQuality": score}))
    return folder


def test_subjects200k_folder_with_quality_filter(tmp_path, capsys):
    folder = _pair_folder(tmp_path, [5, 4, None])
    out = run(_config(tmp_path, "data.source=subjects200k", f"data.input={folder}", "data.size=32"))
    table = pq.read_table(out)
    assert table.num_rows == 2  # pair1 scores 4 < 5
    items = table.column("item").to_pylist()
    assert items == ["thing 0", "thing 2"]
    for row in table.to_pylist():
        side = row["sample_id"].rsplit("-", 1)[1]
        assert row["target_text"] == f"{'left' if side == '0' else 'right'} {row['item'].split()[1]}"
    assert "1 dropped below quality 5" in capsys.readouterr().out


def test_subjects200k_both_directions(tmp_path):
    folder = _pair_folder(tmp_path, [5])
    table = pq.read_table(run(_config(tmp_path, "data.source=subjects200k", f"data.input={folder}", "data.size=32",
                                      "data.both_directions=true")))
    assert sorted(table.column("target_text").to_pylist()) == ["left 0", "right 0"]


def test_subjects200k_parquet_layout(tmp_path):
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (528, 1056, 3), dtype=np.uint8)).save(buffer, format="PNG")
    rows = [{"image": {"bytes": buffer.getvalue(), "path": None},
             "description": {"item": "mug", "description_0": "a mug on a desk", "description_1": "a mug, studio"},
             "quality_assessment": {"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5}}]
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), shards / "train-00000.parquet")
    table = pq.read_table(run(_config(tmp_path, "data.source=subjects200k", f"data.input={shards}", "data.size=32")))
    assert table.num_rows == 1 and table.column("item")[0].as_py() == "mug"


def test_shared_samples(tmp_path):
    folder = shared_path("data", "subjects200k_samples")
    table = pq.read_table(run(_config(tmp_path, "data.source=subjects200k", f"data.input={folder}", "data.size=64",
                                      "data.padding=0")))
    assert table.num_rows == 3 and "Hedgehog" in table.column("item").to_pylist()


def test_subjects200k_with_the_cache_renders_in_ray_as_without(ray_local, tmp_path):
    """The cache's Ray Data stage cuts the pairs' panels itself: same rows as the driver's plain run."""
    folder = _pair_folder(tmp_path, [5, 5, None])
    common = ["data.source=subjects200k", f"data.input={folder}", "data.size=32", "data.both_directions=true",
              "data.rows_per_file=4"]
    plain = _rows(run(_config(tmp_path / "plain", *common)))
    cached = _rows(run(_config(tmp_path / "cached", *common, "cache.enabled=true", "cache.batch_size=3")))
    assert len(plain) == 6
    assert {k: {c: r[c] for c in TRIPLET_SCHEMA.names} for k, r in cached.items()} == plain


def test_subjects200k_from_s3_into_s3(s3_bucket, tmp_path):
    """Both layouts read from an s3:// prefix (listing, PNG/TXT/JSON objects, Parquet shards) give the rows a
    local folder gives, written to s3:// with their record."""
    from cluster import storage

    folder = _pair_folder(tmp_path, [5, 4, None])
    storage.upload_folder(folder, f"{s3_bucket}/pairs")
    common = ["data.source=subjects200k", "data.size=32"]
    local = _rows(run(_config(tmp_path / "local", *common, f"data.input={folder}")))
    out = run(load_config(PrepareConfig, None, [*common, f"data.input={s3_bucket}/pairs", f"data.output={s3_bucket}/out"]))
    assert out == f"{s3_bucket}/out" and storage.is_file(f"{s3_bucket}/out/_prepare.json")
    remote = _rows(out)
    assert len(remote) == 2 and remote == local
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [{"image": {"bytes": (folder / f"pair{i}.png").read_bytes(), "path": None},
             "description": {"item": f"thing {i}", "description_0": f"left {i}", "description_1": f"right {i}"}}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), shards / "train-00000.parquet", row_group_size=2)  # rows in 2 groups
    storage.upload_folder(shards, f"{s3_bucket}/shards")
    from_shards = _rows(run(load_config(PrepareConfig, None, [*common, f"data.input={s3_bucket}/shards",
                                                              f"data.output={s3_bucket}/from-shards"])))
    assert len(from_shards) == 3 and from_shards == _rows(run(_config(tmp_path / "shards-local", *common,
                                                                      f"data.input={shards}")))


def test_cache_into_s3_in_bf16_resumes_and_writes_nothing_under_the_cwd(ray_local, s3_bucket, tmp_path, monkeypatch,
                                                                        capsys):
    """5 rows in files of 2 encoded by the actor pool into s3://: bf16 cells are half an fp32 run's bytes and
    decode to within bf16's rounding (2^-9 relative) of it. One object deleted: the rerun makes only its 2
    rows, leaves the others' bytes as they were; the finished output reruns as a no-op; the working
    directory stays empty throughout."""
    import os

    import torch

    from cluster import storage

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    common = ["data.limit=5", "data.size=32", "data.rows_per_file=2", "cache.enabled=true", "cache.batch_size=2"]
    fp32 = _rows(run(load_config(PrepareConfig, None, [*common, "cache.store_dtype=fp32",
                                                       f"data.output={tmp_path / 'fp32'}"])))
    output = f"{s3_bucket}/triplets"
    args = [*common, f"data.output={output}"]
    assert run(load_config(PrepareConfig, None, args)) == output
    bf16 = _rows(output)
    assert bf16.keys() == fp32.keys() and {r["cache_dtype"] for r in bf16.values()} == {"bf16"}
    ids = sorted(bf16)
    for column in ("cache_target_latents", "cache_reference_latents", "cache_prompt_embeds", "cache_pooled"):
        assert all(2 * len(bf16[i][column]) == len(fp32[i][column]) for i in ids)
    columns = lambda rows: {k: [rows[i][k] for i in ids] for k in rows[ids[0]]}  # noqa: E731
    for key, value in decode_cache(columns(bf16)).items():
        torch.testing.assert_close(torch.from_numpy(value), torch.from_numpy(decode_cache(columns(fp32))[key]),
                                   rtol=2**-8, atol=1e-6)

    objects = {path: storage.read_bytes(path) for path in storage.list_files(output, ".parquet")}
    assert [storage.basename(p) for p in objects] == [f"part-{i:05d}.parquet" for i in range(3)]
    lost = storage.join(output, "part-00001.parquet")
    storage.delete_file(lost)
    capsys.readouterr()
    run(load_config(PrepareConfig, None, args))
    out = capsys.readouterr().out
    assert "resuming: 3 triplet(s) already" in out and "wrote 2 triplets (3 kept from an earlier run)" in out
    assert _rows(output) == bf16  # the lost ids made again, each once
    assert {p: storage.read_bytes(p) for p in objects if p != lost} == {p: b for p, b in objects.items() if p != lost}
    run(load_config(PrepareConfig, None, args))
    assert "already holds all 5 triplets of this config; nothing to do" in capsys.readouterr().out
    assert os.listdir(cwd) == []


@pytest.mark.parametrize("overrides,field", [
    (["data.source=laion"], "data.source"),
    (["data.source=subjects200k"], "data.input"),
    (["data.size=40"], "data.size"),
    (["data.limit=0"], "data.limit"),
    (["cache.size=20"], "cache.size"),
    (["cache.dtype=int8"], "cache.dtype"),
    (["cache.store_dtype=fp16"], "cache.store_dtype"),
    (["data.output=ftp://host/out"], "data.output"),
    (["data.source=subjects200k", "data.input=s3:///no-bucket"], "data.input"),
])
def test_bad_configs_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field):
        _config(tmp_path, *overrides)


def _rows(folder: str | Path) -> dict:
    """sample id -> row over the output's Parquet files, local or s3:// (each id must come once)."""
    from cluster import storage
    from pipelines.resume import parquet_files

    rows = [row for path in parquet_files(folder) for row in storage.read_table(path).to_pylist()]
    ids = [row["sample_id"] for row in rows]
    assert len(ids) == len(set(ids)), "a sample id written twice"
    return {row["sample_id"]: row for row in rows}


def test_rerun_after_lost_and_cut_files_makes_only_the_missing_rows(tmp_path, capsys):
    """10 rows in files of 3 (3+3+3+1). One finished file lost, one cut short by a kill: the rerun keeps the
    other two, moves the cut one aside, makes its 3 + the lost file's 3 rows, and ends as a straight run."""
    args = ("data.limit=10", "data.size=16", "data.rows_per_file=3")
    output = Path(run(_config(tmp_path, *args)))
    straight = _rows(output)
    assert len(straight) == 10 and sorted(p.name for p in output.glob("*.parquet")) == [
        f"part-{i:05d}.parquet" for i in range(4)]
    kept = {p: p.stat().st_mtime_ns for p in (output / "part-00000.parquet", output / "part-00003.parquet")}
    (output / "part-00001.parquet").unlink()
    cut = output / "part-00002.parquet"
    cut.write_bytes(cut.read_bytes()[:100])
    capsys.readouterr()
    run(_config(tmp_path, *args))
    out = capsys.readouterr().out
    assert "resuming: 4 triplet(s) already" in out and "wrote 6 triplets (4 kept from an earlier run)" in out
    assert (output / "part-00002.parquet.incomplete").is_file()  # moved aside, not deleted
    assert _rows(output) == straight  # same ids, same content, each once
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished files untouched


def test_finished_rerun_is_a_no_op_that_says_so(tmp_path, capsys, monkeypatch):
    from pipelines import prepare

    output = Path(run(_config(tmp_path, "data.limit=2", "data.size=16")))
    before = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    monkeypatch.setattr(prepare, "synthetic_rows", lambda *a: pytest.fail("a finished rerun read its source"))
    capsys.readouterr()
    assert run(_config(tmp_path, "data.limit=2", "data.size=16", "data.rows_per_file=1")) == str(output)
    assert "already holds all 2 triplets of this config; nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in output.iterdir()} == before


@pytest.mark.parametrize("override,field", [("data.size=32", "data.size"), ("data.limit=3", "data.limit"),
                                            ("data.seed=1", "data.seed"), ("cache.enabled=true", "cache.enabled"),
                                            ("cache.store_dtype=fp32", "cache.store_dtype")])
def test_rerun_with_another_config_names_the_field(tmp_path, override, field):
    output = Path(run(_config(tmp_path, "data.limit=2", "data.size=16")))
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: .*made with another config.*new data\.output"):
        run(_config(tmp_path, "data.limit=2", "data.size=16", override))
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before


def test_files_without_a_record_and_missing_input_are_refused(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    pq.write_table(pa.table({"sample_id": ["x"]}), folder / "old.parquet")
    with pytest.raises(ConfigError, match=r"data\.output: .*no record of the config.*new data\.output"):
        run(_config(tmp_path, "data.limit=1", "data.size=16"))
    with pytest.raises(FileNotFoundError, match="data.input"):
        run(_config(tmp_path / "x", "data.source=subjects200k", f"data.input={tmp_path / 'nope'}"))


def test_command_line_and_yaml(tmp_path):
    assert main(["--config", str(ROOT / "pipelines/configs/prepare.yaml"), f"data.output={tmp_path / 'cli'}",
                 "data.limit=2", "data.size=16"]) == 0
    assert pq.read_table(tmp_path / "cli").num_rows == 2
    result = subprocess.run([sys.executable, "-m", "pipelines.prepare", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "key=value" in result.stdout
