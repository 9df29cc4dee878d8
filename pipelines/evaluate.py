"""Evaluation stage (SFO paper Sec. 4.1, Table 1): DreamBench DINO / CLIP-I / CLIP-T per method.

For every method (a name, adapter folders, the adapters active while sampling) and every
(subject, prompt, seed), one image is generated from the subject's reference and scored. One
callable class, ``Evaluator``, loads the model, the method's adapters and the encoders once per
instance; the Ray Data job runs an actor pool of it, ``runner=local`` a plain loop of the same (the methods
and both runners are ``pipelines.evaluate_methods``, shared with ``pipelines.evaluate_shapes``).

    python -m pipelines.evaluate --config pipelines/configs/evaluate.yaml [key=value ...]

Writes ``<output>/images/*.parquet`` (method, subject, prompt, seed, image png, scores),
``<output>/summary.json`` and ``summary.csv`` (per method overall and per subject), and prints the
table. ``output`` and the methods' adapter folders are local paths or ``s3://`` / ``gs://`` URIs
(``cluster.storage``; the files go through ``pipelines.evaluate_io``). Without ``eval.dreambench`` it runs on the embedded synthetic subjects. Scores from the tiny
random encoders carry ``metrics.RANDOM_ENCODERS_NOTE``.

Re-running into the same ``output`` resumes (``pipelines.resume``): images already written are kept (a
file cut short by a kill is moved aside as ``*.incomplete``), only the missing (method, subject, prompt,
seed) are generated, and the summary is made from every image of the config, each once. The config is
recorded in ``<output>/_evaluate.json``: a method may be added, but a rerun that would make other images
(another model, size, steps, selection, a method's adapters or sampler) fails naming the field.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from cluster import storage
from pipelines import evaluate_io
from pipelines.common import ModelConfig, ScalingConfig, check_image_guidance, use_torch_threads
from pipelines.config import ConfigError, job_main
from pipelines.evaluate_methods import (MethodConfig, check_methods, check_runner_and_methods, generate_missing,
                                        load_methods, method_groups, method_samplers)
from sfo.modes import SamplingMode

PIXEL_MULTIPLE = 16  # FLUX: 8x VAE compression x 2x2 token packing
SYNTHETIC_SUBJECTS = 4  # embedded subjects when no DreamBench folder is given (one prompt each)
SYNTHETIC_EVAL_SEED = 1000  # held out: prepare's embedded source uses seed 0 (pipelines/configs/prepare.yaml)
METRICS = ("dino", "clip_i", "clip_t")
IMAGE_SCHEMA = pa.schema([
    pa.field("method", pa.string()), pa.field("subject", pa.string()), pa.field("prompt_index", pa.int32()),
    pa.field("prompt", pa.string()), pa.field("seed", pa.int64()), pa.field("image_png", pa.binary()),
    pa.field("dino", pa.float32()), pa.field("clip_i", pa.float32()), pa.field("clip_t", pa.float32()),
    pa.field("random_encoders", pa.bool_()),
])
IMAGE_KEY = ("method", "subject", "prompt_index", "seed")  # one image each: what a rerun skips when present


@dataclass
class EvalSection:
    dreambench: str | None = None  # DreamBench 'dataset' folder (a path, s3:// or gs://); null = synthetic subjects
    descriptive_names: bool = True  # paper App. D.3 subject names instead of the class word
    subjects: list[str] | int | None = None  # names, or the first N subjects; null = all
    prompts: int | None = None  # the first N prompts per subject; null = all (25)
    seeds: int = 4  # images per (subject, prompt), seeds seed..seed+seeds-1 (paper: 4)
    seed: int = 0
    steps: int = 28  # paper Sec. 4.1
    guidance: float = 3.5
    image_guidance: float = 1.0  # sfo.sampler image guidance (1 = off, as the paper's evaluation)
    sampling: SamplingMode = field(default_factory=SamplingMode)  # standard | decoupled | dual-branch (sfo.modes)
    size: int = 512
    reference_index: int = 0  # which reference photo conditions the model (DINO/CLIP-I use all of them)
    batch_size: int = 4
    dino_encoder: str = "tiny"  # "tiny" (random) or a local folder, e.g. facebook/dino-vits16
    clip_encoder: str = "tiny"  # "tiny" (random) or a local folder, e.g. openai/clip-vit-large-patch14

    def __post_init__(self) -> None:
        check_image_guidance(self.image_guidance, "eval")
        if self.seeds < 1:
            raise ValueError(f"eval.seeds: must be at least 1, got {self.seeds}")
        if isinstance(self.subjects, int) and self.subjects < 1:
            raise ValueError(f"eval.subjects: a count must be at least 1, got {self.subjects}")
        if self.prompts is not None and self.prompts < 1:
            raise ValueError(f"eval.prompts: must be at least 1 or null, got {self.prompts}")
        if self.size < PIXEL_MULTIPLE or self.size % PIXEL_MULTIPLE:
            raise ValueError(f"eval.size: must be a positive multiple of {PIXEL_MULTIPLE}, got {self.size}")
        if self.steps < 1:
            raise ValueError(f"eval.steps: must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size: must be at least 1, got {self.batch_size}")


@dataclass
class EvaluateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # model.ref_adapter is unused: methods name adapters
    methods: list[MethodConfig] = field(default_factory=lambda: [MethodConfig()])
    eval: EvalSection = field(default_factory=EvalSection)
    output: str = "runs/evaluate"  # a path, s3:// or gs://
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    runner: str = "ray"

    def __post_init__(self) -> None:
        check_runner_and_methods(self.runner, self.methods)
        self.output = storage.check_uri(self.output, "output")


@dataclass(frozen=True)
class Benchmark:
    """The selected subjects: their prompts (index, text), conditioning reference and all references."""

    prompts: dict[str, list[tuple[int, str]]]
    condition: dict[str, object]  # subject -> PIL image the model is conditioned on
    references: dict[str, list]  # subject -> PIL images DINO / CLIP-I compare against
    items: dict[str, str] = field(default_factory=dict)  # subject -> the words naming it in its prompts


def load_benchmark(section: EvalSection) -> Benchmark:
    """DreamBench (or the synthetic subjects), limited by ``eval.subjects`` / ``eval.prompts``."""
    if section.dreambench is None:
        from pipelines.synthetic import synthetic_triplets

        count = section.subjects if isinstance(section.subjects, int) else SYNTHETIC_SUBJECTS
        triplets = {t.sample_id: t for t in synthetic_triplets(count, section.size, seed=SYNTHETIC_EVAL_SEED)}
        if isinstance(section.subjects, list):
            triplets = {k: v for k, v in triplets.items() if k in section.subjects}
        return Benchmark({k: [(0, t.target_text)] for k, t in triplets.items()},
                         {k: t.reference for k, t in triplets.items()}, {k: [t.reference] for k, t in triplets.items()},
                         {k: t.item for k, t in triplets.items()})
    with storage.local_copy(section.dreambench) as folder:  # s3:// / gs://: downloaded here, read, removed
        return _dreambench_benchmark(section, folder)


def _dreambench_benchmark(section: EvalSection, folder: Path) -> Benchmark:
    from sfo.dreambench import load_dreambench

    bench = load_dreambench(folder)
    names = list(bench.subjects)
    if isinstance(section.subjects, int):
        names = names[: section.subjects]
    elif section.subjects:
        unknown = [s for s in section.subjects if s not in bench.subjects]
        if unknown:
            raise ValueError(f"eval.subjects: unknown subject(s) {unknown}; DreamBench has {names}")
        names = list(section.subjects)
    prompts, condition, references = {}, {}, {}
    items = {name: bench.subject_name(name, section.descriptive_names) for name in names}
    for name in names:
        cases = bench.cases(name, section.descriptive_names)[: section.prompts]
        prompts[name] = [(c.index, c.prompt) for c in cases]
        references[name] = bench.references(name, section.size)
        condition[name] = references[name][min(section.reference_index, len(references[name]) - 1)]
    return Benchmark(prompts, condition, references, items)


def work_rows(config: EvaluateConfig, bench: Benchmark, method: str) -> list[dict]:
    """One row per image to generate: (method, subject, prompt_index, prompt, seed)."""
    seeds = range(config.eval.seed, config.eval.seed + config.eval.seeds)
    return [{"method": method, "subject": s, "prompt_index": i, "prompt": p, "seed": seed}
            for s, cases in bench.prompts.items() for i, p in cases[: config.eval.prompts] for seed in seeds]


class Evaluator:
    """Work rows in, scored image rows out; model, every method's adapters and encoders loaded once per instance."""

    def __init__(self, config: EvaluateConfig, device: str | None = None) -> None:
        from sfo.metrics import Scorer
        from sfo.sampler import SamplerConfig

        use_torch_threads(config.scaling)
        self.bench = load_benchmark(config.eval)
        self.model, self._activate = load_methods(config, device)
        self.scorer = Scorer.load(config.eval.dino_encoder, config.eval.clip_encoder, device=self.model.device)
        e = config.eval
        self.samplers = method_samplers(config, SamplerConfig(steps=e.steps, guidance=e.guidance, height=e.size,
                                                              width=e.size, image_guidance=e.image_guidance))

    def __call__(self, batch: dict | pa.Table) -> pa.Table:
        """B work rows (dict of columns or ``pa.Table``) -> B rows of ``IMAGE_SCHEMA``."""
        from sfo.degrade import generic_subject_text
        from sfo.records import encode_png
        from sfo.sampler import generate

        columns = batch.to_pydict() if isinstance(batch, pa.Table) else {k: list(v) for k, v in batch.items()}
        subjects = [str(s) for s in columns["subject"]]
        prompts = [str(p) for p in columns["prompt"]]
        seeds = [int(s) for s in columns["seed"]]
        images = [None] * len(prompts)
        for method, rows in method_groups([str(m) for m in columns["method"]]):
            with self._activate(method):
                made = generate(self.model, [prompts[i] for i in rows], [seeds[i] for i in rows], self.samplers[method],
                                [self.bench.condition[subjects[i]] for i in rows],
                                auxiliary_prompts=[generic_subject_text(prompts[i], self.bench.items.get(subjects[i], ""))
                                                   for i in rows])
            for i, image in zip(rows, made):
                images[i] = image
        dino, clip_i = [], []
        for image, subject in zip(images, subjects):  # references differ per subject
            refs = self.bench.references[subject]
            dino.append(float(self.scorer.dino([image], refs)[0]))
            clip_i.append(float(self.scorer.clip_i([image], refs)[0]))
        clip_t = self.scorer.clip_t(images, prompts).tolist()
        return pa.Table.from_pydict({
            "method": [str(m) for m in columns["method"]], "subject": subjects,
            "prompt_index": [int(i) for i in columns["prompt_index"]], "prompt": prompts,
            "seed": [int(s) for s in columns["seed"]], "image_png": [encode_png(im) for im in images],
            "dino": dino, "clip_i": clip_i, "clip_t": clip_t,
            "random_encoders": [self.scorer.random_encoders] * len(images),
        }, schema=IMAGE_SCHEMA)


