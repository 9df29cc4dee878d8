"""The sft and sfo jobs reading their data from and writing their run folders to S3 (moto's server): Ray Train's
checkpoints, metrics.jsonl, summary.json and the adapters land in the bucket, and nothing under the working
directory. The data are cached (the sfo quadruplets as cdns writes them: the triplets' tensors joined back from
``data.cache_path``), so both jobs load the transformer alone."""

from __future__ import annotations

import json
import os


from cluster import storage
from pipelines.config import load_config
from pipelines.train_config import SfoConfig
from sfo.adapters import LORA_WEIGHTS
from tests.pipelines.test_train import SIZE, _cached_quadruplets, _cached_triplets, _sft

TRANSFORMER_ONLY = ["scheduler", "transformer"]


def test_sft_then_sfo_on_s3_write_nothing_locally_and_their_adapters_load(ray_local, s3_bucket, tmp_path,
                                                                          monkeypatch):
    from pipelines.train import run
    from sfo.models import load_flux

    triplets = _cached_triplets(tmp_path / "made" / "triplets")
    quadruplets = _cached_quadruplets(triplets, tmp_path / "made" / "quadruplets", tensors=False)
    data = storage.join(s3_bucket, "data")
    for name, folder in (("triplets", triplets), ("quadruplets", quadruplets)):
        storage.upload_folder(folder, storage.join(data, name))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    runs = storage.join(s3_bucket, "runs")

    sft = _sft(runs, "sft", storage.join(data, "triplets"), "train.checkpoint_every=1")
    assert sft.output.run_dir == f"{s3_bucket}/runs/sft"
    assert run(sft).metrics["step"] == 2
    sfo = load_config(SfoConfig, None, [
        f"data.path={storage.join(data, 'quadruplets')}", f"data.cache_path={storage.join(data, 'triplets')}",
        f"data.size={SIZE}", "train.steps=2", "train.optimizer=adamw", "train.lr=1e-3",
        f"model.ref_adapter={storage.join(sft.output.run_dir, 'adapters', 'ref')}", f"output.storage_path={runs}",
        "output.name=sfo"])  # named: an output.* override alone builds OutputConfig() (name "sft")
    assert run(sfo).metrics["step"] == 2

    for cfg, adapters in ((sft, ["ref"]), (sfo, ["ref", "sfo"])):
        files = storage.list_files(cfg.output.run_dir)
        names = {f[len(cfg.output.run_dir) + 1:] for f in files}
        assert {"metrics.jsonl", "summary.json"} | {f"adapters/{a}/{LORA_WEIGHTS}" for a in adapters} <= names
        assert any(n.startswith("checkpoint_00000002/") for n in names), sorted(names)
        lines = [json.loads(line) for line in storage.read_text(storage.join(cfg.output.run_dir, "metrics.jsonl"))
                 .splitlines()]
        assert [line["step"] for line in lines] == [1, 2] and {line["attempt"] for line in lines} == {1}
        summary = storage.read_json(storage.join(cfg.output.run_dir, "summary.json"))
        assert summary["adapters"] == adapters and summary["components"] == TRANSFORMER_ONLY  # cached: no encoders
    assert any(n.startswith("checkpoint_00000001/") for n in (f[len(sft.output.run_dir) + 1:]
                                                             for f in storage.list_files(sft.output.run_dir)))
    assert sorted(os.listdir(cwd)) == []  # nothing under the working directory

    pipe = load_flux("tiny", device="cpu").pipe
    for name in ("ref", "sfo"):
        with storage.local_copy(storage.join(sfo.output.run_dir, "adapters", name)) as folder:
            pipe.load_lora_weights(str(folder), adapter_name=name)
    assert set(pipe.transformer.peft_config) == {"ref", "sfo"}
    assert sorted(os.listdir(cwd)) == []
