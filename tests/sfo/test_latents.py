import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from sfo.latents import condition_ids, encode_images, decode_tokens, grid_ids, images_to_tensor, pack, unpack


def test_pack_unpack_round_trip_and_layout():
    latents = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).view(2, 16, 4, 6)
    tokens = pack(latents)
    assert tokens.shape == (2, 2 * 3, 64)
    # token 1 is the 2x2 cell at rows 0-1, cols 2-3; its first 4 features are channel 0 of that cell
    assert tokens[0, 1, :4].tolist() == [latents[0, 0, 0, 2], latents[0, 0, 0, 3], latents[0, 0, 1, 2], latents[0, 0, 1, 3]]
    assert_close(unpack(tokens, 2, 3), latents)


def test_grid_ids_are_row_major():
    ids = grid_ids(2, 3)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_condition_ids_sit_left_of_the_target():
    """Reference token (r, c) -> (0, r, c - W): same rows, columns -W..-1, just left of column 0."""
    target, cond = grid_ids(4, 4), condition_ids(4, 4)
    assert torch.equal(cond[:, 1], target[:, 1])
    assert torch.equal(cond[:, 2], target[:, 2] - 4)
    assert cond[:, 2].min() == -4 and cond[:, 2].max() == -1
    assert not set(map(tuple, cond.tolist())) & set(map(tuple, target.tolist()))


def test_images_to_tensor_checks_mode_and_size():
    assert images_to_tensor([Image.new("RGB", (32, 16), (255, 0, 0))], multiple=16)[0, 0].unique().tolist() == [1.0]
    with pytest.raises(ValueError, match=r"images\[0\]: mode is 'L'"):
        images_to_tensor([Image.new("L", (32, 32))], multiple=16)
    with pytest.raises(ValueError, match=r"images\[0\]: size 30x32 is not a multiple of 16"):
        images_to_tensor([Image.new("RGB", (30, 32))], multiple=16)
    with pytest.raises(ValueError, match=r"images\[1\]: size"):
        images_to_tensor([Image.new("RGB", (32, 32)), Image.new("RGB", (16, 16))], multiple=16)


def test_encode_decode_shapes(tiny_flux):
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 48, 3), dtype=np.uint8)) for i in range(2)]
    tokens = encode_images(tiny_flux, images)
    assert tokens.shape == (2, 2 * 3, 64)
    out = decode_tokens(tiny_flux, tokens, 32, 48)
    assert [im.size for im in out] == [(48, 32), (48, 32)]