def check_config(config: EvaluateConfig) -> Benchmark:
    """Fails before any work on a missing adapter folder, DreamBench folder or encoder folder."""
    check_methods(config)
    for name in ("dino_encoder", "clip_encoder"):
        folder = getattr(config.eval, name)
        if folder != "tiny" and not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"eval.{name}: {folder!r} is not a local transformers model folder (no config.json)")
    if config.eval.dreambench is not None:
        try:
            storage.check_uri(config.eval.dreambench, "eval.dreambench")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not storage.is_dir(config.eval.dreambench):
            raise ConfigError(f"eval.dreambench: {config.eval.dreambench!r} does not exist; pass DreamBench's "
                              "'dataset' folder (a path, s3:// or gs://) or null for the embedded synthetic subjects")
    try:
        return load_benchmark(config.eval)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(str(exc) if str(exc).startswith("eval.") else f"eval.dreambench: {exc}") from None


def read_images(output: str | Path, methods: list[str], schema: pa.Schema = IMAGE_SCHEMA,
                key: tuple[str, ...] = IMAGE_KEY) -> pa.Table:
    """The scored images of ``methods`` under ``output/images`` (``pipelines.evaluate_io.read_images``)."""
    return evaluate_io.read_images(str(output), methods, schema, key)


def summarize(table: pa.Table) -> dict:
    """Mean DINO / CLIP-I / CLIP-T per method (over all its images) and per (method, subject)."""
    from sfo.metrics import RANDOM_ENCODERS_NOTE

    rows = table.select(["method", "subject", *METRICS]).to_pylist()

    def means(selected: list[dict]) -> dict:
        return {"images": len(selected), **{m: sum(r[m] for r in selected) / len(selected) for m in METRICS}}

    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = {"methods": {}, "subjects": {}}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        summary["methods"][method] = means(mine)
        summary["subjects"][method] = {s: means([r for r in mine if r["subject"] == s])
                                       for s in dict.fromkeys(r["subject"] for r in mine)}
    random = any(table.column("random_encoders").to_pylist())
    summary["random_encoders"] = random
    summary["note"] = RANDOM_ENCODERS_NOTE if random else "DINO ViT-S/16 and CLIP encoders from local folders"
    return summary


