"""Paired statistics for comparing two methods judged on the same prompts and sample seeds.

Every evaluation image is a (prompt, sample seed) cell; two methods evaluated on the same cells give
paired binary verdicts. The paired difference removes the prompt-to-prompt variance both methods
share, so it detects smaller effects than two independent binomial rates.

Across training seeds (each seed: its own SFT base and its own SFO, evaluated on the same cells), a
difference has two sources of noise: the finite set of evaluation cells (``sampling_se``) and the
seed-to-seed spread of training (``seed_se``). ``combine_seeds`` reports both, and a claim uses the
larger (``se``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CLAIM_SE = 3.0  # a difference is claimed only at >= 3 standard errors


def paired_difference(a: Sequence[bool | float], b: Sequence[bool | float]) -> dict[str, float]:
    """Mean of a - b over paired cells, its standard error, and McNemar's exact test.

    Args:
        a, b: (n,) verdicts (0/1) of two methods on the same n cells, in the same order.
    Returns:
        ``diff`` mean(a - b); ``se`` sd(a - b) / sqrt(n); ``z`` diff / se (0 when se is 0);
        ``a_only`` / ``b_only`` the discordant counts; ``p_mcnemar`` the two-sided exact binomial
        p-value of the discordant counts; ``n``.

    Example: a = [1, 1, 0, 1], b = [0, 1, 0, 0]: d = [1, 0, 0, 1], diff 0.5, sd 0.577, se 0.289.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"a/b: need two equal-length 1-D sequences of at least 2 cells, got {x.shape} and {y.shape}")
    d = x - y
    diff, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    a_only, b_only = int(((x > y)).sum()), int(((y > x)).sum())
    return {"diff": diff, "se": se, "z": diff / se if se > 0 else 0.0, "a_only": a_only, "b_only": b_only,
            "p_mcnemar": mcnemar_exact(a_only, b_only), "n": int(len(d))}


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: P(|Binomial(a_only + b_only, 1/2) - m/2| >= observed)."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m
    return min(1.0, 2.0 * tail)


def combine_seeds(per_seed: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean over training seeds of per-seed ``paired_difference`` results.

    Returns:
        ``diff`` the mean of the seeds' diffs; ``sampling_se`` sqrt(sum se_s^2) / S (evaluation
        noise); ``seed_se`` sd(diff_s) / sqrt(S) (training noise; 0 for one seed); ``se`` the larger
        of the two; ``z`` diff / se; ``seeds`` S; ``diffs`` the per-seed diffs.
    """
    if not per_seed:
        raise ValueError("per_seed: need at least one seed's paired_difference")
    diffs = np.array([s["diff"] for s in per_seed])
    count = len(diffs)
    sampling_se = math.sqrt(sum(s["se"] ** 2 for s in per_seed)) / count
    seed_se = float(diffs.std(ddof=1) / math.sqrt(count)) if count > 1 else 0.0
    se = max(sampling_se, seed_se)
    mean = float(diffs.mean())
    return {"diff": mean, "sampling_se": sampling_se, "seed_se": seed_se, "se": se,
            "z": mean / se if se > 0 else 0.0, "seeds": count, "diffs": [float(v) for v in diffs]}


def claim(result: dict[str, float], *, lower_is_better: bool = False) -> str:
    """``"better"`` / ``"worse"`` at >= ``CLAIM_SE`` standard errors, else ``"no difference shown"``."""
    z = -result["z"] if lower_is_better else result["z"]
    if z >= CLAIM_SE:
        return "better"
    if z <= -CLAIM_SE:
        return "worse"
    return "no difference shown"
