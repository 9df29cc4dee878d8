"""Exact oracles for the shapes world: every attribute of an image read back, no learning (issue 6).

Analysis by synthesis with the world's own drawing functions (``sfo.shapes.world``):

1. Background: the median colour of the ``BORDER``-pixel frame (no subject box reaches it), snapped
   to the nearest of ``BACKGROUNDS``. A reference's background is ``REFERENCE_BACKGROUND``: it is not
   searched and reads as None.
2. Subject mask: pixels farther than ``MASK_THRESHOLD`` from that median colour. The threshold is
   half the smallest distance between any background (references' included) and any subject colour
   (``COLOURS`` and ``ACCENTS``), so every subject pixel clears it and plain background stays below it.
3. Shape, position, size: the best IoU of the mask with the 18 templates ``shape_mask(shape,
   *box(context))`` (3 shapes x 3 positions x 2 sizes; a reference's box is the centre / large one).
   A best IoU below ``MIN_IOU`` matches no template: shape, position, size and pattern read None.
4. Colours: each mask pixel snapped to the nearest of ``COLOURS`` and ``ACCENTS``; colour = the most
   frequent ``COLOURS`` entry, accent = the most frequent ``ACCENTS`` entry (None when none).
5. Pattern: inside the recovered shape, the mask pixels of the accent colour against
   ``pattern_mask(p, x0, y0)`` (anchored at the recovered box) for each pattern; the best pixel
   accuracy inside the shape wins.

Every rendered image reads back exactly, and so do images under mild corruption (Gaussian noise of
std 8, PIL blur of radius 0.5): ``tests/sfo/test_shapes.py`` checks all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image

from sfo.shapes.world import (
    ACCENTS, BACKGROUNDS, COLOURS, PATTERNS, POSITIONS, REFERENCE_BACKGROUND, SHAPES, SIDES, SIZE, Context, Subject,
    box, pattern_mask, render, shape_mask,
)

FIDELITY_KEYS = ("shape", "colour", "pattern", "accent")  # what the reference shows
CONTEXT_KEYS = ("background", "position", "size")
TEXT_KEYS = ("background", "position", "size", "shape", "colour")  # what the target text names
BORDER = 2  # frame width in pixels; the widest box leaves 2 free columns on each side

_BACKGROUND_NAMES = tuple(BACKGROUNDS)
_BACKGROUND_RGB = np.array(list(BACKGROUNDS.values()), np.float32)  # (4, 3)
_PAINT_NAMES = tuple(COLOURS) + tuple(ACCENTS)  # COLOURS first: index < len(COLOURS) is a main colour
_PAINT_RGB = np.array(list(COLOURS.values()) + list(ACCENTS.values()), np.float32)  # (6, 3)
_PAINT_SQ = (_PAINT_RGB**2).sum(axis=1)  # (6,)
_GROUNDS = np.vstack([_BACKGROUND_RGB, REFERENCE_BACKGROUND])  # (5, 3)
# ~40.9: the closest pair is night vs black; every subject pixel clears it, plain background does not
MASK_THRESHOLD = 0.5 * float(np.linalg.norm(_GROUNDS[:, None] - _PAINT_RGB[None], axis=-1).min())
MIN_IOU = 0.5  # below it the mask resembles no template (a clean render scores 1.0 on its own)

# The 18 templates: box() reads only position and size, so any background names the context.
_TEMPLATE_KEYS = tuple(product(POSITIONS, SIDES, SHAPES))
_TEMPLATE_BOXES = tuple(box(Context(_BACKGROUND_NAMES[0], p, s)) for p, s, _ in _TEMPLATE_KEYS)
_TEMPLATES = np.stack([shape_mask(k[2], *b).ravel() for k, b in zip(_TEMPLATE_KEYS, _TEMPLATE_BOXES)])  # (18, S*S)
_TEMPLATES_F = _TEMPLATES.astype(np.float32)
_TEMPLATE_AREA = _TEMPLATES_F.sum(axis=1)  # (18,)
_PATTERNS = {b: np.stack([pattern_mask(p, b[0], b[1]).ravel() for p in PATTERNS])  # box -> (4, S*S)
             for b in set(_TEMPLATE_BOXES)}
_FRAME = np.ones((SIZE, SIZE), bool)
_FRAME[BORDER:-BORDER, BORDER:-BORDER] = False


@dataclass(frozen=True)
class Reading:
    """The attributes read from one image; None = could not be read (e.g. no subject pixels)."""

    shape: str | None
    colour: str | None
    pattern: str | None
    accent: str | None
    background: str | None
    position: str | None
    size: str | None


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """(S*S, 3) float32 RGB of a ``SIZE`` x ``SIZE`` PIL image in mode RGB or uint8 (H, W, 3) array."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"image.mode: got {image.mode!r}, need 'RGB'; pass image.convert('RGB')")
        if image.size != (SIZE, SIZE):
            raise ValueError(f"image.size: got {image.size}, need ({SIZE}, {SIZE}); "
                             f"pass image.resize(({SIZE}, {SIZE}), Image.NEAREST)")
        image = np.asarray(image)
    elif not isinstance(image, np.ndarray):
        raise TypeError(f"image: got {type(image).__name__}; pass a PIL image or a uint8 (H, W, 3) array")
    if image.dtype != np.uint8:
        raise ValueError(f"image.dtype: got {image.dtype}, need uint8 in 0..255; "
                         "pass (x * 255).round().clip(0, 255).astype(np.uint8) for floats in [0, 1]")
    if image.shape != (SIZE, SIZE, 3):
        raise ValueError(f"image.shape: got {image.shape}, need ({SIZE}, {SIZE}, 3); "
                         "drop alpha with [..., :3], resize to the world's SIZE")
    return image.reshape(-1, 3).astype(np.float32)


