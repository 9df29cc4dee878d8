"""How the reference enters sampling: ``SamplingMode``, the sampler's mode and its parameters (no torch here,
so job configs can hold it). The modes themselves are ``sfo.sampler.Sampler``'s.

- ``standard``: the reference tokens at every step (OminiControl; the paper).
- ``decoupled``: EZIGen's decoupled, iterative generation (``../shared/papers/ezigen-zero-shot-subject-driven.txt``,
  Sec. 3.2-3.3): a layout pass on the text alone, an appearance pass with the reference, refined in rounds.
- ``dual-branch``: DCI's dual-branch integration (``ico-dci-customized-generation-reimagined.txt``): a
  concept branch (reference + prompt) and an auxiliary branch (generic prompt, no reference) blended per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


MODES = ("standard", "decoupled", "dual-branch")
DEFAULT_SWITCH = 0.7


@dataclass(frozen=True)
class SamplingMode:
    """How the reference enters sampling (``sfo.sampler.Sampler``'s modes). ``switch`` is a time t in (0, 1] (1 = pure
    noise): decoupled's layout pass and dual-branch's blending run while t > switch, so switch 1 is
    ``standard`` (decoupled: with ``max_rounds`` 1)."""

    mode: str = "standard"
    switch: float = DEFAULT_SWITCH
    min_rounds: int = 3  # decoupled: appearance passes per sample, at least ... (EZIGen: 3)
    max_rounds: int = 10  # ... and at most (EZIGen: 10)
    tolerance: float = 0.01  # decoupled: stop when the latent changes by less (mean |change|) between rounds
    mask_threshold: float = 0.5  # dual-branch: a token is the subject's at this normalised attention to the reference

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sampling.mode: unknown {self.mode!r}; use one of {list(MODES)}")
        if not (math.isfinite(self.switch) and 0 < self.switch <= 1):
            raise ValueError(f"sampling.switch: must be a time in (0, 1] (1 = pure noise), got {self.switch!r}")
        if not 1 <= self.min_rounds <= self.max_rounds:
            raise ValueError(f"sampling.min_rounds/max_rounds: need 1 <= min_rounds <= max_rounds, got "
                             f"{self.min_rounds}, {self.max_rounds}")
        for name in ("tolerance", "mask_threshold"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"sampling.{name}: must be a finite number >= 0, got {getattr(self, name)!r}")
