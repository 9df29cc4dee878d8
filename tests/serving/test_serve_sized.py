"""Serve sized for FLUX (issue 27) over HTTP with the tiny model: deadlines (504, sampling stopped between steps,
the replica free for the next request), client disconnects, per-group answers, multiplexed adapter sets, and the
bearer token.

A second application ("strict", at /strict) beside conftest's: one replica, a bearer token, adapter sets
"alt"/"alt2"/"alt3" (the same files) with at most 2 per replica, and a deadline rule under which the work barely
counts (12 s + 0.0001 s per unit: every request's deadline is ~12 s), so a long request overruns it. How long a
step takes here is measured (``step_s``), and long requests are sized from it to take >= 60 s in full.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving.test_schema import b64, png

TOKEN = "test-token-27"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE_S = 12.0
SECONDS_PER_UNIT = 0.0001
FULL_S = 60.0  # what a "long" request would take in full here


def body(**extra) -> dict:
    return {"prompt": "a photo of a red cube", "image": b64(png(48, 40)), "seed": 3, "width": 32, "height": 32,
            "steps": 2, **extra}


def heavy(steps: int, **extra) -> dict:
    """256 px x 4 images with image guidance (2 passes a step): the most work per step the app allows."""
    return body(width=256, height=256, num_images=4, image_guidance=2.0, steps=steps, **extra)


JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def strict(server, adapters_dir, tmp_path_factory):
    """Base URL of the strict app; deleted afterwards."""
    import os

    from ray import serve

    from serving.app import TOKEN_ENV, build_app

    folder = str(adapters_dir)
    os.environ[TOKEN_ENV] = TOKEN  # build_app reads it where it runs (here)
    try:
        app = build_app({"model": "tiny", "adapters": folder, "device": "cpu", "max_side": 256, "max_steps": 100_000,
                         "default_side": 32, "default_steps": 2,
                         "max_image_bytes": 200_000, "max_image_pixels": 512 * 512, "max_replicas": 1,
                         "adapter_sets": {"alt": folder, "alt2": folder, "alt3": folder,
                                          "broken": str(tmp_path_factory.mktemp("no-adapters"))},
                         "max_adapter_sets_per_replica": 2, "deadline_base_s": BASE_S,
                         "seconds_per_unit": SECONDS_PER_UNIT, "deadline_safety": 1.0, "request_timeout_s": 60})
    finally:
        del os.environ[TOKEN_ENV]
    serve.run(app, name="strict", route_prefix="/strict", blocking=False)
    url = f"{server}/strict"
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(120):
            if c.get("/healthz").status_code == 200:
                break
            time.sleep(0.5)
    try:
        yield url
    finally:
        serve.delete("strict")


def _post(url: str, payload: dict, timeout: float = 120, headers: dict | None = None) -> tuple[int, float, str]:
    """(status, seconds, body text) of one request from its own client."""
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=timeout) as c:
        r = c.post("/v1/generate", json=payload, headers={**AUTH, **JSON, **(headers or {})})
    return r.status_code, time.monotonic() - start, r.text[:300]


@pytest.fixture(scope="module")
def step_s(strict) -> float:
    """Seconds per ``heavy`` step on the replica: (20 steps - 2 steps) / 18."""
    _post(strict, heavy(2))  # warm
    times = {}
    for steps in (2, 20):
        status, times[steps], text = _post(strict, heavy(steps))
        assert status == 200, text
    return max((times[20] - times[2]) / 18, 1e-3)


def test_a_request_past_its_deadline_is_504_and_frees_the_replica(strict, step_s):
    """A request sized to take >= 60 s in full has a ~12 s deadline: 504 after ~12 s, and the next request is
    answered within a step or two of it (not after the ~48 s its sampling had left)."""
    steps = math.ceil(FULL_S / step_s)
    status, took, text = _post(strict, heavy(steps))
    assert status == 504, (status, took, text)
    assert "deadline" in text
    assert BASE_S <= took < BASE_S + 5, took  # its deadline (+ the ingress's 1 s grace), not the full 60 s
    status, short, text = _post(strict, body())
    assert status == 200, text
    assert short < 2 + 2 * step_s, (short, step_s)  # freed within a step, far below the ~48 s left


def test_a_disconnected_client_frees_the_replica(strict, step_s):
    """The client of a >= 60 s request gives up after 1.5 s; the next request is answered in a step or two,
    long before the abandoned request's ~12 s deadline would have stopped its group."""
    with pytest.raises(httpx.ReadTimeout):
        _post(strict, heavy(math.ceil(FULL_S / step_s)), timeout=1.5)
    status, short, text = _post(strict, body())
    assert status == 200, text
    assert short < 4 + 2 * step_s, (short, step_s)  # not the ~10 s left of its deadline


