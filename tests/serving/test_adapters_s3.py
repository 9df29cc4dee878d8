"""Serving adapters from an object store: a generator given ``s3://`` folders (moto's S3 server) serves the
images of the same adapters loaded from the local folder, downloads each folder once, and writes nothing under
the working directory."""

from __future__ import annotations

import os

import pytest

from cluster import storage
from serving.generator import Generator
from tests.serving.test_generator import job


@pytest.fixture
def adapters_uri(s3_bucket, adapters_dir) -> str:
    uri = storage.join(s3_bucket, "runs", "adapters")
    storage.upload_folder(adapters_dir, uri)
    return uri


def test_adapters_from_s3_serve_the_local_folders_images(adapters_uri, adapters_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty working directory: the downloads go to TMPDIR, not here
    local = Generator("tiny", str(adapters_dir), device="cpu")
    remote = Generator("tiny", adapters_uri, device="cpu")
    assert remote.info["adapters"] == local.info["adapters"]  # the same weights (sha256 of the loaded LoRAs)
    jobs = [job((41, 42)), job((41,), adapter="ref")]
    assert remote.run(jobs) == local.run(jobs)  # the same PNG bytes

    remote.load_set("alt", adapters_uri)  # another set from the same URI: downloaded once, not again
    assert len(remote._downloads) == 1
    remote.unload_set("alt")
    remote.load_set("alt", adapters_uri)  # evicted and loaded back: still the one download
    assert len(remote._downloads) == 1 and remote.adapter_sets["alt"] == adapters_uri
    assert os.listdir(tmp_path) == []


def test_a_uri_without_adapters_names_it(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing at 's3://"):
        Generator("tiny", storage.join(s3_bucket, "absent"), device="cpu")
    storage.write_text(storage.join(s3_bucket, "half", "ref", "x.txt"), "not an adapter")
    with pytest.raises(FileNotFoundError, match=r"no sfo/ folder in 's3://.*/half'"):
        Generator("tiny", storage.join(s3_bucket, "half"), device="cpu")
    assert os.listdir(tmp_path) == []