def read_image(image: Image.Image | np.ndarray, *, reference: bool = False) -> Reading:
    """Every attribute of one shapes-world image (the module docstring gives the method).

    Args:
        image: ``SIZE`` x ``SIZE``, a PIL image in mode RGB or a uint8 (H, W, 3) array.
        reference: the image is a reference (background ``REFERENCE_BACKGROUND``, read as None).
    """
    rgb = _pixels(image)  # (S*S, 3)
    ground = np.median(rgb[_FRAME.ravel()], axis=0)  # (3,)
    background = None
    if not reference:
        background = _BACKGROUND_NAMES[int(np.linalg.norm(_BACKGROUND_RGB - ground, axis=1).argmin())]
    mask = ((rgb - ground) ** 2).sum(axis=1) > MASK_THRESHOLD**2  # (S*S,)
    if not mask.any():
        return Reading(None, None, None, None, background, None, None)

    # nearest paint: argmin over p of |x - p|^2 = |x|^2 - 2 x.p + |p|^2, the |x|^2 term dropped
    paint = (_PAINT_SQ - 2 * rgb @ _PAINT_RGB.T).argmin(axis=1)  # (S*S,) index into _PAINT_NAMES
    counts = np.bincount(paint[mask], minlength=len(_PAINT_NAMES))  # (6,)
    n_main = len(COLOURS)
    colour = _PAINT_NAMES[int(counts[:n_main].argmax())] if counts[:n_main].any() else None
    accent_index = n_main + int(counts[n_main:].argmax()) if counts[n_main:].any() else None
    accent = None if accent_index is None else _PAINT_NAMES[accent_index]

    inter = _TEMPLATES_F @ mask.astype(np.float32)  # (18,)
    iou = inter / (_TEMPLATE_AREA + mask.sum() - inter)
    best = int(iou.argmax())
    if iou[best] < MIN_IOU:
        return Reading(None, colour, None, accent, background, None, None)
    position, size, shape = _TEMPLATE_KEYS[best]

    pattern = None
    if accent_index is not None:
        body = _TEMPLATES[best]  # (S*S,)
        painted = body & mask & (paint == accent_index)
        agree = ((_PATTERNS[_TEMPLATE_BOXES[best]] & body) == painted) & body  # (4, S*S)
        pattern = PATTERNS[int(agree.sum(axis=1).argmax())]
    return Reading(shape, colour, pattern, accent, background, position, size)


def judge(reading: Reading, subject: Subject, context: Context | None) -> dict[str, bool]:
    """Per-attribute verdicts of a reading, plus the aggregates.

    Returns:
        ``FIDELITY_KEYS`` (and ``CONTEXT_KEYS`` with a context) and: ``coarse`` = shape & colour,
        ``fine`` = pattern & accent, ``subject`` = all four subject attributes (subject fidelity) and,
        with a context, ``text`` = all of ``TEXT_KEYS`` (everything the target text names).
    """
    verdict = {k: getattr(reading, k) == getattr(subject, k) for k in FIDELITY_KEYS}
    if context is not None:
        verdict.update({k: getattr(reading, k) == getattr(context, k) for k in CONTEXT_KEYS})
    verdict["coarse"] = verdict["shape"] and verdict["colour"]
    verdict["fine"] = verdict["pattern"] and verdict["accent"]
    verdict["subject"] = verdict["coarse"] and verdict["fine"]
    if context is not None:
        verdict["text"] = all(verdict[k] for k in TEXT_KEYS)
    return verdict


