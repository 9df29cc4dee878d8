"""FLUX models behind one loader: the embedded ``tiny`` preset and a local FLUX.1-dev folder.

``load_flux("tiny")`` builds a FLUX-architecture pipeline from small configs with random weights
(every module is the real diffusers / transformers class, so the code path is the real one),
caches it on disk once and loads it from there afterwards, with no network.
``load_flux("/path/to/FLUX.1-dev")`` loads a local folder in the diffusers layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import sfo.codec  # noqa: F401 - registers PixelCodec, so a shapes-world folder (its VAE) loads by path too
from sfo.components import FLUX_DEV_SCHEDULER, build_text_encoders, build_transformer, cache_root  # noqa: F401 (re-exported)

TINY = "tiny"
SHAPES = "shapes"  # the shapes-world model (sfo.shapes.model), pretrained by ``pipelines.pretrain``
PIPELINE_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

# FLUX.1-dev's scheduler (its scheduler_config.json): resolution-dependent shift of the sigmas.


@dataclass(frozen=True)
class TinyFluxConfig:
    """Sizes of the embedded tiny FLUX. Changing any field gives a new cache entry."""

    num_layers: int = 2  # double-stream (MM-DiT) blocks; FLUX.1-dev has 19
    num_single_layers: int = 2  # single-stream blocks; FLUX.1-dev has 38
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)  # sums to attention_head_dim, as (16, 56, 56) sums to 128
    text_dim: int = 32  # CLIP hidden size (= pooled projection dim) and T5 d_model (= joint attention dim)
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)  # 4 levels: 8x spatial compression, like FLUX's VAE
    text_max_length: int = 64  # T5 tokens (one per character here) kept per prompt; FLUX.1-dev uses 512
    seed: int = 0

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True) + "|diffusers-layout-v1"
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class FluxModel:
    """A loaded FLUX pipeline plus the facts the rest of ``sfo`` needs about it.

    ``pipe`` is a stock ``diffusers.FluxPipeline``: its modules are what LoRA, DeepSpeed and
    checkpoints see, and ``pipe.load_lora_weights`` reads the adapters ``sfo.adapters`` saves.
    """

    pipe: FluxPipeline
    source: str
    text_max_length: int
    dtype: torch.dtype
    device: torch.device
    extras: dict = field(default_factory=dict)

    @property
    def transformer(self) -> FluxTransformer2DModel:
        return self.pipe.transformer

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipe.vae

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for FLUX)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this: VAE compression times the 2x2 token packing."""
        return self.vae_scale_factor * 2


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU (FLUX's training precision), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")




def load_flux(
    source: str | os.PathLike = TINY,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    tiny_config: TinyFluxConfig | None = None,
    text_max_length: int | None = None,
) -> FluxModel:
    """Loads the ``tiny`` preset or a local FLUX.1-dev folder (diffusers layout).

    Args:
        source: ``"tiny"``, ``"shapes"`` (the shapes-world model, once ``pipelines.pretrain`` has
            made it) or the path of a folder holding ``model_index.json`` and the seven
            component folders (transformer, vae, text_encoder[_2], tokenizer[_2], scheduler).
        device: where the modules live; defaults to CUDA when available.
        dtype: ``torch.bfloat16``/``"bf16"``, ``torch.float32``/``"fp32"``...; defaults to
            bf16 on GPU and fp32 on CPU.
        tiny_config: sizes of the tiny preset (ignored for folders).
        text_max_length: T5 tokens per prompt; defaults to 512 for FLUX.1-dev folders, to the pretrained
            length for shapes-world folders (``folder_text_length``) and to ``tiny_config.text_max_length``
            for the tiny preset.

    Returns:
        A ``FluxModel`` in eval mode with every parameter frozen.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device)
    folder = model_folder(source, tiny_config)
    if str(source) == TINY:
        max_length = text_max_length or (tiny_config or TinyFluxConfig()).text_max_length
    elif str(source) == SHAPES:
        from sfo.shapes.model import ShapesFluxConfig

        max_length = text_max_length or ShapesFluxConfig().text_max_length
    else:
        max_length = text_max_length or folder_text_length(folder)
    pipe = FluxPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    pipe.to(device)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    return FluxModel(pipe=pipe, source=str(source), text_max_length=max_length, dtype=dtype, device=device)


def folder_text_length(folder: Path) -> int:
    """T5 tokens per prompt for a folder: FLUX.1-dev's 512, or the length a shapes-world model was pretrained with
    (its ``pretrain.json`` sizes, written by ``pipelines.pretrain``), so a pretrained folder loads by path as
    ``load_flux("shapes")`` loads it."""
    record = Path(folder) / "pretrain.json"
    if record.is_file():
        return int(json.loads(record.read_text())["sizes"]["text_max_length"])
    return 512


def model_folder(source: str | os.PathLike, tiny_config: TinyFluxConfig | None = None) -> Path:
    """The diffusers folder ``load_flux`` loads ``source`` from: the tiny preset's (built once per config), the
    shapes-world model's (``sfo.shapes.model.require_pretrained``) or a checked FLUX folder."""
    if str(source) == TINY:
        return _cached_tiny_folder(tiny_config or TinyFluxConfig())
    if str(source) == SHAPES:
        from sfo.shapes.model import require_pretrained

        return Path(require_pretrained())
    return check_flux_folder(source)


ENCODER_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")  # unused on cached data


@dataclass
class TransformerOnly(FluxModel):
    """A ``FluxModel`` whose pipeline holds the transformer (and the scheduler's config) alone: what a job whose
    batches are all cached (latents and text embeddings precomputed) needs. The VAE's scale factor comes from
    its config.json, not from a loaded VAE."""

    vae_scale: int = 8

    @property
    def vae_scale_factor(self) -> int:
        return self.vae_scale


def load_transformer_only(source: str | os.PathLike, *, device: torch.device | str | None = None,
                          dtype: torch.dtype | str | None = None) -> TransformerOnly:
    """``load_flux`` without the VAE, text encoders and tokenizers (none is built): frozen, in eval mode."""
    device = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device)
    folder = model_folder(source)
    pipe = FluxPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                        **dict.fromkeys(ENCODER_COMPONENTS))  # None: not loaded
    pipe.to(device)
    pipe.transformer.eval().requires_grad_(False)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return TransformerOnly(pipe=pipe, source=str(source), text_max_length=0, dtype=dtype, device=device,  # no T5
                           vae_scale=2 ** (len(vae["block_out_channels"]) - 1))


