import pytest
import torch
from torch.testing import assert_close

from sfo import adapters as A
from sfo.latents import grid_ids
from sfo.models import load_flux
from sfo.text import encode_prompts
from sfo.transformer import flux_forward


def _randomise(transformer, name, std=0.05, seed=0):
    """Give an adapter non-zero weights (fresh LoRA B matrices are zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in transformer.named_parameters():
            if f".{name}." in key and "lora_" in key:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def two_adapters(fresh_flux):
    tr = fresh_flux.transformer
    A.add_lora(tr, A.REF, A.REF_RANK)
    A.add_lora(tr, A.SFO, A.SFO_RANK)
    _randomise(tr, A.REF, seed=1)
    _randomise(tr, A.SFO, seed=2)
    return fresh_flux


def _predict(model, transformer=None):
    tr = transformer or model.transformer
    text = encode_prompts(model, ["a dog"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return flux_forward(tr, torch.randn(1, 16, 64, generator=g), grid_ids(4, 4), text, torch.tensor([0.5]),
                            torch.tensor([3.5]))


def test_ranks_targets_and_only_the_newest_adapter_trains(fresh_flux):
    tr = fresh_flux.transformer
    A.add_lora(tr, A.REF, A.REF_RANK)
    A.add_lora(tr, A.SFO, A.SFO_RANK)
    assert A.adapter_names(tr) == ["ref", "sfo"]
    trainable = {k for k, p in tr.named_parameters() if p.requires_grad}
    assert trainable and all(".sfo." in k for k in trainable)
    assert tr.transformer_blocks[0].attn.to_q.lora_A["ref"].weight.shape[0] == 4
    assert tr.transformer_blocks[0].attn.to_q.lora_A["sfo"].weight.shape[0] == 16
    targeted = {k.split(".lora_A")[0] for k in trainable if "lora_A" in k}
    assert "x_embedder" in targeted and "single_transformer_blocks.0.proj_mlp" in targeted
    assert not any("add_q_proj" in k or "context_embedder" in k for k in targeted)  # text stream untouched


def test_new_adapter_starts_as_a_no_op(fresh_flux):
    base = _predict(fresh_flux)
    A.add_lora(fresh_flux.transformer, A.SFO, A.SFO_RANK)
    assert_close(_predict(fresh_flux), base)


def test_context_managers_switch_adapters_and_keep_ref_frozen(two_adapters):
    tr = two_adapters.transformer
    with A.use_adapters(tr, []):
        base = _predict(two_adapters)
    with A.ref_only(tr):
        ref = _predict(two_adapters)
    with A.ref_and_sfo(tr):
        both = _predict(two_adapters)
    assert (ref - base).abs().max() > 1e-4 and (both - ref).abs().max() > 1e-4
    assert not any(p.requires_grad for k, p in tr.named_parameters() if ".ref." in k)
    assert all(p.requires_grad for k, p in tr.named_parameters() if ".sfo." in k and "lora_" in k)
    assert_close(_predict(two_adapters), both)  # both adapters are active outside the contexts


def test_context_restores_state_after_an_exception(two_adapters):
    tr = two_adapters.transformer
    before = _predict(two_adapters)
    with pytest.raises(RuntimeError):
        with A.ref_only(tr):
            raise RuntimeError("boom")
    assert_close(_predict(two_adapters), before)


def test_diffusers_set_adapters_pitfall_is_real():
    """Why use_adapters exists: diffusers' set_adapters unfreezes every active adapter (peft #1374)."""
    model = load_flux("tiny", device="cpu")
    tr = model.transformer
    A.add_lora(tr, A.REF, 4)
    A.add_lora(tr, A.SFO, 16)
    tr.set_adapters([A.REF, A.SFO])
    assert any(p.requires_grad for k, p in tr.named_parameters() if ".ref." in k)


