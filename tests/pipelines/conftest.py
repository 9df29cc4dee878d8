"""Fixtures shared by the pipeline tests: one local Ray session for the whole test session, torch's thread count."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local(_hermetic_cache, s3_server):
    """A fresh local Ray with 4 logical CPUs (fractional actors + read/write tasks fit on 2 cores).

    Depends on ``_hermetic_cache`` and ``s3_server`` so workers inherit ``SFO_CACHE_DIR`` and the test S3
    server's ``AWS_*`` variables from the driver. A Ray this process started already (a job run in-process
    by an earlier test) is used as it is.
    """
    import ray

    from pipelines.common import start_local_ray

    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=4)  # never join a cluster another process started; its workers find only it
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def ref_adapter(tmp_path_factory):
    """A "ref" LoRA with non-zero weights saved from the tiny FLUX (stands in for the sft job's output)."""
    from sfo import adapters
    from sfo.models import load_flux

    model = load_flux("tiny", device="cpu")
    adapters.add_lora(model.transformer, adapters.REF, adapters.REF_RANK, init=False)
    folder = tmp_path_factory.mktemp("adapters") / "ref"
    adapters.save_adapter(model.transformer, adapters.REF, folder)
    return folder


@pytest.fixture
def torch_threads():
    """This process's torch thread count, put back after the test (a local run applies ``scaling.torch_threads``
    to the process it runs in)."""
    import torch

    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)
