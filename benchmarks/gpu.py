"""GPU benchmark: FLUX.1-dev's transformer (its config ships in ``sfo/configs``; random bf16 weights made on the
GPU, no download) at 512x512 target + 512x512 reference + 512 text tokens, the way this project runs it.

    python -m benchmarks.gpu --json gpu.json          # on a GPU: one table, ~2-3 minutes on an H200
    python -m benchmarks.gpu --compile                # + torch.compile rows, last
    python -m benchmarks.gpu --shrink --device cpu    # the machinery on a CPU (tests run this; numbers mean nothing)

Rows (``--rows`` selects by id, shell patterns): CDNS sampling s/image (28 steps) at batch 1 and 4 with the
reference's keys/values cached (``sfo.transformer.encode_condition``) and without (the masked joint sequence
at every step), "ref" folded into the weights as the cdns and serve stages do (``fused_adapters``, once per
row, untimed); a serving-latency row:
batch 1 sampled ``--serve-repeats`` times, p50/p95 seconds per request (what one Serve replica's sampler
spends, no HTTP); the SFO step s/iteration (``sfo.objectives.sfo_objective``) with gradient checkpointing
on/off and the reference errors stored (``cdns.score.draws``) or run live; with ``--compile`` the cached
sampling rows again under ``torch.compile``. Each row: seconds, achieved TFLOP/s and MFU against the device's
dense bf16 peak (FLOPs of the passes actually run: 2 x matmul weights x tokens plus attention 4 x queries x
keys x inner dim per block; a backward counts 1x its forward, as the frozen base computes no weight
gradients; checkpointing adds a forward), the peak memory, and the memory plan's estimate
(``sfo.memory.memory_plan``) beside it. A row that runs out of memory is reported as OOM and the next runs.
Text and VAE encoders are not run: random embeddings of the right shapes stand in for them.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from benchmarks.flux_flops import (GUIDANCE, TEXT_TOKENS, build_transformer, condition_flops, flux_config, forward_flops,
                                   peak_tflops)
from sfo.memory import FLUX1_DEV_CONFIG, GIB, memory_plan

@dataclass
class Row:
    """One benchmark row: ``fn`` runs it once and returns a tensor that must be finite."""

    id: str
    what: str
    fn: Callable[[], torch.Tensor]
    flops: float  # per call
    per: int  # calls' unit divisor: images per call for sampling rows, 1 for steps
    estimate: float  # GiB, the memory plan
    repeats: int
    warmup: Callable[[], torch.Tensor] | None = None
    latency: bool = False  # report p50 / p95 of the single calls
    context: Callable[[], object] | None = None  # a context manager factory entered around the row (not timed)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(row: Row, device: str, peak: float | None, weights_gib: float = 0.0) -> dict:
    """Runs one row: warm-up, ``repeats`` timed calls, peak memory; an out-of-memory error becomes an OOM row."""
    from sfo.memory import LiveTensorBytes

    result = {"id": row.id, "what": row.what, "estimate_gib": row.estimate}
    oom, began = False, time.perf_counter()
    try:
        if device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        probe = LiveTensorBytes() if device != "cuda" else None  # the CPU has no allocator statistics
        with probe if probe is not None else _null(), row.context() if row.context else _null():
            out = (row.warmup or row.fn)()
            times = []
            for _ in range(row.repeats):
                _sync(device)
                started = time.perf_counter()
                out = row.fn()
                _sync(device)
                times.append(time.perf_counter() - started)
        finite = bool(torch.isfinite(out).all())
        memory = (torch.cuda.max_memory_allocated() / GIB if device == "cuda"
                  else weights_gib + probe.peak / GIB)
        seconds = statistics.mean(times) / row.per
        tflops = row.flops / statistics.mean(times) / 1e12
        result |= {"status": "ok" if finite else "non-finite", "seconds": seconds, "tflops": tflops,
                   "mfu": tflops / peak if peak else None, "peak_gib": memory}
        if row.latency:
            ordered = sorted(times)
            result |= {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]}
    except torch.cuda.OutOfMemoryError:
        oom = True  # the traceback holds the row's tensors: free them outside the except block
    except Exception as exc:  # noqa: BLE001 - one broken row must not cost the rows after it on a rented GPU
        oom = "out of memory" in str(exc) or "ALLOC_FAILED" in str(exc)  # cuBLAS / cuDNN workspace failures
        if not oom:
            traceback.print_exc()
            result["status"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    if oom:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        result |= {"status": "OOM", "peak_gib": torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None}
    result["wall_s"] = time.perf_counter() - began  # the row's whole time, warm-up included
    return result


class _eager_after:
    """Leaves ``sfo.transformer``'s blocks eager when a compiled row ends (or fails)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        from sfo.transformer import compile_blocks

        compile_blocks(False)
        return False


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


