"""Seconds per image of the subject-conditioned sampler, reference keys/values cached vs not.

    python benchmarks/sampler_speed.py            # tiny model, CPU: 128x128 target and reference, 28 steps

Prints numbers; asserts nothing. "off" runs the literal masked joint sequence
[text, target, reference] through every block at every step (OminiControl's way); "on" computes the
reference's keys/values once per image and attends to them from the text and target tokens.

``fused_vs_lora`` (a row of ``make bench``): images/s of the shapes model with a rank-4 "ref" adapter
folded into the base weights (``sfo.adapters.fused_adapters``, what evaluation and cdns sample with)
over the same adapter applied as LoRA layers (``use_adapters``), one batch, back to back.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from sfo.models import load_flux
from sfo.sampler import SamplerConfig, sample_latents


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def fused_vs_lora(batch: int = 16, steps: int = 28, repeats: int = 2) -> dict[str, float]:
    """Images/s of the world model sampling 32-px world triplets with a random rank-4 "ref" adapter,
    ``fused`` and as ``lora`` layers, in this process."""
    from sfo import adapters
    from sfo.shapes.world import SIZE, world_triplets

    model = load_flux("shapes", device="cpu")
    adapters.add_lora(model.transformer, adapters.REF, adapters.REF_RANK)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if ".ref." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    triplets = world_triplets(batch, seed=1000)
    cfg = SamplerConfig(steps=steps, height=SIZE, width=SIZE)

    def sample():
        sample_latents(model, [t.target_text for t in triplets], list(range(batch)), cfg, [t.reference for t in triplets])

    rates = {}
    for label, context in (("lora", adapters.use_adapters), ("fused", adapters.fused_adapters)):
        with context(model.transformer, [adapters.REF]):
            rates[label] = batch / _seconds(sample, repeats)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' or a local FLUX.1-dev folder")
    parser.add_argument("--size", type=int, default=128, help="target and reference side in pixels (default 128)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    model = load_flux(args.model)
    rng = np.random.default_rng(0)
    print(f"model={model.source} device={model.device} dtype={model.dtype} size={args.size} steps={args.steps} "
          f"torch threads={torch.get_num_threads()}")
    print(f"{'batch':>5} {'cache':>6} {'s/image':>9} {'vs off':>7}")
    for batch in args.batch:
        refs = [Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(batch)]
        prompts = [f"a photo of subject {i}" for i in range(batch)]
        seconds = {}
        for cached in (False, True):
            cfg = SamplerConfig(steps=args.steps, height=args.size, width=args.size, cache_condition=cached)
            seconds[cached] = _seconds(lambda: sample_latents(model, prompts, list(range(batch)), cfg, refs),
                                       args.repeats) / batch
        for cached in (False, True):
            print(f"{batch:>5} {'on' if cached else 'off':>6} {seconds[cached]:>9.4f} {seconds[False] / seconds[cached]:>6.2f}x")


if __name__ == "__main__":
    main()
