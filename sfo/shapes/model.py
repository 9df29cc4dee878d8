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
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from sfo.codec import PixelCodec
from sfo.degrade import generic_text
from sfo.models import FLUX_DEV_SCHEDULER, cache_root
from sfo.shapes import world as W

SHAPES = "shapes"
_CHARS = [chr(c) for c in range(33, 127)]


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
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=codec.config.latent_channels * 4,  # 2x2 packing, as in FLUX
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.text_dim,
        pooled_projection_dim=config.text_dim,
        guidance_embeds=False,
        axes_dims_rope=list(config.axes_dims_rope),
    )
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CHARS:
        clip_vocab[ch] = len(clip_vocab)
        clip_vocab[ch + "</w>"] = len(clip_vocab)
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                              model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_vocab), hidden_size=config.text_dim, intermediate_size=config.text_dim * 2,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, projection_dim=config.text_dim,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    # Unigram pieces: whole world words score best, so each is one token; characters cover the rest.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in world_words()]
    pieces += [("▁" + ch, -3.0) for ch in _CHARS] + [(ch, -4.0) for ch in _CHARS]
    tokenizer_2 = T5Tokenizer(vocab=pieces, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                              model_max_length=512)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(pieces), d_model=config.text_dim, d_kv=config.text_dim // 4, d_ff=config.text_dim * 2,
        num_layers=2, num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
    ))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=codec, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def pretrained_folder(config: ShapesFluxConfig = ShapesFluxConfig()) -> Path:
    """Where ``pipelines.pretrain`` saves the pretrained pipeline for these sizes."""
    return cache_root() / "shapes-flux" / config.fingerprint()


def require_pretrained(config: ShapesFluxConfig = ShapesFluxConfig()) -> Path:
    folder = pretrained_folder(config)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model: the shapes-world model is not pretrained yet (nothing at {folder}); run "
            "`python -m pipelines.pretrain` once (about 10 minutes on 2 CPU cores), or use model 'tiny'"
        )
    return folder
