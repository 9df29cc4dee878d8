"""Ray Serve application: a thin FastAPI ingress in front of one FLUX + "ref"/"sfo" LoRA deployment.

    serve run serving/serve_config.yaml                  # laptop: tiny model, make demo's adapters
    serve run serving.app:build_app model=tiny adapters=runs/train/sfo/adapters
    SFO_SERVE_MODEL=/models/FLUX.1-dev SFO_SERVE_GPUS_PER_REPLICA=1 serve run serving/serve_config.yaml

Environment variables, when set (non-empty), override ``args`` in ``build_app`` (so one config file,
embedded verbatim by the RayService, serves the tiny model on a laptop and FLUX.1-dev on a GPU cluster):
    SFO_SERVE_MODEL             args.model
    SFO_SERVE_ADAPTERS          args.adapters
    SFO_SERVE_GPUS_PER_REPLICA  args.gpus_per_replica: GPUs per FluxGenerator replica (> 0 adds num_gpus)
    SFO_SERVE_MAX_REPLICAS      args.max_replicas: FluxGenerator autoscaling's upper bound (the cluster's GPUs)
    SFO_SERVE_MIN_REPLICAS      args.min_replicas: FluxGenerator replicas kept warm (default 1)
    SFO_SERVE_TOKEN             (no arg) when set, /v1/* need "Authorization: Bearer <token>" (401 otherwise)
They are read where ``build_app`` runs (a Ray node), so set them on every node of the cluster.

Routes (OpenAPI at /docs and /openapi.json):
    POST /v1/generate   JSON {"prompt", "image" (base64), "steps", "guidance", "seed", "width", "height",
                        "num_images", "adapter": "sfo"|"ref", "adapter_set"} or the same as multipart/form-data with
                        ``image`` as a file part. Answers ``image/png`` for one image; with
                        ``Accept: application/json`` answers {"images": [base64 PNG...], "params": {...}}.
                        num_images > 1 without a JSON Accept is 406 (a PNG holds one image).
    GET  /v1/models     base model, adapters and their sha256 (sfo.adapters.adapter_fingerprint), adapter sets
    GET  /healthz       200 when a model replica runs, else 503 with the reason (never needs the token)

Bad input is a 4xx whose JSON body names the field ({"error", "field"}). Each request gets a deadline from
its work (``serving.schema.Deadlines``: base + safety x seconds_per_unit x steps x passes x images x
megapixels); one whose deadline would pass ``request_timeout_s`` is refused (422, field "work"), one that
runs past its deadline is a 504 and its sampling stops between steps, as it does when its client
disconnects. The model deployment autoscales; each replica groups waiting requests by size/steps/adapters
(``serving.scheduler.GroupQueue``) and answers each request when its own group is done. Adapter sets other
than "default" are loaded per replica on demand (``serve.multiplexed``, LRU) and requests are routed to
replicas that hold theirs.
"""

# no `from __future__ import annotations`: Serve's ingress wrapper needs real annotations (Request)

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.args import ENV_OVERRIDES, AppArgs, absolute_folder, resolve_args  # noqa: F401 - re-exported
from serving.bodies import parse_json_body, parse_multipart
from serving.replica import GENERATOR_ACTOR_OPTIONS, GENERATOR_AUTOSCALING, AdapterSetUnavailable, FluxGenerator
from serving.scheduler import DeadlineExceeded
from serving.schema import (
    ADAPTER_SET_NAME,
    DEFAULT_ADAPTER_SET,
    GenerateParams,
    GenerateRequest,
    Job,
    Limits,
    RequestError,
    job_from_form,
    job_from_json,
)

logger = logging.getLogger("ray.serve")

