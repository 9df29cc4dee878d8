import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from sfo import adapters as A
from sfo.objectives import encode_batch, noised, sfo_objective, sft_objective
from sfo.timesteps import TimestepSampling, sample_timesteps


def _img(seed, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def sfo_model(fresh_flux):
    A.add_lora(fresh_flux.transformer, A.REF, A.REF_RANK, init="gaussian")
    A.add_lora(fresh_flux.transformer, A.SFO, A.SFO_RANK)
    return fresh_flux


def _batch(model, negatives=True):
    return encode_batch(model, [_img(0), _img(1)], ["a cat", "a dog"], [_img(2), _img(3)],
                        [_img(4), _img(5)] if negatives else None)


def _noise_t(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sample_timesteps(len(batch), TimestepSampling(), g), torch.randn(batch.target.shape, generator=g)


def test_noised_interpolates_between_data_and_noise():
    x0, eps = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    assert_close(noised(x0, eps, torch.tensor([0.0, 0.25])), torch.stack([torch.zeros(3, 4), torch.full((3, 4), 0.25)]))


def test_sfo_starts_at_log2_and_trains_only_sfo(sfo_model):
    """A fresh "sfo" LoRA is a no-op, so policy == reference: the loss is log 2 for every pair."""
    batch = _batch(sfo_model)
    t, noise = _noise_t(batch)
    loss, stats = sfo_objective(sfo_model.transformer, batch, t, noise, beta=1000.0)
    assert_close(loss, torch.full((2,), math.log(2.0)), rtol=0, atol=1e-5)
    assert_close(stats["policy_err_pos"], stats["ref_err_pos"])
    loss.mean().backward()
    grads = {k: p.grad for k, p in sfo_model.transformer.named_parameters() if p.grad is not None}
    assert grads and all(".sfo." in k for k in grads)
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_sfo_pairs_share_noise_and_timestep(sfo_model):
    """With the negative equal to the positive, both halves of the 2N batch are identical."""
    batch = _batch(sfo_model)
    batch.negative = batch.target.clone()
    t, noise = _noise_t(batch)
    _, stats = sfo_objective(sfo_model.transformer, batch, t, noise, beta=1000.0)
    assert_close(stats["ref_err_pos"], stats["ref_err_neg"])


def test_sfo_step_lowers_the_loss(sfo_model):
    tr = sfo_model.transformer
    batch = _batch(sfo_model)
    t, noise = _noise_t(batch)
    optimizer = torch.optim.SGD(A.trainable_parameters(tr), lr=0.05)
    losses = []
    for _ in range(3):
        loss, _ = sfo_objective(tr, batch, t, noise, beta=1000.0)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
        losses.append(loss.mean().item())
    assert losses[-1] < losses[0]


def test_sfo_needs_negatives(sfo_model):
    batch = _batch(sfo_model, negatives=False)
    with pytest.raises(ValueError, match="batch.negative"):
        sfo_objective(sfo_model.transformer, batch, *_noise_t(batch), beta=1000.0)


def test_sft_is_the_flow_matching_error(sfo_model):
    batch = _batch(sfo_model, negatives=False)
    t, noise = _noise_t(batch)
    loss, stats = sft_objective(sfo_model.transformer, batch, t, noise, adapters=[A.REF])
    assert loss.shape == (2,) and bool((loss > 0).all())
    assert_close(stats["flow_matching_error"], loss.detach())


def test_stored_reference_errors_give_the_same_loss_and_gradients(sfo_model):
    """Eq. 3 with the reference errors computed beforehand (as the cdns stage stores them) equals Eq. 3
    computing them in the step: loss and every gradient."""
    from sfo.objectives import reference_errors

    transformer = sfo_model.transformer
    with torch.no_grad():  # move "sfo" off zero so policy and reference differ
        for name, p in transformer.named_parameters():
            if ".sfo." in name and "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    batch = _batch(sfo_model)
    t, noise = _noise_t(batch, seed=3)

    def run(**extra):
        transformer.zero_grad()
        loss, stats = sfo_objective(transformer, batch, t, noise, beta=1000.0, **extra)
        loss.mean().backward()
        return loss.detach(), stats, {k: p.grad.clone() for k, p in transformer.named_parameters() if p.grad is not None}

    in_step, stats, grads = run()
    stored = reference_errors(transformer, batch, t, noise)
    assert_close(stored[0], stats["ref_err_pos"]) and assert_close(stored[1], stats["ref_err_neg"])
    given, _, given_grads = run(ref_errors=stored)
    assert_close(given, in_step)
    assert grads.keys() == given_grads.keys() and len(grads) > 0
    for key in grads:
        assert_close(given_grads[key], grads[key])