HEADER = "| row | what | s | TFLOP/s | MFU | peak GiB | plan GiB |\n|---|---|---|---|---|---|---|"


def markdown(result: dict) -> str:
    def num(key: str, fmt: str) -> str:
        value = result.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    seconds = num("seconds", ".3f")
    if "p50" in result:
        seconds = f"p50 {result['p50']:.3f} / p95 {result['p95']:.3f}"
    if result.get("status") == "OOM":
        seconds = "OOM"
    elif str(result.get("status")).startswith("error"):
        seconds = result["status"].split(":")[0] + ": " + result["status"].split(":")[1].strip()
    elif result.get("status") not in (None, "ok"):
        seconds += f" ({result['status']})"
    return (f"| {result['id']} | {result['what']} | {seconds} | {num('tflops', '.1f')} | {num('mfu', '.2f')} | "
            f"{num('peak_gib', '.2f')} | {num('estimate_gib', '.2f')} |")


def run_rows(rows: list[Row], device: str, peak: float | None, json_path: Path | None = None,
             weights_gib: float = 0.0) -> list[dict]:
    """Measures the rows in order, printing each row's table line as it finishes (header first) and rewriting
    ``json_path`` after each, so a run cut short keeps what it measured."""
    print(HEADER, flush=True)
    results = []
    for row in rows:
        results.append(measure(row, device, peak, weights_gib))
        print(markdown(results[-1]), flush=True)
        if json_path is not None:
            json_path.write_text(json.dumps(results, indent=1))
    return results


