"""Training timestep samplers (SFO paper Sec. 3.2 and Table C). t in (0, 1), 1 = pure noise."""

from __future__ import annotations

import hashlib
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


def draw_seed(seed: int, sample_id: str, index: int) -> int:
    """The generator seed of a row's stored draw ``index`` (the cdns stage's ``score.draws``), from the
    stage's seed and the row's sample id: independent of batches and workers."""
    digest = hashlib.sha256(f"score/{seed}/{sample_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw(seed: int, sampling: TimestepSampling, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1,) timestep and ``shape`` noise from one generator seeded ``seed``, t first (as training draws them):
    the cdns stage stores the seed and the sfo job regenerates the same pair from it."""
    generator = torch.Generator().manual_seed(int(seed))
    return sample_timesteps(1, sampling, generator), torch.randn(shape, generator=generator)
