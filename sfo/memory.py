"""Per-GPU memory plan of a FLUX job, estimated from the transformer config before anything is loaded.

``memory_plan`` adds up, in bytes per GPU:

- **weights**: the frozen transformer (counted exactly from the config, ``transformer_parameters``) and the
  frozen adapters' LoRA weights; a sampler that folds its adapters (``fused``) holds a second copy of every
  adapted weight (``sfo.adapters.fused_adapters``).
- **trainable**: the trained adapter's weights, their gradients and the optimiser's state. Under DeepSpeed
  with bf16 the optimiser keeps an fp32 master copy (4 bytes) plus its fp32 states (AdamW 2, Prodigy 4), and
  ZeRO-2 an fp32 gradient partition: all of these divided by the world size at ZeRO >= 1 (2 for gradients).
- **activations**: what autograd keeps for backward, counted per token and per block from the code of
  ``sfo.transformer`` (``SAVED`` below), plus the transient tensors of the block being differentiated.
- **cache**: the reference's keys/values (``sfo.transformer.encode_condition``), repeated for the 2N
  positive+negative sequences of an SFO step, or kept for a sampler's whole trajectory.

Tokens (``sfo.latents``): a side of S pixels is S/16 tokens (8x VAE, 2x2 packing); target L = (S/16)^2,
reference Lc = (S/16)^2, text Lt (512 for FLUX.1-dev). An SFO step runs N reference sequences (the condition
pass, with gradient: the sfo adapter acts on it) and 2N [text, target] sequences (positive and negative)
whose attention also reads the reference's Lc keys. SFT runs N of each. The reference-error pass (live
``ref_errors``) runs without gradient before the policy pass: it adds time, not peak memory (measured).

Activation model (elements kept for backward, per token, per block; d = heads x head_dim, f = 4d the MLP
hidden, r = the trained LoRA rank). A frozen linear layer keeps nothing (its input gradient needs only the
weight); a LoRA layer keeps its input (for A's gradient; shared by q, k, v) and A's r outputs; LayerNorm and
RMSNorm keep their input; GELU keeps its input; SDPA keeps q, k, v and its output (flash / memory-efficient
attention keep O(L), only the softmax statistics besides); a modulation product (gate x, (1 + scale) x) keeps
its tensor operand when the modulation carries gradient (the trained adapter is on ``norm1.linear`` /
``norm.linear``, so it does for image tokens, not for double blocks' text tokens).

- double block, image token: LN1 in, LN1 out, modulated (LoRA in), q, k (RMSNorm in), SDPA q, k, v, out,
  to_out in, to_out out (gate operand), LN2 in, LN2 out, MLP out (gate operand): 14d; GELU in and out
  (ff.net.2 has LoRA): 2f; LoRA A outputs of q, k, v, to_out, ff.net.2: 5r.
- double block, text token (no LoRA on the text stream): LN1 in, q, k, SDPA q, k, v, out, LN2 in: 8d; GELU in: f.
- single block, any token: LN in, LN out, modulated (LoRA in), q, k, SDPA q, k, v, out, proj_out out (gate
  operand): 10d; GELU in: f; [attention out, MLP] (proj_out's LoRA in): d + f; LoRA A outputs: 5r.
- every block of the [text, target] pass: the reference's keys and values joined to the keys: 2d per
  reference token.

``attention="math"`` (PyTorch's math SDPA, which the CPU runs when told to) instead keeps the scaled q and k
and the (heads x Lq x Lk) softmax matrix, and holds two such matrices while it runs.

Gradient checkpointing (``sfo.transformer._run``) keeps only each block's inputs (text and image streams,
the reference keys/values it reads) and recomputes one block at a time in backward. The backward of a block
holds transient gradients on top (``BACKWARD_TRANSIENT``): a gradient per saved tensor of the one block
being differentiated; ``BACKWARD_TRANSIENT`` = 0.5 of that block's saved elements is the one constant set
from measurement (the CPU peaks of the tiny and shapes models, ``LiveTensorBytes``: 0.24 to 0.71 of it);
every other count above is from the code. The GPU benchmark (``benchmarks.gpu``) prints this estimate beside
the measured peak of every row.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from sfo.adapters import REF_RANK, SFO_RANK

GIB = 2**30
FLUX1_DEV_CONFIG = Path(__file__).resolve().parent / "configs" / "flux1-dev-transformer.json"
JOBS = ("sft", "sfo", "sample")
ATTENTION = ("flash", "math")
OPTIMIZERS = {"adamw": 2, "prodigy": 4, "none": 0}  # fp32 states per trained parameter
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PIXELS_PER_TOKEN = 16  # FLUX: 8x VAE and 2x2 packing
MLP_RATIO = 4  # FLUX blocks' MLP hidden = 4 x inner dim
HEADROOM = 0.10  # check_plan keeps 10% of the device for the allocator's fragmentation and the CUDA context
BACKWARD_TRANSIENT = 0.5  # a block's backward holds gradients of about half its saved tensors (CPU-measured)
INFERENCE_TRANSIENT = 12  # d per token alive inside a block without gradient (single block: input, normed,
#                           MLP hidden and GELU (2f), attention out, [out, MLP] (d + f)... ~ 4d + 2f)


def read_transformer_config(path: str | Path) -> dict:
    """A FLUX transformer's ``config.json`` as FluxTransformer2DModel's arguments (no ``_`` metadata keys)."""
    return {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}


def flux1_dev_config() -> dict:
    """FLUX.1-dev's transformer config (shipped in ``sfo/configs``)."""
    return read_transformer_config(FLUX1_DEV_CONFIG)


