"""How well an SFT base copies the subject: one "ref" LoRA trained in one process (no Ray), then judged.

    python -m experiments.sft_strength [--model shapes|FOLDER] [--steps 2400] [--rank 16] [--triplets 512]
    python -m experiments.sft_strength --ref sfo/shapes/ref     # judge a trained one (the shipped SFT base)

A screen for the levers of the SFT base (steps, rank, data, the base model), before the jobs confirm one:
the same pieces as ``experiments.screen``'s SFT (Prodigy as the jobs use it, per-sample seeding, the
objective of paper Eq. 1 on the condition tokens), then ``--eval`` held-out cells (world seed 1000, cell i
sampled with seed i; ``--world-seed 3000`` for validation cells, where a lever is decided) with the reference,
read by the oracles; ``--text-guidance W`` samples with text guidance (a model pretrained with caption dropout).
Prints one JSON line (subject fidelity, fine, coarse, text, pattern, accent, off pixels, seconds, the pattern
copied per reference pattern); ``--out`` also keeps it in result.json with each cell's verdict, the adapter and a
grid (references on the first row, then samples).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

EVAL_WORLD_SEED = 1000


def judge_ref(model, cells, image_guidance: float = 1.0, batch: int = 32,
              text_guidance: float = 1.0) -> tuple[dict, list]:
    """Samples each held-out cell with its reference (seed = its index) and averages the oracle's verdicts."""
    from sfo.sampler import SamplerConfig, generate
    from sfo.shapes import oracle
    from sfo.shapes.world import SIZE

    config = SamplerConfig(steps=28, height=SIZE, width=SIZE, image_guidance=image_guidance,
                           text_guidance=text_guidance)
    images = []
    for start in range(0, len(cells), batch):
        part = cells[start:start + batch]
        images += generate(model, [c.target_text for c in part], list(range(start, start + len(part))), config,
                           [c.reference for c in part])
    verdicts = [oracle.judge(oracle.read_image(i), c.subject, c.context) for i, c in zip(images, cells)]
    keys = ("subject", "fine", "coarse", "text", "pattern", "accent")
    result = {k: float(np.mean([v[k] for v in verdicts])) for k in keys}
    result["subject_se"] = float(np.sqrt(result["subject"] * (1 - result["subject"]) / len(cells)))
    result["off_pixels"] = float(np.mean([oracle.off_pixels(i) for i in images]))
    result["subject_per_cell"] = [int(v["subject"]) for v in verdicts]  # to pair two bases on the same cells
    by_pattern = {}  # the pattern copied, per the reference's pattern (experiments.failures, for one adapter)
    for verdict, cell in zip(verdicts, cells):
        by_pattern.setdefault(cell.subject.pattern, []).append(verdict["pattern"])
    result["pattern_by_reference"] = {p: float(np.mean(v)) for p, v in sorted(by_pattern.items())}
    return result, images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.sft_strength", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--model", default="shapes", help="'shapes' or a pretrained shapes-world folder")
    parser.add_argument("--steps", type=int, default=2400, help="SFT steps (default: 2400; 0 = the model alone)")
    parser.add_argument("--rank", type=int, default=16, help="rank of the 'ref' LoRA (default: 16)")
    parser.add_argument("--triplets", type=int, default=512, help="training triplets, world seed 0 (default: 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="(default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument("--eval", type=int, default=256, help="held-out cells judged (default: 256)")
    parser.add_argument("--world-seed", type=int, default=EVAL_WORLD_SEED,
                        help=f"the judged cells' world seed (default: {EVAL_WORLD_SEED}, the held-out ones; "
                             "3000: validation)")
    parser.add_argument("--text-guidance", type=float, default=1.0,
                        help="text guidance scale when judging (default: 1 = off; > 1 needs a model pretrained "
                             "with caption dropout)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--ref", default=None,
                        help="judge this trained 'ref' LoRA folder instead of training one (e.g. sfo/shapes/ref)")
    parser.add_argument("--out", default=None, help="folder for the adapter, result.json and grid.png")
    args = parser.parse_args(argv)
    for name in ("rank", "triplets", "batch_size", "eval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be at least 1")
    if args.steps < 0:
        parser.error("--steps: must be >= 0")
    if args.world_seed == 0:
        parser.error("--world-seed: 0 is the training triplets' seed; judge held-out (1000) or validation (3000) cells")

    import torch

    from experiments.screen import encoded, train
    from experiments.world_quality import save_grid
    from sfo import adapters as A
    from sfo.models import load_flux
    from sfo.objectives import sft_objective
    from sfo.shapes.world import world_triplets

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_flux(args.model, device="cpu")
    torch.manual_seed(args.seed)
    started = time.time()
    if args.ref:
        A.load_adapter(model.transformer, args.ref, A.REF)
    elif args.steps:
        A.add_lora(model.transformer, A.REF, args.rank, init="gaussian")
        data = encoded(model, world_triplets(args.triplets, 0))
        train(model, lambda b, t, n: sft_objective(model.transformer, b, t, n, adapters=[A.REF]), data, args.steps,
              args.batch_size, args.seed, A.trainable_parameters(model.transformer), lambda m: print(m, flush=True))
    trained = time.time() - started
    cells = world_triplets(args.eval, args.world_seed)
    result, images = judge_ref(model, cells, text_guidance=args.text_guidance)
    result.update(world_seed=args.world_seed, text_guidance=args.text_guidance, train_s=round(trained),
                  eval_s=round(time.time() - started - trained),
                  command="python -m experiments.sft_strength " + " ".join(sys.argv[1:] if argv is None else argv))
    print(json.dumps({k: v for k, v in result.items() if k != "subject_per_cell"}), flush=True)  # the list: result.json
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        if args.steps and not args.ref:
            A.save_adapter(model.transformer, A.REF, out / "ref")
        save_grid([c.reference for c in cells[:16]] + images[:48], out / "grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
