"""The GPU benchmark's machinery on the CPU (a shrunk config; the times mean nothing here, the memory does)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import flux_flops, gpu

ROOT = Path(__file__).resolve().parents[2]


def test_flops_count_hand_worked():
    """FLUX.1 (d = 3072, 19 double + 38 single blocks): every block holds 12 d^2 matmul weights per token, so
    2 x 57 x 12 d^2 FLOPs per query token; attention adds 4 x queries x keys x d per block."""
    config = flux_flops.flux_config()
    d = 3072
    cached = flux_flops.forward_flops(config, 4096, 4096, 512, cached=True)
    assert cached == 2 * 57 * 12 * d * d * 4608 + 57 * 4 * 4608 * 8704 * d
    uncached = flux_flops.forward_flops(config, 4096, 4096, 512, cached=False)
    assert uncached == 2 * 57 * 12 * d * d * 8704 + 57 * 4 * 8704 * 8704 * d
    assert 57 * 12 * d * d == pytest.approx(6.46e9, rel=0.01)  # FLUX's 11.9B weights less the per-sample adaLN ones
    assert flux_flops.condition_flops(config, 1024) == 2 * 57 * 12 * d * d * 1024 + 57 * 4 * 1024 * 1024 * d


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L40", 181.0),
    ("NVIDIA A10G", 70.0),
    ("NVIDIA GeForce RTX 4090", 165.0),
    ("Tesla T4", None),
])
def test_peak_by_device_name(name, peak):
    assert flux_flops.peak_tflops(name) == peak


def test_an_oom_row_is_reported_and_the_next_row_runs(tmp_path, capsys):
    def out_of_memory():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def broken():
        raise KeyError("a bug in one row")

    rows = [gpu.Row("big", "a row that runs out of memory", out_of_memory, 1e12, 1, 100.0, 1),
            gpu.Row("small", "a row that fits", lambda: torch.ones(3), 1e12, 1, 1.0, 2),
            gpu.Row("bug", "a row with a bug", broken, 1e12, 1, 1.0, 1)]
    results = gpu.run_rows(rows, "cpu", peak=100.0, json_path=tmp_path / "rows.json")
    assert [r["status"] for r in results][:2] == ["OOM", "ok"]
    assert results[2]["status"].startswith("error: KeyError")
    assert results[1]["seconds"] >= 0 and results[1]["mfu"] is not None
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == gpu.HEADER.splitlines()[0]
    assert "| big |" in lines[2] and "| OOM |" in lines[2] and "| small |" in lines[3]
    assert "| bug |" in lines[4] and "error: KeyError" in lines[4]
    assert [r["id"] for r in json.loads((tmp_path / "rows.json").read_text())] == ["big", "small", "bug"]


def test_the_shipped_config_is_flux1_dev():
    config = flux_flops.flux_config()
    assert (config["num_layers"], config["num_single_layers"], config["num_attention_heads"]) == (19, 38, 24)
    assert config["guidance_embeds"] is True and config["axes_dims_rope"] == [16, 56, 56]


def test_the_benchmark_runs_shrunk_on_the_cpu(tmp_path, capsys):
    """Every row, finite numbers, and the memory plan beside each measured peak (on the CPU: the exact live-tensor
    peak plus the weights), within 25%."""
    out = tmp_path / "gpu.json"
    assert gpu.main(["--shrink", "--device", "cpu", "--size", "32", "--steps", "1", "--repeats", "1",
                     "--serve-repeats", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["id"] for r in rows] == ["cdns-b1-cache", "cdns-b1-nocache", "cdns-b4-cache", "cdns-b4-nocache", "serve-b1",
                                       "sfo-b4-ckpt-stored", "sfo-b4-ckpt-live", "sfo-b4-nockpt-stored", "sfo-b4-nockpt-live"]
    for row in rows:
        assert row["status"] == "ok", row
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("seconds", "tflops", "peak_gib", "estimate_gib")), row
        assert row["estimate_gib"] == pytest.approx(row["peak_gib"], rel=0.25), row
    assert rows[4]["p95"] >= rows[4]["p50"] > 0
    table = capsys.readouterr().out.split("| row |")[1]
    assert table.count("| cdns-") == 4 and table.count("| sfo-") == 4 and "| serve-b1 |" in table


def test_rows_filter_and_help(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu.main(["--shrink", "--device", "cpu", "--size", "16", "--steps", "1", "--rows", "serve-*",
                     "--serve-repeats", "1", "--json", str(out)]) == 0
    assert [r["id"] for r in json.loads(out.read_text())] == ["serve-b1"]
    with pytest.raises(SystemExit):
        gpu.main(["--help"])
    assert "--peak-tflops" in capsys.readouterr().out


def test_the_benchmark_imports_without_ray_deepspeed_or_prodigy():
    """The GPU machine has torch, transformers, peft and a diffusers wheel, nothing of the cluster side."""
    code = ("import sys\nfor m in ('ray', 'deepspeed', 'prodigyopt', 'pipelines'): sys.modules[m] = None\n"
            "import benchmarks.gpu\nimport sfo.adapters, sfo.latents, sfo.memory, sfo.objectives, sfo.text, sfo.transformer\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
