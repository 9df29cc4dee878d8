"""Reference errors precomputed by the cdns stage (``cdns.score.draws``, ``sfo.records.SCORE_FIELDS``): what
it stores equals what the sfo step would compute, and the sfo job uses them only when they fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import cdns
from pipelines.config import ConfigError, load_config
from pipelines.train_config import SfoConfig
from tests.pipelines.train_inputs import SIZE, write_parquet

DRAWS = 2


def _ref_adapter(folder: Path, seed: int) -> Path:
    """A "ref" LoRA with random weights on the tiny model, as the sft job exports it."""
    from sfo.adapters import REF, REF_RANK, add_lora, save_adapter
    from sfo.models import load_flux

    model = load_flux("tiny", device="cpu")
    add_lora(model.transformer, REF, REF_RANK)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    save_adapter(model.transformer, REF, folder / REF)
    return folder / REF


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    root = tmp_path_factory.mktemp("scores")
    ref = _ref_adapter(root / "adapters", 0)
    triplets = write_parquet(root / "triplets", 3, False)
    out = root / "quadruplets"
    result = cdns.run(load_config(cdns.CdnsConfig, None, [
        f"data.input={triplets}", f"data.output={out}", f"model.ref_adapter={ref}", f"cdns.size={SIZE}", "cdns.steps=2",
        "cdns.batch_size=2", f"cdns.score.draws={DRAWS}", "runner=local"]))
    assert result["written"] == 3
    return root, ref, out


def _sfo(root: Path, data: Path, ref: Path, *overrides: str) -> SfoConfig:
    return load_config(SfoConfig, None, [f"data.path={data}", f"data.size={SIZE}", f"model.ref_adapter={ref}",
                                         f"output.storage_path={root}", *overrides])


def test_stored_errors_equal_the_reference_pass_of_the_sfo_step(scored, tiny_flux):
    from pipelines.train_data import build_batch, stored_draws
    from sfo.adapters import REF, load_adapter, use_adapters
    from sfo.objectives import reference_errors

    root, ref, out = scored
    table = pq.read_table(out)
    assert all(len(r["score_t"]) == DRAWS and len(set(r["score_seeds"])) == DRAWS for r in table.to_pylist())
    rows = {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}
    cfg = _sfo(root, out, ref)
    load_adapter(tiny_flux.transformer, str(ref), REF)
    try:
        batch = build_batch(cfg, tiny_flux, rows, False)  # the batch the sfo job builds from these rows
        draws = []
        for epoch in range(DRAWS + 1):
            t, noise, (pos, neg) = stored_draws(cfg, rows, epoch, tuple(batch.target.shape[1:]))
            with use_adapters(tiny_flux.transformer, [REF]):
                live_pos, live_neg = reference_errors(tiny_flux.transformer, batch, t, noise)
            torch.testing.assert_close(pos, live_pos, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(neg, live_neg, rtol=1e-4, atol=1e-6)
            draws.append(t)
        assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[DRAWS])  # draw = epoch mod K
    finally:
        tiny_flux.transformer.delete_adapters(REF)


def test_the_sfo_job_uses_them_only_when_they_fit(scored, tmp_path, capsys):
    from pipelines.train_data import _columns, use_scores
    from sfo.records import SCORE_COLUMNS

    root, ref, out = scored
    capsys.readouterr()
    cfg = _sfo(root, out, ref)
    assert use_scores(cfg) and "using the stored reference errors" in capsys.readouterr().out
    assert set(SCORE_COLUMNS) <= set(_columns(cfg, scored=True))
    other = _ref_adapter(tmp_path / "other", 1)
    for misfit in (_sfo(root, out, other), _sfo(root, out, ref, "sfo.scheme=uniform"), _sfo(root, out, ref, "data.size=48")):
        assert not use_scores(misfit)
        assert "running the reference pass" in capsys.readouterr().out
    assert not use_scores(_sfo(root, out, ref, "sfo.variant=sft-additional"))
    assert not use_scores(_sfo(root, Path(write_parquet(tmp_path / "plain", 2, True)), ref))  # no scores: silent
    assert "running the reference pass" not in capsys.readouterr().out


def test_draws_need_the_ref_adapter(tmp_path):
    with pytest.raises(ConfigError, match="cdns.score.draws"):
        load_config(cdns.CdnsConfig, None, [f"data.input={tmp_path}", "cdns.score.draws=2"])
    with pytest.raises(ConfigError, match="cdns.score.draws"):
        load_config(cdns.CdnsConfig, None, ["cdns.score.draws=-1"])


def test_the_sfo_job_trains_on_stored_errors(scored, ray_local, tmp_path, capsys):
    """The job end to end on Ray Train with the stored errors: it says so, trains, and its first step (policy =
    reference, "sfo" B = 0) has Eq. 3's loss log 2, which the stored errors reproduce."""
    import json
    import math

    from pipelines.train import run

    root, ref, out = scored
    cfg = _sfo(tmp_path, out, ref, "train.steps=2", "train.batch_size=2", "output.name=scored")
    run(cfg)
    assert "using the stored reference errors" in capsys.readouterr().out
    log = [json.loads(line) for line in (Path(cfg.output.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [1, 2]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and log[0]["positive_rise"] == pytest.approx(0, abs=1e-5)
