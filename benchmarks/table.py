"""``make bench``: every stage's speed ratio, measured side by side in one run, as one table.

    python -m benchmarks.table [--rows 256]

Ratios, not absolute times: this machine is shared and noisy, so each ratio's two sides run back to
back on the same model, rows and cores (absolute numbers belong to a GPU run). Rows:

- cdns: Ray Data's steady-state rows/s (after its first output file; start-up printed apart) over the
  plain loop's, 1 actor at 0.5 CPU, with Ray's default torch threads (one) and with
  ``scaling.torch_threads`` = the core count.
- sfo on Ray Train + DeepSpeed ZeRO-2: samples/s with 2 workers over 1; step time with the default
  ``ray.train.report`` cadence over reporting only at the end (the reporting overhead), and beside it
  reporting every step with no interval (each report then waits for the controller's next poll).
- sfo step: samples/s with the batch from cached latents (cdns on cached triplets) over from PNGs; and with
  the reference errors stored by cdns (``cdns.score.draws``) over running the reference pass.
- Serve: HTTP p50 latency over a direct in-process call, at about half a second of model work.
- sampling: images/s with the SFT adapter folded into the base weights over applied as LoRA layers
  (evaluation and cdns sample folded), world model, one batch of 16, in process.

Prints numbers; asserts nothing (targets are the issue's, shown beside them).
"""

from __future__ import annotations

import argparse
import os
import platform

from benchmarks import cdns_throughput, sampler_speed, serve_latency, sfo_throughput


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="cdns rows per side (default 256)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    rows: list[tuple[str, str, float, str, str]] = []

    for threads, label in ((None, "Ray's default torch threads"), (cores, f"scaling.torch_threads={cores}")):
        r = cdns_throughput.measure(rows=args.rows, torch_threads=threads)
        rows.append(("cdns", f"Ray Data steady / plain loop, {label}", r["ray_steady_rows_per_s"] / r["loop_rows_per_s"],
                     ">= 0.85", f"{r['ray_steady_rows_per_s']:.2f} vs {r['loop_rows_per_s']:.2f} rows/s; start-up "
                                f"{r['startup_s']:.1f} s; end to end {r['ray_rows_per_s'] / r['loop_rows_per_s']:.2f}x"))
        print(rows[-1], flush=True)
    rates = sfo_throughput.worker_rates()
    rows.append(("sfo (Ray Train)", "2 workers / 1 worker, samples/s", rates[2] / rates[1], ">= 1.6",
                 f"{rates[2]:.2f} vs {rates[1]:.2f} samples/s, 32 px"))
    print(rows[-1], flush=True)
    overhead = sfo_throughput.report_overhead()
    rows.append(("sfo (Ray Train)", "step time, default reporting / at the end only", overhead["default cadence"] /
                 overhead["at the end"], "< 1.05", f"{overhead['default cadence'] * 1000:.0f} vs "
                 f"{overhead['at the end'] * 1000:.0f} ms per step (mean, report calls included), 32 px; every step "
                 f"with no interval: {overhead['every step, no interval'] * 1000:.0f} ms"))
    print(rows[-1], flush=True)
    cache = sfo_throughput.cached_vs_png()
    rows.append(("sfo step", "cached latents / PNGs, samples/s", cache["cached"] / cache["png"], "> 1",
                 f"{cache['cached']:.1f} vs {cache['png']:.1f} samples/s, 64 px, in process"))
    print(rows[-1], flush=True)
    scores = sfo_throughput.stored_vs_live()
    rows.append(("sfo step", "stored reference errors / reference pass, samples/s", scores["stored"] / scores["live"],
                 "1.25-1.35 expected", f"{scores['stored']:.1f} vs {scores['live']:.1f} samples/s, 64 px, in process"))
    print(rows[-1], flush=True)
    serve = serve_latency.p50_ratio()
    rows.append(("Serve", "HTTP p50 / direct p50", serve["http_p50_s"] / serve["direct_p50_s"], "<= 1.1",
                 f"{serve['http_p50_s'] * 1000:.0f} vs {serve['direct_p50_s'] * 1000:.0f} ms, 64 px, 80 steps"))

    print(rows[-1], flush=True)
    fused = sampler_speed.fused_vs_lora()
    rows.append(("sampling", "adapter folded / LoRA layers, images/s", fused["fused"] / fused["lora"], "> 1",
                 f"{fused['fused']:.2f} vs {fused['lora']:.2f} images/s, world model, 32 px, 28 steps, batch 16"))

    print(f"\n{platform.processor() or platform.machine()}, {cores} cores, tiny model, CPU")
    print("| stage | ratio | measured | target | detail |\n|---|---|---|---|---|")
    for stage, what, ratio, target, detail in rows:
        print(f"| {stage} | {what} | {ratio:.2f}x | {target} | {detail} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
