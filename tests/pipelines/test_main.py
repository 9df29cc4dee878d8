"""The main job: every stage end to end on a local Ray (tiny model, minimal sizes)."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipelines import main as main_job
from pipelines import main_configs
from sfo.models import load_flux

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = ["--model", "tiny", "--samples", "2", "--size", "32", "--sft-steps", "1", "--sfo-steps", "1", "--sample-steps", "2",
           "--eval-subjects", "1", "--eval-seeds", "1"]


@pytest.mark.slow
def test_main_job_runs_every_stage(ray_local, tmp_path, capsys):
    out = tmp_path / "run"
    assert main_job.main(["--out", str(out), *MINIMAL]) == 0
    printed = capsys.readouterr().out
    stages = ["prepare", "sft", "cdns", "pair_analysis", "sfo", "evaluate", "serve", "report"]
    for index, stage in enumerate(stages, 1):
        assert f"[{index}/{len(stages)}] {stage} done" in printed
    for job in ("[sft] memory plan per GPU: sft", "[cdns] memory plan per GPU: sample", "[sfo] memory plan per GPU: sfo"):
        assert printed.count(job) == 1, job
    assert Image.open(out / "served.png").size == (32, 32)
    report = (out / "report.html").read_text()
    assert "<h2>CDNS pair gap" in report and "random encoders: not comparable" in report
    assert report.count("<img") == 1 * (1 + 3) + 1  # one subject x (reference, base, sft, sfo), the served image
    pipe = load_flux("tiny", device="cpu").pipe  # the exported adapters load with plain diffusers
    for name in ("ref", "sfo"):
        pipe.load_lora_weights(str(out / "train" / "sfo" / "adapters" / name), adapter_name=name)
    assert set(pipe.transformer.peft_config) == {"ref", "sfo"}


@pytest.mark.slow
def test_main_job_runs_the_shapes_world_by_default(shapes_pretrained, ray_local, tmp_path, capsys):
    out = tmp_path / "run"
    assert main_job.main(["--out", str(out), "--samples", "2", "--pretrain-steps", "2", "--sft-steps", "1",
                          "--sfo-steps", "1", "--sample-steps", "2", "--eval-subjects", "1", "--eval-seeds", "1"]) == 0
    printed = capsys.readouterr().out
    stages = ["pretrain", "prepare", "sft", "cdns", "pair_analysis", "sfo", "evaluate", "serve", "report"]
    for index, stage in enumerate(stages, 1):
        assert f"[{index}/{len(stages)}] {stage} done" in printed
    assert "already holds the shapes model" in printed  # cached by the fixture: not pretrained again
    assert "no shipped SFT base matches the model in use" in printed  # so the SFT base is trained
    assert Image.open(out / "served.png").size == (32, 32)
    report = (out / "report.html").read_text()
    assert "Shapes-world oracles" in report and "random encoders" not in report
    assert "Too few subjects (1, 1 paired images) to compare sfo with sft" in report  # one subject: no standard error
    assert "POST /v1/generate with prompt=" in report  # the served image is captioned
    picked = "Where SFO and SFT disagree (picked)" in report  # the one cell again, if their verdicts differ
    # one triplet x (reference, base, sft, sfo) [twice when picked], the served image
    assert report.count("<img") == (1 + picked) * (1 + 3) + 1
    assert report.count("subject &#1") == 3 * (1 + picked)  # each generated image with its oracle verdicts
    # sft loss, sfo loss, sfo accuracy, the policy's error rise on positives and on negatives
    assert "Training curves" in report and report.count("<polyline") == 5
    summary = json.loads((out / "evaluate" / "summary.json").read_text())
    assert set(summary) == {"base", "sft", "sfo"} and summary["base"]["images"] == summary["sft"]["images"] == 1
    _the_printed_serve_command_answers_a_request(printed, out)


def _the_printed_serve_command_answers_a_request(printed: str, out: Path) -> None:
    """Runs the `serve run ...` line the demo printed, verbatim, and sends it one request."""
    import base64
    import os
    import shlex
    import signal
    import time

    import httpx
    import pyarrow.parquet as pq
    import yaml

    command = next(line.strip() for line in printed.splitlines() if " run --address local " in line)
    config = yaml.safe_load((out / "serve_config.yaml").read_text())
    assert config["applications"][0]["args"]["model"] == "shapes"
    assert config["applications"][0]["args"]["adapters"] == str((out / "train" / "sfo" / "adapters").resolve())
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    row = pq.read_table(out / "data" / "triplets").slice(0, 1).to_pylist()[0]
    process = subprocess.Popen(shlex.split(command), start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert process.poll() is None, "serve run exited"
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        body = {"prompt": row["target_text"], "image": base64.b64encode(row["reference_png"]).decode(), "steps": 2,
                "seed": 0}
        response = httpx.post(f"{url}/v1/generate", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert Image.open(io.BytesIO(response.content)).size == (32, 32)  # the run's size is the default
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_a_failed_stage_stops_the_run_with_its_error(ray_local, tmp_path, capsys, monkeypatch):
    from pipelines import prepare, train

    def broken(config):
        raise RuntimeError("disk full")

    def must_not_run(config):
        raise AssertionError("a stage after the failed one ran")

    monkeypatch.setattr(prepare, "run", broken)
    monkeypatch.setattr(train, "run", must_not_run)
    assert main_job.main(["--out", str(tmp_path / "run"), *MINIMAL]) == 1
    captured = capsys.readouterr()
    assert "[1/8] prepare FAILED" in captured.out and "disk full" in captured.err


def test_help_and_bad_flags(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipelines.main", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "--sfo-steps" in result.stdout
    for bad in (["--size", "64"], ["--model", "tiny", "--size", "40"], ["--samples", "0"], ["--model", str(tmp_path / "nope")], ["--out", str(tmp_path)]):
        with pytest.raises(SystemExit):
            main_job.parse_args(bad)


def test_the_demo_uses_the_world_settings_the_readme_documents(tmp_path):
    """The shapes demo's CDNS blurs with the world's radius and samples with the paper's 28 steps, as
    README's shapes-world section and the reproduction do."""
    from experiments import reproduce
    from sfo.shapes.world import CDNS_BLUR_RADIUS

    args = main_job.parse_args(["--out", str(tmp_path / "run")])
    configs = main_configs.stage_configs(args, tmp_path / "run")
    assert configs["cdns"].cdns.blur_radius == CDNS_BLUR_RADIUS == reproduce.CDNS_RADIUS == 2.0
    assert configs["cdns"].cdns.steps == configs["evaluate"].eval.steps == 28
    assert f"radius {CDNS_BLUR_RADIUS:g}" in (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_world_preset_is_the_shapes_default_and_paper_one_flag_away(tmp_path):
    configs = main_configs.stage_configs(main_job.parse_args(["--out", str(tmp_path / "a")]), tmp_path / "a")
    assert configs["sfo"].lora.scope == "condition" and configs["sft"].lora.scope == "all"
    paper = main_configs.stage_configs(main_job.parse_args(["--out", str(tmp_path / "b"), "--preset", "paper"]), tmp_path / "b")
    assert paper["sfo"].lora.scope == "all"
    assert main_job.parse_args(["--model", "tiny", "--out", str(tmp_path / "c")]).preset == "paper"


def test_the_base_row_is_evaluated_on_the_first_subjects_only(tmp_path):
    args = main_job.parse_args(["--out", str(tmp_path / "a"), "--eval-subjects", "100", "--base-subjects", "10"])
    assert main_configs.stage_configs(args, tmp_path / "a")["evaluate"].eval.base_subjects == 10
    few = main_job.parse_args(["--out", str(tmp_path / "b"), "--eval-subjects", "8"])  # default 64: capped at 8
    assert main_configs.stage_configs(few, tmp_path / "b")["evaluate"].eval.base_subjects == 8


def test_the_world_seed_picks_the_training_triplets_and_never_the_held_out_cells(tmp_path):
    configs = main_configs.stage_configs(main_job.parse_args(["--out", str(tmp_path / "a"), "--world-seed", "5000"]), tmp_path / "a")
    assert configs["prepare"].data.seed == 5000 and configs["evaluate"].eval.seed == 1000
    default = main_configs.stage_configs(main_job.parse_args(["--out", str(tmp_path / "b")]), tmp_path / "b")
    assert default["prepare"].data.seed == 0
    with pytest.raises(ValueError, match="--world-seed 1000: the evaluation's held-out cells"):
        main_configs.stage_configs(main_job.parse_args(["--out", str(tmp_path / "c"), "--world-seed", "1000"]), tmp_path / "c")
    with pytest.raises(SystemExit):
        main_job.parse_args(["--model", "tiny", "--world-seed", "5"])


def test_the_sampling_mode_reaches_the_evaluation(tmp_path):
    args = main_job.parse_args(["--out", str(tmp_path / "a"), "--mode", "decoupled", "--switch", "0.5"])
    sampling = main_configs.stage_configs(args, tmp_path / "a")["evaluate"].eval.sampling
    assert (sampling.mode, sampling.switch) == ("decoupled", 0.5)
    default = main_configs.stage_configs(main_job.parse_args(["--out", str(tmp_path / "b")]), tmp_path / "b")
    assert default["evaluate"].eval.sampling.mode == "standard" and default["cdns"].cdns.sampling.mode == "standard"
    for bad in (["--mode", "fancy"], ["--switch", "0"], ["--switch", "1.5"]):
        with pytest.raises(SystemExit):
            main_job.parse_args(bad)


def _gpus_visible(monkeypatch, count: int) -> None:
    """This process sees ``count`` GPUs (torch.cuda's answers only: nothing is put on a device)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _flux_folder(root: Path) -> Path:
    """A folder that passes ``sfo.models.check_flux_folder`` (empty weight files) with the shared FLUX.1 layout's
    configs; skips when the shared layout is absent."""
    import shutil

    from tests.conftest import shared_path

    folder = root / "flux"
    shutil.copytree(shared_path("data", "flux1-layout"), folder)  # a copy under tmp_path, never into the repo
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        (folder / name / "model.safetensors").write_bytes(b"")
    return folder


def test_gpus_switch_sets_every_stage_for_flux(tmp_path, monkeypatch):
    """--gpus 8 with a FLUX.1-sized folder: 8 training workers and 8 cdns / evaluate actors of one GPU each,
    bf16, gradient checkpointing (11.9B parameters > 1B); without --gpus, every visible GPU."""
    folder = _flux_folder(tmp_path)
    _gpus_visible(monkeypatch, 8)
    args = main_job.parse_args(["--model", str(folder), "--gpus", "8", "--size", "512", "--out", str(tmp_path / "a")])
    assert args.gpus == 8 and args.num_cpus is None  # the local Ray gets every CPU of the machine
    configs = main_configs.stage_configs(args, tmp_path / "a")
    for stage in ("prepare", "sft", "sfo", "cdns", "evaluate"):
        scaling = configs[stage].scaling
        assert (scaling.use_gpu, scaling.num_workers, scaling.gpus_per_worker) == (True, 8, 1.0), stage
        dtype = configs[stage].cache.dtype if stage == "prepare" else configs[stage].model.dtype
        assert dtype == "bf16", stage
    cache = configs["prepare"].cache  # a FLUX folder: the encoders run once, in prepare (transformer-only training)
    assert cache.enabled and cache.model == str(folder.resolve()) and cache.store_dtype == "bf16"
    assert configs["sfo"].data.cache_path == configs["prepare"].data.output
    for stage in ("sft", "sfo"):
        assert configs[stage].train.gradient_checkpointing and configs[stage].deepspeed.zero_stage == 2
    assert main_job.parse_args(["--model", str(folder), "--out", str(tmp_path / "b")]).gpus == 8  # the default
    with pytest.raises(SystemExit):
        main_job.parse_args(["--model", str(folder), "--gpus", "9", "--out", str(tmp_path / "c")])


def test_small_models_stay_on_the_cpu_and_keep_checkpointing_off_on_gpus(tmp_path, monkeypatch):
    _gpus_visible(monkeypatch, 2)
    cpu = main_configs.stage_configs(main_job.parse_args(["--model", "tiny", "--out", str(tmp_path / "a")]), tmp_path / "a")
    assert main_job.parse_args(["--model", "tiny", "--out", str(tmp_path / "a")]).num_cpus == 4
    assert not any(cpu[s].scaling.use_gpu for s in ("sft", "sfo", "cdns", "evaluate"))
    assert cpu["sft"].model.dtype is None  # fp32 on the CPU (sfo.models.default_dtype)
    cores = main_job.CORES  # every core used: one sampling actor per core, one torch thread per core in training
    assert cpu["cdns"].scaling.num_workers == cpu["evaluate"].scaling.num_workers == min(cores, 6)
    assert cpu["sft"].scaling.torch_threads == cpu["sfo"].scaling.torch_threads == cores
    args = main_job.parse_args(["--model", "tiny", "--gpus", "2", "--out", str(tmp_path / "b")])
    gpu = main_configs.stage_configs(args, tmp_path / "b")
    assert gpu["sft"].scaling.use_gpu and gpu["sft"].scaling.num_workers == 2 and gpu["sft"].model.dtype == "bf16"
    assert not gpu["sft"].train.gradient_checkpointing  # a tiny transformer needs none
    world = main_configs.stage_configs(main_job.parse_args(["--gpus", "2", "--out", str(tmp_path / "c")]), tmp_path / "c")
    assert all(world[s].scaling.use_gpu and world[s].scaling.num_workers == 2 for s in ("sft", "sfo", "cdns", "evaluate"))


def test_a_flux_folder_without_a_gpu_fails_at_once_naming_the_flags(tmp_path, monkeypatch, capsys):
    folder = _flux_folder(tmp_path)
    _gpus_visible(monkeypatch, 0)
    for flags in ([], ["--gpus", "8"]):
        with pytest.raises(SystemExit) as exit_:
            main_job.parse_args(["--model", str(folder), *flags, "--out", str(tmp_path / "a")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "no GPU is visible" in err and "--gpus N" in err and "--cpu" in err
    with pytest.raises(SystemExit):
        main_job.parse_args(["--model", "tiny", "--gpus", "1", "--out", str(tmp_path / "a")])
    assert "no GPU is visible" in capsys.readouterr().err
    args = main_job.parse_args(["--model", str(folder), "--cpu", "--out", str(tmp_path / "a")])  # today's behaviour
    assert args.gpus == 0 and args.num_cpus == 4
    assert not main_configs.stage_configs(args, tmp_path / "a")["sft"].scaling.use_gpu
    with pytest.raises(SystemExit):
        main_job.parse_args(["--model", "tiny", "--cpu", "--gpus", "1", "--out", str(tmp_path / "a")])


def test_gpus_the_ray_cluster_lacks_stop_the_run_before_any_stage(ray_local, tmp_path, monkeypatch, capsys):
    _gpus_visible(monkeypatch, 1)  # torch sees a GPU; the Ray session (4 CPUs, no GPU) does not
    assert main_job.main(["--out", str(tmp_path / "run"), *MINIMAL, "--gpus", "1"]) == 2
    captured = capsys.readouterr()
    assert "--gpus 1: the Ray cluster has 0 GPU(s)" in captured.err and "[1/" not in captured.out
    assert not (tmp_path / "run").exists()


def test_data_and_out_take_object_store_uris_and_bad_ones_name_the_flag(tmp_path, s3_bucket, capsys):
    """--data names Subjects200K for prepare (a folder or URI); --out may be a URI; other schemes are refused."""
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    args = main_job.parse_args(["--model", "tiny", "--data", str(pairs), "--out", str(tmp_path / "a")])
    prepare = main_configs.stage_configs(args, str(tmp_path / "a"))["prepare"]
    assert (prepare.data.source, prepare.data.input) == ("subjects200k", str(pairs))
    assert not prepare.cache.enabled  # tiny: the cache only when asked (--cache)
    args = main_job.parse_args(["--model", "tiny", "--cache", "--out", f"{s3_bucket}/runs/x"])
    configs = main_configs.stage_configs(args, args.out)
    assert configs["prepare"].data.output == f"{s3_bucket}/runs/x/data/triplets" and configs["prepare"].cache.enabled
    assert configs["sft"].output.storage_path == f"{s3_bucket}/runs/x/train"
    for flags, message in ((["--out", "ftp://host/x"], "--out: 'ftp://host/x' has scheme 'ftp'"),
                           (["--data", str(tmp_path / "missing")], "--data"),
                           (["--model", "shapes", "--data", str(pairs)], "the shapes world draws its own triplets")):
        with pytest.raises(SystemExit):
            main_job.parse_args(["--model", "tiny", *flags] if "--model" not in flags else flags)
        assert message in capsys.readouterr().err
