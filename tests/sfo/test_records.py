import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from sfo.records import (
    QUADRUPLET_SCHEMA,
    TRIPLET_SCHEMA,
    check_schema,
    decode_png,
    encode_png,
    split_subjects200k_pair,
)
from tests.conftest import shared_path


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_png_round_trip_is_lossless():
    image = _image(24, 16)
    data = encode_png(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(decode_png(data)), np.asarray(image))


def test_encode_png_refuses_non_rgb_and_decode_refuses_garbage():
    with pytest.raises(ValueError, match="mode"):
        encode_png(Image.new("L", (4, 4)))
    with pytest.raises(ValueError, match="not a readable image"):
        decode_png(b"not a png")


def test_quadruplet_schema_extends_triplet_schema_with_negative_and_provenance():
    assert QUADRUPLET_SCHEMA.names[: len(TRIPLET_SCHEMA)] == TRIPLET_SCHEMA.names
    for name in ["negative_png", "negative_mode", "negative_blur_radius", "negative_prompt", "negative_seed",
                 "negative_steps", "negative_guidance", "negative_adapter_sha256"]:
        assert name in QUADRUPLET_SCHEMA.names
    assert QUADRUPLET_SCHEMA.field("negative_png").type == pa.binary()


def test_check_schema_names_missing_and_mistyped_columns():
    table = pa.table({"sample_id": ["a"], "item": [1]})
    with pytest.raises(ValueError, match="missing column 'target_png'") as err:
        check_schema(table, TRIPLET_SCHEMA, "triplets")
    assert "column 'item' is int64" in str(err.value)
    row = {f.name: [b"x" if f.type == pa.binary() else "x"] for f in TRIPLET_SCHEMA}
    check_schema(pa.table(row, schema=TRIPLET_SCHEMA), TRIPLET_SCHEMA, "triplets")


def test_split_native_padded_layout_like_ominicontrol():
    """1056x528: 512 panels at x = 8 and x = 528 (OminiControl's crop boxes), y = 8."""
    canvas = Image.new("RGB", (1056, 528), (0, 0, 0))
    canvas.paste(Image.new("RGB", (512, 512), (255, 0, 0)), (8, 8))
    canvas.paste(Image.new("RGB", (512, 512), (0, 0, 255)), (528, 8))
    left, right = split_subjects200k_pair(canvas)
    assert left.size == right.size == (512, 512)
    assert set(map(tuple, np.asarray(left).reshape(-1, 3))) == {(255, 0, 0)}
    assert set(map(tuple, np.asarray(right).reshape(-1, 3))) == {(0, 0, 255)}


def test_split_unpadded_layout_trims_the_margin_or_takes_halves():
    image = _image(1024, 512)
    left, right = split_subjects200k_pair(image)
    assert left.size == right.size == (496, 496)
    assert np.array_equal(np.asarray(left), np.asarray(image)[8:504, 8:504])
    assert np.array_equal(np.asarray(right), np.asarray(image)[8:504, 512:1008])
    left, right = split_subjects200k_pair(image, padding=0)
    assert np.array_equal(np.asarray(left), np.asarray(image)[:, :512])
    assert np.array_equal(np.asarray(right), np.asarray(image)[:, 512:])


def test_split_refuses_other_sizes():
    with pytest.raises(ValueError, match="Subjects200K pair"):
        split_subjects200k_pair(_image(700, 512))


def test_split_shared_samples():
    folder = shared_path("data", "subjects200k_samples")
    pngs = sorted(folder.glob("pair*.png"))
    assert pngs
    for png in pngs:
        left, right = split_subjects200k_pair(Image.open(png), padding=0)
        assert left.size == right.size == (512, 512)


def test_cache_bytes_bf16_matches_torch_and_decodes_exactly():
    """bf16 cells round as torch does (nearest even) and widen back to float32 exactly; half fp32's bytes."""
    import numpy as np
    import torch

    from sfo.records import cache_bytes, decode_cache

    values = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0)) * 3
    values[0, 0, :3] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0])  # ties: round to even
    expected = values.to(torch.bfloat16).float()
    cells = {"cache_target_latents": [cache_bytes(v, "bf16") for v in values],
             "cache_reference_latents": [cache_bytes(v, "bf16") for v in values],
             "cache_prompt_embeds": [cache_bytes(v[:2], "bf16") for v in values],
             "cache_pooled": [cache_bytes(v[0], "bf16") for v in values],
             "cache_latent_tokens": [4, 4], "cache_text_tokens": [2, 2], "cache_dtype": ["bf16", "bf16"]}

    decoded = decode_cache(cells)

    assert len(cells["cache_target_latents"][0]) == 4 * 64 * 2
    torch.testing.assert_close(torch.from_numpy(decoded["target"]), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(decoded["pooled"]), expected[:, 0], rtol=0, atol=0)
    fp32 = decode_cache(cells | {k: [cache_bytes(v, "fp32") for v in values] for k in ("cache_target_latents",)}
                        | {"cache_dtype": ["fp32", "fp32"], "cache_reference_latents": [cache_bytes(v, "fp32") for v in values],
                           "cache_prompt_embeds": [cache_bytes(v[:2], "fp32") for v in values],
                           "cache_pooled": [cache_bytes(v[0], "fp32") for v in values]})
    assert np.array_equal(fp32["target"], values.numpy())


def test_decode_cache_refuses_mixed_dtypes():
    import pytest

    from sfo.records import cache_bytes, decode_cache

    cell = cache_bytes([0.0] * 64, "fp32")
    with pytest.raises(ValueError, match="cache_dtype"):
        decode_cache({"cache_target_latents": [cell, cell], "cache_reference_latents": [cell, cell],
                      "cache_prompt_embeds": [cell, cell], "cache_pooled": [cell, cell], "cache_latent_tokens": [1, 1],
                      "cache_text_tokens": [1, 1], "cache_dtype": ["bf16", "fp32"]})
