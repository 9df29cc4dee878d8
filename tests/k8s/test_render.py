"""The renderer (k8s/render.py) for managed clusters: its flags land in every pod they name (registry, storage
class, GPUs per pod, object storage, pull secrets, GPU node selectors), bad values are refused naming the flag, the
committed manifests are its defaults, and pod memory and /dev/shm scale with GPUs per pod."""

from __future__ import annotations

import subprocess
import sys

import pods  # k8s/pods.py, render.py, spec.py (k8s/ is on sys.path: conftest.py)
import pytest
import render
import spec

from tests.k8s.manifests import (
    BASE, GPU, K8S, RENDERED, TARGETS, cluster_containers, entry_args, gi, pod_specs,
)


def test_object_storage_without_a_service_account_says_how_the_pods_reach_the_bucket(tmp_path, capsys):
    for account, noted in (([], True), (["--service-account", "sfo-sa"], False)):
        assert render.main(["--storage", "s3://bucket/sfo", "--out", str(tmp_path / str(noted)), *account]) == 0
        assert ("without --service-account" in capsys.readouterr().err) == noted


@pytest.mark.parametrize("name", list(TARGETS))
def test_renderer_parameters_land_in_every_pod(name):
    """--registry names the image of every container (init containers too), pulled Always from a registry;
    --storage-class the PVC's class; --gpus-per-pod the GPU pods of each stage (fewer when it needs fewer);
    --service-account every pod."""
    target, docs = TARGETS[name], RENDERED[name]
    image = f"{target.registry}/sfo-ray:{spec.IMAGE_TAG}" if target.registry else f"sfo-ray:{spec.IMAGE_TAG}"
    assert image.count("//") == 0 and not image.startswith("/")
    specs = [pod for _, d in docs for pod in pod_specs(d)]
    assert specs
    for pod in specs:
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["image"] == image, c["name"]
            assert c["imagePullPolicy"] == ("Always" if target.registry else "IfNotPresent")
        assert pod.get("serviceAccountName", "") == target.service_account
    pvcs = [d for _, d in docs if d["kind"] == "PersistentVolumeClaim"]
    if target.object_store:
        assert pvcs == [] and not any("persistentVolumeClaim" in v for s in specs for v in s.get("volumes", []))
    else:
        assert {p["spec"]["storageClassName"] for p in pvcs} == {target.storage_class}
        assert {p["spec"]["accessModes"][0] for p in pvcs} == {"ReadWriteMany"}
    for n, job in docs:
        if job["kind"] != "RayJob" or "/base/" not in n:
            continue
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        gpus = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get(GPU, 0)) for g in groups]
        needed = sum(g * grp["replicas"] for g, grp in zip(gpus, groups))
        if needed:
            assert gpus == [min(target.gpus_per_pod, needed)], f"{n}: {gpus}"


@pytest.mark.parametrize("name", list(TARGETS))
def test_pull_secrets_reach_every_pod_and_the_node_selector_the_gpu_pods(name):
    """--image-pull-secret: every pod pulls the image with them (Ray heads and groups, the dev overlays' replaced
    groups, the weights Job, the shell pod, and each RayJob's submitter, whose KubeRay default has none);
    --gpu-node-selector: the GPU pods' nodeSelector, and no other pod's. Neither flag: neither field."""
    target, docs = TARGETS[name], RENDERED[name]
    secrets = [{"name": s} for s in target.image_pull_secrets]
    seen = {"gpu": 0, "other": 0}
    for doc_name, doc in docs:
        for pod in pod_specs(doc):
            assert pod.get("imagePullSecrets", []) == secrets, doc_name
            gpu = any(GPU in c["resources"].get("limits", {}) for c in pod["containers"])
            assert pod.get("nodeSelector", {}) == (target.node_selector if gpu else {}), doc_name
            seen["gpu" if gpu else "other"] += 1
        if doc["kind"] == "RayJob":
            assert ("submitterPodTemplate" in doc["spec"]) == bool(secrets), doc_name
    assert seen["gpu"] and seen["other"]
    kinds = {(n.split("/")[1], d["kind"]) for n, d in docs}
    assert {("base", "RayJob"), ("base", "RayCluster"), ("base", "Job"), ("serve", "RayService"),
            ("overlays", "RayJob"), ("overlays", "RayCluster"), ("overlays", "RayService")} <= kinds
    assert ("tools", "Pod") in kinds or target.object_store


