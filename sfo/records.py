"""Record schemas every stage reads and writes, PNG helpers, Subjects200K pair splitting.

Images travel as PNG bytes (never Python objects), so Parquet files, Ray Data blocks and HTTP
bodies all carry the same thing.

- Triplet (paper Sec. 3.1): reference image, target text, target image (+ item name, sample id).
- Quadruplet (Sec. 3.2): a triplet plus a negative target and how it was made (provenance).
- Optional cache columns (``CACHE_FIELDS``): a triplet's VAE latents and prompt embeddings,
  written by ``prepare`` with ``cache.enabled`` so training skips the frozen encoders; cdns keeps them
  and adds the negative's latents (``NEGATIVE_CACHE_FIELD``, ``CACHED_QUADRUPLET_SCHEMA``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

TRIPLET_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("item", pa.string(), nullable=False),  # subject name, fills "a photo of {item}"
        pa.field("target_text", pa.string(), nullable=False),
        pa.field("reference_png", pa.binary(), nullable=False),
        pa.field("target_png", pa.binary(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # where the triplet came from
    ]
)

NEGATIVE_FIELDS = [
    pa.field("negative_png", pa.binary(), nullable=False),
    pa.field("negative_mode", pa.string(), nullable=False),  # cdns | self-play | ...
    pa.field("negative_image_degradation", pa.string(), nullable=False),
    pa.field("negative_text_degradation", pa.string(), nullable=False),
    pa.field("negative_blur_radius", pa.float32(), nullable=True),  # null unless blurred
    pa.field("negative_noise_std", pa.float32(), nullable=True),  # null unless noised
    pa.field("negative_prompt", pa.string(), nullable=False),  # the prompt actually used
    pa.field("negative_seed", pa.int64(), nullable=False),
    pa.field("negative_steps", pa.int32(), nullable=False),
    pa.field("negative_guidance", pa.float32(), nullable=False),
    pa.field("negative_adapter_sha256", pa.string(), nullable=False),  # weights that generated it
]

QUADRUPLET_SCHEMA = pa.schema(list(TRIPLET_SCHEMA) + NEGATIVE_FIELDS)

CACHE_FIELDS = [
    # Tensors are little-endian float32 bytes, C order, one sample each (no batch axis). L tokens =
    # (size / 16)^2, 64 features (16 VAE channels x 2x2 packing); Lt = T5 tokens (the model's
    # max length), D = T5 d_model (joint_attention_dim), P = CLIP pooled dim.
    pa.field("cache_target_latents", pa.binary(), nullable=False),  # (L, 64) sfo.latents.encode_images(target)
    pa.field("cache_reference_latents", pa.binary(), nullable=False),  # (L, 64) same, of the reference
    pa.field("cache_prompt_embeds", pa.binary(), nullable=False),  # (Lt, D) sfo.text.encode_prompts(target_text)
    pa.field("cache_pooled", pa.binary(), nullable=False),  # (P,) the CLIP pooled embedding
    pa.field("cache_latent_tokens", pa.int32(), nullable=False),  # L, for both latents
    pa.field("cache_text_tokens", pa.int32(), nullable=False),  # Lt
    pa.field("cache_model", pa.string(), nullable=False),  # sfo.models.model_identity of the encoder
    pa.field("cache_size", pa.int32(), nullable=False),  # the square pixel side the images were encoded at
]
"""Optional triplet columns: the frozen encoders' outputs, so training need not re-run them.

Valid only for the model (``cache_model``) and pixel size (``cache_size``) they were made
with; a training job with another ``model.source`` or ``data.size`` encodes from PNG instead.
Decode a batch of rows with ``decode_cache``.
"""
CACHE_COLUMNS = [f.name for f in CACHE_FIELDS]
CACHE_DTYPE = np.dtype("<f4")
NEGATIVE_CACHE_FIELD = pa.field("cache_negative_latents", pa.binary(), nullable=False)
"""The cdns stage's addition to a cached triplet's columns: (L, 64) ``sfo.latents.encode_images`` of the
negative image (as its PNG decodes), same model and size as the row's other cache columns."""
CACHED_QUADRUPLET_SCHEMA = pa.schema(list(QUADRUPLET_SCHEMA) + CACHE_FIELDS + [NEGATIVE_CACHE_FIELD])

SCORE_FIELDS = [
    # The cdns stage's ``score.draws`` = K: Eq. 3's reference terms computed with the model it already holds.
    pa.field("score_seeds", pa.list_(pa.int64()), nullable=False),  # (K,) draw j's generator seed: its t, then its
    #                                                                 noise (sfo.timesteps.draw; seeds: draw_seed)
    pa.field("score_t", pa.list_(pa.float32()), nullable=False),  # (K,) draw j's timestep in (0, 1)
    pa.field("score_ref_err_pos", pa.list_(pa.float32()), nullable=False),  # (K,) the "ref" model's flow-matching
    pa.field("score_ref_err_neg", pa.list_(pa.float32()), nullable=False),  # error on positive / negative at draw j
    pa.field("score_fingerprint", pa.string(), nullable=False),  # what they hold for (pipelines.common.score_fingerprint:
    #                                                               model, "ref" adapter file, size, timestep scheme)
]
"""Optional quadruplet columns: the reference model's errors for K (t, noise) draws per row. The sfo job,
when the fingerprint matches its own, uses draw ``epoch mod K`` for the row, regenerates its noise from
the seed and skips the reference pass (``sfo.objectives.sfo_objective(ref_errors=...)``)."""
SCORE_COLUMNS = [f.name for f in SCORE_FIELDS]


