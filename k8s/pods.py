"""The Kubernetes objects built from ``spec.py``: pod templates, Ray clusters, RayJobs, the RayService, the weights
Job, the shell pod and the dev overlays' patches (plain dicts; ``render.py`` writes them as YAML)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import yaml
from spec import (
    APP_DIR,
    AUTH_SECRET,
    CONFIGS_DISK_GI,
    CPU_POD_CPUS,
    CPU_POD_SHM_GI,
    CPU_POD_WORK_GI,
    DEV_CPUS_PER_WORKER,
    DEV_PVC_SIZE,
    FLUX,
    HEAD_CPUS,
    HEAD_SHM_GI,
    HEAD_WORK_GI,
    HF_SECRET,
    HF_SECRET_KEY,
    HOUR,
    MEMORY_PER_GPU_GI,
    MODELS,
    MODELS_DISK_GI,
    MOUNTS,
    POD_BASE_GI,
    PVC,
    RAY_GID,
    RAY_UID,
    RAY_VERSION,
    RAYCLUSTER_MAX_GPUS,
    ROOT,
    SERVE_CONFIG,
    SERVE_MAX_GPUS,
    SERVE_TOKEN_SECRET,
    WEIGHT_SUFFIXES,
    WEIGHTS,
    WEIGHTS_JOB,
    WEIGHTS_MARKER,
    Stage,
    Target,
    dev_stage,
    object_store_bytes,
    paths,
    shm_gi,
    stages,
)

# --- pod templates ---------------------------------------------------------------------------

# The init container that holds a pod until the weights Job finished (its marker exists), and with object-store
# storage copies the models into the pod's own /models. pyarrow reads s3:// and gs:// with the pod's credentials.
WAIT_SCRIPT = f"""\
import os, time
from pathlib import Path
local = os.environ.get("SFO_MODELS_LOCAL", "{MODELS}")
uri = os.environ.get("SFO_MODELS_URI")
if uri:
    import pyarrow.fs as pafs
    fs, root = pafs.FileSystem.from_uri(uri)
    ready = lambda: fs.get_file_info(root + "/{WEIGHTS_MARKER}").type != pafs.FileType.NotFound
else:
    ready = lambda: Path(local, "{WEIGHTS_MARKER}").is_file()
while not ready():
    print("waiting for job/{WEIGHTS_JOB} (marker {WEIGHTS_MARKER})", flush=True)
    time.sleep(15)
copy = os.environ.get("SFO_COPY_MODELS")
if uri and copy == "1":
    pafs.copy_files(uri, local, use_threads=True)
elif uri and copy == "configs":  # a head: the drivers read configs and tokenizers, never the weights
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File and not info.path.endswith({WEIGHT_SUFFIXES!r}):
            target = Path(local, os.path.relpath(info.path, root))
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as source:
                target.write_bytes(source.read())
print("weights ready", flush=True)
"""

# The weights Job: huggingface_hub.snapshot_download of each WEIGHTS entry (resumable: a rerun keeps finished
# files), then the marker; with object-store storage, downloaded to scratch and copied to <storage>/models.
DOWNLOAD_SCRIPT = f"""\
import json, os
from pathlib import Path
from huggingface_hub import snapshot_download
root = Path(os.environ["SFO_MODELS_DIR"])
for folder in os.environ.get("SFO_WRITABLE", "").split(":"):
    if folder and not os.access(folder, os.W_OK):
        raise SystemExit(folder + " is not writable by uid " + str(os.getuid()) + ": the Ray pods write there")
for repo, (folder, patterns) in json.loads(os.environ["SFO_WEIGHTS"]).items():
    print("downloading", repo, patterns, flush=True)
    snapshot_download(repo_id=repo, allow_patterns=patterns, local_dir=root / folder,
                      token=os.environ.get("HF_TOKEN") or None)
done = json.dumps(sorted(json.loads(os.environ["SFO_WEIGHTS"])))
uri = os.environ.get("SFO_MODELS_URI")
if uri:
    import pyarrow.fs as pafs
    pafs.copy_files(str(root), uri, use_threads=True)
    fs, path = pafs.FileSystem.from_uri(uri + "/{WEIGHTS_MARKER}")
    with fs.open_output_stream(path) as out:
        out.write(done.encode())
