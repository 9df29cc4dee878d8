"""FLUX transformer forward with subject-condition tokens (SFO paper Sec. 3.1, OminiControl).

The reference image's latent tokens join the joint attention of every block, with two rules
that make them a *clean condition*:

1. they are modulated as at t = 0 (their own AdaLN embedding), whatever the target's t;
2. they attend only to themselves, while text and target tokens attend to everything.

Rule 2 means the condition tokens' path through the network never depends on the target or the
timestep, so their per-block keys/values can be computed once per image and reused at every
sampling step (``encode_condition`` -> ``ConditionCache``). ``joint=True`` instead runs the
literal sequence extension: one sequence [text, target, condition] with a boolean attention
mask. Both give the same output; the tests check it.

Blocks are diffusers' own ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` modules, called
submodule by submodule (the stock ``forward`` gives every image-stream token one modulation), so
LoRA layers, DeepSpeed hooks and checkpoints see ordinary modules. With no condition the result
equals the stock ``FluxTransformer2DModel.forward``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from sfo.adapters import adapter_names, adapter_scope, target_scope
from sfo.text import TextEmbeddings

# Diffusers' time embeddings take t (and guidance) in [0, 1000]; samplers and losses use t in [0, 1].
TIME_SCALE = 1000.0

# Attention kernels for passes that will be differentiated. cuDNN's fused attention backward fails on this
# joint sequence on the GPU: torch 2.11 + CUDA 13.0 on an H200 (benchmarks.gpu, 2026-12-04), every SFO step's
# backward raised "mha_graph.execute(...).is_good()" (then illegal memory accesses); with cuDNN left out the same
# step runs (flash / memory-efficient). Sampling (no grad) keeps every backend, cuDNN included.
TRAINING_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

Segment = tuple[torch.Tensor, torch.Tensor]  # (hidden (B, L, D), modulation embedding (B, D))
KV = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (B, L, heads, head_dim), after RoPE


@dataclass
class Condition:
    """Reference-image tokens for a batch.

    Attributes:
        tokens: (B, Lc, 64) packed, normalised reference latents (``sfo.latents.encode_images``).
        ids: (Lc, 3) their position ids (``sfo.latents.condition_ids``).
    """

    tokens: torch.Tensor
    ids: torch.Tensor

    def select(self, index: list[int]) -> "Condition":
        return Condition(self.tokens[index], self.ids)


@dataclass
class ConditionCache:
    """Keys/values of the condition tokens in every block, in block order (double, then single).

    Valid for one (reference, pooled prompt, guidance) triple: it does not depend on the target
    latents or the timestep.
    """

    kv: list[KV]

    def repeat(self, n: int) -> "ConditionCache":
        """The batch repeated ``n`` times along dim 0, to pair one condition with several targets."""
        return ConditionCache([(k.repeat(n, 1, 1, 1), v.repeat(n, 1, 1, 1)) for k, v in self.kv])

    def select(self, index: list[int]) -> "ConditionCache":
        """The samples at ``index`` (dim 0)."""
        return ConditionCache([(k[index], v[index]) for k, v in self.kv])


def modulation_embedding(
    transformer: FluxTransformer2DModel, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor
) -> torch.Tensor:
    """AdaLN embedding (B, D) from t in [0, 1] (B,), guidance (B,) and the pooled prompt (B, P)."""
    dtype = pooled.dtype
    t = timestep.to(dtype) * TIME_SCALE
    if transformer.config.guidance_embeds:
        if guidance is None:
            raise ValueError("guidance: this transformer embeds guidance (FLUX.1-dev); pass a guidance scale such as 3.5")
        return transformer.time_text_embed(t, guidance.to(dtype) * TIME_SCALE, pooled)
    return transformer.time_text_embed(t, pooled)


def encode_condition(
    transformer: FluxTransformer2DModel,
    condition: Condition,
    pooled: torch.Tensor,
    guidance: torch.Tensor | None,
) -> ConditionCache:
    """Runs the condition tokens alone through every block (at t = 0) and keeps their keys/values.

    Args:
        condition: reference tokens (B, Lc, 64) and ids (Lc, 3).
        pooled: (B, P) pooled prompt embedding (part of the t = 0 modulation).
        guidance: (B,) guidance scales, or None for a transformer without guidance embedding.
    """
    hidden = transformer.x_embedder(condition.tokens)  # (B, Lc, D)
    zeros = torch.zeros(hidden.shape[0], device=hidden.device)
    segments = [(hidden, modulation_embedding(transformer, zeros, guidance, pooled))]
    rope = transformer.pos_embed(condition.ids)
    kv: list[KV] = []
    for block in transformer.transformer_blocks:
        _, outs, block_kv = _run(transformer, _double_block, block, None, segments, None, rope, None, None)
        segments = [(outs[0], segments[0][1])]
        kv.append(block_kv)
    for block in transformer.single_transformer_blocks:
        _, outs, block_kv = _run(transformer, _single_block, block, None, segments, None, rope, None, None)
        segments = [(outs[0], segments[0][1])]
        kv.append(block_kv)
    return ConditionCache(kv)


def flux_forward(
    transformer: FluxTransformer2DModel,
    latents: torch.Tensor,
    img_ids: torch.Tensor,
    text: TextEmbeddings,
    timestep: torch.Tensor,
    guidance: torch.Tensor | None = None,
    condition: Condition | ConditionCache | None = None,
    *,
    joint: bool = False,
) -> torch.Tensor:
    """Predicts the flow-matching velocity of the target tokens.

    Args:
        latents: (B, L, 64) noisy packed target latents x_t.
        img_ids: (L, 3) target position ids.
        text: prompt embeddings for the batch.
        timestep: (B,) t in [0, 1] (1 = pure noise).
        guidance: (B,) guidance-embedding scales (FLUX.1-dev), None for models without one.
        condition: reference tokens, their cache, or None for plain text-to-image.
        joint: with ``Condition``, run the literal masked joint sequence instead of the cache
            (same result, more work; kept as the reference implementation).

    Returns:
        (B, L, 64) predicted velocity (epsilon - x_0).
    """
    cache = condition if isinstance(condition, ConditionCache) else None
    if isinstance(condition, Condition) and not joint:
        cache = encode_condition(transformer, condition, text.pooled, guidance)  # every active adapter
    with target_scope(transformer):  # condition-scoped adapters off for text and target tokens
        return _forward_target(transformer, latents, img_ids, text, timestep, guidance,
                               condition if joint and isinstance(condition, Condition) else None, cache)


def _forward_target(transformer, latents, img_ids, text, timestep, guidance, joint_condition, cache):
    """``flux_forward``'s block loop over [text, target] (+ ``joint_condition`` in the sequence, or ``cache``)."""
    hidden = transformer.x_embedder(latents)  # (B, L, D)
    temb = modulation_embedding(transformer, timestep, guidance, text.pooled)  # (B, D)
    txt = transformer.context_embedder(text.prompt_embeds)  # (B, Lt, D)
    segments: list[Segment] = [(hidden, temb)]
    ids = [text.txt_ids, img_ids]
    mask = None
    condition = joint_condition
    if condition is not None:
        scoped = [n for n in adapter_names(transformer) if adapter_scope(transformer, n) != "all"]
        if scoped:
            raise ValueError(f"joint: adapters {scoped} act on condition tokens only, which the joint sequence "
                             "cannot separate; use joint=False (the condition cache)")
        cond_hidden = transformer.x_embedder(condition.tokens)  # (B, Lc, D)
        zeros = torch.zeros(cond_hidden.shape[0], device=cond_hidden.device)
        segments.append((cond_hidden, modulation_embedding(transformer, zeros, guidance, text.pooled)))
        ids.append(condition.ids)
        mask = _condition_mask(txt.shape[1] + hidden.shape[1], cond_hidden.shape[1], hidden.device)
    if cache is not None and cache.kv[0][0].shape[0] != hidden.shape[0]:
        raise ValueError(
            f"condition: batch {cache.kv[0][0].shape[0]} != latents batch {hidden.shape[0]}; "
            "use ConditionCache.repeat to pair one condition with several targets"
        )
    rope = transformer.pos_embed(torch.cat(ids, dim=0))
    blocks = [(_double_block, b) for b in transformer.transformer_blocks]
    blocks += [(_single_block, b) for b in transformer.single_transformer_blocks]
    for index, (fn, block) in enumerate(blocks):
        extra_kv = cache.kv[index] if cache is not None else None
        txt, outs, _ = _run(transformer, fn, block, txt, segments, temb, rope, mask, extra_kv)
        segments = [(out, emb) for out, (_, emb) in zip(outs, segments)]
    hidden = transformer.norm_out(segments[0][0], temb)  # condition outputs are discarded
    return transformer.proj_out(hidden)


