"""Where the jobs read and write: a local path, ``s3://bucket/key`` or ``gs://bucket/key``, one API.

Every path a job takes (data in and out, Ray Train's storage, adapters, evaluate's images, Serve's
adapters) goes through here, as a plain string. Local paths stay paths (made absolute where they are
recorded); URIs go to pyarrow's filesystems, which Ray Data and Ray Train use themselves, so one set of
credentials serves every stage: the usual ``AWS_*`` variables (``AWS_ENDPOINT_URL`` for MinIO or a test
server) or the pod's cloud identity; ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS.

    fs, path = storage.resolve("s3://bucket/runs/data")     # (S3FileSystem, "bucket/runs/data")
    storage.write_json(storage.join(out, "_prepare.json"), record)
    with storage.local_copy("s3://bucket/runs/adapters/ref") as folder:   # a temporary download
        load_adapter(model.transformer, folder, "ref")

Writes are whole-file: a local file is written to a hidden temporary name and renamed, an object store
PUT is atomic by itself, so a kill never leaves a partial file under its final name. Temporary folders
go to the system's temporary directory (``TMPDIR``), never under the working directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

REMOTE_SCHEMES = ("s3", "gs", "gcs")


def is_remote(uri: str | Path) -> bool:
    """Whether ``uri`` names an object store (``s3://``, ``gs://``, ``gcs://``) rather than a local path."""
    return urlparse(str(uri)).scheme in REMOTE_SCHEMES


def check_uri(uri: str | Path, field: str) -> str:
    """``uri`` as a string, or a ``ValueError`` naming ``field`` for a scheme no filesystem here serves."""
    text = str(uri)
    scheme = urlparse(text).scheme
    if "://" in text and scheme not in REMOTE_SCHEMES + ("file",):
        raise ValueError(f"{field}: {text!r} has scheme {scheme!r}; use a local path, s3://bucket/key or "
                         "gs://bucket/key")
    if is_remote(text) and not urlparse(text).netloc:
        raise ValueError(f"{field}: {text!r} names no bucket; write {scheme}://BUCKET/key")
    return text


def absolute(uri: str | Path) -> str:
    """A URI as given (trailing slash dropped), a local path made absolute: the form a record or fingerprint keeps."""
    text = str(uri)
    if is_remote(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = urlparse(text).path
    return str(Path(text).expanduser().resolve())


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem serving ``uri`` and the path on it (``bucket/key`` for object stores)."""
    text = absolute(uri)
    if not is_remote(text):
        return pafs.LocalFileSystem(), text
    return pafs.FileSystem.from_uri(text.replace("gcs://", "gs://", 1))


def join(uri: str | Path, *names: str) -> str:
    """``uri`` with ``names`` appended, ``/``-separated for URIs, the OS's way for local paths."""
    text = str(uri)
    if is_remote(text):
        return posixpath.join(text.rstrip("/"), *names)
    return os.path.join(text, *names)


def basename(uri: str | Path) -> str:
    return posixpath.basename(str(uri).rstrip("/"))


def _info(uri: str | Path) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return fs.get_file_info(path)


def exists(uri: str | Path) -> bool:
    """Whether a file or folder is at ``uri`` (on object stores: an object, or any object under the prefix)."""
    return _info(uri).type != pafs.FileType.NotFound


def is_file(uri: str | Path) -> bool:
    return _info(uri).type == pafs.FileType.File


def is_dir(uri: str | Path) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def makedirs(uri: str | Path) -> None:
    """Creates the folder (and parents); object stores have no folders, so nothing is written there."""
    fs, path = resolve(uri)
    if not is_remote(uri):
        fs.create_dir(path, recursive=True)


def list_files(uri: str | Path, suffix: str = "", recursive: bool = True) -> list[str]:
    """The files under a folder (or the file itself) whose name ends with ``suffix``, sorted, as URIs of the
    same kind as ``uri``; hidden (``.``) and ``_``-prefixed names skipped, as Ray Data and pyarrow skip them."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [str(uri)]
    if info.type == pafs.FileType.NotFound:
        return []
    found = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    names = sorted(f.path[len(path):].lstrip("/") for f in found if f.type == pafs.FileType.File)
    keep = [n for n in names if n.endswith(suffix) and not any(part.startswith((".", "_")) for part in n.split("/"))]
    return [join(uri, *name.split("/")) for name in keep]


def read_bytes(uri: str | Path) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str | Path, data: bytes) -> None:
    """Writes ``data`` whole: locally to a hidden temporary name then renamed; on object stores one PUT."""
    fs, path = resolve(uri)
    if is_remote(uri):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, target)


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode()


def write_text(uri: str | Path, text: str) -> None:
    write_bytes(uri, text.encode())


def read_json(uri: str | Path):
    return json.loads(read_bytes(uri))


def write_json(uri: str | Path, value, indent: int | None = 2) -> None:
    write_text(uri, json.dumps(value, indent=indent) + "\n")


def move(source: str | Path, target: str | Path) -> None:
    """Renames a file (object stores: copy, then delete the source)."""
    fs, path = resolve(source)
    fs.move(path, resolve(target)[1])


def delete_file(uri: str | Path) -> None:
    fs, path = resolve(uri)
    fs.delete_file(path)


def read_table(uri: str | Path, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file as a table."""
    fs, path = resolve(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def write_table(table: pa.Table, uri: str | Path) -> None:
    """One Parquet file, written whole (see ``write_bytes``): a kill never leaves a partial file at ``uri``."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


def dataset(uri: str | Path) -> pads.Dataset:
    """The Parquet dataset of a file or folder (its schema, its rows) on any of the filesystems."""
    fs, path = resolve(uri)
    return pads.dataset(path, format="parquet", filesystem=fs)


def upload_folder(local: str | Path, uri: str | Path) -> None:
    """Copies a local folder's files to ``uri`` (each file whole); a local ``uri`` gets a plain copy."""
    if not is_remote(uri):
        shutil.copytree(local, absolute(uri), dirs_exist_ok=True)
        return
    fs, path = resolve(uri)
    pafs.copy_files(str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_folder(uri: str | Path, local: str | Path) -> Path:
    """Copies the folder (or file) at ``uri`` into ``local``; returns the local path of what was copied."""
    fs, path = resolve(uri)
    local = Path(local)
    if fs.get_file_info(path).type == pafs.FileType.File:
        target = local / basename(uri)
        local.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(uri))
        return target
    if not exists(uri):
        raise FileNotFoundError(f"{uri} does not exist")
    local.mkdir(parents=True, exist_ok=True)  # copy_files makes subfolders only
    pafs.copy_files(path, str(local.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


@contextlib.contextmanager
def local_copy(uri: str | Path) -> Iterator[Path]:
    """A local path holding what is at ``uri``: the path itself when local, else a download into a temporary
    folder (removed on exit). For the libraries that read only local files (diffusers, safetensors, PIL)."""
    if not is_remote(uri):
        yield Path(absolute(uri))
        return
    with tempfile.TemporaryDirectory(prefix="sfo-download-") as folder:
        yield download_folder(uri, Path(folder) / basename(uri))


@contextlib.contextmanager
def staged_folder(uri: str | Path) -> Iterator[Path]:
    """A local folder to write into that ends up at ``uri``: the folder itself when local, else a temporary
    folder uploaded to ``uri`` when the block ends without an error (nothing is uploaded after a failure)."""
    if not is_remote(uri):
        path = Path(absolute(uri))
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sfo-upload-") as folder:
        yield Path(folder)
        upload_folder(folder, uri)