else:
    (root / "{WEIGHTS_MARKER}").write_text(done)
print("done:", done, flush=True)
"""


def _volumes(t: Target, shm: int, models_copy: str = "") -> list[dict]:
    volumes = [] if t.object_store else [{"name": "shared", "persistentVolumeClaim": {"claimName": PVC}}]
    if t.object_store and models_copy:
        size = MODELS_DISK_GI if models_copy == "1" else CONFIGS_DISK_GI
        volumes.append({"name": "models", "emptyDir": {"sizeLimit": f"{size}Gi"}})
    return volumes + [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm}Gi"}}]


def _mounts(t: Target, models_copy: str = "") -> list[dict]:
    if t.object_store:
        mounts = [{"name": "models", "mountPath": MODELS}] if models_copy else []
    else:
        mounts = [{"name": "shared", "mountPath": path, "subPath": sub, **({"readOnly": True} if ro else {})}
                  for path, (sub, ro) in MOUNTS.items()]
    return mounts + [{"name": "dshm", "mountPath": "/dev/shm"}]


def _wait_container(t: Target, models_copy: str) -> dict:
    env = {}
    if t.object_store:
        env = {"SFO_MODELS_URI": t.models_uri, **({"SFO_COPY_MODELS": models_copy} if models_copy else {})}
    mounts = [m for m in _mounts(t, models_copy) if m["mountPath"] == MODELS]
    return {"name": "wait-for-weights", "image": t.image, "imagePullPolicy": t.pull_policy,
            "command": ["python", "-c", WAIT_SCRIPT],
            "env": [{"name": k, "value": v} for k, v in env.items()],
            # requests = limits, as in every container of the pod: the pod keeps the Guaranteed QoS class
            "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
            **({"volumeMounts": mounts} if mounts else {})}


def _env(env: dict) -> list[dict]:
    return [{"name": k, "value": v} if isinstance(v, str) else {"name": k, "valueFrom": v} for k, v in env.items()]


def _pod_access(t: Target) -> dict:
    """What every pod spec carries from the target: its ServiceAccount and its registry credentials."""
    access: dict = {}
    if t.service_account:
        access["serviceAccountName"] = t.service_account
    if t.image_pull_secrets:
        access["imagePullSecrets"] = [{"name": name} for name in t.image_pull_secrets]
    return access


def _template(t: Target, container: str, cpus: int, work_gi: int, shm: int, gpus: int = 0,
              ports: list[dict] | None = None, env: dict[str, str] | None = None, needs_models: bool = False) -> dict:
    """A Ray pod: ``work_gi`` for its processes + ``shm`` of /dev/shm + Ray's base, as its memory limit."""
    # Object storage: a GPU pod copies the models ("1"), a head their configs and tokenizers ("configs": its
    # drivers check the model's shape and the encoders' folders before any worker starts).
    models_copy = ("1" if gpus > 0 else "configs") if needs_models and t.object_store else ""
    limits = {"cpu": str(cpus), "memory": f"{work_gi + shm + POD_BASE_GI}Gi",
              **({"ephemeral-storage": f"{MODELS_DISK_GI + 16}Gi"} if models_copy == "1" else {}),
              **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    env_vars = {"SFO_CACHE_DIR": t.cache_dir, **(env or {})}  # a str value, or a valueFrom mapping
    spec = _pod_access(t)
    if needs_models:
        spec["initContainers"] = [_wait_container(t, models_copy)]
    spec["containers"] = [{
        "name": container, "image": t.image, "imagePullPolicy": t.pull_policy,
        "env": _env(env_vars),
        **({"ports": ports} if ports else {}),
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": _mounts(t, models_copy),
    }]
    spec["volumes"] = _volumes(t, shm, models_copy)
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if t.node_selector:
            spec["nodeSelector"] = t.node_selector
    return {"spec": spec}


def _head(t: Target, env: dict[str, str] | None = None, needs_models: bool = False) -> dict:
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    # num-cpus 0: nothing but drivers and controllers on the head; work goes to the worker groups.
    return {"rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                               "object-store-memory": object_store_bytes(HEAD_SHM_GI)},
            "template": _template(t, "ray-head", HEAD_CPUS, HEAD_WORK_GI, HEAD_SHM_GI, ports=ports, env=env,
                                  needs_models=needs_models)}


def _gpu_group(t: Target, name: str, replicas: int, min_r: int, max_r: int, gpus: int, cpus: int,
               env: dict[str, str] | None = None) -> dict:
    shm = shm_gi(gpus)
    return {"groupName": name, "replicas": replicas, "minReplicas": min_r, "maxReplicas": max_r,
            "rayStartParams": {"object-store-memory": object_store_bytes(shm, gpus)},
            "template": _template(t, "ray-worker", cpus, gpus * MEMORY_PER_GPU_GI, shm, gpus, env=env,
                                  needs_models=True)}


def _cpu_group(t: Target, name: str, replicas: int) -> dict:
    return {"groupName": name, "replicas": replicas, "minReplicas": replicas, "maxReplicas": replicas,
            "rayStartParams": {"object-store-memory": object_store_bytes(CPU_POD_SHM_GI)},
            "template": _template(t, "ray-worker", CPU_POD_CPUS, CPU_POD_WORK_GI, CPU_POD_SHM_GI)}


def cluster_spec(t: Target, groups: list[dict], autoscaling: bool, head_env: dict[str, str] | None = None,
                 needs_models: bool = True) -> dict:
    spec = {"rayVersion": RAY_VERSION, "authOptions": {"mode": "token", "secretName": AUTH_SECRET}}
    if autoscaling:
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 300}
    return {**spec, "headGroupSpec": _head(t, head_env, needs_models), "workerGroupSpecs": groups}


