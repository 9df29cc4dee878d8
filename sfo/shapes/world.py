"""The shapes world: procedural subjects whose every attribute can be read back exactly.

A *subject* has coarse attributes (``shape``, main ``colour``), which target texts name, and fine
details (``pattern`` in an ``accent`` colour), which only the reference image shows: they play
the paper's "fine-grained subject details". A *context* (``background``, ``position``, ``size``)
places a subject in a target image. Images are ``SIZE`` x ``SIZE`` RGB, drawn with exact integer
masks (no anti-aliasing), so ``sfo.shapes.oracle`` recovers every attribute of a rendered image.

Rendering rules (the oracle's ground truth):
- The subject's box is ``SIDES[size]`` pixels square, centred at x = ``CENTRES_X[position]``,
  y = ``SIZE // 2``. Shapes fill the box: square = all of it; circle = pixel centres within
  side/2 of the box centre; triangle = apex at the top middle, base along the bottom row.
- The pattern is anchored at the box's top-left corner with cells of ``CELL`` pixels:
  ``hstripes`` = even cell rows, ``vstripes`` = even cell columns, ``checks`` = cells whose
  row + column is even, ``dots`` = cells with even row and even column. Pattern pixels inside
  the shape take the accent colour; the rest of the shape takes the main colour.
- A reference shows the subject alone: ``large``, ``center``, on ``REFERENCE_BACKGROUND``.

Triplets are drawn from ``numpy.random.default_rng(seed)``: the same seed gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image

from sfo.degrade import generic_text

SIZE = 32
CELL = 2  # pattern cell side in pixels (period 4)
# CDNS's blur in world pixels: the paper blurs 512-px images with radius 5, removing details of a few
# pixels; the world's details are 2-pixel cells in 32 px, which radius 2 removes (shape and colour stay).
CDNS_BLUR_RADIUS = 2.0

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 50, 50), "green": (40, 170, 70), "blue": (50, 90, 220), "yellow": (230, 200, 40)}
ACCENTS = {"white": (250, 250, 250), "black": (20, 20, 20)}
PATTERNS = ("hstripes", "vstripes", "checks", "dots")
BACKGROUNDS = {"sand": (215, 195, 140), "sky": (140, 190, 235), "mint": (160, 220, 170), "night": (50, 50, 90)}
REFERENCE_BACKGROUND = (128, 128, 128)
POSITIONS = ("left", "center", "right")
CENTRES_X = {"left": 11, "center": 16, "right": 21}
SIDES = {"small": 12, "large": 18}

PHRASES = {"left": "on the left", "center": "in the middle", "right": "on the right"}


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str  # coarse: named in texts
    pattern: str  # fine: only the reference shows it
    accent: str  # fine

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                     ("pattern", self.pattern, PATTERNS), ("accent", self.accent, ACCENTS)):
            if value not in allowed:
                raise ValueError(f"subject.{name}: unknown {value!r}; use one of {list(allowed)}")

    @property
    def item(self) -> str:
        """The coarse name, as a text names the subject: ``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Context:
    background: str
    position: str
    size: str

    def __post_init__(self) -> None:
        for name, value, allowed in (("background", self.background, BACKGROUNDS),
                                     ("position", self.position, POSITIONS), ("size", self.size, SIDES)):
            if value not in allowed:
                raise ValueError(f"context.{name}: unknown {value!r}; use one of {list(allowed)}")


ALL_SUBJECTS = tuple(Subject(*a) for a in product(SHAPES, COLOURS, PATTERNS, ACCENTS))
ALL_CONTEXTS = tuple(Context(*a) for a in product(BACKGROUNDS, POSITIONS, SIDES))


def fine_twin(subject: Subject, rng: np.random.Generator) -> Subject:
    """The same coarse subject with another (pattern, accent), drawn uniformly from the 7 others."""
    others = [(p, a) for p in PATTERNS for a in ACCENTS if (p, a) != (subject.pattern, subject.accent)]
    pattern, accent = others[int(rng.integers(len(others)))]
    return Subject(subject.shape, subject.colour, pattern, accent)


def target_text(subject: Subject, context: Context) -> str:
    """Coarse attributes and the context, never the fine details: ``"a small red circle on the left, sand background"``."""
    return f"a {context.size} {subject.item} {PHRASES[context.position]}, {context.background} background"


def shape_text(shape: str) -> str:
    """The colour-free prompt of paper App. A (``"a photo of a circle"``)."""
    return f"a photo of a {shape}"


def captions(subject: Subject, context: Context) -> tuple[str, str, str]:
    """The three texts pretraining pairs with a target image, most to least specific: its target
    text, the CDNS generic text of its subject (``"a photo of red circle"``) and the App. A prompt."""
    return target_text(subject, context), generic_text(subject.item), shape_text(subject.shape)


