"""Training timestep samplers (SFO paper Sec. 3.2 and Table C). t in (0, 1), 1 = pure noise."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCHEMES = ("uniform", "logit_normal")


@dataclass(frozen=True)
class TimestepSampling:
    """``uniform``: t ~ U[0, 1] (Eq. 3 as written). ``logit_normal``: logit(t) ~ N(mean, std)
    (the paper's default, mean 0, std 1; Table C also runs mean -2 / 2 and std 0.5)."""

    scheme: str = "logit_normal"
    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"timesteps.scheme: unknown scheme {self.scheme!r}; use one of {list(SCHEMES)}")
        if self.scheme == "logit_normal" and not self.std > 0:
            raise ValueError(f"timesteps.std: must be > 0, got {self.std}")


def sample_timesteps(n: int, sampling: TimestepSampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws (n,) timesteps on the CPU from ``sampling`` using ``generator``."""
    if sampling.scheme == "uniform":
        return torch.rand(n, generator=generator)
    if sampling.scheme == "logit_normal":
        return torch.sigmoid(sampling.mean + sampling.std * torch.randn(n, generator=generator))
    raise ValueError(f"timesteps.scheme: unknown scheme {sampling.scheme!r}; use one of {list(SCHEMES)}")
