"""The training jobs' data side (``pipelines.train_data``): the seeded shuffle, resuming at a data position,
small Parquet held in memory in file order, and the cache's tensors joined back from the triplets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.config import ConfigError, load_config
from pipelines.train_config import SfoConfig, TrainConfig
from tests.pipelines.train_inputs import SIZE, cached_quadruplets, cached_triplets, sft_config


@pytest.fixture
def ordered(ray_local):
    """Ray Data delivering blocks in order, as the jobs' ingest does (``preserve_order``): a loaded machine may
    otherwise finish the blocks of ``ray.data.range`` out of order, which no seed controls."""
    context = ray_local.data.DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    yield
    context.execution_options.preserve_order = before


def test_shuffle_is_seeded_per_epoch_and_off_at_zero(ordered, tmp_path):
    """Same (seed, epoch, rank): the same order; another epoch or seed: another order; buffer 0: file order."""
    import ray

    from pipelines.train import epoch_rows

    data = ray.data.range(64, override_num_blocks=4)
    cfg = lambda *o: sft_config(tmp_path, "shuffle", str(tmp_path), "train.batch_size=8", *o)  # noqa: E731
    order = lambda c, epoch: [int(i) for rows in epoch_rows(data, c, epoch) for i in rows["id"]]  # noqa: E731
    seeded = cfg("train.shuffle_buffer=64", "train.seed=3")
    first = order(seeded, 0)
    assert sorted(first) == list(range(64)) and first != list(range(64))
    assert order(seeded, 0) == first
    assert order(seeded, 1) != first
    assert order(cfg("train.shuffle_buffer=64", "train.seed=4"), 0) != first
    assert order(cfg("train.shuffle_buffer=0"), 0) == list(range(64))


def test_a_stream_started_at_a_yielded_position_continues_it(ordered, tmp_path):
    """row_batches over 3 epochs of a 5-batch dataset (shuffled): restarting at each position it yields
    gives exactly the rest of the uninterrupted stream (what a checkpoint's data position relies on)."""
    import itertools

    import ray

    from pipelines.train import row_batches

    data = ray.data.range(40, override_num_blocks=4)
    cfg = sft_config(tmp_path, "position", str(tmp_path), "train.batch_size=8", "train.shuffle_buffer=16", "train.seed=5")
    take = lambda position, n: [(pos, [int(i) for i in rows["id"]])  # noqa: E731
                                for pos, rows in itertools.islice(row_batches(data, cfg, 0, position), n)]
    straight = take((0, 0), 15)
    assert [pos for pos, _ in straight] == [(e, o) for e in range(3) for o in range(1, 6)]
    assert [b for _, b in straight[:5]] != [b for _, b in straight[5:10]]  # each epoch its own order
    for k in (1, 4, 5, 7):
        assert take(straight[k - 1][0], 15 - k) == straight[k:]


def test_small_parquet_is_read_once_sorted_by_sample_id_and_large_parquet_streams(ray_local, tmp_path, monkeypatch):
    """``training_dataset``: under ``data.in_memory_mib`` the rows are materialised sorted by ``sample_id`` (several
    files, uneven sizes, rows written out of order as cdns' Ray Data writer may), so every epoch reads the same
    rows in the same order without re-reading the files, however the writer ordered them."""
    from ray.data.dataset import MaterializedDataset

    from pipelines import train_data
    from pipelines.train_data import parquet_mib, training_dataset

    folder = tmp_path / "parts"
    folder.mkdir()
    ids = [f"s-{i:03d}" for i in range(30)]
    written = ids[20:22] + ids[3:12] + ids[:3] + ids[22:] + ids[12:20]
    for k, (lo, hi) in enumerate([(0, 3), (3, 20), (20, 22), (22, 30)]):
        pq.write_table(pa.table({"sample_id": written[lo:hi]}), folder / f"part-{k}.parquet")
    assert parquet_mib(folder) == pytest.approx(sum(f.stat().st_size for f in folder.iterdir()) / 2**20)
    global_order = ray_local.data.DataContext.get_current().execution_options.preserve_order
    small = training_dataset(sft_config(tmp_path, "mem", str(folder)), ["sample_id"])
    assert isinstance(small, MaterializedDataset)
    assert [r["sample_id"] for r in small.take_all()] == ids
    assert [r["sample_id"] for r in small.take_all()] == ids  # a second pass: the same rows, same order
    assert ray_local.data.DataContext.get_current().execution_options.preserve_order == global_order  # untouched
    monkeypatch.setattr(train_data, "BLOCK_MIB", 1e-5)  # ~10 bytes: a block per row or two, still in order
    many = training_dataset(sft_config(tmp_path, "blocks", str(folder)), ["sample_id"])
    assert many.num_blocks() > 10 and [r["sample_id"] for r in many.take_all()] == ids
    streamed = training_dataset(sft_config(tmp_path, "stream", str(folder), "data.in_memory_mib=0"), ["sample_id"])
    assert not isinstance(streamed, MaterializedDataset)
    assert sorted(r["sample_id"] for r in streamed.take_all()) == ids
    with pytest.raises(ConfigError, match=r"data\.in_memory_mib"):
        sft_config(tmp_path, "bad", str(folder), "data.in_memory_mib=-1")


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Cached triplets (prepare, tiny model), quadruplets that kept their tensors, and quadruplets as cdns writes
    them (the cache's small columns only, rows in another order)."""
    root = tmp_path_factory.mktemp("cached")
    triplets = cached_triplets(root / "triplets")
    return {"root": root, "triplets": triplets, "full": cached_quadruplets(triplets, root / "full", True),
            "refs": cached_quadruplets(triplets, root / "refs", False)}


def _sfo(cached: dict, *overrides: str) -> SfoConfig:
    return load_config(SfoConfig, None, [f"data.size={SIZE}", f"output.storage_path={cached['root']}",
                                         f"model.ref_adapter={cached['root']}", *overrides])


def test_the_cache_tensors_are_joined_from_data_cache_path_by_sample_id(ray_local, cached, tiny_flux):
    """The job's dataset of quadruplets without the triplets' tensors, joined with data.cache_path (rows written in
    another order), gives the same rows in the same order and builds the very batch tensors of quadruplets that
    kept them; no encoder is needed."""
    from pipelines.train_data import _columns, build_batch, needs_encoders, training_dataset, use_cache

    full = _sfo(cached, f"data.path={cached['full']}")
    joined = _sfo(cached, f"data.path={cached['refs']}", f"data.cache_path={cached['triplets']}")
    TrainConfig.check_inputs(joined)  # the data's checks pass (there is no ref adapter here)
    assert use_cache(full) and use_cache(joined) and not needs_encoders(joined, True)
    columns = _columns(joined, True)
    kept = training_dataset(full, columns).take_all()
    rows = training_dataset(joined, columns).take_all()
    assert [r["sample_id"] for r in rows] == [r["sample_id"] for r in kept] == sorted(r["sample_id"] for r in kept)
    stack = lambda rs: {k: np.array([r[k] for r in rs], dtype=object) for k in columns}  # noqa: E731
    a, b = build_batch(full, tiny_flux, stack(kept), True), build_batch(joined, tiny_flux, stack(rows), True)
    for x, y in [(a.target, b.target), (a.negative, b.negative), (a.condition.tokens, b.condition.tokens),
                 (a.text.prompt_embeds, b.text.prompt_embeds), (a.text.pooled, b.text.pooled)]:
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_quadruplets_referring_to_the_cache_need_data_cache_path(cached, tmp_path):
    """Without data.cache_path the job stops before any work naming the field and the fix; a data.cache_path
    without the tensors (plain triplets) is refused too."""
    from pipelines.train import main_for
    from tests.pipelines.train_inputs import write_parquet

    cfg = _sfo(cached, f"data.path={cached['refs']}")
    with pytest.raises(ConfigError, match=r"data\.cache_path: .*set data\.cache_path.*data\.cache_path=runs/data/triplets"):
        cfg.check_inputs()
    assert main_for(cfg) == 2
    plain = write_parquet(tmp_path / "plain", 2, False)
    with pytest.raises(ValueError, match=r"data\.cache_path: .* lacks the column\(s\) \['cache_pooled'"):
        _sfo(cached, f"data.path={cached['refs']}", f"data.cache_path={plain}").check_inputs()


def test_cache_path_is_unused_when_the_quadruplets_carry_no_cache(tmp_path, ref_adapter):
    """The chain sets data.cache_path whether prepare cached or not: quadruplets without any cache (the shapes
    world, uncached runs) train from their PNGs, and an uncached triplets folder there is no error."""
    import pyarrow.parquet as pq

    from pipelines.config import load_config
    from pipelines.train_config import SfoConfig
    from pipelines.train_data import joins_cache
    from sfo.records import QUADRUPLET_SCHEMA, TRIPLET_SCHEMA

    for name, schema in (("quadruplets", QUADRUPLET_SCHEMA), ("triplets", TRIPLET_SCHEMA)):
        (tmp_path / name).mkdir()
        pq.write_table(schema.empty_table(), tmp_path / name / "part-0.parquet")
    cfg = load_config(SfoConfig, None, [f"data.path={tmp_path / 'quadruplets'}", f"data.cache_path={tmp_path / 'triplets'}",
                                        f"model.ref_adapter={ref_adapter}"])

    cfg.check_inputs()  # no error: nothing refers to the triplets' tensors
    assert not joins_cache(cfg)
