"""The Serve app's typed arguments: ``AppArgs`` (the ``args:`` block of serve_config.yaml), the ``SFO_SERVE_*``
environment overrides on top (``resolve_args``), and adapter folders made usable on every replica."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cluster import storage
from serving.schema import (
    DEADLINE_BASE_S, DEADLINE_SAFETY, DEFAULT_ADAPTER_SET, REQUEST_TIMEOUT_S, SECONDS_PER_UNIT, Deadlines, Limits,
)

# AppArgs field -> environment variable that overrides it when set and non-empty.
ENV_OVERRIDES = {
    "model": "SFO_SERVE_MODEL",
    "adapters": "SFO_SERVE_ADAPTERS",
    "gpus_per_replica": "SFO_SERVE_GPUS_PER_REPLICA",
    "max_replicas": "SFO_SERVE_MAX_REPLICAS",
    "min_replicas": "SFO_SERVE_MIN_REPLICAS",
}


class AppArgs(BaseModel):
    """``build_app``'s args (the ``args:`` block of serve_config.yaml); unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("tiny", description='"tiny" or a local FLUX.1-dev folder (diffusers layout)')
    adapters: str = Field(description="folder with ref/ and sfo/ (sfo.adapters.save_adapter's layout; a path, "
                                      "s3:// or gs://, downloaded once per replica): "
                                      f"the adapter set {DEFAULT_ADAPTER_SET!r}, loaded on every replica")
    adapter_sets: dict[str, str] = Field(default_factory=dict, description="more adapter sets, name -> folder or URI, "
                                         "loaded on demand per replica with serve.multiplexed (LRU)")
    max_adapter_sets_per_replica: int = Field(2, ge=1, description="adapter_sets a replica holds at once "
                                              "(serve.multiplexed's max_num_models_per_replica)")
    device: str | None = Field(None, description="torch device; default CUDA when available")
    dtype: str | None = Field(None, description="bf16/fp32...; default bf16 on GPU, fp32 on CPU")
    gpus_per_replica: float = Field(0.0, ge=0, allow_inf_nan=False,
                                    description="num_gpus of each FluxGenerator replica; 0 = CPU only")
    max_replicas: int = Field(2, ge=1, description="FluxGenerator autoscaling's max_replicas")
    min_replicas: int = Field(1, ge=1, description="FluxGenerator replicas kept warm (autoscaling's min_replicas): "
                              "each holds a GPU while idle, and spares requests a cold start of minutes")
    request_timeout_s: float = Field(REQUEST_TIMEOUT_S, gt=0, allow_inf_nan=False,
                                     description="the longest deadline a request may have; requests whose work "
                                     "needs more are refused (422 on 'work'); keep http_options.request_timeout_s "
                                     "above it")
    deadline_base_s: float = Field(DEADLINE_BASE_S, gt=0, allow_inf_nan=False,
                                   description="deadline = base + safety x seconds_per_unit x work (serving.schema)")
    seconds_per_unit: float = Field(SECONDS_PER_UNIT, gt=0, allow_inf_nan=False,
                                    description="sampling seconds per step x pass x image x megapixel on this GPU")
    deadline_safety: float = Field(DEADLINE_SAFETY, gt=0, allow_inf_nan=False)
    max_batch_images: int = Field(8, ge=1, description="most images in one sampler call")
    fuse_adapters: bool | None = Field(None, description="fold the adapters into a copy of the weights per sampler "
                                       "call (faster; ~16 GB more on FLUX.1-dev in bf16); false = LoRA layers; "
                                       "default: fold models up to 1B transformer parameters only")
    # The request limits, defaulting to serving.schema.Limits' own.
    max_side: int = Limits.max_side
    max_steps: int = Limits.max_steps
    max_num_images: int = Limits.max_num_images
    max_prompt_chars: int = Limits.max_prompt_chars
    max_image_bytes: int = Limits.max_image_bytes
    max_image_pixels: int = Limits.max_image_pixels
    default_side: int = Limits.default_side
    default_steps: int = Limits.default_steps

    def deadlines(self) -> Deadlines:
        return Deadlines(base_s=self.deadline_base_s, seconds_per_unit=self.seconds_per_unit,
                         safety=self.deadline_safety, request_timeout_s=self.request_timeout_s)

    def limits(self) -> Limits:
        return Limits(max_side=self.max_side, max_steps=self.max_steps, max_num_images=self.max_num_images,
                      max_prompt_chars=self.max_prompt_chars, max_image_bytes=self.max_image_bytes,
                      max_image_pixels=self.max_image_pixels, default_side=self.default_side,
                      default_steps=self.default_steps, deadlines=self.deadlines())


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
        parsed = AppArgs.model_validate({**dict(args), **from_env})
    except ValidationError as exc:
        names = sorted({f"{ENV_OVERRIDES[str(err['loc'][0])]} (environment)"
                        if err["loc"] and str(err["loc"][0]) in from_env else ".".join(map(str, err["loc"]))
                        for err in exc.errors()})
        raise ValueError(f"serving args: invalid {', '.join(names)}: {exc}") from None
    if parsed.min_replicas > parsed.max_replicas:
        raise ValueError(f"serving args: min_replicas ({parsed.min_replicas}) is above max_replicas "
                         f"({parsed.max_replicas}); lower min_replicas (SFO_SERVE_MIN_REPLICAS) or raise max_replicas "
                         "(SFO_SERVE_MAX_REPLICAS)")
    return parsed


def absolute_folder(folder: str, field: str) -> str:
    """A relative path that exists here made absolute (replicas' working directories may differ); an ``s3://`` /
    ``gs://`` URI as given (each replica downloads it); another scheme is refused naming ``field``."""
    storage.check_uri(folder, f"serving args: {field}")
    if storage.is_remote(folder):
        return folder
    path = Path(folder)
    return str(path.resolve()) if not path.is_absolute() and path.exists() else str(path)
