"""The shapes-world FLUX: a small FLUX-architecture pipeline pretrained on the world.

Same classes and code path as FLUX.1 (``FluxTransformer2DModel``, CLIP + T5 text encoders, the
FLUX.1-dev scheduler), with two changes that fit the world:

- the VAE is ``sfo.codec.PixelCodec`` (2x2 space-to-depth, exact), so a 32-pixel image is an
  8x8 grid of 4x4-pixel tokens (48 numbers each, fewer than the 128-wide hidden state, as FLUX's
  64 are far fewer than its 3072) and decoding never blurs a fine detail;
- the T5 tokenizer knows the world's words (one token per word, characters as a fallback), so
  prompts fit in ``text_max_length`` = 16 tokens;
- no guidance embedding (like FLUX.1-schnell): a model trained from scratch has no distilled
  guidance, so ``guidance`` is ignored when sampling.

``build_shapes_pipeline`` makes the random-weight starting point; ``pipelines.pretrain`` trains
its transformer on the world and saves the pipeline to ``pretrained_folder()``, where
``load_flux("shapes")`` finds it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from sfo.codec import PixelCodec
from sfo.degrade import generic_text
from sfo.components import FLUX_DEV_SCHEDULER, build_text_encoders, build_transformer, cache_root
from sfo.shapes import world as W

SHAPES = "shapes"


@dataclass(frozen=True)
class ShapesFluxConfig:
    """Sizes of the shapes-world FLUX. Changing any field gives a new cache entry."""

    num_layers: int = 2  # double-stream blocks
    num_single_layers: int = 4  # single-stream blocks
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    text_dim: int = 64
    codec_factor: int = 2  # pixels per latent cell; a token is (2 * factor)^2 pixels, 48 numbers < hidden 128
    text_max_length: int = 16
    seed: int = 0

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + "|shapes-v1"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def world_words() -> list[str]:
    """Every word the world's texts use (target texts, App. A prompts, CDNS generic texts)."""
    texts = [W.target_text(s, c) for s in W.ALL_SUBJECTS[:: len(W.PATTERNS) * len(W.ACCENTS)] for c in W.ALL_CONTEXTS]
    texts += [W.shape_text(shape) for shape in W.SHAPES] + [generic_text(s.item) for s in W.ALL_SUBJECTS]
    words = {word for text in texts for word in re.findall(r"[a-z]+", text)}
    return sorted(words)


def build_shapes_pipeline(config: ShapesFluxConfig = ShapesFluxConfig()) -> FluxPipeline:
    """The untrained shapes-world pipeline (random transformer and text encoders, seeded)."""
    torch.manual_seed(config.seed)
    codec = PixelCodec(factor=config.codec_factor)
    transformer = build_transformer(config, in_channels=codec.config.latent_channels * 4, guidance_embeds=False)
    text = build_text_encoders(config.text_dim, tuple(world_words()))  # one T5 token per world word
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=codec,
                        transformer=transformer, **text)


SHIPPED = Path(__file__).resolve().parent / "pretrained"  # the model this repository ships (MANIFEST.json)
MANIFEST = "MANIFEST.json"
SHIPPED_STEPS = 6000  # its pretraining steps: pipelines.pretrain's default, so its MANIFEST command reproduces it


def pretrained_folder(config: ShapesFluxConfig = ShapesFluxConfig()) -> Path:
    """Where ``pipelines.pretrain`` saves a rebuilt pretrained pipeline for these sizes (the cache)."""
    return cache_root() / "shapes-flux" / config.fingerprint()


def shipped_manifest(config: ShapesFluxConfig = ShapesFluxConfig()) -> dict | None:
    """The shipped model's manifest when it was made with ``config``'s sizes, else None."""
    path = SHIPPED / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("sizes") == json.loads(json.dumps(asdict(config))) else None


