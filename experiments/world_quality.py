"""How well the shapes-world model draws by itself: text-to-image samples (no reference) read back by the oracle.

    python -m experiments.world_quality [--model shapes|FOLDER] [--samples 256] [--text-guidance 1,2,4]
                                        [--world-seed 1000]

The paper starts from FLUX.1-dev, whose text-to-image samples are clean; the world's model plays it,
so its own samples are measured before any adapter is trained on it. Prompts are the target texts of
the held-out cells (world seed 1000, as the evaluation's; ``--world-seed 3000`` for validation cells, where
a choice such as the guidance scale is made), one sample seed each. Reported per text
guidance scale (1 = off; > 1 needs a model pretrained with ``caption_dropout``):

- per prompted attribute (background, position, size, shape, colour): the share read back as prompted;
- ``text``: every prompted attribute right (the issue's target: >= 0.9);
- ``complete``: every attribute of the world read (pattern and accent too, which prompts never name);
- ``off_pixels``: mean share of pixels farther than the oracle's threshold from the world's drawing of
  what was read (``sfo.shapes.oracle.off_pixels``: 0 = drawn exactly);
- ``clean``: ``text`` and ``complete`` and at most ``CLEAN_OFF_PIXELS`` of the pixels off;
- ``patterns``: how often each pattern was drawn (a model mixing patterns reads mostly as one);
- ``text_per_sample``: each sample's ``text`` verdict, to pair two models on the same prompts and seeds.

Writes ``<out>/world_quality.json`` (and ``samples_<w>.png``, the first 64 samples) when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

CLEAN_OFF_PIXELS = 0.02  # ~20 of 1024 pixels: fixed before the first model was measured (2026-12-05)
EVAL_WORLD_SEED = 1000  # the held-out cells' world seed (pipelines.evaluate_shapes)
SAMPLE_SEED = 7000  # sample i draws its noise from seed SAMPLE_SEED + i


def measure(model, samples: int, text_guidance: float, steps: int = 28, batch: int = 32,
            world_seed: int = EVAL_WORLD_SEED) -> tuple[dict, list]:
    """Samples ``samples`` target texts of ``world_seed``'s cells at one text guidance scale.

    Returns (summary, images)."""
    from sfo.sampler import SamplerConfig, generate
    from sfo.shapes import oracle
    from sfo.shapes.world import SIZE, world_triplets

    cells = world_triplets(samples, seed=world_seed)
    config = SamplerConfig(steps=steps, height=SIZE, width=SIZE, text_guidance=text_guidance)
    images = []
    for start in range(0, samples, batch):
        part = cells[start:start + batch]
        images += generate(model, [c.target_text for c in part], [SAMPLE_SEED + start + i for i in range(len(part))],
                           config)
    rows, patterns = [], Counter()
    for image, cell in zip(images, cells):
        reading = oracle.read_image(image)
        verdict = oracle.judge(reading, cell.subject, cell.context)
        off = oracle.off_pixels(image, reading)
        complete = oracle.redraw(reading) is not None
        rows.append({**{k: verdict[k] for k in oracle.TEXT_KEYS}, "text": verdict["text"], "complete": complete,
                     "off_pixels": off, "clean": verdict["text"] and complete and off <= CLEAN_OFF_PIXELS})
        patterns[str(reading.pattern)] += 1
    summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    summary["text_se"] = float(np.sqrt(summary["text"] * (1 - summary["text"]) / samples))
    summary["patterns"] = dict(patterns.most_common())
    summary["text_per_sample"] = [int(r["text"]) for r in rows]  # to pair two models on the same prompts and seeds
    return summary, images


def format_row(guidance: float, s: dict) -> str:
    attributes = " ".join(f"{s[k]:.3f}" for k in ("background", "position", "size", "shape", "colour"))
    return (f"| {guidance:g} | {attributes} | **{s['text']:.3f}** ± {s['text_se']:.3f} | {s['complete']:.3f} | "
            f"{s['off_pixels']:.3f} | {s['clean']:.3f} | {s['seconds']:.0f} |")


HEADER = ("| text guidance | background position size shape colour | text (all prompted) | complete | off pixels "
          "| clean | s |\n|---|---|---|---|---|---|---|")


def save_grid(images: list, path: Path, columns: int = 16, zoom: int = 4) -> None:
    from PIL import Image

    columns = min(columns, len(images))
    images = images[:64 // columns * columns]  # whole rows only
    rows = [np.concatenate([np.asarray(i) for i in images[r:r + columns]], axis=1) for r in range(0, len(images), columns)]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.world_quality", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--model", default="shapes", help="'shapes' (the shipped or cached model) or a pretrained folder")
    parser.add_argument("--samples", type=int, default=256, help="held-out prompts, one sample each (default: 256)")
    parser.add_argument("--steps", type=int, default=28, help="sampling steps (default: 28, paper Sec. 4.1)")
    parser.add_argument("--text-guidance", default="1", help="comma-separated scales (default: 1 = off)")
    parser.add_argument("--world-seed", type=int, default=EVAL_WORLD_SEED,
                        help=f"the cells whose target texts are sampled (default: {EVAL_WORLD_SEED}, the held-out ones; "
                             "3000: validation cells)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="folder for world_quality.json and sample grids")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples: must be at least 1, got {args.samples}")
    try:
        args.text_guidance = [float(w) for w in args.text_guidance.split(",")]
    except ValueError:
        parser.error(f"--text-guidance: expected comma-separated numbers like 1,2,4, got {args.text_guidance!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from sfo.models import load_flux

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_flux(args.model)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    results = {}
    print(HEADER)
    for guidance in args.text_guidance:
        start = time.time()
        summary, images = measure(model, args.samples, guidance, args.steps, world_seed=args.world_seed)
        summary["seconds"] = time.time() - start
        results[f"{guidance:g}"] = summary
        print(format_row(guidance, summary), flush=True)
        if out:
            save_grid(images, out / f"samples_{guidance:g}.png")
    print("patterns drawn: " + "; ".join(f"w={w}: {r['patterns']}" for w, r in results.items()))
    if out:
        record = {"command": "python -m experiments.world_quality " + " ".join(sys.argv[1:] if argv is None else argv),
                  "model": args.model, "world_seed": args.world_seed, "samples": args.samples, "steps": args.steps,
                  "results": results}
        (out / "world_quality.json").write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
