"""Record schemas every stage reads and writes, PNG helpers, Subjects200K pair splitting.

Images travel as PNG bytes (never Python objects), so Parquet files, Ray Data blocks and HTTP
bodies all carry the same thing.

- Triplet (paper Sec. 3.1): reference image, target text, target image (+ item name, sample id).
- Quadruplet (Sec. 3.2): a triplet plus a negative target and how it was made (provenance).
"""

from __future__ import annotations

import io

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