_PROBE: ContextVar[list[torch.Tensor] | None] = ContextVar("reference_attention", default=None)


@contextmanager
def reference_attention() -> Iterator[list[torch.Tensor]]:
    """Records, inside the block, what the target tokens read from the reference: for every block of a
    ``flux_forward`` with cached reference keys (``ConditionCache``), each target token's attention mass
    on the reference tokens, averaged over heads, appended as a (B, L) float32 tensor. Changes nothing
    in the forward itself (DCI's concept mask, ``sfo.sampler.concept_mask``, is built from it)."""
    probes: list[torch.Tensor] = []
    token = _PROBE.set(probes)
    try:
        yield probes
    finally:
        _PROBE.reset(token)


def reference_mass(q: torch.Tensor, k: torch.Tensor, reference_len: int) -> torch.Tensor:
    """(B, L) softmax attention mass of queries ``q`` (B, L, H, Dh) on the last ``reference_len`` of keys
    ``k`` (B, M, H, Dh), averaged over heads; one head at a time, so memory stays at one (B, L, M) map."""
    total = torch.zeros(q.shape[0], q.shape[1], dtype=torch.float32, device=q.device)
    for head in range(q.shape[2]):
        scores = torch.einsum("bld,bmd->blm", q[:, :, head].float(), k[:, :, head].float()) * q.shape[-1] ** -0.5
        total += scores.softmax(dim=-1)[..., -reference_len:].sum(dim=-1)
    return total / q.shape[2]


