"""Request validation without Ray or a model: every refusal names its field."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from serving.bodies import MAX_JSON_DEPTH, json_depth, parse_json_body, parse_multipart
from serving.schema import (
    DEFAULT_ADAPTER_SET,
    Deadlines,
    Job,
    Limits,
    RequestError,
    job_from_form,
    job_from_json,
    job_work,
)

LIMITS = Limits(max_side=256, default_side=64, default_steps=2, max_image_bytes=200_000, max_image_pixels=512 * 512)


def png(width: int = 32, height: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def valid(**extra) -> dict:
    return {"prompt": "a photo of a red cube", "image": b64(png()), **extra}


def test_defaults_are_resolved():
    job = job_from_json(valid(seed=7, num_images=3), LIMITS)
    assert isinstance(job, Job)
    assert (job.width, job.height, job.steps, job.guidance, job.adapter) == (64, 64, 2, 3.5, "sfo")
    assert job.seeds == (7, 8, 9)
    assert job.params()["seeds"] == [7, 8, 9]


def test_random_seed_when_absent():
    assert len(job_from_json(valid(), LIMITS).seeds) == 1


def test_json_types_are_strict_but_ints_pass_as_floats():
    job = job_from_json(valid(guidance=2), LIMITS)
    assert job.guidance == 2.0
    for change in ({"steps": "3"}, {"width": 32.0}, {"steps": True}):
        with pytest.raises(RequestError, match=next(iter(change))):
            job_from_json(valid(**change), LIMITS)


# (body changes, field named in the error, status)
BAD = [
    ({"image": "not base64!!"}, "image", 422),
    ({"image": b64(b"hello, not an image")}, "image", 422),
    ({"image": b64(png(600, 600))}, "image", 413),  # pixels over the limit (and bytes small)
    ({"width": 40}, "width", 422),
    ({"height": 2048}, "height", 422),
    ({"width": 0}, "width", 422),
    ({"steps": 0}, "steps", 422),
    ({"steps": 51}, "steps", 422),
    ({"guidance": -1.0}, "guidance", 422),
    ({"guidance": 1e9}, "guidance", 422),
    ({"guidance": float("nan")}, "guidance", 422),
    ({"guidance": float("inf")}, "guidance", 422),
    ({"prompt": "x" * 5000}, "prompt", 422),
    ({"prompt": "  "}, "prompt", 422),
    ({"adapter": "../../etc/passwd"}, "adapter", 422),
    ({"step": 3}, "step", 422),
    ({"num_images": 0}, "num_images", 422),
    ({"num_images": 9}, "num_images", 422),
    ({"seed": -1}, "seed", 422),
    ({"width": 32.5}, "width", 422),
    ({"steps": True}, "steps", 422),
]


@pytest.mark.parametrize("change,field,status", BAD, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD)])
def test_bad_json_fields(change, field, status):
    with pytest.raises(RequestError) as info:
        job_from_json(valid(**change), LIMITS)
    assert info.value.field == field, str(info.value)
    assert info.value.status == status
    json.dumps(info.value.body())  # the error itself always serialises (no NaN echoed back)


def test_missing_fields():
    for field in ("prompt", "image"):
        body = valid()
        del body[field]
        with pytest.raises(RequestError, match=field):
            job_from_json(body, LIMITS)


def test_image_over_byte_limit():
    with pytest.raises(RequestError) as info:
        job_from_json(valid(image=b64(b"\0" * 300_000)), LIMITS)
    assert (info.value.field, info.value.status) == ("image", 413)


@pytest.mark.parametrize("body", [b'{"guidance": NaN}', b'{"seed": -Infinity}', b'{"steps": [Infinity]}'])
def test_non_finite_json_names_the_field(body):
    with pytest.raises(RequestError) as info:
        parse_json_body(body)
    assert info.value.field == next(iter(json.loads(body))) and info.value.status == 422


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_body_not_a_json_object(body):
    with pytest.raises(RequestError) as info:
        parse_json_body(body)
    assert info.value.field == "body" and info.value.status == 400


def _multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = "XyZboundary"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="ref.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_fields_and_file():
    body, content_type = _multipart({"prompt": "a cube", "steps": "3", "seed": "5", "adapter": "ref"}, {"image": png()})
    fields, files = parse_multipart(body, content_type)
    job = job_from_form(fields, files, LIMITS)
    assert (job.prompt, job.steps, job.seeds, job.adapter) == ("a cube", 3, (5,), "ref")
    assert job.image == png()


@pytest.mark.parametrize("fields,files,field", [
    ({"prompt": "a", "guidance": "nan"}, {"image": png()}, "guidance"),
    ({"prompt": "a", "step": "3"}, {"image": png()}, "step"),
    ({"prompt": "a"}, {}, "image"),
    ({"prompt": "a"}, {"image": b"nope"}, "image"),
    ({"prompt": "a"}, {"image": png(), "other": png()}, "other"),
])
def test_bad_multipart(fields, files, field):
    body, content_type = _multipart(fields, files)
    with pytest.raises(RequestError) as info:
        job_from_form(*parse_multipart(body, content_type), LIMITS)
    assert info.value.field == field, str(info.value)


def test_limits_validate_themselves():
    with pytest.raises(ValueError, match="max_side"):
        Limits(max_side=1000)


def test_fastapi_validation_handler_survives_nan():
    """FastAPI's default handler answers 500 when the failing input holds NaN; the app's own answers 422."""
    import asyncio

    from fastapi.exceptions import RequestValidationError

    from serving.app import _validation_error

    exc = RequestValidationError([{"loc": ("body", "guidance"), "msg": "bad", "type": "x", "input": float("nan")}])
    response = asyncio.run(_validation_error(None, exc))
    assert response.status_code == 422
    assert json.loads(response.body) == {"error": "guidance: bad", "field": "guidance"}


@pytest.mark.parametrize("text, depth", [(b"", 0), (b"1", 0), (b"[]", 1), (b'{"a": [[1], "]["]}', 3),
                                         (b'"[[["', 0), (b'{"a": "\\"[["}', 1), (b"[[]][]", 2)])
def test_json_depth_ignores_brackets_in_strings(text, depth):
    assert json_depth(text) == depth


def _nested(kind: str, depth: int) -> bytes:
    return b"[" * depth + b"]" * depth if kind == "array" else b'{"a":' * depth + b"1" + b"}" * depth


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 2_000, 100_000])
def test_json_nested_over_the_limit_is_400_naming_it(kind, depth):
    with pytest.raises(RequestError) as info:
        parse_json_body(_nested(kind, depth))
    assert (info.value.field, info.value.status) == ("body", 400)
    assert f"limit is {MAX_JSON_DEPTH}" in info.value.message


def test_json_nested_under_the_limit_is_handled_as_any_body():
    """At the limit a nested array is refused as any non-object is; a nested object parses, and its
    field then fails validation naming the field."""
    with pytest.raises(RequestError, match="must be a JSON object") as info:
        parse_json_body(_nested("array", MAX_JSON_DEPTH))
    assert info.value.status == 400
    data = parse_json_body(_nested("object", MAX_JSON_DEPTH))
    assert json_depth(json.dumps(data).encode()) == MAX_JSON_DEPTH
    with pytest.raises(RequestError) as info:
        job_from_json({**valid(), "prompt": json.loads(_nested("array", MAX_JSON_DEPTH - 1))}, LIMITS)
    assert (info.value.field, info.value.status) == ("prompt", 422)


def test_json_number_beyond_a_float_is_400():
    with pytest.raises(RequestError, match="outside the range") as info:
        parse_json_body(b'{"guidance": 1e999}')
    assert (info.value.field, info.value.status) == ("body", 400)


@pytest.mark.parametrize("depth", [2, 3_000])
def test_multipart_nested_parts_are_400(depth):
    inner = b'--B0\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n--B0--\r\n'
    for i in range(1, depth):
        inner = (b'--B%d\r\nContent-Type: multipart/mixed; boundary=B%d\r\nContent-Disposition: form-data; '
                 b'name="x%d"\r\n\r\n' % (i, i - 1, i) + inner + b"\r\n--B%d--\r\n" % i)
    with pytest.raises(RequestError, match="nests one level only") as info:
        parse_multipart(inner, f"multipart/form-data; boundary=B{depth - 1}")
    assert (info.value.field, info.value.status) == ("body", 400)


def test_image_guidance_defaults_off_and_is_range_checked():
    assert job_from_json(valid(), LIMITS).image_guidance == 1.0
    job = job_from_json(valid(image_guidance=2), LIMITS)
    assert job.image_guidance == 2.0 and job.params()["image_guidance"] == 2.0
    for bad in (-0.5, 1e9):
        with pytest.raises(RequestError) as info:
            job_from_json(valid(image_guidance=bad), LIMITS)
        assert (info.value.field, info.value.status) == ("image_guidance", 422)
    with pytest.raises(RequestError) as info:
        job_from_json(valid(image_guidance="lots"), LIMITS)
    assert info.value.field == "image_guidance"


def test_mode_switch_and_subject_are_validated_and_echoed():
    job = job_from_json(valid(), LIMITS)
    assert (job.mode, job.switch, job.auxiliary_prompt) == ("standard", 0.7, None)
    job = job_from_json(valid(mode="dual-branch", switch=0.5, subject="red cube"), LIMITS)
    assert (job.mode, job.switch, job.auxiliary_prompt) == ("dual-branch", 0.5, "a photo of a object")
    assert job.params()["mode"] == "dual-branch" and job.params()["switch"] == 0.5
    assert job_from_json(valid(mode="decoupled"), LIMITS).batch_key != job_from_json(valid(), LIMITS).batch_key
    for change, field in (({"mode": "fancy"}, "mode"), ({"mode": 1}, "mode"), ({"switch": 0}, "switch"),
                          ({"switch": 1.5}, "switch"), ({"subject": "blue ball"}, "subject"), ({"subject": " "}, "subject")):
        with pytest.raises(RequestError) as info:
            job_from_json(valid(**change), LIMITS)
        assert (info.value.field, info.value.status) == (field, 422), change


def test_mode_fields_arrive_as_form_fields_too():
    job = job_from_form({"prompt": "a photo of a red cube", "mode": "decoupled", "switch": "0.5"}, {"image": png()}, LIMITS)
    assert (job.mode, job.switch) == ("decoupled", 0.5)
    with pytest.raises(RequestError) as info:
        job_from_form({"prompt": "a photo", "mode": "fancy"}, {"image": png()}, LIMITS)
    assert info.value.field == "mode"


def test_job_work_counts_passes_images_and_megapixels():
    """1024 x 1024 = 1 megapixel. standard 28 steps x 1 pass x 1 image = 28; image guidance doubles the passes
    (2 x 28 x 4 images = 224); dual-branch adds the auxiliary branch (28 x 2); decoupled at switch 0.5 with at
    most 10 rounds: 28 x (1 + 10 x 0.5) = 168; 512 x 512 is a quarter megapixel (28 / 4 = 7)."""
    assert job_work(28, 1, 1024, 1024) == 28.0
    assert job_work(28, 4, 1024, 1024, image_guidance=2.0) == 224.0
    assert job_work(28, 1, 1024, 1024, mode="dual-branch") == 56.0
    assert job_work(28, 1, 1024, 1024, mode="decoupled", switch=0.5) == 168.0
    assert job_work(28, 1, 512, 512) == 7.0


def test_deadline_rule_and_the_work_budget():
    """deadline = base + safety x seconds_per_unit x work: 30 + 3 x 0.25 x 28 = 51 s (FLUX 1024 px, 28 steps);
    the budget is the work whose deadline is request_timeout_s: (600 - 30) / 0.75 = 760 units."""
    d = Deadlines()
    assert (d.base_s, d.seconds_per_unit, d.safety, d.request_timeout_s) == (30.0, 0.25, 3.0, 600.0)
    assert d.deadline_s(28.0) == pytest.approx(51.0)
    assert d.max_work == pytest.approx(760.0)
    assert d.deadline_s(d.max_work) == pytest.approx(d.request_timeout_s)
    with pytest.raises(ValueError, match="base_s"):
        Deadlines(base_s=600.0, request_timeout_s=600.0)
    with pytest.raises(ValueError, match="safety"):
        Deadlines(safety=float("nan"))


def test_request_over_the_work_budget_is_refused_naming_work():
    """One rule: every accepted request's deadline fits the timeout. At the limits (1024 px, 50 steps, 4 images)
    a standard request (200 units) passes and one with image guidance (400) too; decoupled at the default switch
    0.7 with 10 rounds (50 x 15 x 4 = 3000 units) is refused before any work starts."""
    limits = Limits(max_side=1024, max_steps=50, max_num_images=4, max_image_pixels=2048 * 2048)
    big = {"width": 1024, "height": 1024, "steps": 50, "num_images": 4}
    assert job_from_json(valid(**big), limits).work == 200.0
    assert job_from_json(valid(**big, image_guidance=2.0), limits).work == 400.0
    with pytest.raises(RequestError) as caught:
        job_from_json(valid(**big, mode="decoupled"), limits)
    assert caught.value.field == "work" and "760" in caught.value.message
    for job in (job_from_json(valid(**big), limits), job_from_json(valid(**big, image_guidance=2.0), limits)):
        assert limits.deadlines.deadline_s(job.work) <= limits.deadlines.request_timeout_s


@pytest.mark.parametrize("name,ok", [("v2", True), ("run-3.final_a", True), ("../x", False), ("a/b", False),
                                     (".hidden", False), ("", False), ("x" * 65, False)])
def test_adapter_set_is_a_name_never_a_path(name, ok):
    if ok:
        assert job_from_json(valid(adapter_set=name), Limits()).adapter_set == name
    else:
        with pytest.raises(RequestError, match="adapter_set"):
            job_from_json(valid(adapter_set=name), Limits())
    assert job_from_json(valid(), Limits()).adapter_set == DEFAULT_ADAPTER_SET
