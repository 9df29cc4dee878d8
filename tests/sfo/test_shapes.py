import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sfo.shapes.oracle import (
    BORDER, FIDELITY_KEYS, MASK_THRESHOLD, TEXT_KEYS, Reading, judge, off_pixels, read_image, redraw, score,
)
from sfo.shapes.world import (
    ACCENTS, ALL_CONTEXTS, ALL_SUBJECTS, BACKGROUNDS, COLOURS, REFERENCE_BACKGROUND, SIZE, Context, Subject, box,
    parse_sample_id, render, render_array, render_reference, shape_mask, triplets_of, world_triplets,
)

SUBJECT = Subject("triangle", "blue", "checks", "white")
CONTEXT = Context("sky", "left", "small")
RIGHT = Reading("triangle", "blue", "checks", "white", "sky", "left", "small")


@pytest.fixture(scope="module")
def targets():
    """All 96 subjects x 24 contexts: (images, subjects, contexts)."""
    pairs = [(s, c) for s in ALL_SUBJECTS for c in ALL_CONTEXTS]
    return [render(s, c) for s, c in pairs], [s for s, _ in pairs], [c for _, c in pairs]


@pytest.fixture(scope="module")
def references():
    return [render_reference(s) for s in ALL_SUBJECTS]


def _noise(image, std, seed):
    pixels = np.asarray(image, np.float32) + np.random.default_rng(seed).normal(0.0, std, (SIZE, SIZE, 3))
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


CORRUPTIONS = {
    "noise 8": lambda image, i: _noise(image, 8.0, seed=i),
    "blur 0.5": lambda image, i: image.filter(ImageFilter.GaussianBlur(0.5)),
}


def test_every_target_and_reference_reads_back_exactly(targets, references):
    images, subjects, contexts = targets
    for image, subject, context in zip(images, subjects, contexts):
        assert read_image(image) == Reading(subject.shape, subject.colour, subject.pattern, subject.accent,
                                            context.background, context.position, context.size), (subject, context)
    for image, subject in zip(references, ALL_SUBJECTS):
        assert read_image(image, reference=True) == Reading(subject.shape, subject.colour, subject.pattern,
                                                            subject.accent, None, "center", "large"), subject


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_mild_corruption_still_reads_exactly(targets, references, corruption):
    """Measured: exact on all 2304 targets and 96 references under noise std 8 and blur radius 0.5 alike
    (noise std 16 drops ``subject`` to ~0.73, blur radius 1 to ~0.84: past the design point)."""
    corrupt = CORRUPTIONS[corruption]
    images, subjects, contexts = targets
    rates = score([corrupt(image, i) for i, image in enumerate(images)], subjects, contexts)
    assert rates == {k: 1.0 for k in rates}
    rates = score([corrupt(image, i) for i, image in enumerate(references)], ALL_SUBJECTS, reference=True)
    assert rates == {k: 1.0 for k in rates}


def test_noise_and_blur_together_still_read_exactly():
    triplets = world_triplets(200, seed=5)
    images = [_noise(t.target.filter(ImageFilter.GaussianBlur(0.5)), 8.0, seed=i) for i, t in enumerate(triplets)]
    rates = score(images, [t.subject for t in triplets], [t.context for t in triplets])
    assert rates["subject"] == rates["text"] == 1.0


def test_plain_background_reads_no_subject():
    for name, rgb in BACKGROUNDS.items():
        plain = Image.new("RGB", (SIZE, SIZE), rgb)
        assert read_image(plain) == Reading(None, None, None, None, name, None, None)
        assert judge(read_image(plain), SUBJECT, CONTEXT)["subject"] is False
    grey = Image.new("RGB", (SIZE, SIZE), REFERENCE_BACKGROUND)
    assert read_image(grey, reference=True) == Reading(None, None, None, None, None, None, None)


def test_a_subject_matching_no_template_reads_colours_only():
    """A 6 px square at (20, 20) overlaps every template by < MIN_IOU: no shape, box or pattern."""
    image = render_array(Subject("square", "red", "dots", "black"), 20, 20, 6, BACKGROUNDS["mint"])
    assert read_image(image) == Reading(None, "red", None, "black", "mint", None, None)


