"""cluster.storage on a local folder and on a real S3 protocol server (moto, started by the test session)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cluster import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """The same tests on a local folder and on an S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def test_bytes_json_and_tables_round_trip(root):
    storage.write_bytes(storage.join(root, "a", "b.bin"), b"\x00\x01")
    storage.write_json(storage.join(root, "c.json"), {"k": [1, 2]})
    table = pa.table({"x": [1, 2, 3]})
    storage.write_table(table, storage.join(root, "t", "part-0.parquet"))

    assert storage.read_bytes(storage.join(root, "a", "b.bin")) == b"\x00\x01"
    assert storage.read_json(storage.join(root, "c.json")) == {"k": [1, 2]}
    assert storage.read_table(storage.join(root, "t", "part-0.parquet")).equals(table)
    assert storage.dataset(storage.join(root, "t")).to_table().equals(table)
    assert storage.is_file(storage.join(root, "c.json")) and not storage.is_file(storage.join(root, "t"))
    assert storage.is_dir(storage.join(root, "t")) and storage.exists(root)
    assert not storage.exists(storage.join(root, "missing"))


def test_list_files_skips_hidden_and_underscore_names_and_keeps_the_uri_kind(root):
    for name in ("part-1.parquet", "sub/part-0.parquet", "_prepare.json", ".part-2.parquet.tmp", "_tmp/x.parquet"):
        storage.write_bytes(storage.join(root, *name.split("/")), b"x")

    listed = storage.list_files(root, ".parquet")

    assert listed == [storage.join(root, "part-1.parquet"), storage.join(root, "sub", "part-0.parquet")]
    assert storage.list_files(storage.join(root, "nothing-here"), ".parquet") == []
    assert storage.list_files(listed[0]) == [listed[0]]


def test_move_renames_and_delete_removes(root):
    source, target = storage.join(root, "f.parquet"), storage.join(root, "f.parquet.incomplete")
    storage.write_bytes(source, b"half")

    storage.move(source, target)

    assert not storage.exists(source) and storage.read_bytes(target) == b"half"
    storage.delete_file(target)
    assert not storage.exists(target)


def test_staged_folder_uploads_on_success_only_and_local_copy_reads_it_back(root, tmp_path):
    with storage.staged_folder(storage.join(root, "adapters", "ref")) as folder:
        (folder / "w.safetensors").write_bytes(b"weights")
        (folder / "nested").mkdir()
        (folder / "nested" / "cfg.json").write_text("{}")
    with pytest.raises(RuntimeError), storage.staged_folder(storage.join(root, "adapters", "bad")) as folder:
        (folder / "w.safetensors").write_bytes(b"half")
        raise RuntimeError("the export failed")

    with storage.local_copy(storage.join(root, "adapters", "ref")) as folder:
        assert (folder / "w.safetensors").read_bytes() == b"weights"
        assert (folder / "nested" / "cfg.json").read_text() == "{}"
        copied = folder
    if storage.is_remote(root):
        assert not storage.exists(storage.join(root, "adapters", "bad"))
        assert not copied.exists()  # the temporary download is gone
        assert tmp_path not in copied.parents


def test_absolute_keeps_uris_and_resolves_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("s3://bucket/x/") == "s3://bucket/x"
    assert storage.absolute("runs/x") == str(tmp_path / "runs" / "x")
    assert storage.join("gs://b/x", "y", "z") == "gs://b/x/y/z"
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/data/x")


@pytest.mark.parametrize("uri, field, message", [
    ("hdfs://nn/x", "data.output", "scheme 'hdfs'"),
    ("s3:///key", "data.output", "names no bucket"),
])
def test_check_uri_names_the_field_and_the_fix(uri, field, message):
    with pytest.raises(ValueError, match=message) as error:
        storage.check_uri(uri, field)
    assert str(error.value).startswith(field)
