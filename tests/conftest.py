"""Shared fixtures: a tiny FLUX built in code (cached once per test session), the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


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
