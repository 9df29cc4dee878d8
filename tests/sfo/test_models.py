import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from sfo import models
from sfo.models import TINY, TinyFluxConfig, cache_root, load_flux, parse_dtype
from sfo.sampler import SamplerConfig, generate
from tests.conftest import shared_path


def test_tiny_is_a_flux_dev_architecture(tiny_flux):
    pipe = tiny_flux.pipe
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert pipe.transformer.config.guidance_embeds
    assert pipe.vae.config.latent_channels == 16 and tiny_flux.vae_scale_factor == 8
    assert pipe.scheduler.config.use_dynamic_shifting
    assert tiny_flux.dtype == torch.float32 and tiny_flux.device.type == "cpu"
    assert not any(p.requires_grad for p in pipe.transformer.parameters())
    assert not pipe.transformer.training and not pipe.text_encoder_2.training


def test_tiny_is_cached_on_disk_and_deterministic(tiny_flux):
    folder = cache_root() / "tiny-flux" / TinyFluxConfig().fingerprint()
    assert (folder / "model_index.json").is_file()
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    again = load_flux(TINY, device="cpu")
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp  # loaded, not rebuilt
    for a, b in zip(tiny_flux.transformer.parameters(), again.transformer.parameters()):
        assert torch.equal(a, b)


def test_a_build_that_wrote_no_weights_is_never_published(tmp_path, monkeypatch):
    """On a torch.distributed rank other than 0, transformers' save_pretrained writes no weights: the cache
    build refuses to publish that folder (other ranks would load it and fail) and says why."""
    from transformers import PreTrainedModel

    monkeypatch.setenv("SFO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(PreTrainedModel, "should_save_on_this_rank", lambda self, is_main_process: False)
    with pytest.raises(RuntimeError, match=r"no weights for \['text_encoder', 'text_encoder_2'\].*torch.distributed"):
        load_flux(TINY, device="cpu")
    assert not (tmp_path / "tiny-flux" / TinyFluxConfig().fingerprint()).exists()
    assert [p.name for p in (tmp_path / "tiny-flux").iterdir()] == []  # the staging folder is gone too


def test_dtype_is_configurable(tmp_path):
    model = load_flux(TINY, device="cpu", dtype="bf16")
    assert model.transformer.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype("int8")


def test_missing_folder_names_the_field_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="model: folder .* does not exist; pass 'tiny'"):
        load_flux(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_flux(tmp_path)


def _shrink(config: dict, **sizes) -> dict:
    config = dict(config)
    config.update(sizes)
    return config


@pytest.fixture(scope="module")
def shrunk_flux_dev(tmp_path_factory):
    """The real FLUX.1 layout and tokenizers with FLUX.1-dev's differences and shrunk random models."""
    layout = shared_path("data", "flux1-layout")
    folder = tmp_path_factory.mktemp("flux-dev-shrunk")
    for name in ("model_index.json",):
        shutil.copy(layout / name, folder / name)
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(layout / name, folder / name)
    scheduler = json.loads((layout / "scheduler" / "scheduler_config.json").read_text())
    scheduler.update(use_dynamic_shifting=True, shift=3.0)  # FLUX.1-dev's scheduler
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    torch.manual_seed(0)
    tr = json.loads((layout / "transformer" / "config.json").read_text())
    tr = _shrink(tr, num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                 axes_dims_rope=[4, 6, 6], joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True)
    FluxTransformer2DModel.from_config(tr).save_pretrained(folder / "transformer")
    vae = json.loads((layout / "vae" / "config.json").read_text())
    vae = _shrink(vae, block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4)
    AutoencoderKL.from_config(vae).save_pretrained(folder / "vae")
    clip = json.loads((layout / "text_encoder" / "config.json").read_text())
    clip = _shrink(clip, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
    CLIPTextModel(CLIPTextConfig(**clip)).save_pretrained(folder / "text_encoder")
    t5 = json.loads((layout / "text_encoder_2" / "config.json").read_text())
    t5 = _shrink(t5, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    T5EncoderModel(T5Config(**t5)).save_pretrained(folder / "text_encoder_2")
    return folder


def test_real_layout_loads_with_real_tokenizers_and_samples(shrunk_flux_dev):
    model = load_flux(shrunk_flux_dev, device="cpu", text_max_length=16)
    assert model.pipe.tokenizer.vocab_size == 49408
    assert len(model.pipe.tokenizer_2) >= 32100
    assert model.pipe.scheduler.config.use_dynamic_shifting
    images = generate(model, ["a photo of a dog"], [0], SamplerConfig(steps=2, height=32, width=32))
    assert images[0].size == (32, 32) and images[0].mode == "RGB"


def test_incomplete_folder_names_what_is_missing(shrunk_flux_dev, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shrunk_flux_dev, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"lacks the component folder\(s\) \['vae'\]"):
        load_flux(broken)
    shutil.copytree(shrunk_flux_dev / "vae", broken / "vae")
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="transformer.* holds no weights"):
        load_flux(broken)


def test_transformer_only_loads_no_encoder_and_keeps_the_latent_geometry(tiny_flux, shrunk_flux_dev):
    for source, full in (("tiny", tiny_flux), (str(shrunk_flux_dev), None)):
        alone = models.load_transformer_only(source, device="cpu")
        assert all(getattr(alone.pipe, name) is None for name in models.ENCODER_COMPONENTS)
        assert not any(p.requires_grad for p in alone.transformer.parameters()) and not alone.transformer.training
        if full is not None:
            assert alone.vae_scale_factor == full.vae_scale_factor and alone.pixel_multiple == full.pixel_multiple
            for (name, a), (_, b) in zip(alone.transformer.state_dict().items(), full.transformer.state_dict().items()):
                assert torch.equal(a, b), name
        else:
            assert alone.vae_scale_factor == 8  # FLUX.1-dev's VAE: four levels, three downsamplings
