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
- the cluster chain encodes once (prepare, on GPUs) and sfo joins the cache back.

The renderer's flags are tested in test_render.py, the weights Job in test_weights.py, the resources they all read
are built in manifests.py.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import re
import subprocess
import sys

import pods  # k8s/pods.py, render.py, spec.py (k8s/ is on sys.path: conftest.py)
import pytest
import spec
import yaml

from tests.k8s.manifests import (
    ALL, BASE, CRDS, CRD_FILES, DEV, FAST_LOADER, GPU, JOBS, K8S, RAY, RENDERED, ROOT, SERVE, TARGETS,
    cluster_containers, cluster_specs, entry_args, entry_module, job_params, module_here,
)


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
    args = entry_args(job)
    assert args[0] == "--config" and args[1] == f"pipelines/configs/{entry_module(job).split('.')[-1]}.yaml"


def test_rayjob_runtime_env_excludes_match_cluster_submit():
    """A stage uploads the same files whether cluster.submit or a RayJob sends it."""
    from cluster.submit import runtime_env

    for name, job in JOBS:
        assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["excludes"] == runtime_env()["excludes"], name


def test_every_stage_has_a_rayjob():
    stages = {entry_module(d) for _, d in BASE if d["kind"] == "RayJob"}
    assert stages == {f"pipelines.{s}" for s in ("prepare", "sft", "cdns", "sfo", "evaluate")}
    assert {p.name for p in (K8S / "base").glob("rayjob-*.yaml")} == {f"rayjob-{s.split('.')[1]}.yaml" for s in stages}


@pytest.mark.parametrize("job", job_params(JOBS))
def test_entrypoint_module_and_config_exist(job):
    module = entry_module(job)
    assert module_here(module), f"{module} does not exist in {ROOT}"
    assert (ROOT / entry_args(job)[1]).is_file(), f"{entry_args(job)[1]} does not exist"


class _Captured(Exception):
    def __init__(self, cls):
        self.cls = cls


def _resolved_config(job: dict, monkeypatch):
    """The job's own config, as ``python -m <module> --config ... overrides`` would build it: the
    module's main() names its config class to parse_job_args, captured here, then loaded."""
    import pipelines.config
    from pipelines.config import job_argparser, load_config

    module = importlib.import_module(entry_module(job))

    def capture(cls, *args, **kwargs):
        raise _Captured(cls)

    # a job calls parse_job_args itself or through pipelines.config.job_main: capture both paths
    for owner in (module, pipelines.config):
        if hasattr(owner, "parse_job_args"):
            monkeypatch.setattr(owner, "parse_job_args", capture)
    with pytest.raises(_Captured) as caught:
        module.main([])
    args = job_argparser("entrypoint", "").parse_args(entry_args(job))
    return load_config(caught.value.cls, ROOT / args.config, args.overrides)


@pytest.mark.parametrize("job", job_params(JOBS))
def test_gpu_requests_match_the_jobs_config(job, monkeypatch):
    config = _resolved_config(job, monkeypatch)
    scaling = getattr(config, "scaling", None)
    cluster = job["spec"]["rayClusterSpec"]
    offered = 0.0
    for container, group in cluster_containers(cluster):
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
    if entry_module(job) != "pipelines.prepare":
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
            gpu_groups = [g for c, g in cluster_containers(spec) if g and GPU in c["resources"]["limits"]]
            assert gpu_groups and all(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups), name


def test_dev_overlay_uses_one_gpu_at_most():
    for name, doc in DEV:
        if doc["apiVersion"] != "ray.io/v1":
            continue
        for cluster in cluster_specs(doc):
            most = sum(float(c["resources"]["limits"].get(GPU, 0)) * g["maxReplicas"]
                       for c, g in cluster_containers(cluster) if g)
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
        for cluster in cluster_specs(doc):
            assert cluster["rayVersion"] == version, name
            for container, _ in cluster_containers(cluster):
                assert container["image"].rsplit(":", 1)[1] == tag, f"{name}: {container['image']}"


def test_token_auth_everywhere():
    for name, doc in RAY:
        for cluster in cluster_specs(doc):
            assert cluster["authOptions"]["mode"] == "token", name
            assert cluster["authOptions"].get("secretName"), f"{name}: one shared Secret, so clients know the token"


def test_render_check_passes_and_has_help():
    run = [sys.executable, str(K8S / "render.py")]
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert helped.returncode == 0 and "--check" in helped.stdout
    checked = subprocess.run([*run, "--check"], capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stderr


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
    assert "model.source=/models/FLUX.1-dev" in entry_args(sfo_job)
    assert "output.storage_path=/runs/train" in entry_args(sfo_job)  # + name sfo + adapters/
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
            containers = cluster_containers(doc["spec"]["rayClusterConfig"])
            assert any(g is None for _, g in containers) and any(g for _, g in containers)
            for container, group in containers:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert {k: env.get(k) for k in want} == want, f"{name}: {group and group['groupName'] or 'head'}"
                (token,) = [e for e in container["env"] if e["name"] == "SFO_SERVE_TOKEN"]
                assert token["valueFrom"]["secretKeyRef"] == {"name": "sfo-serve-token", "key": "token", "optional": True}


def test_rayservice_is_not_in_base():
    """The RayService holds a GPU and fails on missing adapters until the sfo stage wrote them: it is applied
    after that stage, from k8s/serve (or overlays/dev-serve), never by `kubectl apply -k k8s/base`."""
    kinds = {d["kind"] for _, d in BASE}
    assert "RayService" not in kinds and {"RayJob", "Job", "RayCluster", "PersistentVolumeClaim"} <= kinds
    assert [d["kind"] for _, d in SERVE] == ["RayService"]
    for name, docs in RENDERED.items():
        assert all(d["kind"] != "RayService" for n, d in docs if f"{name}/base/" in n), name


def test_the_cluster_chain_encodes_once_and_joins_the_cache_back():
    """prepare encodes the text and images on GPU actors (bf16) so training loads the transformer alone; sfo
    reads the triplets' tensors back from prepare's output by sample id."""
    args = {name: dict(a.split("=", 1) for a in entry_args(job) if "=" in a) for name, job in JOBS}
    prepare = next(v for k, v in args.items() if k.endswith("prepare"))
    sfo = next(v for k, v in args.items() if k.endswith("sfo"))
    assert prepare["cache.enabled"] == "true" and prepare["cache.model"] == spec.FLUX
    assert prepare["scaling.use_gpu"] == "true"
    assert sfo["data.cache_path"] == prepare["data.output"]
