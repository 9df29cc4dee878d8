"""The k8s/ resources as an API server would see them, for the tests beside this file: the committed folders built
the way kustomize builds them (resources, RFC 6902 patches), the renderer's output for four managed-cluster targets
(rendered into a scratch folder as a user renders it), and helpers that walk their jobs, clusters and pods."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import shlex
import tempfile
from pathlib import Path

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


def module_here(name: str) -> bool:
    """The module exists in this checkout (not merely in some installed copy of the project)."""
    found = importlib.util.find_spec(name)
    return found is not None and found.origin is not None and Path(found.origin).resolve().is_relative_to(ROOT)


FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML


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


def job_params(jobs: list[tuple[str, dict]]) -> list:
    return [pytest.param(doc, id=name) for name, doc in jobs]


def entry_module(job: dict) -> str:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], f"entrypoint must be `python -m pipelines.<stage> ...`, got {argv[:3]}"
    return argv[2]


def entry_args(job: dict) -> list[str]:
    return shlex.split(job["spec"]["entrypoint"])[3:]


def cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return {"RayCluster": [spec], "RayJob": [spec.get("rayClusterSpec")],
            "RayService": [spec.get("rayClusterConfig")]}[doc["kind"]]


def cluster_containers(cluster: dict) -> list[tuple[dict, dict | None]]:
    """(container, worker group or None for the head) for every container of a cluster spec."""
    found = [(c, None) for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster.get("workerGroupSpecs", []):
        found += [(c, group) for c in group["template"]["spec"]["containers"]]
    return found


def pod_specs(doc: dict) -> list[dict]:
    """Every pod spec in a resource: Ray clusters' heads and groups, a RayJob's submitter (where it names one), a
    Job's template, a Pod."""
    if doc["apiVersion"] == "ray.io/v1":
        found = []
        for cluster in cluster_specs(doc):
            found.append(cluster["headGroupSpec"]["template"]["spec"])
            found += [g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])]
        if "submitterPodTemplate" in doc["spec"]:
            found.append(doc["spec"]["submitterPodTemplate"]["spec"])
        return found
    return {"Job": lambda: [doc["spec"]["template"]["spec"]], "Pod": lambda: [doc["spec"]]}.get(doc["kind"], list)()


def gi(quantity: str) -> float:
    assert quantity.endswith("Gi"), quantity
    return float(quantity[:-2])
