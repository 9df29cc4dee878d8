"""Every module imports, and the method library never imports Ray (STYLE.md §1)."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["sfo", "pipelines", "serving", "cluster", "experiments"]


def _modules():
    for package in PACKAGES:
        yield package
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_imports(name):
    importlib.import_module(name)


def test_sfo_never_imports_ray():
    """Importing every sfo module with Ray made unimportable still works, and pulls no Ray in."""
    sfo_modules = [m for m in _modules() if m.split(".")[0] == "sfo"]
    code = (
        "import sys; sys.modules['ray'] = None\n"
        f"import importlib\nfor m in {sfo_modules!r}: importlib.import_module(m)\n"
        "assert sys.modules['ray'] is None\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_imports_point_one_way():
    """experiments/ builds on pipelines/ and sfo/; the user's stages and the Serve app never import it."""
    for package in ("sfo", "pipelines", "serving", "cluster"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "from experiments" not in text and "import experiments" not in text, path
