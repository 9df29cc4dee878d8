"""Record schemas every stage reads and writes, PNG helpers, Subjects200K pair splitting.

Images travel as PNG bytes (never Python objects), so Parquet files, Ray Data blocks and HTTP
bodies all carry the same thing.

- Triplet (paper Sec. 3.1): reference image, target text, target image (+ item name, sample id).
- Quadruplet (Sec. 3.2): a triplet plus a negative target and how it was made (provenance).
- Optional cache columns (``CACHE_FIELDS``): a triplet's VAE latents and prompt embeddings,
  written by ``prepare`` with ``cache.enabled`` so training skips the frozen encoders; cdns adds the
  negative's latents (``NEGATIVE_CACHE_FIELD``) and keeps only the small ``CACHE_META_COLUMNS``: the
  tensors stay in the triplets, which the sfo job joins back by ``sample_id``.
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
    # Tensors are little-endian bf16 or float32 bytes (``cache_dtype``), C order, one sample each (no batch axis). L tokens =
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
    pa.field("cache_dtype", pa.string(), nullable=False),  # "bf16" or "fp32": how every tensor of the row is stored
]
"""Optional triplet columns: the frozen encoders' outputs, so training need not re-run them.

Valid only for the model (``cache_model``) and pixel size (``cache_size``) they were made
with; a training job with another ``model.source`` or ``data.size`` encodes from PNG instead.
Decode a batch of rows with ``decode_cache``.
"""
CACHE_COLUMNS = [f.name for f in CACHE_FIELDS]
CACHE_TENSOR_COLUMNS = ["cache_target_latents", "cache_reference_latents", "cache_prompt_embeds", "cache_pooled"]
CACHE_META_COLUMNS = [c for c in CACHE_COLUMNS if c not in CACHE_TENSOR_COLUMNS]  # what cdns keeps per row
CACHE_DTYPES = {"fp32": np.dtype("<f4"), "bf16": np.dtype("<u2")}  # bf16: the upper 16 bits of a float32
LEGACY_CACHE_DTYPE = "fp32"  # rows cached before the cache_dtype column existed
NEGATIVE_CACHE_FIELD = pa.field("cache_negative_latents", pa.binary(), nullable=False)
"""The cdns stage's addition to a cached triplet's columns: (L, 64) ``sfo.latents.encode_images`` of the
negative image (as its PNG decodes), same model, size and ``cache_dtype`` as the row's other cache columns."""
CACHED_QUADRUPLET_SCHEMA = pa.schema(list(QUADRUPLET_SCHEMA) + [f for f in CACHE_FIELDS if f.name in CACHE_META_COLUMNS]
                                     + [NEGATIVE_CACHE_FIELD])
"""cdns output with a cache: the triplet, its negative, the negative's latents and the cache's small columns;
the triplet's tensors (``CACHE_TENSOR_COLUMNS``) are joined back from the triplets by ``sample_id``."""



def refers_to_cache(names) -> bool:
    """Whether columns ``names`` are cdns output that refers to its triplets' cached tensors by ``sample_id``:
    the negative's latents and the small cache columns, none of ``CACHE_TENSOR_COLUMNS``."""
    names = set(names)
    return {NEGATIVE_CACHE_FIELD.name, *CACHE_META_COLUMNS} <= names and not set(CACHE_TENSOR_COLUMNS) & names


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


def cache_bytes(array, dtype: str) -> bytes:
    """An array (any shape, float32 values) as a ``CACHE_FIELDS`` cell: little-endian ``dtype`` bytes, C order.

    bf16 keeps float32's upper 16 bits rounded to nearest even, as ``torch.Tensor.to(torch.bfloat16)`` does
    (half the bytes of fp32; the T5 embeddings of one 512-token prompt: 4 MiB instead of 8).
    """
    values = np.ascontiguousarray(np.asarray(array), dtype="<f4")
    if dtype == "fp32":
        return values.tobytes()
    if dtype != "bf16":
        raise ValueError(f"cache dtype: unknown {dtype!r}; use one of {list(CACHE_DTYPES)}")
    bits = values.view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def _decode(blob: bytes, dtype: str) -> np.ndarray:
    raw = np.frombuffer(bytes(blob), dtype=CACHE_DTYPES[dtype])
    return raw if dtype == "fp32" else (raw.astype("<u4") << 16).view("<f4")


def _stack(blobs: Sequence[bytes], dtype: str, *shape: int) -> np.ndarray:
    return np.stack([_decode(b, dtype).reshape(shape) for b in blobs])


def decode_cache(columns: Mapping[str, Sequence]) -> dict[str, np.ndarray]:
    """``CACHE_FIELDS`` columns of N rows -> float32 arrays (bf16 cells widened exactly).

    Args:
        columns: column name -> N values (a Ray Data numpy batch, ``Table.to_pydict()``...); rows without
            ``cache_dtype`` (written before it existed) are fp32.
    Returns:
        {"target": (N, L, 64), "reference": (N, L, 64), "prompt_embeds": (N, Lt, D), "pooled": (N, P)}, and
        "negative": (N, L, 64) when the rows carry ``cache_negative_latents`` (cdns output).
    """
    tokens = {int(x) for x in columns["cache_latent_tokens"]}
    text_tokens = {int(x) for x in columns["cache_text_tokens"]}
    if len(tokens) != 1 or len(text_tokens) != 1:
        raise ValueError(f"cache: rows of one batch differ in token counts (latents {tokens}, text {text_tokens})")
    dtypes = {str(x) for x in columns["cache_dtype"]} if "cache_dtype" in columns else {LEGACY_CACHE_DTYPE}
    if len(dtypes) != 1 or not dtypes <= set(CACHE_DTYPES):
        raise ValueError(f"cache: rows of one batch must share one cache_dtype of {list(CACHE_DTYPES)}, got {dtypes}")
    (latent_tokens,), (lt,), (dtype,) = tokens, text_tokens, dtypes
    arrays = {
        "target": _stack(columns["cache_target_latents"], dtype, latent_tokens, -1),
        "reference": _stack(columns["cache_reference_latents"], dtype, latent_tokens, -1),
        "prompt_embeds": _stack(columns["cache_prompt_embeds"], dtype, lt, -1),
        "pooled": _stack(columns["cache_pooled"], dtype, -1),
    }
    if NEGATIVE_CACHE_FIELD.name in columns:
        arrays["negative"] = _stack(columns[NEGATIVE_CACHE_FIELD.name], dtype, latent_tokens, -1)
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
