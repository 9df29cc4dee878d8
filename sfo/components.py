"""FLUX pipeline components built in code, shared by the tiny preset (``sfo.models``) and the shapes
world's model (``sfo.shapes.model``): FLUX.1-dev's scheduler settings, a transformer of given sizes, small
CLIP + T5 text encoders with in-memory tokenizers, and the cache folder built models go to.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

FLUX_DEV_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)


def cache_root() -> Path:
    """Where built models are cached: ``$SFO_CACHE_DIR`` or ``~/.cache/sfo``."""
    return Path(os.environ.get("SFO_CACHE_DIR", Path.home() / ".cache" / "sfo"))


_CLIP_CHARS = [chr(c) for c in range(33, 127)]


def transformer_config(config, *, in_channels: int, guidance_embeds: bool) -> dict:
    """FluxTransformer2DModel's arguments for ``config``'s sizes (``TinyFluxConfig`` or
    ``sfo.shapes.model.ShapesFluxConfig``): what ``build_transformer`` builds and the memory plan reads."""
    return dict(
        patch_size=1,
        in_channels=in_channels,  # latent channels x 2x2 packing, as in FLUX
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.text_dim,
        pooled_projection_dim=config.text_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=list(config.axes_dims_rope),
    )


def build_transformer(config, *, in_channels: int, guidance_embeds: bool) -> FluxTransformer2DModel:
    """A FLUX transformer of ``config``'s sizes (``TinyFluxConfig`` or ``sfo.shapes.model.ShapesFluxConfig``)."""
    return FluxTransformer2DModel(**transformer_config(config, in_channels=in_channels, guidance_embeds=guidance_embeds))


def build_text_encoders(text_dim: int, words: tuple[str, ...] = ()) -> dict:
    """Small CLIP + T5 encoders (random weights) with in-memory tokenizers, as FluxPipeline components.

    CLIP reads one token per character. T5's unigram vocabulary holds ``words`` as whole pieces
    (each then one token) and single characters for everything else.
    """
    # CLIP: special tokens first, then one token per character ("</w>" marks a word end).
    clip_vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _CLIP_CHARS:
        clip_vocab[ch] = len(clip_vocab)
        clip_vocab[ch + "</w>"] = len(clip_vocab)
    tokenizer = CLIPTokenizer(
        vocab=clip_vocab, merges=[], unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_vocab),
            hidden_size=text_dim,
            intermediate_size=text_dim * 2,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=text_dim,
            bos_token_id=0,
            eos_token_id=1,  # must be the tokenizer's end token: it selects the pooled output
            pad_token_id=1,
        )
    )
    # T5: whole words score best, then single characters, word-initial ("▁x") and inner ("x").
    t5_pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    t5_pieces += [("▁" + word, -1.0) for word in words]
    t5_pieces += [("▁" + ch, -3.0) for ch in _CLIP_CHARS] + [(ch, -4.0) for ch in _CLIP_CHARS]
    tokenizer_2 = T5Tokenizer(
        vocab=t5_pieces, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0, model_max_length=512
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_pieces),
            d_model=text_dim,
            d_kv=text_dim // 4,
            d_ff=text_dim * 2,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",  # as T5 v1.1, the FLUX text encoder
            decoder_start_token_id=0,
        )
    )
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)