# The ingress waits this much past a request's deadline for the replica's own 504 (which stops the group
# between steps) before it cancels the call itself; either way the client gets a 504.
DEADLINE_GRACE_S = 1.0
# When set (non-empty) where build_app runs, /v1/* need "Authorization: Bearer <token>" (401 otherwise);
# /healthz, /docs and /openapi.json stay open. Only its sha256 travels in the application (not the token).
TOKEN_ENV = "SFO_SERVE_TOKEN"


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
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


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
    adapters: dict[str, dict[str, Any]]  # of the default adapter set
    adapter_sets: list[str]  # "default" first; a request's adapter_set picks one


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    """Parses and validates requests, checks the bearer token, gives each request its deadline
    (``Limits.deadlines``), calls the generator, shapes the response; no model here.

    Args:
        generator: the FluxGenerator deployment.
        limits: what a request may ask for, and its deadline rule.
        adapter_sets: the names of the multiplexed adapter sets (besides ``DEFAULT_ADAPTER_SET``).
        token_sha256: hex sha256 of the bearer token /v1/* require; None = open.
    """

    def __init__(self, generator: DeploymentHandle, limits: Limits, adapter_sets: tuple[str, ...] = (),
                 token_sha256: str | None = None):
        self.generator = generator
        self.limits = limits
        self.adapter_sets = (DEFAULT_ADAPTER_SET, *sorted(adapter_sets))
        self.token_sha256 = token_sha256

    def _authorize(self, request: Request) -> None:
        """401 unless the request carries ``Authorization: Bearer <token>`` (when a token is configured)."""
        if self.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.token_sha256):
            raise RequestError("authorization", "missing or wrong bearer token (Authorization: Bearer <token>)", 401)

    @app.get("/healthz", responses={503: {"description": "the model deployment is not ready, or failed: "
                                                           "{status, reason}"}})
    async def healthz(self) -> Response:
        """200 only when a model replica runs (so a health check means the app can generate), else 503
        with the model deployment's state and Serve's message (e.g. why its replicas failed to start)."""
        state, reason = await asyncio.to_thread(generator_state)  # serve.status() blocks on the controller
        if state != "ok":
            return JSONResponse({"status": state, "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", response_model=ModelsInfo, responses={401: {"description": "bearer token missing/wrong"}})
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        info = await self._call(self.generator.info.remote(), self.limits.deadlines.base_s)
        return {**info, "adapter_sets": list(self.adapter_sets)}

    @app.post(
        "/v1/generate",
        openapi_extra={"requestBody": _GENERATE_BODY},
        responses={200: {"content": {"image/png": {}, "application/json": {}},
                         "description": "one PNG, or {images: [base64 PNG], params} with Accept: application/json"},
                   406: {"description": "num_images > 1 without Accept: application/json"},
                   401: {"description": "bearer token missing or wrong (when the server has one)"},
                   413: {"description": "image or body too large"},
                   422: {"description": "a field is invalid, or the request's work exceeds what the timeout holds"},
                   504: {"description": "the request's deadline (from its work) passed; its sampling was stopped"}},
    )
    async def generate(self, request: Request) -> Response:
        start = time.monotonic()
        self._authorize(request)
        job = await self._parse(request)
        wants_json = "application/json" in request.headers.get("accept", "")
        if len(job.seeds) > 1 and not wants_json:
            raise RequestError("num_images", "more than one image needs 'Accept: application/json' "
                                             "(an image/png response holds one image)", 406)
        if job.adapter_set not in self.adapter_sets:
            raise RequestError("adapter_set", f"unknown {job.adapter_set!r}; known: {', '.join(self.adapter_sets)}")
        handle = self.generator
        if job.adapter_set != DEFAULT_ADAPTER_SET:  # routed to a replica that already holds the set, if any
            handle = handle.options(multiplexed_model_id=job.adapter_set)
        deadline_s = self.limits.deadlines.deadline_s(job.work)
        left = max(deadline_s - (time.monotonic() - start), 0.0)
        images = await self._call(handle.generate.remote(job, left), left, deadline_s)
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

    async def _call(self, response, timeout_s: float, deadline_s: float | None = None) -> Any:
        """``response``'s result within ``timeout_s``; past it, or when this request is cancelled (the
        HTTP client disconnected), the generator's call is cancelled too (its group stops between steps)."""
        async def awaited() -> Any:  # wait_for needs a coroutine; a DeploymentResponse is only awaitable
            return await response

        deadline_s = timeout_s if deadline_s is None else deadline_s
        try:
            return await asyncio.wait_for(awaited(), timeout=timeout_s + DEADLINE_GRACE_S)
        except (asyncio.TimeoutError, DeadlineExceeded):
            response.cancel()
            raise RequestError("request", f"deadline of {deadline_s:.1f} s passed (from the request's work: "
                                          "steps x passes x images x megapixels); sampling was stopped", 504) from None
        except asyncio.CancelledError:
            response.cancel()  # the client is gone: free the replica
            raise
        except AdapterSetUnavailable as exc:  # Ray's task error is also an instance of its cause's class
            cause = getattr(exc, "cause", None) or exc
            raise RequestError("adapter_set", str(cause.args[0]) if cause.args else str(cause), 503) from None


def build_app(args: dict) -> serve.Application:
    """Typed builder (STYLE §9): ``args`` (+ ``SFO_SERVE_*`` env) -> ``AppArgs`` -> Ingress bound to FluxGenerator.

    Relative adapter folders that exist here are made absolute, so replicas (whose working directory may
    differ) find them; ``s3://`` / ``gs://`` adapter folders pass as they are (each replica downloads them). ``gpus_per_replica`` > 0 gives each FluxGenerator replica that many GPUs;
    ``min_replicas`` / ``max_replicas`` bound its autoscaling. ``SFO_SERVE_TOKEN`` (read here) turns the bearer check on.
    """
    parsed = resolve_args(args)
    limits = parsed.limits()  # validates the limits and the deadline rule here, before any replica starts
    for name, folder in parsed.adapter_sets.items():
        if name == DEFAULT_ADAPTER_SET or not ADAPTER_SET_NAME.match(name):
            raise ValueError(f"serving args: adapter_sets: {name!r} is not a usable name (letters, digits, '_.-'; "
                             f"not {DEFAULT_ADAPTER_SET!r})")
    adapter_sets = {name: absolute_folder(folder, f"adapter_sets.{name}") for name, folder in parsed.adapter_sets.items()}
    options: dict[str, Any] = {"autoscaling_config": {**GENERATOR_AUTOSCALING, "min_replicas": parsed.min_replicas,
                                                      "max_replicas": parsed.max_replicas}}
    if parsed.gpus_per_replica > 0:
        options["ray_actor_options"] = {**GENERATOR_ACTOR_OPTIONS, "num_gpus": parsed.gpus_per_replica}
    generator = FluxGenerator.options(**options).bind(
        parsed.model, absolute_folder(parsed.adapters, "adapters"), parsed.device, parsed.dtype, parsed.max_batch_images,
        parsed.fuse_adapters, adapter_sets, parsed.max_adapter_sets_per_replica, parsed.seconds_per_unit)
    token = os.environ.get(TOKEN_ENV, "").strip()
    token_sha256 = hashlib.sha256(token.encode()).hexdigest() if token else None
    return Ingress.bind(generator, limits, tuple(adapter_sets), token_sha256)