def test_save_load_round_trip_with_plain_diffusers(two_adapters, tmp_path):
    tr = two_adapters.transformer
    A.save_adapter(tr, A.REF, tmp_path / "ref")
    path = A.save_adapter(tr, A.SFO, tmp_path / "sfo")
    assert path.suffix == ".safetensors"
    expected = _predict(two_adapters)
    fresh = load_flux("tiny", device="cpu")
    fresh.pipe.load_lora_weights(str(tmp_path / "ref"), adapter_name="ref")  # plain diffusers
    fresh.pipe.load_lora_weights(str(tmp_path / "sfo"), adapter_name="sfo")
    fresh.transformer.set_adapters(["ref", "sfo"])
    assert_close(_predict(fresh), expected)
    ours = load_flux("tiny", device="cpu")
    A.load_adapter(ours.transformer, tmp_path / "ref", A.REF)
    A.load_adapter(ours.transformer, tmp_path / "sfo", A.SFO)
    assert_close(_predict(ours), expected)
    assert not any(p.requires_grad for p in ours.transformer.parameters())
    assert A.adapter_fingerprint(ours.transformer, ["sfo"]) == A.adapter_fingerprint(tr, ["sfo"])


def test_merged_export_equals_adapters(two_adapters, tmp_path):
    from diffusers import FluxTransformer2DModel

    tr = two_adapters.transformer
    expected = _predict(two_adapters)
    A.save_merged(tr, [A.REF, A.SFO], tmp_path / "merged")
    merged = FluxTransformer2DModel.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged, "peft_config") or not merged.peft_config
    assert_close(_predict(two_adapters, merged), expected, rtol=1e-4, atol=1e-5)
    assert_close(_predict(two_adapters), expected)  # the live model was unmerged again


def test_fingerprint_follows_the_weights(two_adapters):
    tr = two_adapters.transformer
    before = A.adapter_fingerprint(tr, ["sfo"])
    _randomise(tr, A.SFO, seed=9)
    assert A.adapter_fingerprint(tr, ["sfo"]) != before


@pytest.mark.parametrize("rank", [0, -4, 2.5])
def test_bad_rank_names_the_field(fresh_flux, rank):
    with pytest.raises(ValueError, match="lora.rank"):
        A.add_lora(fresh_flux.transformer, "x", rank)


def test_unknown_adapter_and_missing_folder(two_adapters, tmp_path):
    with pytest.raises(ValueError, match="unknown adapter"):
        with A.use_adapters(two_adapters.transformer, ["nope"]):
            pass
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        A.load_adapter(two_adapters.transformer, tmp_path, "x")


def _predict_with_reference(model, joint=False):
    from sfo.latents import condition_ids
    from sfo.transformer import Condition

    text = encode_prompts(model, ["a dog"])
    g = torch.Generator().manual_seed(0)
    latents, reference = torch.randn(1, 16, 64, generator=g), torch.randn(1, 16, 64, generator=g)
    with torch.no_grad():
        return flux_forward(model.transformer, latents, grid_ids(4, 4), text, torch.tensor([0.5]), torch.tensor([3.5]),
                            Condition(reference, condition_ids(4, 4)), joint=joint)


def test_condition_scope_acts_only_on_the_reference_tokens(fresh_flux):
    """lora.scope=condition (OminiControl's latent_lora: false): with no reference in the sequence the
    output is the base model's; with a reference it is not (the adapter changed the reference's keys/values)."""
    tr = fresh_flux.transformer
    base_plain, base_ref = _predict(fresh_flux), _predict_with_reference(fresh_flux)
    A.add_lora(tr, A.REF, A.REF_RANK)
    _randomise(tr, A.REF, seed=1)
    A.set_scope(tr, A.REF, "condition")
    assert_close(_predict(fresh_flux), base_plain)
    assert (_predict_with_reference(fresh_flux) - base_ref).abs().max() > 1e-4
    A.set_scope(tr, A.REF, "all")  # the same weights on every token change the plain output too
    assert (_predict(fresh_flux) - base_plain).abs().max() > 1e-4


