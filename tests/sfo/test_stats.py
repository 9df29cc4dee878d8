import math

import pytest

from sfo.stats import claim, cluster_se, combine_seeds, mcnemar_exact, paired_difference


def test_paired_difference_hand_worked():
    """a = [1, 1, 0, 1], b = [0, 1, 0, 0]: d = [1, 0, 0, 1], mean 0.5, sd sqrt(1/3), se sqrt(1/3)/2;
    discordant: a only 2, b only 0; exact McNemar p = 2 * (1/2)^2 = 0.5."""
    r = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert r["diff"] == 0.5 and r["n"] == 4
    assert math.isclose(r["se"], math.sqrt(1 / 3) / 2)
    assert (r["a_only"], r["b_only"]) == (2, 0)
    assert math.isclose(r["p_mcnemar"], 0.5)


def test_mcnemar_exact_hand_worked():
    """5 vs 1 discordant: P(X <= 1) for Binomial(6, 1/2) = 7/64, two-sided 14/64."""
    assert math.isclose(mcnemar_exact(5, 1), 14 / 64)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0


def test_combine_seeds_takes_the_larger_standard_error():
    """diffs 0.1, 0.2, 0.3 with se 0.03 each: sampling se = sqrt(3 * 0.0009) / 3 = 0.01732;
    seed se = sd(0.1, 0.2, 0.3) / sqrt(3) = 0.1 / sqrt(3) = 0.0577 -> se = 0.0577, z = 3.46."""
    c = combine_seeds([{"diff": d, "se": 0.03} for d in (0.1, 0.2, 0.3)])
    assert math.isclose(c["diff"], 0.2)
    assert math.isclose(c["sampling_se"], math.sqrt(3 * 0.03**2) / 3)
    assert math.isclose(c["seed_se"], 0.1 / math.sqrt(3))
    assert c["se"] == c["seed_se"] and claim(c) == "better"
    one = combine_seeds([{"diff": -0.1, "se": 0.02}])
    assert one["seed_se"] == 0.0 and claim(one) == "worse"
    assert claim({"z": 2.9}) == "no difference shown"


def test_cells_sharing_a_subject_count_once():
    """Hand-worked: d = [1, 1, 0, 0] in clusters x, x, y, y -> cluster means 1, 0, se 0.5 (unclustered 0.289)."""
    assert math.isclose(cluster_se([1, 1, 0, 0], ["x", "x", "y", "y"]), 0.5)
    assert math.isclose(cluster_se([1, 1, 0, 0], range(4)), paired_difference([1, 1, 0, 0], [0, 0, 0, 0])["se"])
    r = paired_difference([1, 1, 0, 0], [0, 0, 0, 0], clusters=["x", "x", "y", "y"])
    assert math.isclose(r["se"], 0.5) and math.isclose(r["diff"], 0.5)


def test_seeds_sharing_their_cells_do_not_shrink_the_standard_error():
    """Three seeds with the same per-cell differences on the same 8 cells: the evidence is one seed's, so the
    combined se is that seed's (cell_se), not it / sqrt(3) as independent evaluations would give."""
    d = [1, 0, 0, 1, 1, 0, 1, 0]
    per_seed = [paired_difference(d, [0] * 8)] * 3
    plain = combine_seeds(per_seed)
    shared = combine_seeds(per_seed, diffs=[d] * 3, clusters=range(8))
    assert math.isclose(plain["se"], per_seed[0]["se"] / math.sqrt(3))
    assert math.isclose(shared["cell_se"], per_seed[0]["se"]) and shared["se"] == shared["cell_se"]
    # two cells per subject: the subjects' means (1, 0.5, 0.5, 0.5) set it
    assert math.isclose(combine_seeds(per_seed, diffs=[d] * 3, clusters=[0, 0, 1, 1, 2, 2, 3, 3])["cell_se"],
                        cluster_se(d, [0, 0, 1, 1, 2, 2, 3, 3]))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="a/b"):
        paired_difference([1, 0], [1])
    with pytest.raises(ValueError, match="per_seed"):
        combine_seeds([])
    with pytest.raises(ValueError, match="clusters"):
        cluster_se([1, 0], ["x", "x"])
    with pytest.raises(ValueError, match="diffs"):
        combine_seeds([{"diff": 0.1, "se": 0.1}] * 2, diffs=[[1, 0]])
