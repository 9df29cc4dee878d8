"""The cdns stage's config and negative generator (SFO paper Sec. 3.3): what one actor (or the plain loop) runs.

``NegativeGenerator`` samples each negative with the SFT model (base + "ref" LoRA) from a *degraded*
condition (``sfo.degrade``). ``pipelines.cdns`` orchestrates it (Ray Data actor pool or plain loop,
resume, files); ``pipelines.dpo_dino`` builds on it for the paper's DPO-DINO baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field

import pyarrow as pa

from cluster import storage
from pipelines.common import ModelConfig, ScalingConfig, check_image_guidance, score_fingerprint, use_torch_threads
from sfo.degrade import CDNS_MODES, Degradation
from sfo.modes import SamplingMode
from sfo.records import CACHED_QUADRUPLET_SCHEMA, LEGACY_CACHE_DTYPE, QUADRUPLET_SCHEMA, SCORE_FIELDS, TRIPLET_SCHEMA
from sfo.timesteps import TimestepSampling

PIXEL_MULTIPLE = 16  # FLUX: 8x VAE compression x 2x2 token packing
SEED_BITS = 31  # per-sample seeds fit torch.Generator and int64 columns on every platform
RUNNERS = ("ray", "local")
NO_ADAPTER = "none"  # negative_adapter_sha256 when no "ref" LoRA was loaded
DPO_DINO_MODE = "dpo-dino"  # paper Table 4 baseline: pipelines.dpo_dino, not a degradation


@dataclass
class DataConfig:
    input: str | None = None  # a triplet Parquet file or folder (the prepare stage's output): a path, s3:// or gs://
    output: str = "runs/data/quadruplets"  # folder of quadruplet Parquet files (path or URI); reruns resume into it
    limit: int | None = None  # the first N input samples only (None = all)

    def __post_init__(self) -> None:
        if self.input is not None:
            self.input = storage.check_uri(self.input, "data.input")
        self.output = storage.check_uri(self.output, "data.output")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit: must be at least 1 or null, got {self.limit}")


@dataclass
class ScoreSection:
    """Eq. 3's reference terms computed here, with the "ref" model the stage already holds (``sfo.records.SCORE_FIELDS``)."""

    draws: int = 0  # K (timestep, noise) draws per row whose reference errors are stored; 0 = off (the sfo job runs them)
    timesteps: TimestepSampling = field(default_factory=TimestepSampling)  # must equal the sfo job's (sfo.scheme/mean/std)

    def __post_init__(self) -> None:
        if self.draws < 0:
            raise ValueError(f"cdns.score.draws: must be >= 0 (0 = off), got {self.draws}")