def test_off_pixels_counts_what_differs_from_the_drawing_of_the_reading():
    image = np.asarray(render(SUBJECT, CONTEXT)).copy()
    assert np.array_equal(redraw(read_image(image)), image)
    assert off_pixels(image) == 0.0
    image[3:5, 10:15] = COLOURS["red"]  # 10 stray pixels on the background; the reading is unchanged
    assert read_image(image) == RIGHT and off_pixels(image) == 10 / SIZE**2
    assert off_pixels(_noise(render(SUBJECT, CONTEXT), 8.0, seed=0)) == 0.0  # mild noise stays under the threshold
    plain = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS["sky"])
    assert redraw(read_image(plain)) is None and off_pixels(plain) == 1.0  # nothing to compare against


def test_arrays_read_like_images():
    image = render(SUBJECT, CONTEXT)
    assert read_image(np.asarray(image)) == read_image(image) == RIGHT


def test_mask_threshold_is_half_the_closest_background_to_paint_distance():
    """Closest pair: night (50, 50, 90) vs black (20, 20, 20): sqrt(30^2 + 30^2 + 70^2) / 2 = 40.93."""
    assert MASK_THRESHOLD == pytest.approx(np.sqrt(30**2 + 30**2 + 70**2) / 2)
    paints = list(COLOURS.values()) + list(ACCENTS.values())
    grounds = list(BACKGROUNDS.values()) + [REFERENCE_BACKGROUND]
    assert min(np.linalg.norm(np.subtract(g, p)) for g in grounds for p in paints) == pytest.approx(2 * MASK_THRESHOLD)


def test_no_subject_box_reaches_the_border_frame():
    frame = np.ones((SIZE, SIZE), bool)
    frame[BORDER:-BORDER, BORDER:-BORDER] = False
    for context in ALL_CONTEXTS:
        assert not (shape_mask("square", *box(context)) & frame).any(), context


def test_world_triplets_are_deterministic():
    a, b, other = world_triplets(30, seed=3), world_triplets(30, seed=3), world_triplets(30, seed=4)
    assert [t.sample_id for t in a] == [t.sample_id for t in b] == [f"shapes-3-{i:06d}" for i in range(30)]
    assert [(t.subject, t.context, t.target_text) for t in a] == [(t.subject, t.context, t.target_text) for t in b]
    assert [(_png(t.reference), _png(t.target)) for t in a] == [(_png(t.reference), _png(t.target)) for t in b]
    assert [(t.subject, t.context) for t in a] != [(t.subject, t.context) for t in other]
    assert {t.sample_id for t in a}.isdisjoint(t.sample_id for t in other)
    assert world_triplets(0) == []


def test_judge_aggregates_on_hand_made_readings():
    assert judge(RIGHT, SUBJECT, CONTEXT) == {k: True for k in
                                              (*FIDELITY_KEYS, "background", "position", "size",
                                               "coarse", "fine", "subject", "text")}
    wrong_accent = judge(Reading("triangle", "blue", "checks", "black", "sky", "left", "small"), SUBJECT, CONTEXT)
    assert (wrong_accent["accent"], wrong_accent["fine"], wrong_accent["subject"]) == (False, False, False)
    assert wrong_accent["coarse"] and wrong_accent["text"] and wrong_accent["pattern"]
    wrong_place = judge(Reading("triangle", "blue", "checks", "white", "sky", "right", "small"), SUBJECT, CONTEXT)
    assert wrong_place["subject"] and not wrong_place["position"] and not wrong_place["text"]
    wrong_colour = judge(Reading("triangle", "red", "checks", "white", "sky", "left", "small"), SUBJECT, CONTEXT)
    assert not wrong_colour["coarse"] and not wrong_colour["subject"] and not wrong_colour["text"]
    assert wrong_colour["fine"]
    unread = judge(Reading(None, None, None, None, "sky", None, None), SUBJECT, CONTEXT)
    assert unread["background"] and not any(unread[k] for k in FIDELITY_KEYS + ("subject", "text"))
    reference = judge(RIGHT, SUBJECT, None)
    assert set(reference) == {*FIDELITY_KEYS, "coarse", "fine", "subject"}
    assert set(TEXT_KEYS) - set(FIDELITY_KEYS) == {"background", "position", "size"}


