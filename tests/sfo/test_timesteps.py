import pytest
import torch

from sfo.timesteps import TimestepSampling, sample_timesteps


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal"])
def test_same_generator_seed_same_timesteps(scheme):
    sampling = TimestepSampling(scheme)
    a = sample_timesteps(16, sampling, torch.Generator().manual_seed(3))
    b = sample_timesteps(16, sampling, torch.Generator().manual_seed(3))
    c = sample_timesteps(16, sampling, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (16,) and bool(((a > 0) & (a < 1)).all())


def test_logit_normal_matches_its_definition():
    """logit(t) ~ N(mean, std): the sampled logits have that mean and std."""
    t = sample_timesteps(20000, TimestepSampling("logit_normal", mean=-2.0, std=0.5), torch.Generator().manual_seed(0))
    logits = torch.log(t / (1 - t))
    assert abs(logits.mean().item() + 2.0) < 0.02
    assert abs(logits.std().item() - 0.5) < 0.02


def test_logit_normal_concentrates_on_middle_timesteps_more_than_uniform():
    g = torch.Generator().manual_seed(0)
    middle = lambda t: ((t > 0.25) & (t < 0.75)).float().mean().item()
    assert middle(sample_timesteps(20000, TimestepSampling("logit_normal"), g)) > 0.6
    assert abs(middle(sample_timesteps(20000, TimestepSampling("uniform"), g)) - 0.5) < 0.02


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="timesteps.scheme"):
        TimestepSampling("cosine")


def test_non_positive_std_is_refused():
    with pytest.raises(ValueError, match="timesteps.std"):
        TimestepSampling("logit_normal", std=0.0)
