"""Training from the encoder cache (``prepare``'s ``cache.enabled``): batches built from cached columns equal batches
encoded from the PNGs (SFT, and SFO with the triplets' tensors joined back by sample id), a cache of another size or
model is ignored with a message, and an SFT run from the cache exports the PNG run's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from pipelines.config import load_config
from pipelines.train_config import SfoConfig
from sfo.adapters import LORA_WEIGHTS
from sfo.models import PIPELINE_COMPONENTS
from sfo.records import QUADRUPLET_SCHEMA, TRIPLET_SCHEMA
from tests.pipelines.train_inputs import SIZE, cached_triplets, numpy_rows, sft_config, write_parquet


def test_batch_from_cache_equals_encoding_the_pngs(tmp_path, tiny_flux, capsys):
    from pipelines.train import build_batch, use_cache

    path = cached_triplets(tmp_path / "cached")
    cfg = sft_config(tmp_path, "x", path)
    assert use_cache(cfg) and "using cached" in capsys.readouterr().out
    rows = numpy_rows(path)  # all columns: the PNGs for encode_batch, the cache for batch_from_cache
    cached, encoded = build_batch(cfg, tiny_flux, rows, True), build_batch(cfg, tiny_flux, rows, False)
    for a, b in [(cached.target, encoded.target), (cached.condition.tokens, encoded.condition.tokens),
                 (cached.condition.ids, encoded.condition.ids), (cached.img_ids, encoded.img_ids),
                 (cached.text.prompt_embeds, encoded.text.prompt_embeds), (cached.text.pooled, encoded.text.pooled),
                 (cached.text.txt_ids, encoded.text.txt_ids)]:
        torch.testing.assert_close(a, b)
    assert cached.negative is None and len(cached) == 2


def test_cdns_keeps_the_cache_and_the_sfo_batch_from_it_equals_encoding_the_pngs(tmp_path, tiny_flux, capsys):
    """cdns on cached triplets keeps their cache's small columns and adds the negatives' latents; the sfo batch
    from those columns, with the triplets' tensors joined back by sample id (data.cache_path), equals the batch
    encoded from the PNGs, negative included. A cache of another size is dropped with one line."""
    from pipelines import cdns
    from pipelines.train import build_batch, use_cache
    from pipelines.train_data import cache_index, join_cache
    from sfo.records import CACHE_META_COLUMNS, CACHED_QUADRUPLET_SCHEMA

    triplets = cached_triplets(tmp_path / "cached")
    negatives = tmp_path / "quadruplets"
    common = [f"data.input={triplets}", f"cdns.size={SIZE}", "cdns.steps=2", "runner=local"]
    assert cdns.run(load_config(cdns.CdnsConfig, None, common + [f"data.output={negatives}"]))["written"] == 2
    assert "the cached latents/embeddings fit" in capsys.readouterr().out
    out, source = pq.read_table(negatives), pq.read_table(triplets)
    assert out.schema.equals(CACHED_QUADRUPLET_SCHEMA)  # no tensor columns: they stay in the triplets
    by_id = {r["sample_id"]: r for r in source.to_pylist()}
    assert all(r[c] == by_id[r["sample_id"]][c] for r in out.to_pylist() for c in CACHE_META_COLUMNS)
    cfg = load_config(SfoConfig, None, [f"data.path={negatives}", f"data.size={SIZE}", f"output.storage_path={tmp_path}",
                                        f"model.ref_adapter={tmp_path}", f"data.cache_path={triplets}"])
    assert use_cache(cfg) and "and the negatives' latents" in capsys.readouterr().out
    joined = tmp_path / "joined.parquet"
    pq.write_table(join_cache(out, cache_index(triplets)), joined)
    rows = numpy_rows(str(joined))
    cached, encoded = build_batch(cfg, tiny_flux, rows, True), build_batch(cfg, tiny_flux, rows, False)
    for a, b in [(cached.negative, encoded.negative), (cached.target, encoded.target),
                 (cached.condition.tokens, encoded.condition.tokens), (cached.text.pooled, encoded.text.pooled)]:
        torch.testing.assert_close(a, b)
    other = tmp_path / "other-size"
    cdns.run(load_config(cdns.CdnsConfig, None, [f"data.input={triplets}", "cdns.size=48", "cdns.steps=2", "runner=local",
                                                 f"data.output={other}"]))
    assert "dropping the cached latents/embeddings" in capsys.readouterr().out
    assert pq.read_table(other).schema.equals(QUADRUPLET_SCHEMA)


def test_cache_of_another_size_or_model_is_ignored_with_a_message(tmp_path, capsys):
    from pipelines.train import use_cache

    path = cached_triplets(tmp_path / "cached48", "cache.size=48")
    capsys.readouterr()
    assert not use_cache(sft_config(tmp_path, "x", path))
    out = capsys.readouterr().out
    assert out.count("ignoring them") == 1 and "48" in out and "data.size" in out
    other = cached_triplets(tmp_path / "cached32")
    assert not use_cache(sft_config(tmp_path, "y", other, f"model.source={tmp_path / 'some-flux'}"))
    assert "ignoring them" in capsys.readouterr().out
    assert not use_cache(sft_config(tmp_path, "z", write_parquet(tmp_path / "plain", 2, False)))  # no cache: silent
    assert capsys.readouterr().out == ""


def test_sft_from_cached_columns_equals_sft_from_png(ray_local, tmp_path, capsys):
    """One adamw step on the same 2 rows: the cached run must export the PNG run's weights. Each run prints its
    memory plan once (a CPU run: not checked)."""
    from pipelines.train import run

    cached = cached_triplets(tmp_path / "cached")
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pq.read_table(cached, columns=TRIPLET_SCHEMA.names), plain / "part-0.parquet")
    common = ("train.optimizer=adamw", "train.lr=1e-3", "train.batch_size=2", "train.steps=1")
    runs = [sft_config(tmp_path, name, data, *common) for name, data in (("from-cache", cached), ("from-png", str(plain)))]
    for cfg in runs:
        run(cfg)
    out = capsys.readouterr().out
    assert out.count("[sft] memory plan per GPU: sft, batch 2, checkpointing off, ZeRO-2 x 1") == 2
    assert out.count("(CPU run: not checked") == 2
    a, b = (load_file(Path(c.output.run_dir) / "adapters" / "ref" / LORA_WEIGHTS) for c in runs)
    built = [json.loads((Path(c.output.run_dir) / "summary.json").read_text())["components"] for c in runs]
    assert built == [["scheduler", "transformer"], sorted(PIPELINE_COMPONENTS)]  # cached: no VAE, T5/CLIP, tokenizers
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])
