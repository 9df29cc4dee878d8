"""Config sections shared by the jobs, and helpers every job uses to start."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

# The cores this process may run on (its CPU affinity): the main job and the reproduction size their workers by it.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_dtype(dtype: str | None, section: str) -> None:
    """Raises ``ValueError("<section>.dtype: ...")`` for a dtype name ``sfo.models`` does not know."""
    if dtype is None:
        return
    from sfo.models import parse_dtype  # torch + diffusers: only when a dtype is given

    try:
        parse_dtype(dtype)
    except ValueError as exc:
        raise ValueError(f"{section}.{exc}") from None


@dataclass
class ModelConfig:
    """Which FLUX to load and which adapters go on it."""

    source: str = "tiny"  # "tiny" (embedded) or the path of a local FLUX.1-dev folder (diffusers layout)
    dtype: str | None = None  # bf16 | fp32; default bf16 on GPU, fp32 on CPU
    ref_adapter: str | None = None  # folder holding the "ref" LoRA (the sft job's output)
    # Sampling jobs (cdns, evaluate) fold the all-scoped adapters into a copy of the base weights while they
    # sample (sfo.adapters.fused_adapters: 1.2x faster on the world model). The copy is the adapted layers'
    # size, ~16 GB for FLUX.1-dev in bf16: set false on a GPU without that much free memory.
    fuse_adapters: bool = True

    def __post_init__(self) -> None:
        check_dtype(self.dtype, "model")
        if not isinstance(self.fuse_adapters, bool):
            raise ValueError(f"model.fuse_adapters: must be true or false, got {self.fuse_adapters!r}")

    def adapter_context(self):
        """``sfo.adapters.fused_adapters`` or ``use_adapters``, as ``fuse_adapters`` says."""
        from sfo import adapters

        return adapters.fused_adapters if self.fuse_adapters else adapters.use_adapters


@dataclass
class ScalingConfig:
    """How much of the cluster a job asks for. On a 2-core laptop keep CPU shares fractional:
    whole CPUs for every worker starve Ray Data's read/write tasks and the run hangs."""

    num_workers: int = 1  # Ray Train workers, or Ray Data actors for generation jobs
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 1.0  # used only with use_gpu
    # torch's intra-op threads in each worker / actor; null = what Ray and torch choose. Measured on 2 cores
    # (make bench, 2026-11-30): the default already runs cdns at the plain loop's speed, and 2 threads beside
    # Ray Data's tasks were slower (0.68x); for machines where a worker's threads need pinning.
    torch_threads: int | None = None
    # Per-GPU memory (GiB) the job's memory plan is checked against before anything loads (sfo.memory). null:
    # the driver's own GPU when it has one; a driver without a GPU (joining a cluster) then skips the check.
    gpu_memory_gib: float | None = None

    def __post_init__(self) -> None:
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"scaling.torch_threads: must be at least 1 or null (Ray's default), got {self.torch_threads}")
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers: must be at least 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"scaling.cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ValueError(f"scaling.gpus_per_worker: must be > 0 with use_gpu, got {self.gpus_per_worker}")
        if self.gpu_memory_gib is not None and not self.gpu_memory_gib > 0:
            raise ValueError(f"scaling.gpu_memory_gib: must be > 0 or null (the driver's GPU), got {self.gpu_memory_gib}")


def use_torch_threads(scaling: ScalingConfig) -> None:
    """Applies ``scaling.torch_threads`` in this process (a worker or actor), when set."""
    if scaling.torch_threads is not None:
        import torch

        torch.set_num_threads(scaling.torch_threads)