def job_cluster(t: Target, stage: Stage) -> dict:
    if stage.workers:
        group = _gpu_group(t, "gpu", stage.gpu_pods, stage.gpu_pods, stage.gpu_pods, stage.gpus_per_pod,
                           stage.pod_cpus)
    else:
        group = _cpu_group(t, "cpu", stage.cpu_pods)
    # The head waits for the weights too when the stage loads them: the submitter then waits for the head,
    # and the job starts only once every pod can load FLUX.1-dev (prepare needs no model and starts at once).
    return cluster_spec(t, [group], autoscaling=False, needs_models=bool(stage.workers))


def runtime_env(t: Target) -> str:
    env = {
        # The submitter pod runs the same image: it uploads the project from APP_DIR, so the
        # entrypoint's relative --config path resolves and every worker runs the same code.
        "working_dir": APP_DIR,
        "excludes": [".git", ".venv", "runs", "outputs"],  # = cluster/submit.py's runtime_env
        "env_vars": {"SFO_CACHE_DIR": t.cache_dir, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
    }
    return yaml.safe_dump(env, sort_keys=False)


LABELS = {"app.kubernetes.io/name": "sfo-ray"}


def _submitter(t: Target) -> dict:
    """KubeRay's default submitter pod (ray-operator common/job.go: the head's image, these resources), plus the
    pod's access: KubeRay gives its own default no imagePullSecrets, so a private registry needs this one."""
    return {"spec": {**_pod_access(t), "restartPolicy": "Never", "containers": [{
        "name": "ray-job-submitter", "image": t.image, "imagePullPolicy": t.pull_policy,
        "resources": {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}}]}}


def rayjob(t: Target, stage: Stage) -> dict:
    # Created suspended: `kubectl apply -k` must not start all five stages at once. Each stage
    # starts when its suspend flips to false (k8s/README.md), after the stage before it finished.
    spec = {"suspend": True, "entrypoint": stage.entrypoint, "runtimeEnvYAML": runtime_env(t),
            "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600,
            "activeDeadlineSeconds": stage.deadline_s,
            "backoffLimit": 1,  # one fresh cluster on failure; the stages resume from their outputs
            "submitterConfig": {"backoffLimit": 2},  # retries of the submitter pod alone
            "rayClusterSpec": job_cluster(t, stage)}
    if t.image_pull_secrets:
        spec["submitterPodTemplate"] = _submitter(t)
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": f"sfo-{stage.name}", "labels": {**LABELS, "sfo.stage": stage.name}}, "spec": spec}


def raycluster(t: Target) -> dict:
    gpus = t.gpus_per_pod
    pods = max(1, RAYCLUSTER_MAX_GPUS // gpus)
    group = _gpu_group(t, "gpu", 0, 0, pods, gpus, replace(Stage("any", (), 0, workers=1), gpus_per_pod=gpus).pod_cpus)
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "sfo-ray", "labels": LABELS},
            "spec": cluster_spec(t, [group], autoscaling=True)}