def test_the_flags_build_the_target_they_name(tmp_path):
    """The command line's repeatable KEY=VALUE and NAME flags give the same files as the Target they spell."""
    argv = ["--registry", "123.dkr.ecr.us-east-1.amazonaws.com", "--storage-class", "efs-sc", "--gpus-per-pod", "2",
            "--pvc-size", "2Ti", "--image-pull-secret", "ghcr-pull", "--image-pull-secret", "ecr-pull",
            "--gpu-node-selector", "node.kubernetes.io/instance-type=p5.48xlarge",
            "--gpu-node-selector", "nvidia.com/gpu.present=true", "--out", str(tmp_path)]
    assert render.main(argv) == 0
    files = render.render(TARGETS["eks2"])
    assert {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.yaml")} == set(files)
    assert all((tmp_path / rel).read_text() == text for rel, text in files.items())


@pytest.mark.parametrize(("bad", "says"), [
    (["--gpu-node-selector", "cloud.google.com/gke-accelerator"], "KEY=VALUE"),  # no "="
    (["--gpu-node-selector", "=nvidia-h100-80gb"], "KEY=VALUE"),  # no key
    (["--gpu-node-selector", "cloud.google.com/=nvidia-h100-80gb"], "KEY=VALUE"),  # a prefix without a name
    (["--gpu-node-selector", "gpu type=h100"], "KEY=VALUE"),  # not a label key
    (["--gpu-node-selector", "pool=a", "--gpu-node-selector", "pool=b"], "twice"),  # one key, two values
    (["--image-pull-secret", "Reg_Cred"], "docker-registry Secret"),  # not a Secret's name
    (["--image-pull-secret", ""], "docker-registry Secret"),
])
def test_renderer_refuses_malformed_pull_secrets_and_node_selectors(bad, says, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        render.main([*bad, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert bad[0] in error and says in error, error
    assert not any(tmp_path.iterdir()), "nothing written"


def test_target_names_the_flag_it_refuses():
    with pytest.raises(ValueError, match="--image-pull-secret 'Reg_Cred'"):
        spec.Target(image_pull_secrets=("Reg_Cred",))
    with pytest.raises(ValueError, match="--gpu-node-selector =h100: write KEY=VALUE"):
        spec.Target(gpu_node_selector=(("", "h100"),))


def test_committed_manifests_are_the_renderer_defaults():
    """What `kubectl apply -k k8s/base` creates: a Filestore RWX class, a local image, one GPU per pod."""
    (pvc,) = [d for _, d in BASE if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["storageClassName"] == spec.DEFAULT_STORAGE_CLASS


def test_object_store_paths_point_at_the_bucket():
    """--storage s3://|gs://: every stage's data and runs paths are under the prefix (the stages' URI support:
    issue 25); models are a pod-local copy that the GPU pods' init container fills from <prefix>/models."""
    for name in ("s3", "gs"):
        target = TARGETS[name]
        prefix = target.storage.rstrip("/")
        jobs = {d["metadata"]["name"]: d for n, d in RENDERED[name] if d["kind"] == "RayJob" and "/base/" in n}
        args = {k: dict(a.split("=", 1) for a in entry_args(j)[2:] if "=" in a) for k, j in jobs.items()}
        assert args["sfo-prepare"]["data.output"] == f"{prefix}/data/triplets"
        assert args["sfo-sft"]["output.storage_path"] == f"{prefix}/runs/train"
        assert args["sfo-cdns"]["model.ref_adapter"] == f"{prefix}/runs/train/sft/adapters/ref"
        assert args["sfo-evaluate"]["output"] == f"{prefix}/runs/evaluate"
        assert args["sfo-sft"]["model.source"] == "/models/FLUX.1-dev"
        for job in jobs.values():
            cluster = job["spec"]["rayClusterSpec"]
            for container, group in cluster_containers(cluster):
                # GPU pods copy the models; a head (its driver checks the model's and encoders' configs) copies
                # their configs and tokenizers only. prepare's uncached default needs no model.
                pod = (group or cluster["headGroupSpec"])["template"]["spec"]
                if not cluster["workerGroupSpecs"] or "initContainers" not in pod:
                    continue
                (init,) = pod["initContainers"]
                env = {e["name"]: e["value"] for e in init["env"]}
                copy = "1" if group is not None and GPU in container["resources"]["limits"] else "configs"
                assert env == {"SFO_MODELS_URI": f"{prefix}/models", "SFO_COPY_MODELS": copy}
                assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"]
                size = next(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "models")
                if copy == "1":
                    assert gi(container["resources"]["limits"]["ephemeral-storage"]) >= spec.MODELS_DISK_GI
                    assert gi(size) == spec.MODELS_DISK_GI
                else:
                    assert gi(size) == spec.CONFIGS_DISK_GI
            assert "initContainers" in cluster["headGroupSpec"]["template"]["spec"], job["metadata"]["name"]


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_pod_memory_and_shm_scale_with_gpus_per_pod(gpus):
    """Per GPU worker: FLUX.1-dev's bf16 transformer (23.8 GB) + T5-XXL (9.5 GB) pass through host memory
    (each worker loads its own copy), plus the worker's overhead and its /dev/shm share; the memory-backed
    /dev/shm counts against the limit. Hand-worked: 1 GPU -> 47 + 8 + 6 = 61 Gi; 8 GPUs -> 8 x 55 + 6 = 446 Gi."""
    cluster = pods.raycluster(spec.Target(gpus_per_pod=gpus))["spec"]
    (group,) = cluster["workerGroupSpecs"]
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert int(limits[GPU]) == gpus
    memory, shm = gi(limits["memory"]), gi(next(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "dshm"))
    assert memory == {1: 61, 2: 116, 4: 226, 8: 446}[gpus]
    assert shm == 8 * gpus
    model_gib = gpus * (23.8 + 9.5) * 1e9 / 2**30  # the weights every worker of the pod loads at once
    assert memory >= model_gib + shm + gpus * 8, "room for each worker's weights, overhead and /dev/shm"
    # Ray's object store fits inside /dev/shm, leaving NCCL its share
    assert int(group["rayStartParams"]["object-store-memory"]) <= (shm - gpus) * 2**30
    assert spec.pod_memory_gi(gpus) == memory


# The file NAMES of black-forest-labs/FLUX.1-dev (names only; no sizes or contents needed): the diffusers


def test_renderer_refuses_bad_parameters(tmp_path):
    run = [sys.executable, str(K8S / "render.py"), "--out", str(tmp_path)]
    for bad in (["--storage", "/mnt/nfs"], ["--gpus-per-pod", "3"], ["--gpus-per-pod", "0"]):
        result = subprocess.run([*run, *bad], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2 and "error" in result.stderr, (bad, result.stderr)
    good = subprocess.run([*run, "--storage-class", "efs-sc", "--registry", "reg.example/x", "--gpus-per-pod", "8"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "serve" / "rayservice.yaml").is_file() and (tmp_path / "base" / "job-weights.yaml").is_file()
    again = subprocess.run([*run, "--storage-class", "efs-sc", "--registry", "reg.example/x", "--gpus-per-pod", "8",
                            "--check"], capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0, again.stderr
