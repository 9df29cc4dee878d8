"""The stage chain on an object store, as a cluster without a shared filesystem runs it: every stage's input and
output under ``s3://`` on a real S3 protocol server (moto, on 127.0.0.1), each stage its own process started from
an empty working directory with the chain's overrides (``cluster.chain``, as ``cluster.submit`` sends them);
prepare (cached tensors, bf16) -> sft -> cdns (killed after its first file, rerun) -> sfo (the cached tensors
joined back by sample id) -> evaluate -> the Ray Serve app loading the adapters from ``s3://``. Nothing may be
written under the working directory."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path

import pytest

from cluster import storage
from cluster.chain import paths, stage_overrides
from tests.faults.jobs import start_job

ROOT = Path(__file__).resolve().parents[2]
ROWS, SIZE = 8, 32
STAGE_SETTINGS = {  # the chain's paths come from cluster.chain; these make each stage small and slow enough to kill
    "prepare": [f"data.limit={ROWS}", f"data.size={SIZE}", "data.rows_per_file=4", "cache.enabled=true", "cache.model=tiny"],
    "sft": [f"data.size={SIZE}", "train.steps=2", "train.optimizer=adamw", "train.lr=1e-3", "train.checkpoint_every=1"],
    "cdns": [f"cdns.size={SIZE}", "cdns.steps=4", "cdns.rows_per_file=2", "cdns.batch_size=2", "runner=local"],
    "sfo": [f"data.size={SIZE}", "train.steps=2", "train.optimizer=adamw", "train.lr=1e-3"],
    "evaluate": [f"eval.size={SIZE}", "eval.steps=2", "eval.subjects=1", "eval.prompts=1", "eval.seeds=1"],
}


def _command(stage: str, runs: str, paced: float | None = None) -> tuple[str, list[str]]:
    args = ["--config", str(ROOT / "pipelines" / "configs" / f"{stage}.yaml"), *stage_overrides(stage, runs),
            *STAGE_SETTINGS[stage]]
    if paced is None:
        return f"pipelines.{stage}", args
    return "tests.faults.paced_job", [f"pipelines.{stage}", str(paced), *args]


def _run(stage: str, runs: str, logs: Path) -> None:
    module, args = _command(stage, runs)
    job = start_job(module, args, logs / f"{stage}.log")
    assert job.wait(timeout=600) == 0, (logs / f"{stage}.log").read_text()[-4000:]


@pytest.mark.slow
def test_the_chain_runs_on_s3_with_a_killed_cdns_and_writes_nothing_locally(s3_bucket, ray_local, tmp_path, monkeypatch):
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir()
    logs.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the jobs import the repository (and tests.faults.paced_job)
    runs = f"{s3_bucket}/runs"
    p = paths(runs)

    _run("prepare", runs, logs)
    _run("sft", runs, logs)

    module, args = _command("cdns", runs, paced=2.0)  # a pause after each file: the kill lands between two
    job = start_job(module, args, logs / "cdns-killed.log")
    try:
        deadline = time.time() + 300
        while not storage.list_files(p["quadruplets"], ".parquet"):
            assert time.time() < deadline, "no cdns output file after 300 s"
            assert job.poll() is None, (logs / "cdns-killed.log").read_text()[-4000:]
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and everything it started, no clean-up
        job.wait()
    kept = storage.list_files(p["quadruplets"], ".parquet")
    assert 0 < len(kept) < ROWS // 2, f"expected a partial output, found {kept}"
    _run("cdns", runs, logs)
    ids = storage.dataset(p["quadruplets"]).to_table(columns=["sample_id"])["sample_id"].to_pylist()
    assert sorted(ids) == sorted(storage.dataset(p["triplets"]).to_table(columns=["sample_id"])["sample_id"].to_pylist())
    assert len(ids) == len(set(ids)) == ROWS  # each sample once, after the kill
    columns = storage.dataset(p["quadruplets"]).schema.names
    assert "cache_negative_latents" in columns and "cache_prompt_embeds" not in columns  # tensors stay in the triplets

    _run("sfo", runs, logs)
    for stage in ("sft", "sfo"):  # every tensor cached (sfo's joined back from the triplets): the transformer alone
        summary = storage.read_json(storage.join(p["train"], stage, "summary.json"))
        assert summary["components"] == ["scheduler", "transformer"], (stage, summary["components"])
        lines = storage.read_text(storage.join(p["train"], stage, "metrics.jsonl")).splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2], stage  # rank 0's log, written whole
    checkpoints = {f.split("/train/sft/")[1].split("/")[0] for f in storage.list_files(storage.join(p["train"], "sft"))}
    assert {"checkpoint_00000001", "checkpoint_00000002"} <= checkpoints, checkpoints  # Ray Train's, on S3
    _run("evaluate", runs, logs)
    summary = storage.read_json(storage.join(p["evaluate"], "summary.json"))
    assert {"sft", "sfo"} <= set(summary["methods"])
    for name in ("ref", "sfo"):
        assert storage.is_file(storage.join(p["adapters"], name, "pytorch_lora_weights.safetensors"))

    _serve_one_image(p["adapters"])
    assert sorted(os.listdir(work)) == [], "files written under the working directory"


def _serve_one_image(adapters: str) -> None:
    """The Serve app on the test session's Ray (its workers have the S3 server's variables), adapters from S3."""
    import httpx
    from ray import serve

    from cluster.local import free_port
    from serving.app import build_app
    from sfo.records import encode_png
    from sfo.shapes.world import world_triplets

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": "tiny", "adapters": adapters}), name="sfo-s3", route_prefix="/", blocking=False)
        reference = encode_png(next(iter(world_triplets(1, 0))).reference.resize((SIZE, SIZE)))
        body = {"prompt": "a photo of it", "image": base64.b64encode(reference).decode(), "steps": 2, "width": SIZE,
                "height": SIZE, "seed": 0, "adapter": "sfo"}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json=body, timeout=300)
        assert response.status_code == 200, response.text[:2000]
        assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        serve.delete("sfo-s3")
        serve.shutdown()