# The GPU switch and the memory plan (issue 25). Transformers above this many parameters train with gradient
# checkpointing on GPUs: FLUX.1-dev (11.9B) at 512 px needs ~136 GiB for an SFO step of batch 4 without it
# (sfo.memory, measured OOM on an H200), ~35 GiB with it; the tiny and shapes models (< 10M) never need it.
CHECKPOINTING_PARAMETERS = 1_000_000_000
GPU_DTYPE = "bf16"  # FLUX's training precision; DeepSpeed's bf16 mode follows the model's dtype
FOLDER_TEXT_TOKENS = 512  # T5 tokens per prompt of a FLUX.1-dev folder (sfo.models.load_flux)
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs of a model, read without loading it (``model_shape``)."""

    config: dict  # the transformer's config.json (FluxTransformer2DModel's arguments)
    pixels_per_token: int  # pixels per token side: VAE compression x 2x2 packing (16 for FLUX)
    text_tokens: int  # T5 tokens per prompt

    @property
    def parameters(self) -> int:
        from sfo.memory import transformer_parameters

        return transformer_parameters(self.config)

    @property
    def large(self) -> bool:
        """Above ``CHECKPOINTING_PARAMETERS``: gradient checkpointing on when training on GPUs."""
        return self.parameters > CHECKPOINTING_PARAMETERS


def model_shape(source: str) -> ModelShape:
    """The transformer config, token size and text length of ``model.source``: the embedded presets' sizes
    (``sfo.models.TinyFluxConfig``, ``sfo.shapes.model.ShapesFluxConfig``, as ``sfo.components.build_transformer``
    builds them), or a folder's ``transformer/config.json`` and ``vae/config.json`` (no weights read)."""
    from sfo.components import transformer_config
    from sfo.memory import read_transformer_config
    from sfo.models import SHAPES, TINY, TinyFluxConfig

    if source in (TINY, SHAPES):
        if source == TINY:
            sizes, in_channels, guidance = TinyFluxConfig(), 64, True
            pixels = 2 * 2 ** (len(sizes.vae_channels) - 1)  # 8x VAE, 2x2 packing
        else:
            from sfo.shapes.model import ShapesFluxConfig

            sizes, guidance = ShapesFluxConfig(), False
            in_channels, pixels = 3 * sizes.codec_factor**2 * 4, 2 * sizes.codec_factor  # pixel codec, 2x2 packing
        config = transformer_config(sizes, in_channels=in_channels, guidance_embeds=guidance)
        return ModelShape(config, pixels, sizes.text_max_length)
    folder = Path(source).expanduser()
    files = {name: folder / name / "config.json" for name in ("transformer", "vae")}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"model.source: {str(path)!r} does not exist; pass a FLUX folder in the diffusers "
                                    "layout (transformer/config.json, vae/config.json, ...)")
    vae = json.loads(files["vae"].read_text())
    return ModelShape(read_transformer_config(files["transformer"]), 2 * 2 ** (len(vae["block_out_channels"]) - 1),
                      FOLDER_TEXT_TOKENS)


def plan_dtype(dtype: str | None, use_gpu: bool) -> str:
    """``model.dtype`` as ``sfo.memory`` names it; null = what ``sfo.models.load_flux`` picks (bf16 on GPU)."""
    if dtype is None:
        return GPU_DTYPE if use_gpu else "fp32"
    from sfo.models import parse_dtype

    return _DTYPE_NAMES[str(parse_dtype(dtype)).removeprefix("torch.")]


def gpu_memory(scaling: ScalingConfig) -> tuple[int | None, str]:
    """(bytes of one GPU the plan is checked against, where that number came from): ``scaling.gpu_memory_gib``,
    else the driver's first GPU, else (None, why not)."""
    from sfo.memory import GIB

    if scaling.gpu_memory_gib is not None:
        return int(scaling.gpu_memory_gib * GIB), f"scaling.gpu_memory_gib={scaling.gpu_memory_gib:g}"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"this driver's {props.name}"
    return None, ("not checked: this driver has no GPU to read the workers' memory from; set "
                  "scaling.gpu_memory_gib (e.g. 80) to check the plan before the workers load the model")


def check_memory_plan(plan, scaling: ScalingConfig, shape: ModelShape, job: str) -> None:
    """Prints ``plan`` (``sfo.memory.format_plan``) once and, on GPUs, refuses one above a GPU's memory.

    Raises:
        ConfigError: the plan needs more than a GPU holds (``sfo.memory.check_plan``'s message, naming the knob).
    """
    from pipelines.config import ConfigError
    from sfo.memory import check_plan, format_plan

    device, source = gpu_memory(scaling) if scaling.use_gpu else (None, "")
    lines = [format_plan(plan, device)]
    if not scaling.use_gpu:
        lines.append(f"  (CPU run: not checked; {shape.parameters / 1e9:.2g}B transformer parameters)")
        if shape.large:
            lines.append(f"  warning: a {shape.parameters / 1e9:.1f}B-parameter transformer on the CPU: set "
                         "scaling.use_gpu=true (python -m pipelines.main: --gpus N)")
    elif device is None:
        lines.append(f"  {source}")
    print(f"[{job}] " + "\n".join(lines), flush=True)
    if device is not None:
        try:
            check_plan(plan, device)
        except ValueError as exc:
            raise ConfigError(f"{exc} (device: {source})") from None
        print(f"[{job}] memory plan fits {source} ({device / 2**30:.1f} GiB)", flush=True)


