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


def test_text_guidance_one_is_off_zero_samples_the_empty_prompt(tiny_flux):
    """w = 1 is the plain sampler; w = 0 is the empty prompt's velocity alone, with the reference encoded under
    the empty prompt (so it equals sampling the empty prompt); w = 3 extrapolates away from it."""
    refs = [_reference(5), _reference(6)]
    cfg = lambda w: SamplerConfig(steps=4, height=64, width=64, text_guidance=w)  # noqa: E731
    for references in (None, refs):
        plain = sample_latents(tiny_flux, ["a cat", "a dog"], [3, 4], CFG, references)
        assert torch.equal(sample_latents(tiny_flux, ["a cat", "a dog"], [3, 4], cfg(1.0), references), plain)
        empty = sample_latents(tiny_flux, ["", ""], [3, 4], CFG, references)
        assert_close(sample_latents(tiny_flux, ["a cat", "a dog"], [3, 4], cfg(0.0), references), empty)
        guided = sample_latents(tiny_flux, ["a cat", "a dog"], [3, 4], cfg(3.0), references)
        assert (guided - plain).abs().max() > 1e-3
        # per-sample seeding holds with the extra pass: a sample alone equals itself in the batch
        alone = sample_latents(tiny_flux, ["a dog"], [4], cfg(3.0), None if references is None else references[1:])
        assert_close(alone, guided[1:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sampler.text_guidance"):
        SamplerConfig(text_guidance=-1.0)


def test_text_guided_hand_worked():
    from sfo.sampler import text_guided

    c, u = torch.full((1, 2, 64), 2.0), torch.full((1, 2, 64), 1.0)
    assert_close(text_guided(c, u, 4.0), torch.full((1, 2, 64), 5.0))


# Inference modes (issue 14): decoupled (EZIGen) and dual-branch (DCI).

def _mode(**fields) -> SamplerConfig:
    from sfo.sampler import SamplingMode

    return SamplerConfig(steps=4, height=64, width=64, sampling=SamplingMode(**fields))


def test_each_mode_equals_standard_where_it_should(tiny_flux):
    """decoupled with switch 1 and one round; dual-branch with switch 1 (never blends) or mask threshold 0
    (every token is the subject's, so the concept branch everywhere)."""
    refs, prompts, seeds = [_reference(6), _reference(7)], ["a cat", "a dog"], [3, 4]
    standard = sample_latents(tiny_flux, prompts, seeds, CFG, refs)
    for config in (_mode(mode="decoupled", switch=1.0, min_rounds=1, max_rounds=1),
                   _mode(mode="dual-branch", switch=1.0), _mode(mode="dual-branch", switch=0.9, mask_threshold=0.0)):
        assert torch.equal(sample_latents(tiny_flux, prompts, seeds, config, refs), standard), config.sampling
    for config in (_mode(mode="decoupled", switch=0.6, min_rounds=1, max_rounds=1),
                   _mode(mode="dual-branch", switch=0.5, mask_threshold=0.5)):
        assert (sample_latents(tiny_flux, prompts, seeds, config, refs) - standard).abs().max() > 1e-3, config.sampling


def test_decoupled_layout_ignores_the_reference_and_the_appearance_pass_reads_it(tiny_flux):
    from sfo.sampler import Sampler

    config = _mode(mode="decoupled", switch=0.6, min_rounds=1, max_rounds=1)
    a = Sampler(tiny_flux, ["a cat"], [5], config, [_reference(8)])
    b = Sampler(tiny_flux, ["a cat"], [5], config, [_reference(9)])
    assert 0 < a.switch_step() < 4 and all(float(s) > 0.6 for s in a.sigmas[:a.switch_step()])
    assert torch.equal(a.layout(), b.layout())
    assert (a.run() - b.run()).abs().max() > 1e-3


def test_decoupled_rounds_stop_per_sample_and_are_deterministic(tiny_flux):
    """tolerance 0: never converged, so max_rounds; a huge tolerance stops at min_rounds. A sample's
    rounds and result do not depend on its batch."""
    from sfo.sampler import Sampler, round_seed

    refs, prompts = [_reference(10), _reference(11)], ["a cat", "a dog"]
    never = Sampler(tiny_flux, prompts, [1, 2], _mode(mode="decoupled", switch=0.6, min_rounds=2, max_rounds=3,
                                                      tolerance=0.0), refs)
    result = never.run()
    assert never.rounds == [3, 3]
    at_once = Sampler(tiny_flux, prompts, [1, 2], _mode(mode="decoupled", switch=0.6, min_rounds=2, max_rounds=3,
                                                        tolerance=1e9), refs)
    at_once.run()
    assert at_once.rounds == [2, 2]
    alone = Sampler(tiny_flux, prompts[1:], [2], never.config, refs[1:])
    assert_close(alone.run(), result[1:], rtol=1e-5, atol=1e-5)
    one_round = sample_latents(tiny_flux, prompts, [1, 2], _mode(mode="decoupled", switch=0.6, min_rounds=1,
                                                                  max_rounds=1), refs)
    assert (one_round - result).abs().max() > 1e-3  # the extra rounds changed the image
    assert round_seed(1, 2) != round_seed(1, 3) != round_seed(2, 2) and round_seed(1, 2) == round_seed(1, 2)
    seen = []
    sample_latents(tiny_flux, prompts, [1, 2], never.config, refs, progress=lambda i, n: seen.append((i, n)))
    split = never.switch_step()
    assert seen[-1] == (split + 3 * (4 - split),) * 2  # layout + three appearance passes


def test_decoupled_rounds_after_a_sample_stops_run_only_the_others(tiny_flux):
    """A tolerance between two samples' round-2 changes stops one at round 2: round 3 then runs the
    other alone (one row through the transformer), and both results equal each sample sampled alone."""
    from sfo.sampler import Sampler

    refs, prompts, seeds = [_reference(13), _reference(14)], ["a cat", "a dog"], [3, 4]
    probe = Sampler(tiny_flux, prompts, seeds, _mode(mode="decoupled", switch=0.6, min_rounds=2, max_rounds=3,
                                                     tolerance=0.0), refs)
    probe.run()
    assert [len(c) for c in probe.changes] == [2, 2]
    first = [c[0] for c in probe.changes]
    assert abs(first[0] - first[1]) > 1e-4
    stops = int(first[1] < first[0])  # the sample with the smaller change stops at round 2
    config = _mode(mode="decoupled", switch=0.6, min_rounds=2, max_rounds=3, tolerance=sum(first) / 2)
    rows_seen = []
    hook = tiny_flux.transformer.x_embedder.register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[0]))
    try:
        mixed = Sampler(tiny_flux, prompts, seeds, config, refs)
        result = mixed.run()
    finally:
        hook.remove()
    assert mixed.rounds[stops] == 2 and mixed.rounds[1 - stops] == 3
    split = mixed.switch_step()
    # the target's embedding once per step (the condition's cache adds one call of its own, first)
    assert rows_seen[1:] == [2] * (split + 2 * (4 - split)) + [1] * (4 - split)
    for i in (0, 1):
        alone = Sampler(tiny_flux, prompts[i:i + 1], seeds[i:i + 1], config, refs[i:i + 1])
        assert_close(alone.run(), result[i:i + 1], rtol=1e-5, atol=1e-5)
        assert alone.rounds == [mixed.rounds[i]]