@dataclass(frozen=True)
class Dims:
    """What the estimate needs of a ``FluxTransformer2DModel`` config."""

    d: int
    heads: int
    double: int
    single: int
    in_channels: int
    out_channels: int
    text_dim: int
    pooled_dim: int
    guidance: bool

    @classmethod
    def of(cls, config: dict) -> "Dims":
        missing = [k for k in ("num_attention_heads", "attention_head_dim", "num_layers", "num_single_layers")
                   if k not in config]
        if missing:
            raise ValueError(f"config: {missing} missing; pass the transformer's config.json (as a dict)")
        if config.get("patch_size", 1) != 1:
            raise ValueError(f"config.patch_size: {config['patch_size']} is not FLUX's 1; the token count assumes 1")
        heads, d = config["num_attention_heads"], config["num_attention_heads"] * config["attention_head_dim"]
        in_channels = config.get("in_channels", 64)
        return cls(d, heads, config["num_layers"], config["num_single_layers"], in_channels,
                   config.get("out_channels") or in_channels, config.get("joint_attention_dim", 4096),
                   config.get("pooled_projection_dim", 768), bool(config.get("guidance_embeds", False)))

    @property
    def f(self) -> int:
        return MLP_RATIO * self.d

    @property
    def blocks(self) -> int:
        return self.double + self.single


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def transformer_parameters(config: dict) -> int:
    """Exact parameter count of ``FluxTransformer2DModel(**config)`` (diffusers' FLUX layout)."""
    m = Dims.of(config)
    d, f, head_dim = m.d, m.f, m.d // m.heads
    embed = 2 * (_linear(256, d) + _linear(d, d)) if m.guidance else _linear(256, d) + _linear(d, d)
    embed += _linear(m.pooled_dim, d) + _linear(d, d)  # pooled text embedder
    embed += _linear(m.text_dim, d) + _linear(m.in_channels, d)  # context_embedder, x_embedder
    out = _linear(d, 2 * d) + _linear(d, m.out_channels)  # norm_out (AdaLayerNormContinuous), proj_out
    stream = _linear(d, 6 * d) + 4 * _linear(d, d) + _linear(d, f) + _linear(f, d)  # adaLN, q k v out, MLP
    double = 2 * stream + 4 * head_dim  # image and text streams; RMSNorm weights of q, k, added q, added k
    single = _linear(d, 3 * d) + 3 * _linear(d, d) + _linear(d, f) + _linear(d + f, d) + 2 * head_dim
    return embed + out + m.double * double + m.single * single


def lora_parameters(config: dict, rank: int) -> int:
    """Parameters of one LoRA adapter of ``rank`` on ``sfo.adapters.OMINICONTROL_TARGETS`` (r x (in + out) each):
    x_embedder; double blocks' norm1.linear, to_q/k/v, to_out.0, ff.net.2; single blocks' norm.linear,
    proj_mlp, proj_out, to_q/k/v."""
    m = Dims.of(config)
    d, f = m.d, m.f
    double = (d + 6 * d) + 3 * (2 * d) + 2 * d + (f + d)
    single = (d + 3 * d) + (d + f) + (d + f + d) + 3 * (2 * d)
    return rank * (m.in_channels + d + m.double * double + m.single * single)


