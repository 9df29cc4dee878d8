"""GPU benchmark: FLUX.1-dev's transformer (the real config, random bf16 weights, no download) at 512x512
target + 512x512 reference + 512 text tokens, the way this project runs it.

    python -m benchmarks.gpu                     # on a GPU: one table, a few minutes
    python -m benchmarks.gpu --shrink --device cpu   # the machinery on a CPU (tests run this; numbers mean nothing)

Rows: CDNS sampling s/image (28 steps, guidance 3.5) at batch 1 and 4 with the reference's keys/values
cached (``sfo.transformer.encode_condition``) and without (the masked joint sequence at every step),
optionally with ``torch.compile``; the SFO step s/iteration at batch 4 with gradient checkpointing on/off
and the reference pass run or given (``cdns.score.draws``). Each row: seconds, achieved TFLOP/s and MFU
against the device's bf16 peak (FLOPs from the config: 2 x matmul parameters x tokens, plus attention
4 x tokens^2 x inner dim per layer; backward counted as 2x forward), and peak memory. Text and VAE encoders
are not run: random embeddings of the right shapes stand in for them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

LAYOUT = Path(__file__).resolve().parents[2] / "shared" / "data" / "flux1-layout" / "transformer" / "config.json"
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 70.0, "4090": 165.0}
SHRUNK = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
          "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": [4, 6, 6]}


def flux_config(path: Path = LAYOUT, shrink: bool = False) -> dict:
    """The transformer config of the real FLUX.1 layout, as FLUX.1-dev (guidance embedding on); shrunk for CPUs."""
    if not path.is_file():
        raise FileNotFoundError(f"--config: {path} does not exist; pass FLUX.1's transformer/config.json "
                                "(../shared/data/flux1-layout has it)")
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    config["guidance_embeds"] = True  # FLUX.1-dev distils guidance into an embedding (the layout file is schnell's shape)
    return config | (SHRUNK if shrink else {})


def forward_flops(config: dict, target: int, reference: int, text: int, cached: bool) -> float:
    """One transformer forward's FLOPs for the target's velocity: 2 x matmul parameters x tokens through every
    block, plus attention 4 x (queries x keys) x inner dim per layer. With the reference cached, its tokens only
    add keys (their own pass is counted once per image, not per step)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * inner
    double = 4 * inner * inner + 2 * inner * mlp  # a token's stream (image or text): q, k, v, out; MLP in and out
    single = 3 * inner * inner + inner * mlp + (inner + mlp) * inner  # q, k, v; MLP in; the fused output projection
    queries = target + text + (0 if cached else reference)
    keys = target + text + reference
    per_token = config["num_layers"] * double + config["num_single_layers"] * single  # adaLN layers: per sample, left out
    attention = (config["num_layers"] + config["num_single_layers"]) * 4 * queries * keys * inner
    return 2 * per_token * queries + attention


def _timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (and compile)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def run(shrink: bool, device: str, size: int, steps: int, repeats: int, compile_: bool, peak: float | None) -> list[dict]:
    from diffusers import FluxTransformer2DModel

    from sfo.adapters import REF, REF_RANK, SFO, SFO_RANK, add_lora
    from sfo.latents import condition_ids, grid_ids
    from sfo.objectives import TrainBatch, reference_errors, sfo_objective
    from sfo.text import TextEmbeddings
    from sfo.transformer import Condition, encode_condition, flux_forward

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = flux_config(shrink=shrink)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel.from_config(config).to(device, dtype)
    add_lora(transformer, REF, REF_RANK, init="gaussian")
    side = size // 16  # 8x VAE, 2x2 packing
    tokens, text_tokens = side * side, 512 if not shrink else 16
    img_ids, ref_ids = grid_ids(side, side).to(device), condition_ids(side, side).to(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    def inputs(n: int):
        text = TextEmbeddings(torch.randn(n, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype),
                              torch.randn(n, config["pooled_projection_dim"], device=device, dtype=dtype),
                              torch.zeros(text_tokens, 3, device=device, dtype=dtype))
        latents = lambda: torch.randn(n, tokens, 64, device=device, dtype=dtype)  # noqa: E731
        return text, latents, torch.full((n,), 3.5, device=device)

    rows = []

    def row(what: str, seconds: float, flops: float) -> None:
        memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        tflops = flops / seconds / 1e12
        rows.append({"what": what, "seconds": seconds, "tflops": tflops,
                     "mfu": tflops / peak if peak else float("nan"), "peak_gib": memory})
        print(f"{what}: {seconds:.3f} s", flush=True)

    forward = torch.compile(flux_forward) if compile_ else flux_forward
    for batch in (1, 4):
        text, latents, guidance = inputs(batch)
        condition = Condition(latents(), ref_ids)
        for cached in (True, False):
            def sample() -> None:
                with torch.no_grad():
                    c = encode_condition(transformer, condition, text.pooled, guidance) if cached else condition
                    x = latents()
                    for i in range(steps):
                        t = torch.full((batch,), 1 - i / steps, device=device)
                        x = x - (1 / steps) * forward(transformer, x, img_ids, text, t, guidance, c, joint=not cached)

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = _timed(sample, repeats, device)
            flops = batch * steps * forward_flops(config, tokens, tokens, text_tokens, cached)
            row(f"CDNS sampling, batch {batch}, {steps} steps, K/V cache {'on' if cached else 'off'}"
                + (", compiled" if compile_ else ""), seconds / batch, flops / batch)

    add_lora(transformer, SFO, SFO_RANK)
    text, latents, _ = inputs(4)
    batch = TrainBatch(latents(), text, Condition(latents(), ref_ids), img_ids, latents())
    t, noise = torch.rand(4, device=device), latents()
    stored = reference_errors(transformer, batch, t, noise)
    for checkpointing in (False, True):
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        for given in (False, True):
            def step() -> None:
                loss, _ = sfo_objective(transformer, batch, t, noise, beta=1000.0,
                                        **({"ref_errors": stored} if given else {}))
                loss.mean().backward()
                transformer.zero_grad(set_to_none=True)

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = _timed(step, repeats, device)
            per_pass = 2 * 4 * forward_flops(config, tokens, tokens, text_tokens, True)  # positive + negative
            flops = per_pass * (3 + (0 if given else 1) + (1 if checkpointing else 0))  # fwd + 2x bwd, ref, recompute
            row(f"SFO step, batch 4, checkpointing {'on' if checkpointing else 'off'}, reference "
                + ("stored" if given else "pass"), seconds, flops)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shrink", action="store_true", help="a tiny config: checks the machinery on a CPU")
    parser.add_argument("--size", type=int, default=512, help="target and reference side in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer forward")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: by name)")
    args = parser.parse_args(argv)
    if args.size % 16:
        parser.error(f"--size: a multiple of 16, got {args.size}")
    rows = run(args.shrink, args.device, args.size, args.steps, args.repeats, args.compile, args.peak_tflops)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\n{name}, FLUX.1-dev transformer{' (shrunk)' if args.shrink else ''}, {args.size}x{args.size} target + "
          f"reference, {time.strftime('%Y-%m-%d')}")
    print("| what | s | TFLOP/s | MFU | peak GiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['seconds']:.3f} | {r['tflops']:.1f} | {r['mfu']:.2f} | {r['peak_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
