"""Offline checks of the KubeRay manifests in k8s/, as an API server and the jobs themselves would see them.

- every resource (base, serve, tools, and the dev overlays after their RFC 6902 patches are applied here
  the way kustomize applies them; plus the renderer's output for managed clusters: --storage-class,
  --registry, --gpus-per-pod 8 / 2, --storage s3:// and gs://, --image-pull-secret, --gpu-node-selector)
  validates against KubeRay v1.7.0's own CRD schema (../shared/data/kuberay-crds; skipped where that folder
  is absent);
- each RayJob's entrypoint names a module and a config that exist, and the GPUs its cluster offers
  equal what that config asks Ray for (scaling.num_workers x scaling.gpus_per_worker), resolved by the
  job's own config class with the entrypoint's overrides;
- the RayService embeds serving/serve_config.yaml and is not in base; image tags, rayVersion, the Dockerfile and
  pyproject's Ray pin agree; token auth is on everywhere; ``k8s/render.py --check`` passes;
- pod memory and /dev/shm scale with GPUs per pod; the weights Job's allow-patterns select exactly the
  diffusers folders of FLUX.1-dev's real file list; every pod that loads FLUX.1-dev waits for that Job.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pods  # k8s/pods.py, render.py, spec.py (k8s/ is on sys.path: conftest.py)
import pytest
import render
import spec
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
GPU = "nvidia.com/gpu"


def _module_here(name: str) -> bool:
    """The module exists in this checkout (not merely in some installed copy of the project)."""
    found = importlib.util.find_spec(name)
    return found is not None and found.origin is not None and Path(found.origin).resolve().is_relative_to(ROOT)


EVALUATE_MISSING = not _module_here("pipelines.evaluate")
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML
EVALUATE_XFAIL = pytest.mark.xfail(strict=True, reason="pipelines.evaluate not built yet (issue #5)")


# --- loading: base files, and the dev overlay built like kustomize builds it -------------------

def _load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomize(folder: Path) -> list[dict]:
    """The resources ``kubectl kustomize folder`` would emit for the features k8s/ uses:
    ``resources`` (files or folders) and ``patches`` holding RFC 6902 operations."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kust) - {"apiVersion", "kind", "resources", "patches"}
    assert not unknown, f"{folder}/kustomization.yaml uses {unknown}, which this test's mini-kustomize does not model"
    docs: list[dict] = []
    for item in kust.get("resources", []):
        target = (folder / item).resolve()
        docs += _kustomize(target) if target.is_dir() else _load_docs(target)
    for patch in kust.get("patches", []):
        ops = yaml.safe_load((folder / patch["path"]).read_text())
        want = patch["target"]
        hits = [d for d in docs if d["kind"] == want["kind"] and d["metadata"]["name"] == want["name"]]
        assert len(hits) == 1, f"{patch['path']}: target {want} matches {len(hits)} resources"
        for op in ops:
            _apply_op(hits[0], op, patch["path"])
    return docs


def _apply_op(doc: dict, op: dict, where: str) -> None:
    keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].lstrip("/").split("/")]
    node = doc
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if op["op"] == "replace":
        assert isinstance(node, list) or last in node, f"{where}: replace of missing path {op['path']}"
        node[last] = copy.deepcopy(op["value"])
    elif op["op"] == "add":
        node[last] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del node[last]
    else:
        raise AssertionError(f"{where}: op {op['op']!r} is not modelled here")


def _named(docs: list[dict], prefix: str) -> list[tuple[str, dict]]:
    return [(f"{prefix}/{d['kind']}/{d['metadata']['name']}", d) for d in docs]


BASE = _named(_kustomize(K8S / "base"), "base")
SERVE = _named(_kustomize(K8S / "serve"), "serve")
TOOLS = _named(_kustomize(K8S / "tools"), "tools")
DEV = _named(_kustomize(K8S / "overlays" / "dev") + _kustomize(K8S / "overlays" / "dev-serve"), "dev")

