"""The reproduction's results: each method's rates and paired differences over training seeds
(``aggregate``), the oracle's account of a negative set (``negative_pairs``) and the Markdown tables
``experiments.reproduce`` prints and writes (``format_results``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from experiments.plan import ANCHOR_WEIGHTS, IMAGE_GUIDANCE

def negative_pairs(folder: Path) -> dict:
    """The oracle's account of a quadruplet folder's pairs (``sfo.shapes.oracle.pair_statistics``)."""
    import pyarrow.parquet as pq

    from sfo.records import decode_png
    from sfo.shapes.oracle import pair_statistics

    table = pq.read_table(folder, columns=["reference_png", "target_png", "negative_png"]).to_pylist()
    return pair_statistics([tuple(decode_png(r[k]) for k in ("reference_png", "target_png", "negative_png"))
                            for r in table])


def aggregate(table, seeds: list[int], names: list[str], rivals: dict[str, list[str]] | None = None) -> dict:
    """Per method: images, each headline rate (mean over seeds) with its binomial standard error, the
    per-seed rates, and the paired difference against the same seed's SFT base on the same cells
    (``paired_vs_sft``) and against each of ``rivals[name]`` (``paired_vs``, e.g. SFO-CDNS vs Self-Play).

    Methods are evaluated as ``{name}@{seed}`` (``base`` once: it is not trained).
    """
    import numpy as np

    from pipelines.evaluate_shapes import HEADLINE
    from sfo.stats import claim, combine_seeds, paired_difference

    cells: dict[str, dict] = {}
    for row in table.to_pylist():
        cells.setdefault(row["method"], {})[(row["sample_id"], row["seed"])] = row
    evaluated = lambda name, seed: cells["base"] if name == "base" else cells[f"{name}@{seed}"]  # noqa: E731
    out = {}
    for name in names:
        per_seed = {seed: evaluated(name, seed) for seed in seeds}
        keys = sorted(per_seed[seeds[0]])
        subjects = [c[0] for c in keys]  # a triplet's sample seeds, under every training seed: one subject
        images = len(keys) * (1 if name == "base" else len(seeds))
        entry: dict = {"images": images, "stderr": {}, "per_seed": {}, "paired_vs_sft": {}}
        for k in HEADLINE:
            rate = sum(sum(r[k] for r in c.values()) / len(c) for c in per_seed.values()) / len(seeds)
            entry[k] = rate
            entry["stderr"][k] = math.sqrt(rate * (1 - rate) / images)
            entry["per_seed"][k] = {str(s): sum(r[k] for r in c.values()) / len(c) for s, c in per_seed.items()}
            for rival in (["sft"] if name != "sft" else []) + (rivals or {}).get(name, []):
                if rival not in ("sft", "base") and f"{rival}@{seeds[0]}" not in cells:
                    continue
                pairs = [(np.array([per_seed[s][c][k] for c in keys], dtype=float),
                          np.array([evaluated(rival, s)[c][k] for c in keys], dtype=float)) for s in seeds]
                combined = combine_seeds([paired_difference(a, b, subjects) for a, b in pairs],
                                         [a - b for a, b in pairs], subjects)
                target = entry["paired_vs_sft"] if rival == "sft" else entry.setdefault("paired_vs", {}).setdefault(rival, {})
                target[k] = {**combined, "claim": claim(combined)}
        out[name] = entry
    return out


RADIUS_ARM = re.compile(r"sfo-cdns-r(\d+(?:\.\d+)?)")  # Table B's arms (not sfo-cdns-rpo, the RPO anchor)
RIVALS = {"sfo-cdns": ["sfo-self-play", "sft-additional", "sfo-cdns-all", "sfo-cdns-condition", "sfo-cdns-filtered"]}


def format_results(results: dict) -> str:
    """The reproduction tables as Markdown."""
    from experiments import modes
    from experiments.colour_shift import format_curves

    seeds = results.get("seeds", [results.get("seed", 0)])
    preset = results.get("preset", "paper")
    lines = [f"# SFO in the shapes world (preset {preset} {results.get('preset_overrides', [])}, budget "
             f"{json.dumps(results['budget'])}, training seeds {seeds})", "",
             *([f"SFT base: {results['sft_base']}.", ""] if "sft_base" in results else []),
             "Rates are means over training seeds (± binomial standard error over all images); Δ is the paired "
             "difference against the same seed's SFT base on the same prompts and sample seeds (± the larger of the "
             "evaluation and the seed-to-seed standard error, each triplet counted once across its sample seeds and "
             "training seeds: sfo.stats); a difference is claimed at >= 3 standard errors.", ""]
    methods = results.get("methods", {})

    def delta(m: dict, key: str) -> str:
        d = m.get("paired_vs_sft", {}).get(key)
        return "" if d is None else f"{d['diff']:+.3f} ± {d['se']:.3f}" + (" **" + d["claim"] + "**" if d["claim"] != "no difference shown" else "")

    def table(title: str, rows: list[str]) -> None:
        rows = [r for r in dict.fromkeys(rows) if r in methods]
        if not set(rows) - {"base", "sft", "sfo-cdns"} and not title.startswith("Table 4"):
            return  # that experiment did not run: its table would only repeat Table 4's rows
        lines.extend([f"## {title}", "", "| method | images | subject fidelity | fine | coarse | text | Δ subject vs SFT | Δ text vs SFT |",
                      "|---|---|---|---|---|---|---|---|"])
        for r in rows:
            m = methods[r]
            lines.append(f"| {r} | {m['images']} | " + " | ".join(
                f"{m[k]:.3f} ± {m['stderr'][k]:.3f}" for k in ("subject", "fine", "coarse", "text"))
                + f" | {delta(m, 'subject')} | {delta(m, 'text')} |")
        lines.append("")

    table("Table 4: negatives", ["base", "sft", "sft-additional", "sfo-self-play", "sfo-cdns"])
    table("Table C: timesteps (SFO, CDNS)", ["sft", "sfo-cdns", "sfo-cdns-uniform"])
    table("Table B: blur radius of CDNS (world pixels; sfo-cdns is radius 2)",
          ["sft"] + sorted((n for n in methods if RADIUS_ARM.fullmatch(n)), key=lambda n: float(RADIUS_ARM.fullmatch(n)[1]))
          + ["sfo-cdns"])
    table(f"beta (SFO, CDNS; sfo-cdns is beta {results['budget']['beta']:g})",
          ["sft"] + [n for n in methods if n.startswith("sfo-cdns-beta")] + ["sfo-cdns"])
    table("Negatives in the positive's context (image-only CDNS; oracle: exact renders with other fine details)",
          ["sft", "sfo-cdns", "sfo-image-only", "sfo-oracle"])
    table("Positive anchors (SFO, CDNS)", ["sft", "sfo-cdns"] + [f"sfo-cdns-{a}" for a in ANCHOR_WEIGHTS])
    table("LoRA scope (SFO, CDNS)", ["sft", "sfo-cdns", "sfo-cdns-condition", "sfo-cdns-all"])
    table("CDNS negatives filtered by the oracles (pairs whose negative kept the reference's details dropped)",
          ["sft", "sfo-cdns", "sfo-cdns-filtered"])
    table("SFT strength (the SFT base trained longer; Δ against the budget's SFT)",
          ["sft"] + sorted((n for n in methods if n.startswith("sft-") and n[4:].isdigit()), key=lambda n: int(n[4:])))
    table(f"Image guidance {IMAGE_GUIDANCE:g} at sampling (Δ against SFT without it)",
          ["sft", "sfo-cdns", f"sft-ig{IMAGE_GUIDANCE:g}", f"sfo-cdns-ig{IMAGE_GUIDANCE:g}"])
    if results.get("mode_throughput") is not None:
        lines.extend(modes.format_table(methods, modes.sweep(tuple(results["budget"]["mode_switches"]),
                                                             tuple(results["budget"]["mode_rounds"])),
                                        results["mode_throughput"]))
    if results.get("pairs"):
        lines.extend(["## What separates the pairs (oracle readings of positive, negative and reference)", "",
                      "| negative set @ seed | pairs | context differs | coarse differs | fine differs | "
                      "negative has the reference's fine details |", "|---|---|---|---|---|---|"])
        lines.extend(f"| {name} | {p['pairs']} | {p['context']:.3f} | {p['coarse']:.3f} | {p['fine']:.3f} | "
                     f"{p['fine_matches_reference']:.3f} |" for name, p in results["pairs"].items())
        lines.append("")
    versus = methods.get("sfo-cdns", {}).get("paired_vs", {})
    if versus:
        lines.extend(["## SFO-CDNS against its rivals (paired, same seeds and cells)", "",
                      "| rival | Δ subject | Δ text |", "|---|---|---|"])
        for rival, d in versus.items():
            lines.append(f"| {rival} | " + " | ".join(
                f"{d[k]['diff']:+.3f} ± {d[k]['se']:.3f} ({d[k]['claim']})" for k in ("subject", "text")) + " |")
        lines.append("")
    if "appA" in results:
        lines.extend(["## App. A: colour shift", "", "```", format_curves(results["appA"]), "```", ""])
    lines.extend(["## Wall time per stage (s; a training group's jobs ran side by side within it)", "",
                  "| stage | seconds |", "|---|---|"])
    lines.extend(f"| {name} | {seconds:.0f} |" for name, seconds in results["seconds"].items())
    if "wall_seconds" in results:
        lines.append(f"| **the whole run** | **{results['wall_seconds']:.0f}** |")
    return "\n".join(lines)
