"""The memory plan (sfo.memory): exact parameter counts, hand-checked FLUX.1-dev plans, and the activation
estimate against the exact live-tensor peak of one SFO step on the CPU (tiny and shapes models)."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sfo import memory
from sfo.adapters import REF, REF_RANK, SFO, SFO_RANK, add_lora
from tests.conftest import shared_path

GB = 10**9


def _meta_transformer(config):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)


def test_the_shipped_config_matches_the_flux1_layout():
    """Every key of the shared FLUX.1 layout's transformer config, except guidance (the layout is schnell's)."""
    layout = json.loads(shared_path("data", "flux1-layout", "transformer", "config.json").read_text())
    ours = memory.flux1_dev_config()
    for key, value in layout.items():
        if not key.startswith("_") and key != "guidance_embeds":
            assert ours[key] == value, key
    assert ours["guidance_embeds"] is True and ours["axes_dims_rope"] == [16, 56, 56]


@pytest.mark.parametrize("name", ["flux1-dev", "tiny"])
def test_parameter_counts_are_exact(name, tiny_flux):
    config = memory.flux1_dev_config() if name == "flux1-dev" else dict(tiny_flux.transformer.config)
    transformer = _meta_transformer(config)
    assert memory.transformer_parameters(config) == sum(p.numel() for p in transformer.parameters())
    add_lora(transformer, SFO, SFO_RANK)
    lora = sum(p.numel() for k, p in transformer.named_parameters() if "lora_" in k)
    assert memory.lora_parameters(config, SFO_RANK) == lora
    if name == "flux1-dev":
        assert memory.transformer_parameters(config) == 11_901_408_320 and lora == 57_951_232


def test_flux1_dev_sfo_plans_hand_checked():
    """FLUX.1-dev, SFO at 512 px (L = Lc = 1024, Lt = 512, d = 3072, f = 12288, r = 16), bf16, one GPU.

    Checkpointing, batch 1: kept = 2 x [57 x ((512 + 1024) d + 2 d 1024) + 1024 (64 + 16 + d + 128)] (the pair's
    block inputs and the reference keys/values they read) + [57 x 1024 d + 1024 x 3280] (the condition pass)
    = 1,444,528,128; the largest block (single: 1536 (11d + 2f + 5r) + 2d 1024 = 96,067,584 per sequence)
    recomputed for 2 sequences plus half of that transient: 192,135,168 + 96,067,584 -> 1,732,730,880
    elements = 3.47 GB. Weights 11.90B + ref 14.5M in bf16 = 23.83 GB; total ~28 GB: fits 80 GB.
    Batch 4 without checkpointing keeps every block's internals of 8 [text, target] sequences: ~120 GB alone.
    """
    config = memory.flux1_dev_config()
    one = memory.memory_plan(config, job="sfo", image_size=512, batch_size=1, gradient_checkpointing=True)
    assert one.activations == 2 * 1_732_730_880
    assert one.weights == 2 * (11_901_408_320 + memory.lora_parameters(config, REF_RANK))
    memory.check_plan(one, 80 * GB)  # fits
    assert 25 * GB < one.total < 35 * GB
    four = memory.memory_plan(config, job="sfo", image_size=512, batch_size=4, gradient_checkpointing=False)
    assert four.activations > 110 * GB
    with pytest.raises(ValueError, match="train.gradient_checkpointing"):
        memory.check_plan(four, 80 * GB)
    four_ckpt = memory.memory_plan(config, job="sfo", image_size=512, batch_size=4, gradient_checkpointing=True)
    memory.check_plan(four_ckpt, 80 * GB)
    with pytest.raises(ValueError, match=r"train.batch_size \(now 4"):
        memory.check_plan(four_ckpt, 32 * GB)
    with pytest.raises(ValueError, match="more memory"):
        memory.check_plan(one, 24 * GB)  # the 23.8 GB base alone
    fused = memory.memory_plan(config, job="sample", image_size=512, batch_size=4, fused=True)
    with pytest.raises(ValueError, match="model.fuse_adapters=false"):
        memory.check_plan(fused, 40 * GB)
    assert "total" in memory.format_plan(one, 80 * GB) and "ZeRO-2 x 1" in memory.format_plan(one)


def test_zero_shards_the_optimiser():
    config = memory.flux1_dev_config()
    plans = [memory.memory_plan(config, job="sfo", image_size=512, batch_size=1, world_size=w) for w in (1, 8)]
    trained = memory.lora_parameters(config, SFO_RANK)
    assert plans[0].trainable == trained * (2 + 2 + 4 + 12)  # bf16 weights and grads, fp32 grad partition, master + 2 states
    assert plans[1].trainable == trained * (2 + 2) + trained * 4 // 8 + trained * 12 // 8
    with pytest.raises(ValueError, match="job"):
        memory.memory_plan(config, job="dpo", image_size=512, batch_size=1)
    with pytest.raises(ValueError, match="image_size"):
        memory.memory_plan(config, job="sfo", image_size=500, batch_size=1)


def test_live_tensor_bytes_counts_new_storages_once():
    base = torch.zeros(1000)
    with memory.LiveTensorBytes() as probe:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10]  # an alias: nothing new
        base.add_(1)  # in place on an older tensor: nothing new
        b = a * 2  # 4000 more
        del a, b, view
        c = torch.ones(500)  # 2000: the peak stays 8000
    assert probe.peak == 8000 and probe.live == 2000
    del c


def _measured_step(transformer, config, n: int, side: int, text_len: int, checkpointing: bool, backend) -> int:
    from sfo.latents import condition_ids, grid_ids
    from sfo.objectives import TrainBatch, sfo_objective
    from sfo.text import TextEmbeddings
    from sfo.transformer import Condition

    torch.manual_seed(0)
    transformer.gradient_checkpointing = checkpointing
    text = TextEmbeddings(torch.randn(n, text_len, config["joint_attention_dim"]),
                          torch.randn(n, config["pooled_projection_dim"]), torch.zeros(text_len, 3))
    latents = lambda: torch.randn(n, side * side, config["in_channels"])  # noqa: E731
    batch = TrainBatch(latents(), text, Condition(latents(), condition_ids(side, side)), grid_ids(side, side), latents())
    t, noise = torch.rand(n), latents()
    with sdpa_kernel(backend), memory.LiveTensorBytes() as probe:
        loss, _ = sfo_objective(transformer, batch, t, noise, beta=1000.0)
        loss.mean().backward()
    transformer.zero_grad(set_to_none=True)
    return probe.peak


@pytest.mark.parametrize("model, n, side", [("tiny", 2, 16), ("shapes", 1, 16)])
def test_activation_estimate_within_25_percent_of_the_cpu_peak(model, n, side):
    """One SFO step (live reference pass, fp32) measured exactly (LiveTensorBytes) against the plan's activations
    plus the trained adapter's gradients, with math attention (the L x L matrix) and flash attention, with and
    without checkpointing."""
    from sfo.models import load_flux

    flux = load_flux(model, device="cpu")
    transformer, config = flux.transformer, dict(flux.transformer.config)
    add_lora(transformer, REF, REF_RANK, init="gaussian")
    add_lora(transformer, SFO, SFO_RANK, init="gaussian")
    for attention, backend in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION)):
        for checkpointing in (False, True):
            measured = _measured_step(transformer, config, n, side, flux.text_max_length, checkpointing, backend)
            plan = memory.memory_plan(config, job="sfo", image_size=16 * side, batch_size=n, dtype="fp32",
                                      text_tokens=flux.text_max_length, zero_stage=0, optimizer="none",
                                      attention=attention, gradient_checkpointing=checkpointing)
            estimate = plan.activations + memory.lora_parameters(config, SFO_RANK) * 4  # + gradients
            assert estimate == pytest.approx(measured, rel=0.25), (attention, checkpointing, estimate, measured)