def _condition_mask(main_len: int, cond_len: int, device: torch.device) -> torch.Tensor:
    """(L, L) boolean mask, True = may attend, for the sequence [text + target | condition]."""
    total = main_len + cond_len
    mask = torch.ones(total, total, dtype=torch.bool, device=device)
    mask[main_len:, :main_len] = False  # condition tokens see only condition tokens
    return mask


_COMPILED: dict = {}  # (block function, checkpointed) -> its torch.compile'd version (compile_blocks)


def compile_blocks(enabled: bool = True, **options) -> None:
    """Regional ``torch.compile``: the two block functions compiled once each and reused by all of FLUX's 57
    blocks (19 double, 38 single), in every forward and backward of this process; ``enabled=False`` undoes it.

    The blocks' elementwise work (modulation, RMSNorm, RoPE, gates, GELU) is memory-bound in eager mode;
    compiled, it fuses into the matmuls' neighbours. With activation checkpointing the checkpoint call is
    compiled too: ``torch.utils.checkpoint`` disables dynamo for everything it calls, so a compiled block
    inside an eager checkpoint would run eager. ``options`` go to ``torch.compile`` (e.g. ``mode``).
    """
    if enabled and _COMPILED.get("options") == options:
        return  # compiled already: torch.compile's caches stay warm
    _COMPILED.clear()
    if enabled:
        _COMPILED["options"] = options
        for fn in (_double_block, _single_block):
            _COMPILED[fn, False] = torch.compile(fn, **options)
            _COMPILED[fn, True] = torch.compile(partial(_checkpointed, fn), **options)


def _checkpointed(fn, block, *args):
    return checkpoint(fn, block, *args, use_reentrant=False)


def _run(transformer, fn, block, *args):
    """Calls a block function, through activation checkpointing when the model has it enabled (compiled after
    ``compile_blocks``)."""
    checkpointing = bool(transformer.gradient_checkpointing and torch.is_grad_enabled())
    compiled = _COMPILED.get((fn, checkpointing))
    if compiled is not None:
        return compiled(block, *args)
    if checkpointing:
        return _checkpointed(fn, block, *args)
    return fn(block, *args)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (B, L, H * Dh) -> (B, L, H, Dh)


def attention_backends(cuda: bool, grad: bool):
    """``sdpa_kernel(TRAINING_ATTENTION)`` for a differentiated pass on the GPU, else no restriction."""
    return sdpa_kernel(TRAINING_ATTENTION) if cuda and grad else nullcontext()


