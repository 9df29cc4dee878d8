"""cdns and evaluate on an object store (moto's S3 server): triplets, adapters and outputs as ``s3://`` URIs.

Run from an empty working directory, which must stay empty: downloads go to the system's temporary folder,
writes go to the bucket. The Ray runs of these stages are covered locally (tests/pipelines/test_cdns.py,
test_evaluate.py): this module's session Ray started before the bucket's ``AWS_*`` variables existed, so its
workers could not reach the test server; the plain loops run the same generator and file code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster import storage
from pipelines import cdns, evaluate
from pipelines.config import ConfigError, load_config
from pipelines.evaluate_methods import MethodConfig
from tests.faults.jobs import write_triplets

ROWS, SIZE = 4, 32
FAST = [f"cdns.size={SIZE}", "cdns.steps=2", "cdns.batch_size=2", "runner=local"]


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_cdns_reads_and_writes_s3_and_resumes_only_the_deleted_objects_ids(s3_bucket, ref_adapter, tmp_path, empty_cwd):
    """Triplets, "ref" adapter and output in the bucket: the negatives equal a local run's (same adapter bytes);
    the record is in the bucket; one output object deleted, the rerun makes only its ids."""
    local = tmp_path / "local"
    write_triplets(local / "triplets" / "part-0.parquet", ROWS, SIZE, seed=7)
    triplets, adapter = storage.join(s3_bucket, "data", "triplets"), storage.join(s3_bucket, "adapters", "ref")
    storage.upload_folder(local / "triplets", triplets)
    storage.upload_folder(ref_adapter, adapter)
    output = storage.join(s3_bucket, "data", "quadruplets")
    args = [f"data.input={triplets}", f"data.output={output}", f"model.ref_adapter={adapter}", *FAST]
    result = cdns.run(load_config(cdns.CdnsConfig, None, args))
    assert (result["written"], result["output"]) == (ROWS, output) and result["bytes_per_row"] > 0
    assert storage.read_json(storage.join(output, "_cdns.json"))["config"]["data.input"] == triplets
    files = cdns.parquet_files(output)
    assert len(files) == 2 and all(f.startswith(output + "/") for f in files)
    remote = {r["sample_id"]: r for f in files for r in storage.read_table(f).to_pylist()}

    straight = cdns.run(load_config(cdns.CdnsConfig, None, [
        f"data.input={local / 'triplets'}", f"data.output={local / 'out'}", f"model.ref_adapter={ref_adapter}", *FAST]))
    assert straight["written"] == ROWS
    expected = {r["sample_id"]: r for r in pq.read_table(local / "out").to_pylist()}
    assert {k: (r["negative_png"], r["negative_adapter_sha256"]) for k, r in remote.items()} == {
        k: (r["negative_png"], r["negative_adapter_sha256"]) for k, r in expected.items()}

    lost = storage.read_table(files[1], columns=["sample_id"])["sample_id"].to_pylist()
    storage.delete_file(files[1])
    again = cdns.run(load_config(cdns.CdnsConfig, None, [*args, "cdns.batch_size=1"]))  # an execution field: may change
    assert (again["skipped"], again["written"]) == (ROWS - len(lost), len(lost))
    ids = [r for f in cdns.parquet_files(output) for r in storage.read_table(f)["sample_id"].to_pylist()]
    assert sorted(ids) == sorted(remote) and len(ids) == ROWS
    with pytest.raises(ConfigError, match=r"cdns\.seed: 's3://"):
        cdns.run(load_config(cdns.CdnsConfig, None, [*args, "cdns.seed=1"]))
    assert os.listdir(empty_cwd) == []


def test_uris_of_unknown_schemes_or_without_a_bucket_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.output: .*'ftp'"):
        load_config(cdns.CdnsConfig, None, ["data.output=ftp://host/x"])
    with pytest.raises(ConfigError, match=r"model\.ref_adapter: .*names no bucket"):
        load_config(cdns.CdnsConfig, None, ["model.ref_adapter=s3:///ref"])
    with pytest.raises(ValueError, match=r"methods\.sfo_adapter: .*'http'"):
        MethodConfig("m", sfo_adapter="http://host/sfo")
    with pytest.raises(ConfigError, match=r"^output: .*names no bucket"):
        load_config(evaluate.EvaluateConfig, None, ["output=gs://"])


def test_evaluate_writes_into_s3_with_adapters_from_s3(s3_bucket, ref_adapter, tmp_path, empty_cwd):
    """Images, record and summary in the bucket; the "ref" method's adapter read from it; the summary equals a
    local run's with the local adapter (the record keeps the adapter's sha256, not where it lies)."""
    adapter = storage.join(s3_bucket, "adapters", "ref")
    storage.upload_folder(ref_adapter, adapter)
    output = storage.join(s3_bucket, "evaluate")
    common = ["eval.subjects=2", "eval.seeds=1", "eval.size=32", "eval.steps=2", "eval.batch_size=2", "runner=local"]

    def config(out: str, folder: str) -> evaluate.EvaluateConfig:
        cfg = load_config(evaluate.EvaluateConfig, None, [f"output={out}", *common])
        cfg.methods = [MethodConfig("base"), MethodConfig("sft", ref_adapter=folder, active=["ref"])]
        return cfg

    summary = evaluate.run(config(output, adapter))
    assert storage.read_json(storage.join(output, "summary.json")) == summary
    assert storage.read_text(storage.join(output, "summary.csv")).startswith("method,subject,images")
    assert storage.is_file(storage.join(output, "_evaluate.json"))
    images = evaluate.read_images(output, ["base", "sft"])
    assert images.num_rows == 4 and all(f.startswith(output) for f in cdns.parquet_files(storage.join(output, "images")))
    assert evaluate.run(config(output, str(ref_adapter))) == summary  # same adapter bytes elsewhere: resumes, no work
    local = evaluate.run(config(str(tmp_path / "local"), str(ref_adapter)))
    assert local == summary
    assert evaluate.read_images(tmp_path / "local", ["base", "sft"]).to_pylist() == images.to_pylist()
    assert os.listdir(empty_cwd) == []


def test_evaluate_reads_dreambench_from_s3(s3_bucket, tmp_path, empty_cwd):
    """eval.dreambench may be an s3:// folder (the cluster's object-store renders point it there): the same
    subjects, prompts and reference pixels as the local folder, nothing left in the working directory; a
    missing one is refused before any work, naming the field."""
    from tests.sfo.test_dreambench import write_dreambench

    local = write_dreambench(tmp_path / "dataset")
    remote = storage.join(s3_bucket, "data", "dreambench")
    storage.upload_folder(local, remote)
    section = lambda folder: evaluate.EvalSection(dreambench=folder, size=32, prompts=2)  # noqa: E731
    mine, theirs = evaluate.load_benchmark(section(remote)), evaluate.load_benchmark(section(str(local)))
    assert mine.prompts == theirs.prompts and mine.items == theirs.items and set(mine.prompts) == {"backpack", "dog"}
    for subject, images in theirs.references.items():
        assert [im.tobytes() for im in mine.references[subject]] == [im.tobytes() for im in images]
    assert not any(empty_cwd.iterdir())
    missing = load_config(evaluate.EvaluateConfig, None, [f"output={tmp_path / 'out'}",
                                                         f"eval.dreambench={storage.join(s3_bucket, 'absent')}"])
    with pytest.raises(ConfigError, match=r"eval\.dreambench: .*absent.* does not exist"):
        evaluate.check_config(missing)
