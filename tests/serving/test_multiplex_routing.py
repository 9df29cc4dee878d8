"""Multiplexed adapter sets across replicas (issue 27): with two FluxGenerator replicas, each set is loaded on one
replica only, and every later request for it is routed there (``serve.multiplexed`` routing by the set's name).

A third application ("multi", at /multi) beside conftest's: ``min_replicas`` = ``max_replicas`` = 2, the tiny model,
adapter sets "a" and "b" (the same files as the default set), at most one per replica. A request routed to the
replica that does not hold its set would load it there (and evict that replica's own set): both show in the
replicas' load counts.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving.test_serve_sized import JSON, body

APP = "multi"


@pytest.fixture(scope="module")
def multi(server, adapters_dir):
    """Base URL of the two-replica app, once both replicas are up; deleted afterwards."""
    from ray import serve

    from serving.app import build_app

    folder = str(adapters_dir)
    app = build_app({"model": "tiny", "adapters": folder, "device": "cpu", "max_side": 64, "default_side": 32,
                     "default_steps": 2, "min_replicas": 2, "max_replicas": 2,
                     "adapter_sets": {"a": folder, "b": folder}, "max_adapter_sets_per_replica": 1})
    serve.run(app, name=APP, route_prefix=f"/{APP}", blocking=False)
    url = f"{server}/{APP}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(_replicas()) < 2:
        time.sleep(1.0)
    assert len(_replicas()) == 2, "the two replicas did not come up within 3 minutes"
    try:
        yield url
    finally:
        serve.delete(APP)


def _replicas() -> dict[str, dict]:
    """Each running replica's ``stats`` by replica id: plain calls land on a random replica, so ask until both
    answered (a replica missed 40 times in a row has probability 2**-40)."""
    from ray import serve

    from serving.replica import FluxGenerator

    status = serve.status().applications.get(APP)
    if status is None or status.deployments[FluxGenerator.name].status != "HEALTHY":
        return {}
    handle = serve.get_deployment_handle(FluxGenerator.name, app_name=APP)
    seen: dict[str, dict] = {}
    for _ in range(40):
        stats = handle.stats.remote().result()
        seen[stats["replica"]] = stats
        if len(seen) == 2:
            break
    return seen


def _post(url: str, adapter_set: str, seed: int) -> int:
    with httpx.Client(base_url=url, timeout=120) as c:
        return c.post("/v1/generate", json=body(seed=seed, adapter_set=adapter_set), headers=JSON).status_code


def test_each_adapter_set_loads_on_one_replica_and_its_requests_go_there(multi):
    assert _post(multi, "a", 1) == 200  # both replicas hold no set: either may take it
    time.sleep(2.0)  # the replica's loaded sets reach the ingress's router (pushed every 0.1 s)
    assert _post(multi, "b", 2) == 200  # the replica holding no set takes it
    time.sleep(2.0)
    for seed in range(3, 9):  # one after another, alternating
        assert _post(multi, "ab"[seed % 2], seed) == 200
    with ThreadPoolExecutor(4) as pool:  # and a concurrent burst of both
        assert list(pool.map(_post, [multi] * 4, ["a", "b", "a", "b"], range(10, 14))) == [200] * 4
    replicas = _replicas()
    assert len(replicas) == 2
    loads = sorted((stats["loads"] for stats in replicas.values()), key=lambda counts: sorted(counts))
    assert loads == [{"a": 1}, {"b": 1}], replicas  # each set loaded once, each on its own replica
    for stats in replicas.values():
        assert set(stats["loaded"]) == {"default", *stats["loads"]}, replicas
        assert stats["groups_run"] >= 5, replicas  # each did its set's 6 requests (the burst's 2 may share a group)
