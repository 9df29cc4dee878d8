"""Rerunning a stage into its own output: what its finished files hold, and whether they fit this config.

The stages that write many Parquet files (prepare, cdns, evaluate) resume the same way: files already
written are kept, a file cut short by a kill is moved aside as ``*.incomplete`` (never deleted), and only
the missing keys (sample ids, or evaluate's (method, subject, prompt, seed)) are made again, so each key is
written once. prepare and evaluate also record the config their files were made with
(``<output>/_<stage>.json``): a rerun asking for other content fails, naming the field, before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from cluster import storage
from pipelines.config import ConfigError

INCOMPLETE_SUFFIX = ".incomplete"


def parquet_files(path: str | Path) -> list[str]:
    """The Parquet files of a file or folder (local, ``s3://``, ``gs://``), sorted (hidden and ``_``-prefixed
    files skipped)."""
    return storage.list_files(path, ".parquet")


def done_keys(output: str | Path, columns: list[str]) -> tuple[set[tuple], list[str]]:
    """The ``columns`` tuples already in ``output``'s Parquet files, and the files moved aside.

    A file that cannot be read (cut short by an interruption) is renamed ``*.incomplete``, so that its
    rows are made again and no reader trips on it.
    """
    done: set[tuple] = set()
    moved = []
    for path in parquet_files(output):
        try:
            table = storage.read_table(path, columns=columns)
        except Exception:  # a file cut short by an interruption: redo its rows
            storage.move(path, path + INCOMPLETE_SUFFIX)
            moved.append(path)
            continue
        done.update(zip(*(table.column(c).to_pylist() for c in columns)))
    return done, moved


def write_table_atomic(table: pa.Table, path: str | Path) -> None:
    """One Parquet file written whole (``cluster.storage.write_table``): a kill never leaves a partial ``path``."""
    storage.write_table(table, path)


def first_per_key(table: pa.Table, columns: list[str]) -> pa.Table:
    """``table`` with each ``columns`` tuple once (its first row), sorted by those columns."""
    keys = list(zip(*(table.column(c).to_pylist() for c in columns)))
    first: dict[tuple, int] = {}
    for index, key in enumerate(keys):
        first.setdefault(key, index)
    return table.take(sorted(first.values(), key=lambda i: keys[i]))


def manifest_path(output: str | Path, stage: str) -> str:
    return storage.join(output, f"_{stage}.json")


def read_manifest(output: str | Path, stage: str) -> dict | None:
    path = manifest_path(output, stage)
    return storage.read_json(path) if storage.is_file(path) else None


def write_manifest(output: str | Path, stage: str, manifest: dict) -> None:
    storage.write_text(manifest_path(output, stage), json.dumps(manifest, indent=2, sort_keys=True))


def check_same_config(output: str | Path, stage: str, fields: dict, *, field_of_output: str, has_files: bool,
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
                              f"config that made them ({storage.basename(manifest_path(output, stage))}); {fresh_fix}")
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
