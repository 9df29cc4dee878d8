"""FLUX's transformer for the GPU benchmark: its config (FLUX.1-dev's by default, shrunk for CPUs), random weights
made in place on the device (no download, no fp32 copy), the FLOPs of one forward, and a device's dense bf16 peak.
``benchmarks.gpu`` times rows with them."""

from __future__ import annotations

from pathlib import Path

import torch

from sfo.memory import FLUX1_DEV_CONFIG, read_transformer_config

# Dense bf16 TFLOP/s by torch.cuda.get_device_name(): (name contains, and contains, peak); first match wins.
PEAK_BF16_TFLOPS = (
    ("H100", "PCIe", 756.0), ("H100", "NVL", 835.0), ("H100", "", 989.0), ("H200", "", 989.0),
    ("A100", "", 312.0), ("L40S", "", 362.0), ("L40", "", 181.0), ("A10G", "", 70.0), ("4090", "", 165.0),
)
SHRUNK = {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
          "joint_attention_dim": 32, "pooled_projection_dim": 16, "axes_dims_rope": [4, 6, 6]}
INIT_STD = 0.02  # random weights: small enough that 57 blocks stay finite in bf16
GUIDANCE = 3.5  # FLUX.1-dev sampling guidance (paper Sec. 4.1)
TEXT_TOKENS = 512  # T5 tokens per prompt (FLUX.1-dev)


def peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of a device from its name ("NVIDIA H100 80GB HBM3" is SXM), or None when unknown."""
    return next((peak for model, variant, peak in PEAK_BF16_TFLOPS if model in name and variant in name), None)


def flux_config(path: Path = FLUX1_DEV_CONFIG, shrink: bool = False) -> dict:
    """A transformer config.json (FLUX.1-dev's by default), without ``_`` keys; shrunk for CPUs."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config: {path} does not exist; pass a FLUX transformer's config.json "
                                f"(the repository ships FLUX.1-dev's: {FLUX1_DEV_CONFIG})")
    return read_transformer_config(path) | (SHRUNK if shrink else {})


def forward_flops(config: dict, target: int, reference: int, text: int, cached: bool) -> float:
    """One transformer forward's FLOPs for the target's velocity: 2 x matmul parameters x tokens through every
    block, plus attention 4 x (queries x keys) x inner dim per layer. With the reference cached, its tokens only
    add keys (their own pass is ``condition_flops``, once per image, not per step)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * inner
    double = 4 * inner * inner + 2 * inner * mlp  # a token's stream (image or text): q, k, v, out; MLP in and out
    single = 3 * inner * inner + inner * mlp + (inner + mlp) * inner  # q, k, v; MLP in; the fused output projection
    queries = target + text + (0 if cached else reference)
    keys = target + text + reference
    per_token = config["num_layers"] * double + config["num_single_layers"] * single  # adaLN layers: per sample, left out
    attention = (config["num_layers"] + config["num_single_layers"]) * 4 * queries * keys * inner
    return 2 * per_token * queries + attention


def condition_flops(config: dict, reference: int) -> float:
    """The reference tokens' own pass (``encode_condition``): they attend only to themselves."""
    return forward_flops(config, reference, 0, 0, cached=True)


def build_transformer(config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """FLUX's transformer made on the meta device and materialised on ``device`` in ``dtype`` (no fp32 copy on
    the CPU): weights N(0, INIT_STD), biases 0, norm weights 1."""
    from diffusers import FluxTransformer2DModel

    default = torch.get_default_dtype()
    try:  # parameters made in ``dtype`` on the meta device: no memory, no fp32 copy anywhere
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            transformer = FluxTransformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(default)
    transformer = transformer.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim == 1:  # RMSNorm weights of q/k
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD, generator=generator)
    transformer.requires_grad_(False)
    return transformer.eval()
