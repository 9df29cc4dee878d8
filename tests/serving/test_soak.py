"""Soak: 1000 seeded malformed requests all get a 4xx naming a field, then 16 concurrent clients x 8 valid
requests all succeed, and ``/healthz`` answers ok throughout (issue 11)."""

from __future__ import annotations

import io
import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.serving.test_schema import b64, png

REQUESTS = 1000


def _bomb() -> bytes:
    """A few KB of PNG that decodes to 4096 x 4096 pixels (the app allows 512 x 512)."""
    buffer = io.BytesIO()
    Image.new("L", (4096, 4096)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _valid(rng: random.Random) -> dict:
    return {"prompt": "a photo of a red cube", "image": b64(png(rng.randrange(16, 64), rng.randrange(16, 64))),
            "seed": rng.randrange(1 << 20)}


def _malformed(rng: random.Random, bomb: str) -> tuple[bytes, str]:
    """One bad request (raw body, content type) from a seeded family of faults."""
    body = _valid(rng)
    family = rng.randrange(12)
    if family == 0:  # bad base64
        body["image"] = rng.choice(["###", "a", "=" * 7, body["image"][:-3] + "!!!"])
    elif family == 1:  # not an image
        body["image"] = b64(rng.randbytes(rng.randrange(1, 2000)))
    elif family == 2:  # pixel bomb
        body["image"] = bomb
    elif family == 3:  # wrong types
        key = rng.choice(["prompt", "seed", "steps", "width", "guidance", "image", "num_images", "adapter"])
        body[key] = rng.choice([[1, 2], {"a": 1}, "seven"]) if key != "prompt" else rng.choice([7, [], {}])
    elif family == 4:  # NaN / inf
        text = json.dumps(body)[:-1] + f', "{rng.choice(["guidance", "steps", "seed"])}": {rng.choice(["NaN", "Infinity", "-Infinity"])}}}'
        return text.encode(), "application/json"
    elif family == 5:  # huge prompt
        body["prompt"] = "x" * rng.randrange(2001, 20000)
    elif family == 6:  # path traversal and unknown adapters
        body["adapter"] = rng.choice(["../ref", "/etc/passwd", "sfo/../../x", "..", "REF", ""])
    elif family == 7:  # not JSON
        return rng.choice([b"{", b"not json", rng.randbytes(64), b'{"prompt": }']), "application/json"
    elif family == 8:  # wrong content type
        return json.dumps(body).encode(), rng.choice(["text/plain", "application/xml", "image/png"])
    elif family == 9:  # out-of-range numbers
        key, value = rng.choice([("width", 40), ("height", 4096), ("steps", 0), ("steps", 10_000), ("guidance", -1.0),
                                 ("num_images", 0), ("num_images", 1000), ("width", -32)])
        body[key] = value
    elif family == 10:  # missing fields
        del body[rng.choice(["prompt", "image"])]
    else:  # deep nesting and unknown fields
        if rng.random() < 0.5:
            return b"[" * 5000 + b"]" * 5000, "application/json"
        body[rng.choice(["stepz", "step", "imgae"])] = 1
    return json.dumps(body).encode(), "application/json"


@pytest.mark.slow
def test_malformed_requests_then_concurrent_valid_ones(server):
    rng = random.Random(11)
    bomb = b64(_bomb())
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server, timeout=60) as client:
        for i in range(REQUESTS):
            payload, content_type = _malformed(rng, bomb)
            r = client.post("/v1/generate", content=payload, headers={"Content-Type": content_type})
            assert 400 <= r.status_code < 500, (i, payload[:200], r.status_code, r.text[:300])
            assert r.json().get("field"), (i, r.text[:300])
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if i % 250 == 0:
                assert client.get("/healthz").json() == {"status": "ok"}
    assert {400, 413, 415, 422} <= set(statuses), statuses  # every kind of refusal was exercised

    def valid_client(k: int) -> list[int]:
        local = random.Random(100 + k)
        with httpx.Client(base_url=server, timeout=120) as c:
            return [c.post("/v1/generate", json=_valid(local)).status_code for _ in range(8)]

    with ThreadPoolExecutor(16) as pool:
        codes = [code for codes in pool.map(valid_client, range(16)) for code in codes]
    assert codes == [200] * 128
    with httpx.Client(base_url=server, timeout=30) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
