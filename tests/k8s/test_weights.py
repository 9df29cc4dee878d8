"""The weights Job and the wait/copy init containers: FLUX.1-dev's diffusers folders selected exactly, the token from a
Secret, every model the stages name downloaded, every pod that loads FLUX.1-dev waiting for the Job, and both scripts
run here against a faked hub (on a volume, and through a bucket)."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pods  # k8s/pods.py, render.py, spec.py (k8s/ is on sys.path: conftest.py)
import pytest
import spec

from tests.k8s.manifests import (
    BASE, CUSTOM, JOBS, RAY, RENDERED, TARGETS, cluster_containers, entry_args,
)


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
            named = {a.split("=", 1)[1] for a in entry_args(rj) if a.split("=", 1)[1:2] and
                     a.split("=", 1)[1].startswith("/models/")}
            assert named <= folders, f"{jname} names {named - folders}, which no weights Job downloads"


def test_every_pod_that_loads_flux_waits_for_the_weights_job():
    """Each RayJob that loads FLUX.1-dev (every stage: prepare's encoder cache too) holds its head and workers in
    an init container until the weights Job's marker exists; the marker the waiters look for is the one the Job
    writes."""
    for name, job in JOBS:
        cluster = job["spec"]["rayClusterSpec"]
        loads = any(a.startswith(("model.source=", "cache.model=/models/")) for a in entry_args(job))
        for container, group in cluster_containers(cluster):
            pod = (group or cluster["headGroupSpec"])["template"]["spec"]
            inits = [c["name"] for c in pod.get("initContainers", [])]
            assert inits == (["wait-for-weights"] if loads else []), f"{name}: {inits}"
            if loads:
                script = pod["initContainers"][0]["command"][-1]
                assert spec.WEIGHTS_MARKER in script
    for _, job in _weights_jobs():
        assert spec.WEIGHTS_MARKER in job["spec"]["template"]["spec"]["containers"][0]["command"][-1]


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
