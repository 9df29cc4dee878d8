"""Step times of the shapes-world model on this machine: pretraining, SFT, SFO and sampling.

    python benchmarks/world_speed.py [--batch 8] [--repeats 5]

Needs the pretrained shapes model (python -m pipelines.pretrain). In-process, no Ray: these are
the compute floors under the jobs' wall times, which ``python -m experiments.reproduce`` prints per
stage (Ray start-up and checkpointing on top). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

from sfo import adapters as A
from sfo.models import load_flux
from sfo.objectives import encode_batch, sfo_objective, sft_objective
from sfo.sampler import SamplerConfig, generate
from sfo.shapes.world import SIZE, world_triplets


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="samples per training step (default 8, as reproduce)")
    parser.add_argument("--samples", type=int, default=50, help="images per sampling call (default 50)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = load_flux("shapes", device="cpu")
    transformer = model.transformer
    A.add_lora(transformer, A.REF, A.REF_RANK)
    A.add_lora(transformer, A.SFO, A.SFO_RANK)
    triplets = world_triplets(max(args.batch, args.samples), seed=0)
    batch_triplets = triplets[: args.batch]
    batch = encode_batch(model, [t.reference for t in batch_triplets], [t.target_text for t in batch_triplets],
                         [t.target for t in batch_triplets], negatives=[t.target for t in reversed(batch_triplets)])
    t = torch.full((args.batch,), 0.5)
    noise = torch.randn(batch.target.shape)

    def step(loss_fn, trainable: str):
        def run():
            A.set_trainable(transformer, [trainable])
            loss = loss_fn().mean()
            loss.backward()
            transformer.zero_grad(set_to_none=True)
        return run

    rows = [
        ("pretrain step (no reference, all weights)", args.batch, _seconds(
            lambda: sft_objective(transformer.requires_grad_(True), _no_condition(batch), t, noise, adapters=[])[0]
            .mean().backward(), args.repeats)),
        ("sft step ('ref' LoRA, reference tokens)", args.batch, _seconds(
            step(lambda: sft_objective(transformer, batch, t, noise, adapters=[A.REF])[0], A.REF), args.repeats)),
        ("sfo step (pair, reference pass + policy pass)", args.batch, _seconds(
            step(lambda: sfo_objective(transformer, batch, t, noise, beta=1000.0)[0], A.SFO), args.repeats)),
    ]
    sampler = SamplerConfig(steps=28, height=SIZE, width=SIZE)
    sample = triplets[: args.samples]
    with A.use_adapters(transformer, [A.REF, A.SFO]):
        seconds = _seconds(lambda: generate(model, [x.target_text for x in sample], list(range(len(sample))), sampler,
                                            [x.reference for x in sample]), 1)
    rows.append(("sampling, 28 steps, with reference", args.samples, seconds))
    print(f"shapes-world model, CPU, torch threads={torch.get_num_threads()}")
    print(f"{'what':<48} {'batch':>5} {'s/call':>8} {'samples/s':>10}")
    for name, n, s in rows:
        print(f"{name:<48} {n:>5} {s:>8.3f} {n / s:>10.1f}")


def _no_condition(batch):
    from dataclasses import replace

    return replace(batch, condition=None)


if __name__ == "__main__":
    main()
