import numpy as np
import pytest
from PIL import Image, ImageFilter

from sfo.degrade import (
    CDNS_MODES,
    AttributeSwapCaptioner,
    Degradation,
    degrade_condition,
    gaussian_noise,
)


def _checker(size=64, cell=2):
    grid = (np.indices((size, size)).sum(axis=0) // cell) % 2
    return Image.fromarray((grid * 255).astype(np.uint8)).convert("RGB")


def _high_frequency(image):
    a = np.asarray(image, dtype=np.float32)
    return np.abs(np.diff(a, axis=1)).mean()


def test_cdns_default_blurs_radius_5_and_uses_generic_text():
    reference = _checker()
    image, text = degrade_condition(reference, "a dog on the beach at sunset", "dog", CDNS_MODES["cdns"], seed=0)
    assert text == "a photo of dog"
    expected = reference.filter(ImageFilter.GaussianBlur(5.0))
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    assert _high_frequency(image) < 0.1 * _high_frequency(reference)  # the fine detail is gone


def test_larger_blur_radius_removes_more_detail():
    reference = _checker(cell=4)
    hf = [_high_frequency(degrade_condition(reference, "t", "i", Degradation("blur", "none", blur_radius=r), seed=0)[0])
          for r in (1.0, 2.5, 5.0)]
    assert hf[0] > hf[1] > hf[2]


def test_self_play_leaves_the_condition_untouched():
    reference = _checker()
    image, text = degrade_condition(reference, "a dog on the beach", "dog", CDNS_MODES["self-play"], seed=0)
    assert text == "a dog on the beach" and np.array_equal(np.asarray(image), np.asarray(reference))


def test_noise_is_seeded():
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    a, b, c = gaussian_noise(grey, 0.3, 1), gaussian_noise(grey, 0.3, 1), gaussian_noise(grey, 0.3, 2)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    assert abs(np.asarray(a, dtype=np.float32).std() / 255 - 0.3) < 0.05


def test_semantic_uses_the_target_and_needs_it():
    reference, target = Image.new("RGB", (32, 32), "white"), Image.new("RGB", (64, 64), "green")
    image, _ = degrade_condition(reference, "t", "i", CDNS_MODES["semantic"], seed=0, target=target)
    assert image.size == reference.size and image.getpixel((5, 5)) == (0, 128, 0)
    with pytest.raises(ValueError, match="target"):
        degrade_condition(reference, "t", "i", CDNS_MODES["semantic"], seed=0)


def test_hallucinating_captioner_swaps_attributes_deterministically():
    captioner = AttributeSwapCaptioner(max_swaps=1)
    text = "a red wooden chair in a garden"
    out = captioner(text, "chair", seed=5)
    assert out != text and out == captioner(text, "chair", seed=5)
    changed = [(a, b) for a, b in zip(text.split(), out.split()) if a != b]
    assert len(changed) == 1 and changed[0][0] in ("red", "wooden")


def test_hallucinating_captioner_inserts_a_wrong_colour_when_there_is_no_attribute():
    out = AttributeSwapCaptioner()("a chair in a garden", "chair", seed=0)
    colour = out.split()[1]
    assert colour in AttributeSwapCaptioner.VOCABULARY["colour"] and out.endswith("chair in a garden")


def test_custom_captioner_is_used():
    _, text = degrade_condition(Image.new("RGB", (8, 8)), "t", "i", Degradation("none", "hallucinated"), seed=0,
                                captioner=lambda text, item, seed: f"wrong {item} {seed}")
    assert text == "wrong i 0"


@pytest.mark.parametrize("kwargs,field", [({"image": "jpeg"}, "degradation.image"), ({"text": "gpt"}, "degradation.text"),
                                          ({"blur_radius": 0.0}, "degradation.blur_radius"),
                                          ({"generic_template": "a photo"}, "degradation.generic_template")])
def test_bad_degradations_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Degradation(**kwargs)


def test_generic_subject_text_keeps_the_context():
    from sfo.degrade import generic_subject_text

    assert generic_subject_text("a sks dog on the beach", "sks dog") == "a object on the beach"
    assert generic_subject_text("a small red circle on the left, sand background", "red circle", "") == \
        "a small on the left, sand background"
    assert generic_subject_text("a photo of a cat", "dog") == "a photo of a cat"
