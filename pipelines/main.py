"""The main job: every stage end to end on a local Ray it starts itself.

    [pretrain, shapes world only] -> prepare (triplets) -> sft (Ray Train + DeepSpeed) -> cdns
    (Ray Data) -> pair analysis -> sfo (Ray Train + DeepSpeed) -> evaluate SFT vs SFO (Ray Data)
    -> one request through the Ray Serve app -> report.html

Each stage is the same job ``python -m pipelines.<stage>`` runs (same config classes, the YAML files
in pipelines/configs/ plus the chain's paths from ``cluster.chain``), called in this one driver.
The default is the shapes world (``sfo.shapes``): a small FLUX-architecture model pretrained on
procedural subjects by ``pipelines.pretrain`` (once, then cached), triplets from the world, and
exact oracles instead of DINO / CLIP, so the scores mean something without downloads.
``--model tiny`` runs the random-weight tiny FLUX on simple synthetic triplets (plumbing only);
``--model /path/to/FLUX.1-dev`` the real one, on GPUs: ``--gpus N`` (default: every GPU visible) gives every
stage N workers / actors of one GPU each, bf16 and, for transformers above 1B parameters, gradient
checkpointing; the training and cdns jobs print their per-GPU memory plan and refuse one above the GPU's
memory. A FLUX folder with no GPU visible stops at once unless ``--cpu`` says to load it on the CPU.

    python -m pipelines.main --model /models/FLUX.1-dev --gpus 8 --size 512 --data s3://bucket/subjects200k \
        --out s3://bucket/runs/flux-1

``--out`` and ``--data`` take local paths or object store URIs (``s3://``, ``gs://``; ``cluster.storage``): every
stage then reads and writes there, and nothing of the run is written on this machine. With a FLUX folder,
prepare encodes the text and images once on the GPUs (``--cache``, bf16), so the training jobs load only the
transformer.

    python -m pipelines.main --help
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from cluster import storage
from cluster.chain import paths
from pipelines.common import CHECKPOINTING_PARAMETERS, CORES, start_local_ray
from pipelines import shipped
from pipelines.main_configs import model_source, stage_configs
from sfo.modes import DEFAULT_SWITCH, MODES, SamplingMode
from sfo.shapes.model import SHIPPED_STEPS

CPU_RAY_CPUS = 4  # logical CPUs of the local Ray on the CPU: fractional workers need headroom on 2 cores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.main", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes",
                        help="'shapes' (the shapes world, default), 'tiny' (random weights) or a local FLUX.1-dev folder")
    parser.add_argument("--out", default=None,
                        help="run folder, a local path or s3:// / gs:// URI (default: runs/main-<date>-<time>); must "
                             "not exist yet")
    parser.add_argument("--data", default=None,
                        help="Subjects200K pairs to train on, a folder or URI (PNG + txt pairs, or the Hugging Face "
                             "Parquet shards; pipelines.prepare); default: the world's or synthetic triplets")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                        help="prepare encodes text and images once (bf16) so training loads only the transformer "
                             "(default: on for a FLUX folder, off for tiny and shapes)")
    parser.add_argument("--samples", type=int, default=None, help="training triplets (default: 128 shapes, 8 otherwise)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels, a multiple of 16 (default: 32 = the shapes world, else 64)")
    parser.add_argument("--world-seed", type=int, default=0,
                        help="shapes world: the world seed of the training triplets (default 0, the triplets the shipped "
                             "SFT base was trained on; the held-out cells are seed 1000 and refused here)")
    parser.add_argument("--pretrain-steps", type=int, default=SHIPPED_STEPS,
                        help=f"shapes world: pretraining steps of the model, run once and cached (default: {SHIPPED_STEPS}, "
                             "the shipped model)")
    shipped.add_arguments(parser)  # --train-sft, --ship-ref, --train-sfo, --ship-sfo, --sfo-seed
    parser.add_argument("--sft-steps", type=int, default=None,
                        help="SFT steps of the 'ref' LoRA when it is trained (default: 200 shapes, 8)")
    parser.add_argument("--sfo-steps", type=int, default=None,
                        help="SFO steps of the 'sfo' LoRA (default: 150 shapes, 8; at 50 Prodigy is still warming up "
                             "and SFO does not move)")
    parser.add_argument("--sample-steps", type=int, default=28, help="sampling steps (default: 28, as the paper)")
    parser.add_argument("--dreambench", type=Path, default=None,
                        help="DreamBench 'dataset' folder to evaluate on (default: embedded synthetic subjects)")
    parser.add_argument("--eval-subjects", type=int, default=None,
                        help="subjects evaluated (default: 288 shapes, x 2 seeds = 576 images for SFT and SFO each, what the demo's 6 minutes hold on a slow day; 4 otherwise)")
    parser.add_argument("--base-subjects", type=int, default=64,
                        help="shapes world: the base model (no LoRA, the report's floor row) on the first N of the "
                             "evaluated subjects only, so the images go to SFT and SFO (default: 64)")
    parser.add_argument("--eval-prompts", type=int, default=2, help="prompts per DreamBench subject (default: 2)")
    parser.add_argument("--eval-seeds", type=int, default=2, help="images per (subject, prompt) (default 2; paper 4)")
    parser.add_argument("--preset", choices=("world", "paper"), default=None,
                        help="SFO's configuration: 'world' (default for the shapes world: the 'sfo' LoRA on the reference "
                             "tokens only, the best found there; README) or 'paper' (the paper's recipe as written; "
                             "default for other models)")
    parser.add_argument("--mode", choices=MODES, default="standard",
                        help="how the reference enters sampling in the evaluation and the served request (sfo.modes): "
                             "standard (default, the paper), decoupled (EZIGen) or dual-branch (DCI)")
    parser.add_argument("--switch", type=float, default=DEFAULT_SWITCH,
                        help="decoupled / dual-branch: the time t in (0, 1] where the second phase begins "
                             f"(default {DEFAULT_SWITCH})")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray (default on the CPU: twice the cores, at least 4: "
                             "fractional workers need headroom; cdns and evaluate run one actor per core; with --gpus "
                             "every CPU of the machine)")
    device = parser.add_mutually_exclusive_group()
    device.add_argument("--gpus", type=int, default=None,
                        help="run on N GPUs of this machine: N training workers (one GPU each), N cdns / evaluate "
                             "actors (one GPU each), bf16, gradient checkpointing for transformers above "
                             f"{CHECKPOINTING_PARAMETERS / 1e9:g}B parameters (default with a FLUX folder: every "
                             "visible GPU)")
    device.add_argument("--cpu", action="store_true",
                        help="run on the CPU (the default for tiny and shapes; a FLUX folder needs it said)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    shapes = args.model == "shapes"
    defaults = {"samples": (128, 8), "size": (32, 64), "sft_steps": (200, 8), "sfo_steps": (150, 8),
                "eval_subjects": (288, 4)}
    for name, (world, other) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, world if shapes else other)
    if args.preset is None:
        args.preset = "world" if shapes else "paper"
    if shapes and args.size != 32:
        parser.error("--size: the shapes world is drawn at 32 px; leave --size out")
    for name in ("pretrain_steps", "samples", "sft_steps", "sfo_steps", "sample_steps", "num_cpus", "eval_subjects", "base_subjects", "eval_prompts",
                 "eval_seeds", "gpus"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        SamplingMode(mode=args.mode, switch=args.switch)  # sfo.modes' own checks
    except ValueError as exc:
        parser.error(f"--{str(exc).removeprefix('sampling.')}")
    if args.size < 16 or args.size % 16:
        parser.error("--size must be a positive multiple of 16")
    for name in ("out", "data"):
        try:
            storage.check_uri(getattr(args, name) or "", f"--{name}")
        except ValueError as exc:
            parser.error(str(exc))
    if args.out is not None and storage.exists(args.out):
        parser.error(f"--out {args.out} exists already; pick a new folder")
    shipped.check_arguments(parser, args)
    if args.world_seed != 0 and not shapes:
        parser.error("--world-seed: only the shapes world draws its triplets from a seed; leave it out")
    if args.data is not None and shapes:
        parser.error("--data: the shapes world draws its own triplets; pass --model tiny or a FLUX folder with --data")
    if args.data is not None and not storage.exists(args.data):
        parser.error(f"--data {args.data} does not exist; pass a Subjects200K folder or URI")
    if args.cache is None:
        args.cache = args.model not in ("tiny", "shapes")
    elif args.cache and shapes:
        parser.error("--cache: the shapes world's model has no encoders to skip; leave --cache out")
    if args.model not in ("tiny", "shapes"):
        from sfo.models import check_flux_folder

        try:
            check_flux_folder(args.model)
        except FileNotFoundError as exc:
            parser.error(str(exc))
    try:
        args.gpus = choose_gpus(args.model, args.gpus, args.cpu)
    except ValueError as exc:
        parser.error(str(exc))
    if args.num_cpus is None and not args.gpus:
        args.num_cpus = max(CPU_RAY_CPUS, 2 * CORES)
    if args.dreambench is not None and not (args.dreambench / "prompts_and_classes.txt").is_file():
        parser.error(f"--dreambench {args.dreambench}: no prompts_and_classes.txt; pass DreamBench's dataset/ folder")
    return args


def choose_gpus(model: str, gpus: int | None, cpu: bool) -> int:
    """GPUs the run uses (0: the CPU). The presets stay on the CPU unless ``--gpus`` says otherwise; a FLUX
    folder takes ``--gpus`` (default: every GPU this driver sees) and refuses a machine without one at once,
    before ~67 GB of fp32 weights start loading into the CPU's memory, unless ``--cpu`` says so.

    Raises:
        ValueError: ``--gpus`` or a FLUX folder with no (or too few) GPUs visible; the message names the flags.
    """
    if cpu:
        return 0
    folder = model not in ("tiny", "shapes")
    if gpus is None and not folder:
        return 0
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        what = f"--gpus {gpus}" if gpus else f"--model {model}"
        raise ValueError(f"{what}: no GPU is visible to this process (torch.cuda.is_available() is false); run on a "
                         "machine with GPUs and pass --gpus N, or pass --cpu to load the model on the CPU (a FLUX.1-dev "
                         "folder is ~67 GB of fp32 weights per process there)")
    if gpus is not None and gpus > visible:
        raise ValueError(f"--gpus {gpus}: only {visible} GPU(s) are visible to this process; pass --gpus {visible} or fewer")
    return gpus or visible


SERVE_CONFIG = Path(__file__).resolve().parents[1] / "serving" / "serve_config.yaml"
DEFAULT_SERVE_PORT = 8000


def write_serve_config(args: argparse.Namespace, runs: str, port: int | None = None) -> tuple[str, str]:
    """``<runs>/serve_config.yaml``: the repository's Serve config with this run's model, adapters, image
    size, steps and an HTTP port on 127.0.0.1 (8000 when free). Returns the file and the command serving it
    (for a run on an object store: after copying the file to this machine)."""
    import socket

    import yaml

    if port is None:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", DEFAULT_SERVE_PORT))
                port = DEFAULT_SERVE_PORT
            except OSError:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["applications"][0]["args"].update(model=model_source(args.model), adapters=paths(runs)["adapters"],
                                             default_side=args.size, default_steps=args.sample_steps)
    config["http_options"].update(host="127.0.0.1", port=port)
    path = storage.join(runs, "serve_config.yaml")
    local = storage.basename(path) if storage.is_remote(path) else path
    command = f"{Path(sys.executable).parent / 'serve'} run --address local {local}"
    storage.write_text(path, f"# {command}\n# written by the main job from {SERVE_CONFIG.name}: this run's model and "
                       "adapters\n" + yaml.safe_dump(config, sort_keys=False))
    return path, command


def serve_request(args: argparse.Namespace, runs: str) -> str:
    """Deploys the Ray Serve app on the exported adapters, sends one request, saves the PNG it returns."""
    import base64

    import httpx
    from ray import serve

    from cluster.local import free_port
    from serving.app import build_app

    first = storage.list_files(paths(runs)["triplets"], ".parquet")[0]
    row = storage.read_table(first, ["target_text", "reference_png"]).slice(0, 1).to_pylist()[0]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": model_source(args.model), "adapters": paths(runs)["adapters"]}),
                  name="sfo", route_prefix="/", blocking=False)
        body = {"prompt": row["target_text"], "image": base64.b64encode(row["reference_png"]).decode(),
                "steps": args.sample_steps, "width": args.size, "height": args.size, "seed": 0, "adapter": "sfo",
                "mode": args.mode, "switch": args.switch}
        response = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json=body, timeout=300)
        response.raise_for_status()
    finally:
        serve.shutdown()
    path = storage.join(runs, "served.png")
    storage.write_bytes(path, response.content)
    storage.write_json(storage.join(runs, "served.json"), {k: v for k, v in body.items() if k != "image"}, indent=None)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = storage.absolute(args.out or Path("runs") / time.strftime("main-%Y%m%d-%H%M%S"))
    started = time.time()
    try:
        configs = stage_configs(args, runs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray

    from pipelines import cdns, evaluate, evaluate_shapes, pair_analysis, prepare, pretrain
    from pipelines.report import run_report

    # address="local": a Ray of its own, even when another cluster runs on this machine.
    started_ray = not ray.is_initialized()
    if started_ray:
        start_local_ray(args.num_cpus)
    if args.gpus and ray.cluster_resources().get("GPU", 0) < args.gpus:
        print(f"error: --gpus {args.gpus}: the Ray cluster has {ray.cluster_resources().get('GPU', 0):g} GPU(s); pass "
              "--gpus with at most that many, or --cpu", file=sys.stderr)
        if started_ray:
            ray.shutdown()
        return 2
    storage.makedirs(runs)
    p = paths(runs)
    results: dict = {}
    evaluation = evaluate_shapes if args.model == "shapes" else evaluate
    steps = [("pretrain", lambda: pretrain.pretrain(pretrain.PretrainConfig(steps=args.pretrain_steps)),
              "the shapes-world model (the shipped one unless a rebuilt one is cached)")] if args.model == "shapes" else []
    steps += [
        ("prepare", lambda: prepare.run(configs["prepare"]), f"triplets in {p['triplets']}"),
        shipped.sft_stage(args, configs, p),
        ("cdns", lambda: cdns.run(configs["cdns"]), f"quadruplets in {p['quadruplets']}"),
        ("pair_analysis", lambda: pair_analysis.run(configs["pair_analysis"]), f"pair gaps in {p['pairs']}"),
        shipped.sfo_stage(args, configs, p),
        ("evaluate", lambda: evaluation.run(configs["evaluate"]), f"scores in {p['evaluate']}"),
        ("serve", lambda: serve_request(args, runs), f"one generated image in {storage.join(runs, 'served.png')}"),
        ("report", lambda: run_report(args, runs, configs, results["evaluate"], results["pair_analysis"],
                                      shipped.provenance(args)),
         f"report in {storage.join(runs, 'report.html')}"),
    ]
    try:
        for index, (name, step, output) in enumerate(steps, 1):
            print(f"\n[{index}/{len(steps)}] {name}", flush=True)
            t0 = time.time()
            try:
                result = results[name] = step()
            except Exception:
                print(f"[{index}/{len(steps)}] {name} FAILED after {time.time() - t0:.0f} s:", flush=True)
                traceback.print_exc()
                return 1
            metrics = getattr(result, "metrics", None)
            summary = "" if not metrics else f" (step {metrics.get('step')}, loss {metrics.get('loss'):.4f})"
            output = output() if callable(output) else output
            print(f"[{index}/{len(steps)}] {name} done in {time.time() - t0:.0f} s{summary}: {output}", flush=True)
    finally:
        if started_ray:
            ray.shutdown()

    print(f"\nDone in {time.time() - started:.0f} s, model {args.model!r}. Everything is under {runs}:")
    print(f"  adapters (diffusers LoRA safetensors): {p['adapters']}")
    print(f"  report: {storage.join(runs, 'report.html')}")
    _, command = write_serve_config(args, runs)
    print("  serve these adapters (Ray Serve, HTTP on 127.0.0.1; see README's Serving):")
    print(f"    {command}")
    if args.model == "shapes":
        print("  Scores are the shapes world's exact oracles (sfo.shapes.oracle); the paper's findings in")
        print("  miniature: python -m experiments.reproduce")
    if args.model == "tiny":
        print("  The tiny model has random weights and the encoders are random: this proves the code path,")
        print("  not image quality, and its scores are not comparable to published numbers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
