"""One job through `ray job submit` to a local head with token authentication on."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.local import LocalHead, auth_env, ensure_token
import cluster.submit
from cluster.submit import build_parser, entrypoint, parse_sets, run_job, runtime_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A token-auth head; clients run as subprocesses with its token, so this process's Ray stays unauthenticated
    (Ray keeps auth settings for the life of a process, which would break later tests' local clusters)."""
    token = ensure_token(tmp_path_factory.mktemp("auth") / "token")
    head = LocalHead(num_cpus=2, token_file=token)  # free ports: other Ray sessions may run on this machine
    with head as address:
        yield address, {**os.environ, **head.client_env}


def submit(head, *args, runs: Path) -> subprocess.CompletedProcess:
    address, env = head
    return subprocess.run([sys.executable, "-m", "cluster.submit", "--address", address, "--runs", str(runs), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_prepare_job_runs_through_job_submission(head, tmp_path):
    out = tmp_path / "triplets"
    result = submit(head, "--stages", "prepare", "--set", f"prepare:data.output={out}",
                    "--set", "prepare:data.limit=3", "--set", "prepare:data.size=16", runs=tmp_path / "runs")
    printed = result.stdout
    assert result.returncode == 0, printed + result.stderr
    assert "[prepare] SUCCEEDED" in printed and "wrote 3 triplets" in printed
    assert pq.read_table(out).num_rows == 3


@pytest.mark.slow
def test_a_client_without_the_token_is_refused(head):
    address, _ = head
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / "no-ray-token-home")  # no ~/.ray/auth_token either
    code = "from ray.job_submission import JobSubmissionClient as C; C(%r).list_jobs()" % address
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "auth" in (result.stderr + result.stdout).lower()


@pytest.mark.slow
def test_a_failing_stage_stops_the_chain(head, tmp_path):
    result = submit(head, "--stages", "prepare,sft", "--set", "prepare:data.size=40", runs=tmp_path / "runs")
    printed = result.stdout
    assert result.returncode == 1 and "[prepare] FAILED" in printed and "data.size" in printed
    assert "[sft]" not in printed


def test_entrypoints_and_overrides():
    assert entrypoint("cdns", ["scaling.num_workers=2"]) == (
        "python -m pipelines.cdns --config pipelines/configs/cdns.yaml scaling.num_workers=2")
    with pytest.raises(ValueError, match="--stages"):
        entrypoint("train")
    assert parse_sets(["sfo:train.steps=3"])["sfo"] == ["train.steps=3"]
    with pytest.raises(ValueError, match="--set"):
        parse_sets(["train.steps=3"])
    assert runtime_env()["working_dir"] == str(ROOT)


def test_local_auth_env_keeps_auth_on_unless_asked(tmp_path):
    env = auth_env(True, tmp_path / "t")
    assert env["RAY_AUTH_MODE"] == "token" and Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077 == 0
    assert auth_env(False) == {"RAY_AUTH_MODE": "disabled"}


def test_help():
    for module in ("cluster.submit", "cluster.local"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0 and "usage" in result.stdout


def test_chain_wiring_feeds_each_stage_the_previous_outputs(tmp_path):
    from cluster.chain import paths, stage_overrides

    wired = {stage: dict(o.split("=", 1) for o in stage_overrides(stage, tmp_path)) for stage in
             ("prepare", "sft", "cdns", "sfo")}
    p = paths(tmp_path)
    assert wired["prepare"]["data.output"] == wired["sft"]["data.path"] == wired["cdns"]["data.input"] == str(p["triplets"])
    assert wired["cdns"]["data.output"] == wired["sfo"]["data.path"] == str(p["quadruplets"])
    sft_ref = f"{wired['sft']['output.storage_path']}/{wired['sft']['output.name']}/adapters/ref"
    assert wired["cdns"]["model.ref_adapter"] == wired["sfo"]["model.ref_adapter"] == sft_ref
    assert all(Path(v).is_absolute() for o in wired.values() for k, v in o.items() if k != "output.name")
    assert wired["sfo"]["data.cache_path"] == p["triplets"]  # the cached tensors, joined back by sample id


def test_runs_is_required_and_no_stage_timeout_by_default(capsys):
    """--runs names the cluster's storage (no default: the client's checkout is not what the nodes see), and a
    stage runs as long as it runs unless --timeout is given (a 4000-step sft takes far more than an hour)."""
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--address", "http://127.0.0.1:8265"])
    assert "--runs" in capsys.readouterr().err
    args = parser.parse_args(["--address", "http://127.0.0.1:8265", "--runs", "/runs"])
    assert args.timeout is None and args.runs == "/runs"
    assert parser.parse_args(["--address", "a", "--runs", "/runs", "--timeout", "60"]).timeout == 60.0


class _FakeStatus:
    def __init__(self, name: str):
        self.name = name

    def is_terminal(self) -> bool:
        return self.name in {"SUCCEEDED", "FAILED", "STOPPED"}


class _FakeClient:
    """A job that reports RUNNING ``polls`` times, then SUCCEEDED; records stop_job calls."""

    def __init__(self, polls: int):
        self.polls, self.stopped = polls, []

    def submit_job(self, **kwargs):
        return "job-1"

    def get_job_status(self, job_id):
        self.polls -= 1
        return _FakeStatus("RUNNING" if self.polls >= 0 else "SUCCEEDED")

    def get_job_logs(self, job_id):
        return ""

    def stop_job(self, job_id):
        self.stopped.append(job_id)


def test_run_job_waits_through_a_long_stage_without_a_timeout(monkeypatch):
    """Each poll advances the clock by a day: with no timeout the job still ends SUCCEEDED; with one it is stopped."""
    clock = iter(range(0, 10**9, 86400))
    monkeypatch.setattr(cluster.submit.time, "time", lambda: float(next(clock)))
    monkeypatch.setattr(cluster.submit.time, "sleep", lambda s: None)
    client = _FakeClient(polls=5)
    assert run_job(client, "sft", "python -m pipelines.sft", {}, out=io.StringIO()) == "SUCCEEDED"
    assert client.stopped == []
    client = _FakeClient(polls=5)
    assert run_job(client, "sft", "python -m pipelines.sft", {}, timeout_s=3600, out=io.StringIO()) == "TIMEOUT"
    assert client.stopped == ["job-1"]


def test_chain_on_an_object_store_keeps_uris():
    """--runs s3://... wires every stage to URIs under it (no local path made of it)."""
    from cluster.chain import paths, stage_overrides

    wired = {stage: dict(o.split("=", 1) for o in stage_overrides(stage, "s3://bucket/runs/")) for stage in
             ("prepare", "sft", "cdns", "sfo")}

    assert paths("s3://bucket/runs")["ref_adapter"] == "s3://bucket/runs/train/sft/adapters/ref"
    assert wired["prepare"]["data.output"] == wired["sfo"]["data.cache_path"] == "s3://bucket/runs/data/triplets"
    assert wired["sft"]["output.storage_path"] == "s3://bucket/runs/train"
    with pytest.raises(ValueError, match="--runs"):
        paths("hdfs://namenode/runs")
