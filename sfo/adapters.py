"""The "ref" (SFT, rank 4) and "sfo" (rank 16) LoRA adapters on the FLUX transformer.

SFO paper Sec. 4.1 and App. D.1/D.2: the SFT base is FLUX.1-dev plus a rank-4 LoRA ("ref"); SFO
adds a rank-16 LoRA ("sfo") on top and trains only that. Both target OminiControl's modules.

Adapters are switched by setting each peft layer's active adapters inside a context manager
(``use_adapters``). diffusers' ``set_adapters`` is avoided on purpose: it turns ``requires_grad``
back on for every active adapter (peft issue 1374), which would silently unfreeze "ref".

Each adapter has a *scope* (``SCOPES``): ``all`` acts on every token that passes its modules;
``condition`` acts on the reference (condition) tokens only, as OminiControl's subject config
(``latent_lora: false``) does. ``sfo.transformer.flux_forward`` drops condition-scoped adapters
while it runs the text and target tokens (``target_scope``). The scope is saved beside the weights
(``SCOPE_FILE``) and restored by ``load_adapter``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # diffusers and peft are imported where used: a job's config (this module's names) stays light
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

REF = "ref"
SFO = "sfo"
REF_RANK = 4  # paper App. D.1
SFO_RANK = 16  # paper Sec. 4.1
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for
SCOPE_FILE = "sfo_adapter.json"  # {"scope": ...} beside the weights; absent = "all"
SCOPES = ("all", "condition")
_SCOPES_ATTR = "_sfo_adapter_scopes"
_FOLDED_ATTR = "_sfo_folded_adapters"  # set by fused_adapters while it lasts

# OminiControl's LoRA targets on FLUX: the image-stream projections of every block and the patch
# embedding (its train config, `target_modules`). Text-stream projections are left alone.
OMINICONTROL_TARGETS = (
    r"(.*x_embedder"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.norm1\.linear"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_k"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_q"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_v"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_out\.0"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.ff\.net\.2"
    r"|.*single_transformer_blocks\.[0-9]+\.norm\.linear"
    r"|.*single_transformer_blocks\.[0-9]+\.proj_mlp"
    r"|.*single_transformer_blocks\.[0-9]+\.proj_out"
    r"|.*single_transformer_blocks\.[0-9]+\.attn\.to_k"
    r"|.*single_transformer_blocks\.[0-9]+\.attn\.to_q"
    r"|.*single_transformer_blocks\.[0-9]+\.attn\.to_v)"
)


# transformer -> (its adapter names, its LoRA layers). LoRA layers appear and go only with adapters (peft
# injects them when an adapter is added), so the names are the key: every forward pass asks for the layers
# (``target_scope``), and walking every module cost 1.2 ms per forward with two adapters loaded, 7.5 ms (~9% of
# a world-model sampling step) with the evaluation's 35, whose modules all join the tree.
_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tuner_layers(transformer: torch.nn.Module) -> list[BaseTunerLayer]:
    names = tuple(adapter_names(transformer))
    cached = _LAYERS.get(transformer)
    if cached is None or cached[0] != names:
        from peft.tuners.tuners_utils import BaseTunerLayer

        cached = names, [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
        _LAYERS[transformer] = cached
    return cached[1]


def adapter_names(transformer: torch.nn.Module) -> list[str]:
    """Names of the adapters on the transformer, in the order they were added."""
    return list(getattr(transformer, "peft_config", {}) or {})


def _check_known(transformer: torch.nn.Module, names: list[str]) -> None:
    unknown = set(names) - set(adapter_names(transformer))
    if unknown:
        raise ValueError(f"adapters: unknown adapter(s) {sorted(unknown)}; the transformer has {adapter_names(transformer)}")


def add_lora(
    transformer: FluxTransformer2DModel,
    name: str,
    rank: int,
    *,
    alpha: float | None = None,
    target_modules: str | list[str] = OMINICONTROL_TARGETS,
    init: str | bool = True,
) -> LoraConfig:
    """Adds a LoRA adapter; all adapters stay active and only ``name``'s weights are trainable.

    Args:
        rank: LoRA rank r > 0.
        alpha: scaling numerator (scale = alpha / rank); defaults to ``rank`` (scale 1).
        init: peft's ``init_lora_weights``; the default leaves B = 0, so a new adapter starts as
            an exact no-op (the SFO policy starts equal to the reference).
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"lora.rank: must be a positive integer, got {rank!r} (the paper uses 4 for ref, 16 for sfo)")
    if name in adapter_names(transformer):
        raise ValueError(f"lora.name: the transformer already has an adapter {name!r}; pick another name")
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=init,
                        target_modules=target_modules)
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.add_adapter(config, adapter_name=name)
    _activate(transformer, adapter_names(transformer))
    set_trainable(transformer, [name])
    return config


