import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffusers import FluxPipeline
from pipelines.main import main, parse_args
from sfo.models import load_flux

ROOT = Path(__file__).resolve().parents[2]


def test_main_job_runs_end_to_end_at_minimal_size(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--samples", "2", "--size", "32", "--sft-steps", "2", "--sfo-steps", "2",
                 "--sample-steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "[6/6]" in printed and "Not run, because not built yet" in printed
    grid = Image.open(out / "grid.png")
    assert grid.size == (5 * 32, 2 * 32)
    pipe = load_flux("tiny", device="cpu").pipe
    for name in ("ref", "sfo"):
        pipe.load_lora_weights(str(out / "adapters" / name), adapter_name=name)
    assert set(pipe.transformer.peft_config) == {"ref", "sfo"}


def test_main_job_help_and_bad_flags():
    result = subprocess.run([sys.executable, "-m", "pipelines.main", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "--sfo-steps" in result.stdout
    with pytest.raises(SystemExit):
        parse_args(["--size", "40"])