# The renderer's output for managed clusters, rendered into a scratch folder the way a user renders it.
TARGETS = {
    "gke8": spec.Target(storage_class="standard-rwx", registry="us-docker.pkg.dev/proj/repo", gpus_per_pod=8,
                        image_pull_secrets=("regcred",),
                        gpu_node_selector=(("cloud.google.com/gke-accelerator", "nvidia-h100-80gb"),)),
    "eks2": spec.Target(storage_class="efs-sc", registry="123.dkr.ecr.us-east-1.amazonaws.com", gpus_per_pod=2,
                        pvc_size="2Ti", image_pull_secrets=("ghcr-pull", "ecr-pull"),
                        gpu_node_selector=(("node.kubernetes.io/instance-type", "p5.48xlarge"),
                                           ("nvidia.com/gpu.present", "true"))),
    "s3": spec.Target(registry="r.example.com/sfo", gpus_per_pod=8, storage="s3://bucket/sfo",
                      service_account="sfo-runner"),
    "gs": spec.Target(gpus_per_pod=4, storage="gs://bucket/prefix/"),
}
RENDERED_DIR = Path(tempfile.mkdtemp(prefix="sfo-k8s-render-"))


def _render_target(name: str, target) -> list[tuple[str, dict]]:
    out = RENDERED_DIR / name
    for rel, text in render.render(target).items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    docs = []
    for folder in ("base", "serve", "tools", "overlays/dev", "overlays/dev-serve"):
        if (out / folder / "kustomization.yaml").is_file():
            docs += _named(_kustomize(out / folder), f"{name}/{folder}")
    return docs


RENDERED = {name: _render_target(name, t) for name, t in TARGETS.items()}
CUSTOM = [item for docs in RENDERED.values() for item in docs]
ALL = BASE + SERVE + TOOLS + DEV + CUSTOM
RAY = [(n, d) for n, d in ALL if d["apiVersion"] == "ray.io/v1"]
JOBS = [(n, d) for n, d in ALL if d["kind"] == "RayJob"]


def _job_params(jobs: list[tuple[str, dict]]) -> list:
    params = []
    for name, doc in jobs:
        absent = EVALUATE_MISSING and _entry_module(doc) == "pipelines.evaluate"
        params.append(pytest.param(doc, id=name, marks=[EVALUATE_XFAIL] if absent else []))
    return params


def _entry_module(job: dict) -> str:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], f"entrypoint must be `python -m pipelines.<stage> ...`, got {argv[:3]}"
    return argv[2]


def _entry_args(job: dict) -> list[str]:
    return shlex.split(job["spec"]["entrypoint"])[3:]


def _cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return {"RayCluster": [spec], "RayJob": [spec.get("rayClusterSpec")],
            "RayService": [spec.get("rayClusterConfig")]}[doc["kind"]]


