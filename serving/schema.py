"""Request validation for ``POST /v1/generate``, without Ray or a model (unit-tested on its own).

A request is JSON (``image`` as base64) or multipart/form-data (the same fields as form fields,
``image`` as a file part). Both end in one ``GenerateParams`` plus the reference image's bytes.
Every refusal is a ``RequestError`` naming the field, answered as a 4xx by the ingress.
Nothing in a request names a file: ``adapter`` is an enum, the image travels as bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sfo.degrade import generic_subject_text
from sfo.modes import DEFAULT_SWITCH, MODES, SamplingMode

PIXEL_MULTIPLE = 16  # FLUX: VAE 8x compression times 2x2 token packing (sfo.models.FluxModel.pixel_multiple)
MAX_SEED = 2**32 - 1  # JSON-safe in every client; torch.Generator takes any of them
ADAPTER_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a name, never a path: no "/" and no leading "."
DEFAULT_ADAPTER_SET = "default"  # args.adapters; the others are args.adapter_sets, multiplexed per replica
Adapter = Literal["sfo", "ref"]  # "sfo" = base + ref + sfo (the SFO policy), "ref" = base + ref (the SFT base)
Mode = Literal[MODES]  # sfo.modes.MODES: a tuple subscript is the same as listing them


class RequestError(ValueError):
    """A request the server refuses; ``field`` names the culprit, ``status`` is the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field}

# Per-request deadline (issue 27). One rule: a request's deadline is
#     deadline_s = base_s + safety * seconds_per_unit * work(job),
# work(job) = steps x forward passes per step x images x megapixels (``job_work``), and a request whose
# deadline would exceed ``request_timeout_s`` is refused up front (422 on "work": the limits are lowered to
# what the timeout holds). serve_config.yaml's http_options.request_timeout_s (Serve's own end-to-end limit)
# sits above request_timeout_s, so every accepted request ends by its own deadline (504 past it), never Serve's.
SECONDS_PER_UNIT = 0.25  # s per (step x pass x image x megapixel): FLUX.1-dev bf16 eager on one H100, 1024^2 x 28
#                          steps in ~7.1 s (ENVIRONMENT.md anchor) -> 7.1 / 28 = 0.254; set args.seconds_per_unit
#                          from benchmarks.gpu's serving row on another GPU (an L40 is ~2.5x slower)
DEADLINE_SAFETY = 3.0  # a group of other requests' images, a slower GPU, first-call warm-up
DEADLINE_BASE_S = 30.0  # queueing, text encoding, VAE decode, PNG, loading a multiplexed adapter set
REQUEST_TIMEOUT_S = 600.0  # the longest deadline accepted (the work budget follows from it)
MEGAPIXEL = 1024 * 1024


