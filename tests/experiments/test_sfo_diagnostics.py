"""sfo_diagnostics: the four error terms of Eq. 3, before and after an SFO LoRA."""

import subprocess
import sys
from pathlib import Path

import torch

from experiments.sfo_diagnostics import error_shift
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
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B.sfo" in name:
                param.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    moved = error_shift(fresh_flux, rows, [0.5])[0]
    assert moved["policy_err_pos"] != moved["ref_err_pos"]


def test_help():
    result = subprocess.run([sys.executable, "-m", "experiments.sfo_diagnostics", "--help"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0 and "--adapters" in result.stdout
