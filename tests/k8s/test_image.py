"""The cluster image, checked without Docker: the Dockerfile's pins equal pyproject's, its base image's CUDA is
the PyTorch wheel index's, its tag is the manifests' and the Makefile's, and every path the manifests name
inside the image (working_dir, entrypoint modules and configs, the Serve import path, benchmarks/) is in the
repository and copied by the Dockerfile (and not dropped by .dockerignore)."""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pods  # k8s/pods.py and k8s/spec.py (k8s/ is on sys.path: conftest.py)
import spec
import yaml

ROOT = Path(__file__).resolve().parents[2]

DOCKERFILE = (ROOT / "Dockerfile").read_text()
PINNED = ("torch", "ray", "diffusers", "peft", "deepspeed", "transformers")


def _args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE, re.MULTILINE))


def _expand(text: str) -> str:
    args = _args()
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def _pyproject_pins() -> dict[str, str]:
    """name -> version of pyproject's ``==V`` / ``~=V`` pins."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_-]+)(\[[^\]]*\])?(==|~=)([0-9.]+)", dep)
        if m:
            pins[m.group(1)] = m.group(4)
    return pins


def _dockerfile_pins() -> dict[str, str]:
    return {m.group(1): _expand(m.group(2))
            for m in re.finditer(r'"([a-z]+)(?:\[[^\]]*\])?==([0-9.]+|\$\{\w+\})"', DOCKERFILE)}


def test_pins_equal_pyprojects():
    pyproject, docker = _pyproject_pins(), _dockerfile_pins()
    assert set(PINNED) <= set(pyproject), f"pyproject lacks pins for {set(PINNED) - set(pyproject)}"
    for name in PINNED:
        assert docker.get(name) == pyproject[name], f"{name}: Dockerfile {docker.get(name)}, pyproject {pyproject[name]}"
    # the post-install check asserts the same versions (ray through RAY_VERSION, torch through TORCH_VERSION)
    check = _expand(DOCKERFILE[DOCKERFILE.index("want = {"):])
    for name in PINNED[1:]:
        assert f"'{name}': '{pyproject[name]}'" in check, name
    assert f"torch.__version__ == '{pyproject['torch']}+{_args()['CUDA']}'" in check


def test_base_image_cuda_matches_the_torch_index_and_the_tags_agree():
    args = _args()
    base = _expand(re.search(r"^FROM\s+(\S+)", DOCKERFILE, re.MULTILINE).group(1))
    assert base == f"rayproject/ray:{args['RAY_VERSION']}-py311-{args['CUDA']}"
    assert re.fullmatch(r"cu1[0-9]{2}", args["CUDA"])
    (index,) = re.findall(r"--index-url\s+\"?(\S+?)\"?\s*$", DOCKERFILE, re.MULTILINE)
    assert _expand(index) == f"https://download.pytorch.org/whl/{args['CUDA']}"
    assert args["RAY_VERSION"] == spec.RAY_VERSION and args["CUDA"] == spec.CUDA
    assert base.split(":", 1)[1] == spec.IMAGE_TAG
    makefile = (ROOT / "Makefile").read_text()
    image = re.search(r"^IMAGE\s*\?=\s*(\S+)", makefile, re.MULTILINE).group(1)
    assert image == f"{spec.IMAGE_NAME}:{spec.IMAGE_TAG}"
    assert re.search(r"^image:", makefile, re.MULTILINE) and "docker build -t $(IMAGE) ." in makefile
    assert f'test "$(id -u):$(id -g)" = "{spec.RAY_UID}:{spec.RAY_GID}"' in DOCKERFILE


def _copied() -> dict[str, str]:
    """Image path under WORKDIR -> repository path, from the Dockerfile's COPY lines."""
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE, re.MULTILINE).group(1)
    assert workdir == spec.APP_DIR
    copied = {}
    for line in re.findall(r"^COPY\s+(.+)$", DOCKERFILE, re.MULTILINE):
        parts = [p for p in line.split() if not p.startswith("--")]
        *sources, dest = parts
        for src in sources:
            target = dest.rstrip("/") + "/" + src if dest.endswith("/") else dest
            copied[str(Path(target.replace("./", "", 1)))] = src
    return copied


def _in_image(relative: str) -> bool:
    """A file or folder (relative to WORKDIR) the Dockerfile copies and .dockerignore does not exclude."""
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    parts = Path(relative).parts
    if any(fnmatch.fnmatch(parts[0], pat) or fnmatch.fnmatch(relative, pat) for pat in ignored):
        return False
    return any(relative == c or relative.startswith(c + "/") for c in _copied()) and (ROOT / relative).exists()


def test_every_path_the_manifests_name_in_the_image_is_copied():
    names = {"pyproject.toml", "benchmarks/gpu.py", "benchmarks/table.py"}
    t = spec.Target()
    for stage in spec.stages(t):
        argv = shlex.split(stage.entrypoint)
        names.add(argv[2].replace(".", "/") + ".py")  # python -m pipelines.<stage>
        names.add(argv[argv.index("--config") + 1])
    serve = yaml.safe_load(pods.serve_config_text())
    for app in serve["applications"]:
        names.add(app["import_path"].split(":")[0].replace(".", "/") + ".py")
    runtime_env = yaml.safe_load(pods.runtime_env(t))
    assert runtime_env["working_dir"] == spec.APP_DIR
    missing = sorted(n for n in names if not _in_image(n))
    assert missing == [], f"named by k8s/ but not in the image: {missing}"


def test_in_image_check_is_not_vacuous():
    assert not _in_image("tests/k8s/test_image.py")  # excluded by .dockerignore, never copied
    assert not _in_image("docs")  # not copied
    assert not _in_image("pipelines/configs/no-such.yaml")
