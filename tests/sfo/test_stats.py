import math

import pytest

from sfo.stats import claim, combine_seeds, mcnemar_exact, paired_difference


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


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="a/b"):
        paired_difference([1, 0], [1])
    with pytest.raises(ValueError, match="per_seed"):
        combine_seeds([])
