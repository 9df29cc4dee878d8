"""The sft and sfo Ray Train jobs end to end on the tiny FLUX at 32 px (DeepSpeed ZeRO on CPU, gloo).

One Ray session for all (``ray_local``); each Ray Train run pays ~10-20 s of worker imports, so
the runs are shared through module-scoped fixtures: SFT (1 worker, ZeRO-3, Prodigy) -> SFO (2 workers, ZeRO-2,
2 steps, then resumed to 4 steps), and two short SFT runs for the layout invariance.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.config import ConfigError, load_config
from pipelines.train_config import SfoConfig, SftConfig
from sfo.adapters import LORA_WEIGHTS
from sfo.models import PIPELINE_COMPONENTS
from tests.pipelines.train_inputs import SIZE, sft_config, write_parquet

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
ROWS = 8  # 4 steps x 2 workers fit in one epoch: each epoch restarts Ray Data (seconds)


def _steps(run_dir: str | Path) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    return {"triplets": write_parquet(root / "triplets", ROWS, False),
            "pair": write_parquet(root / "pair", 2, False),
            "quadruplets": write_parquet(root / "quadruplets", ROWS, True)}


@pytest.fixture(scope="module")
def sft_run(ray_local, data, tmp_path_factory):
    from pipelines.train import run

    cfg = sft_config(tmp_path_factory.mktemp("sft"), "sft", data["triplets"], "deepspeed.zero_stage=3")  # export gathers
    result = run(cfg)
    return cfg, result


@pytest.fixture(scope="module")
def sfo_run(sft_run, data, tmp_path_factory):
    """SFO with 2 workers under ZeRO-2 (adamw: Prodigy is refused for sharded CPU runs)."""
    from pipelines.train import run

    sft_cfg, _ = sft_run
    # relative to this process's working directory, as sfo.yaml's default: the workers start in another one
    ref = os.path.relpath(Path(sft_cfg.output.run_dir) / "adapters" / "ref")
    cfg = load_config(SfoConfig, None, [
        f"data.path={data['quadruplets']}", f"data.size={SIZE}", "train.steps=2",
        f"model.ref_adapter={ref}", "train.optimizer=adamw", "train.lr=1e-3",
        "scaling.num_workers=2", "deepspeed.zero_stage=2", f"output.storage_path={tmp_path_factory.mktemp('sfo')}"])
    result = run(cfg)
    return cfg, result


def test_sft_exports_ref_and_keeps_base_frozen(sft_run):
    cfg, result = sft_run
    summary = json.loads((Path(cfg.output.run_dir) / "summary.json").read_text())
    assert summary["frozen_sha256_before"] == summary["frozen_sha256_after"]
    assert summary["components"] == sorted(PIPELINE_COMPONENTS)  # PNG rows: the encoders are loaded
    assert _steps(cfg.output.run_dir) == [1, 2]
    assert result.metrics["step"] == 2 and result.metrics["loss"] > 0
    ref = load_file(Path(cfg.output.run_dir) / "adapters" / "ref" / LORA_WEIGHTS)
    assert ref and all(v.numel() > 0 for v in ref.values())  # ZeRO-3 placeholders are empty unless gathered
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in ref.items())  # B starts at 0


def test_sfo_two_workers_zero2_trains_sfo_only_and_loads_in_diffusers(sfo_run, sft_run):
    from sfo.models import load_flux

    cfg, result = sfo_run
    adapters = Path(cfg.output.run_dir) / "adapters"
    summary = json.loads((Path(cfg.output.run_dir) / "summary.json").read_text())
    assert summary["adapters"] == ["ref", "sfo"]
    assert summary["frozen_sha256_before"] == summary["frozen_sha256_after"]  # base + "ref" untouched
    ref_in = load_file(Path(sft_run[0].output.run_dir) / "adapters" / "ref" / LORA_WEIGHTS)
    ref_out = load_file(adapters / "ref" / LORA_WEIGHTS)
    assert ref_in.keys() == ref_out.keys() and all(torch.equal(ref_in[k], ref_out[k]) for k in ref_in)
    sfo = load_file(adapters / "sfo" / LORA_WEIGHTS)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in sfo.items())  # B started at 0
    for key in ("loss", "implicit_accuracy", "reward_margin", "positive_rise", "negative_rise", "grad_norm", "step_time",
                "samples_per_s", "step"):
        assert isinstance(result.metrics[key], (int, float)), key
    assert result.metrics["positive_rise"] != 0.0  # step 2 runs after step 1 moved "sfo" (B started at 0) away from ref

    pipe = load_flux("tiny", device="cpu").pipe
    pipe.load_lora_weights(str(adapters / "ref"), adapter_name="ref")
    pipe.load_lora_weights(str(adapters / "sfo"), adapter_name="sfo")
    assert set(pipe.transformer.peft_config) == {"ref", "sfo"}


def test_sfo_resume_continues_step_count(sfo_run):
    from pipelines.train import run

    cfg, _ = sfo_run
    cfg.train.steps = 4
    result = run(cfg)
    assert _steps(cfg.output.run_dir) == [1, 2, 3, 4]
    lines = [json.loads(line) for line in (Path(cfg.output.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [line["attempt"] for line in lines] == [1, 1, 2, 2] and all(line["time"] > 0 for line in lines)
    assert result.metrics["step"] == 4 and "attempt" not in result.metrics
    # the resume continued the data where step 2 left it (mid-epoch): steps 3-4 equal an uninterrupted run's
    straight = copy.deepcopy(cfg)
    straight.output.name += "-straight"
    run(straight)
    again = [json.loads(line) for line in (Path(straight.output.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in again] == pytest.approx([line["loss"] for line in lines], rel=1e-5)


def test_one_worker_accum2_equals_two_workers_accum1(ray_local, data, tmp_path):
    """Same 2 samples per step, same per-sample noise (seeded by sample id): same adamw update."""
    from pipelines.train import run

    common = ("train.optimizer=adamw", "train.lr=1e-3", "train.weight_decay=0", "train.batch_size=1")
    one = sft_config(tmp_path, "one", data["pair"], *common, "train.grad_accum=2")
    two = sft_config(tmp_path, "two", data["pair"], *common, "scaling.num_workers=2")
    run(one)
    run(two)
    log_one, log_two = ([json.loads(line) for line in (Path(c.output.run_dir) / "metrics.jsonl").read_text().splitlines()]
                        for c in (one, two))
    for a, b in zip(log_one, log_two, strict=True):  # the averaged gradient itself, not only Adam's sign-like step
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    a = load_file(Path(one.output.run_dir) / "adapters" / "ref" / LORA_WEIGHTS)
    b = load_file(Path(two.output.run_dir) / "adapters" / "ref" / LORA_WEIGHTS)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)



@pytest.mark.parametrize("override, field", [
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("sfo.variant=bogus", "sfo.variant"),
    ("deepspeed.zero_stage=1", "deepspeed.zero_stage"),
    ("train.report_every=0", "train.report_every"),
    ("train.report_interval_s=-1", "train.report_interval_s"),
    ("data.path=", "data.path"),
    ("scaling.num_workers=2", "train.optimizer"),  # prodigy + ZeRO sharding on CPU is refused
])
def test_bad_configs_fail_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(SfoConfig, CONFIGS / "sfo.yaml", [override])


def test_the_workers_get_absolute_folders(tmp_path, monkeypatch):
    from pipelines.train import for_workers

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ref").mkdir()
    cfg = for_workers(load_config(SftConfig, None, ["model.source=tiny", "model.ref_adapter=ref"]))
    assert cfg.model.ref_adapter == str(tmp_path / "ref") and cfg.model.source == "tiny"  # a preset name stays
    (tmp_path / "flux").mkdir()
    assert for_workers(load_config(SftConfig, None, ["model.source=flux"])).model.source == str(tmp_path / "flux")
    assert for_workers(load_config(SftConfig, None, [])).model.ref_adapter is None


def test_missing_data_path_fails_before_ray(tmp_path):
    from pipelines.train import main_for

    cfg = load_config(SftConfig, CONFIGS / "sft.yaml", [f"data.path={tmp_path / 'nope'}"])
    assert main_for(cfg) == 2


@pytest.mark.parametrize("module", ["pipelines.sft", "pipelines.sfo"])
def test_help(module):
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--help"])
    assert exc.value.code == 0


@pytest.mark.parametrize("cls, path", [(SftConfig, CONFIGS / "sft.yaml"), (SfoConfig, CONFIGS / "sfo.yaml")])
def test_yaml_loads(cls, path):
    assert load_config(cls, path).train.steps >= 1


def test_cpu_training_never_compiles_deepspeeds_shared_memory_op():
    """init_distributed on CPU would JIT-compile deepspeed_shm_comm (minutes of C++, and a lock that hangs
    later jobs when a compile is cut short); the train loop marks it unavailable first."""
    import importlib

    from pipelines.train import disable_cpu_shm_comm

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `import deepspeed.comm.torch` names plain torch
    disable_cpu_shm_comm()
    assert ds_torch.build_shm_op() is None
    assert SftConfig(data=SftConfig().data).deepspeed.cpu_shm_comm is False


def test_metrics_log_keeps_each_step_once_across_attempts(tmp_path):
    """Attempt 1 logged steps 1-5 and died after checkpoint 3 (plus a half-written line): a restart at 3
    keeps 1-3 and is attempt 2; a retry that found no checkpoint (start 0) empties the log and is still
    counted as the next attempt; a run with no log is attempt 1."""
    from pipelines.train import start_metrics_log

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "attempt": 1}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert start_metrics_log(log, 3) == 2
    assert _steps(tmp_path) == [1, 2, 3]
    with open(log, "a") as f:
        f.write(json.dumps({"step": 4, "attempt": 2}) + "\n")
    assert start_metrics_log(log, 4) == 3 and _steps(tmp_path) == [1, 2, 3, 4]
    assert start_metrics_log(log, 0) == 3 and log.read_text() == ""
    assert start_metrics_log(tmp_path / "fresh" / "metrics.jsonl", 0) == 1


def test_reports_are_due_every_n_steps_but_never_sooner_than_the_interval():
    from pipelines.train import ReportCadence

    now = [0.0]
    cadence = ReportCadence(every=2, interval_s=2.0, clock=lambda: now[0])
    assert not cadence.due(1)  # not a multiple of every
    assert cadence.due(2)  # nothing reported yet: due at once
    cadence.reported()
    now[0] = 1.9
    assert not cadence.due(4)  # the controller has not polled since: it would block
    now[0] = 2.0
    assert cadence.due(4) and not cadence.due(5)
    cadence.reported()
    now[0] = 100.0
    assert cadence.due(6)
    assert all(ReportCadence(every=1, interval_s=0.0, clock=lambda: 0.0).due(step) for step in range(1, 5))


def test_zero3_is_refused_on_gpus_with_the_reason():
    """The frozen base is loaded whole on every GPU (no zero.Init): stage 3 would shard nothing of it."""
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage: 3 shards nothing of the frozen base.*zero_stage=2"):
        load_config(SfoConfig, CONFIGS / "sfo.yaml", ["scaling.use_gpu=true", "deepspeed.zero_stage=3"])
    load_config(SfoConfig, CONFIGS / "sfo.yaml", ["scaling.use_gpu=true", "deepspeed.zero_stage=2"])
    load_config(SftConfig, CONFIGS / "sft.yaml", ["deepspeed.zero_stage=3"])  # the CPU runs keep it (tests use it)


def _no_loading(monkeypatch) -> None:
    import sfo.models
    from pipelines import train

    def must_not_run(*args, **kwargs):
        raise AssertionError("the job went past its memory check")

    monkeypatch.setattr(sfo.models, "load_flux", must_not_run)
    monkeypatch.setattr(train, "init_ray", must_not_run)


def test_a_plan_above_the_gpus_memory_is_refused_naming_the_knob_before_anything_loads(data, tmp_path, monkeypatch,
                                                                                        capsys):
    from types import SimpleNamespace

    from pipelines import train
    from sfo.memory import GIB

    _no_loading(monkeypatch)
    cfg = sft_config(tmp_path, "big", data["triplets"], "data.size=64", "train.batch_size=4", "scaling.use_gpu=true")
    plan = train.plan_memory(cfg)
    assert plan.knobs["batch_size"] == 4 and not plan.knobs["gradient_checkpointing"] and plan.total > plan.weights
    small = int((plan.weights + plan.trainable) / 0.9) + 1  # the weights fit, the activations do not
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the driver's GPU, made small
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=small, name="Tiny GPU"))
    assert train.main_for(cfg) == 2
    captured = capsys.readouterr()
    assert "[sft] memory plan per GPU: sft, batch 4, checkpointing off" in captured.out
    assert "set train.gradient_checkpointing=true" in captured.err and "this driver's Tiny GPU" in captured.err
    with pytest.raises(ConfigError, match=r"lower train\.batch_size \(now 4"):  # checkpointing on: the batch is next
        train.run(sft_config(tmp_path, "big", data["triplets"], "data.size=64", "train.batch_size=4", "scaling.use_gpu=true",
                       "train.gradient_checkpointing=true", f"scaling.gpu_memory_gib={small / GIB / 1.5}"))


def test_a_driver_without_a_gpu_skips_the_check_and_says_how_to_have_it(data, tmp_path, monkeypatch, capsys):
    from pipelines import train

    _no_loading(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AssertionError, match="went past its memory check"):  # reached init_ray: nothing refused
        train.run(sft_config(tmp_path, "joined", data["triplets"], "scaling.use_gpu=true"))
    assert "not checked: this driver has no GPU" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="went past its memory check"):
        train.run(sft_config(tmp_path, "joined", data["triplets"], "scaling.use_gpu=true", "scaling.gpu_memory_gib=80"))
    assert "memory plan fits scaling.gpu_memory_gib=80" in capsys.readouterr().out
