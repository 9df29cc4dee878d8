"""Evaluation in the shapes world: exact subject fidelity and text alignment per method.

The DreamBench metrics (DINO, CLIP-I, CLIP-T; ``pipelines.evaluate``) are replaced by the world's
oracles (``sfo.shapes.oracle``), which read every attribute back from a generated image:

- subject fidelity: shape, colour, pattern and accent all match the reference's subject
  (``fine``: pattern and accent, the details only the reference shows; ``coarse``: shape, colour);
- text alignment: background, position, size, shape and colour all match the target text.

Held-out triplets (``world_triplets(eval.subjects, eval.seed)``; prepare uses seed 0), each
generated ``eval.seeds`` times per method from its reference and target text. Same methods and runners as
``pipelines.evaluate`` (``pipelines.evaluate_methods``: a Ray Data actor pool, or ``runner=local``).

    python -m pipelines.evaluate_shapes --config pipelines/configs/evaluate_shapes.yaml [key=value ...]

Writes ``<output>/images/*.parquet`` (image, every attribute judged), ``summary.json``
(``output``: a local path or an ``s3://`` / ``gs://`` URI)
(per method: rate and standard error of each judgement) and prints the table. Re-running into the same
``output`` resumes as ``pipelines.evaluate`` does (record: ``<output>/_evaluate_shapes.json``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from cluster import storage

from pipelines.common import ModelConfig, ScalingConfig, check_image_guidance, use_torch_threads
from pipelines import evaluate_io
from pipelines.config import job_main
from pipelines.evaluate_methods import (MethodConfig, check_methods, check_runner_and_methods, generate_missing,
                                        load_methods, method_groups, method_samplers)
from sfo.modes import SamplingMode

JUDGEMENTS = ("subject", "fine", "coarse", "text", "shape", "colour", "pattern", "accent", "background", "position",
              "size")
HEADLINE = ("subject", "fine", "coarse", "text")
IMAGE_SCHEMA = pa.schema([
    pa.field("method", pa.string()), pa.field("sample_id", pa.string()), pa.field("prompt", pa.string()),
    pa.field("seed", pa.int64()), pa.field("image_png", pa.binary()),
    *[pa.field(name, pa.bool_()) for name in JUDGEMENTS],
])
IMAGE_KEY = ("method", "sample_id", "seed")
STAGE = "evaluate_shapes"


@dataclass
class WorldEvalSection:
    subjects: int = 32  # held-out triplets (subject + context), each one prompt
    seed: int = 1000  # their world seed; prepare's triplets use 0
    seeds: int = 2  # images per triplet and method, seeds sample_seed .. sample_seed + seeds - 1
    sample_seed: int = 0
    steps: int = 28  # paper Sec. 4.1
    guidance: float = 3.5  # ignored by the shapes model (no guidance embedding)
    image_guidance: float = 1.0  # sfo.sampler image guidance (1 = off)
    sampling: SamplingMode = field(default_factory=SamplingMode)  # standard | decoupled | dual-branch (sfo.modes)
    batch_size: int = 16
    # Methods with no adapter active (the base model, the table's floor row) on the first N subjects only: the
    # floor needs no paired precision, so its images go to the methods compared. null: every subject.
    base_subjects: int | None = None

    def __post_init__(self) -> None:
        check_image_guidance(self.image_guidance, "eval")
        for name in ("subjects", "seeds", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name}: must be at least 1, got {getattr(self, name)}")
        if self.base_subjects is not None and not 1 <= self.base_subjects <= self.subjects:
            raise ValueError(f"eval.base_subjects: {self.base_subjects}; between 1 and eval.subjects "
                             f"({self.subjects}), or null for every subject")


@dataclass
class ShapesEvaluateConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(source="shapes"))
    methods: list[MethodConfig] = field(default_factory=lambda: [MethodConfig()])
    eval: WorldEvalSection = field(default_factory=WorldEvalSection)
    output: str = "runs/evaluate_shapes"  # a path, s3:// or gs://
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    runner: str = "ray"

    def __post_init__(self) -> None:
        check_runner_and_methods(self.runner, self.methods)
        self.output = storage.check_uri(self.output, "output")


def eval_triplets(section: WorldEvalSection) -> dict:
    from sfo.shapes.world import world_triplets

    return {t.sample_id: t for t in world_triplets(section.subjects, section.seed)}


def work_rows(config: ShapesEvaluateConfig, method: str) -> list[dict]:
    e = config.eval
    triplets = list(eval_triplets(e).items())
    if e.base_subjects is not None and not next(m for m in config.methods if m.name == method).active:
        triplets = triplets[:e.base_subjects]
    return [{"method": method, "sample_id": sid, "prompt": t.target_text, "seed": seed}
            for sid, t in triplets for seed in range(e.sample_seed, e.sample_seed + e.seeds)]


class ShapesEvaluator:
    """Work rows in, judged image rows out; the model and every method's adapters loaded once per instance."""

    def __init__(self, config: ShapesEvaluateConfig, device: str | None = None) -> None:
        from sfo.sampler import SamplerConfig
        from sfo.shapes.world import SIZE

        use_torch_threads(config.scaling)
        self.triplets = eval_triplets(config.eval)
        self.model, self._activate = load_methods(config, device)
        e = config.eval
        self.samplers = method_samplers(config, SamplerConfig(steps=e.steps, guidance=e.guidance, height=SIZE,
                                                              width=SIZE, image_guidance=e.image_guidance))

    def __call__(self, batch: dict | pa.Table) -> pa.Table:
        from sfo.degrade import generic_subject_text
        from sfo.records import encode_png
        from sfo.sampler import generate
        from sfo.shapes.oracle import judge, read_image

        columns = batch.to_pydict() if isinstance(batch, pa.Table) else {k: list(v) for k, v in batch.items()}
        triplets = [self.triplets[str(s)] for s in columns["sample_id"]]
        seeds = [int(s) for s in columns["seed"]]
        images = [None] * len(triplets)
        for method, rows in method_groups([str(m) for m in columns["method"]]):
            with self._activate(method):
                # dual-branch's auxiliary prompt drops the subject's words: the world has no generic noun
                made = generate(self.model, [triplets[i].target_text for i in rows], [seeds[i] for i in rows],
                                self.samplers[method], [triplets[i].reference for i in rows],
                                auxiliary_prompts=[generic_subject_text(triplets[i].target_text, triplets[i].subject.item, "")
                                                   for i in rows])
            for i, image in zip(rows, made):
                images[i] = image
        verdicts = [judge(read_image(image), t.subject, t.context) for image, t in zip(images, triplets)]
        return pa.Table.from_pydict({
            "method": [str(m) for m in columns["method"]], "sample_id": [t.sample_id for t in triplets],
            "prompt": [t.target_text for t in triplets], "seed": [int(s) for s in columns["seed"]],
            "image_png": [encode_png(image) for image in images],
            **{name: [bool(v[name]) for v in verdicts] for name in JUDGEMENTS},
        }, schema=IMAGE_SCHEMA)