@dataclass
class CdnsSection:
    mode: str = "cdns"  # one of sfo.degrade.CDNS_MODES (paper Tables 4/5), or "dpo-dino" (Table 4)
    blur_radius: float | None = None  # override the mode's blur (paper Table B sweeps 2.5 / 5 / 10 / 20)
    noise_std: float | None = None  # override the mode's noise level ("noise" mode)
    steps: int = 28  # paper Sec. 4.1
    guidance: float = 3.5  # paper Sec. 4.1
    image_guidance: float = 1.0  # sfo.sampler image guidance (1 = off, as the paper)
    sampling: SamplingMode = field(default_factory=SamplingMode)  # standard (the paper) | decoupled | dual-branch
    size: int = 512  # negatives are size x size; references are resized to it
    batch_size: int = 4  # samples per model call (per actor)
    rows_per_file: int = 64  # rows per output file: a file is written as soon as its rows are generated, so a
    #                          killed job loses at most this many rows per actor (a few GPU-minutes by default)
    seed: int = 0  # per-sample seeds derive from (seed, sample_id)
    oracle_filter: bool = False  # shapes world only: drop pairs whose negative kept the reference's pattern and
    #                              accent (sfo.shapes.oracle.keeps_reference_details); a rerun regenerates and
    #                              drops them again (same seeds), as nothing is written for them
    dino_encoder: str = "tiny"  # dpo-dino only: a DINO ViT-S/16 folder (path, s3:// or gs://), or "tiny" (random weights)
    score: ScoreSection = field(default_factory=ScoreSection)  # reference errors for the sfo job (off by default)

    def __post_init__(self) -> None:
        if self.mode not in CDNS_MODES and self.mode != DPO_DINO_MODE:
            raise ValueError(f"cdns.mode: unknown {self.mode!r}; use one of {sorted(CDNS_MODES) + [DPO_DINO_MODE]}")
        if self.size < PIXEL_MULTIPLE or self.size % PIXEL_MULTIPLE:
            raise ValueError(f"cdns.size: must be a positive multiple of {PIXEL_MULTIPLE}, got {self.size}")
        if self.steps < 1:
            raise ValueError(f"cdns.steps: must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"cdns.batch_size: must be at least 1, got {self.batch_size}")
        if self.rows_per_file < 1:
            raise ValueError(f"cdns.rows_per_file: must be at least 1, got {self.rows_per_file}")
        check_image_guidance(self.image_guidance, "cdns")
        storage.check_uri(self.dino_encoder, "cdns.dino_encoder")
        self.degradation()  # an invalid blur_radius / noise_std fails here, not on an actor

    def degradation(self) -> Degradation:
        """The mode's degradation with this section's overrides applied."""
        overrides = {k: v for k, v in (("blur_radius", self.blur_radius), ("noise_std", self.noise_std)) if v is not None}
        base = CDNS_MODES["self-play"] if self.mode == DPO_DINO_MODE else CDNS_MODES[self.mode]  # dpo-dino: undegraded
        try:
            return dataclasses.replace(base, **overrides)
        except ValueError as exc:
            raise ValueError(str(exc).replace("degradation.", "cdns.")) from None


@dataclass
class CdnsConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cdns: CdnsSection = field(default_factory=CdnsSection)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    runner: str = "ray"  # "ray" (Ray Data actor pool) or "local" (plain loop, same generator)

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner: unknown {self.runner!r}; use one of {list(RUNNERS)}")
        if self.model.ref_adapter is not None:
            self.model.ref_adapter = storage.check_uri(self.model.ref_adapter, "model.ref_adapter")
        if self.cdns.score.draws and (self.model.ref_adapter is None or self.cdns.mode == DPO_DINO_MODE):
            raise ValueError("cdns.score.draws: stores the 'ref' model's errors, so it needs model.ref_adapter (the sft "
                             f"job's ref LoRA) and a mode other than {DPO_DINO_MODE}; or set cdns.score.draws=0")
        if self.cdns.oracle_filter:
            from sfo.shapes.world import SIZE

            if self.model.source != "shapes":
                raise ValueError(f"cdns.oracle_filter: needs the shapes world's oracles (model.source=shapes), got "
                                 f"model.source={self.model.source!r}; set cdns.oracle_filter=false")
            if self.cdns.size != SIZE:
                raise ValueError(f"cdns.oracle_filter: the oracles read {SIZE} px images, got cdns.size={self.cdns.size}; "
                                 f"set cdns.size={SIZE}")


def sample_seed(seed: int, sample_id: str) -> int:
    """A reproducible per-sample seed in [0, 2**31), independent of batching and of the actor."""
    digest = hashlib.sha256(f"{seed}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (1 << SEED_BITS)


class NegativeGenerator:
    """Triplet rows in, quadruplet rows out; loads the model (+ "ref" LoRA) once per instance (= per actor).

    Args:
        config: the job's config (only ``model`` and ``cdns`` are read).
        device: where to load the model; None = CUDA when available, else CPU.
    """

    def __init__(self, config: CdnsConfig, device: str | None = None, keep_cache: bool = False) -> None:
        from sfo import adapters
        from sfo.models import load_flux
        from sfo.sampler import SamplerConfig

        use_torch_threads(config.scaling)
        self.section = config.cdns
        self.degradation = config.cdns.degradation()
        self.model = load_flux(config.model.source, device=device, dtype=config.model.dtype)
        transformer = self.model.transformer
        if config.model.ref_adapter is not None:
            with storage.local_copy(config.model.ref_adapter) as folder:  # an s3:// / gs:// folder: a temporary download
                adapters.load_adapter(transformer, folder, adapters.REF)
            self.adapter_sha = adapters.adapter_fingerprint(transformer, [adapters.REF])
            applied = config.model.adapter_context()
            self._adapters = lambda: applied(transformer, [adapters.REF])
        else:
            self.adapter_sha = NO_ADAPTER
            self._adapters = lambda: adapters.use_adapters(transformer, [])
        s = self.section
        self.sampler = SamplerConfig(steps=s.steps, guidance=s.guidance, height=s.size, width=s.size,
                                     image_guidance=s.image_guidance, sampling=s.sampling)
        self.generic_word = "" if config.model.source == "shapes" else "object"  # dual-branch's auxiliary prompt
        self.keep_cache = keep_cache  # pass the triplets' small cache columns through and add the negatives' latents
        self.fingerprint = (score_fingerprint(config.model.source, config.model.ref_adapter, s.size, s.score.timesteps)
                            if s.score.draws else None)
        self.generated = 0  # rows this instance generated: a progress line every cdns.rows_per_file rows

    def reference_scores(self, rows: list[dict], negatives: list) -> dict[str, list]:
        """``SCORE_FIELDS`` columns for ``rows`` and their generated ``negatives``: per draw j < K, the "ref"
        model's errors on positive and negative at the draw's (t, noise), from the batch the sfo job would
        build from these PNGs (``sfo.objectives.reference_errors``, the step's own code path)."""
        import torch

        from sfo.objectives import encode_batch, reference_errors
        from sfo.records import decode_images
        from sfo.timesteps import draw, draw_seed

        s = self.section
        with torch.no_grad():
            batch = encode_batch(self.model, decode_images([r["reference_png"] for r in rows], s.size),
                                 [str(r["target_text"]) for r in rows], decode_images([r["target_png"] for r in rows], s.size),
                                 negatives)
        shape = tuple(batch.target.shape[1:])
        seeds = [[draw_seed(s.seed, str(r["sample_id"]), j) for j in range(s.score.draws)] for r in rows]
        t_all, pos_all, neg_all = [], [], []
        for j in range(s.score.draws):
            pairs = [draw(row_seeds[j], s.score.timesteps, shape) for row_seeds in seeds]
            t = torch.cat([p[0] for p in pairs]).to(self.model.device)
            noise = torch.stack([p[1] for p in pairs]).to(self.model.device, self.model.dtype)
            pos, neg = reference_errors(self.model.transformer, batch, t, noise)
            t_all.append(t.float().cpu())
            pos_all.append(pos.float().cpu())
            neg_all.append(neg.float().cpu())
        column = lambda parts: torch.stack(parts, dim=1).tolist()  # noqa: E731 - (B, K) as one list per row
        return {"score_seeds": seeds, "score_t": column(t_all), "score_ref_err_pos": column(pos_all),
                "score_ref_err_neg": column(neg_all), "score_fingerprint": [self.fingerprint] * len(rows)}

    def negative_cache(self, columns: dict, negatives: list) -> dict[str, list]:
        """The cache columns a quadruplet row carries: the triplet's small ``CACHE_META_COLUMNS`` and the
        negative's latents in the row's ``cache_dtype``. The triplet's tensors (``CACHE_TENSOR_COLUMNS``) stay
        in the triplets: the sfo job joins them back by ``sample_id``, so each is stored once."""
        from sfo.latents import encode_images
        from sfo.records import CACHE_META_COLUMNS, NEGATIVE_CACHE_FIELD, cache_bytes

        n = len(negatives)
        dtypes = [str(d) for d in columns.get("cache_dtype", [LEGACY_CACHE_DTYPE] * n)]  # triplets before bf16: fp32
        latents = encode_images(self.model, negatives).float().cpu()  # (B, L, 64), as training encodes the PNGs
        out = {name: list(columns[name]) for name in CACHE_META_COLUMNS if name != "cache_dtype"}
        out["cache_dtype"] = dtypes
        out[NEGATIVE_CACHE_FIELD.name] = [cache_bytes(x.numpy(), dtype) for x, dtype in zip(latents, dtypes)]
        return out

    def __call__(self, batch: dict | pa.Table) -> pa.Table:
        """Generates one negative per row.

        Args:
            batch: B triplet rows, as a dict of columns (Ray Data's numpy batches: object arrays of
                str / bytes) or a ``pa.Table``; columns of ``TRIPLET_SCHEMA``.
        Returns:
            A ``pa.Table`` of B rows in ``QUADRUPLET_SCHEMA`` (the triplet columns passed through), or
            ``CACHED_QUADRUPLET_SCHEMA`` with ``keep_cache``, plus ``SCORE_FIELDS`` with ``cdns.score.draws``; fewer
            with ``cdns.oracle_filter`` (the pairs whose negative kept the reference's details are dropped).
        """
        from PIL import Image

        from sfo.degrade import degrade_condition, generic_subject_text
        from sfo.records import decode_png, encode_png
        from sfo.sampler import generate

        columns = batch.to_pydict() if isinstance(batch, pa.Table) else {k: list(v) for k, v in batch.items()}
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        side = (self.section.size, self.section.size)
        seeds, prompts, clean, references = [], [], [], []
        for row in rows:
            seed = sample_seed(self.section.seed, str(row["sample_id"]))
            reference = decode_png(row["reference_png"]).resize(side, Image.BICUBIC)
            target = decode_png(row["target_png"]).resize(side, Image.BICUBIC)
            degraded, prompt = degrade_condition(reference, str(row["target_text"]), str(row["item"]),
                                                 self.degradation, seed=seed, target=target)
            seeds.append(seed)
            prompts.append(prompt)
            clean.append(reference)
            references.append(degraded)
        auxiliary = [generic_subject_text(p, str(row["item"]), self.generic_word) for p, row in zip(prompts, rows)]
        with self._adapters():
            negatives = generate(self.model, prompts, seeds, self.sampler, references, auxiliary_prompts=auxiliary)
        d, s = self.degradation, self.section
        out = {f.name: list(columns[f.name]) for f in TRIPLET_SCHEMA}  # passed through unchanged
        out.update({
            "negative_png": [encode_png(image) for image in negatives],
            "negative_mode": [s.mode] * len(rows),
            "negative_image_degradation": [d.image] * len(rows),
            "negative_text_degradation": [d.text] * len(rows),
            "negative_blur_radius": [d.blur_radius if d.image == "blur" else None] * len(rows),
            "negative_noise_std": [d.noise_std if d.image == "noise" else None] * len(rows),
            "negative_prompt": prompts,
            "negative_seed": seeds,
            "negative_steps": [s.steps] * len(rows),
            "negative_guidance": [s.guidance] * len(rows),
            "negative_adapter_sha256": [self.adapter_sha] * len(rows),
        })
        fields = list(CACHED_QUADRUPLET_SCHEMA if self.keep_cache else QUADRUPLET_SCHEMA)
        if self.keep_cache:  # cdns.cache_fits decided it: same model and size as these negatives
            out.update(self.negative_cache(columns, negatives))
        if s.score.draws:
            out.update(self.reference_scores(rows, negatives))
            fields += SCORE_FIELDS
        table = pa.Table.from_pydict(out, schema=pa.schema(fields))
        before, self.generated = self.generated, self.generated + len(rows)
        if self.generated // s.rows_per_file > before // s.rows_per_file:  # Ray forwards an actor's prints to the driver
            print(f"[cdns] generator {os.getpid()}: {self.generated} rows generated", flush=True)
        if s.oracle_filter:
            from sfo.shapes.oracle import keeps_reference_details

            table = table.filter(pa.array([not keeps_reference_details(ref, image)
                                           for ref, image in zip(clean, negatives)]))
        return table
