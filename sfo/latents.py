"""Images <-> FLUX latent tokens: VAE encoding, 2x2 packing and the position ids of each token.

Subject conditioning (OminiControl-style sequence extension) puts the reference image's latent
tokens into the transformer sequence next to the target's. Their position ids are the target
grid's, shifted along the width axis by minus the reference's width in tokens:

    target token (row r, col c)     -> id (0, r, c)
    reference token (row r, col c)  -> id (0, r, c - W_ref)

so the reference sits immediately to the *left* of the target, sharing its rows. This is
OminiControl's subject setting (``position_delta = [0, -32]`` at 512x512, where a 512-pixel side
is 32 tokens). The sign is tested in ``tests/sfo/test_latents.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sfo.models import FluxModel

LATENT_CHANNELS = 16
PACK = 2  # FLUX packs 2x2 latent cells into one token (16 channels -> 64 features)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens, row-major over the 2x2 cells."""
    b, c, h, w = latents.shape
    if h % PACK or w % PACK:
        raise ValueError(f"latents: height and width must be even to pack 2x2, got {h}x{w}")
    x = latents.view(b, c, h // PACK, PACK, w // PACK, PACK)  # (B, C, h, 2, w, 2)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, 2, 2)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, height_tokens: int, width_tokens: int) -> torch.Tensor:
    """(B, h*w, C*4) tokens -> (B, C, 2h, 2w) latents; inverse of ``pack``."""
    b, n, d = tokens.shape
    if n != height_tokens * width_tokens:
        raise ValueError(f"tokens: {n} tokens do not fill a {height_tokens}x{width_tokens} grid")
    c = d // (PACK * PACK)
    x = tokens.view(b, height_tokens, width_tokens, c, PACK, PACK)  # (B, h, w, C, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h, 2, w, 2)
    return x.reshape(b, c, height_tokens * PACK, width_tokens * PACK)


def grid_ids(height_tokens: int, width_tokens: int, *, col_offset: int = 0) -> torch.Tensor:
    """Position ids (h*w, 3) of a token grid: (0, row, col + col_offset), row-major like ``pack``."""
    rows = torch.arange(height_tokens).repeat_interleave(width_tokens)
    cols = torch.arange(width_tokens).repeat(height_tokens) + col_offset
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


def condition_ids(height_tokens: int, width_tokens: int) -> torch.Tensor:
    """Ids of reference tokens: the grid shifted left by its own width (see the module docstring)."""
    return grid_ids(height_tokens, width_tokens, col_offset=-width_tokens)


def images_to_tensor(images: list[Image.Image], *, multiple: int) -> torch.Tensor:
    """RGB PIL images of one size -> (B, 3, H, W) float tensor in [-1, 1].

    Raises:
        ValueError: naming the image index and the fix, for a non-RGB mode, sides that are not
            a multiple of ``multiple`` or images of different sizes.
    """
    if not images:
        raise ValueError("images: need at least one image")
    size = images[0].size
    arrays = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}]: expected a PIL image, got {type(image).__name__}")
        if image.mode != "RGB":
            raise ValueError(f"images[{i}]: mode is {image.mode!r}; convert it first with image.convert('RGB')")
        w, h = image.size
        if w % multiple or h % multiple:
            raise ValueError(
                f"images[{i}]: size {w}x{h} is not a multiple of {multiple}; resize or crop it "
                f"(e.g. to {max(multiple, w - w % multiple)}x{max(multiple, h - h % multiple)})"
            )
        if image.size != size:
            raise ValueError(f"images[{i}]: size {image.size} differs from images[0] {size}; a batch shares one size")
        arrays.append(np.asarray(image, dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 255]
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) tensor in [-1, 1] -> RGB PIL images (rounded, clamped)."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), mode="RGB") for a in x]


@torch.no_grad()
def encode_images(model: FluxModel, images: list[Image.Image]) -> torch.Tensor:
    """Encodes RGB images to packed, normalised latent tokens (B, L, 64).

    The posterior mode is used (not a sample), so a reference always gives the same tokens.
    """
    x = images_to_tensor(images, multiple=model.pixel_multiple).to(model.device, model.dtype)
    latents = model.vae.encode(x).latent_dist.mode()  # (B, 16, H/8, W/8)
    latents = (latents - model.vae.config.shift_factor) * model.vae.config.scaling_factor
    return pack(latents)


@torch.no_grad()
def decode_tokens(model: FluxModel, tokens: torch.Tensor, height: int, width: int) -> list[Image.Image]:
    """Inverse of ``encode_images``: packed tokens (B, L, 64) -> RGB images of ``height x width``."""
    cell = model.pixel_multiple
    latents = unpack(tokens, height // cell, width // cell)  # (B, 16, H/8, W/8)
    latents = latents / model.vae.config.scaling_factor + model.vae.config.shift_factor
    pixels = model.vae.decode(latents.to(model.vae.dtype)).sample  # (B, 3, H, W)
    return tensor_to_images(pixels)