def test_condition_scope_is_saved_restored_and_refused_where_it_cannot_hold(fresh_flux, tmp_path):
    tr = fresh_flux.transformer
    A.add_lora(tr, A.REF, A.REF_RANK)
    _randomise(tr, A.REF, seed=1)
    A.set_scope(tr, A.REF, "condition")
    expected = _predict_with_reference(fresh_flux)
    A.save_adapter(tr, A.REF, tmp_path / "ref")
    other = load_flux("tiny", device="cpu")
    A.load_adapter(other.transformer, tmp_path / "ref", A.REF)
    assert A.adapter_scope(other.transformer, A.REF) == "condition"
    assert_close(_predict_with_reference(other), expected)
    with pytest.raises(ValueError, match="joint"):
        _predict_with_reference(fresh_flux, joint=True)
    with pytest.raises(ValueError, match="merged"):
        A.save_merged(tr, [A.REF], tmp_path / "merged")
    with pytest.raises(ValueError, match="lora.scope"):
        A.set_scope(tr, A.REF, "target")


def test_fused_adapters_sample_as_the_lora_layers_and_put_the_weights_back(two_adapters):
    """The all-scoped "ref" is folded into the base weights, the condition-scoped "sfo" stays a LoRA layer;
    the output equals the unfused one and every base weight is the same tensor, unchanged, afterwards."""
    tr = two_adapters.transformer
    A.set_scope(tr, A.SFO, "condition")
    with A.use_adapters(tr, [A.REF, A.SFO]):
        expected = _predict_with_reference(two_adapters)
    to_q = tr.transformer_blocks[0].attn.to_q
    weights = {name: (p, p.detach().clone()) for name, p in tr.named_parameters() if "base_layer" in name}
    with A.fused_adapters(tr, [A.REF, A.SFO]):
        assert A.active_adapters(tr) == [A.SFO]
        assert not torch.equal(to_q.get_base_layer().weight, weights["transformer_blocks.0.attn.to_q.base_layer.weight"][1])
        assert_close(_predict_with_reference(two_adapters), expected, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="count them twice"), A.use_adapters(tr, [A.REF]):
            pass
        with pytest.raises(ValueError, match="does not nest"), A.fused_adapters(tr, [A.SFO]):
            pass
    with pytest.raises(RuntimeError, match="inside"), A.fused_adapters(tr, [A.REF]):
        raise RuntimeError("inside")
    after = dict(tr.named_parameters())
    assert all(after[name] is p and torch.equal(p, saved) for name, (p, saved) in weights.items())
    assert A.active_adapters(tr) == [A.REF, A.SFO]
    with A.fused_adapters(tr, [A.SFO]):  # nothing all-scoped: nothing folded
        assert to_q.get_base_layer().weight is weights["transformer_blocks.0.attn.to_q.base_layer.weight"][0]
    with pytest.raises(ValueError, match="unknown adapter"), A.fused_adapters(tr, ["nope"]):
        pass


def test_lora_layers_are_found_once_per_adapter_set(fresh_flux, monkeypatch):
    tr = fresh_flux.transformer
    assert A.active_adapters(tr) == []  # no adapter yet: no LoRA layers (remembered for this empty set)
    A.add_lora(tr, A.REF, A.REF_RANK)  # new adapter: the layers are looked up again
    _randomise(tr, A.REF, seed=1)
    assert A.active_adapters(tr) == [A.REF]
    with A.use_adapters(tr, []):
        base = _predict(fresh_flux)
    walks = []
    original = type(tr).modules
    monkeypatch.setattr(type(tr), "modules", lambda self: walks.append(1) or original(self))
    with A.use_adapters(tr, [A.REF]):
        ref = _predict(fresh_flux)
    assert not walks  # the same adapters: no walk over every module, in the context or the forward
    assert (ref - base).abs().max() > 1e-4
    A.add_lora(tr, A.SFO, A.SFO_RANK)
    _randomise(tr, A.SFO, seed=2)
    with A.use_adapters(tr, [A.SFO]):  # the new adapter's layers are switched too
        sfo = _predict(fresh_flux)
    assert walks and (sfo - ref).abs().max() > 1e-4
    assert all(layer.active_adapters == [A.REF, A.SFO] for layer in A._tuner_layers(tr))
