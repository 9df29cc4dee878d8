"""An embedded, procedurally generated triplet source: no downloads, deterministic in its seed.

Each subject is a coloured shape with a fine pattern (stripes, dots or checks in a second colour);
the reference shows it alone on white, the target shows it smaller in a coloured scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 40),
    "purple": (140, 60, 180), "orange": (240, 130, 30), "black": (20, 20, 20), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
PATTERNS = ("stripes", "dots", "checks")
BACKGROUNDS = {"beach": (230, 210, 160), "grass": (110, 170, 90), "sky": (150, 190, 240), "night": (40, 40, 70)}


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    pattern: str
    accent: str

    @property
    def item(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Triplet:
    sample_id: str
    item: str
    target_text: str
    reference: Image.Image
    target: Image.Image


def _draw_subject(size: int, subject: Subject, box: tuple[int, int, int, int], background) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if subject.shape == "circle":
        draw.ellipse(box, fill=255)
    elif subject.shape == "square":
        draw.rectangle(box, fill=255)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=255)
    fill = Image.new("RGB", (size, size), COLOURS[subject.colour])
    pattern = ImageDraw.Draw(fill)
    step = max(2, (x1 - x0) // 5)
    accent = COLOURS[subject.accent]
    for i, x in enumerate(range(x0, x1, step)):
        for j, y in enumerate(range(y0, y1, step)):
            if subject.pattern == "stripes" and i % 2 == 0:
                pattern.rectangle((x, y, x + step // 2, y + step), fill=accent)
            elif subject.pattern == "dots":
                pattern.ellipse((x + step // 4, y + step // 4, x + 3 * step // 4, y + 3 * step // 4), fill=accent)
            elif subject.pattern == "checks" and (i + j) % 2 == 0:
                pattern.rectangle((x, y, x + step, y + step), fill=accent)
    image.paste(fill, (0, 0), mask)
    return image


def synthetic_triplets(n: int, size: int = 64, seed: int = 0) -> list[Triplet]:
    """``n`` deterministic triplets at ``size`` x ``size`` pixels."""
    rng = np.random.default_rng(seed)
    triplets = []
    for index in range(n):
        colour, accent = rng.choice(list(COLOURS), size=2, replace=False)
        subject = Subject(str(rng.choice(SHAPES)), str(colour), str(rng.choice(PATTERNS)), str(accent))
        place = str(rng.choice(list(BACKGROUNDS)))
        margin = size // 8
        reference = _draw_subject(size, subject, (margin, margin, size - margin, size - margin), (255, 255, 255))
        side = int(size * rng.uniform(0.35, 0.6))
        x, y = (int(v) for v in rng.integers(0, size - side, size=2))
        target = _draw_subject(size, subject, (x, y, x + side, y + side), BACKGROUNDS[place])
        text = f"a {subject.item} with {subject.pattern} in the {place}"
        triplets.append(Triplet(f"synthetic-{seed}-{index:06d}", subject.item, text, reference, target))
    return triplets
