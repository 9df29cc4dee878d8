"""An exact pixel codec in the place of FLUX's VAE, for the shapes world.

``PixelCodec`` folds each ``factor x factor`` block of pixels into channels (space-to-depth), so
decoding is the exact inverse of encoding: the metrics of the shapes world then judge the
transformer, never a lossy autoencoder. It answers the parts of ``AutoencoderKL``'s interface the
pipeline uses (``encode(x).latent_dist.mode()``, ``decode(z).sample``, ``config.scaling_factor``,
``config.shift_factor``, ``config.block_out_channels`` for the scale factor,
``config.latent_channels``) and saves and loads like any diffusers model.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch.nn import functional as F


class PixelCodec(ModelMixin, ConfigMixin):
    """Space-to-depth "VAE": (B, 3, H, W) pixels in [-1, 1] <-> (B, 3 f^2, H/f, W/f) latents."""

    @register_to_config
    def __init__(self, factor: int = 4, scaling_factor: float = 1.0, shift_factor: float = 0.0,
                 latent_channels: int | None = None, block_out_channels: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"codec.factor: must be a power of two, got {factor}")
        expected = 3 * factor * factor
        if latent_channels not in (None, expected):
            raise ValueError(f"codec.latent_channels: a factor-{factor} pixel codec has {expected} channels, "
                             f"got {latent_channels}")
        # FluxPipeline reads the scale factor as 2 ** (len(block_out_channels) - 1) and the latent
        # channel count from the config, as for an AutoencoderKL.
        self.register_to_config(latent_channels=expected, block_out_channels=[expected] * (int(math.log2(factor)) + 1))
        # One parameter-free buffer gives the model a dtype and device, and a weights file.
        self.register_buffer("unit", torch.ones(()))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        z = F.pixel_unshuffle(x, self.config.factor)
        # deterministic: mode() and sample() are both z exactly
        posterior = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **_):
        x = F.pixel_shuffle(z, self.config.factor)
        return DecoderOutput(sample=x) if return_dict else (x,)