def test_score_is_the_mean_of_judge():
    """Two images of SUBJECT in CONTEXT, the second drawn with dots: subject 1/2, fine 1/2, text 1."""
    dots = Subject("triangle", "blue", "dots", "white")
    rates = score([render(SUBJECT, CONTEXT), render(dots, CONTEXT)], [SUBJECT, SUBJECT], [CONTEXT, CONTEXT])
    assert rates["subject"] == rates["fine"] == rates["pattern"] == 0.5
    assert rates["coarse"] == rates["text"] == rates["accent"] == rates["position"] == 1.0
    assert set(score([render_reference(SUBJECT)], [SUBJECT], reference=True)) == {*FIDELITY_KEYS, "coarse", "fine",
                                                                                 "subject"}


def test_bad_input_names_the_field_and_the_fix():
    image = render(SUBJECT, CONTEXT)
    with pytest.raises(ValueError, match=r"image\.mode.*convert\('RGB'\)"):
        read_image(image.convert("RGBA"))
    with pytest.raises(ValueError, match=r"image\.mode.*convert\('RGB'\)"):
        read_image(image.convert("L"))
    with pytest.raises(ValueError, match=r"image\.size: got \(64, 64\).*resize"):
        read_image(image.resize((64, 64)))
    with pytest.raises(ValueError, match=r"image\.dtype.*uint8"):
        read_image(np.asarray(image, np.float32) / 255)
    with pytest.raises(ValueError, match=r"image\.shape.*\[\.\.\., :3\]"):
        read_image(np.asarray(image.convert("RGBA")))
    with pytest.raises(TypeError, match="PIL image"):
        read_image([[0, 0, 0]])
    with pytest.raises(ValueError, match="one per image"):
        score([image, image], [SUBJECT], [CONTEXT, CONTEXT])
    with pytest.raises(ValueError, match="empty batch"):
        score([], [], [])


def test_a_sample_id_names_the_same_triplet_whatever_n():
    """cdns resumes by sample id: growing n must not change the triplets already drawn."""
    small, large = world_triplets(5, seed=3), world_triplets(40, seed=3)
    assert large[:5] == small


def test_sample_ids_name_their_triplets_back():
    a, b = world_triplets(7, seed=3), world_triplets(3, seed=1000)
    assert parse_sample_id(a[6].sample_id) == (3, 6)
    assert triplets_of([a[6].sample_id, b[0].sample_id, a[2].sample_id]) == {
        a[6].sample_id: a[6], b[0].sample_id: b[0], a[2].sample_id: a[2]}
    for bad in ("dreambench-dog-3", "shapes-3", "shapes-x-000001"):
        with pytest.raises(ValueError, match="sample_id: expected 'shapes-<world seed>-<index>'"):
            parse_sample_id(bad)


def test_pair_differences_read_what_separates_a_pair():
    """Positive: its own render. A twin with other fine details in the same context differs in fine only;
    the same subject in another context differs in context only and keeps the reference's details."""
    import numpy as np

    from sfo.shapes.oracle import keeps_reference_details, pair_differences, pair_statistics
    from sfo.shapes.world import Context, Subject, fine_twin, render, render_reference

    subject = Subject("circle", "red", "checks", "white")
    here, there = Context("sand", "left", "small"), Context("night", "right", "large")
    reference, positive = render_reference(subject), render(subject, here)
    twin = fine_twin(subject, np.random.default_rng(0))
    assert (twin.shape, twin.colour) == (subject.shape, subject.colour) and twin != subject
    assert pair_differences(reference, positive, render(twin, here)) == {
        "context": False, "coarse": False, "fine": True, "fine_matches_reference": False}
    assert pair_differences(reference, positive, render(subject, there)) == {
        "context": True, "coarse": False, "fine": False, "fine_matches_reference": True}
    stats = pair_statistics([(reference, positive, render(twin, here)), (reference, positive, render(subject, there))])
    assert stats == {"pairs": 2, "context": 0.5, "coarse": 0.0, "fine": 0.5, "fine_matches_reference": 0.5}
    assert keeps_reference_details(reference, render(subject, there))  # what cdns.oracle_filter drops
    assert not keeps_reference_details(reference, render(twin, here))
