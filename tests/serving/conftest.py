"""Fixtures for the serving tests: adapters saved in a tmp folder ("sfo" randomised so it differs from "ref")."""

from __future__ import annotations

import socket

import httpx
import pytest
import torch

SIDE = 32
STEPS = 2


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, _hermetic_cache):
    """``<dir>/ref`` and ``<dir>/sfo`` as the training export writes them; "sfo" has random B matrices."""
    from sfo.adapters import REF, REF_RANK, SFO, SFO_RANK, add_lora, save_adapter
    from sfo.models import load_flux

    model = load_flux("tiny", device="cpu")
    add_lora(model.transformer, REF, REF_RANK)
    add_lora(model.transformer, SFO, SFO_RANK)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.transformer.named_parameters():
            if f"lora_B.{SFO}." in name:  # B = 0 at init would make "sfo" a no-op
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    folder = tmp_path_factory.mktemp("adapters")
    save_adapter(model.transformer, REF, folder / REF)
    save_adapter(model.transformer, SFO, folder / SFO)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def server(adapters_dir, _hermetic_cache):
    """Base URL of one app for every serving test module (a replica takes ~17 s to start); Serve (and Ray,
    when this fixture started it) shut down afterwards."""
    import ray
    from ray import serve

    from pipelines.common import start_local_ray
    from serving.app import build_app

    started_ray = not ray.is_initialized()  # another module's session-wide Ray is reused, not shut down
    if started_ray:
        start_local_ray(num_cpus=4)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"model": "tiny", "adapters": str(adapters_dir), "default_side": SIDE, "default_steps": STEPS,
                         "max_side": 256, "max_image_bytes": 200_000, "max_image_pixels": 512 * 512,
                         "request_timeout_s": 60})
        serve.run(app, name="sfo", route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


@pytest.fixture(scope="package")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c
