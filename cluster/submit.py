"""Submits the pipeline stages as Ray jobs to any cluster and follows them.

    python -m cluster.submit --address http://127.0.0.1:8265 --runs runs   # local head: prepare -> ... -> evaluate
    python -m cluster.submit --address ADDR --runs /runs --stages cdns,sfo --set cdns:scaling.num_workers=4

Each stage runs as ``python -m pipelines.<stage> --config pipelines/configs/<stage>.yaml`` with this
repository as the job's working directory (files ignored by .gitignore are not uploaded). The
client authenticates with the token Ray finds in its environment (``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH``; ``python -m cluster.local env`` prints them for the local head). A failed
stage stops the chain with its logs. Stages read and write under ``--runs`` (see
``cluster.chain``), a folder every node of the cluster sees: required, because the paths are the
cluster's (``/runs`` on the k8s/ volume), not the client's. Each stage runs as long as it runs
(``--timeout`` bounds it when given): a 4000-step sft takes days.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from cluster.chain import DEFAULT_CHAIN, STAGES, stage_overrides

ROOT = Path(__file__).resolve().parents[1]
POLL_SECONDS = 2.0
AGENT_WAIT_S = 120.0  # a freshly started head answers before its job agent is up


def runtime_env(extra_env: dict[str, str] | None = None) -> dict:
    """The runtime_env of every job: this repository as working directory, nothing installed on top
    (the cluster image carries the dependencies; see k8s/ and the Dockerfile)."""
    env = {"working_dir": str(ROOT), "excludes": [".git", ".venv", "runs", "outputs"]}
    if extra_env:
        env["env_vars"] = dict(extra_env)
    return env


def entrypoint(stage: str, overrides: list[str] | None = None, config_dir: str = "pipelines/configs") -> str:
    if stage not in STAGES:
        raise ValueError(f"--stages: unknown stage {stage!r}; use some of {list(STAGES)}")
    parts = ["python", "-m", f"pipelines.{stage}", "--config", f"{config_dir}/{stage}.yaml", *(overrides or [])]
    return " ".join(shlex.quote(p) for p in parts)


def run_job(client, stage: str, command: str, env: dict, timeout_s: float | None = None, out=None) -> str:
    """Submits one job, streams its new log lines, returns its final status name; with ``timeout_s``
    stops the job after that many seconds ("TIMEOUT"), with None waits as long as the job runs."""
    out = out or sys.stdout
    job_id = _submit(client, command, env, stage)
    print(f"[{stage}] submitted {job_id}: {command}", file=out, flush=True)
    printed = 0
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        for line in logs[printed:].splitlines():
            print(f"[{stage}] {line}", file=out, flush=True)
        printed = len(logs)
        if status.is_terminal():
            print(f"[{stage}] {status.name}", file=out, flush=True)
            return status.name
        if deadline is not None and time.time() > deadline:
            client.stop_job(job_id)
            print(f"[{stage}] stopped after {timeout_s:.0f} s", file=out, flush=True)
            return "TIMEOUT"
        time.sleep(POLL_SECONDS)


def _submit(client, command: str, env: dict, stage: str) -> str:
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=env, metadata={"stage": stage})
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(POLL_SECONDS)


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    per_stage: dict[str, list[str]] = {s: [] for s in STAGES}
    for item in items:
        stage, sep, override = item.partition(":")
        if not sep or stage not in STAGES or "=" not in override:
            raise ValueError(f"--set {item!r}: write STAGE:key=value with STAGE one of {list(STAGES)}")
        per_stage[stage].append(override)
    return per_stage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="the cluster's job server, e.g. http://127.0.0.1:8265")
    parser.add_argument("--stages", default=",".join(DEFAULT_CHAIN),
                        help=f"comma-separated, in order; default {','.join(DEFAULT_CHAIN)}; known: {','.join(STAGES)}")
    parser.add_argument("--runs", required=True,
                        help="the folder the stages read and write, as the cluster's nodes see it: an object store URI "
                             "(s3://bucket/runs, gs://bucket/runs), /runs on the k8s/ volume, or runs for a "
                             "cluster.local head on this machine")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE:key=value",
                        help="a config override for one stage (repeatable)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop a stage after this many seconds (default: none, wait as long as it runs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    try:
        sets = parse_sets(args.sets)
        commands = [(stage, entrypoint(stage, stage_overrides(stage, args.runs) + sets[stage])) for stage in stages]
    except ValueError as exc:
        parser.error(str(exc))

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    for stage, command in commands:
        status = run_job(client, stage, command, runtime_env(), args.timeout)
        if status != "SUCCEEDED":
            print(f"chain stopped: stage {stage!r} ended {status}", flush=True)
            return 1
    print(f"chain done: {', '.join(stages)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
