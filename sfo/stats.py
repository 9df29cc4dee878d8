"""Paired statistics for comparing two methods judged on the same prompts and sample seeds.

Every evaluation image is a (prompt, sample seed) cell; two methods evaluated on the same cells give
paired binary verdicts. The paired difference removes the prompt-to-prompt variance both methods
share, so it detects smaller effects than two independent binomial rates.

Across training seeds (each seed: its own SFT base and its own SFO, evaluated on the same cells), a
difference has two sources of noise: the finite set of evaluation cells (``sampling_se``) and the
seed-to-seed spread of training (``seed_se``). ``combine_seeds`` reports both, and a claim uses the
larger (``se``).

Cells are not independent when they share a subject: a triplet's sample seeds, and the same triplets under
every training seed. A subject on which SFO happens to do well counts once per cell, so the plain standard
errors above shrink with cells that carry no new subject. Given each cell's subject, ``paired_difference``
and ``combine_seeds`` use the clustered standard error (``cluster_se``: the spread of the subjects' own mean
differences); the evidence then grows with subjects, not images. (Found on 2026-12-05: three training seeds
on the same 256 triplets gave +0.035 at "4.2 SE"; four seeds on fresh triplets gave +0.005.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CLAIM_SE = 3.0  # a difference is claimed only at >= 3 standard errors


def cluster_se(d: Sequence[float], clusters: Sequence) -> float:
    """Standard error of mean(d) when the values come in clusters (cells sharing a subject): the sd of the
    clusters' mean values / sqrt(number of clusters). With one value per cluster: sd(d) / sqrt(n).

    Example: d = [1, 1, 0, 0], clusters = [x, x, y, y]: cluster means 1, 0, sd 0.707, se 0.5
    (unclustered: sd 0.577, se 0.289).
    """
    values = np.asarray(d, dtype=np.float64)
    if len(clusters) != len(values):
        raise ValueError(f"clusters: {len(clusters)} labels for {len(values)} values; one per value")
    groups: dict = {}
    for value, cluster in zip(values, clusters):
        groups.setdefault(cluster, []).append(value)
    means = np.array([np.mean(g) for g in groups.values()])
    if len(means) < 2:
        raise ValueError(f"clusters: {len(means)} distinct cluster(s); a standard error needs at least 2")
    return float(means.std(ddof=1) / math.sqrt(len(means)))


def paired_difference(a: Sequence[bool | float], b: Sequence[bool | float],
                      clusters: Sequence | None = None) -> dict[str, float]:
    """Mean of a - b over paired cells, its standard error, and McNemar's exact test.

    Args:
        a, b: (n,) verdicts (0/1) of two methods on the same n cells, in the same order.
        clusters: (n,) each cell's subject (e.g. its triplet); the standard error is then ``cluster_se``.
    Returns:
        ``diff`` mean(a - b); ``se`` sd(a - b) / sqrt(n), or clustered; ``z`` diff / se (0 when se is 0);
        ``a_only`` / ``b_only`` the discordant counts; ``p_mcnemar`` the two-sided exact binomial
        p-value of the discordant counts; ``n``.

    Example: a = [1, 1, 0, 1], b = [0, 1, 0, 0]: d = [1, 0, 0, 1], diff 0.5, sd 0.577, se 0.289.
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError(f"a/b: need two equal-length 1-D sequences of at least 2 cells, got {x.shape} and {y.shape}")
    d = x - y
    diff = float(d.mean())
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if clusters is None else cluster_se(d, clusters)
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


def combine_seeds(per_seed: Sequence[dict[str, float]], diffs: Sequence[Sequence[float]] | None = None,
                  clusters: Sequence | None = None) -> dict[str, float]:
    """Mean over training seeds of per-seed ``paired_difference`` results.

    Args:
        diffs, clusters: optional, (S, n) every seed's per-cell a - b on the same n cells and (n,) each
            cell's subject: the subjects every seed shares then count once (``cell_se``).
    Returns:
        ``diff`` the mean of the seeds' diffs; ``sampling_se`` sqrt(sum se_s^2) / S (evaluation
        noise, seeds taken as independent evaluations); ``seed_se`` sd(diff_s) / sqrt(S) (training noise;
        0 for one seed); ``cell_se`` ``cluster_se`` of the per-cell diffs averaged over seeds (0 without
        ``diffs``); ``se`` the larger of sampling_se and sqrt(cell_se^2 + seed_se^2); ``z`` diff / se;
        ``seeds`` S; ``diffs`` the per-seed diffs.
    """
    if not per_seed:
        raise ValueError("per_seed: need at least one seed's paired_difference")
    seed_diffs = np.array([s["diff"] for s in per_seed])
    count = len(seed_diffs)
    sampling_se = math.sqrt(sum(s["se"] ** 2 for s in per_seed)) / count
    seed_se = float(seed_diffs.std(ddof=1) / math.sqrt(count)) if count > 1 else 0.0
    cell = 0.0
    if diffs is not None:
        per_cell = np.asarray(diffs, dtype=np.float64)
        if per_cell.ndim != 2 or per_cell.shape[0] != count:
            raise ValueError(f"diffs: need one row of per-cell differences per seed ({count}), got shape {per_cell.shape}")
        cell = cluster_se(per_cell.mean(axis=0), clusters if clusters is not None else range(per_cell.shape[1]))
    se = max(sampling_se, math.hypot(cell, seed_se))
    mean = float(seed_diffs.mean())
    return {"diff": mean, "sampling_se": sampling_se, "seed_se": seed_se, "cell_se": cell, "se": se,
            "z": mean / se if se > 0 else 0.0, "seeds": count, "diffs": [float(v) for v in seed_diffs]}


def claim(result: dict[str, float], *, lower_is_better: bool = False) -> str:
    """``"better"`` / ``"worse"`` at >= ``CLAIM_SE`` standard errors, else ``"no difference shown"``."""
    z = -result["z"] if lower_is_better else result["z"]
    if z >= CLAIM_SE:
        return "better"
    if z <= -CLAIM_SE:
        return "worse"
    return "no difference shown"
