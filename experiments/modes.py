"""The ``modes`` experiment of ``experiments.reproduce``: the SFT base and SFO (CDNS) sampled in each
inference mode (``sfo.modes``: EZIGen's decoupled generation, DCI's dual-branch integration) at a few
switch times, on the same held-out cells as every other method, plus each mode's images per second.

The modes are evaluation-time only (no training): each (method, mode, switch) is one more evaluated
method, ``{method}~{mode}{switch}``, in the same evaluation run (one actor pool, the method's own
``sampling``); ``points`` and ``scatter_svg`` draw subject fidelity against text alignment, one point
per method x mode x switch; ``throughput`` times each mode's sampler on one batch in this process.
"""

from __future__ import annotations

import html
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


def scatter_svg(pts: dict[str, tuple[float, float]], width: int = 520, height: int = 360) -> str:
    """Subject fidelity (y) against text alignment (x), one labelled point per method x mode, axes with
    their value ranges."""
    if not pts:
        return ""
    xs, ys = [x for x, _ in pts.values()], [y for _, y in pts.values()]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    left, top, plot_w, plot_h = 50, 10, width - 70, height - 50
    sx = lambda x: left + (x - x0) / ((x1 - x0) or 1) * plot_w  # noqa: E731
    sy = lambda y: top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10">',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#000"/>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#000"/>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{y1:.3f}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{y0:.3f}</text>',
             f'<text x="{left}" y="{top + plot_h + 14}">{x0:.3f}</text>',
             f'<text x="{left + plot_w}" y="{top + plot_h + 14}" text-anchor="end">{x1:.3f}</text>',
             f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">text alignment</text>',
             f'<text x="12" y="{top + plot_h / 2}" transform="rotate(-90 12 {top + plot_h / 2})" '
             'text-anchor="middle">subject fidelity</text>']
    for name, (x, y) in pts.items():
        colour = "#d62728" if name.startswith("sfo") else "#1f77b4"
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>'
                     f'<text x="{sx(x) + 5:.1f}" y="{sy(y) - 3:.1f}">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"
