"""The model side without Ray: adapters load from safetensors, A/B differs, batching changes nothing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.generator import Generator, group_jobs
from serving.schema import Job
from tests.serving.test_schema import png


def job(seeds=(1,), adapter="sfo", side=32, steps=2, prompt="a red cube") -> Job:
    return Job(prompt=prompt, image=png(48, 40), steps=steps, guidance=3.5, seeds=tuple(seeds),
               width=side, height=side, adapter=adapter)


def test_group_jobs_by_key_and_size():
    jobs = [job((1,)), job((2,), adapter="ref"), job((3, 4)), job((5,), side=64), job((6, 7, 8)), job((9,))]
    groups = list(group_jobs(jobs, max_samples=3))
    assert groups == [[0, 2], [4], [5], [1], [3]]
    assert list(group_jobs([job((1, 2, 3, 4))], max_samples=2)) == [[0]]  # never split a request


@pytest.fixture(scope="module")
def generator(adapters_dir):
    return Generator("tiny", str(adapters_dir), device="cpu")


def test_info_fingerprints(generator):
    info = generator.info
    assert info["base_model"] == "tiny"
    assert info["adapters"]["sfo"]["loras"] == ["ref", "sfo"]
    assert len(info["adapters"]["sfo"]["sha256"]) == 64
    assert info["adapters"]["sfo"]["sha256"] != info["adapters"]["ref"]["sha256"]


def _pixels(pngs: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(b)), dtype=np.int16) for b in pngs])


def test_batched_equals_alone_and_adapters_differ(generator):
    a, b = job((11,)), job((12, 13), prompt="a blue cube")
    together = generator.run([a, job((11,), adapter="ref"), b])
    # The same image batched or alone: each sample draws its own noise. CPU matmuls block
    # differently for batches of 3 and 2, so a pixel may round a level or two apart (seen once, in a full run).
    assert np.abs(_pixels(together[0]) - _pixels(generator.run([a])[0])).max() <= 2
    assert np.abs(_pixels(together[2]) - _pixels(generator.run([b])[0])).max() <= 2
    assert together[0] != together[1]  # "sfo" vs "ref" on the same seed
    assert len(set(together[2])) == 2


def test_folded_adapters_serve_the_images_of_the_lora_layers(generator, adapters_dir):
    """The default folds the adapters into the weights per call; fuse_adapters=False applies them as LoRA
    layers: the same images to a PNG level, and the model's weights as they were afterwards."""
    import torch

    layered = Generator("tiny", str(adapters_dir), device="cpu", fuse_adapters=False)
    weights = {n: p.detach().clone() for n, p in generator.model.transformer.named_parameters()}
    jobs = [job((21, 22)), job((21,), adapter="ref")]
    folded, plain = generator.run(jobs), layered.run(jobs)
    for a, b in zip(folded, plain):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
    assert all(torch.equal(p, weights[n]) for n, p in generator.model.transformer.named_parameters())


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="ref/"):
        Generator("tiny", str(tmp_path), device="cpu")


def test_image_guidance_is_served_and_keeps_its_own_batch(generator):
    from dataclasses import replace

    plain, guided = job((21,)), replace(job((21,)), image_guidance=2.0)
    assert plain.batch_key != guided.batch_key  # different sampler settings never share a call
    out = generator.run([plain, guided])
    assert out[0] != out[1]
    assert np.abs(_pixels(out[1]) - _pixels(generator.run([guided])[0])).max() <= 2


def test_should_stop_ends_sampling_between_steps(generator):
    """``should_stop`` is asked after every step (the sampler's progress callback): true at the 3rd question
    of a 1000-step job raises ``Stopped`` after 3 steps, not 1000."""
    from serving.generator import Stopped

    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= 3

    with pytest.raises(Stopped):
        generator.run([job((1,), steps=1000)], stop)
    assert len(asked) == 3  # the group check, then steps 1 and 2: sampling stopped after step 2 of 1000
    assert generator.run([job((1,))], lambda: False) == generator.run([job((1,))])  # never true: unchanged


def test_folding_is_off_by_default_above_the_size_threshold(adapters_dir, monkeypatch):
    """fuse_adapters=None folds the tiny model (well under 1B parameters) and not a model over the threshold."""
    import serving.generator as module

    assert Generator("tiny", str(adapters_dir), device="cpu").fuse_adapters is True
    monkeypatch.setattr(module, "FOLD_MAX_PARAMS", 1000)
    assert Generator("tiny", str(adapters_dir), device="cpu").fuse_adapters is False
    assert Generator("tiny", str(adapters_dir), device="cpu", fuse_adapters=True).fuse_adapters is True


def test_adapter_sets_load_beside_the_default_and_unload(generator, adapters_dir):
    """Set "alt" (the same files) loads under its own names, serves the default set's images, and unloads."""
    from dataclasses import replace

    from sfo.adapters import adapter_names

    generator.load_set("alt", str(adapters_dir))
    try:
        assert {"alt--ref", "alt--sfo"} <= set(adapter_names(generator.model.transformer))
        plain = job((31,))
        out = generator.run([plain, replace(plain, adapter_set="alt")])
        assert np.abs(_pixels(out[0]) - _pixels(out[1])).max() <= 1
    finally:
        generator.unload_set("alt")
    assert not {"alt--ref", "alt--sfo"} & set(adapter_names(generator.model.transformer))
    assert set(generator.adapter_sets) == {"default"}
