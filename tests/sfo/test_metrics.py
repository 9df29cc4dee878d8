"""DINO / CLIP-I / CLIP-T identities on tiny random encoders, and the local-folder loading path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sfo.metrics import RANDOM_ENCODERS_NOTE, Scorer, cosine_matrix, mean_reference_similarity


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer.tiny(batch_size=2)  # batch 2 < 3 images: the chunking path runs too


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]


def test_cosine_by_hand():
    """a = (1, 0); b = (0, 1), (1, 1): cosines 0 and 1/sqrt(2); their mean 1/(2 sqrt(2))."""
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(cosine_matrix(a, b), torch.tensor([[0.0, 1 / math.sqrt(2)]]))
    torch.testing.assert_close(mean_reference_similarity(a, b), torch.tensor([1 / (2 * math.sqrt(2))]))


def test_image_against_itself_is_one(scorer, images):
    for metric in (scorer.dino, scorer.clip_i):
        torch.testing.assert_close(metric(images, images[:1])[:1], torch.ones(1), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.stack([metric([im], [im])[0] for im in images]), torch.ones(3), atol=1e-5, rtol=0)


def test_symmetric_bounded_and_mean_over_references(scorer, images):
    a, b, c = images
    for metric in (scorer.dino, scorer.clip_i):
        torch.testing.assert_close(metric([a], [b]), metric([b], [a]))
        both = metric([a], [b, c])
        torch.testing.assert_close(both, (metric([a], [b]) + metric([a], [c])) / 2)
        assert ((both >= -1) & (both <= 1)).all()
    scores = scorer.clip_t(images, ["a red dog", "a cat in the snow", "x"])
    assert scores.shape == (3,) and ((scores >= -1) & (scores <= 1)).all()


def test_batch_equals_one_by_one(scorer, images):
    refs = images[1:]
    for metric in (scorer.dino, scorer.clip_i):
        torch.testing.assert_close(metric(images, refs), torch.cat([metric([im], refs) for im in images]), atol=1e-5, rtol=0)
    texts = ["a red dog", "a cat in the snow wearing a hat", "x"]
    torch.testing.assert_close(scorer.clip_t(images, texts),
                               torch.cat([scorer.clip_t([im], [t]) for im, t in zip(images, texts)]), atol=1e-5, rtol=0)


def test_local_folder_round_trip(scorer, images, tmp_path):
    """save_pretrained -> from_pretrained(local_files_only=True): same scores; random weights stay flagged."""
    scorer.save(tmp_path / "dino", tmp_path / "clip")
    loaded = Scorer.load(tmp_path / "dino", tmp_path / "clip")
    assert loaded.random_encoders and scorer.random_encoders
    torch.testing.assert_close(loaded.dino(images, images[:2]), scorer.dino(images, images[:2]))
    torch.testing.assert_close(loaded.clip_i(images, images[:2]), scorer.clip_i(images, images[:2]))
    torch.testing.assert_close(loaded.clip_t(images, ["a", "b c", "d"]), scorer.clip_t(images, ["a", "b c", "d"]))
    assert RANDOM_ENCODERS_NOTE == "random encoders: not comparable to published numbers"
    with pytest.raises(ValueError, match=r"metrics\.dino: .*no config\.json"):
        Scorer.load(tmp_path / "absent", "tiny")
