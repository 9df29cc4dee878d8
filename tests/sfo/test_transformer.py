import pytest
import torch
from torch.testing import assert_close

from sfo.latents import condition_ids, grid_ids
from sfo.text import encode_prompts
from sfo.transformer import Condition, encode_condition, flux_forward


@pytest.fixture(scope="module")
def batch(tiny_flux):
    g = torch.Generator().manual_seed(0)
    return dict(
        latents=torch.randn(2, 16, 64, generator=g),  # 4x4 target tokens
        img_ids=grid_ids(4, 4),
        text=encode_prompts(tiny_flux, ["a red car", "a striped cat on a sofa"]),
        timestep=torch.tensor([0.3, 0.8]),
        guidance=torch.full((2,), 3.5),
        condition=Condition(torch.randn(2, 9, 64, generator=g), condition_ids(3, 3)),  # 3x3 reference tokens
    )


def _stock(transformer, b):
    return transformer(
        hidden_states=b["latents"], encoder_hidden_states=b["text"].prompt_embeds, pooled_projections=b["text"].pooled,
        timestep=b["timestep"], img_ids=b["img_ids"], txt_ids=b["text"].txt_ids, guidance=b["guidance"],
    ).sample


@torch.no_grad()
def test_without_condition_equals_stock_forward(tiny_flux, batch):
    """Oracle: our block loop reproduces diffusers' FluxTransformer2DModel.forward exactly."""
    ours = flux_forward(tiny_flux.transformer, batch["latents"], batch["img_ids"], batch["text"], batch["timestep"],
                        batch["guidance"])
    assert_close(ours, _stock(tiny_flux.transformer, batch), rtol=0, atol=1e-6)


@torch.no_grad()
def test_cached_condition_equals_masked_joint_sequence(tiny_flux, batch):
    tr = tiny_flux.transformer
    args = (tr, batch["latents"], batch["img_ids"], batch["text"], batch["timestep"], batch["guidance"], batch["condition"])
    cached, joint = flux_forward(*args), flux_forward(*args, joint=True)
    assert_close(cached, joint, rtol=1e-5, atol=1e-5)
    plain = flux_forward(*args[:-1])
    assert (cached - plain).abs().max() > 1e-3  # the reference does change the prediction


