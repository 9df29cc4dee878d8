"""Renders the KubeRay manifests under k8s/ from the one description in this file.

    python k8s/render.py            # (re)writes k8s/base/*.yaml and k8s/overlays/dev/*.yaml
    python k8s/render.py --check    # exits 1, naming the files, when the committed ones differ

Why generated: five RayJobs share the image, the volumes, the auth settings and the runtime env,
each job's GPU worker group must match the GPUs its entrypoint asks Ray for (workers x
gpus_per_worker), and the RayService must embed ``serving/serve_config.yaml`` verbatim. Written by
hand these drift; here each number is stated once. ``tests/k8s/test_manifests.py`` checks the
output against KubeRay's CRD schemas and against the jobs' own configs, independently of this file.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SERVE_CONFIG = ROOT / "serving" / "serve_config.yaml"

RAY_VERSION = "2.60.0"  # = pyproject's ray~=2.60.0 and the Dockerfile's base image
IMAGE_TAG = f"{RAY_VERSION}-py311-gpu"  # the project image is tagged like its base image
IMAGE = f"sfo-ray:{IMAGE_TAG}"  # built from ./Dockerfile; overlays rename it with kustomize `images:`
APP_DIR = "/home/ray/sfo"  # the Dockerfile's WORKDIR: the project inside the image
AUTH_SECRET = "sfo-ray-auth"  # Secret with key auth_token (k8s/README.md); one token for every cluster
PVC = "sfo-shared"  # ReadWriteMany: Ray Train's storage_path must be visible from every pod
# mount path -> sub-folder of the shared volume (read_only)
MOUNTS = {"/models": ("models", True), "/data": ("data", False), "/runs": ("runs", False)}
FLUX = "/models/FLUX.1-dev"
REF_ADAPTER = "/runs/train/sft/adapters/ref"  # sft's export: output.storage_path / output.name / adapters/ref
SFO_EXPORT = "/runs/train/sfo/adapters"  # sfo's export (cluster/chain.py: <runs>/train/sfo/adapters): ref/ + sfo/
SFO_ADAPTER = f"{SFO_EXPORT}/sfo"
# The RayService embeds serving/serve_config.yaml verbatim (laptop args); these override its args on the
# cluster (serving/app.py ENV_OVERRIDES): FLUX.1-dev, the sfo job's export, one GPU per FluxGenerator replica.
SERVE_ENV = {"SFO_SERVE_MODEL": FLUX, "SFO_SERVE_ADAPTERS": SFO_EXPORT, "SFO_SERVE_GPUS_PER_REPLICA": "1"}
# The paper's comparison (Table 1): the SFT model ("ref") against SFO ("ref" + "sfo").
EVAL_METHODS = (f"[{{name: sft, ref_adapter: {REF_ADAPTER}, active: [ref]}}, "
                f"{{name: sfo, ref_adapter: {REF_ADAPTER}, sfo_adapter: {SFO_ADAPTER}, active: [ref, sfo]}}]")
SHM_GI = 16  # /dev/shm for Ray's object store and NCCL; the container default (64 MiB) is too small
HEAD = {"cpu": "4", "memory": "16Gi"}
HOUR = 3600


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
    pod_memory: str = "96Gi"  # FLUX.1-dev in bf16 is ~34 GB of weights; loading peaks above that
    cpu_pods: int = 0
    cpu_pod: dict = field(default_factory=lambda: {"cpu": "8", "memory": "32Gi"})

    @property
    def gpu_pods(self) -> int:
        return math.ceil(self.workers * self.gpus_per_worker / self.gpus_per_pod) if self.workers else 0

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


# Cluster values follow the configs' own comments (paper Sec. 4.1, App. D.1/D.2).
STAGES = (
    Stage("prepare", ("data.source=subjects200k", "data.input=/data/subjects200k", "data.output=/data/triplets",
                      "data.size=512", "data.limit=5000"), deadline_s=2 * HOUR, cpu_pods=1),
    Stage("sft", (f"model.source={FLUX}", "data.path=/data/triplets", "data.size=512", "train.steps=4000",
                  "train.batch_size=1", "train.grad_accum=4", "train.gradient_checkpointing=true",
                  "train.checkpoint_every=100", "output.storage_path=/runs/train", "output.max_failures=3"),
          deadline_s=48 * HOUR, workers=4),
    Stage("cdns", (f"model.source={FLUX}", f"model.ref_adapter={REF_ADAPTER}", "data.input=/data/triplets",
                   "data.output=/data/quadruplets", "cdns.size=512", "cdns.batch_size=8"),
          deadline_s=12 * HOUR, workers=4, cpus_per_worker=4),
    Stage("sfo", (f"model.source={FLUX}", f"model.ref_adapter={REF_ADAPTER}", "data.path=/data/quadruplets",
                  "data.size=512", "train.steps=300", "train.batch_size=1", "train.gradient_checkpointing=true",
                  "train.checkpoint_every=50", "output.storage_path=/runs/train", "output.max_failures=3"),
          deadline_s=24 * HOUR, workers=4),
    Stage("evaluate", (f"model.source={FLUX}", f"methods={EVAL_METHODS}", "eval.dreambench=/data/dreambench",
                       "eval.size=512", "eval.dino_encoder=/models/dino-vits16",
                       "eval.clip_encoder=/models/clip-vit-large-patch14", "output=/runs/evaluate"),
          deadline_s=12 * HOUR, workers=2, cpus_per_worker=4),
)

# The dev overlay: one GPU, smaller pods, fewer steps and samples.
DEV_OVERRIDES = {
    "prepare": ("data.limit=200",),
    "sft": ("train.steps=200", "train.grad_accum=1", "train.checkpoint_every=50"),
    "cdns": (),
    "sfo": ("train.steps=50", "train.checkpoint_every=25"),
    "evaluate": ("eval.subjects=4", "eval.prompts=5"),
}
DEV_POD = {"cpus_per_worker": 4.0, "pod_memory": "64Gi"}
DEV_PVC_SIZE = "200Gi"
RAYCLUSTER_GPU_MAX = 4


def dev_stage(stage: Stage) -> Stage:
    settings = tuple(s for s in stage.settings if s.split("=")[0] not in {o.split("=")[0] for o in DEV_OVERRIDES[stage.name]})
    changed = replace(stage, settings=settings + DEV_OVERRIDES[stage.name])
    if stage.workers:
        changed = replace(changed, workers=1, gpus_per_pod=1, **DEV_POD)
    return changed


# --- pod templates ---------------------------------------------------------------------------

def _volumes() -> list[dict]:
    return [{"name": "shared", "persistentVolumeClaim": {"claimName": PVC}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_GI}Gi"}}]


def _mounts() -> list[dict]:
    mounts = [{"name": "shared", "mountPath": path, "subPath": sub, **({"readOnly": True} if ro else {})}
              for path, (sub, ro) in MOUNTS.items()]
    return mounts + [{"name": "dshm", "mountPath": "/dev/shm"}]


def _template(container: str, resources: dict, gpus: int = 0, ports: list[dict] | None = None,
              env: dict[str, str] | None = None) -> dict:
    limits = {**resources, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    env_vars = {"SFO_CACHE_DIR": "/runs/cache", **(env or {})}
    spec = {"containers": [{
        "name": container, "image": IMAGE, "imagePullPolicy": "IfNotPresent",
        "env": [{"name": k, "value": v} for k, v in env_vars.items()],
        **({"ports": ports} if ports else {}),
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": _mounts(),
    }], "volumes": _volumes()}
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def _head(env: dict[str, str] | None = None) -> dict:
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    # num-cpus 0: nothing but drivers and controllers on the head; work goes to the worker groups.
    return {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _template("ray-head", HEAD, ports=ports, env=env)}


def _group(name: str, replicas: int, min_r: int, max_r: int, resources: dict, gpus: int,
           env: dict[str, str] | None = None) -> dict:
    return {"groupName": name, "replicas": replicas, "minReplicas": min_r, "maxReplicas": max_r,
            "rayStartParams": {}, "template": _template("ray-worker", resources, gpus, env=env)}


def cluster_spec(groups: list[dict], autoscaling: bool, head_env: dict[str, str] | None = None) -> dict:
    spec = {"rayVersion": RAY_VERSION, "authOptions": {"mode": "token", "secretName": AUTH_SECRET}}
    if autoscaling:
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 300}
    return {**spec, "headGroupSpec": _head(head_env), "workerGroupSpecs": groups}


def job_cluster(stage: Stage) -> dict:
    if stage.workers:
        group = _group("gpu", stage.gpu_pods, stage.gpu_pods, stage.gpu_pods,
                       {"cpu": str(stage.pod_cpus), "memory": stage.pod_memory}, stage.gpus_per_pod)
    else:
        group = _group("cpu", stage.cpu_pods, stage.cpu_pods, stage.cpu_pods, stage.cpu_pod, 0)
    return cluster_spec([group], autoscaling=False)


def runtime_env() -> str:
    env = {
        # The submitter pod runs the same image: it uploads the project from APP_DIR, so the
        # entrypoint's relative --config path resolves and every worker runs the same code.
        "working_dir": APP_DIR,
        "excludes": [".git", ".venv", "runs", "outputs"],  # = cluster/submit.py's runtime_env
        "env_vars": {"SFO_CACHE_DIR": "/runs/cache", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
    }
    return yaml.safe_dump(env, sort_keys=False)


def rayjob(stage: Stage) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": f"sfo-{stage.name}", "labels": {"app.kubernetes.io/name": "sfo-ray",
                                                                  "sfo.stage": stage.name}},
            # Created suspended: `kubectl apply -k` must not start all five stages at once. Each stage
            # starts when its suspend flips to false (k8s/README.md), after the stage before it finished.
            "spec": {"suspend": True, "entrypoint": stage.entrypoint, "runtimeEnvYAML": runtime_env(),
                     "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600,
                     "activeDeadlineSeconds": stage.deadline_s,
                     "backoffLimit": 1,  # one fresh cluster on failure; the stages resume from their outputs
                     "submitterConfig": {"backoffLimit": 2},  # retries of the submitter pod alone
                     "rayClusterSpec": job_cluster(stage)}}


def raycluster() -> dict:
    gpu = _group("gpu", 0, 0, RAYCLUSTER_GPU_MAX, {"cpu": "10", "memory": "96Gi"}, 1)
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": "sfo-ray", "labels": {"app.kubernetes.io/name": "sfo-ray"}},
            "spec": cluster_spec([gpu], autoscaling=True)}


def serve_config_text() -> str:
    if not SERVE_CONFIG.is_file():
        raise SystemExit(f"{SERVE_CONFIG.relative_to(ROOT)} is missing: the RayService embeds it verbatim")
    return SERVE_CONFIG.read_text()


def rayservice() -> dict:
    # SERVE_ENV on the head and the workers: Serve may run build_app (which reads it) on any node.
    gpu = _group("gpu", 1, 1, RAYCLUSTER_GPU_MAX, {"cpu": "10", "memory": "96Gi"}, 1, env=SERVE_ENV)
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": {"name": "sfo-serve", "labels": {"app.kubernetes.io/name": "sfo-ray"}},
            "spec": {"serveConfigV2": serve_config_text(),
                     "rayClusterConfig": cluster_spec([gpu], autoscaling=True, head_env=SERVE_ENV)}}


def pvc(size: str = "1Ti") -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": PVC, "labels": {"app.kubernetes.io/name": "sfo-ray"}},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}}


# --- the dev overlay as RFC 6902 patches -------------------------------------------------------

def _job_patch(stage: Stage) -> list[dict]:
    dev = dev_stage(stage)
    ops = [{"op": "replace", "path": "/spec/entrypoint", "value": dev.entrypoint}]
    group = job_cluster(dev)["workerGroupSpecs"][0]
    for key in ("replicas", "minReplicas", "maxReplicas"):
        ops.append({"op": "replace", "path": f"/spec/rayClusterSpec/workerGroupSpecs/0/{key}", "value": group[key]})
    ops.append({"op": "replace", "path": "/spec/rayClusterSpec/workerGroupSpecs/0/template/spec/containers/0/resources",
                "value": group["template"]["spec"]["containers"][0]["resources"]})
    return ops


def _autoscaled_patch(prefix: str) -> list[dict]:
    return [{"op": "replace", "path": f"{prefix}/workerGroupSpecs/0/maxReplicas", "value": 1},
            {"op": "replace", "path": f"{prefix}/workerGroupSpecs/0/template/spec/containers/0/resources",
             "value": _template("ray-worker", {"cpu": "6", "memory": DEV_POD["pod_memory"]}, 1)
             ["spec"]["containers"][0]["resources"]}]


def dev_patches() -> dict[str, tuple[dict, list[dict]]]:
    """file name -> (kustomize target, operations)."""
    patches = {f"patch-rayjob-{s.name}.yaml": ({"kind": "RayJob", "name": f"sfo-{s.name}"}, _job_patch(s))
               for s in STAGES}
    patches["patch-raycluster.yaml"] = ({"kind": "RayCluster", "name": "sfo-ray"}, _autoscaled_patch("/spec"))
    patches["patch-rayservice.yaml"] = ({"kind": "RayService", "name": "sfo-serve"},
                                        _autoscaled_patch("/spec/rayClusterConfig"))
    patches["patch-pvc.yaml"] = ({"kind": "PersistentVolumeClaim", "name": PVC},
                                 [{"op": "replace", "path": "/spec/resources/requests/storage", "value": DEV_PVC_SIZE}])
    return patches


# --- files -------------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(header: str, *docs) -> str:
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)
    return f"# Generated by k8s/render.py (edit it there, then: python k8s/render.py).\n# {header}\n{body}"


def render() -> dict[str, str]:
    """Relative path under k8s/ -> file text."""
    files = {
        "base/pvc.yaml": dump("kubectl apply -k k8s/base (all of base) or kubectl apply -f k8s/base/pvc.yaml", pvc()),
        "base/raycluster.yaml": dump("kubectl apply -f k8s/base/raycluster.yaml  # long-lived, autoscaling GPU group",
                                     raycluster()),
        "base/rayservice.yaml": dump("kubectl apply -f k8s/base/rayservice.yaml  # serveConfigV2 = serving/serve_config.yaml",
                                     rayservice()),
    }
    for stage in STAGES:
        files[f"base/rayjob-{stage.name}.yaml"] = dump(
            f"kubectl create -f k8s/base/rayjob-{stage.name}.yaml  # runs: {stage.entrypoint}", rayjob(stage))
    resources = sorted(Path(p).name for p in files if p.startswith("base/"))
    files["base/kustomization.yaml"] = dump(
        "kubectl apply -k k8s/base  (create the auth Secret first: see k8s/README.md)",
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources})
    patches = dev_patches()
    for name, (_, ops) in patches.items():
        files[f"overlays/dev/{name}"] = dump("RFC 6902 patch for the dev overlay (k8s/overlays/dev/kustomization.yaml)", ops)
    files["overlays/dev/kustomization.yaml"] = dump(
        "kubectl apply -k k8s/overlays/dev  (1 GPU at most, smaller pods, fewer steps)",
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../../base"],
         "patches": [{"path": name, "target": target} for name, (target, _) in patches.items()]})
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python k8s/render.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a committed manifest differs from the rendered one")
    args = parser.parse_args(argv)
    files = render()
    stale = [p for p, text in files.items() if not (K8S / p).is_file() or (K8S / p).read_text() != text]
    if args.check:
        for path in stale:
            print(f"k8s/{path}: differs from what k8s/render.py renders; run python k8s/render.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        (K8S / path).parent.mkdir(parents=True, exist_ok=True)
        (K8S / path).write_text(files[path])
        print(f"wrote k8s/{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
