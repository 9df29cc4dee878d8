"""What is deployed: the image, Secrets, volume, models, pod sizing and the five stages, stated once.

``pods.py`` builds the Kubernetes objects from it and ``render.py`` writes them (k8s/README.md).
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serving" / "serve_config.yaml"  # the RayService embeds it verbatim

RAY_VERSION = "2.60.0"  # = pyproject's ray~=2.60.0 and the Dockerfile's RAY_VERSION
CUDA = "cu128"  # = the Dockerfile's CUDA: its base image's CUDA and the PyTorch wheel index it installs torch from
IMAGE_NAME = "sfo-ray"
IMAGE_TAG = f"{RAY_VERSION}-py311-{CUDA}"  # the project image is tagged like its base image (make image)
APP_DIR = "/home/ray/sfo"  # the Dockerfile's WORKDIR: the project inside the image
RAY_UID, RAY_GID = 1000, 100  # the base image's user `ray` (group `users`); the Dockerfile asserts it
AUTH_SECRET = "sfo-ray-auth"  # Secret with key auth_token (k8s/README.md); one token for every cluster
HF_SECRET, HF_SECRET_KEY = "hf-token", "token"  # Hugging Face token (FLUX.1-dev is gated); the weights Job reads it
# Optional Secret: when it exists, the RayService's pods get SFO_SERVE_TOKEN and the HTTP API needs that bearer token.
SERVE_TOKEN_SECRET = "sfo-serve-token"
PVC = "sfo-shared"  # ReadWriteMany: Ray Train's storage_path must be visible from every pod
# GKE's Filestore CSI class (ReadWriteMany, 1 TiB minimum on the basic tier). EKS: an EFS class (often
# named efs-sc); AKS: azurefile-csi. The clouds' *default* classes are single-writer block storage: a
# ReadWriteMany claim on them stays Pending.
DEFAULT_STORAGE_CLASS = "standard-rwx"
# mount path -> sub-folder of the shared volume (read_only)
MOUNTS = {"/models": ("models", True), "/data": ("data", False), "/runs": ("runs", False)}
MODELS = "/models"  # always a local folder in the pods: the volume's models/, or a pod-local copy (object store)
WEIGHTS_JOB = "sfo-weights"
WEIGHTS_MARKER = ".sfo-weights-complete"  # written at the models root by the weights Job after every download
HOUR = 3600

# What the weights Job downloads: repo -> (folder under /models, allow_patterns). FLUX.1-dev: the diffusers
# folders only; the repository also holds flux1-dev.safetensors (the 23.8 GB single-file checkpoint) and
# ae.safetensors, which the diffusers layout does not use. Patterns match as huggingface_hub matches them
# (fnmatch, `*` crosses "/"). The evaluation encoders: safetensors + configs + tokenizer files.
WEIGHTS = {
    "black-forest-labs/FLUX.1-dev": ("FLUX.1-dev", ["model_index.json", "scheduler/*", "text_encoder/*",
                                                    "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*",
                                                    "transformer/*", "vae/*"]),
    "facebook/dino-vits16": ("dino-vits16", ["*.json", "model.safetensors", "pytorch_model.bin"]),
    "openai/clip-vit-large-patch14": ("clip-vit-large-patch14", ["*.json", "*.txt", "model.safetensors"]),
}
FLUX = f"{MODELS}/{WEIGHTS['black-forest-labs/FLUX.1-dev'][0]}"

# --- pod sizing: one rule, per GPU ---------------------------------------------------------------
GB, GIB = 10**9, 2**30
# Every GPU worker (a Ray Train worker, a Ray Data actor, a Serve replica) loads its own FLUX.1-dev pipeline
# through host memory (FluxPipeline.from_pretrained on the CPU, then .to(device)); a pod's workers start
# together, so their loads overlap. Sizes in GB of the bf16 weights (parameters x 2 bytes):
FLUX_HOST_GB = {
    "transformer": 23.8,  # 11.9B parameters
    "text_encoder_2": 9.5,  # T5-XXL encoder, 4.76B
    "text_encoder": 0.25,  # CLIP-L text model, 123M
    "vae": 0.17,  # 84M
}
# The worker process besides the weights: torch + CUDA host allocations (~3 GB), DeepSpeed's pinned buffers,
# Ray Data batches in flight, the adapters, the evaluation encoders. An allowance, not a measurement on FLUX.
WORKER_OVERHEAD_GB = 16
MEMORY_PER_GPU_GI = math.ceil((sum(FLUX_HOST_GB.values()) + WORKER_OVERHEAD_GB) * GB / GIB)  # 47 Gi
# /dev/shm per GPU: Ray's object store (Ray Data blocks of images, reported checkpoints) and NCCL's
# shared-memory transport between a pod's GPUs (NCCL_SHM_GI of it). The container default (64 MiB) breaks both.
SHM_PER_GPU_GI = 8
NCCL_SHM_GI = 1  # per GPU, left out of Ray's object store
OBJECT_STORE_FILL = 0.9  # of the rest: Ray falls back to /tmp when /dev/shm has less free space than it asks
POD_BASE_GI = 6  # raylet, dashboard agent, runtime-env agent, log monitor: every Ray pod
# A memory-backed emptyDir counts against the container's memory limit, so pod memory = work + shm + base.
HEAD_WORK_GI, HEAD_SHM_GI, HEAD_CPUS = 10, 4, 4  # drivers, the Train / Serve controllers and the HTTP proxy
CPU_POD_WORK_GI, CPU_POD_SHM_GI, CPU_POD_CPUS = 24, 8, 8  # prepare: Ray Data over images, no model
MODELS_DISK_GI = 48  # object-store storage: a pod-local copy of /models (FLUX.1-dev 34 GB + encoders 2 GB)
CONFIGS_DISK_GI = 1  # ... and on a head, the models' configs and tokenizers only (what the drivers read)
# Files the head's copy leaves out: the weights (no driver loads a model; they check its configs)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".gguf")


def pod_memory_gi(gpus: int) -> int:
    """Memory limit of a pod with ``gpus`` GPU workers (one per GPU): FLUX.1-dev through host memory once per
    worker plus the worker's overhead (MEMORY_PER_GPU_GI), its share of /dev/shm, and Ray's own processes."""
    return gpus * (MEMORY_PER_GPU_GI + SHM_PER_GPU_GI) + POD_BASE_GI


def shm_gi(gpus: int) -> int:
    return gpus * SHM_PER_GPU_GI


def object_store_bytes(shm: int, gpus: int = 0) -> str:
    """Ray's object store, inside /dev/shm: without it Ray takes 30% of the pod's memory, more than /dev/shm
    holds, and falls back to a disk-backed store under /tmp."""
    return str(int(OBJECT_STORE_FILL * (shm - gpus * NCCL_SHM_GI) * GIB))


# Kubernetes' naming rules, checked here rather than by the API server at `kubectl apply`: a label's name part
# and value, 63 characters at most, alphanumeric at both ends; a Secret's name and a label key's prefix are DNS
# subdomains (lowercase).
LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _label_key(key: str) -> bool:
    """``name`` or ``prefix/name``: cloud.google.com/gke-accelerator, node.kubernetes.io/instance-type."""
    prefix, slash, name = key.rpartition("/")
    return bool(LABEL_NAME.fullmatch(name)) and (not slash or bool(DNS_SUBDOMAIN.fullmatch(prefix)))


@dataclass(frozen=True)
class Target:
    """The cluster the manifests are rendered for (the renderer's command-line parameters)."""

    storage_class: str = DEFAULT_STORAGE_CLASS
    registry: str = ""  # e.g. us-docker.pkg.dev/PROJECT/REPO; empty: the image is loaded onto the nodes (kind)
    gpus_per_pod: int = 1
    storage: str = "pvc"  # "pvc", or an object-store prefix s3://bucket/prefix | gs://bucket/prefix
    service_account: str = ""  # pods' ServiceAccount (bucket access through workload identity / IRSA)
    pvc_size: str = "1Ti"
    image_pull_secrets: tuple[str, ...] = ()  # every pod's imagePullSecrets: a private registry, no node credentials
    gpu_node_selector: tuple[tuple[str, str], ...] = ()  # (label key, value): the GPU pods' nodeSelector

    def __post_init__(self):
        if self.gpus_per_pod < 1:
            raise ValueError(f"--gpus-per-pod: {self.gpus_per_pod}; at least 1")
        if self.storage != "pvc" and not self.storage.startswith(("s3://", "gs://")):
            raise ValueError(f"--storage {self.storage!r}: write pvc, s3://bucket/prefix or gs://bucket/prefix")
        for name in self.image_pull_secrets:
            if not DNS_SUBDOMAIN.fullmatch(name):
                raise ValueError(f"--image-pull-secret {name!r}: write the name of a docker-registry Secret "
                                 "(lowercase letters, digits, '-' and '.')")
        for key, value in self.gpu_node_selector:
            if not _label_key(key) or not (value == "" or LABEL_NAME.fullmatch(value)):
                raise ValueError(f"--gpu-node-selector {key}={value}: write KEY=VALUE, a node label's key and value "
                                 "(e.g. cloud.google.com/gke-accelerator=nvidia-h100-80gb)")
        keys = [key for key, _ in self.gpu_node_selector]
        if len(set(keys)) < len(keys):
            raise ValueError(f"--gpu-node-selector: a key given twice in {keys}")

    @property
    def object_store(self) -> bool:
        return self.storage != "pvc"

    @property
    def image(self) -> str:
        return f"{self.registry.rstrip('/')}/{IMAGE_NAME}:{IMAGE_TAG}" if self.registry else f"{IMAGE_NAME}:{IMAGE_TAG}"

    @property
    def pull_policy(self) -> str:
        # The tag is fixed (it names the Ray and CUDA versions), so a rebuilt image keeps it: from a registry,
        # pull every time (unchanged layers are cached on the node); a loaded image (kind) is never pulled.
        return "Always" if self.registry else "IfNotPresent"

    def root(self, folder: str) -> str:
        """Where the stages read and write ``folder`` (data, runs): the volume's mount, or under the prefix."""
        return f"{self.storage.rstrip('/')}/{folder}" if self.object_store else f"/{folder}"

    @property
    def models_uri(self) -> str:
        return f"{self.storage.rstrip('/')}/models"

    @property
    def cache_dir(self) -> str:
        return "/tmp/sfo-cache" if self.object_store else "/runs/cache"

    @property
    def node_selector(self) -> dict[str, str]:
        return dict(self.gpu_node_selector)


@dataclass(frozen=True)
class Stage:
    """One RayJob: the stage's overrides (beyond scaling) and the cluster it needs.

    With ``workers`` > 0 the job runs with ``scaling.use_gpu=true`` and gets
    ceil(workers x gpus_per_worker / gpus_per_pod) GPU pods; with 0 it gets ``cpu_pods`` CPU pods.
    """

    name: str
    settings: tuple[str, ...]
    deadline_s: int
    workers: int = 0
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 8.0
    gpus_per_pod: int = 1
    cpu_pods: int = 0

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    @property
    def gpu_pods(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_pod) if self.workers else 0

    @property
    def pod_cpus(self) -> int:
        """Whole CPUs per GPU pod: its workers' share plus 2 for Ray Data's read/write tasks."""
        workers_per_pod = self.gpus_per_pod / self.gpus_per_worker
        return math.ceil(workers_per_pod * self.cpus_per_worker) + 2

    @property
    def entrypoint(self) -> str:
        scaling = []
        if self.workers:
            scaling = ["scaling.use_gpu=true", f"scaling.num_workers={self.workers}",
                       f"scaling.gpus_per_worker={self.gpus_per_worker:g}",
                       f"scaling.cpus_per_worker={self.cpus_per_worker:g}"]
        parts = ["python", "-m", f"pipelines.{self.name}", "--config", f"pipelines/configs/{self.name}.yaml",
                 *self.settings, *scaling]
        return shlex.join(parts)


def fit_pods(stage: Stage, gpus_per_pod: int) -> Stage:
    """The stage's GPUs in pods of ``gpus_per_pod`` GPUs (fewer when the stage needs fewer): the workers
    stay what the paper's settings ask (their count sets the effective batch), the pods change."""
    if not stage.workers:
        return stage
    gpus = stage.gpus
    per_pod = min(gpus_per_pod, int(gpus))
    if gpus % per_pod:
        raise ValueError(f"--gpus-per-pod {gpus_per_pod}: stage {stage.name} needs {gpus:g} GPUs, not a whole "
                         f"number of {per_pod}-GPU pods")
    return replace(stage, gpus_per_pod=per_pod)


def paths(t: Target) -> dict[str, str]:
    """The folders the stages pass each other (as cluster/chain.py wires them, rooted at data/ and runs/)."""
    data, runs = t.root("data"), t.root("runs")
    return {"data": data, "runs": runs, "train": f"{runs}/train",
            "ref_adapter": f"{runs}/train/sft/adapters/ref",  # sft's export: output.storage_path / name / adapters/ref
            "sfo_export": f"{runs}/train/sfo/adapters",  # sfo's export: ref/ + sfo/ (what Serve loads)
            "evaluate": f"{runs}/evaluate"}


def stages(t: Target = Target()) -> tuple[Stage, ...]:
    """Cluster values follow the configs' own comments (paper Sec. 4.1, App. D.1/D.2)."""
    p, d = paths(t), t.root("data")
    ref, sfo = p["ref_adapter"], f"{p['sfo_export']}/sfo"
    # The paper's comparison (Table 1): the SFT model ("ref") against SFO ("ref" + "sfo").
    methods = (f"[{{name: sft, ref_adapter: {ref}, active: [ref]}}, "
               f"{{name: sfo, ref_adapter: {ref}, sfo_adapter: {sfo}, active: [ref, sfo]}}]")
    found = (
        # The encoders once, on GPU actors (bf16): sft, cdns and sfo then load the transformer alone.
        Stage("prepare", ("data.source=subjects200k", f"data.input={d}/subjects200k", f"data.output={d}/triplets",
                          "data.size=512", "data.limit=5000", "data.rows_per_file=100", "cache.enabled=true",
                          f"cache.model={FLUX}"), deadline_s=2 * HOUR, workers=4, cpus_per_worker=4),
        Stage("sft", (f"model.source={FLUX}", f"data.path={d}/triplets", "data.size=512", "train.steps=4000",
                      "train.batch_size=1", "train.grad_accum=4", "train.gradient_checkpointing=true",
                      "train.checkpoint_every=100", f"output.storage_path={p['train']}", "output.max_failures=3"),
              deadline_s=48 * HOUR, workers=4),
        Stage("cdns", (f"model.source={FLUX}", f"model.ref_adapter={ref}", f"data.input={d}/triplets",
                       f"data.output={d}/quadruplets", "cdns.size=512", "cdns.batch_size=8"),
              deadline_s=12 * HOUR, workers=4, cpus_per_worker=4),
        Stage("sfo", (f"model.source={FLUX}", f"model.ref_adapter={ref}", f"data.path={d}/quadruplets",
                      f"data.cache_path={d}/triplets",
                      "data.size=512", "train.steps=300", "train.batch_size=1", "train.gradient_checkpointing=true",
                      "train.checkpoint_every=50", f"output.storage_path={p['train']}", "output.max_failures=3"),
              deadline_s=24 * HOUR, workers=4),
        Stage("evaluate", (f"model.source={FLUX}", f"methods={methods}", f"eval.dreambench={d}/dreambench",
                           "eval.size=512", f"eval.dino_encoder={MODELS}/dino-vits16",
                           f"eval.clip_encoder={MODELS}/clip-vit-large-patch14", f"output={p['evaluate']}"),
              deadline_s=12 * HOUR, workers=2, cpus_per_worker=4),
    )
    return tuple(fit_pods(s, t.gpus_per_pod) for s in found)


STAGES = stages()

# The dev overlay: one GPU, smaller pods, fewer steps and samples.
DEV_OVERRIDES = {
    "prepare": ("data.limit=200",),
    "sft": ("train.steps=200", "train.grad_accum=1", "train.checkpoint_every=50"),
    "cdns": (),
    "sfo": ("train.steps=50", "train.checkpoint_every=25"),
    "evaluate": ("eval.subjects=4", "eval.prompts=5"),
}
DEV_CPUS_PER_WORKER = 4.0
DEV_PVC_SIZE = "200Gi"
RAYCLUSTER_MAX_GPUS = 8  # the long-lived cluster's GPU group grows to this many GPUs (one 8-GPU node)
SERVE_MAX_GPUS = 4  # the RayService's GPU group: 1..4 one-GPU pods (one FluxGenerator replica each)


def dev_stage(stage: Stage) -> Stage:
    settings = tuple(s for s in stage.settings if s.split("=")[0] not in {o.split("=")[0] for o in DEV_OVERRIDES[stage.name]})
    changed = replace(stage, settings=settings + DEV_OVERRIDES[stage.name])
    if stage.workers:
        changed = replace(changed, workers=1, gpus_per_pod=1, cpus_per_worker=DEV_CPUS_PER_WORKER)
    return changed

