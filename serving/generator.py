"""The model side of serving, without Ray: one FLUX + "ref" + "sfo" adapters, jobs in, PNG bytes out.

The Ray Serve deployment (``serving.app.FluxGenerator``) holds one ``Generator`` per replica and
feeds it batches from ``@serve.batch``; tests drive it directly too. Jobs that share a batch key
(size, steps, guidance, adapter) run as one ``sfo.sampler.generate`` call; each image has its own
seed, so an image is the same whether its request was batched or not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from sfo.adapters import REF, SFO, adapter_fingerprint, fused_adapters, load_adapter, use_adapters
from sfo.models import load_flux
from sfo.records import decode_png, encode_png
from sfo.sampler import SamplerConfig, SamplingMode, generate
from serving.schema import Job

ADAPTER_SETS = {"sfo": [REF, SFO], "ref": [REF]}  # request's adapter -> LoRAs applied
REFERENCE_RESAMPLE = Image.Resampling.BICUBIC  # reference resized to the target size (OminiControl subject setting)


def group_jobs(jobs: list[Job], max_samples: int) -> Iterator[list[int]]:
    """Indices of ``jobs`` in groups that can share one sampler call, at most ``max_samples`` images each.

    Groups keep arrival order within a key; a single job with more images than ``max_samples``
    still forms its own group (it is never split).
    """
    by_key: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        by_key.setdefault(job.batch_key, []).append(i)
    for indices in by_key.values():
        group: list[int] = []
        samples = 0
        for i in indices:
            n = len(jobs[i].seeds)
            if group and samples + n > max_samples:
                yield group
                group, samples = [], 0
            group.append(i)
            samples += n
        if group:
            yield group


class Generator:
    """Loads the base model and both adapters once; ``run`` turns jobs into PNG images.

    Args:
        model: ``"tiny"`` or a local FLUX.1-dev folder (``sfo.models.load_flux``).
        adapters: folder holding ``ref/`` and ``sfo/`` as ``sfo.adapters.save_adapter`` writes them
            (safetensors only; ``load_adapter`` reads nothing else).
        device, dtype: passed to ``load_flux`` (None = its defaults: CUDA+bf16 when available).
        max_batch_images: most images in one sampler call.
        fuse_adapters: fold the all-scoped adapters into a copy of the base weights for each sampler call
            (``sfo.adapters.fused_adapters``: 1.2x faster on the world model); the copy is the adapted
            layers' size (~16 GB for FLUX.1-dev in bf16). False applies them as LoRA layers.
    """

    def __init__(self, model: str, adapters: str, *, device: str | None = None, dtype: str | None = None,
                 max_batch_images: int = 8, fuse_adapters: bool = True):
        folder = Path(adapters)
        for name in (REF, SFO):
            if not (folder / name).is_dir():
                raise FileNotFoundError(f"adapters: no {name}/ folder in {str(folder)!r}; pass the folder the "
                                        "training export writes (runs/train/sfo/adapters)")
        self.model = load_flux(model, device=device, dtype=dtype)
        load_adapter(self.model.transformer, folder / REF, REF)
        load_adapter(self.model.transformer, folder / SFO, SFO)
        self.max_batch_images = max_batch_images
        self._applied = fused_adapters if fuse_adapters else use_adapters
        self.info = {
            "base_model": str(model),
            "device": str(self.model.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "default_adapter": "sfo",
            "adapters": {
                key: {"loras": names, "sha256": adapter_fingerprint(self.model.transformer, names)}
                for key, names in ADAPTER_SETS.items()
            },
        }

    def run(self, jobs: list[Job]) -> list[list[bytes]]:
        """One list of PNG bytes per job (one PNG per seed), in the jobs' order."""
        results: list[list[bytes]] = [[] for _ in jobs]
        for group in group_jobs(jobs, self.max_batch_images):
            first = jobs[group[0]]
            size = (first.width, first.height)
            prompts, seeds, references, owners, auxiliary = [], [], [], [], []
            for i in group:
                reference = decode_png(jobs[i].image)
                if reference.size != size:
                    reference = reference.resize(size, REFERENCE_RESAMPLE)
                for seed in jobs[i].seeds:
                    prompts.append(jobs[i].prompt)
                    auxiliary.append(jobs[i].auxiliary_prompt or jobs[i].prompt)
                    seeds.append(seed)
                    references.append(reference)
                    owners.append(i)
            config = SamplerConfig(steps=first.steps, guidance=first.guidance, height=first.height, width=first.width,
                                   image_guidance=first.image_guidance,
                                   sampling=SamplingMode(mode=first.mode, switch=first.switch))
            with torch.inference_mode(), self._applied(self.model.transformer, ADAPTER_SETS[first.adapter]):
                images = generate(self.model, prompts, seeds, config, references, auxiliary_prompts=auxiliary)
            for owner, image in zip(owners, images):
                results[owner].append(encode_png(image))
        return results