def test_dual_branch_blends_the_branches_by_the_reference_attention(tiny_flux):
    """With threshold above 1 no token is the subject's: before the switch the auxiliary branch (no
    reference) drives every token, so the latent at the switch equals plain text-to-image's."""
    from sfo.sampler import Sampler
    from sfo.transformer import reference_attention

    refs = [_reference(12)]
    blended = Sampler(tiny_flux, ["a cat"], [7], _mode(mode="dual-branch", switch=0.01, mask_threshold=2.0), refs)
    plain = Sampler(tiny_flux, ["a cat"], [7], CFG)
    assert torch.equal(blended.run(), plain.run())  # switch below the last step: the auxiliary branch throughout
    with reference_attention() as probes:
        Sampler(tiny_flux, ["a cat"], [7], CFG, refs).velocity(plain.noise([7]), 0)
    blocks = len(tiny_flux.transformer.transformer_blocks) + len(tiny_flux.transformer.single_transformer_blocks)
    assert len(probes) == blocks and probes[0].shape == (1, 16)  # (B, L): 64 px = 4 x 4 tokens
    assert all(((p > 0) & (p < 1)).all() for p in probes)  # a share of each token's attention
    with reference_attention() as none:
        plain.velocity(plain.noise([7]), 0)
    assert none == []  # no reference, nothing recorded


def test_concept_mask_and_blend_hand_worked():
    from sfo.sampler import blend_velocities, concept_mask

    mass = torch.tensor([[0.0, 0.25, 0.5], [0.5, 0.5, 1.0]])  # normalised: [0, .5, 1], [0, 0, 1]
    assert concept_mask(mass, 0.5).tolist() == [[False, True, True], [False, False, True]]
    assert concept_mask(mass, 0.0).all() and not concept_mask(mass, 1.5).any()
    concept, auxiliary = torch.full((2, 3, 64), 1.0), torch.full((2, 3, 64), -1.0)
    out = blend_velocities(concept, auxiliary, concept_mask(mass, 0.5))
    assert out[:, :, 0].tolist() == [[-1.0, 1.0, 1.0], [-1.0, -1.0, 1.0]]


def test_bad_modes_name_the_field(tiny_flux):
    from sfo.sampler import SamplingMode

    for fields, field in (({"mode": "fancy"}, "sampling.mode"), ({"switch": 0.0}, "sampling.switch"),
                          ({"switch": 1.5}, "sampling.switch"), ({"min_rounds": 4, "max_rounds": 3}, "min_rounds"),
                          ({"tolerance": float("nan")}, "sampling.tolerance"), ({"mask_threshold": -1}, "mask_threshold")):
        with pytest.raises(ValueError, match=field):
            SamplingMode(**fields)
    with pytest.raises(ValueError, match="needs reference images"):
        sample_latents(tiny_flux, ["a"], [0], _mode(mode="decoupled"))
    with pytest.raises(ValueError, match="auxiliary_prompts"):
        sample_latents(tiny_flux, ["a"], [0], _mode(mode="dual-branch"), [_reference(0)], auxiliary_prompts=["x", "y"])
