"""Evaluation stage (SFO paper Sec. 4.1, Table 1): DreamBench DINO / CLIP-I / CLIP-T per method.

For every method (a name, adapter folders, the adapters active while sampling) and every
(subject, prompt, seed), one image is generated from the subject's reference and scored. One
callable class, ``Evaluator``, loads the model, the method's adapters and the encoders once per
instance; the Ray Data job runs an actor pool of it, ``runner=local`` a plain loop of the same.

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
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from cluster import storage
from pipelines import evaluate_io
from pipelines.common import (ModelConfig, ScalingConfig, check_cluster_gpus, check_image_guidance, init_ray,
                              ray_data_progress, use_torch_threads)
from pipelines.config import ConfigError, job_main, to_dict
from pipelines.evaluate_io import batches_to_make, images_folder, key_of, only_keys  # noqa: F401 - re-exported
from pipelines.resume import check_same_config, done_keys, parquet_files, write_table_atomic  # noqa: F401
from sfo.modes import SamplingMode

PIXEL_MULTIPLE = 16  # FLUX: 8x VAE compression x 2x2 token packing
RUNNERS = ("ray", "local")
ADAPTER_NAMES = ("ref", "sfo")  # sfo.adapters.REF / SFO
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
# Fields that change how the work is cut or run, not what any image holds: a rerun may change them.
EXECUTION_FIELDS = ("output", "runner", "scaling", "eval.batch_size", "model.ref_adapter")


@dataclass
class MethodConfig:
    name: str = "base"
    ref_adapter: str | None = None  # folder of the "ref" LoRA (sft job output): a path, s3:// or gs://
    sfo_adapter: str | None = None  # folder of the "sfo" LoRA (sfo job output): a path, s3:// or gs://
    active: list[str] = field(default_factory=list)  # adapters applied while sampling, e.g. [ref] or [ref, sfo]
    sampling: SamplingMode | None = None  # this method's sampler mode (sfo.modes); null = the eval section's

    def __post_init__(self) -> None:
        for role in ADAPTER_NAMES:
            if getattr(self, f"{role}_adapter") is not None:
                setattr(self, f"{role}_adapter", storage.check_uri(getattr(self, f"{role}_adapter"), f"methods.{role}_adapter"))
        for name in self.active:
            if name not in ADAPTER_NAMES:
                raise ValueError(f"methods.active: unknown adapter {name!r} in method {self.name!r}; use {list(ADAPTER_NAMES)}")
            if getattr(self, f"{name}_adapter") is None:
                raise ValueError(f"methods.{name}_adapter: method {self.name!r} activates {name!r} but gives no folder")


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


def check_runner_and_methods(runner: str, methods: list[MethodConfig]) -> None:
    """The checks every evaluation job's config makes: a known runner, one or more uniquely named methods."""
    if runner not in RUNNERS:
        raise ValueError(f"runner: unknown {runner!r}; use one of {list(RUNNERS)}")
    names = [m.name for m in methods]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"methods: need at least one method and unique names, got {names}")


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


def load_methods(config, device: str | None = None):
    """The model with every method's adapters loaded once, and ``activate(method)``, a context manager
    applying that method's adapters.

    One model serves all methods (one actor pool, one start-up): each distinct adapter folder is
    loaded once under a name of its own (methods sharing the SFT "ref" share it).
    """
    from sfo import adapters
    from sfo.models import load_flux

    model = load_flux(config.model.source, device=device, dtype=config.model.dtype)
    loaded: dict[str, str] = {}  # absolute folder or URI -> adapter name on the transformer
    active: dict[str, list[str]] = {}
    for spec in config.methods:
        active[spec.name] = []
        for role in ADAPTER_NAMES:
            folder = getattr(spec, f"{role}_adapter")
            if folder is None:
                continue
            key = storage.absolute(folder)
            if key not in loaded:
                loaded[key] = f"{role}{len(loaded)}"
                with storage.local_copy(folder) as local:  # a URI: a temporary download, removed once loaded
                    adapters.load_adapter(model.transformer, local, loaded[key])
            if role in spec.active:
                active[spec.name].append(loaded[key])
    applied = config.model.adapter_context()
    return model, lambda method: applied(model.transformer, active[method])


def method_groups(methods: list[str]) -> list[tuple[str, list[int]]]:
    """Row indices of each method in a batch, methods in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, method in enumerate(methods):
        groups.setdefault(method, []).append(index)
    return list(groups.items())


def method_samplers(config, sampler) -> dict:
    """Each method's sampler config: ``sampler`` with the method's ``sampling`` mode, else the eval section's."""
    from dataclasses import replace

    return {m.name: replace(sampler, sampling=m.sampling or config.eval.sampling) for m in config.methods}


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


def check_methods(config) -> None:
    """Fails before any work on a method whose adapter folder holds no LoRA weights."""
    from sfo.adapters import LORA_WEIGHTS

    for index, method in enumerate(config.methods):
        for name in ADAPTER_NAMES:
            folder = getattr(method, f"{name}_adapter")
            if folder is not None and not storage.is_file(storage.join(folder, LORA_WEIGHTS)):
                raise ConfigError(f"methods[{index}].{name}_adapter: no {LORA_WEIGHTS} in {folder!r} (method {method.name!r})")


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