def serve_env(t: Target, max_replicas: int = SERVE_MAX_GPUS) -> dict[str, str]:
    """serving/args.py ENV_OVERRIDES: FLUX.1-dev, the sfo job's export, one GPU per FluxGenerator replica, one
    replica kept warm (the GPU group's minReplicas) and as many at most as the group has pods (one GPU each)."""
    return {"SFO_SERVE_MODEL": FLUX, "SFO_SERVE_ADAPTERS": paths(t)["sfo_export"], "SFO_SERVE_GPUS_PER_REPLICA": "1",
            "SFO_SERVE_MIN_REPLICAS": "1", "SFO_SERVE_MAX_REPLICAS": str(max_replicas)}


def _serve_pod_env(t: Target, max_replicas: int = SERVE_MAX_GPUS) -> dict:
    token = {"secretKeyRef": {"name": SERVE_TOKEN_SECRET, "key": "token", "optional": True}}
    return {**serve_env(t, max_replicas), "SFO_SERVE_TOKEN": token}


def serve_config_text() -> str:
    if not SERVE_CONFIG.is_file():
        raise SystemExit(f"{SERVE_CONFIG.relative_to(ROOT)} is missing: the RayService embeds it verbatim")
    return SERVE_CONFIG.read_text()


def rayservice(t: Target) -> dict:
    # SERVE_ENV on the head and the workers: Serve may run build_app (which reads it) on any node.
    # One GPU per pod whatever --gpus-per-pod: a replica is one GPU, and the autoscaler adds pods one replica at a time.
    env = _serve_pod_env(t)
    gpu = _gpu_group(t, "gpu", 1, 1, SERVE_MAX_GPUS, 1, 10, env=env)
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "sfo-serve", "labels": LABELS},
            "spec": {"serveConfigV2": serve_config_text(),
                     "rayClusterConfig": cluster_spec(t, [gpu], autoscaling=True, head_env=env)}}


def pvc(t: Target) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": PVC, "labels": LABELS},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": t.storage_class,
                     "resources": {"requests": {"storage": t.pvc_size}}}}


def weights_job(t: Target) -> dict:
    """Downloads WEIGHTS with the HF token of Secret hf-token; the Ray pods' init containers wait for its marker."""
    models_dir = "/scratch/models" if t.object_store else "/mnt/models"
    env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": HF_SECRET, "key": HF_SECRET_KEY}}},
           {"name": "SFO_WEIGHTS", "value": json.dumps(WEIGHTS)},
           {"name": "SFO_MODELS_DIR", "value": models_dir},
           {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"}]
    if not t.object_store:
        env.append({"name": "SFO_WRITABLE", "value": "/mnt/models:/mnt/data:/mnt/runs"})
    if t.object_store:
        env.append({"name": "SFO_MODELS_URI", "value": t.models_uri})
        volume, mount = {"name": "scratch", "emptyDir": {"sizeLimit": f"{MODELS_DISK_GI}Gi"}}, "/scratch"
    else:
        volume, mount = {"name": "shared", "persistentVolumeClaim": {"claimName": PVC}}, "/mnt"
    limits = {"cpu": "4", "memory": "16Gi", **({"ephemeral-storage": f"{MODELS_DISK_GI + 8}Gi"} if t.object_store else {})}
    spec: dict = {"restartPolicy": "OnFailure", **_pod_access(t)}
    if not t.object_store:
        # A fresh volume's folders belong to root; the Ray pods run as the image's user `ray`.
        spec["initContainers"] = [{
            "name": "volume-owner", "image": t.image, "imagePullPolicy": t.pull_policy,
            # EFS access points map every user to theirs and refuse chown: then the download container's
            # SFO_WRITABLE check says whether the folders are writable all the same.
            "command": ["sh", "-c", (f"mkdir -p /mnt/models /mnt/data /mnt/runs && "
                                     f"chown {RAY_UID}:{RAY_GID} /mnt/models /mnt/data /mnt/runs "
                                     "|| echo 'chown refused; the download container checks the folders are writable'")],
            "securityContext": {"runAsUser": 0},
            "volumeMounts": [{"name": "shared", "mountPath": "/mnt"}]}]
    spec["containers"] = [{"name": "download", "image": t.image, "imagePullPolicy": t.pull_policy,
                           "command": ["python", "-c", DOWNLOAD_SCRIPT], "env": env,
                           "resources": {"requests": dict(limits), "limits": limits},
                           "volumeMounts": [{"name": volume["name"], "mountPath": mount}]}]
    spec["volumes"] = [volume]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": WEIGHTS_JOB, "labels": LABELS},
            # no ttlSecondsAfterFinished: `kubectl wait --for=condition=complete job/sfo-weights` must find it
            "spec": {"backoffLimit": 6, "activeDeadlineSeconds": 6 * HOUR, "template": {"spec": spec}}}