def _attention(q, k, v, rope, text_len, mask, extra_kv):
    """RoPE, optional extra (cached) keys/values, attention. Returns output and the image-stream kv."""
    q = apply_rotary_emb(q, rope, sequence_dim=1)
    k = apply_rotary_emb(k, rope, sequence_dim=1)
    own_kv = (k[:, text_len:], v[:, text_len:])
    if extra_kv is not None:
        k = torch.cat([k, extra_kv[0]], dim=1)
        v = torch.cat([v, extra_kv[1]], dim=1)
        # Diagnostics only (reference_attention), read in eager mode: dynamo cannot trace ContextVar.get.
        probes = None if torch.compiler.is_compiling() else _PROBE.get()
        if probes is not None:  # inside reference_attention(): the target queries' mass on the reference keys
            probes.append(reference_mass(q[:, text_len:].detach(), k.detach(), extra_kv[0].shape[1]))
    with attention_backends(q.is_cuda, torch.is_grad_enabled()):
        out = dispatch_attention_fn(q, k, v, attn_mask=mask)  # (B, L, H, Dh)
    return out.flatten(2, 3).to(q.dtype), own_kv


def _double_block(block, txt, segments: list[Segment], txt_temb, rope, mask, extra_kv):
    """``FluxTransformerBlock.forward`` with per-segment modulation of the image stream.

    Args:
        txt: (B, Lt, D) text stream, or None (condition-only pass).
        segments: image-stream token groups with their modulation embeddings.
    Returns:
        (text out, [segment outs], image-stream (k, v)).
    """
    attn = block.attn
    mods = [block.norm1(h, emb=emb) for h, emb in segments]  # (normed, gate_msa, shift_mlp, scale_mlp, gate_mlp)
    img = torch.cat([m[0] for m in mods], dim=1)  # (B, Li, D)
    q = attn.norm_q(_heads(attn.to_q(img), attn.head_dim))
    k = attn.norm_k(_heads(attn.to_k(img), attn.head_dim))
    v = _heads(attn.to_v(img), attn.head_dim)
    text_len = 0
    if txt is not None:
        norm_txt, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(txt, emb=txt_temb)
        text_len = txt.shape[1]
        q = torch.cat([attn.norm_added_q(_heads(attn.add_q_proj(norm_txt), attn.head_dim)), q], dim=1)
        k = torch.cat([attn.norm_added_k(_heads(attn.add_k_proj(norm_txt), attn.head_dim)), k], dim=1)
        v = torch.cat([_heads(attn.add_v_proj(norm_txt), attn.head_dim), v], dim=1)
    out, own_kv = _attention(q, k, v, rope, text_len, mask, extra_kv)
    txt_attn, img_attn = out[:, :text_len], out[:, text_len:]
    img_attn = attn.to_out[1](attn.to_out[0](img_attn.contiguous()))

    outs, start = [], 0
    for (h, _), (_, gate_msa, shift_mlp, scale_mlp, gate_mlp) in zip(segments, mods):
        a = img_attn[:, start : start + h.shape[1]]
        start += h.shape[1]
        h = h + gate_msa.unsqueeze(1) * a
        normed = block.norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        outs.append(h + gate_mlp.unsqueeze(1) * block.ff(normed))

    if txt is not None:
        txt = txt + c_gate_msa.unsqueeze(1) * attn.to_add_out(txt_attn.contiguous())
        normed = block.norm2_context(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        txt = txt + c_gate_mlp.unsqueeze(1) * block.ff_context(normed)
    return txt, outs, own_kv


def _single_block(block, txt, segments: list[Segment], txt_temb, rope, mask, extra_kv):
    """``FluxSingleTransformerBlock.forward`` with per-segment modulation; text shares the target's."""
    attn = block.attn
    parts = ([(txt, txt_temb)] if txt is not None else []) + list(segments)
    mods = [block.norm(h, emb=emb) for h, emb in parts]  # (normed, gate)
    x = torch.cat([m[0] for m in mods], dim=1)  # (B, Lt + Li, D)
    mlp = block.act_mlp(block.proj_mlp(x))
    q = attn.norm_q(_heads(attn.to_q(x), attn.head_dim))
    k = attn.norm_k(_heads(attn.to_k(x), attn.head_dim))
    v = _heads(attn.to_v(x), attn.head_dim)
    text_len = txt.shape[1] if txt is not None else 0
    out, own_kv = _attention(q, k, v, rope, text_len, mask, extra_kv)
    y = block.proj_out(torch.cat([out, mlp], dim=2))  # (B, Lt + Li, D)

    outs, start = [], 0
    for (h, _), (_, gate) in zip(parts, mods):
        outs.append(h + gate.unsqueeze(1) * y[:, start : start + h.shape[1]])
        start += h.shape[1]
    if txt is not None:
        txt, outs = outs[0], outs[1:]
    return txt, outs, own_kv