def run_local(config, rows: list[dict], folder: str, evaluator_class=None, prefix: str = "part",
              keep: list[tuple] | None = None, key: tuple[str, ...] = IMAGE_KEY) -> None:
    """Generates and scores ``rows`` (any methods) in this process, batches of ``eval.batch_size`` rows in
    order, one Parquet file per batch (``{prefix}_{index}.parquet``, each written whole); with ``keep``,
    only the rows whose ``key`` is in it are written."""
    evaluator = (evaluator_class or Evaluator)(config)
    size = config.eval.batch_size
    for index, start in enumerate(range(0, len(rows), size)):
        out = evaluator(pa.Table.from_pylist(rows[start:start + size]))
        write_table_atomic(out if keep is None else only_keys(out, keep, key),
                           storage.join(folder, f"{prefix}_{index:06d}.parquet"))
        print(f"[evaluate] {min(start + size, len(rows))}/{len(rows)} images", flush=True)


def run_ray(config, rows: list[dict], folder: str, evaluator_class=None, prefix: str | None = None,
            keep: list[tuple] | None = None, key: tuple[str, ...] = IMAGE_KEY) -> None:
    """Generates and scores ``rows`` (every method's) on one Ray Data actor pool of ``evaluator_class``.

    Batches are ``rows`` cut every ``eval.batch_size`` rows, as the local loop cuts them (one block each: each
    batch gets a file of its own, and a killed job keeps the files already written); files are named
    ``{prefix}_{write uuid}_{task}.parquet`` when ``prefix`` is given; with ``keep``, only the rows whose
    ``key`` is in it are written.
    """
    import ray
    from ray.data.datasource import FilenameProvider

    init_ray()  # --address, RAY_ADDRESS or a fresh local Ray: never a stale one
    scaling = config.scaling
    check_cluster_gpus(scaling, "evaluate")
    gpus = {"num_gpus": scaling.gpus_per_worker} if scaling.use_gpu else {}
    ray_data_progress()
    size = config.eval.batch_size
    ds = ray.data.from_blocks([pa.Table.from_pylist(rows[i:i + size]) for i in range(0, len(rows), size)])
    ds = ds.map_batches(
        evaluator_class or Evaluator, fn_constructor_kwargs={"config": config},
        compute=ray.data.ActorPoolStrategy(size=scaling.num_workers), batch_size=size,
        batch_format="numpy", num_cpus=scaling.cpus_per_worker, **gpus)
    if keep is not None:
        ds = ds.map_batches(only_keys, fn_kwargs={"keys": keep, "key": key}, batch_format="pyarrow", batch_size=None,
                            num_cpus=scaling.cpus_per_worker)
    ds.write_parquet(folder, **({"filename_provider": FilenameProvider(prefix, "parquet")} if prefix else {}))


def recorded_fields(config) -> dict:
    """What an evaluation's images depend on, as dotted field -> plain value (``EXECUTION_FIELDS`` left out):
    the model and eval sections (selection included), and per method its active adapters, the sha256 of
    their weight files and its effective sampler mode. Shared with ``pipelines.evaluate_shapes``."""
    plain = to_dict(config)
    fields = {f"{section}.{name}": value for section in ("model", "eval") for name, value in plain[section].items()}
    for name in ("model.source", "eval.dreambench", "eval.dino_encoder", "eval.clip_encoder"):
        if isinstance(fields.get(name), str) and Path(fields[name]).exists():  # a local folder, not "tiny"
            fields[name] = str(Path(fields[name]).resolve())
    for method in config.methods:
        key = f"methods[{method.name}]"
        fields[f"{key}.active"] = list(method.active)
        fields[f"{key}.sampling"] = to_dict(method.sampling or config.eval.sampling)
        for role in ADAPTER_NAMES:
            folder = getattr(method, f"{role}_adapter")
            fields[f"{key}.{role}_adapter"] = evaluate_io.adapter_sha256(folder)
    return {k: v for k, v in fields.items() if not any(k == e or k.startswith(e + ".") for e in EXECUTION_FIELDS)}


def generate_missing(config, rows: list[dict], key: tuple[str, ...], stage: str, evaluator_class=None) -> None:
    """Generates and scores the ``rows`` not yet under ``<output>/images`` (keyed by ``key``); refuses an output
    made with another config (``pipelines.resume.check_same_config``). Shared with ``pipelines.evaluate_shapes``."""
    folder = images_folder(config.output)
    tag = f"[{stage}]"
    check_same_config(config.output, stage, recorded_fields(config), field_of_output="output",
                      has_files=bool(parquet_files(folder)),
                      fresh_fix=f"pass a new output=... (or delete {folder!r} yourself)")
    found, moved = done_keys(folder, list(key))
    for path in moved:
        print(f"{tag} moved unreadable {path} aside (*.incomplete); its images are generated again", flush=True)
    missing = sum(key_of(row, key) not in found for row in rows)
    print(f"{tag} {len(rows) - missing} image(s) already in {folder} are kept, {missing} to generate", flush=True)
    if not missing:
        return
    prefix = f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"  # never a kept file's name
    for attempt in range(2 if config.runner == "ray" else 1):
        made, keep = batches_to_make(rows, found, key, config.eval.batch_size)
        if not made:
            return
        if attempt:
            print(f"{tag} {len(keep or made)} image(s) missing after the pass (a worker died while writing their "
                  "file); generating them again", flush=True)
        (run_local if config.runner == "local" else run_ray)(config, made, folder, evaluator_class,
                                                             prefix=prefix + ("-redo" if attempt else ""), keep=keep,
                                                             key=key)
        found = done_keys(folder, list(key))[0]  # moves a file cut short by a killed writer aside


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
    generate_missing(config, rows, IMAGE_KEY, "evaluate")
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