def read_images(output: str | Path, methods: list[str]) -> pa.Table:
    return evaluate_io.read_images(str(output), methods, IMAGE_SCHEMA, IMAGE_KEY)


def summarize(table: pa.Table) -> dict:
    """Per method: images, and for every judgement its rate and binomial standard error."""
    rows = table.select(["method", *JUDGEMENTS]).to_pylist()
    summary = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        n = len(mine)
        rates = {name: sum(r[name] for r in mine) / n for name in JUDGEMENTS}
        summary[method] = {"images": n, **rates,
                           "stderr": {name: math.sqrt(p * (1 - p) / n) for name, p in rates.items()}}
    return summary


def format_table(summary: dict) -> str:
    header = f"{'method':<22} {'images':>6} " + " ".join(f"{name:>13}" for name in HEADLINE)
    lines = [header]
    for method, m in summary.items():
        cells = " ".join(f"{m[name]:>7.3f}±{m['stderr'][name]:.3f}" for name in HEADLINE)
        lines.append(f"{method:<22} {m['images']:>6} {cells}")
    return "\n".join(lines)


def run(config: ShapesEvaluateConfig) -> dict:
    """Generates and judges every method's images; writes and returns the summary."""
    check_methods(config)
    started = time.time()
    rows = [row for method in config.methods for row in work_rows(config, method.name)]
    counts = ", ".join(f"{m.name} {sum(r['method'] == m.name for r in rows)}" for m in config.methods)
    print(f"[evaluate_shapes] images per method: {counts} ({config.runner}, one model for all methods)", flush=True)
    generate_missing(config, rows, IMAGE_KEY, STAGE, ShapesEvaluator)
    summary = summarize(read_images(config.output, [m.name for m in config.methods]))
    evaluate_io.write_summary(summary, config.output)
    print(format_table(summary), flush=True)
    print(f"[evaluate_shapes] wrote {storage.join(config.output, 'summary.json')} in {time.time() - started:.1f} s", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    return job_main(ShapesEvaluateConfig, "python -m pipelines.evaluate_shapes", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