@torch.no_grad()
def test_condition_keys_do_not_depend_on_target_or_timestep(tiny_flux, batch):
    """Condition tokens are clean (t = 0) and see only themselves: the same cache at every step."""
    tr, cond, text = tiny_flux.transformer, batch["condition"], batch["text"]
    cache = encode_condition(tr, cond, text.pooled, batch["guidance"])
    assert len(cache.kv) == len(tr.transformer_blocks) + len(tr.single_transformer_blocks)
    # Reusing one cache at two timesteps equals recomputing it at each (joint) step.
    for t in (torch.tensor([0.9, 0.9]), torch.tensor([0.1, 0.2])):
        a = flux_forward(tr, batch["latents"], batch["img_ids"], text, t, batch["guidance"], cache)
        b = flux_forward(tr, batch["latents"], batch["img_ids"], text, t, batch["guidance"], cond, joint=True)
        assert_close(a, b, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_condition_tokens_are_modulated_as_clean(tiny_flux, batch):
    """The cache equals the keys of the condition run through the stock blocks at t = 0 with no text:
    checked on the first block's keys, computed by hand from diffusers' modules."""
    from diffusers.models.embeddings import apply_rotary_emb

    tr, cond, text = tiny_flux.transformer, batch["condition"], batch["text"]
    cache = encode_condition(tr, cond, text.pooled, batch["guidance"])
    block = tr.transformer_blocks[0]
    temb0 = tr.time_text_embed(torch.zeros(2), batch["guidance"] * 1000, text.pooled)
    normed = block.norm1(tr.x_embedder(cond.tokens), emb=temb0)[0]
    k = block.attn.norm_k(block.attn.to_k(normed).unflatten(-1, (-1, block.attn.head_dim)))
    k = apply_rotary_emb(k, tr.pos_embed(cond.ids), sequence_dim=1)
    assert_close(cache.kv[0][0], k)


@torch.no_grad()
def test_cache_repeat_pairs_one_condition_with_several_targets(tiny_flux, batch):
    tr, text = tiny_flux.transformer, batch["text"]
    cache = encode_condition(tr, batch["condition"], text.pooled, batch["guidance"])
    doubled = flux_forward(tr, batch["latents"].repeat(2, 1, 1), batch["img_ids"], text.repeat(2),
                           batch["timestep"].repeat(2), batch["guidance"].repeat(2), cache.repeat(2))
    single = flux_forward(tr, batch["latents"], batch["img_ids"], text, batch["timestep"], batch["guidance"], cache)
    assert_close(doubled, torch.cat([single, single]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ConditionCache.repeat"):
        flux_forward(tr, batch["latents"].repeat(2, 1, 1), batch["img_ids"], text.repeat(2),
                     batch["timestep"].repeat(2), batch["guidance"].repeat(2), cache)


def test_guidance_is_required_by_a_guidance_distilled_model(tiny_flux, batch):
    with pytest.raises(ValueError, match="guidance"):
        flux_forward(tiny_flux.transformer, batch["latents"], batch["img_ids"], batch["text"], batch["timestep"], None)


def test_gradient_checkpointing_gives_the_same_output_and_gradients(fresh_flux, batch):
    tr = fresh_flux.transformer
    tr.x_embedder.weight.requires_grad_(True)
    args = (tr, batch["latents"], batch["img_ids"], batch["text"], batch["timestep"], batch["guidance"], batch["condition"])
    out = flux_forward(*args)
    out.square().mean().backward()
    grad = tr.x_embedder.weight.grad.clone()
    tr.x_embedder.weight.grad = None
    tr.enable_gradient_checkpointing()
    out_ckpt = flux_forward(*args)
    out_ckpt.square().mean().backward()
    assert_close(out_ckpt, out)
    assert_close(tr.x_embedder.weight.grad, grad)


def test_differentiated_gpu_attention_leaves_cudnn_out_and_sampling_keeps_it():
    """The SFO step's backward failed in cuDNN's fused attention on an H200 (torch 2.11, 2026-12-04): a pass with
    gradients on the GPU runs with cuDNN's kernel off (flash and memory-efficient on), and the flags come back."""
    from sfo.transformer import attention_backends

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with attention_backends(cuda=True, grad=True):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()
    for cuda, grad in ((True, False), (False, True)):
        with attention_backends(cuda=cuda, grad=grad):
            assert torch.backends.cuda.cudnn_sdp_enabled()


def test_compiled_blocks_give_the_eager_output_and_gradients_under_checkpointing(fresh_flux, batch):
    """compile_blocks compiles the block functions (the checkpoint call included, which would otherwise run them
    eager): same output and gradients as eager, and dynamo really ran (frames counted). Dynamo + AOT autograd
    without inductor's code generation (backend aot_eager): what can break here is tracing, in seconds."""
    from torch._dynamo.utils import counters

    from sfo.transformer import compile_blocks

    tr = fresh_flux.transformer
    tr.x_embedder.weight.requires_grad_(True)
    args = (tr, batch["latents"], batch["img_ids"], batch["text"], batch["timestep"], batch["guidance"], batch["condition"])

    def run():
        tr.x_embedder.weight.grad = None
        out = flux_forward(*args)
        out.square().mean().backward()
        return out.detach(), tr.x_embedder.weight.grad.clone()

    for checkpointing in (True,):  # the harder case; without it the same functions are compiled bare
        tr.gradient_checkpointing = checkpointing
        eager = run()
        frames = counters["frames"]["ok"]
        compile_blocks(backend="aot_eager")
        try:
            compiled = run()
        finally:
            compile_blocks(False)
        assert counters["frames"]["ok"] > frames, "no frame was compiled"
        assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
        assert_close(compiled[1], eager[1], rtol=1e-4, atol=1e-5)
