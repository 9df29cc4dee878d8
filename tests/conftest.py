"""Shared fixtures: a tiny FLUX built in code (cached once per test session), the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Ray Train's controller looks at its workers every 2 s by default, so a one-step test job waits up to 2 s for
# each of its phases to be noticed (4-6 s a job, measured 2026-12-06). Every Ray the tests start (in this process
# or in a job's own process) inherits this. A slow poll only counts as missed; a worker is declared dead after
# RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min), so a busy machine cannot fail a test through it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session", autouse=True)
def _hermetic_cache(tmp_path_factory):
    """Models built by tests go to a per-session cache, not the user's ~/.cache/sfo."""
    if "SFO_CACHE_DIR" not in os.environ:
        os.environ["SFO_CACHE_DIR"] = str(tmp_path_factory.mktemp("sfo-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_flux():
    """The embedded tiny FLUX (fp32, CPU). Tests must not leave adapters on it: use ``fresh_flux``."""
    from sfo.models import load_flux

    return load_flux("tiny", device="cpu")


@pytest.fixture
def fresh_flux():
    """A tiny FLUX of one's own (loaded from the session cache), free to modify."""
    from sfo.models import load_flux

    return load_flux("tiny", device="cpu")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip when this machine has no shared folder (a user's laptop)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data exists only beside the development checkout)")
    return path


@pytest.fixture(scope="session")
def shapes_pretrained(_hermetic_cache):
    """The shapes-world model after a 2-step pretraining, in the session cache, where it takes precedence over
    the shipped model (machinery, not quality)."""
    from pipelines.pretrain import PretrainConfig, pretrain
    from sfo.shapes.model import pretrained_folder

    return pretrain(PretrainConfig(steps=2, batch_size=4, log_every=1, output=str(pretrained_folder())))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto's standalone server) on a free 127.0.0.1 port, for this session, and the
    ``AWS_*`` variables pointing at it set for the session (restored after): a Ray started after this fixture
    (``ray_local`` depends on it) passes them to its workers, so Ray Data and Ray Train reach the server too."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from cluster.local import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=2)
                break
            except (OSError, socket.timeout):
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not come up on {endpoint}") from None
                time.sleep(0.2)
        saved = {name: os.environ.get(name) for name in [*S3_ENV, "AWS_ENDPOINT_URL"]}
        os.environ.update(S3_ENV | {"AWS_ENDPOINT_URL": endpoint})
        try:
            yield endpoint
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    finally:
        server.terminate()
        server.wait(timeout=30)


S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """``s3://<a new bucket>`` on the session's S3 server (the environment pyarrow and boto read is the session's)."""
    import re

    import boto3

    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)  # again: a test before this one may have changed them
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    bucket = re.sub(r"[^a-z0-9-]", "-", f"t-{request.node.name.lower()}")[:50].strip("-")
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"