def box(context: Context) -> tuple[int, int, int]:
    """(x0, y0, side) of the subject's box in a target image."""
    side = SIDES[context.size]
    return CENTRES_X[context.position] - side // 2, SIZE // 2 - side // 2, side


def shape_mask(shape: str, x0: int, y0: int, side: int, size: int = SIZE) -> np.ndarray:
    """(size, size) bool mask of a shape filling the box (x0, y0, side)."""
    ys, xs = np.mgrid[0:size, 0:size]
    u, v = xs + 0.5 - x0, ys + 0.5 - y0  # pixel centres relative to the box corner
    inside = (u >= 0) & (u <= side) & (v >= 0) & (v <= side)
    if shape == "square":
        return inside
    if shape == "circle":
        return inside & ((u - side / 2) ** 2 + (v - side / 2) ** 2 <= (side / 2) ** 2)
    if shape == "triangle":
        return inside & (np.abs(u - side / 2) <= v / 2)
    raise ValueError(f"shape: unknown {shape!r}; use one of {list(SHAPES)}")


def pattern_mask(pattern: str, x0: int, y0: int, size: int = SIZE) -> np.ndarray:
    """(size, size) bool mask of the accent cells of a pattern anchored at (x0, y0)."""
    ys, xs = np.mgrid[0:size, 0:size]
    row, col = (ys - y0) // CELL % 2 == 0, (xs - x0) // CELL % 2 == 0
    masks = {"hstripes": row, "vstripes": col, "checks": row == col, "dots": row & col}
    if pattern not in masks:
        raise ValueError(f"pattern: unknown {pattern!r}; use one of {list(PATTERNS)}")
    return masks[pattern]


def render_array(subject: Subject, x0: int, y0: int, side: int, background: tuple[int, int, int]) -> np.ndarray:
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = background
    body = shape_mask(subject.shape, x0, y0, side)
    accent = body & pattern_mask(subject.pattern, x0, y0)
    image[body & ~accent] = COLOURS[subject.colour]
    image[accent] = ACCENTS[subject.accent]
    return image


def render(subject: Subject, context: Context) -> Image.Image:
    """The target image: the subject in its context."""
    return Image.fromarray(render_array(subject, *box(context), BACKGROUNDS[context.background]))


def render_reference(subject: Subject) -> Image.Image:
    """The reference image: the subject alone, large and centred, on the neutral background."""
    return Image.fromarray(render_array(subject, *box(Context("sand", "center", "large")), REFERENCE_BACKGROUND))


@dataclass(frozen=True)
class WorldTriplet:
    sample_id: str
    subject: Subject
    context: Context

    @property
    def item(self) -> str:
        return self.subject.item

    @property
    def target_text(self) -> str:
        return target_text(self.subject, self.context)

    @property
    def reference(self) -> Image.Image:
        return render_reference(self.subject)

    @property
    def target(self) -> Image.Image:
        return render(self.subject, self.context)


def world_triplets(n: int, seed: int = 0) -> list[WorldTriplet]:
    """``n`` triplets, subject and context drawn uniformly and independently from ``rng(seed)``; the
    first k are the same for every n >= k."""
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    # One (subject, context) draw per row, in row order: the first k triplets are the same for any n >= k,
    # so a sample id always names the same triplet (cdns resumes by sample id).
    draws = rng.integers([len(ALL_SUBJECTS), len(ALL_CONTEXTS)], size=(n, 2))
    return [WorldTriplet(sample_id(seed, i), ALL_SUBJECTS[s], ALL_CONTEXTS[c]) for i, (s, c) in enumerate(draws)]


def sample_id(seed: int, index: int) -> str:
    """The id of ``world_triplets(n, seed)[index]`` (any n > index): ``shapes-<seed>-<index>``."""
    return f"shapes-{seed}-{index:06d}"


def parse_sample_id(sample_id: str) -> tuple[int, int]:
    """``(seed, index)`` of a world triplet's sample id, the inverse of ``sample_id``."""
    prefix, _, rest = sample_id.partition("-")
    seed, _, index = rest.rpartition("-")
    try:
        if prefix != "shapes":
            raise ValueError
        return int(seed), int(index)
    except ValueError:
        raise ValueError(f"sample_id: expected 'shapes-<world seed>-<index>' (a shapes-world triplet), "
                         f"got {sample_id!r}") from None


def triplets_of(sample_ids) -> dict[str, WorldTriplet]:
    """The world triplet each sample id names, each world seed drawn once."""
    wanted = set(sample_ids)  # once: any iterable, each id parsed once
    last: dict[int, int] = {}
    for seed, index in map(parse_sample_id, wanted):
        last[seed] = max(index, last.get(seed, -1))
    return {t.sample_id: t for seed, index in last.items() for t in world_triplets(index + 1, seed)
            if t.sample_id in wanted}