def tokens(image_size: int, pixels_per_token: int = PIXELS_PER_TOKEN) -> int:
    """Latent tokens of a square image of ``image_size`` pixels (``sfo.latents``)."""
    if image_size % pixels_per_token:
        raise ValueError(f"image_size: {image_size} is not a multiple of {pixels_per_token} pixels per token side")
    return (image_size // pixels_per_token) ** 2


def _block_saved(m: Dims, r: int, text: int, image: int, extra_keys: int, attention: str) -> dict[str, int]:
    """Elements one sequence keeps for backward in one double / single block (the module docstring's counts)."""
    d, f = m.d, m.f
    double = image * (14 * d + 2 * f + 5 * r) + text * (8 * d + f)
    single = (text + image) * (11 * d + 2 * f + 5 * r)
    keys = text + image + extra_keys
    queries = text + image
    if attention == "math":  # SDPA keeps scaled q, k and the softmax matrix instead of q, k, out
        swap = m.heads * queries * keys + d * keys - d * queries
        double, single = double + swap, single + swap
    return {"double": double + 2 * d * extra_keys, "single": single + 2 * d * extra_keys}


def _pass_activations(m: Dims, r: int, text: int, image: int, extra_keys: int, attention: str,
                      checkpointing: bool) -> tuple[int, int]:
    """(elements kept through the pass, elements of the largest one block) for one sequence."""
    per = _block_saved(m, r, text, image, extra_keys, attention)
    largest = max(per["double"] if m.double else 0, per["single"] if m.single else 0)
    edges = image * (m.in_channels + r + m.d + 2 * m.out_channels)  # x_embedder's LoRA in, final LN in, loss
    if checkpointing:  # each block's inputs (and the reference keys/values it reads)
        kept = m.blocks * ((text + image) * m.d + 2 * m.d * extra_keys)
    else:
        kept = m.double * per["double"] + m.single * per["single"]
    return kept + edges, largest


@dataclass
class MemoryPlan:
    """Per-GPU bytes by part; ``knobs`` name the settings that produced them (for ``check_plan``'s advice)."""

    weights: int
    trainable: int
    activations: int
    cache: int
    knobs: dict = field(default_factory=dict)
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.cache


def memory_plan(
    config: dict,
    *,
    job: str,
    image_size: int,
    batch_size: int,
    text_tokens: int = 512,
    ref_rank: int = REF_RANK,
    sfo_rank: int = SFO_RANK,
    zero_stage: int = 2,
    world_size: int = 1,
    gradient_checkpointing: bool = False,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    attention: str = "flash",
    kv_cache: bool = True,
    fused: bool = False,
    pixels_per_token: int = PIXELS_PER_TOKEN,
) -> MemoryPlan:
    """The per-GPU memory of one step of ``job`` (``sft``, ``sfo`` or ``sample``).

    Args:
        config: the transformer's config.json as a dict (``FluxTransformer2DModel.config``).
        image_size: target and reference side in pixels; batch_size: samples per GPU per step (N).
        text_tokens: T5 tokens per prompt (512 for FLUX.1-dev).
        ref_rank, sfo_rank: LoRA ranks of the adapters (SFT trains ref; SFO trains sfo with ref frozen).
        zero_stage, world_size: DeepSpeed ZeRO stage and data-parallel GPUs (shard the optimiser at >= 1,
            gradients at >= 2; the frozen base is whole on every GPU at every stage).
        dtype: weights' and activations' dtype (``bf16`` on GPUs, ``fp32`` on CPUs).
        optimizer: ``adamw``, ``prodigy`` or ``none`` (a forward/backward without a step, as the benchmark).
        attention: ``flash`` (CUDA's flash / memory-efficient SDPA, O(L)) or ``math`` (the L x L matrix).
        kv_cache: sampling only: the reference's keys/values cached (``encode_condition``) or the joint sequence.
        fused: sampling only: adapters folded into a copy of the adapted weights (``fused_adapters``).
        pixels_per_token: pixels per token side (16 for FLUX; the shapes world's codec: 4).
    """
    if job not in JOBS:
        raise ValueError(f"job: unknown {job!r}; use one of {list(JOBS)}")
    if attention not in ATTENTION:
        raise ValueError(f"attention: unknown {attention!r}; use one of {list(ATTENTION)}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype: unknown {dtype!r}; use one of {list(DTYPE_BYTES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown {optimizer!r}; use one of {list(OPTIMIZERS)}")
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size / world_size: must be >= 1, got {batch_size} / {world_size}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage: {zero_stage} is not one of 0, 1, 2, 3")
    m, b = Dims.of(config), DTYPE_BYTES[dtype]
    n, length, ctx = batch_size, tokens(image_size, pixels_per_token), text_tokens
    base = transformer_parameters(config)
    ref, sfo = lora_parameters(config, ref_rank), lora_parameters(config, sfo_rank)
    knobs = dict(job=job, batch_size=n, gradient_checkpointing=gradient_checkpointing, zero_stage=zero_stage,
                 world_size=world_size, fused=fused)
    if job == "sample":
        adapted = m.double * 14 * m.d * m.d + m.single * 15 * m.d * m.d  # OminiControl's targets' base weights
        weights = (base + ref + sfo + (adapted if fused else 0)) * b
        seq = ctx + length + (0 if kv_cache else length)
        keys = seq + (length if kv_cache else 0)
        activations = n * seq * (INFERENCE_TRANSIENT * m.d + m.in_channels * 4)  # + latents, velocity, noise
        if attention == "math":
            activations += 2 * n * m.heads * seq * keys
        cache = n * m.blocks * 2 * m.d * length * b if kv_cache else 0
        return MemoryPlan(weights, 0, activations * b, cache, knobs)
    trained = ref if job == "sft" else sfo
    frozen = 0 if job == "sft" else ref
    shard = world_size if zero_stage >= 1 else 1
    grads = trained * b + (trained * 4 // world_size if zero_stage >= 2 else 0)
    states = OPTIMIZERS[optimizer] * 4 + (4 if b < 4 else 0)  # fp32 states (+ fp32 master beside bf16 weights)
    optimiser = trained * states // shard if optimizer != "none" else 0
    trainable = trained * b + grads + optimiser
    r = ref_rank if job == "sft" else sfo_rank
    sequences = n if job == "sft" else 2 * n
    target, target_block = _pass_activations(m, r, ctx, length, length, attention, gradient_checkpointing)
    cond, cond_block = _pass_activations(m, r, 0, length, 0, attention, gradient_checkpointing)
    kept = sequences * target + n * cond
    block = sequences * target_block  # the [text, target] pass's largest block, all sequences
    recompute = block if gradient_checkpointing else 0
    transient = int(BACKWARD_TRANSIENT * block)
    # The reference keys/values repeated for the pair (``ConditionCache.repeat``) live through the forward;
    # checkpointing keeps them as block inputs (counted in ``kept``), without it the SDPA copies are kept.
    repeated = 0 if gradient_checkpointing or job == "sft" else sequences * m.blocks * 2 * m.d * length
    activations = (kept + recompute + max(transient, repeated)) * b
    detail = dict(kept=kept * b, recompute=recompute * b, transient=transient * b, repeated=repeated * b,
                  base=base, trained=trained)
    return MemoryPlan((base + frozen) * b, trainable, activations, 0, knobs, detail)


def check_plan(plan: MemoryPlan, device_bytes: int, headroom: float = HEADROOM) -> None:
    """Raises ``ValueError`` naming the setting to change when ``plan`` needs more than (1 - headroom) of the
    device's memory."""
    usable = int(device_bytes * (1 - headroom))
    if plan.total <= usable:
        return
    k = plan.knobs
    need = f"needs {plan.total / GIB:.1f} GiB per GPU, {usable / GIB:.1f} GiB usable of {device_bytes / GIB:.1f} GiB"
    if plan.weights > usable:
        advice = ("the frozen transformer alone does not fit: use a GPU with more memory"
                  + ("; or set model.fuse_adapters=false (the folded copy of the adapted weights)" if k["fused"] else ""))
    elif k["job"] == "sample":
        advice = ("set model.fuse_adapters=false (the folded copy of the adapted weights)" if k["fused"]
                  else f"lower cdns.batch_size (now {k['batch_size']})")
    elif plan.trainable > plan.activations and k["zero_stage"] < 2:
        advice = f"raise deepspeed.zero_stage to 2 (now {k['zero_stage']}) to shard gradients and optimiser state"
    elif not k["gradient_checkpointing"]:
        advice = "set train.gradient_checkpointing=true (keeps only each block's inputs)"
    else:
        advice = f"lower train.batch_size (now {k['batch_size']}; raise train.grad_accum to keep the batch)"
    raise ValueError(f"memory plan: {k['job']} {need}: {advice}")


def format_plan(plan: MemoryPlan, device_bytes: int | None = None) -> str:
    """A printable table of the plan in GiB (and the device's memory when given)."""
    k = plan.knobs
    rows = [("weights (frozen base + adapters)", plan.weights), ("trained LoRA + gradients + optimiser", plan.trainable),
            ("activations", plan.activations), ("reference K/V cache", plan.cache), ("total", plan.total)]
    head = (f"memory plan per GPU: {k['job']}, batch {k['batch_size']}, checkpointing "
            f"{'on' if k['gradient_checkpointing'] else 'off'}, ZeRO-{k['zero_stage']} x {k['world_size']}")
    lines = [head] + [f"  {name:<38} {value / GIB:8.2f} GiB" for name, value in rows]
    if device_bytes:
        lines.append(f"  {'device (90% usable)':<38} {device_bytes * (1 - HEADROOM) / GIB:8.2f} GiB")
    return "\n".join(lines)


class LiveTensorBytes(TorchDispatchMode):
    """Inside the block, the peak bytes of tensor storage allocated by operators and still alive: an exact
    activation peak on any device (what autograd keeps plus what is momentarily alive), without the
    allocator's caching. Storages that existed before (weights, inputs) and views of them are not counted;
    each new storage counts its ``nbytes`` once, until it is freed (``weakref.finalize``)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage in self._seen or storage.data_ptr() in inputs:  # an alias or an in-place result
                continue
            self._seen[storage] = True
            self.live += storage.nbytes()
            weakref.finalize(storage, self._free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out