def check_cluster_gpus(scaling: ScalingConfig, job: str) -> None:
    """With ``scaling.use_gpu``, once Ray is up: a fresh local Ray without a GPU is refused at once (Ray would
    wait for one forever); a joined cluster without one now gets a line (an autoscaling cluster adds GPU nodes
    when the job asks for them)."""
    import ray

    from pipelines.config import ConfigError

    if not scaling.use_gpu:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus >= scaling.gpus_per_worker:
        return
    message = f"scaling.use_gpu: true, but the Ray cluster has {gpus:g} GPU(s)"
    if ray_address() == "local":
        raise ConfigError(f"{message} (a fresh local Ray on this machine); run on a machine with GPUs, or set "
                          "scaling.use_gpu=false (python -m pipelines.main: --cpu)")
    print(f"[{job}] warning: {message} now; the job waits until one joins (an autoscaling cluster adds GPU nodes "
          "on demand)", flush=True)


def distinct_rows(source, columns: list[str]) -> set[tuple]:
    """The distinct value tuples of ``columns`` over a Parquet file, folder or list of files (what a cache or
    stored scores were made for: one tuple when they all fit one job)."""
    import pyarrow as pa

    from cluster import storage

    files = [source] if isinstance(source, (str, Path)) else list(source)
    table = pa.concat_tables([storage.dataset(f).to_table(columns=columns) for f in files])
    return set(zip(*(table[c].to_pylist() for c in columns)))


def score_fingerprint(model_source: str, ref_adapter: str | Path, size: int, sampling) -> str:
    """What stored reference errors (``sfo.records.SCORE_FIELDS``) hold for: the model, the "ref" adapter's
    weight file (its bytes), the image size and the timestep scheme (``sfo.timesteps.TimestepSampling``)."""
    import hashlib

    from sfo.adapters import LORA_WEIGHTS
    from sfo.models import model_identity

    from cluster import storage

    adapter = hashlib.sha256(storage.read_bytes(storage.join(ref_adapter, LORA_WEIGHTS))).hexdigest()
    text = f"{model_identity(model_source)}|{adapter}|{size}|{sampling.scheme}|{sampling.mean:g}|{sampling.std:g}"
    return hashlib.sha256(text.encode()).hexdigest()


def check_image_guidance(value: float, section: str) -> None:
    """Raises ``ValueError("<section>.image_guidance: ...")`` unless ``value`` is finite and >= 0 (1 = off)."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{section}.image_guidance: must be a finite number >= 0 (1 = off), got {value}")


def ray_data_progress(stream=None) -> bool:
    """Ray Data's progress bars on when ``stream`` (default stdout) is a terminal, off otherwise.

    Off a terminal (CI, ``ray job submit`` logs, a file) each bar redraw becomes a log line and floods the
    log; the jobs print their own one-line progress instead. Returns whether the bars are on.
    """
    from ray.data import DataContext

    on = bool(getattr(stream or sys.stdout, "isatty", lambda: False)())
    context = DataContext.get_current()
    context.enable_progress_bars = on
    context.enable_operator_progress_bars = on
    return on


_address: str | None = None  # set by a job's --address (pipelines.config.parse_job_args)
REACHABLE_TIMEOUT_S = 3.0


def set_ray_address(address: str | None) -> None:
    global _address
    _address = address


def ray_address() -> str:
    """The cluster a job joins: ``--address``, else ``RAY_ADDRESS`` (set by ``ray job submit``), else
    ``"local"`` (a fresh Ray of its own). Never Ray's own fallback, which joins whatever cluster
    ``/tmp/ray/ray_current_cluster`` names, dead or somebody else's."""
    return _address or os.environ.get("RAY_ADDRESS") or "local"


