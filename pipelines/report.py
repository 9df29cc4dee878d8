"""The run report: one self-contained HTML file (images inline as base64 PNG, charts as inline SVG).

It holds the metric table (per method, per subject), a bar chart of the methods, image grids
(reference | each method, per subject and prompt), the training curves, the CDNS pair-gap histogram
and the run's parameters. Built from the files the stages wrote; it computes nothing new.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import pyarrow as pa
import yaml
from PIL import Image

from cluster import storage

METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"))
PALETTE = ("#8c8c8c", "#1f77b4", "#d62728", "#2ca02c", "#9467bd")
CHART_W, CHART_H = 480, 220
THUMB = 128  # px per image in the grids
PLOT_LEFT, PLOT_TOP = 50, 10  # the plot area's corner in the line and scatter charts


def _img(image: Image.Image | bytes, side: int = THUMB) -> str:
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    buffer = io.BytesIO()
    image.convert("RGB").resize((side, side), Image.NEAREST).save(buffer, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}" width="{side}">'


def _cell(m: dict, key: str) -> str:
    se = m.get("stderr", {}).get(key)
    return f"<td>{m[key]:.3f}</td>" if se is None else f"<td>{m[key]:.3f} &plusmn; {se:.3f}</td>"


def metric_table(summary: dict, metrics=METRICS) -> str:
    """Per method (and subject): images and each metric, with its standard error when the summary has one."""
    head = "<tr><th>method</th><th>subject</th><th>images</th>" + "".join(f"<th>{n}</th>" for _, n in metrics) + "</tr>"
    rows = []
    for method, m in summary["methods"].items():
        rows.append(f"<tr><td><b>{html.escape(method)}</b></td><td>all</td><td>{m['images']}</td>"
                    + "".join(_cell(m, k) for k, _ in metrics) + "</tr>")
        for subject, s in summary.get("subjects", {}).get(method, {}).items():
            rows.append(f"<tr><td>{html.escape(method)}</td><td>{html.escape(subject)}</td><td>{s['images']}</td>"
                        + "".join(_cell(s, k) for k, _ in metrics) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def bar_chart(summary: dict, metrics=METRICS) -> str:
    """Grouped bars: one group per metric, one bar per method, each value written on its bar; a y axis
    with ticks on [0, 1] when every value is >= 0 (rates), else on [-1, 1] (cosine similarities)."""
    methods = list(summary["methods"])
    values = [float(summary["methods"][m][k]) for m in methods for k, _ in metrics]
    low = 0.0 if min(values, default=0.0) >= 0 else -1.0
    left, top, plot_h = 40, 10, CHART_H - 20  # room for the axis labels
    group_w = (CHART_W - left) / len(metrics)
    bar_w = group_w * 0.8 / max(1, len(methods))
    y_of = lambda v: top + (1.0 - v) / (1.0 - low) * plot_h  # noqa: E731
    parts = [f'<svg width="{CHART_W}" height="{CHART_H + 30}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#444"/>']
    for tick in ([0.0, 0.25, 0.5, 0.75, 1.0] if low == 0 else [-1.0, -0.5, 0.0, 0.5, 1.0]):
        y = y_of(tick)
        parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{CHART_W}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    zero = y_of(0.0)
    parts.append(f'<line x1="{left}" y1="{zero:.1f}" x2="{CHART_W}" y2="{zero:.1f}" stroke="#444"/>')
    for g, (key, name) in enumerate(metrics):
        x0 = left + g * group_w + group_w * 0.1
        for i, method in enumerate(methods):
            value = float(summary["methods"][method][key])
            y, h = min(y_of(value), zero), abs(y_of(value) - zero)
            x = x0 + i * bar_w
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w * 0.9:.1f}" height="{h:.1f}" '
                         f'fill="{PALETTE[i % len(PALETTE)]}"><title>{html.escape(method)} {name} {value:.3f}</title></rect>'
                         f'<text x="{x + bar_w * 0.45:.1f}" y="{(y - 3 if value >= 0 else y + h + 11):.1f}" '
                         f'text-anchor="middle">{value:.2f}</text>')
        parts.append(f'<text x="{x0 + group_w * 0.4:.1f}" y="{CHART_H + 20}" text-anchor="middle">{html.escape(name)}</text>')
    legend = " ".join(f'<span style="color:{PALETTE[i % len(PALETTE)]}">&#9632; {html.escape(m)}</span>'
                      for i, m in enumerate(methods))
    return "".join(parts) + "</svg><div>" + legend + "</div>"


def histogram_chart(pairs: dict) -> str:
    counts, edges = pairs["histogram"]["counts"], pairs["histogram"]["edges"]
    top = max(counts) or 1
    bar_w = CHART_W / len(counts)
    parts = [f'<svg width="{CHART_W}" height="{CHART_H + 30}" xmlns="http://www.w3.org/2000/svg">']
    for i, c in enumerate(counts):
        h = c / top * CHART_H
        parts.append(f'<rect x="{i * bar_w:.1f}" y="{CHART_H - h:.1f}" width="{bar_w * 0.9:.1f}" height="{h:.1f}" '
                     f'fill="#1f77b4"><title>[{edges[i]:+.2f}, {edges[i + 1]:+.2f}): {c}</title></rect>')
    parts.append(f'<text x="0" y="{CHART_H + 20}">{edges[0]:+.1f}</text>'
                 f'<text x="{CHART_W}" y="{CHART_H + 20}" text-anchor="end">{edges[-1]:+.1f}</text></svg>')
    low, high = pairs["thresholds"]
    return "".join(parts) + (f"<p>DINO(positive, negative) over {pairs['rows']} pairs; buckets low &lt; {low:.3f} "
                             f"&le; mid &lt; {high:.3f} &le; high: {pairs['counts']}</p>")


def _axes(points: list[tuple[float, float]], width: int, height: int, x_label: str = "", y_format: str = ".3g",
          x_format: str = "g"):
    """An x/y frame around ``points``: (x -> px, y -> px, SVG parts of both axes with their value ranges)."""
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(y for _, y in points), max(y for _, y in points)
    left, top, plot_w, plot_h = PLOT_LEFT, PLOT_TOP, width - 60, height - 40
    sx = lambda x: left + (x - x0) / ((x1 - x0) or 1) * plot_w  # noqa: E731
    sy = lambda y: top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h  # noqa: E731
    parts = [f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#000"/>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#000"/>',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end" font-size="10">{y1:{y_format}}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" font-size="10">{y0:{y_format}}</text>',
             f'<text x="{left}" y="{top + plot_h + 14}" font-size="10">{x_label}{x0:{x_format}}</text>',
             f'<text x="{left + plot_w}" y="{top + plot_h + 14}" text-anchor="end" font-size="10">{x1:{x_format}}</text>']
    return sx, sy, parts


def scatter_chart(points: dict[str, tuple[float, float]], x_name: str, y_name: str, width: int = 520,
                  height: int = 360) -> str:
    """A standalone SVG: one labelled point per name at (x, y), both axes with their value ranges and names."""
    if not points:
        return ""
    sx, sy, parts = _axes(list(points.values()), width - 150, height, y_format=".3f", x_format=".3f")  # room for labels
    parts.append(f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" font-size="10">{html.escape(x_name)}</text>'
                 f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle" '
                 f'font-size="10">{html.escape(y_name)}</text>')
    for name, (x, y) in points.items():
        colour = PALETTE[(1 if name.startswith("sft") else 2) % len(PALETTE)]
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>'
                     f'<text x="{sx(x) + 5:.1f}" y="{sy(y) - 3:.1f}" font-size="10">{html.escape(name)}</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{"".join(parts)}</svg>'


def line_chart(series: dict[str, list[tuple[float, float]]], label: str) -> str:
    """One SVG panel of training curves: a polyline per series (x = step), the y range written on the axis."""
    points = [pt for pts in series.values() for pt in pts]
    if not points:
        return ""
    sx, sy, parts = _axes(points, CHART_W, CHART_H, x_label="step ")
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[(i + 1) % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" points="{path}"/>')
        parts.append(f'<text x="{PLOT_LEFT + 8}" y="{PLOT_TOP + 12 + 12 * i}" font-size="10" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    return (f'<figure><svg width="{CHART_W}" height="{CHART_H}" role="img" aria-label="{html.escape(label)}">'
            f'{"".join(parts)}</svg><figcaption>{html.escape(label)}</figcaption></figure>')


VERDICTS = {"oracle_subject": "subject", "oracle_text": "text"}  # per-image verdict columns shown under each image


def _verdicts(row: dict) -> str:
    marks = [f"{label} {'&#10003;' if row[k] else '&#10007;'}" for k, label in VERDICTS.items() if row.get(k) is not None]
    return f"<br><small>{' '.join(marks)}</small>" if marks else ""


def image_grid(images: pa.Table, references: dict[str, Image.Image], methods: list[str], max_rows: int = 12,
               cells: list[tuple] | None = None) -> str:
    """Per (subject, prompt), the first seed (or the given ``cells``: (subject, prompt_index, seed)): reference |
    method 1 | method 2 ..., each image with its oracle verdicts when the table has ``VERDICTS``' columns."""
    columns = ["method", "subject", "prompt_index", "prompt", "seed", "image_png"]
    rows = images.select(columns + [k for k in VERDICTS if k in images.column_names]).to_pylist()
    by = {(r["subject"], r["prompt_index"], r["seed"], r["method"]): r for r in rows}
    if cells is None:
        first: dict = {}
        for subject, index, seed, _ in sorted(by, key=lambda k: k[2]):
            first.setdefault((subject, index), seed)
        cells = [(subject, index, seed) for (subject, index), seed in first.items()]
    head = "<tr><th>prompt</th><th>reference</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in methods) + "</tr>"
    body = []
    for subject, index, seed in cells[:max_rows]:
        found = [by.get((subject, index, seed, m)) for m in methods]
        prompt = next(r["prompt"] for r in found if r is not None)
        ref = _img(references[subject]) if subject in references else ""
        body.append(f"<tr><td>{html.escape(subject)}<br><small>{html.escape(prompt)}</small></td><td>{ref}</td>"
                    + "".join(f"<td>{_img(r['image_png']) + _verdicts(r) if r else '<small>not sampled</small>'}</td>"
                            for r in found) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def disagreements(images: pa.Table, a: str = "sfo", b: str = "sft", key: str = "oracle_subject") -> tuple[list, list]:
    """The cells (subject, prompt_index, seed) where ``a`` and ``b`` got different verdicts ``key``:
    (those ``a`` got right, those ``b`` got right), each in table order."""
    if key not in images.column_names:
        return [], []
    verdict = {(r["subject"], r["prompt_index"], r["seed"], r["method"]): r[key]
               for r in images.select(["method", "subject", "prompt_index", "seed", key]).to_pylist()}
    cells = list(dict.fromkeys(k[:3] for k in verdict))
    both = [c for c in cells if (*c, a) in verdict and (*c, b) in verdict and verdict[(*c, a)] != verdict[(*c, b)]]
    return [c for c in both if verdict[(*c, a)]], [c for c in both if verdict[(*c, b)]]


def disagreement_section(images: pa.Table, references: dict, methods: list[str], shown: int = 12) -> list[str]:
    """The report's picked cells: where SFO's and SFT's subject verdicts differ, SFO-right ones first."""
    sfo_right, sft_right = disagreements(images)
    if not sfo_right and not sft_right:
        return []
    picked = (sfo_right[:shown // 2] + sft_right[:shown // 2] + sfo_right[shown // 2:] + sft_right[shown // 2:])[:shown]
    note = (f"<p>Picked, not random: the cells where SFO's and SFT's subject verdicts differ, {len(sfo_right)} with "
            f"SFO right and {len(sft_right)} with SFT right; the first {shown} shown, half of each where both have "
            "enough, in evaluation order.</p>")
    return ["<h2>Where SFO and SFT disagree (picked)</h2>", note, image_grid(images, references, methods, shown, picked)]


def write_report(path: str | Path, *, title: str, summary: dict, images: pa.Table, references: dict[str, Image.Image],
                 pairs: dict | None, parameters: dict, served: bytes | None = None, metrics=METRICS,
                 metrics_title: str = "DreamBench-style metrics", verdict: str | None = None,
                 served_caption: str = "", curves: dict[str, dict[str, list]] | None = None) -> Path:
    """Writes the HTML report to ``path`` (a local path or an object store URI) and returns it.

    ``summary["methods"][method]`` holds ``images`` and each ``metrics`` key (and optionally
    ``summary["subjects"][method][subject]`` the same per subject); ``images`` has the columns
    method, subject, prompt_index, prompt, seed, image_png. ``verdict``: a sentence saying whether
    SFO beat SFT (shown first); ``served_caption``: what the served image is; ``curves``: training curves,
    panel title -> series name -> [(step, value)].
    """
    methods = list(summary["methods"])
    note = (f'<p class="warn">{html.escape(summary["note"])}</p>' if summary.get("random_encoders") else "")
    sections = [
        f"<h1>{html.escape(title)}</h1>", note,
        f'<p class="verdict">{html.escape(verdict)}</p>' if verdict else "",
        f"<h2>{html.escape(metrics_title)}</h2>", note, metric_table(summary, metrics),
        "<h2>Methods compared</h2>", note, bar_chart(summary, metrics),
        "<h2>Samples</h2>", image_grid(images, references, methods),
        *disagreement_section(images, references, methods),
    ]
    if curves:
        sections += ["<h2>Training curves</h2>"] + [line_chart(series, title) for title, series in curves.items()]
    if pairs is not None:
        sections += ["<h2>CDNS pair gap (paper Fig. 3b)</h2>", histogram_chart(pairs)]
    if served is not None:
        sections += ["<h2>One request through the Ray Serve app</h2>",
                     f"<figure>{_img(served)}<figcaption>{html.escape(served_caption)}</figcaption></figure>"]
    sections += ["<h2>Run parameters</h2>",
                 f"<pre>{html.escape(yaml.safe_dump(json.loads(json.dumps(parameters, default=str)), sort_keys=False))}</pre>"]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px;text-align:center}.warn{color:#b00;font-weight:bold}.verdict{font-size:1.2em;background:#f4f4f4;"
             "padding:.6em}")
    storage.write_text(path, f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                       f"<style>{style}</style></head><body>{''.join(sections)}</body></html>")
    return path


def training_curves(configs: dict) -> dict[str, dict[str, list]]:
    """The report's curves from the training jobs' metrics.jsonl: SFT and SFO loss, SFO's implicit accuracy
    and the policy's flow-matching error against the reference's on positives and negatives."""
    logs = {stage: storage.join(configs[stage].output.run_dir, "metrics.jsonl") for stage in ("sft", "sfo")
            if stage in configs}
    lines = {stage: [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
             for stage, path in logs.items() if storage.is_file(path)}
    sfo = lines.get("sfo", [])
    series = lambda key: [(r["step"], r[key]) for r in sfo if key in r]  # noqa: E731
    panels = {"loss (per step)": {stage: [(r["step"], r["loss"]) for r in rows] for stage, rows in lines.items()},
              "SFO implicit accuracy (share of pairs ranked right)": {"sfo": series("implicit_accuracy")},
              "SFO: policy error minus the reference's (above 0: worse than the SFT base on that image)": {
                  "positive": series("positive_rise"), "negative": series("negative_rise")}}
    return {title: series for title, series in panels.items() if any(series.values())}


def verdict(images, keys: list[tuple[str, str]], a: str = "sfo", b: str = "sft") -> str:
    """One sentence: method ``a`` against ``b``, paired over the images both made (same prompt and seed)."""
    from sfo.stats import CLAIM_SE, claim, paired_difference

    rows = images.to_pylist()
    # the image's cell: shapes rows name it by sample_id (their "subject" is a verdict), DreamBench rows by subject
    cell = lambda r: (r.get("sample_id") or r.get("subject"), r.get("prompt_index"), r["prompt"], r["seed"])  # noqa: E731
    mine = {m: {cell(r): r for r in rows if r["method"] == m} for m in (a, b)}
    shared = sorted(set(mine[a]) & set(mine[b]), key=str)
    subjects = len({c[0] for c in shared})
    if subjects < 2:  # the standard error counts each subject once: one subject has none
        return (f"Too few subjects ({subjects}, {len(shared)} paired images) to compare {a} with {b}: evaluate at "
                "least 2 (--eval-subjects).")
    parts = []
    for key, name in keys:
        d = paired_difference([float(mine[a][c][key]) for c in shared], [float(mine[b][c][key]) for c in shared],
                              clusters=[c[0] for c in shared])  # a subject's prompts and seeds count once
        outcome = {"better": f"{a} better", "worse": f"{a} worse"}.get(claim(d), "no difference shown")
        parts.append(f"{name} {d['diff']:+.3f} ± {d['se']:.3f} ({abs(d['z']):.1f} standard errors: {outcome})")
    return (f"{a.upper()} against the {b.upper()} base, paired over {len(shared)} images of {subjects} subjects "
            "(same prompts and seeds; the standard error counts each subject once): "
            + "; ".join(parts) + f". A difference is claimed at >= {CLAIM_SE:g} standard errors.")


def run_report(args, runs: str, configs: dict, summary: dict, pairs: dict, provenance: str = "") -> str:
    """The main job's ``<runs>/report.html`` (local or on an object store) from what its stages wrote;
    ``provenance``: where the evaluated adapters came from (said after the verdict)."""
    from pipelines import evaluate, evaluate_shapes
    from pipelines.config import to_dict

    config = configs["evaluate"]
    methods = [m.name for m in config.methods]
    served = storage.join(runs, "served.png")
    if args.model == "shapes":
        triplets = evaluate_shapes.eval_triplets(config.eval)
        images = evaluate_shapes.read_images(config.output, methods).select(
            ["method", "sample_id", "prompt", "seed", "image_png", "subject", "text"]).rename_columns(
            ["method", "subject", "prompt", "seed", "image_png", "oracle_subject", "oracle_text"])  # one triplet = one "subject"
        images = images.append_column("prompt_index", pa.array([0] * len(images), pa.int32()))
        look = dict(summary={"methods": summary}, references={k: t.reference for k, t in triplets.items()},
                    metrics=[(k, k if k != "subject" else "subject fidelity") for k in evaluate_shapes.HEADLINE],
                    metrics_title="Shapes-world oracles (exact): share of images right")
        judged = evaluate_shapes.read_images(config.output, methods)
        look["verdict"] = verdict(judged, [("subject", "subject fidelity"), ("text", "text alignment")])
    else:
        look = dict(summary=summary, references=evaluate.load_benchmark(config.eval).condition)
        images = evaluate.read_images(config.output, methods)
        look["verdict"] = verdict(images, [("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T")])
        if summary.get("random_encoders"):
            look["verdict"] += " " + summary["note"]
    if provenance:
        look["verdict"] += " " + provenance
    look["curves"] = training_curves(configs)
    request = storage.join(runs, "served.json")
    if storage.is_file(request):
        look["served_caption"] = ("POST /v1/generate with " + ", ".join(
            f"{k}={v!r}" for k, v in storage.read_json(request).items()) + " and the triplet's reference image")
    return write_report(
        storage.join(runs, "report.html"), title=f"SFO run {storage.basename(runs)} (model {args.model})", images=images,
        pairs=pairs, served=storage.read_bytes(served) if storage.is_file(served) else None,
        parameters={"command line": vars(args), **{stage: to_dict(c) for stage, c in configs.items()}}, **look,
    )
