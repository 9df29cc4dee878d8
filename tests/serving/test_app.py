"""The Ray Serve app end to end over HTTP on a local Ray: generate, A/B, batching, bad input, health.

One Serve application for all serving tests (``server`` in conftest.py); tiny model, 32x32, 2 steps.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from tests.serving.conftest import SIDE, STEPS
from tests.serving.test_schema import b64, png


def body(**extra) -> dict:
    return {"prompt": "a photo of a red cube", "image": b64(png(48, 40)), "seed": 3, **extra}


def image_of(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_generate_png(client):
    r = client.post("/v1/generate", json=body(width=64, height=32))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert image_of(r.content).size == (64, 32)
    assert r.headers["x-seed"] == "3"


def test_same_seed_same_image_and_adapters_differ(client):
    first = client.post("/v1/generate", json=body()).content
    again = client.post("/v1/generate", json=body()).content
    ref = client.post("/v1/generate", json=body(adapter="ref")).content
    assert first == again
    assert first != ref


def test_json_many_images(client):
    r = client.post("/v1/generate", json=body(num_images=2), headers={"Accept": "application/json"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["images"]) == 2 and out["images"][0] != out["images"][1]
    assert out["params"]["seeds"] == [3, 4]
    assert out["params"]["width"] == SIDE and out["params"]["steps"] == STEPS and out["params"]["adapter"] == "sfo"
    assert image_of(base64.b64decode(out["images"][0])).size == (SIDE, SIDE)


def test_many_images_need_json_accept(client):
    r = client.post("/v1/generate", json=body(num_images=2))
    assert r.status_code == 406 and r.json()["field"] == "num_images"


def test_multipart(client):
    files = {"image": ("ref.png", png(48, 40), "image/png")}
    r = client.post("/v1/generate", data={"prompt": "a photo of a red cube", "seed": "3"}, files=files)
    assert r.status_code == 200, r.text
    assert r.content == client.post("/v1/generate", json=body()).content  # same request, same image


_HUGE = b64(png(600, 600))


def _nested_multipart(depth: int) -> bytes:
    inner = b'--B0\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--B0--\r\n'
    for i in range(1, depth):
        inner = (b'--B%d\r\nContent-Type: multipart/mixed; boundary=B%d\r\nContent-Disposition: form-data; '
                 b'name="x%d"\r\n\r\n' % (i, i - 1, i) + inner + b"\r\n--B%d--\r\n" % i)
    return inner

BAD = [  # (json body or raw bytes, content type, field, status)
    (body(image="###"), None, "image", 422),
    (body(image=b64(b"not an image")), None, "image", 422),
    (body(image=_HUGE), None, "image", 413),
    (body(image=b64(b"\0" * 300_000)), None, "body", 413),
    (body(width=40), None, "width", 422),
    (body(height=4096), None, "height", 422),
    (body(steps=0), None, "steps", 422),
    (body(steps=500), None, "steps", 422),
    (body(guidance=-2.0), None, "guidance", 422),
    (body(prompt="x" * 3000), None, "prompt", 422),
    (body(adapter="/etc/passwd"), None, "adapter", 422),
    (body(step=3), None, "step", 422),
    (json.dumps(body()).replace('"seed": 3', '"guidance": NaN').encode(), "application/json", "guidance", 422),
    (json.dumps(body()).replace('"seed": 3', '"steps": Infinity').encode(), "application/json", "steps", 422),
    (b"this is not json", "application/json", "body", 400),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", "body", 400),  # issue 15: was a 500
    (b'{"a":' * 2_000 + b"1" + b"}" * 2_000, "application/json", "body", 400),
    (b'{"prompt": "x", "guidance": 1e999}', "application/json", "body", 400),
    (_nested_multipart(2_000), "multipart/form-data; boundary=B1999", "body", 400),  # under the body limit
    (_nested_multipart(3_000), "multipart/form-data; boundary=B2999", "body", 413),  # over it: size first
    (b"prompt=x", "text/plain", "content-type", 415),
]


@pytest.mark.parametrize("payload,content_type,field,status", BAD, ids=[f"{i}-{f}" for i, (_, _, f, _) in enumerate(BAD)])
def test_bad_request_then_good(client, payload, content_type, field, status):
    if content_type is None:
        r = client.post("/v1/generate", json=payload)
    else:
        r = client.post("/v1/generate", content=payload, headers={"Content-Type": content_type})
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and field in r.json()["error"]
    assert client.post("/v1/generate", json=body()).status_code == 200  # still healthy


def test_each_sampling_mode_is_served_and_a_bad_one_refused(client):
    standard = client.post("/v1/generate", json=body()).content
    for extra in ({"mode": "decoupled", "switch": 0.5}, {"mode": "dual-branch", "switch": 0.5, "subject": "red cube"}):
        r = client.post("/v1/generate", json=body(**extra), headers={"Accept": "application/json"})
        assert r.status_code == 200, r.text
        assert r.json()["params"]["mode"] == extra["mode"]
        assert base64.b64decode(r.json()["images"][0]) != standard  # the mode changed the image
    r = client.post("/v1/generate", json=body(mode="fancy"))
    assert r.status_code == 422 and r.json()["field"] == "mode"


def test_concurrent_requests(server):
    def one(seed: int) -> tuple[int, bytes]:
        with httpx.Client(base_url=server, timeout=60) as c:
            r = c.post("/v1/generate", json=body(seed=seed))
            return r.status_code, r.content

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(100, 106)))
    assert [code for code, _ in results] == [200] * 6
    assert len({content for _, content in results}) == 6


def test_health_models_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["base_model"] == "tiny"
    assert set(models["adapters"]) == {"sfo", "ref"}
    assert models["adapter_sets"] == ["default"]
    assert len(models["adapters"]["sfo"]["sha256"]) == 64
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/models", "/healthz"} <= set(spec["paths"])
    content = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert client.get("/docs").status_code == 200


def test_serve_config_file_is_valid():
    """serving/serve_config.yaml passes Serve's own schema, its args build the app, names match the code."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.app import DEADLINE_GRACE_S, Ingress, build_app, resolve_args
    from serving.replica import FluxGenerator

    path = Path(__file__).resolve().parents[2] / "serving" / "serve_config.yaml"
    assert path.read_text().startswith("# serve run serving/serve_config.yaml")
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (application,) = config.applications
    assert application.import_path == "serving.app:build_app"
    assert {d.name for d in application.deployments} == {FluxGenerator.name, Ingress.name}
    build_app(application.args)  # binds only; no Ray needed
    with pytest.raises(ValueError, match="stepz"):
        build_app({**application.args, "stepz": 3})
    # The deadline rule's order: every accepted request's deadline <= args.request_timeout_s, whose 504 (plus the
    # ingress's grace) comes before Serve's own end-to-end limit; and no autoscaling_config here (it would replace
    # the code's, max_replicas from the environment included).
    args = resolve_args(application.args)
    assert config.http_options.request_timeout_s > args.request_timeout_s + DEADLINE_GRACE_S
    assert all("autoscaling_config" not in d.model_dump(exclude_unset=True)
               for d in application.deployments if d.name == FluxGenerator.name)


def test_healthz_is_503_with_the_reason_while_the_model_deployment_fails(server, tmp_path):
    """A generator whose adapters folder is missing never starts: /healthz says so (503 + the reason)
    instead of answering 200 for an app that cannot generate."""
    from ray import serve

    from serving.app import Ingress
    from serving.replica import FluxGenerator
    from serving.schema import Limits

    broken = Ingress.bind(FluxGenerator.options(max_constructor_retry_count=1).bind(
        "tiny", str(tmp_path / "no-adapters"), "cpu", None, 4), Limits())
    try:
        try:
            serve.run(broken, name="broken", route_prefix="/broken", blocking=False)
        except RuntimeError:
            pass  # serve.run reports the failed deployment; the ingress still answers
        with httpx.Client(base_url=server, timeout=30) as c:
            r = c.get("/broken/healthz")
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "deploy_failed" and "no ref/ folder" in r.json()["reason"]
        with httpx.Client(base_url=server, timeout=30) as c:
            assert c.get("/healthz").json() == {"status": "ok"}  # the working app beside it is healthy
    finally:
        serve.delete("broken")
