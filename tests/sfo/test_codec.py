import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from sfo.codec import PixelCodec
from sfo.latents import decode_tokens, encode_images
from sfo.models import FluxModel
from sfo.shapes.model import build_shapes_pipeline, world_words
from sfo.shapes.world import ALL_CONTEXTS, ALL_SUBJECTS, SIZE, render, render_reference


def _model(pipe) -> FluxModel:
    return FluxModel(pipe=pipe, source="shapes", text_max_length=16, dtype=torch.float32, device=torch.device("cpu"))


def test_pixel_codec_is_exactly_invertible_on_world_images():
    model = _model(build_shapes_pipeline())
    images = [render(s, c) for s, c in zip(ALL_SUBJECTS[::7], ALL_CONTEXTS * 4)] + [render_reference(ALL_SUBJECTS[5])]
    tokens = encode_images(model, images)
    assert tokens.shape == (len(images), (SIZE // 4) ** 2, 48)  # 2x2 cells x 3 channels x 2x2 packing
    back = decode_tokens(model, tokens, SIZE, SIZE)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, back))


def test_pixel_codec_answers_like_an_autoencoder_kl():
    codec = PixelCodec(factor=4)
    assert codec.config.latent_channels == 48 and 2 ** (len(codec.config.block_out_channels) - 1) == 4
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x).latent_dist.mode()
    assert z.shape == (2, 48, 4, 4)
    assert torch.equal(codec.encode(x).latent_dist.sample(), z)
    assert torch.equal(codec.decode(z).sample, x)
    with pytest.raises(ValueError, match="codec.factor"):
        PixelCodec(factor=3)


def test_shapes_pipeline_saves_and_loads_as_a_diffusers_folder(tmp_path):
    pipe = build_shapes_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = FluxPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(loaded.vae, PixelCodec) and loaded.vae_scale_factor == pipe.vae.config.factor == 2
    assert not loaded.transformer.config.guidance_embeds
    for a, b in zip(pipe.transformer.parameters(), loaded.transformer.parameters()):
        assert torch.equal(a, b)


def test_every_world_word_is_one_t5_token():
    tokenizer = build_shapes_pipeline().tokenizer_2
    for word in world_words():
        assert tokenizer.tokenize(word) == ["▁" + word], word
    ids = tokenizer("a large blue triangle on the left, sand background").input_ids
    assert len(ids) <= 16  # fits text_max_length with the end token
