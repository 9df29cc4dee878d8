"""Fixtures shared by the pipeline tests: one local Ray session for the whole test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local(_hermetic_cache):
    """A fresh local Ray with 4 logical CPUs (fractional actors + read/write tasks fit on 2 cores).

    Depends on ``_hermetic_cache`` so workers inherit ``SFO_CACHE_DIR`` from the driver.
    """
    import ray

    from pipelines.common import start_local_ray

    start_local_ray(num_cpus=4)  # never join a cluster another process started; its workers find only it
    yield ray
    ray.shutdown()
