"""Where an SFO run moved the model: flow-matching errors of positives and negatives, before and after.

    python -m experiments.sfo_diagnostics --model shapes --adapters RUN/train/sfo/adapters \\
        --data RUN/data/cdns-r2 [--rows 64] [--size 32]

For each quadruplet and each t in ``--t``, with one fixed noise per row, the errors of the
reference model p_ref ("ref") and of the policy p_theta ("ref" + "sfo") on the positive and on
the negative target (the four terms of paper Eq. 3). SFO's loss falls when the policy's
negative error rises relative to the reference's, or its positive error falls; this prints which
of the two happened, per t. Run it on the training negatives and on another negative set to see
whether the move generalises.
"""

from __future__ import annotations

import argparse
import sys

import pyarrow.dataset as pads
import torch

from sfo import adapters as A
from sfo.models import load_flux
from sfo.objectives import encode_batch, sfo_objective
from sfo.records import decode_png


def error_shift(model, rows: list[dict], ts: list[float], seed: int = 0) -> list[dict]:
    """Mean reference / policy errors on positives and negatives at each t."""
    batch = encode_batch(model, [decode_png(r["reference_png"]) for r in rows], [r["target_text"] for r in rows],
                         [decode_png(r["target_png"]) for r in rows], [decode_png(r["negative_png"]) for r in rows])
    noise = torch.randn(batch.target.shape, generator=torch.Generator().manual_seed(seed)).to(batch.target)
    out = []
    for t in ts:
        with torch.no_grad():
            _, stats = sfo_objective(model.transformer, batch, torch.full((len(rows),), t), noise, beta=1000.0)
        means = {k: float(stats[k].float().mean()) for k in ("ref_err_pos", "policy_err_pos", "ref_err_neg",
                                                             "policy_err_neg", "implicit_accuracy")}
        out.append({"t": t, **means})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.sfo_diagnostics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="'shapes', 'tiny' or a local FLUX.1-dev folder")
    parser.add_argument("--adapters", required=True, help="the sfo job's adapters folder (holding ref/ and sfo/)")
    parser.add_argument("--data", required=True, help="quadruplet Parquet (a cdns output)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side the adapters were trained at")
    parser.add_argument("--t", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    args = parser.parse_args(argv)
    model = load_flux(args.model, device="cpu")
    for name in (A.REF, A.SFO):
        A.load_adapter(model.transformer, f"{args.adapters}/{name}", name)
    rows = pads.dataset(args.data, format="parquet").head(args.rows).to_pylist()
    for r in rows:
        for key in ("reference_png", "target_png", "negative_png"):
            image = decode_png(r[key])
            if image.size != (args.size, args.size):
                raise ValueError(f"--size: {key} of {r['sample_id']} is {image.size}; pass --size {image.size[0]}")
    print(f"{'t':>5} {'ref pos':>9} {'policy pos':>11} {'ref neg':>9} {'policy neg':>11} {'d pos':>8} {'d neg':>8} {'acc':>6}")
    for r in error_shift(model, rows, args.t):
        print(f"{r['t']:>5.2f} {r['ref_err_pos']:>9.4f} {r['policy_err_pos']:>11.4f} {r['ref_err_neg']:>9.4f} "
              f"{r['policy_err_neg']:>11.4f} {r['policy_err_pos'] - r['ref_err_pos']:>+8.4f} "
              f"{r['policy_err_neg'] - r['ref_err_neg']:>+8.4f} {r['implicit_accuracy']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