def _containers(cluster: dict) -> list[tuple[dict, dict | None]]:
    """(container, worker group or None for the head) for every container of a cluster spec."""
    found = [(c, None) for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster.get("workerGroupSpecs", []):
        found += [(c, group) for c in group["template"]["spec"]["containers"]]
    return found


# --- CRD schema -------------------------------------------------------------------------------

def _strip_extensions(node):
    if isinstance(node, dict):
        return {k: _strip_extensions(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [_strip_extensions(v) for v in node]
    return node


@pytest.fixture(scope="module")
def validators():
    if not CRDS.is_dir():
        pytest.skip(f"{CRDS} is absent (the KubeRay CRDs ship only beside the development checkout)")
    jsonschema = pytest.importorskip("jsonschema")
    found = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRDS / name).read_text(), Loader=FAST_LOADER)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = _strip_extensions(version["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        found[kind] = jsonschema.Draft7Validator(schema)
    return found


def _errors(validators, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validators[doc["kind"]].iter_errors(doc)]


@pytest.mark.parametrize("doc", [pytest.param(d, id=n) for n, d in RAY])
def test_manifest_validates_against_kuberay_crd(validators, doc):
    assert _errors(validators, doc) == []


def test_validator_catches_broken_manifests(validators):
    """The schema check is not vacuous: a wrong type, a missing required field and a bad enum fail."""
    job = copy.deepcopy(dict(JOBS)["base/RayJob/sfo-sft"])
    job["spec"]["backoffLimit"] = "one"
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["maxReplicas"] = "4"
    del group["groupName"]
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    text = "\n".join(_errors(validators, job))
    assert "spec.backoffLimit: 'one' is not of type 'integer'" in text
    assert "rayClusterSpec.workerGroupSpecs.0.maxReplicas: '4' is not of type 'integer'" in text
    assert "'groupName' is a required property" in text
    assert "authOptions.mode: 'password' is not one of" in text


def test_every_yaml_under_k8s_is_a_resource_a_patch_or_a_kustomization():
    """The recursive glob: nothing under k8s/ escapes the checks above by not being listed."""
    listed = set()
    folders = [p.parent for p in K8S.rglob("kustomization.yaml")]
    assert {str(f.relative_to(K8S)) for f in folders} == {"base", "serve", "tools", "overlays/dev", "overlays/dev-serve"}
    for folder in folders:
        kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
        listed |= {(folder / p).resolve() for p in kust.get("resources", []) if (folder / p).is_file()}
        listed |= {(folder / p["path"]).resolve() for p in kust.get("patches", [])}
    stray = [str(p.relative_to(ROOT)) for p in sorted(K8S.rglob("*.y*ml"))
             if p.name != "kustomization.yaml" and p.resolve() not in listed]
    assert stray == [], f"YAML under k8s/ that no kustomization uses: {stray}"


# --- RayJobs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("job", [pytest.param(d, id=n) for n, d in JOBS])
def test_rayjob_carries_required_fields(job):
    spec = job["spec"]
    assert spec["suspend"] is True, "created suspended: `kubectl apply -k` must not start every stage at once"
    assert spec["shutdownAfterJobFinishes"] is True
    for key in ("ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit"):
        assert isinstance(spec.get(key), int) and spec[key] >= 0, key
    assert isinstance(spec["submitterConfig"]["backoffLimit"], int)
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict) and env.get("working_dir"), "runtimeEnvYAML must be a mapping with a working_dir"
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    args = _entry_args(job)
    assert args[0] == "--config" and args[1] == f"pipelines/configs/{_entry_module(job).split('.')[-1]}.yaml"


def test_rayjob_runtime_env_excludes_match_cluster_submit():
    """A stage uploads the same files whether cluster.submit or a RayJob sends it."""
    from cluster.submit import runtime_env

    for name, job in JOBS:
        assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["excludes"] == runtime_env()["excludes"], name


def test_every_stage_has_a_rayjob():
    stages = {_entry_module(d) for _, d in BASE if d["kind"] == "RayJob"}
    assert stages == {f"pipelines.{s}" for s in ("prepare", "sft", "cdns", "sfo", "evaluate")}
    assert {p.name for p in (K8S / "base").glob("rayjob-*.yaml")} == {f"rayjob-{s.split('.')[1]}.yaml" for s in stages}


@pytest.mark.parametrize("job", _job_params(JOBS))
def test_entrypoint_module_and_config_exist(job):
    module = _entry_module(job)
    assert _module_here(module), f"{module} does not exist in {ROOT}"
    assert (ROOT / _entry_args(job)[1]).is_file(), f"{_entry_args(job)[1]} does not exist"


class _Captured(Exception):
    def __init__(self, cls):
        self.cls = cls


def _resolved_config(job: dict, monkeypatch):
    """The job's own config, as ``python -m <module> --config ... overrides`` would build it: the
    module's main() names its config class to parse_job_args, captured here, then loaded."""
    import pipelines.config
    from pipelines.config import job_argparser, load_config

    module = importlib.import_module(_entry_module(job))

    def capture(cls, *args, **kwargs):
        raise _Captured(cls)

    # a job calls parse_job_args itself or through pipelines.config.job_main: capture both paths
    for owner in (module, pipelines.config):
        if hasattr(owner, "parse_job_args"):
            monkeypatch.setattr(owner, "parse_job_args", capture)
    with pytest.raises(_Captured) as caught:
        module.main([])
    args = job_argparser("entrypoint", "").parse_args(_entry_args(job))
    return load_config(caught.value.cls, ROOT / args.config, args.overrides)


@pytest.mark.parametrize("job", _job_params(JOBS))
def test_gpu_requests_match_the_jobs_config(job, monkeypatch):
    config = _resolved_config(job, monkeypatch)
    scaling = getattr(config, "scaling", None)
    cluster = job["spec"]["rayClusterSpec"]
    offered = 0.0
    for container, group in _containers(cluster):
        gpus = float(container["resources"].get("limits", {}).get(GPU, 0))
        if group is None:
            assert gpus == 0, "the head takes no GPU"
            continue
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"], "a job's cluster has a fixed size"
        offered += gpus * group["replicas"]
        if gpus and scaling is not None:
            # the Ray Train workers / Ray Data actors of one pod fit its CPU limit
            workers_per_pod = gpus / scaling.gpus_per_worker
            assert float(container["resources"]["limits"]["cpu"]) >= workers_per_pod * scaling.cpus_per_worker
    needed = scaling.num_workers * scaling.gpus_per_worker if scaling is not None and scaling.use_gpu else 0.0
    assert offered == needed, f"cluster offers {offered} GPUs, the config asks for {needed}"
    if _entry_module(job) != "pipelines.prepare":
        assert needed > 0, "every stage but prepare runs on GPUs in the cluster"


# --- RayService, versions, auth, renderer -----------------------------------------------------

def test_rayservice_embeds_serving_serve_config():
    serve_config = ROOT / "serving" / "serve_config.yaml"
    assert serve_config.is_file(), "serving/serve_config.yaml is missing; the RayService embeds it"
    expected = yaml.safe_load(serve_config.read_text())
    for name, doc in ALL:
        if doc["kind"] == "RayService":
            assert yaml.safe_load(doc["spec"]["serveConfigV2"]) == expected, name
            assert doc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True, name
            for app in expected["applications"]:
                assert importlib.util.find_spec(app["import_path"].split(":")[0]) is not None


def test_autoscaling_cluster_has_a_gpu_group():
    for name, doc in ALL:
        if doc["kind"] == "RayCluster":
            spec = doc["spec"]
            assert spec["enableInTreeAutoscaling"] is True, name
            gpu_groups = [g for c, g in _containers(spec) if g and GPU in c["resources"]["limits"]]
            assert gpu_groups and all(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), name


def test_dev_overlay_uses_one_gpu_at_most():
    for name, doc in DEV:
        if doc["apiVersion"] != "ray.io/v1":
            continue
        for cluster in _cluster_specs(doc):
            most = sum(float(c["resources"]["limits"].get(GPU, 0)) * g["maxReplicas"]
                       for c, g in _containers(cluster) if g)
            assert most <= 1, f"{name}: up to {most} GPUs in the dev overlay"


def _dockerfile_base() -> tuple[str, str]:
    """The Dockerfile's base image tag with its ARG defaults substituted, and its Ray version."""
    text = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.MULTILINE))
    match = re.search(r"^FROM\s+rayproject/ray:(\S+)", text, re.MULTILINE)
    assert match, "Dockerfile must start FROM rayproject/ray:<tag>"
    tag = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], match.group(1))
    return tag, tag.split("-")[0]


