import numpy as np

from pipelines.synthetic import synthetic_triplets


def test_synthetic_triplets_are_deterministic_and_well_formed():
    a, b = synthetic_triplets(3, 32, seed=1), synthetic_triplets(3, 32, seed=1)
    assert [t.sample_id for t in a] == [t.sample_id for t in b]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x.target), np.asarray(y.target))
        assert x.item in x.target_text and x.reference.size == (32, 32) and x.reference.mode == "RGB"
        assert x.reference.getpixel((0, 0)) == (255, 255, 255)  # the subject alone on white
    assert synthetic_triplets(3, 32, seed=2)[0].target_text != a[0].target_text or \
        not np.array_equal(np.asarray(synthetic_triplets(3, 32, seed=2)[0].target), np.asarray(a[0].target))