def check_reachable(address: str, timeout_s: float = REACHABLE_TIMEOUT_S) -> None:
    """Raises ``ConfigError`` naming ``address`` when nothing answers there within ``timeout_s``."""
    from pipelines.config import ConfigError

    host_port = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected host:port, ray://host:port, http://host:port or 'local'")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"--address {address!r}: nothing answers at {host or '127.0.0.1'}:{port} ({exc}); start "
                          "that cluster, or leave --address and RAY_ADDRESS unset for a fresh local Ray") from None


@contextlib.contextmanager
def _environ(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


LOCAL_START_TRIES = 3  # a free port can be taken between choosing it and Ray binding it


def own_cluster_env(gcs_address: str) -> dict:
    """The job-wide ``runtime_env`` that makes every process of a job find the cluster it runs on.

    Ray Train V2's PlacementGroupCleaner (one per run) asks the state API, with no address, whether its
    controller lives. With no address, the state client takes ``RAY_ADDRESS``, else the host's newest
    ``ray start`` cluster, else any GCS it finds: with a second Ray on the host it asks the wrong cluster,
    which answers "no such actor", and the cleaner removes the live run's placement group, killing its
    workers (README, Notes for Ray). Every task and actor of a job inherits the job's ``env_vars``, the
    cleaner included; so ``RAY_ADDRESS`` set to the job's own GCS address there keeps its questions home.

    Returns ``{}`` when the job's submitter already set ``RAY_ADDRESS`` for its workers (Ray refuses two
    values for one variable) or the address is not a GCS ``host:port`` (``auto``, ``ray://``).
    """
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    if gcs_address == "auto" or "://" in gcs_address:
        return {}
    submitted = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    if "RAY_ADDRESS" in ((submitted.get("runtime_env") or {}).get("env_vars") or {}):
        return {}
    return {"env_vars": {"RAY_ADDRESS": gcs_address}}


def start_local_ray(num_cpus: int | None = None) -> str:
    """Starts a fresh Ray of this process's own (never joins another) whose processes find only it.

    The GCS and the dashboard get free ports chosen here, so the GCS address is known before the start and
    goes into the job's ``runtime_env`` (``own_cluster_env``). The dashboard is on (a free port, loopback
    only) because Ray Train's cleaner asks its state API: without one, Ray's state client falls back to
    ``127.0.0.1:8265``, which may be another cluster's dashboard. Returns the GCS address.

    Raises:
        RuntimeError: Ray started on another GCS address than the one chosen (a Ray version that no longer
            reads ``RAY_GCS_SERVER_PORT``): the pin would point elsewhere, so the job does not run.
    """
    import ray

    from cluster.local import free_port

    for attempt in range(LOCAL_START_TRIES):
        gcs = f"{ray.util.get_node_ip_address()}:{free_port()}"
        try:
            with _environ(RAY_GCS_SERVER_PORT=gcs.rsplit(":", 1)[1]):  # read by the head node as it starts
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                         dashboard_port=free_port(), runtime_env=own_cluster_env(gcs))
        except (ConnectionError, RuntimeError):
            if attempt + 1 == LOCAL_START_TRIES:
                raise
            continue
        started = ray.get_runtime_context().gcs_address
        if started != gcs:
            ray.shutdown()
            raise RuntimeError(f"the local Ray started at {started}, not at the chosen {gcs}: this Ray version "
                               "ignores RAY_GCS_SERVER_PORT, so its processes could not be pinned to it")
        return gcs
    raise AssertionError("unreachable")


def init_ray(num_cpus: int | None = None) -> None:
    """Connects this process to ``ray_address()`` once (checked reachable first, so a dead address fails in
    seconds), with every process of the job pinned to that cluster (``own_cluster_env``).

    Args:
        num_cpus: logical CPUs of a fresh local Ray (ignored when joining a cluster).
    """
    import ray

    if ray.is_initialized():
        return
    address = ray_address()
    if address == "local":
        start_local_ray(num_cpus)
        return
    if address != "auto":
        check_reachable(address)
    ray.init(address=address, runtime_env=own_cluster_env(address) or None)