def shell_pod(t: Target) -> dict:
    """A pod with the whole volume at /mnt, to copy inputs in (kubectl cp) and look at outputs."""
    spec = {"containers": [{"name": "shell", "image": t.image, "imagePullPolicy": t.pull_policy,
                            "command": ["sleep", "infinity"],
                            # for `hf download` of the inputs (k8s/README.md); optional, so the pod starts without it
                            "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                                "name": HF_SECRET, "key": HF_SECRET_KEY, "optional": True}}}],
                            "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}},
                            "volumeMounts": [{"name": "shared", "mountPath": "/mnt"}]}],
            "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": PVC}}], **_pod_access(t)}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sfo-shell", "labels": LABELS}, "spec": spec}


# --- the dev overlays as RFC 6902 patches ------------------------------------------------------

def _job_patch(t: Target, stage: Stage) -> list[dict]:
    dev = dev_stage(stage)
    return [{"op": "replace", "path": "/spec/entrypoint", "value": dev.entrypoint},
            {"op": "replace", "path": "/spec/rayClusterSpec/workerGroupSpecs/0",
             "value": job_cluster(t, dev)["workerGroupSpecs"][0]}]


def _autoscaled_patch(t: Target, prefix: str, env: dict[str, str] | None = None) -> list[dict]:
    return [{"op": "replace", "path": f"{prefix}/workerGroupSpecs/0",
             "value": _gpu_group(t, "gpu", 0 if env is None else 1, 0 if env is None else 1, 1, 1,
                                 math.ceil(DEV_CPUS_PER_WORKER) + 2, env=env)}]


def dev_patches(t: Target) -> dict[str, tuple[dict, list[dict]]]:
    """file name -> (kustomize target, operations), for overlays/dev (over base)."""
    patches = {f"patch-rayjob-{s.name}.yaml": ({"kind": "RayJob", "name": f"sfo-{s.name}"}, _job_patch(t, s))
               for s in stages(t)}
    patches["patch-raycluster.yaml"] = ({"kind": "RayCluster", "name": "sfo-ray"}, _autoscaled_patch(t, "/spec"))
    if not t.object_store:
        patches["patch-pvc.yaml"] = ({"kind": "PersistentVolumeClaim", "name": PVC},
                                     [{"op": "replace", "path": "/spec/resources/requests/storage", "value": DEV_PVC_SIZE}])
    return patches


def dev_serve_patches(t: Target) -> dict[str, tuple[dict, list[dict]]]:
    env = _serve_pod_env(t, max_replicas=1)
    head_env = {"op": "replace", "path": "/spec/rayClusterConfig/headGroupSpec/template/spec/containers/0/env",
                "value": _env({"SFO_CACHE_DIR": t.cache_dir, **env})}
    return {"patch-rayservice.yaml": ({"kind": "RayService", "name": "sfo-serve"},
                                      _autoscaled_patch(t, "/spec/rayClusterConfig", env=env) + [head_env])}