@dataclass(frozen=True)
class Deadlines:
    """How long a request may take, from its work (the rule above)."""

    base_s: float = DEADLINE_BASE_S
    seconds_per_unit: float = SECONDS_PER_UNIT
    safety: float = DEADLINE_SAFETY
    request_timeout_s: float = REQUEST_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("base_s", "seconds_per_unit", "safety", "request_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"deadlines.{name}: must be a finite number > 0, got {value!r}")
        if self.base_s >= self.request_timeout_s:
            raise ValueError(f"deadlines: base_s {self.base_s} leaves no time within request_timeout_s "
                             f"{self.request_timeout_s}")

    def expected_s(self, work: float) -> float:
        """Sampling time of ``work`` units on the calibrated device (no base, no safety)."""
        return self.seconds_per_unit * work

    def deadline_s(self, work: float) -> float:
        return self.base_s + self.safety * self.expected_s(work)

    @property
    def max_work(self) -> float:
        """The most work whose deadline fits within ``request_timeout_s``."""
        return (self.request_timeout_s - self.base_s) / (self.safety * self.seconds_per_unit)


def job_work(steps: int, images: int, width: int, height: int, image_guidance: float = 1.0,
             mode: str = "standard", switch: float = DEFAULT_SWITCH, max_rounds: int = SamplingMode.max_rounds) -> float:
    """A request's sampling work in units of one transformer pass over one megapixel image.

    Passes per step (``sfo.sampler.Sampler``): ``g`` = 2 with image guidance (a second pass without the
    reference), else 1; standard ``g``; dual-branch ``g + 1`` (the auxiliary branch, counted at every step);
    decoupled ``1 + max_rounds * switch * g`` (the layout pass, counted at every step, and up to ``max_rounds``
    appearance passes over the steps below the switch, ~``switch * steps``; FLUX's shifted schedule puts fewer
    there, so this errs long).  1024 x 1024, 28 steps, 1 image, standard -> 28.0.
    """
    g = 2.0 if image_guidance != 1.0 else 1.0
    per_step = {"standard": g, "dual-branch": g + 1.0, "decoupled": 1.0 + max_rounds * switch * g}[mode]
    return steps * per_step * images * width * height / MEGAPIXEL


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; set per application from ``build_app``'s args."""

    max_side: int = 1024
    min_side: int = PIXEL_MULTIPLE
    max_steps: int = 50
    max_guidance: float = 20.0
    max_num_images: int = 4
    max_prompt_chars: int = 2000
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 2048 * 2048
    default_side: int = 512
    default_steps: int = 28  # paper Sec. 4.1
    default_guidance: float = 3.5  # paper Sec. 4.1
    deadlines: Deadlines = field(default_factory=Deadlines)

    def __post_init__(self) -> None:
        for name in ("max_side", "min_side", "default_side"):
            value = getattr(self, name)
            if value < PIXEL_MULTIPLE or value % PIXEL_MULTIPLE:
                raise ValueError(f"limits.{name}: must be a positive multiple of {PIXEL_MULTIPLE}, got {value}")
        if not self.min_side <= self.default_side <= self.max_side:
            raise ValueError(f"limits.default_side: {self.default_side} is outside [{self.min_side}, {self.max_side}]")
        if not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"limits.default_steps: {self.default_steps} is outside [1, {self.max_steps}]")
        if not 0 <= self.default_guidance <= self.max_guidance:
            raise ValueError(f"limits.default_guidance: {self.default_guidance} is outside [0, {self.max_guidance}]")
        for name in ("max_num_images", "max_prompt_chars", "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name}: must be >= 1")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the image as base64 (4/3) plus room for the other fields."""
        return self.max_image_bytes * 4 // 3 + 64 * 1024


class GenerateParams(BaseModel):
    """Every field of a request but the image; types only (ranges are checked against ``Limits``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)

    prompt: str = Field(description="text prompt")
    steps: int | None = Field(None, description="sampling steps (default: the server's)")
    guidance: float | None = Field(None, description="FLUX guidance embedding (default 3.5)")
    image_guidance: float | None = Field(None, description="image guidance: v_noref + w (v_ref - v_noref); 1 = off "
                                                           "(default), > 1 follows the reference more, at a second pass")
    seed: int | None = Field(None, description="seed of the first image; image i uses seed + i (default: random)")
    width: int | None = Field(None, description=f"pixels, a multiple of {PIXEL_MULTIPLE}")
    height: int | None = Field(None, description=f"pixels, a multiple of {PIXEL_MULTIPLE}")
    num_images: int = Field(1, description="images to return; more than one needs Accept: application/json")
    adapter: Adapter = Field("sfo", description='"sfo": base + ref + sfo LoRA; "ref": base + ref (SFT base)')
    adapter_set: str | None = Field(None, description="which trained adapter set (GET /v1/models lists them; default "
                                                      f"{DEFAULT_ADAPTER_SET!r}); requests are routed to replicas "
                                                      "that hold theirs")
    mode: Mode = Field("standard", description='how the reference enters sampling (sfo.modes): "standard" (every step), '
                                               '"decoupled" (EZIGen: layout without it, then appearance rounds) or '
                                               '"dual-branch" (DCI: reference branch on the subject\'s tokens early on)')
    switch: float | None = Field(None, description="decoupled / dual-branch: the time t in (0, 1] where the second "
                                                   f"phase begins (default {DEFAULT_SWITCH})")
    subject: str | None = Field(None, description="dual-branch: the words naming the subject in the prompt; the "
                                                  "auxiliary branch reads the prompt with them replaced by 'object'")


