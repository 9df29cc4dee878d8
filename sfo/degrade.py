"""Condition degradations for negative sampling (SFO paper Sec. 3.3, Table 5, Table B).

CDNS makes the SFT model generate a negative target from a *degraded* condition: the reference
image blurred (radius 5) so fine subject details are gone, and the context-rich prompt replaced by
the generic "a photo of {item}". The alternatives of the paper's ablations live here too.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageFilter

IMAGE_DEGRADATIONS = ("none", "blur", "noise", "semantic")
TEXT_DEGRADATIONS = ("none", "generic", "hallucinated")
DEFAULT_BLUR_RADIUS = 5.0  # paper Sec. 4.1; Table B sweeps 2.5 / 5 / 10 / 20
DEFAULT_NOISE_STD = 0.3  # in units of the full pixel range [0, 1]; the paper gives no value
GENERIC_TEMPLATE = "a photo of {item}"


@dataclass(frozen=True)
class Degradation:
    """How to degrade a (reference image, prompt) condition.

    Attributes:
        image: ``none`` | ``blur`` (Gaussian, ``blur_radius`` px) | ``noise`` (additive Gaussian,
            ``noise_std`` of the pixel range) | ``semantic`` (the reference replaced by the target
            image: the subject inside a rich scene).
        text: ``none`` | ``generic`` ("a photo of {item}") | ``hallucinated`` (a slightly wrong
            caption from a ``Captioner``).
    """

    image: str = "blur"
    text: str = "generic"
    blur_radius: float = DEFAULT_BLUR_RADIUS
    noise_std: float = DEFAULT_NOISE_STD
    generic_template: str = GENERIC_TEMPLATE

    def __post_init__(self) -> None:
        if self.image not in IMAGE_DEGRADATIONS:
            raise ValueError(f"degradation.image: unknown {self.image!r}; use one of {list(IMAGE_DEGRADATIONS)}")
        if self.text not in TEXT_DEGRADATIONS:
            raise ValueError(f"degradation.text: unknown {self.text!r}; use one of {list(TEXT_DEGRADATIONS)}")
        if self.image == "blur" and not self.blur_radius > 0:
            raise ValueError(f"degradation.blur_radius: must be > 0, got {self.blur_radius}")
        if self.image == "noise" and not self.noise_std > 0:
            raise ValueError(f"degradation.noise_std: must be > 0, got {self.noise_std}")
        if "{item}" not in self.generic_template:
            raise ValueError(f"degradation.generic_template: must contain '{{item}}', got {self.generic_template!r}")


# Negative-sampling modes of the paper's Tables 4/5 (blur sweeps are "cdns" with another radius).
CDNS_MODES: dict[str, Degradation] = {
    "cdns": Degradation("blur", "generic"),
    "self-play": Degradation("none", "none"),
    "image-only": Degradation("blur", "none"),
    "text-only": Degradation("none", "generic"),
    "noise": Degradation("noise", "generic"),
    "semantic": Degradation("semantic", "generic"),
    "hallucinated-text": Degradation("blur", "hallucinated"),
}


def gaussian_blur(image: Image.Image, radius: float = DEFAULT_BLUR_RADIUS) -> Image.Image:
    """PIL's Gaussian blur with ``radius`` (the paper's "Gaussian blur with radius 5")."""
    return image.filter(ImageFilter.GaussianBlur(radius=radius))


def gaussian_noise(image: Image.Image, std: float, seed: int) -> Image.Image:
    """Adds N(0, std^2) noise in units of the [0, 1] pixel range, clipped; deterministic in ``seed``."""
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    noisy = pixels + np.random.default_rng(seed).normal(0.0, std, size=pixels.shape)
    return Image.fromarray((np.clip(noisy, 0.0, 1.0) * 255.0).round().astype(np.uint8), mode=image.mode)


def generic_text(item: str, template: str = GENERIC_TEMPLATE) -> str:
    return template.format(item=item)


def generic_subject_text(text: str, item: str, word: str = "object") -> str:
    """``text`` with its subject ``item`` replaced by a generic ``word`` (DCI's auxiliary prompt; "" drops
    the subject, for a vocabulary without a generic noun such as the shapes world's): the context stays.
    A text that does not name ``item`` comes back unchanged."""
    if not item or item not in text:
        return text
    return " ".join(text.replace(item, word).split()).replace(" ,", ",")


class Captioner(Protocol):
    """Produces a slightly incorrect caption (paper App. E asks GPT-4o for one)."""

    def __call__(self, text: str, item: str, seed: int) -> str: ...


class AttributeSwapCaptioner:
    """Offline stand-in for the paper's GPT-4o hallucinated captions (App. E).

    It is *not* an LLM: it swaps attribute words (colours, materials, shapes, sizes, patterns) in
    the original text for wrong ones of the same kind, and when the text has none it inserts a
    wrong colour before the item name. Plug a real captioner in through ``Captioner``.
    """

    VOCABULARY = {
        "colour": ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey", "gray"],
        "material": ["wooden", "metal", "metallic", "plastic", "glass", "leather", "cotton", "woolen", "ceramic", "stone"],
        "shape": ["round", "square", "triangular", "oval", "rectangular", "circular", "star-shaped"],
        "size": ["small", "large", "tiny", "huge", "big", "little", "tall", "short"],
        "pattern": ["striped", "dotted", "checkered", "plain", "spotted", "plaid", "floral"],
    }

    def __init__(self, max_swaps: int = 2) -> None:
        self.max_swaps = max_swaps
        self._kind = {w: k for k, words in self.VOCABULARY.items() for w in words}

    def __call__(self, text: str, item: str, seed: int) -> str:
        rng = random.Random(seed)
        tokens = re.split(r"(\W+)", text)
        slots = [i for i, tok in enumerate(tokens) if tok.lower() in self._kind]
        rng.shuffle(slots)
        for i in slots[: self.max_swaps]:
            kind = self._kind[tokens[i].lower()]
            tokens[i] = rng.choice([w for w in self.VOCABULARY[kind] if w != tokens[i].lower()])
        if slots:
            return "".join(tokens)
        colour = rng.choice(self.VOCABULARY["colour"])
        if item and item in text:
            return text.replace(item, f"{colour} {item}", 1)
        return f"{text}, {colour}"


def degrade_condition(
    reference: Image.Image,
    text: str,
    item: str,
    degradation: Degradation,
    *,
    seed: int,
    target: Image.Image | None = None,
    captioner: Captioner | None = None,
) -> tuple[Image.Image, str]:
    """Applies ``degradation`` to a (reference image, prompt) condition.

    Args:
        target: the positive target image; needed by the ``semantic`` image degradation.
        seed: seeds the noise and the captioner, so a sample's negative is reproducible.
    Returns:
        The degraded reference image and prompt.
    """
    if degradation.image == "blur":
        reference = gaussian_blur(reference, degradation.blur_radius)
    elif degradation.image == "noise":
        reference = gaussian_noise(reference, degradation.noise_std, seed)
    elif degradation.image == "semantic":
        if target is None:
            raise ValueError("target: the 'semantic' image degradation replaces the reference by the target image; pass it")
        reference = target.resize(reference.size, Image.BICUBIC)
    if degradation.text == "generic":
        text = generic_text(item, degradation.generic_template)
    elif degradation.text == "hallucinated":
        text = (captioner or AttributeSwapCaptioner())(text, item, seed)
    return reference, text
