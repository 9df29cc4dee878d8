"""Ray Serve application: a thin FastAPI ingress in front of one FLUX + "ref"/"sfo" LoRA deployment.

    serve run serving/serve_config.yaml                  # laptop: tiny model, make demo's adapters
    serve run serving.app:build_app model=tiny adapters=runs/train/sfo/adapters
    SFO_SERVE_MODEL=/models/FLUX.1-dev SFO_SERVE_GPUS_PER_REPLICA=1 serve run serving/serve_config.yaml

Environment variables, when set (non-empty), override ``args`` in ``build_app`` (so one config file,
embedded verbatim by the RayService, serves the tiny model on a laptop and FLUX.1-dev on a GPU cluster):
    SFO_SERVE_MODEL             args.model
    SFO_SERVE_ADAPTERS          args.adapters
    SFO_SERVE_GPUS_PER_REPLICA  args.gpus_per_replica: GPUs per FluxGenerator replica (> 0 adds num_gpus)
They are read where ``build_app`` runs (a Ray node), so set them on every node of the cluster.

Routes (OpenAPI at /docs and /openapi.json):
    POST /v1/generate   JSON {"prompt", "image" (base64), "steps", "guidance", "seed", "width", "height",
                        "num_images", "adapter": "sfo"|"ref"} or the same as multipart/form-data with
                        ``image`` as a file part. Answers ``image/png`` for one image; with
                        ``Accept: application/json`` answers {"images": [base64 PNG...], "params": {...}}.
                        num_images > 1 without a JSON Accept is 406 (a PNG holds one image).
    GET  /v1/models     base model, adapter sets and their sha256 (sfo.adapters.adapter_fingerprint)
    GET  /healthz       the ingress is up ({"status": "ok"}); replicas have Serve's own health checks

Bad input is a 4xx whose JSON body names the field ({"error", "field"}); a request that runs past
``request_timeout_s`` is a 504. The model deployment autoscales; ``@serve.batch`` groups concurrent
requests and runs those with the same size/steps/guidance/adapter as one sampler call.
"""

# no `from __future__ import annotations`: Serve's ingress wrapper needs real annotations (Request)

import asyncio
import base64
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.schema import (
    GenerateParams,
    GenerateRequest,
    Job,
    Limits,
    RequestError,
    job_from_form,
    job_from_json,
    parse_json_body,
    parse_multipart,
)

logger = logging.getLogger("ray.serve")

# Laptop-friendly defaults; serving/serve_config.yaml overrides them per deployment.
GENERATOR_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 3,
    "downscale_delay_s": 30,
}
GENERATOR_MAX_ONGOING = 16  # >= max_batch_size * max_concurrent_batches (Serve warns otherwise)
MAX_BATCH_SIZE = 8  # requests per @serve.batch call (images per sampler call: AppArgs.max_batch_images)
BATCH_WAIT_S = 0.02  # how long the first request of a batch waits for company
# CPU share of a FluxGenerator replica. Set here, not in serve_config.yaml: a config's ray_actor_options
# replaces the code's wholesale (Serve 2.60), which would drop the num_gpus that build_app adds.
GENERATOR_ACTOR_OPTIONS = {"num_cpus": 0.5}
# AppArgs field -> environment variable that overrides it when set and non-empty.
ENV_OVERRIDES = {
    "model": "SFO_SERVE_MODEL",
    "adapters": "SFO_SERVE_ADAPTERS",
    "gpus_per_replica": "SFO_SERVE_GPUS_PER_REPLICA",
}


