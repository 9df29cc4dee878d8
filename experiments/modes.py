"""The ``modes`` experiment of ``experiments.reproduce``: the SFT base and SFO (CDNS) sampled in each
inference mode (``sfo.modes``: EZIGen's decoupled generation, DCI's dual-branch integration) at a few
switch times, on the same held-out cells as every other method, plus each mode's images per second.

The modes are evaluation-time only (no training): each (method, mode, switch) is one more evaluated
method, ``{method}~{mode}{switch}``, in the same evaluation run (one actor pool, the method's own
``sampling``); ``points`` and ``scatter_svg`` draw subject fidelity against text alignment, one point
per method x mode x switch; ``throughput`` times each mode's sampler on one batch in this process.
"""

from __future__ import annotations

import time
from dataclasses import replace

from sfo.modes import SamplingMode

MODE_METHODS = ("sft", "sfo-cdns")  # the evaluated methods sampled in every mode


def mode_name(method: str, sampling: SamplingMode) -> str:
    return f"{method}~{sampling.mode}{sampling.switch:g}"


def sweep(switches: tuple[float, ...], rounds: tuple[int, int]) -> list[SamplingMode]:
    """Decoupled and dual-branch at each switch time (decoupled with ``rounds`` = (min, max))."""
    return [SamplingMode(mode=mode, switch=switch, min_rounds=rounds[0], max_rounds=rounds[1])
            for mode in ("decoupled", "dual-branch") for switch in switches]


def mode_methods(methods: list, modes: list[SamplingMode]) -> list:
    """For every ``MethodConfig`` named ``{m}@{seed}`` with m in ``MODE_METHODS``: one copy per mode,
    named ``{m}~{mode}{switch}@{seed}`` and sampled in that mode."""
    out = []
    for method in methods:
        base, _, seed = method.name.partition("@")
        if base in MODE_METHODS:
            out += [replace(method, name=f"{mode_name(base, s)}@{seed}", sampling=s) for s in modes]
    return out


def names(modes: list[SamplingMode]) -> list[str]:
    return [mode_name(m, s) for m in MODE_METHODS for s in modes]


def throughput(model_source: str, modes: list[SamplingMode], steps: int, batch: int = 16, seed: int = 0) -> dict:
    """Images per second of each mode (and ``standard``) on one batch of held-out world triplets, the
    shapes model without adapters, in this process (the ratios are what carries over to a GPU)."""
    from sfo.degrade import generic_subject_text
    from sfo.models import load_flux
    from sfo.sampler import SamplerConfig, generate
    from sfo.shapes.world import SIZE, world_triplets

    model = load_flux(model_source, device="cpu")
    triplets = world_triplets(batch, seed=1000)
    prompts = [t.target_text for t in triplets]
    auxiliary = [generic_subject_text(t.target_text, t.subject.item, "") for t in triplets]
    out = {}
    for sampling in [SamplingMode(), *modes]:
        config = SamplerConfig(steps=steps, height=SIZE, width=SIZE, sampling=sampling)
        started = time.perf_counter()
        generate(model, prompts, list(range(seed, seed + batch)), config, [t.reference for t in triplets],
                 auxiliary_prompts=auxiliary)
        key = "standard" if sampling.mode == "standard" else f"{sampling.mode}{sampling.switch:g}"
        out[key] = batch / (time.perf_counter() - started)
    return out


def points(methods: dict, modes: list[SamplingMode]) -> dict[str, tuple[float, float]]:
    """(text alignment, subject fidelity) per evaluated method x mode (standard included)."""
    wanted = [*MODE_METHODS, *names(modes)]
    return {n: (methods[n]["text"], methods[n]["subject"]) for n in wanted if n in methods}


def format_table(methods: dict, modes: list[SamplingMode], speed: dict) -> list[str]:
    """Markdown lines: per method x mode, fidelity and text with their paired Δ against the same method in
    standard mode (the SFT base's Δ for standard rows), and the mode's images per second."""
    lines = ["## Inference modes (decoupled: EZIGen; dual-branch: DCI; Δ against the same method sampled standard)",
             "", "| method | mode | switch | subject | text | Δ subject | Δ text | images/s (no adapters, one batch) |",
             "|---|---|---|---|---|---|---|---|"]
    for method in MODE_METHODS:
        if method not in methods:
            continue
        rows = [(method, "standard", "", methods[method], None)]
        rows += [(mode_name(method, s), s.mode, f"{s.switch:g}", methods.get(mode_name(method, s)), method) for s in modes]
        for name, mode, switch, m, versus in rows:
            if m is None:
                continue
            d = (m.get("paired_vs_sft", {}) if versus == "sft" else m.get("paired_vs", {}).get(versus, {})) if versus else {}
            cells = [f"{d[k]['diff']:+.3f} ± {d[k]['se']:.3f}" if k in d else "" for k in ("subject", "text")]
            rate = speed.get("standard" if mode == "standard" else f"{mode}{switch}")
            lines.append(f"| {method} | {mode} | {switch} | {m['subject']:.3f} | {m['text']:.3f} | {cells[0]} | "
                         f"{cells[1]} | {'' if rate is None else f'{rate:.2f}'} |")
    return lines + ["", "![subject fidelity against text alignment](modes.svg)", ""]


def scatter_svg(pts: dict[str, tuple[float, float]]) -> str:
    """Subject fidelity (y) against text alignment (x), one labelled point per method x mode."""
    from pipelines.report import scatter_chart

    return scatter_chart(pts, "text alignment", "subject fidelity")