def score(images: Sequence[Image.Image | np.ndarray], subjects: Sequence[Subject],
          contexts: Sequence[Context] | None = None, *, reference: bool = False) -> dict[str, float]:
    """The mean of ``judge`` over a batch: the rate of each key (``subject``, ``fine``, ``coarse``,
    ``text`` with contexts, and each attribute). Without contexts only the subject is judged."""
    if len(images) == 0:
        raise ValueError("images: empty batch")
    if len(subjects) != len(images) or (contexts is not None and len(contexts) != len(images)):
        raise ValueError(f"subjects / contexts: need one per image ({len(images)}), got {len(subjects)} / "
                         f"{None if contexts is None else len(contexts)}")
    if contexts is not None and any(c is None for c in contexts):
        raise ValueError("contexts: one Context per image, or None for the whole batch")
    verdicts = [judge(read_image(image, reference=reference), subject, None if contexts is None else contexts[i])
                for i, (image, subject) in enumerate(zip(images, subjects))]
    return {k: float(np.mean([v[k] for v in verdicts])) for k in verdicts[0]}


PAIR_KEYS = ("context", "coarse", "fine", "fine_matches_reference")


def _same_fine(reference: Reading, negative: Reading) -> bool:
    return negative.pattern == reference.pattern and negative.accent == reference.accent


def pair_differences(reference: Image.Image | np.ndarray, positive: Image.Image | np.ndarray,
                     negative: Image.Image | np.ndarray) -> dict[str, bool]:
    """What separates an SFO pair, read from the images alone.

    Returns:
        ``context``: the negative differs from the positive in background, position or size;
        ``coarse``: in shape or colour; ``fine``: in pattern or accent;
        ``fine_matches_reference``: the negative shows the reference's pattern and accent (a CDNS
        negative that kept the details the degradation was meant to remove).
    """
    ref, pos, neg = read_image(reference, reference=True), read_image(positive), read_image(negative)
    differs = lambda keys: any(getattr(pos, k) != getattr(neg, k) for k in keys)  # noqa: E731
    return {"context": differs(CONTEXT_KEYS), "coarse": differs(("shape", "colour")),
            "fine": differs(("pattern", "accent")), "fine_matches_reference": _same_fine(ref, neg)}


def keeps_reference_details(reference: Image.Image | np.ndarray, negative: Image.Image | np.ndarray) -> bool:
    """True when a negative shows the reference's pattern and accent (``pair_differences``'
    ``fine_matches_reference``): the degradation failed to remove the fine details, so pushing the model
    away from this negative pushes it away from the subject (the cdns option ``oracle_filter`` drops such pairs)."""
    return _same_fine(read_image(reference, reference=True), read_image(negative))


def pair_statistics(triples: Sequence[tuple]) -> dict[str, float]:
    """Share of (reference, positive, negative) triples with each of ``PAIR_KEYS``, and their count."""
    if not triples:
        raise ValueError("triples: need at least one (reference, positive, negative)")
    rows = [pair_differences(*t) for t in triples]
    return {"pairs": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in PAIR_KEYS}}


def redraw(reading: Reading) -> np.ndarray | None:
    """The world's own drawing of the attributes read (uint8 (SIZE, SIZE, 3)), None when any is missing:
    what a clean sample with this reading would look like."""
    if any(getattr(reading, k) is None for k in FIDELITY_KEYS + CONTEXT_KEYS):
        return None
    subject = Subject(reading.shape, reading.colour, reading.pattern, reading.accent)
    context = Context(reading.background, reading.position, reading.size)
    return np.asarray(render(subject, context))


def off_pixels(image: Image.Image | np.ndarray, reading: Reading | None = None) -> float:
    """Share of pixels whose colour is farther than ``MASK_THRESHOLD`` from the world's drawing of the
    image's own reading (``redraw``): 0 for a clean image, 1 when nothing reads back. Measures how cleanly
    a sample is drawn, whatever it shows."""
    reading = read_image(image) if reading is None else reading
    drawn = redraw(reading)
    if drawn is None:
        return 1.0
    distance = np.linalg.norm(_pixels(image) - drawn.reshape(-1, 3).astype(np.float32), axis=1)
    return float((distance > MASK_THRESHOLD).mean())