class AppArgs(BaseModel):
    """``build_app``'s args (the ``args:`` block of serve_config.yaml); unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description='"tiny" or a local FLUX.1-dev folder (diffusers layout)')
    adapters: str = Field(description="folder with ref/ and sfo/ (sfo.adapters.save_adapter's layout)")
    device: str | None = Field(None, description="torch device; default CUDA when available")
    dtype: str | None = Field(None, description="bf16/fp32...; default bf16 on GPU, fp32 on CPU")
    gpus_per_replica: float = Field(0.0, ge=0, allow_inf_nan=False,
                                    description="num_gpus of each FluxGenerator replica; 0 = CPU only")
    request_timeout_s: float = Field(60.0, gt=0, description="per request, in the ingress; 504 past it")
    max_batch_images: int = Field(8, ge=1, description="most images in one sampler call")
    fuse_adapters: bool = Field(True, description="fold the adapters into a copy of the weights per sampler call "
                                "(faster; ~16 GB more on FLUX.1-dev in bf16); false = LoRA layers")
    max_side: int = 1024
    max_steps: int = 50
    max_num_images: int = 4
    max_prompt_chars: int = 2000
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 2048 * 2048
    default_side: int = 512
    default_steps: int = 28

    def limits(self) -> Limits:
        return Limits(max_side=self.max_side, max_steps=self.max_steps, max_num_images=self.max_num_images,
                      max_prompt_chars=self.max_prompt_chars, max_image_bytes=self.max_image_bytes,
                      max_image_pixels=self.max_image_pixels, default_side=self.default_side,
                      default_steps=self.default_steps)


@serve.deployment(
    ray_actor_options=GENERATOR_ACTOR_OPTIONS,
    autoscaling_config=GENERATOR_AUTOSCALING,
    max_ongoing_requests=GENERATOR_MAX_ONGOING,
    health_check_period_s=10,
)
class FluxGenerator:
    """One model + both adapters per replica, loaded once; requests are batched."""

    def __init__(self, model: str, adapters: str, device: str | None, dtype: str | None, max_batch_images: int,
                 fuse_adapters: bool = True):
        from serving.generator import Generator  # torch/diffusers load in the replica, not the ingress

        self.generator = Generator(model, adapters, device=device, dtype=dtype, max_batch_images=max_batch_images,
                                   fuse_adapters=fuse_adapters)
        self._lock = asyncio.Lock()  # one sampler call at a time: adapter switching is per-model state

    def info(self) -> dict[str, Any]:
        return self.generator.info

    async def generate(self, job: Job) -> list[bytes]:
        return await self._generate_batch(job)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _generate_batch(self, jobs: list[Job]) -> list[list[bytes]]:
        async with self._lock:  # the sampler runs in a thread so the replica keeps answering health checks
            return await asyncio.to_thread(self.generator.run, jobs)


app = FastAPI(
    title="SFO on Ray: subject-driven FLUX",
    description=__doc__.split("Routes")[0].strip(),
    version="1",
)


def generator_state() -> tuple[str, str]:
    """("ok", "") when this application's FluxGenerator has a running replica, else (its Serve state in
    lower case, Serve's message): "updating" while replicas start, "deploy_failed" with the reason."""
    from ray.serve._private.common import ReplicaState

    app_name = serve.get_replica_context().app_name
    application = serve.status().applications.get(app_name)
    deployment = application.deployments.get(FluxGenerator.name) if application is not None else None
    if deployment is None:
        return "unknown", f"no {FluxGenerator.name} deployment in application {app_name!r}"
    if deployment.replica_states.get(ReplicaState.RUNNING, 0) > 0:
        return "ok", ""
    return str(deployment.status.value).lower(), deployment.message or "no model replica is running yet"


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": f"{field}: {message}", "field": field}, status_code=status)


@app.exception_handler(RequestError)
async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own handler echoes the input and answers 500 when it holds NaN; this one never echoes."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return _error(422, field, str(first.get("msg", "invalid")))


_GENERATE_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": GenerateRequest.model_json_schema()},
        "multipart/form-data": {"schema": {
            **GenerateParams.model_json_schema(),
            "properties": {**GenerateParams.model_json_schema()["properties"],
                           "image": {"type": "string", "format": "binary", "description": "reference image file"}},
            "required": ["prompt", "image"],
        }},
    },
}


