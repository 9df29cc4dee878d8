"""Rerunning a stage into its own output: what its finished files hold, and whether they fit this config.

The stages that write many Parquet files (prepare, cdns, evaluate) resume the same way: files already
written are kept, a file cut short by a kill is moved aside as ``*.incomplete`` (never deleted), and only
the missing keys (sample ids, or evaluate's (method, subject, prompt, seed)) are made again, so each key is
written once. prepare and evaluate also record the config their files were made with
(``<output>/_<stage>.json``): a rerun asking for other content fails, naming the field, before any work.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import ConfigError

INCOMPLETE_SUFFIX = ".incomplete"


def parquet_files(path: Path) -> list[Path]:
    """The Parquet files of a file or folder, sorted (hidden and ``_``-prefixed files skipped)."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))


def done_keys(output: Path, columns: list[str]) -> tuple[set[tuple], list[Path]]:
    """The ``columns`` tuples already in ``output``'s Parquet files, and the files moved aside.

    A file that cannot be read (cut short by an interruption) is renamed ``*.incomplete``, so that its
    rows are made again and no reader trips on it.
    """
    done: set[tuple] = set()
    moved = []
    for path in parquet_files(output) if output.exists() else []:
        try:
            table = pq.read_table(path, columns=columns)
        except Exception:  # a file cut short by an interruption: redo its rows
            path.rename(path.with_name(path.name + INCOMPLETE_SUFFIX))
            moved.append(path)
            continue
        done.update(zip(*(table.column(c).to_pylist() for c in columns)))
    return done, moved


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """``pq.write_table`` to a hidden temporary name, then renamed: a kill never leaves a partial ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def first_per_key(table: pa.Table, columns: list[str]) -> pa.Table:
    """``table`` with each ``columns`` tuple once (its first row), sorted by those columns."""
    keys = list(zip(*(table.column(c).to_pylist() for c in columns)))
    first: dict[tuple, int] = {}
    for index, key in enumerate(keys):
        first.setdefault(key, index)
    return table.take(sorted(first.values(), key=lambda i: keys[i]))


def manifest_path(output: Path, stage: str) -> Path:
    return output / f"_{stage}.json"


def read_manifest(output: Path, stage: str) -> dict | None:
    path = manifest_path(output, stage)
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(output: Path, stage: str, manifest: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    path = manifest_path(output, stage)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(temporary, path)


def check_same_config(output: Path, stage: str, fields: dict, *, field_of_output: str, has_files: bool,
                      fresh_fix: str) -> dict:
    """Records ``fields`` (dotted config name -> the value that shaped the output) in ``<output>/_<stage>.json``
    on the first run; on a rerun raises ``ConfigError`` naming every recorded field whose value changed.

    Fields not recorded yet (a method added to an evaluation) are added. Existing files without a record
    (written before stages recorded their config) are refused too: nothing says what made them.

    Args:
        field_of_output: the config field naming the output (``data.output``), for the message.
        has_files: whether the output already holds this stage's files.
        fresh_fix: how to start over without touching the output, for the message.

    Returns:
        The manifest as written (``{"config": {...}, ...}``).
    """
    manifest = read_manifest(output, stage)
    if manifest is None:
        if has_files:
            raise ConfigError(f"{field_of_output}: {str(output)!r} already holds {stage} files but no record of the "
                              f"config that made them ({manifest_path(output, stage).name}); {fresh_fix}")
        manifest = {"stage": stage, "config": {}}
    recorded = manifest["config"]
    changed = {k: (recorded[k], v) for k, v in fields.items() if k in recorded and recorded[k] != v}
    if changed:
        lines = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in changed.items())
        names = ", ".join(changed)
        raise ConfigError(f"{names}: {str(output)!r} holds {stage} output made with another config ({lines}). "
                          f"To resume it, rerun with the value(s) recorded there; to start over, {fresh_fix}. "
                          f"Nothing in {str(output)!r} was changed")
    if any(k not in recorded for k in fields):
        manifest["config"] = recorded | fields
        write_manifest(output, stage, manifest)
    return manifest