def model_identity(source: str | os.PathLike) -> str:
    """What a cache of encoder outputs records about the model that made it.

    ``tiny:<fingerprint of the default tiny sizes>`` for the tiny preset (what ``load_flux("tiny")``
    builds), else the resolved folder path.
    """
    if str(source) == TINY:
        return f"{TINY}:{TinyFluxConfig().fingerprint()}"
    if str(source) == SHAPES:
        from sfo.shapes.model import ShapesFluxConfig

        return f"{SHAPES}:{ShapesFluxConfig().fingerprint()}"
    return str(Path(source).expanduser().resolve())


_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
    "fp32": torch.float32, "float32": torch.float32,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype: unknown value {dtype!r}; use one of {sorted(_DTYPES)}") from None


def check_flux_folder(path: str | os.PathLike) -> Path:
    """Checks that ``path`` is a FLUX folder in the diffusers layout; names what is missing."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model: folder {str(folder)!r} does not exist; pass 'tiny' for the embedded model or the path "
            "of a local FLUX.1-dev download in the diffusers layout (the folder holding model_index.json)"
        )
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"model: {str(folder)!r} has no model_index.json; point it at the top of a FLUX.1-dev folder "
            "in the diffusers layout (huggingface-cli download black-forest-labs/FLUX.1-dev --local-dir DIR)"
        )
    missing = [name for name in PIPELINE_COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"model: {str(folder)!r} lacks the component folder(s) {missing}; the download is incomplete")
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        if not any((folder / name).glob("*.safetensors")) and not any((folder / name).glob("*.bin")):
            raise FileNotFoundError(
                f"model: {str(folder / name)!r} holds no weights (*.safetensors); the download is incomplete"
            )
    return folder


# ----------------------------------------------------------------------------------------------
# The tiny preset
# ----------------------------------------------------------------------------------------------

# Byte-level "BPE" with no merges: every printable ASCII character is one token.
def build_tiny_pipeline(config: TinyFluxConfig) -> FluxPipeline:
    """Builds the tiny FLUX pipeline with random weights (seeded), entirely in memory."""
    torch.manual_seed(config.seed)
    transformer = build_transformer(config, in_channels=64, guidance_embeds=True)  # FLUX.1-dev is guidance-distilled
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(config.vae_channels),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    text = build_text_encoders(config.text_dim)  # after the transformer and VAE: the seeded draws keep their order
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae, transformer=transformer, **text
    )


WEIGHTED_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _cached_tiny_folder(config: TinyFluxConfig) -> Path:
    """Builds the tiny pipeline once per config and returns its folder (atomic for concurrent builders)."""
    folder = cache_root() / "tiny-flux" / config.fingerprint()
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        build_tiny_pipeline(config).save_pretrained(staging)
        missing = [name for name in WEIGHTED_COMPONENTS if not any((staging / name).glob("*.safetensors"))]
        if missing:  # transformers writes weights only on rank 0 once torch.distributed is initialised
            raise RuntimeError(f"building the tiny FLUX wrote no weights for {missing} (torch.distributed rank != 0?); "
                               "build it on rank 0 first (pipelines.train does), or before initialising torch.distributed")
        (staging / "tiny_config.json").write_text(json.dumps(asdict(config), indent=2))
        try:
            staging.rename(folder)
        except OSError:  # another process finished first: theirs is identical
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