def verify_shipped(config: ShapesFluxConfig = ShapesFluxConfig()) -> list[str]:
    """Files of the shipped model whose sha256 differs from the manifest (or that are missing or extra)."""
    manifest = shipped_manifest(config)
    if manifest is None:
        return [MANIFEST]
    return manifest_mismatches(SHIPPED, manifest["files"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` but its manifest (and ``__pycache__``), by relative path: a
    shipped folder's ``files`` record."""
    return {str(p.relative_to(folder)): _sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts}


def manifest_mismatches(folder: Path, files: dict[str, str]) -> list[str]:
    """Files of ``folder`` missing from ``files`` or extra (sorted), then those whose sha256 differs."""
    digests = file_digests(folder)
    return sorted(set(digests) ^ set(files)) + [n for n, d in sorted(files.items()) if n in digests and digests[n] != d]


def require_pretrained(config: ShapesFluxConfig = ShapesFluxConfig()) -> Path:
    """The pretrained model's folder: a rebuilt one in the cache when there is one, else the shipped one."""
    folder = pretrained_folder(config)
    if (folder / "model_index.json").is_file():
        return folder
    if shipped_manifest(config) is not None:
        return SHIPPED
    raise FileNotFoundError(
        f"model: no pretrained shapes-world model for these sizes (nothing at {folder}, and the shipped model in "
        f"{SHIPPED} was made for other sizes); run `python -m pipelines.pretrain` once (about 17 minutes on 2 CPU "
        "cores), or use model 'tiny'"
    )


# The shipped SFT base: the "ref" LoRA (OminiControl-style condition tokens) trained on the shipped model, which
# the demo and the reproduction start from, as the paper starts from a trained OminiControl.
SHIPPED_REF = Path(__file__).resolve().parent / "ref"


def base_fingerprint(folder: str | Path) -> str:
    """sha256 of a pretrained folder's transformer weights: what an adapter trained on it depends on."""
    return _sha256(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors")


# The shipped SFO adapter: the "sfo" LoRA trained with Eq. 3 on CDNS negatives on top of the shipped "ref" one; the
# demo starts from it (its budget cannot train one that shows SFO's gain at 3 standard errors).
SHIPPED_SFO = Path(__file__).resolve().parent / "sfo"


def _verified(folder: Path, config: ShapesFluxConfig, **expected: str) -> Path | None:
    """``folder`` when its manifest's ``base`` is the transformer of the model ``load_flux("shapes")`` loads, its
    other ``expected`` entries hold, and every file matches its sha256; else None."""
    path = folder / MANIFEST
    try:
        base = require_pretrained(config)
    except FileNotFoundError:
        return None
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("base") != base_fingerprint(base) or any(manifest.get(k) != v for k, v in expected.items()):
        return None
    return None if manifest_mismatches(folder, manifest["files"]) else folder


def shipped_ref(config: ShapesFluxConfig = ShapesFluxConfig()) -> Path | None:
    """The shipped "ref" adapter's folder when it was trained on the model ``load_flux("shapes")`` loads (its
    manifest's ``base`` equals that model's transformer) and every file matches its sha256; else None (a rebuilt
    model in the cache, or a damaged copy: the SFT base is then trained)."""
    return _verified(SHIPPED_REF, config)


def ref_fingerprint(folder: str | Path) -> str:
    """sha256 of a "ref" adapter's weights: what an "sfo" adapter trained on top of it depends on."""
    from sfo.adapters import LORA_WEIGHTS

    return _sha256(Path(folder) / LORA_WEIGHTS)


def shipped_sfo(config: ShapesFluxConfig = ShapesFluxConfig()) -> Path | None:
    """The shipped "sfo" adapter's folder when the shipped "ref" one is in use (``shipped_ref``) and the "sfo" one
    was trained on top of it and on the same model (its manifest's ``base`` and ``ref``), every file intact."""
    ref = shipped_ref(config)
    return None if ref is None else _verified(SHIPPED_SFO, config, ref=ref_fingerprint(ref))