class GenerateRequest(GenerateParams):
    """The JSON body: ``GenerateParams`` plus the reference image as base64."""

    image: str = Field(description="reference (subject) image, base64 of PNG/JPEG/... bytes")


@dataclass(frozen=True)
class Job:
    """One validated request, as the model deployment receives it (plain values, picklable)."""

    prompt: str
    image: bytes  # the reference image's original bytes; checked to decode within the limits
    steps: int
    guidance: float
    seeds: tuple[int, ...]  # one per image
    width: int
    height: int
    adapter: str
    image_guidance: float = 1.0
    mode: str = "standard"
    switch: float = DEFAULT_SWITCH
    auxiliary_prompt: str | None = None  # dual-branch: the prompt with the subject's words replaced
    adapter_set: str = DEFAULT_ADAPTER_SET

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one sampler call (same schedule, size and adapters)."""
        return (self.width, self.height, self.steps, self.guidance, self.image_guidance, self.adapter_set,
                self.adapter, self.mode, self.switch)

    @property
    def work(self) -> float:
        """``job_work`` of this request (transformer passes x images x megapixels)."""
        return job_work(self.steps, len(self.seeds), self.width, self.height, self.image_guidance, self.mode,
                        self.switch)

    def params(self) -> dict[str, Any]:
        """The resolved parameters, echoed back to the client."""
        return {"prompt": self.prompt, "steps": self.steps, "guidance": self.guidance,
                "image_guidance": self.image_guidance, "mode": self.mode, "switch": self.switch, "seeds": list(self.seeds),
                "width": self.width, "height": self.height, "num_images": len(self.seeds), "adapter": self.adapter,
                "adapter_set": self.adapter_set}


def _validation_error(exc: ValidationError) -> RequestError:
    """The first pydantic error as a ``RequestError`` naming the field (the input is not echoed)."""
    error = exc.errors(include_input=False, include_url=False)[0]
    field = ".".join(str(p) for p in error["loc"]) or "body"
    if error["type"] == "extra_forbidden":
        known = ", ".join(f for f in GenerateRequest.model_fields)
        return RequestError(field, f"unknown field; known fields are {known}")
    return RequestError(field, error["msg"])


def decode_base64_image(text: str, limits: Limits) -> bytes:
    if len(text) > limits.max_image_bytes * 4 // 3 + 4:
        raise RequestError("image", f"too large: more than {limits.max_image_bytes} bytes", 413)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image", "not valid base64") from None


def check_image(data: bytes, limits: Limits) -> Image.Image:
    """Bytes -> RGB image, refusing non-images and images over the byte or pixel limits.

    The pixel count is read from the header before the pixels are decoded (decompression bombs).
    """
    if not data:
        raise RequestError("image", "is empty")
    if len(data) > limits.max_image_bytes:
        raise RequestError("image", f"too large: {len(data)} bytes > {limits.max_image_bytes}", 413)
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:
        raise RequestError("image", "not a readable image (PNG, JPEG, WebP...)") from None
    w, h = image.size
    if w * h > limits.max_image_pixels:
        raise RequestError("image", f"too large: {w}x{h} = {w * h} pixels > {limits.max_image_pixels}", 413)
    try:
        image.load()
    except Exception:
        raise RequestError("image", "not a readable image (truncated or corrupt)") from None
    return image.convert("RGB")


def _resolve(params: GenerateParams, image: bytes, limits: Limits) -> Job:
    """Checks ranges against the limits and fills defaults; the seed defaults to a random one."""
    if not params.prompt.strip():
        raise RequestError("prompt", "must not be empty")
    if len(params.prompt) > limits.max_prompt_chars:
        raise RequestError("prompt", f"too long: {len(params.prompt)} characters > {limits.max_prompt_chars}")
    steps = limits.default_steps if params.steps is None else params.steps
    if not 1 <= steps <= limits.max_steps:
        raise RequestError("steps", f"must be in [1, {limits.max_steps}], got {steps}")
    guidance = limits.default_guidance if params.guidance is None else params.guidance
    if not (math.isfinite(guidance) and 0 <= guidance <= limits.max_guidance):
        raise RequestError("guidance", f"must be in [0, {limits.max_guidance}], got {guidance}")
    image_guidance = 1.0 if params.image_guidance is None else params.image_guidance
    if not (math.isfinite(image_guidance) and 0 <= image_guidance <= limits.max_guidance):
        raise RequestError("image_guidance", f"must be in [0, {limits.max_guidance}] (1 = off), got {image_guidance}")
    sides = {}
    for name in ("width", "height"):
        value = getattr(params, name)
        value = limits.default_side if value is None else value
        if not limits.min_side <= value <= limits.max_side:
            raise RequestError(name, f"must be in [{limits.min_side}, {limits.max_side}], got {value}")
        if value % PIXEL_MULTIPLE:
            raise RequestError(name, f"must be a multiple of {PIXEL_MULTIPLE}, got {value}")
        sides[name] = value
    if not 1 <= params.num_images <= limits.max_num_images:
        raise RequestError("num_images", f"must be in [1, {limits.max_num_images}], got {params.num_images}")
    seed = random.SystemRandom().randrange(MAX_SEED - limits.max_num_images) if params.seed is None else params.seed
    if not 0 <= seed <= MAX_SEED - params.num_images + 1:
        raise RequestError("seed", f"must be in [0, {MAX_SEED - params.num_images + 1}], got {seed}")
    switch = DEFAULT_SWITCH if params.switch is None else params.switch
    try:
        SamplingMode(mode=params.mode, switch=switch)  # sfo.modes' own checks
    except ValueError as exc:
        raise RequestError("switch", str(exc).removeprefix("sampling.switch: ")) from None
    auxiliary = None
    if params.subject is not None:
        if not params.subject.strip() or params.subject not in params.prompt:
            raise RequestError("subject", "must be words of the prompt (those naming the subject)")
        auxiliary = generic_subject_text(params.prompt, params.subject)
    adapter_set = DEFAULT_ADAPTER_SET if params.adapter_set is None else params.adapter_set
    if not ADAPTER_SET_NAME.match(adapter_set):
        raise RequestError("adapter_set", "must be a name of letters, digits, '_', '.', '-' (GET /v1/models lists them)")
    work = job_work(steps, params.num_images, sides["width"], sides["height"], image_guidance, params.mode, switch)
    if work > limits.deadlines.max_work:
        raise RequestError("work", f"{work:.0f} units (steps x passes x images x megapixels) is more than the "
                                   f"{limits.deadlines.max_work:.0f} the {limits.deadlines.request_timeout_s:g} s "
                                   "request timeout holds; lower steps, num_images, width/height or image_guidance")
    check_image(image, limits)
    return Job(prompt=params.prompt, image=image, steps=steps, guidance=float(guidance),
               seeds=tuple(seed + i for i in range(params.num_images)), adapter=params.adapter,
               image_guidance=float(image_guidance), mode=params.mode, switch=float(switch),
               auxiliary_prompt=auxiliary, adapter_set=adapter_set, **sides)


def job_from_json(data: dict[str, Any], limits: Limits) -> Job:
    """A parsed JSON body -> ``Job`` (``RequestError`` on anything wrong); types checked strictly."""
    try:
        request = GenerateRequest.model_validate(data, strict=True)  # JSON has types: 3.0 or true is no step count
    except ValidationError as exc:
        raise _validation_error(exc) from None
    image = decode_base64_image(request.image, limits)
    return _resolve(request, image, limits)


def job_from_form(fields: dict[str, str], files: dict[str, bytes], limits: Limits) -> Job:
    """Multipart fields and files -> ``Job``; ``image`` may be a file part or a base64 text field.

    Form fields are text, so numbers are parsed from strings (pydantic's lax mode; "nan" refused).
    """
    fields = dict(fields)
    unknown_files = set(files) - {"image"}
    if unknown_files:
        raise RequestError(sorted(unknown_files)[0], "unknown file part; only 'image' is a file")
    if "image" in files:
        image = files["image"]
    elif "image" in fields:
        image = decode_base64_image(fields.pop("image"), limits)
    else:
        raise RequestError("image", "missing: send the reference image as a file part named 'image'")
    try:
        params = GenerateParams.model_validate(fields)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    return _resolve(params, image, limits)