def selected(row_id: str, patterns: list[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatch(row_id, p) for p in patterns)


def build_rows(transformer, config: dict, args: argparse.Namespace, device: str, dtype: torch.dtype) -> list[Row]:
    """The benchmark's rows, in order (``--compile`` rows last), on a transformer carrying "ref" and "sfo"."""
    from sfo.adapters import REF, fused_adapters
    from sfo.latents import condition_ids, grid_ids
    from sfo.objectives import TrainBatch, reference_errors, sfo_objective
    from sfo.text import TextEmbeddings
    from sfo.transformer import Condition, compile_blocks, encode_condition, flux_forward

    side = args.size // 16  # 8x VAE, 2x2 packing
    tokens, text_tokens = side * side, TEXT_TOKENS if not args.shrink else 16
    img_ids, ref_ids = grid_ids(side, side).to(device), condition_ids(side, side).to(device)
    on = dict(device=device, dtype=dtype)
    plan = dict(image_size=args.size, text_tokens=text_tokens, dtype="bf16" if dtype == torch.bfloat16 else "fp32",
                zero_stage=0, optimizer="none", attention="flash")

    def inputs(n: int):
        text = TextEmbeddings(torch.randn(n, text_tokens, config["joint_attention_dim"], **on),  # (n, Lt, 4096)
                              torch.randn(n, config["pooled_projection_dim"], **on), torch.zeros(text_tokens, 3, **on))
        return text, (lambda: torch.randn(n, tokens, config["in_channels"], **on))  # (n, L, 64) latents

    def sampler(batch: int, cached: bool, forward) -> Callable[[int], torch.Tensor]:
        text, latents = inputs(batch)
        guidance = torch.full((batch,), GUIDANCE, device=device)
        condition = Condition(latents(), ref_ids)

        def sample(steps: int = args.steps) -> torch.Tensor:
            with torch.no_grad():
                c = encode_condition(transformer, condition, text.pooled, guidance) if cached else condition
                x = latents()
                for i in range(steps):  # Euler steps of the flow from t = 1 to 0
                    t = torch.full((batch,), 1 - i / steps, device=device)
                    x = x - (1 / steps) * forward(transformer, x, img_ids, text, t, guidance, c, joint=not cached)
            return x

        return sample

    def sampling_row(batch: int, cached: bool, compiled: bool = False, serve: bool = False) -> Row:
        forward = torch.compile(flux_forward) if compiled else flux_forward
        sample = sampler(batch, cached, forward)
        per_image = args.steps * forward_flops(config, tokens, tokens, text_tokens, cached)
        per_image += condition_flops(config, tokens) if cached else 0
        estimate = memory_plan(config, job="sample", batch_size=batch, kv_cache=cached, fused=True, **plan).total
        kind = f"{'cache' if cached else 'nocache'}{'-compiled' if compiled else ''}"
        what = (f"serving latency, batch 1, {args.steps} steps, K/V cache on, {args.serve_repeats} requests" if serve
                else f"CDNS sampling s/image, batch {batch}, {args.steps} steps, K/V cache {'on' if cached else 'off'}"
                + (", torch.compile" if compiled else ""))
        # Warm-up: 2 steps load the kernels (and compile); a full trajectory would double the row's time.
        return Row("serve-b1" if serve else f"cdns-b{batch}-{kind}", what, sample, batch * per_image,
                   1 if serve else batch, estimate / GIB, args.serve_repeats if serve else args.sample_repeats,
                   warmup=lambda: sample(min(2, args.steps)), latency=serve,
                   # "ref" folded into the weights as the cdns and serve stages do (model.fuse_adapters), once per
                   # row rather than per call (untimed, and torch.compile sees the same weights every call).
                   context=lambda: fused_adapters(transformer, [REF]))

    n = args.sfo_batch
    text, latents = inputs(n)
    batch = TrainBatch(latents(), text, Condition(latents(), ref_ids), img_ids, latents())  # positive, negative
    t, noise = torch.rand(n, device=device), latents()
    stored: list = []

    def training_row(checkpointing: bool, live: bool, compiled: bool = False) -> Row:
        def step() -> torch.Tensor:
            compile_blocks(compiled)
            transformer.gradient_checkpointing = checkpointing  # read by sfo.transformer._run
            if not live and not stored:
                stored.append(reference_errors(transformer, batch, t, noise))  # as cdns.score.draws stores them
            loss, _ = sfo_objective(transformer, batch, t, noise, beta=1000.0, **({} if live else {"ref_errors": stored[0]}))
            loss.mean().backward()
            transformer.zero_grad(set_to_none=True)
            return loss.detach()

        policy = 2 * n * forward_flops(config, tokens, tokens, text_tokens, True) + n * condition_flops(config, tokens)
        flops = policy * (2 + checkpointing) + (policy if live else 0)  # fwd + bwd (1x), recompute, reference pass
        estimate = memory_plan(config, job="sfo", batch_size=n, gradient_checkpointing=checkpointing, **plan).total
        what = (f"SFO step s/it, batch {n}, checkpointing {'on' if checkpointing else 'off'}, "
                f"reference errors {'live' if live else 'stored'}" + (", blocks compiled" if compiled else ""))
        kind = f"{'ckpt' if checkpointing else 'nockpt'}-{'live' if live else 'stored'}{'-compiled' if compiled else ''}"
        # Compiled rows: the warm-up step compiles (minutes on FLUX); the context leaves the blocks eager after.
        return Row(f"sfo-b{n}-{kind}", what, step, flops, 1, estimate / GIB, args.repeats,
                   context=lambda: _eager_after() if compiled else _null())

    rows = [sampling_row(b, cached) for b in (1, 4) for cached in (True, False)]
    rows.append(sampling_row(1, True, serve=True))
    rows += [training_row(True, False), training_row(True, True), training_row(False, False), training_row(False, True)]
    if args.compile:
        rows += [sampling_row(b, True, compiled=True) for b in (1, 4)]
        rows += [training_row(True, False, compiled=True), training_row(True, True, compiled=True)]
    return [row for row in rows if selected(row.id, args.rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", type=Path, default=FLUX1_DEV_CONFIG, help="a FLUX transformer config.json "
                        "(default: FLUX.1-dev's, shipped in sfo/configs)")
    parser.add_argument("--shrink", action="store_true", help="a tiny config: checks the machinery on a CPU")
    parser.add_argument("--size", type=int, default=512, help="target and reference side in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=28, help="sampling steps (default 28, paper Sec. 4.1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed SFO steps per training row (default 2)")
    parser.add_argument("--sample-repeats", type=int, default=1, help="timed calls per sampling row (default 1)")
    parser.add_argument("--serve-repeats", type=int, default=10, help="requests of the serving-latency row (default 10)")
    parser.add_argument("--sfo-batch", type=int, default=4, help="SFO batch N (2N sequences; default 4, paper App. D.2)")
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile rows (last): cached sampling, and SFO steps with the blocks compiled")
    parser.add_argument("--profile", default=None, metavar="ROW",
                        help="after the table, one call of this row under torch.profiler: its top kernels by time")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: by name)")
    parser.add_argument("--rows", type=lambda s: s.split(","), default=None,
                        help="comma-separated row ids or patterns, e.g. 'cdns-*,serve-b1' (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here (after every row)")
    args = parser.parse_args(argv)
    if args.size % 16:
        parser.error(f"--size: a multiple of 16, got {args.size}")
    if min(args.steps, args.repeats, args.sample_repeats, args.serve_repeats, args.sfo_batch) < 1:
        parser.error("--steps, --repeats, --sample-repeats, --serve-repeats, --sfo-batch: each at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible; pass --device cpu --shrink to check the machinery")

    from sfo.adapters import REF, REF_RANK, SFO, SFO_RANK, add_lora

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = flux_config(args.config, shrink=args.shrink)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or peak_tflops(name)
    started = time.perf_counter()
    transformer = build_transformer(config, args.device, dtype)
    add_lora(transformer, REF, REF_RANK, init="gaussian")
    add_lora(transformer, SFO, SFO_RANK)  # trained by the SFO rows; sampling folds "ref" only
    weights_gib = sum(p.numel() * p.element_size() for p in transformer.parameters()) / GIB
    print(f"{name} (bf16 peak {peak or 'unknown'} TFLOP/s), {args.config.name}{' shrunk' if args.shrink else ''}, "
          f"{args.size}x{args.size} target + reference, weights {weights_gib:.1f} GiB made in "
          f"{time.perf_counter() - started:.1f} s, {time.strftime('%Y-%m-%d')}\n", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    rows = build_rows(transformer, config, args, args.device, dtype)
    run_rows(rows, args.device, peak, args.json, weights_gib)
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s", flush=True)
    if args.profile:
        profiled = [row for row in rows if row.id == args.profile]
        if not profiled:
            parser.error(f"--profile: no row {args.profile!r} in this run; use one of {[r.id for r in rows]}")
        print(profile(profiled[0], args.device), flush=True)
    return 0


def profile(row: Row, device: str, top: int = 25) -> str:
    """One call of ``row`` (after a warm-up call) under ``torch.profiler``: the ``top`` kernels by device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with row.context() if row.context else _null():
        row.fn()
        _sync(device)
        with profiler(activities=activities) as prof:
            row.fn()
            _sync(device)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    return f"\n{row.id}, one call:\n" + prof.key_averages().table(sort_by=key, row_limit=top)


if __name__ == "__main__":
    raise SystemExit(main())