def format_table(summary: dict) -> str:
    """The Table-1-style text table (per method, then per subject)."""
    lines = [f"{'method':<16} {'images':>6} {'DINO':>7} {'CLIP-I':>7} {'CLIP-T':>7}"]
    for method, m in summary["methods"].items():
        lines.append(f"{method:<16} {m['images']:>6} {m['dino']:>7.3f} {m['clip_i']:>7.3f} {m['clip_t']:>7.3f}")
    for method, subjects in summary["subjects"].items():
        for subject, m in subjects.items():
            lines.append(f"  {method}/{subject:<24} {m['images']:>4} {m['dino']:>7.3f} {m['clip_i']:>7.3f} {m['clip_t']:>7.3f}")
    if summary["random_encoders"]:
        lines.append(f"NOTE: {summary['note']}")
    return "\n".join(lines)


def write_summary(summary: dict, output: str) -> None:
    lines = ["method,subject,images,dino,clip_i,clip_t,note"]
    note = summary["note"] if summary["random_encoders"] else ""
    for method, m in summary["methods"].items():
        lines.append(f"{method},ALL,{m['images']},{m['dino']:.6f},{m['clip_i']:.6f},{m['clip_t']:.6f},{note}")
        for subject, s in summary["subjects"][method].items():
            lines.append(f"{method},{subject},{s['images']},{s['dino']:.6f},{s['clip_i']:.6f},{s['clip_t']:.6f},{note}")
    evaluate_io.write_summary(summary, output, lines)


def run(config: EvaluateConfig) -> dict:
    """Checks the config, generates and scores every method's images, writes and returns the summary."""
    bench = check_config(config)
    started = time.time()
    rows = [row for method in config.methods for row in work_rows(config, bench, method.name)]
    print(f"[evaluate] {len(config.methods)} method(s) x {len(rows) // len(config.methods)} images "
          f"({len(bench.prompts)} subjects, {config.runner}, one model for all methods)", flush=True)
    generate_missing(config, rows, IMAGE_KEY, "evaluate", Evaluator)
    summary = summarize(read_images(config.output, [m.name for m in config.methods]))
    write_summary(summary, config.output)
    print(format_table(summary), flush=True)
    print(f"[evaluate] wrote {storage.join(config.output, 'summary.json')}, summary.csv in {time.time() - started:.1f} s",
          flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    return job_main(EvaluateConfig, "python -m pipelines.evaluate", __doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