class ModelsInfo(BaseModel):
    base_model: str
    device: str
    dtype: str
    default_adapter: str
    adapters: dict[str, dict[str, Any]]


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    """Parses and validates requests, calls the generator, shapes the response; no model here."""

    def __init__(self, generator: DeploymentHandle, limits: Limits, request_timeout_s: float):
        self.generator = generator
        self.limits = limits
        self.timeout_s = request_timeout_s

    @app.get("/healthz", responses={503: {"description": "the model deployment is not ready, or failed: "
                                                           "{status, reason}"}})
    async def healthz(self) -> Response:
        """200 only when a model replica runs (so a health check means the app can generate), else 503
        with the model deployment's state and Serve's message (e.g. why its replicas failed to start)."""
        state, reason = await asyncio.to_thread(generator_state)  # serve.status() blocks on the controller
        if state != "ok":
            return JSONResponse({"status": state, "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", response_model=ModelsInfo)
    async def models(self) -> dict[str, Any]:
        return await self._call(self.generator.info.remote())

    @app.post(
        "/v1/generate",
        openapi_extra={"requestBody": _GENERATE_BODY},
        responses={200: {"content": {"image/png": {}, "application/json": {}},
                         "description": "one PNG, or {images: [base64 PNG], params} with Accept: application/json"},
                   406: {"description": "num_images > 1 without Accept: application/json"},
                   413: {"description": "image or body too large"}, 422: {"description": "a field is invalid"},
                   504: {"description": "request_timeout_s exceeded"}},
    )
    async def generate(self, request: Request) -> Response:
        job = await self._parse(request)
        wants_json = "application/json" in request.headers.get("accept", "")
        if len(job.seeds) > 1 and not wants_json:
            raise RequestError("num_images", "more than one image needs 'Accept: application/json' "
                                             "(an image/png response holds one image)", 406)
        images = await self._call(self.generator.generate.remote(job))
        if wants_json:
            return JSONResponse({"images": [base64.b64encode(png).decode() for png in images], "params": job.params()})
        headers = {"X-Seed": str(job.seeds[0]), "X-Adapter": job.adapter}
        return Response(content=images[0], media_type="image/png", headers=headers)

    async def _parse(self, request: Request) -> Job:
        content_type = request.headers.get("content-type", "")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise RequestError("body", f"too large: more than {self.limits.max_body_bytes} bytes", 413)
        body = await request.body()
        if len(body) > self.limits.max_body_bytes:
            raise RequestError("body", f"too large: more than {self.limits.max_body_bytes} bytes", 413)
        if content_type.startswith("multipart/form-data"):
            fields, files = parse_multipart(body, content_type)
            return job_from_form(fields, files, self.limits)
        if content_type and not content_type.startswith("application/json"):
            raise RequestError("content-type", f"{content_type!r} is not supported; send application/json "
                                               "or multipart/form-data", 415)
        return job_from_json(parse_json_body(body), self.limits)

    async def _call(self, response) -> Any:
        async def awaited() -> Any:  # wait_for needs a coroutine; a DeploymentResponse is only awaitable
            return await response

        try:
            return await asyncio.wait_for(awaited(), timeout=self.timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestError("request", f"timed out after {self.timeout_s} s", 504) from None


def resolve_args(args: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> AppArgs:
    """``args`` with the ``ENV_OVERRIDES`` variables set (non-empty) in ``environ`` on top, validated.

    Args:
        args: the ``args:`` block of serve_config.yaml (or ``serve run ... key=value``).
        environ: default ``os.environ``.
    Returns:
        the validated ``AppArgs``.
    Raises:
        ValueError: naming the bad field, or the environment variable when the bad value came from one.
    """
    environ = os.environ if environ is None else environ
    from_env = {field: environ[var] for field, var in ENV_OVERRIDES.items() if environ.get(var, "").strip()}
    try:
        return AppArgs.model_validate({**dict(args), **from_env})
    except ValidationError as exc:
        names = sorted({f"{ENV_OVERRIDES[str(err['loc'][0])]} (environment)"
                        if err["loc"] and str(err["loc"][0]) in from_env else ".".join(map(str, err["loc"]))
                        for err in exc.errors()})
        raise ValueError(f"serving args: invalid {', '.join(names)}: {exc}") from None


def build_app(args: dict) -> serve.Application:
    """Typed builder (STYLE §9): ``args`` (+ ``SFO_SERVE_*`` env) -> ``AppArgs`` -> Ingress bound to FluxGenerator.

    A relative ``adapters`` path that exists here is made absolute, so replicas (whose working
    directory may differ) find it. ``gpus_per_replica`` > 0 gives each FluxGenerator replica that many GPUs.
    """
    parsed = resolve_args(args)
    limits = parsed.limits()  # validates the limits here, before any replica starts
    adapters = Path(parsed.adapters)
    if not adapters.is_absolute() and adapters.exists():
        adapters = adapters.resolve()
    deployment = FluxGenerator
    if parsed.gpus_per_replica > 0:
        deployment = FluxGenerator.options(
            ray_actor_options={**GENERATOR_ACTOR_OPTIONS, "num_gpus": parsed.gpus_per_replica})
    generator = deployment.bind(parsed.model, str(adapters), parsed.device, parsed.dtype, parsed.max_batch_images,
                                parsed.fuse_adapters)
    return Ingress.bind(generator, limits, parsed.request_timeout_s)