def test_image_tags_and_ray_versions_agree():
    tag, version = _dockerfile_base()
    assert re.fullmatch(r"[0-9.]+-py311-cu1[0-9]+", tag), f"the cluster image builds on a CUDA tag of Ray's image: {tag}"
    assert tag == spec.IMAGE_TAG
    pin = re.search(r'"ray\[[^\]]*\]~=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin.group(1) == version, f"pyproject pins ray~={pin and pin.group(1)}, the Dockerfile {version}"
    for name, doc in RAY:
        for cluster in _cluster_specs(doc):
            assert cluster["rayVersion"] == version, name
            for container, _ in _containers(cluster):
                assert container["image"].rsplit(":", 1)[1] == tag, f"{name}: {container['image']}"


def test_token_auth_everywhere():
    for name, doc in RAY:
        for cluster in _cluster_specs(doc):
            assert cluster["authOptions"]["mode"] == "token", name
            assert cluster["authOptions"].get("secretName"), f"{name}: one shared Secret, so clients know the token"


def test_render_check_passes_and_has_help():
    run = [sys.executable, str(K8S / "render.py")]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert helped.returncode == 0 and "--check" in helped.stdout
    checked = subprocess.run([*run, "--check"], capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stderr


def test_object_storage_without_a_service_account_says_how_the_pods_reach_the_bucket(tmp_path, capsys):
    for account, noted in (([], True), (["--service-account", "sfo-sa"], False)):
        assert render.main(["--storage", "s3://bucket/sfo", "--out", str(tmp_path / str(noted)), *account]) == 0
        assert ("without --service-account" in capsys.readouterr().err) == noted


SERVE_ENV = {"SFO_SERVE_MODEL": "/models/FLUX.1-dev", "SFO_SERVE_ADAPTERS": "/runs/train/sfo/adapters",
             "SFO_SERVE_GPUS_PER_REPLICA": "1", "SFO_SERVE_MIN_REPLICAS": "1", "SFO_SERVE_MAX_REPLICAS": "4"}


def test_rayservice_pods_override_the_laptop_serve_args():
    """serveConfigV2 is serving/serve_config.yaml byte for byte (laptop args); every RayService container
    carries the SFO_SERVE_* variables that serving.app.build_app puts over those args, and they name
    what the jobs write: FLUX.1-dev on /models, the sfo job's export (<runs>/train/sfo/adapters)."""
    from serving.app import ENV_OVERRIDES

    assert set(SERVE_ENV) == set(ENV_OVERRIDES.values())
    assert pods.serve_env(spec.Target()) == SERVE_ENV
    sfo_job = dict(BASE)["base/RayJob/sfo-sfo"]
    assert "model.source=/models/FLUX.1-dev" in _entry_args(sfo_job)
    assert "output.storage_path=/runs/train" in _entry_args(sfo_job)  # + name sfo + adapters/
    text = (ROOT / "serving" / "serve_config.yaml").read_text()
    services = [(n, d) for n, d in BASE + SERVE + DEV if d["kind"] == "RayService"]
    assert {n for n, _ in services} == {"serve/RayService/sfo-serve", "dev/RayService/sfo-serve"}
    for target, docs in [(spec.Target(), services)] + [(TARGETS[k], RENDERED[k]) for k in TARGETS]:
        for name, doc in docs:
            if doc["kind"] != "RayService":
                continue
            # max_replicas = the GPU group's maxReplicas (one GPU, one replica per pod): 4, 1 in the dev overlay
            (group,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
            want = pods.serve_env(target, max_replicas=group["maxReplicas"])
            assert doc["spec"]["serveConfigV2"] == text, f"{name}: serveConfigV2 is not serving/serve_config.yaml verbatim"
            containers = _containers(doc["spec"]["rayClusterConfig"])
            assert any(g is None for _, g in containers) and any(g for _, g in containers)
            for container, group in containers:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert {k: env.get(k) for k in want} == want, f"{name}: {group and group['groupName'] or 'head'}"
                (token,) = [e for e in container["env"] if e["name"] == "SFO_SERVE_TOKEN"]
                assert token["valueFrom"]["secretKeyRef"] == {"name": "sfo-serve-token", "key": "token", "optional": True}


# --- issue 27: what a managed cluster needs -----------------------------------------------------

def _pod_specs(doc: dict) -> list[dict]:
    """Every pod spec in a resource: Ray clusters' heads and groups, a RayJob's submitter (where it names one), a
    Job's template, a Pod."""
    if doc["apiVersion"] == "ray.io/v1":
        found = []
        for cluster in _cluster_specs(doc):
            found.append(cluster["headGroupSpec"]["template"]["spec"])
            found += [g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])]
        if "submitterPodTemplate" in doc["spec"]:
            found.append(doc["spec"]["submitterPodTemplate"]["spec"])
        return found
    return {"Job": lambda: [doc["spec"]["template"]["spec"]], "Pod": lambda: [doc["spec"]]}.get(doc["kind"], list)()


def _gi(quantity: str) -> float:
    assert quantity.endswith("Gi"), quantity
    return float(quantity[:-2])


def test_rayservice_is_not_in_base():
    """The RayService holds a GPU and fails on missing adapters until the sfo stage wrote them: it is applied
    after that stage, from k8s/serve (or overlays/dev-serve), never by `kubectl apply -k k8s/base`."""
    kinds = {d["kind"] for _, d in BASE}
    assert "RayService" not in kinds and {"RayJob", "Job", "RayCluster", "PersistentVolumeClaim"} <= kinds
    assert [d["kind"] for _, d in SERVE] == ["RayService"]
    for name, docs in RENDERED.items():
        assert all(d["kind"] != "RayService" for n, d in docs if f"{name}/base/" in n), name


@pytest.mark.parametrize("name", list(TARGETS))
def test_renderer_parameters_land_in_every_pod(name):
    """--registry names the image of every container (init containers too), pulled Always from a registry;
    --storage-class the PVC's class; --gpus-per-pod the GPU pods of each stage (fewer when it needs fewer);
    --service-account every pod."""
    target, docs = TARGETS[name], RENDERED[name]
    image = f"{target.registry}/sfo-ray:{spec.IMAGE_TAG}" if target.registry else f"sfo-ray:{spec.IMAGE_TAG}"
    assert image.count("//") == 0 and not image.startswith("/")
    specs = [pod for _, d in docs for pod in _pod_specs(d)]
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
        for pod in _pod_specs(doc):
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
        args = {k: dict(a.split("=", 1) for a in _entry_args(j)[2:] if "=" in a) for k, j in jobs.items()}
        assert args["sfo-prepare"]["data.output"] == f"{prefix}/data/triplets"
        assert args["sfo-sft"]["output.storage_path"] == f"{prefix}/runs/train"
        assert args["sfo-cdns"]["model.ref_adapter"] == f"{prefix}/runs/train/sft/adapters/ref"
        assert args["sfo-evaluate"]["output"] == f"{prefix}/runs/evaluate"
        assert args["sfo-sft"]["model.source"] == "/models/FLUX.1-dev"
        for job in jobs.values():
            cluster = job["spec"]["rayClusterSpec"]
            for container, group in _containers(cluster):
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
                    assert _gi(container["resources"]["limits"]["ephemeral-storage"]) >= spec.MODELS_DISK_GI
                    assert _gi(size) == spec.MODELS_DISK_GI
                else:
                    assert _gi(size) == spec.CONFIGS_DISK_GI
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
    memory, shm = _gi(limits["memory"]), _gi(next(v["emptyDir"]["sizeLimit"] for v in pod["volumes"] if v["name"] == "dshm"))
    assert memory == {1: 61, 2: 116, 4: 226, 8: 446}[gpus]
    assert shm == 8 * gpus
    model_gib = gpus * (23.8 + 9.5) * 1e9 / 2**30  # the weights every worker of the pod loads at once
    assert memory >= model_gib + shm + gpus * 8, "room for each worker's weights, overhead and /dev/shm"
    # Ray's object store fits inside /dev/shm, leaving NCCL its share
    assert int(group["rayStartParams"]["object-store-memory"]) <= (shm - gpus) * 2**30
    assert spec.pod_memory_gi(gpus) == memory


# The file NAMES of black-forest-labs/FLUX.1-dev (names only; no sizes or contents needed): the diffusers
# folders, the single-file checkpoints (flux1-dev.safetensors, 23.8 GB; ae.safetensors) and repository files.
FLUX_DEV_FILES = [
    ".gitattributes", "LICENSE.md", "README.md", "dev_grid.jpg", "ae.safetensors", "flux1-dev.safetensors",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]
DIFFUSERS_FOLDERS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")


def _weights_jobs() -> list[tuple[str, dict]]:
    return [(n, d) for n, d in BASE + CUSTOM if d["kind"] == "Job"]


def _weights(job: dict) -> dict:
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return json.loads(env["SFO_WEIGHTS"]["value"])


def test_weights_job_allow_patterns_select_exactly_the_diffusers_folders():
    """Matched as huggingface_hub matches allow_patterns (fnmatch, `*` crossing "/"; its own filter when
    installed): model_index.json and the seven diffusers folders, not the 23.8 GB single-file checkpoint,
    ae.safetensors, the README, licence or preview image."""
    wanted = {f for f in FLUX_DEV_FILES if f == "model_index.json" or f.split("/")[0] in DIFFUSERS_FOLDERS}
    jobs = _weights_jobs()
    assert {n for n, _ in jobs if "overlays" not in n} == {"base/Job/sfo-weights"} | {f"{k}/base/Job/sfo-weights" for k in TARGETS}
    for name, job in jobs:
        folder, patterns = _weights(job)["black-forest-labs/FLUX.1-dev"]
        assert folder == "FLUX.1-dev" and f"/models/{folder}" == spec.FLUX
        matched = {f for f in FLUX_DEV_FILES if any(fnmatch.fnmatchcase(f, p) for p in patterns)}
        assert matched == wanted, f"{name}: extra {matched - wanted}, missing {wanted - matched}"
        try:
            from huggingface_hub.utils import filter_repo_objects
        except ImportError:
            continue
        assert set(filter_repo_objects(FLUX_DEV_FILES, allow_patterns=patterns)) == wanted, name
    assert "flux1-dev.safetensors" not in wanted and "ae.safetensors" not in wanted


def test_weights_job_takes_the_token_from_a_secret_and_downloads_every_model_the_stages_name():
    for name, job in _weights_jobs():
        spec = job["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}, name
        assert "snapshot_download(repo_id=repo, allow_patterns=patterns" in container["command"][-1]
        assert spec["restartPolicy"] in {"OnFailure", "Never"} and "ttlSecondsAfterFinished" not in job["spec"]
        folders = {f"/models/{folder}" for folder, _ in _weights(job).values()}
        for jname, rj in RAY:
            if rj["kind"] != "RayJob":
                continue
            named = {a.split("=", 1)[1] for a in _entry_args(rj) if a.split("=", 1)[1:2] and
                     a.split("=", 1)[1].startswith("/models/")}
            assert named <= folders, f"{jname} names {named - folders}, which no weights Job downloads"


def test_every_pod_that_loads_flux_waits_for_the_weights_job():
    """Each RayJob that loads FLUX.1-dev (every stage: prepare's encoder cache too) holds its head and workers in
    an init container until the weights Job's marker exists; the marker the waiters look for is the one the Job
    writes."""
    for name, job in JOBS:
        cluster = job["spec"]["rayClusterSpec"]
        loads = any(a.startswith(("model.source=", "cache.model=/models/")) for a in _entry_args(job))
        for container, group in _containers(cluster):
            pod = (group or cluster["headGroupSpec"])["template"]["spec"]
            inits = [c["name"] for c in pod.get("initContainers", [])]
            assert inits == (["wait-for-weights"] if loads else []), f"{name}: {inits}"
            if loads:
                script = pod["initContainers"][0]["command"][-1]
                assert spec.WEIGHTS_MARKER in script
    for _, job in _weights_jobs():
        assert spec.WEIGHTS_MARKER in job["spec"]["template"]["spec"]["containers"][0]["command"][-1]


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


def _run_script(script: str, env: dict, monkeypatch, downloads: list | None = None) -> None:
    """Runs one of the Job's / init containers' scripts in this process, with huggingface_hub's download faked."""
    import huggingface_hub

    def fake_download(repo_id, allow_patterns, local_dir, token=None):
        downloads.append((repo_id, tuple(allow_patterns), token))
        files = FLUX_DEV_FILES if repo_id == "black-forest-labs/FLUX.1-dev" else ["config.json", "model.safetensors"]
        for name in huggingface_hub.utils.filter_repo_objects(files, allow_patterns=allow_patterns):
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / name).write_text(name)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    exec(compile(script, "<manifest script>", "exec"), {"__name__": "__main__"})  # noqa: S102  the manifests' own scripts


def _script_env(job: dict) -> dict:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.parametrize("storage", ["pvc", "object"])
def test_weights_job_and_wait_scripts_run(storage, tmp_path, monkeypatch):
    """The Job's script downloads each entry with its patterns and writes the marker (on the volume, or into the
    bucket after copying the models there); the init container's script then passes, and with object storage
    copies the models into the pod: FLUX.1-dev's diffusers files arrive, flux1-dev.safetensors does not."""
    pytest.importorskip("huggingface_hub")
    downloads: list = []
    if storage == "pvc":
        (job,) = [d for _, d in BASE if d["kind"] == "Job"]
        env = {**_script_env(job), "SFO_MODELS_DIR": str(tmp_path / "models"), "SFO_WRITABLE": str(tmp_path),
               "HF_TOKEN": "hf_x"}
        wait_env = {"SFO_MODELS_LOCAL": str(tmp_path / "models")}
        local = tmp_path / "models"
    else:
        (job,) = [d for n, d in RENDERED["s3"] if d["kind"] == "Job" and "/base/" in n]
        bucket = f"file://{tmp_path}/bucket/models"
        env = {**_script_env(job), "SFO_MODELS_DIR": str(tmp_path / "scratch"), "SFO_MODELS_URI": bucket,
               "HF_TOKEN": "hf_x"}
        (tmp_path / "bucket" / "models").mkdir(parents=True)
        wait_env = {"SFO_MODELS_URI": bucket, "SFO_COPY_MODELS": "1", "SFO_MODELS_LOCAL": str(tmp_path / "pod")}
        local = tmp_path / "pod"
        local.mkdir()
    _run_script(job["spec"]["template"]["spec"]["containers"][0]["command"][-1], env, monkeypatch, downloads)
    assert [d[0] for d in downloads] == list(spec.WEIGHTS) and {d[2] for d in downloads} == {"hf_x"}
    for key in ("SFO_MODELS_DIR", "SFO_WRITABLE"):
        monkeypatch.delenv(key, raising=False)
    _run_script(pods.WAIT_SCRIPT, wait_env, monkeypatch)
    assert (local / spec.WEIGHTS_MARKER).is_file()
    assert (local / "FLUX.1-dev" / "transformer" / "diffusion_pytorch_model-00003-of-00003.safetensors").is_file()
    assert not (local / "FLUX.1-dev" / "flux1-dev.safetensors").exists()
    if storage == "object":  # a head's copy: every config and tokenizer file the pods get, no weights
        head = tmp_path / "head"
        head.mkdir()
        _run_script(pods.WAIT_SCRIPT, {**wait_env, "SFO_COPY_MODELS": "configs", "SFO_MODELS_LOCAL": str(head)},
                    monkeypatch)
        pod_files = {p.relative_to(local) for p in local.rglob("*") if p.is_file()}
        head_files = {p.relative_to(head) for p in head.rglob("*") if p.is_file()}
        assert head_files == {p for p in pod_files if not p.name.endswith(spec.WEIGHT_SUFFIXES)}
        assert Path("FLUX.1-dev/transformer/config.json") in head_files
        assert Path("FLUX.1-dev/tokenizer_2/spiece.model") in head_files
        assert not any(p.suffix == ".safetensors" for p in head_files)


def test_the_cluster_chain_encodes_once_and_joins_the_cache_back():
    """prepare encodes the text and images on GPU actors (bf16) so training loads the transformer alone; sfo
    reads the triplets' tensors back from prepare's output by sample id."""
    args = {name: dict(a.split("=", 1) for a in _entry_args(job) if "=" in a) for name, job in JOBS}
    prepare = next(v for k, v in args.items() if k.endswith("prepare"))
    sfo = next(v for k, v in args.items() if k.endswith("sfo"))
    assert prepare["cache.enabled"] == "true" and prepare["cache.model"] == spec.FLUX
    assert prepare["scaling.use_gpu"] == "true"
    assert sfo["data.cache_path"] == prepare["data.output"]