def set_trainable(transformer: torch.nn.Module, names: list[str]) -> None:
    """Makes exactly the LoRA weights of ``names`` trainable; the base and other adapters frozen."""
    _check_known(transformer, names)
    for param_name, param in transformer.named_parameters():
        param.requires_grad_(any(f".{n}." in param_name for n in names) and "lora_" in param_name)


def trainable_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in transformer.parameters() if p.requires_grad]


def _activate(transformer: torch.nn.Module, names: list[str]) -> None:
    for layer in _tuner_layers(transformer):
        layer._active_adapter = list(names)  # not layer.set_adapter: that flips requires_grad


@contextlib.contextmanager
def use_adapters(transformer: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """Within the block only ``names`` are applied (``[]`` = the base model); ``requires_grad`` untouched."""
    _check_known(transformer, names)
    folded = set(names) & set(getattr(transformer, _FOLDED_ATTR, ()))
    if folded:
        raise ValueError(f"adapters: {sorted(folded)} already folded into the weights by fused_adapters; applying "
                         "them again would count them twice")
    layers = _tuner_layers(transformer)
    saved = [layer._active_adapter for layer in layers]
    try:
        for layer in layers:
            layer._active_adapter = list(names)
        yield
    finally:
        for layer, active in zip(layers, saved):
            layer._active_adapter = active


@contextlib.contextmanager
def fused_adapters(transformer: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """``use_adapters(names)`` for sampling: the ``all``-scoped adapters among ``names`` are folded into the
    base weights for the block (W + scale B A: one matmul per layer at every step instead of three, and
    no per-layer LoRA call), the condition-scoped ones applied as LoRA (they run once per image, in
    ``encode_condition``). The original weights are put back as they were (kept, not subtracted), so
    nothing drifts however often methods switch. Costs a copy of every adapted weight while it lasts.
    Inference only: no gradient reaches a folded adapter. Inside the block ``use_adapters`` refuses a
    folded adapter (it would count twice), and the block does not nest."""
    _check_known(transformer, names)
    if getattr(transformer, _FOLDED_ATTR, ()):
        raise ValueError(f"adapters: fused_adapters is already active ({getattr(transformer, _FOLDED_ATTR)} folded); "
                         "it does not nest")
    fold = [n for n in names if adapter_scope(transformer, n) == "all"]
    originals: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
    try:
        setattr(transformer, _FOLDED_ATTR, tuple(fold))
        with torch.no_grad():
            for layer in _tuner_layers(transformer) if fold else []:
                mine = [n for n in fold if n in getattr(layer, "lora_A", {})]
                if not mine:
                    continue
                base = layer.get_base_layer()
                weight = base.weight.detach().clone()
                for name in mine:
                    weight += layer.get_delta_weight(name).to(weight.dtype)
                originals.append((base, base.weight))
                base.weight = torch.nn.Parameter(weight, requires_grad=False)
        with use_adapters(transformer, [n for n in names if n not in fold]):
            yield
    finally:
        for base, weight in originals:
            base.weight = weight
        setattr(transformer, _FOLDED_ATTR, ())


def set_scope(transformer: torch.nn.Module, name: str, scope: str) -> None:
    """Sets which tokens adapter ``name`` acts on: ``all`` or ``condition`` (reference tokens only)."""
    if scope not in SCOPES:
        raise ValueError(f"lora.scope: unknown {scope!r}; use one of {list(SCOPES)}")
    if name not in adapter_names(transformer):
        raise ValueError(f"adapter: {name!r} is not on the transformer (it has {adapter_names(transformer)})")
    scopes = dict(getattr(transformer, _SCOPES_ATTR, {}))
    scopes[name] = scope
    setattr(transformer, _SCOPES_ATTR, scopes)


def adapter_scope(transformer: torch.nn.Module, name: str) -> str:
    """The scope of adapter ``name`` (``all`` unless ``set_scope`` said otherwise)."""
    return getattr(transformer, _SCOPES_ATTR, {}).get(name, "all")


def active_adapters(transformer: torch.nn.Module) -> list[str]:
    """The adapters applied right now (by the first LoRA layer; ``use_adapters`` sets all alike)."""
    layers = _tuner_layers(transformer)
    if not layers:
        return []
    active = layers[0].active_adapters
    return [active] if isinstance(active, str) else list(active)


def target_scope(transformer: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Within the block, condition-scoped adapters are off: what the text and target tokens see."""
    scopes = getattr(transformer, _SCOPES_ATTR, {})
    if not any(scope == "condition" for scope in scopes.values()):
        return contextlib.nullcontext()
    return use_adapters(transformer, [n for n in active_adapters(transformer) if scopes.get(n, "all") == "all"])


def ref_only(transformer: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The SFT base (p_ref in Eq. 3): base + "ref"."""
    return use_adapters(transformer, [REF])


def ref_and_sfo(transformer: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The SFO policy (p_theta in Eq. 3): base + "ref" + "sfo"."""
    return use_adapters(transformer, [REF, SFO])


def adapter_state_dict(transformer: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The LoRA weights of one adapter, keys in peft's format (no adapter name, no prefix)."""
    if name not in adapter_names(transformer):
        raise ValueError(f"adapter: {name!r} is not on the transformer (it has {adapter_names(transformer)})")
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=name)


def save_adapter(transformer: torch.nn.Module, name: str, folder: str | Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Saves one adapter as safetensors in the diffusers LoRA format (``load_lora_weights`` reads it).

    Args:
        state_dict: the adapter's weights when they were gathered elsewhere (e.g. from ZeRO-3
            shards); defaults to the transformer's own.
    Returns:
        The path of the weights file.
    """
    from diffusers import FluxPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = state_dict if state_dict is not None else adapter_state_dict(transformer, name)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    FluxPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=weights,
        transformer_lora_adapter_metadata=transformer.peft_config[name].to_dict(),
        weight_name=LORA_WEIGHTS,
        safe_serialization=True,
    )
    (folder / SCOPE_FILE).write_text(json.dumps({"scope": adapter_scope(transformer, name)}))
    return folder / LORA_WEIGHTS


def load_adapter(transformer: FluxTransformer2DModel, folder: str | Path, name: str) -> None:
    """Loads an adapter saved by ``save_adapter`` (or any diffusers FLUX LoRA) under ``name``, frozen.

    Only ``*.safetensors`` is read, never a pickle.
    """
    from diffusers import FluxPipeline

    path = Path(folder)
    if not (path / LORA_WEIGHTS).is_file():
        raise FileNotFoundError(f"adapter: no {LORA_WEIGHTS} in {str(path)!r}; pass the folder save_adapter wrote")
    state_dict, alphas, metadata = FluxPipeline.lora_state_dict(
        str(path), weight_name=LORA_WEIGHTS, use_safetensors=True, return_alphas=True, return_lora_metadata=True
    )
    transformer.load_lora_adapter(
        state_dict, network_alphas=alphas, metadata=metadata, adapter_name=name, prefix="transformer"
    )
    if name not in adapter_names(transformer):
        raise RuntimeError(f"adapter: {str(path)!r} loaded no weights for the transformer")
    scope_file = path / SCOPE_FILE
    scope = json.loads(scope_file.read_text()).get("scope", "all") if scope_file.is_file() else "all"
    try:
        set_scope(transformer, name, scope)
    except ValueError as exc:
        raise ValueError(f"adapter: {scope_file}: {exc}") from None
    _activate(transformer, adapter_names(transformer))
    trainable = [n for n in adapter_names(transformer)
                 if n != name and any(p.requires_grad for k, p in transformer.named_parameters() if f".{n}." in k)]
    set_trainable(transformer, trainable)


def adapter_fingerprint(transformer: torch.nn.Module, names: list[str]) -> str:
    """sha256 over the named adapters' weights and scopes (provenance of generated data)."""
    digest = hashlib.sha256()
    for name in names:
        if adapter_scope(transformer, name) != "all":  # "all" adds nothing: fingerprints stay as before
            digest.update(f"{name}/scope={adapter_scope(transformer, name)}".encode())
        for key, value in sorted(adapter_state_dict(transformer, name).items()):
            digest.update(f"{name}/{key}".encode())
            digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def save_merged(transformer: FluxTransformer2DModel, names: list[str], folder: str | Path) -> Path:
    """Writes a plain ``FluxTransformer2DModel`` folder with ``names`` merged into the base weights.

    The live transformer is left as it was (merged, read out, unmerged). The result loads with
    ``FluxTransformer2DModel.from_pretrained(folder)`` and needs no peft.
    """
    from safetensors.torch import save_file

    _check_known(transformer, names)
    scoped = [n for n in names if adapter_scope(transformer, n) != "all"]
    if scoped:
        raise ValueError(f"adapters: {scoped} act on condition tokens only and cannot be merged into shared weights")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = _tuner_layers(transformer)
    for layer in layers:
        layer.merge(adapter_names=list(names))
    try:
        merged = {}
        for key, value in transformer.state_dict().items():
            if "lora_" in key:
                continue
            merged[key.replace(".base_layer.", ".")] = value.detach().to("cpu").clone().contiguous()
    finally:
        for layer in layers:
            layer.unmerge()
    save_file(merged, folder / "diffusion_pytorch_model.safetensors")
    transformer.save_config(folder)
    (folder / "merged_adapters.json").write_text(json.dumps({"merged": list(names)}))
    return folder
