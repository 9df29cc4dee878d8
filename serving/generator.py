"""The model side of serving, without Ray: one FLUX + adapter sets ("ref" + "sfo"), jobs in, PNG bytes out.

The Ray Serve deployment (``serving.replica.FluxGenerator``) holds one ``Generator`` per replica and feeds it
groups from ``serving.scheduler.GroupQueue``; tests drive it directly too. Jobs that share a batch key
(size, steps, guidance, adapter set, adapter) run as one ``sfo.sampler.sample_latents`` call; each image
has its own seed, so an image is the same whether its request was batched or not. ``should_stop`` is
asked after every sampling step (through the sampler's ``progress`` callback, so ``sfo`` knows nothing
of it) and between images: a cancelled or expired group stops within one step.

Adapter folders are local paths or ``s3://`` / ``gs://`` URIs (``cluster.storage``): a URI is downloaded
once per replica into a temporary folder (outside the working directory) that lives as long as the
``Generator``, so an adapter set evicted and loaded again is not downloaded again.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image

from cluster import storage
from sfo.adapters import REF, SFO, adapter_fingerprint, fused_adapters, load_adapter, use_adapters
from sfo.latents import decode_tokens
from sfo.models import load_flux
from sfo.records import decode_png, encode_png
from sfo.sampler import SamplerConfig, SamplingMode, sample_latents
from serving.schema import DEFAULT_ADAPTER_SET, Job

ADAPTER_SETS = {"sfo": [REF, SFO], "ref": [REF]}  # request's adapter -> LoRAs applied
REFERENCE_RESAMPLE = Image.Resampling.BICUBIC  # reference resized to the target size (OminiControl subject setting)
# fuse_adapters=None folds only up to this many transformer parameters: folding copies every adapted weight per
# sampler call (~16 GB for FLUX.1-dev's 12B in bf16), which a 1B-and-up model pays in memory and copy time.
FOLD_MAX_PARAMS = 1_000_000_000


class Stopped(Exception):
    """Sampling stopped between steps because ``should_stop()`` said so (client gone or deadline passed)."""


def lora_names(adapter_set: str, adapter: str) -> list[str]:
    """The LoRA adapter names a request's (adapter set, adapter) applies: the default set keeps the plain
    names ("ref", "sfo"), set ``s`` loads as "s--ref", "s--sfo" (peft names are module keys: no dots)."""
    names = ADAPTER_SETS[adapter]
    if adapter_set == DEFAULT_ADAPTER_SET:
        return list(names)
    return [f"{adapter_set.replace('.', '_')}--{name}" for name in names]


def _check_folder(folder: Path, given: str) -> None:
    for name in (REF, SFO):
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"adapters: no {name}/ folder in {given!r}; pass the folder the "
                                    "training export writes (runs/train/sfo/adapters)")


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
            (safetensors only; ``load_adapter`` reads nothing else): a path, ``s3://`` or ``gs://``.
        device, dtype: passed to ``load_flux`` (None = its defaults: CUDA+bf16 when available).
        max_batch_images: most images in one sampler call.
        fuse_adapters: fold the all-scoped adapters into a copy of the base weights for each sampler call
            (``sfo.adapters.fused_adapters``: 1.2x faster on the world model); the copy is the adapted
            layers' size (~16 GB for FLUX.1-dev in bf16). False applies them as LoRA layers; None (default)
            folds only models of at most ``FOLD_MAX_PARAMS`` transformer parameters.
    """

    def __init__(self, model: str, adapters: str, *, device: str | None = None, dtype: str | None = None,
                 max_batch_images: int = 8, fuse_adapters: bool | None = None):
        self._downloads: dict[str, tempfile.TemporaryDirectory] = {}  # URI -> its download, for this object's life
        folder = self._local(adapters)
        self.model = load_flux(model, device=device, dtype=dtype)
        load_adapter(self.model.transformer, folder / REF, REF)
        load_adapter(self.model.transformer, folder / SFO, SFO)
        self.max_batch_images = max_batch_images
        if fuse_adapters is None:
            fuse_adapters = sum(p.numel() for p in self.model.transformer.parameters()) <= FOLD_MAX_PARAMS
        self.fuse_adapters = fuse_adapters
        self._applied = fused_adapters if fuse_adapters else use_adapters
        self.adapter_sets = {DEFAULT_ADAPTER_SET: adapters}  # loaded sets -> their folders (paths or URIs)
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

    def _local(self, folder: str) -> Path:
        """A local folder holding ``folder``'s ref/ and sfo/: the path itself, or a URI's download (made once)."""
        if storage.is_remote(folder):
            key = storage.absolute(folder)
            if key not in self._downloads:
                download = tempfile.TemporaryDirectory(prefix="sfo-adapters-")  # TMPDIR, never the working directory
                try:
                    storage.download_folder(folder, Path(download.name) / "adapters")
                except FileNotFoundError:
                    download.cleanup()
                    raise FileNotFoundError(f"adapters: nothing at {folder!r}; pass the folder the training export "
                                            "wrote (ref/ and sfo/), uploaded as it is") from None
                self._downloads[key] = download
            path = Path(self._downloads[key].name) / "adapters"
        else:
            path = Path(folder)
        _check_folder(path, folder)
        return path

    def load_set(self, name: str, folder: str) -> None:
        """Loads adapter set ``name`` (``folder`` with ref/ and sfo/, safetensors only; a path or a URI) beside
        the others."""
        if name in self.adapter_sets:
            return
        path = self._local(folder)
        ref, sfo = lora_names(name, "sfo")
        try:
            load_adapter(self.model.transformer, path / REF, ref)
            load_adapter(self.model.transformer, path / SFO, sfo)
        except Exception:
            self._delete([ref, sfo])
            raise
        self.adapter_sets[name] = folder

    def unload_set(self, name: str) -> None:
        """Removes adapter set ``name``'s LoRA layers (the default set stays)."""
        if name == DEFAULT_ADAPTER_SET or self.adapter_sets.pop(name, None) is None:
            return
        self._delete(lora_names(name, "sfo"))

    def _delete(self, names: list[str]) -> None:
        from sfo.adapters import adapter_names

        present = [n for n in names if n in adapter_names(self.model.transformer)]
        if present:
            self.model.transformer.delete_adapters(present)

    def run(self, jobs: list[Job], should_stop: Callable[[], bool] | None = None) -> list[list[bytes]]:
        """One list of PNG bytes per job (one PNG per seed), in the jobs' order.

        Raises:
            Stopped: ``should_stop()`` returned true (asked after each sampling step and each decoded image).
        """
        def check(*_) -> None:
            if should_stop is not None and should_stop():
                raise Stopped("sampling stopped between steps")

        results: list[list[bytes]] = [[] for _ in jobs]
        for group in group_jobs(jobs, self.max_batch_images):
            check()
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
            names = lora_names(first.adapter_set, first.adapter)
            with torch.inference_mode():
                with self._applied(self.model.transformer, names):
                    latents = sample_latents(self.model, prompts, seeds, config, references, progress=check,
                                             auxiliary_prompts=auxiliary)  # (B, L, 64)
                for row, owner in enumerate(owners):  # one image at a time: the VAE's activations (FLUX at
                    # 1024 px: GBs per image) for one, not the whole group
                    check()
                    (image,) = decode_tokens(self.model, latents[row:row + 1], first.height, first.width)
                    results[owner].append(encode_png(image))
        return results
