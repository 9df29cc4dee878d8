"""What the fault tests share: synthetic triplets on disk, a job started as its own process group, and the
process tree read from /proc (Linux)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.synthetic import synthetic_triplets
from sfo.records import TRIPLET_SCHEMA, encode_png


def write_triplets(path: Path, rows: int, size: int, seed: int) -> list:
    """``rows`` synthetic triplets as one Parquet file at ``path`` (one file: Ray's reader makes it one block)."""
    triplets = synthetic_triplets(rows, size, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([
        {"sample_id": t.sample_id, "item": t.item, "target_text": t.target_text, "reference_png": encode_png(t.reference),
         "target_png": encode_png(t.target), "source": "synthetic"} for t in triplets], schema=TRIPLET_SCHEMA), path)
    return triplets


def start_job(module: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m module args`` in its own session (a fresh local Ray: RAY_ADDRESS unset), output to ``log``;
    ``env`` adds variables."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    return subprocess.Popen([sys.executable, "-m", module, *args], start_new_session=True, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = (int(fields[1]), fields[0])
        except (OSError, IndexError, ValueError):
            continue
    return out


def descendants(root: int) -> set[int]:
    table, found, frontier = processes(), set(), {root}
    while frontier:
        frontier = {pid for pid, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def running(pids: set[int]) -> set[int]:
    table = processes()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}  # zombies have exited