def float32_bytes(array) -> bytes:
    """An array (any shape) as little-endian float32 bytes, C order (a ``CACHE_FIELDS`` cell)."""
    return np.ascontiguousarray(np.asarray(array), dtype=CACHE_DTYPE).tobytes()


def _stack(blobs: Sequence[bytes], *shape: int) -> np.ndarray:
    return np.stack([np.frombuffer(bytes(b), dtype=CACHE_DTYPE).reshape(shape) for b in blobs])


def decode_cache(columns: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
    """``CACHE_FIELDS`` columns of N rows -> float32 arrays.

    Args:
        columns: column name -> N values (a Ray Data numpy batch, ``Table.to_pydict()``...).
    Returns:
        {"target": (N, L, 64), "reference": (N, L, 64), "prompt_embeds": (N, Lt, D), "pooled": (N, P)}, and
        "negative": (N, L, 64) when the rows carry ``cache_negative_latents`` (cdns output).
    """
    tokens = {int(x) for x in columns["cache_latent_tokens"]}
    text_tokens = {int(x) for x in columns["cache_text_tokens"]}
    if len(tokens) != 1 or len(text_tokens) != 1:
        raise ValueError(f"cache: rows of one batch differ in token counts (latents {tokens}, text {text_tokens})")
    (latent_tokens,), (lt,) = tokens, text_tokens
    arrays = {
        "target": _stack(columns["cache_target_latents"], latent_tokens, -1),
        "reference": _stack(columns["cache_reference_latents"], latent_tokens, -1),
        "prompt_embeds": _stack(columns["cache_prompt_embeds"], lt, -1),
        "pooled": _stack(columns["cache_pooled"], -1),
    }
    if NEGATIVE_CACHE_FIELD.name in columns:
        arrays["negative"] = _stack(columns[NEGATIVE_CACHE_FIELD.name], latent_tokens, -1)
    return arrays


def check_schema(table: pa.Table | pa.Schema, schema: pa.Schema, what: str) -> None:
    """Raises naming the missing or mistyped columns of ``table`` against ``schema``."""
    actual = table if isinstance(table, pa.Schema) else table.schema
    problems = []
    for field in schema:
        if field.name not in actual.names:
            problems.append(f"missing column {field.name!r} ({field.type})")
        elif not actual.field(field.name).type.equals(field.type):
            problems.append(f"column {field.name!r} is {actual.field(field.name).type}, expected {field.type}")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def encode_png(image: Image.Image) -> bytes:
    if image.mode != "RGB":
        raise ValueError(f"image: mode is {image.mode!r}; convert it with image.convert('RGB') first")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> Image.Image:
    """PNG (or any PIL-readable) bytes -> RGB image, fully loaded."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:
        raise ValueError(f"image: bytes are not a readable image ({exc})") from exc
    return image.convert("RGB")


def decode_images(column, size: int) -> list[Image.Image]:
    """PNG bytes -> RGB images of size x size (resized when they are not), as the training jobs read them."""
    images = [decode_png(bytes(b)) for b in column]
    return [im if im.size == (size, size) else im.resize((size, size)) for im in images]


SUBJECTS200K_PADDING = 8


def split_subjects200k_pair(image: Image.Image, *, padding: int = SUBJECTS200K_PADDING) -> tuple[Image.Image, Image.Image]:
    """Splits a Subjects200K pair image into its two square panels (left, right), as OminiControl does.

    With panel side S = H - 2p, the panels are the boxes (p, p, S+p, S+p) and (S+2p, p, 2S+2p, S+p):
    on the dataset's native 1056x528 images (p = 8) these are exactly the two 512x512 panels. The
    padding-free 1024x512 copies (the dataset card's notebook, ``shared/data/subjects200k_samples``)
    give two 496x496 panels with an 8-px margin trimmed; callers resize to their training size.
    ``padding=0`` splits a padding-free image into its exact halves.
    """
    w, h = image.size
    side = h - 2 * padding
    if padding < 0 or side <= 0 or w < 2 * side + 2 * padding:
        raise ValueError(
            f"image: a Subjects200K pair is at least (2S+2p)x(S+2p) with padding p={padding} "
            f"(e.g. 1056x528 or 1024x512); got {w}x{h}"
        )
    left = image.crop((padding, padding, side + padding, side + padding))
    right = image.crop((side + 2 * padding, padding, 2 * side + 2 * padding, side + padding))
    return left.convert("RGB"), right.convert("RGB")
