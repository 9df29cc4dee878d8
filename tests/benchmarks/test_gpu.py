"""The GPU benchmark's machinery on the CPU (a shrunk config; the numbers mean nothing here)."""

import pytest

from benchmarks import gpu


def test_flops_count_hand_worked():
    """FLUX.1 (d = 3072, 19 double + 38 single blocks): every block holds 12 d^2 matmul weights per token, so
    2 x 57 x 12 d^2 FLOPs per query token; attention adds 4 x queries x keys x d per block."""
    config = gpu.flux_config() if gpu.LAYOUT.is_file() else pytest.skip("../shared/data/flux1-layout is absent")
    d = 3072
    cached = gpu.forward_flops(config, 4096, 4096, 512, cached=True)
    assert cached == 2 * 57 * 12 * d * d * 4608 + 57 * 4 * 4608 * 8704 * d
    uncached = gpu.forward_flops(config, 4096, 4096, 512, cached=False)
    assert uncached == 2 * 57 * 12 * d * d * 8704 + 57 * 4 * 8704 * 8704 * d
    assert 57 * 12 * d * d == pytest.approx(6.46e9, rel=0.01)  # FLUX's 11.9B weights less the per-sample adaLN ones


def test_the_benchmark_runs_shrunk_on_the_cpu(capsys):
    if not gpu.LAYOUT.is_file():
        pytest.skip("../shared/data/flux1-layout is absent")
    assert gpu.main(["--shrink", "--device", "cpu", "--size", "32", "--steps", "1", "--repeats", "1"]) == 0
    table = capsys.readouterr().out.split("| what |")[1]
    assert table.count("CDNS sampling") == 4 and table.count("SFO step") == 4