def test_requests_of_different_sizes_each_return_when_their_own_group_is_done(strict, step_s):
    """While a ~2 s request holds the replica, a 32 px request and then a heavy one sized to ~4 s queue up. They
    run as two groups: the small one is answered when its own group is done, ~4 s before the heavy one
    (``@serve.batch`` ran both in one call and answered both at the end)."""
    ends: dict[str, float] = {}

    def send(name: str, delay: float, payload: dict) -> int:
        time.sleep(delay)
        status = _post(strict, payload)[0]
        ends[name] = time.monotonic()
        return status

    with ThreadPoolExecutor(3) as pool:
        statuses = list(pool.map(send, ["blocker", "small", "big"], [0.0, 0.5, 0.8],
                                 [heavy(math.ceil(2.0 / step_s), seed=7), body(seed=5),
                                  heavy(math.ceil(4.0 / step_s), seed=6)]))
    assert statuses == [200, 200, 200]
    assert ends["small"] < ends["big"] - 2.0, ends  # the heavy group's ~4 s came after the small answer


def _stats(app: str = "strict") -> dict:
    from ray import serve

    return serve.get_deployment_handle("FluxGenerator", app_name=app).stats.remote().result()


def test_multiplexed_adapter_sets_load_once_per_replica_and_evict_lru(strict):
    """Three "alt" requests load "alt" once; "alt2" and "alt3" fill the 2-set LRU and evict "alt", which then
    loads a second time. A set's images are the default set's (the same files). Unknown sets are a 422."""
    default = _post(strict, body(seed=9))
    for _ in range(3):
        status, _, text = _post(strict, body(seed=9, adapter_set="alt"))
        assert status == 200, text
    assert _stats()["loads"] == {"alt": 1}
    assert default[0] == 200
    for name in ("alt2", "alt3", "alt"):
        assert _post(strict, body(adapter_set=name))[0] == 200
    stats = _stats()
    assert stats["loads"] == {"alt": 2, "alt2": 1, "alt3": 1}
    assert set(stats["loaded"]) <= {"default", "alt", "alt2", "alt3"} and len(stats["loaded"]) <= 3 + 1
    status, _, text = _post(strict, body(adapter_set="nope"))
    assert status == 422 and "adapter_set" in text


def test_an_adapter_set_that_cannot_load_is_503_naming_it_and_the_replica_keeps_serving(strict):
    """A set whose folder holds no LoRA files: 503 with field adapter_set and the set's name (a server-side
    state, not the client's error), again on a retry (a failed load is not cached), and other requests still
    get their images."""
    for _ in range(2):
        status, _, text = _post(strict, body(adapter_set="broken"))
        assert status == 503 and '"field":"adapter_set"' in text.replace(" ", "") and "'broken'" in text, text
    assert _post(strict, body())[0] == 200
    assert "broken" not in _stats()["loaded"]


def test_bearer_token(strict):
    with httpx.Client(base_url=strict, timeout=60) as c:
        assert c.get("/healthz").status_code == 200  # open
        assert c.get("/v1/models").status_code == 401
        r = c.post("/v1/generate", json=body())
        assert r.status_code == 401 and r.json()["field"] == "authorization"
        assert r.headers["www-authenticate"] == "Bearer"
        wrong = c.post("/v1/generate", json=body(), headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        assert c.post("/v1/generate", json=body(), headers={"Authorization": TOKEN}).status_code == 401  # no scheme
        models = c.get("/v1/models", headers=AUTH)
        assert models.status_code == 200 and models.json()["adapter_sets"] == ["default", "alt", "alt2", "alt3", "broken"]
        assert c.post("/v1/generate", json=body(), headers=AUTH).status_code == 200

