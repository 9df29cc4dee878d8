"""Fault test: SIGKILL a cdns job mid-run, rerun into the same output: every sample exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import cdns
from pipelines.config import load_config
from pipelines.synthetic import synthetic_triplets
from sfo.records import TRIPLET_SCHEMA, encode_png

ROWS, PER_FILE, SIZE = 48, 4, 32


@pytest.mark.slow
def test_a_killed_cdns_job_keeps_its_files_and_the_rerun_completes_exactly_once(tmp_path, capsys):
    rows = synthetic_triplets(ROWS, SIZE, seed=5)
    pq.write_table(pa.Table.from_pylist([
        {"sample_id": t.sample_id, "item": t.item, "target_text": t.target_text, "reference_png": encode_png(t.reference),
         "target_png": encode_png(t.target), "source": "synthetic"} for t in rows], schema=TRIPLET_SCHEMA),
        tmp_path / "triplets.parquet")  # one input file: Ray's reader makes it one block
    output = tmp_path / "out"
    args = [f"data.input={tmp_path / 'triplets.parquet'}", f"data.output={output}", f"cdns.size={SIZE}", "cdns.steps=8",
            f"cdns.rows_per_file={PER_FILE}", "cdns.batch_size=4", "scaling.cpus_per_worker=0.5"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    job = subprocess.Popen([sys.executable, "-m", "pipelines.cdns", *args], start_new_session=True, env=env,
                           stdout=open(tmp_path / "job.log", "wb"), stderr=subprocess.STDOUT)
    written = lambda: output.exists() and bool(cdns.parquet_files(output))  # noqa: E731
    try:
        deadline = time.time() + 240
        while not written():
            assert time.time() < deadline, "no output file after 240 s"
            assert job.poll() is None, "the job ended before writing anything"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started: no clean-up at all
        job.wait()
    kept = cdns.done_sample_ids(output)[0]
    assert 0 < len(kept) < ROWS, f"kill after the first file: expected partial output, got {len(kept)} rows"

    result = cdns.run(load_config(cdns.CdnsConfig, None, [*args, "runner=local"]))
    assert result["skipped"] == len(kept) and result["written"] == ROWS - len(kept)
    table = pq.ParquetDataset(cdns.parquet_files(output)).read(columns=["sample_id"])
    ids = table["sample_id"].to_pylist()
    assert sorted(ids) == sorted(t.sample_id for t in rows) and len(ids) == len(set(ids))  # each exactly once
