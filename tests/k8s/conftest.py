"""k8s/ holds scripts, not a package: its render.py, spec.py and pods.py import each other by file name (``python
k8s/render.py`` puts k8s/ on sys.path), so the tests here import them the same way."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "k8s"))
