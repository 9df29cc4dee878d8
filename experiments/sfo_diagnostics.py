"""Where an SFO run moved the model: flow-matching errors of positives and negatives, before and after.

    python -m experiments.sfo_diagnostics --model shapes --adapters RUN/train/sfo/adapters \\
        --data RUN/data/cdns-r2 [--rows 64] [--draws 4] [--size 32]

For each quadruplet and each t in ``--t``, with ``--draws`` fixed noises per row, the errors of the
reference model p_ref ("ref") and of the policy p_theta ("ref" + "sfo") on the positive and on
the negative target (the four terms of paper Eq. 3). SFO's loss falls when the policy's
negative error rises relative to the reference's, or its positive error falls; this prints which
of the two happened, per t, each rise with its paired standard error over rows (``sfo.stats``), and
says whether the positive's error rose (>= 3 SE) at any t. Run it on the training negatives and on
another negative set to see whether the move generalises.
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
from sfo.stats import CLAIM_SE, paired_difference

TERMS = ("ref_err_pos", "policy_err_pos", "ref_err_neg", "policy_err_neg", "implicit_accuracy")


def error_shift(model, rows: list[dict], ts: list[float], seed: int = 0, draws: int = 1) -> list[dict]:
    """Per t: the mean reference / policy errors on positives and negatives (each row's errors averaged
    over ``draws`` noises, seeds ``seed`` ..), and ``rise_pos`` / ``rise_neg``: the policy's error minus
    the reference's, paired over rows (``sfo.stats.paired_difference``: ``diff``, ``se``, ``z``)."""
    if draws < 1 or len(rows) < 2:
        raise ValueError(f"--draws/--rows: need at least 1 draw and 2 rows, got {draws} and {len(rows)}")
    batch = encode_batch(model, [decode_png(r["reference_png"]) for r in rows], [r["target_text"] for r in rows],
                         [decode_png(r["target_png"]) for r in rows], [decode_png(r["negative_png"]) for r in rows])
    noises = [torch.randn(batch.target.shape, generator=torch.Generator().manual_seed(seed + d)).to(batch.target)
              for d in range(draws)]
    out = []
    for t in ts:
        per_row = {k: torch.zeros(len(rows)) for k in TERMS}
        for noise in noises:
            with torch.no_grad():
                _, stats = sfo_objective(model.transformer, batch, torch.full((len(rows),), t), noise, beta=1000.0)
            for k in TERMS:
                per_row[k] += stats[k].float().cpu() / draws
        out.append({"t": t, **{k: float(v.mean()) for k, v in per_row.items()},
                    "rise_pos": paired_difference(per_row["policy_err_pos"].tolist(), per_row["ref_err_pos"].tolist()),
                    "rise_neg": paired_difference(per_row["policy_err_neg"].tolist(), per_row["ref_err_neg"].tolist())})
    return out


def positive_verdict(shift: list[dict]) -> str:
    """Whether the policy's positive error rose above the reference's: at which t, by >= ``CLAIM_SE`` SE."""
    rose = [r["t"] for r in shift if r["rise_pos"]["z"] >= CLAIM_SE]
    fell = [r["t"] for r in shift if r["rise_pos"]["z"] <= -CLAIM_SE]
    if rose:
        return f"the positive's error rose above the reference's (>= {CLAIM_SE:g} SE) at t = {rose}"
    return (f"the positive's error did not rise above the reference's at any t (fell by >= {CLAIM_SE:g} SE at "
            f"t = {fell})" if fell else f"the positive's error did not rise above the reference's at any t "
            f"(no change of {CLAIM_SE:g} SE either way)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.sfo_diagnostics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes", help="'shapes', 'tiny' or a local FLUX.1-dev folder")
    parser.add_argument("--adapters", required=True, help="the sfo job's adapters folder (holding sfo/, and ref/ "
                        "unless --ref is given)")
    parser.add_argument("--ref", default=None, help="the 'ref' adapter folder (default: ADAPTERS/ref)")
    parser.add_argument("--data", required=True, help="quadruplet Parquet (a cdns output)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--draws", type=int, default=4, help="noises per row at each t (default 4)")
    parser.add_argument("--size", type=int, default=32, help="image side the adapters were trained at")
    parser.add_argument("--t", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    args = parser.parse_args(argv)
    model = load_flux(args.model, device="cpu")
    A.load_adapter(model.transformer, args.ref or f"{args.adapters}/{A.REF}", A.REF)
    A.load_adapter(model.transformer, f"{args.adapters}/{A.SFO}", A.SFO)
    rows = pads.dataset(args.data, format="parquet").head(args.rows).to_pylist()
    for r in rows:
        for key in ("reference_png", "target_png", "negative_png"):
            image = decode_png(r[key])
            if image.size != (args.size, args.size):
                raise ValueError(f"--size: {key} of {r['sample_id']} is {image.size}; pass --size {image.size[0]}")
    shift = error_shift(model, rows, args.t, draws=args.draws)
    print(f"{len(rows)} rows x {args.draws} noise(s); d = policy - reference, ± its paired standard error over rows")
    print(f"{'t':>5} {'ref pos':>9} {'policy pos':>11} {'ref neg':>9} {'policy neg':>11} {'d pos':>18} "
          f"{'d neg':>18} {'acc':>6}")
    for r in shift:
        d = {k: f"{r[k]['diff']:+.4f} ± {r[k]['se']:.4f}" for k in ("rise_pos", "rise_neg")}
        print(f"{r['t']:>5.2f} {r['ref_err_pos']:>9.4f} {r['policy_err_pos']:>11.4f} {r['ref_err_neg']:>9.4f} "
              f"{r['policy_err_neg']:>11.4f} {d['rise_pos']:>18} {d['rise_neg']:>18} {r['implicit_accuracy']:>6.2f}")
    print(positive_verdict(shift))
    return 0


if __name__ == "__main__":
    sys.exit(main())
