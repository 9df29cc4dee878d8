"""sfo_diagnostics: the four error terms of Eq. 3, before and after an SFO LoRA."""

import subprocess
import sys
from pathlib import Path

import torch

import pytest

from experiments.sfo_diagnostics import error_shift, positive_verdict
from pipelines.synthetic import synthetic_triplets
from sfo import adapters as A
from sfo.records import encode_png

ROOT = Path(__file__).resolve().parents[2]


def _rows(n=3, size=32):
    triplets = synthetic_triplets(n + 1, size, seed=5)
    return [{"sample_id": t.sample_id, "target_text": t.target_text, "reference_png": encode_png(t.reference),
             "target_png": encode_png(t.target), "negative_png": encode_png(other.target)}
            for t, other in zip(triplets, triplets[1:])]


def test_a_fresh_sfo_lora_moves_nothing_and_a_trained_one_shows(fresh_flux):
    transformer = fresh_flux.transformer
    A.add_lora(transformer, A.REF, A.REF_RANK)
    A.add_lora(transformer, A.SFO, A.SFO_RANK)  # B = 0: the policy equals the reference
    rows = _rows()
    for r in error_shift(fresh_flux, rows, [0.3, 0.7]):
        assert r["policy_err_pos"] == r["ref_err_pos"] and r["policy_err_neg"] == r["ref_err_neg"]
        assert r["rise_pos"]["diff"] == r["rise_pos"]["se"] == 0 and r["rise_neg"]["n"] == 3
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B.sfo" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    moved = error_shift(fresh_flux, rows, [0.5])[0]
    assert moved["policy_err_pos"] != moved["ref_err_pos"]
    assert moved["rise_pos"]["diff"] == pytest.approx(moved["policy_err_pos"] - moved["ref_err_pos"], abs=1e-6)
    assert moved["rise_pos"]["se"] > 0


def test_draws_average_the_errors_of_one_noise_each(fresh_flux):
    A.add_lora(fresh_flux.transformer, A.REF, A.REF_RANK)
    A.add_lora(fresh_flux.transformer, A.SFO, A.SFO_RANK)
    rows = _rows()
    one, other = (error_shift(fresh_flux, rows, [0.5], seed=s)[0] for s in (0, 1))
    both = error_shift(fresh_flux, rows, [0.5], seed=0, draws=2)[0]
    assert one["ref_err_pos"] != other["ref_err_pos"]
    assert both["ref_err_pos"] == pytest.approx((one["ref_err_pos"] + other["ref_err_pos"]) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="--draws"):
        error_shift(fresh_flux, rows, [0.5], draws=0)


def test_the_verdict_names_the_timesteps_where_the_positive_rose():
    def at(t, z):
        return {"t": t, "rise_pos": {"z": z}}

    assert positive_verdict([at(0.1, 3.5), at(0.5, 1.0)]).endswith("rose above the reference's (>= 3 SE) at t = [0.1]")
    assert "did not rise" in positive_verdict([at(0.1, 2.9), at(0.9, -4.0)]) and "t = [0.9]" in positive_verdict(
        [at(0.1, 2.9), at(0.9, -4.0)])
    assert positive_verdict([at(0.1, 0.0)]).endswith("(no change of 3 SE either way)")


def test_help():
    result = subprocess.run([sys.executable, "-m", "experiments.sfo_diagnostics", "--help"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0 and "--adapters" in result.stdout
