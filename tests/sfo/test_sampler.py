import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from sfo.sampler import SamplerConfig, flux_sigmas, generate, sample_latents

CFG = SamplerConfig(steps=4, height=64, width=64)


def _reference(seed=0, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_defaults_are_the_papers():
    assert SamplerConfig().steps == 28 and SamplerConfig().guidance == 3.5


def test_matches_diffusers_flux_pipeline_without_reference(tiny_flux):
    """Text-to-image with our sampler = FluxPipeline with one generator per sample (to PNG rounding)."""
    prompts, seeds = ["a red car", "a dog"], [1, 2]
    ours = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in generate(tiny_flux, prompts, seeds, CFG)])
    theirs = tiny_flux.pipe(
        prompt=prompts, height=64, width=64, num_inference_steps=4, guidance_scale=3.5,
        max_sequence_length=tiny_flux.text_max_length, output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ).images
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6


def test_same_seed_same_image_batched_or_not(tiny_flux):
    refs = [_reference(0), _reference(1), _reference(2)]
    prompts = ["a cat", "a dog", "a car"]
    batched = sample_latents(tiny_flux, prompts, [5, 6, 7], CFG, refs)
    alone = sample_latents(tiny_flux, prompts[1:2], [6], CFG, refs[1:2])
    assert_close(batched[1:2], alone, rtol=1e-5, atol=1e-5)
    other_seed = sample_latents(tiny_flux, prompts[1:2], [8], CFG, refs[1:2])
    assert (other_seed - alone).abs().max() > 1e-2


def test_cached_condition_equals_uncached_joint_sequence(tiny_flux):
    refs = [_reference(3), _reference(4)]
    cached = sample_latents(tiny_flux, ["a cat", "a dog"], [1, 2], CFG, refs)
    joint = sample_latents(tiny_flux, ["a cat", "a dog"], [1, 2], SamplerConfig(steps=4, height=64, width=64,
                                                                                   cache_condition=False), refs)
    assert_close(cached, joint, rtol=1e-4, atol=1e-4)
    plain = sample_latents(tiny_flux, ["a cat", "a dog"], [1, 2], CFG)
    assert (cached - plain).abs().max() > 1e-3


def test_reference_may_differ_in_size_from_target(tiny_flux):
    images = generate(tiny_flux, ["a cat"], [0], SamplerConfig(steps=2, height=32, width=64), [_reference(0, 48)])
    assert images[0].size == (64, 32)


def test_progress_is_reported_every_step(tiny_flux):
    seen = []
    sample_latents(tiny_flux, ["a"], [0], CFG, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_flux_dev_schedule_is_shifted(tiny_flux):
    sigmas = flux_sigmas(tiny_flux, 28, 1024)  # 512x512 = 1024 tokens
    assert sigmas.shape == (29,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert bool((sigmas[:-1] > sigmas[1:]).all())
    linear = torch.linspace(1.0, 1 / 28, 28)
    assert bool((sigmas[1:-1] > linear[1:]).all())  # shifted towards high noise, as FLUX.1-dev


def test_bad_requests_name_the_field(tiny_flux):
    with pytest.raises(ValueError, match="seeds"):
        sample_latents(tiny_flux, ["a", "b"], [0], CFG)
    with pytest.raises(ValueError, match="references"):
        sample_latents(tiny_flux, ["a"], [0], CFG, [_reference(0), _reference(1)])
    with pytest.raises(ValueError, match="multiples of 16"):
        sample_latents(tiny_flux, ["a"], [0], SamplerConfig(steps=1, height=40, width=64))
    with pytest.raises(ValueError, match="sampler.steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match=r"images\[0\]: mode"):
        sample_latents(tiny_flux, ["a"], [0], CFG, [_reference(0).convert("L")])


def test_image_guided_hand_worked():
    """v_c = 2, v_u = 1, scale 3: 1 + 3 * (2 - 1) = 4; scale 1 gives v_c, scale 0 gives v_u."""
    c, u = torch.full((1, 2, 64), 2.0), torch.full((1, 2, 64), 1.0)
    from sfo.sampler import image_guided

    assert_close(image_guided(c, u, 3.0), torch.full((1, 2, 64), 4.0))
    assert_close(image_guided(c, u, 1.0), c)
    assert_close(image_guided(c, u, 0.0), u)


def test_image_guidance_one_is_off_zero_ignores_the_reference(tiny_flux):
    refs = [_reference(5)]
    plain = sample_latents(tiny_flux, ["a cat"], [3], CFG, refs)
    assert torch.equal(sample_latents(tiny_flux, ["a cat"], [3], SamplerConfig(steps=4, height=64, width=64,
                                                                            image_guidance=1.0), refs), plain)
    zero = sample_latents(tiny_flux, ["a cat"], [3], SamplerConfig(steps=4, height=64, width=64, image_guidance=0.0), refs)
    assert_close(zero, sample_latents(tiny_flux, ["a cat"], [3], CFG, None))  # the reference no longer counts
    strong = sample_latents(tiny_flux, ["a cat"], [3], SamplerConfig(steps=4, height=64, width=64, image_guidance=2.0), refs)
    assert (strong - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="sampler.image_guidance"):
        SamplerConfig(image_guidance=float("nan"))
