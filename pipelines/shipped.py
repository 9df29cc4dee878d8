"""The shapes world's shipped adapters: the main job starts from them, ``--ship-ref`` / ``--ship-sfo`` replace them.

The paper starts SFO from a trained OminiControl; the world ships its counterpart, a "ref" LoRA trained on the
shipped pretrained model (``sfo.shapes.model.SHIPPED_REF``). It also ships an "sfo" LoRA trained with Eq. 3 on
CDNS negatives on top of that "ref" one (``SHIPPED_SFO``): the demo's six minutes cannot train one whose gain
shows at 3 standard errors, so the demo evaluates the shipped one and says so. Each has a ``MANIFEST.json``: the
command that made it, its steps, seed and triplets, the sha256 of the base model's transformer (and, for "sfo",
of the "ref" weights under it) and of every file. Retraining either is the one command its manifest names:

    python -m pipelines.main --train-sft --ship-ref --samples 512 --sft-steps 2400
    python -m pipelines.main --train-sfo --ship-sfo --samples 512 --sfo-seed 34
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import time
from pathlib import Path

from cluster import storage
from sfo.adapters import LORA_WEIGHTS
from sfo.shapes.model import (MANIFEST, SHIPPED_REF, SHIPPED_SFO, base_fingerprint, file_digests, ref_fingerprint,
                              require_pretrained, shipped_ref, shipped_sfo)

WHAT = {"ref": "the shapes world's SFT base: the 'ref' LoRA (condition tokens, OminiControl-style) trained on the "
               "shipped model sfo/shapes/pretrained; the main job starts from it",
        "sfo": "the shapes world's SFO adapter: the 'sfo' LoRA trained with Eq. 3 on CDNS negatives on top of the "
               "shipped 'ref' LoRA; the main job evaluates it unless --train-sfo"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The main job's flags for the shipped adapters."""
    parser.add_argument("--train-sft", action="store_true",
                        help="train the SFT base ('ref' LoRA) in this run; the shapes world otherwise starts from the "
                             "shipped one (sfo/shapes/ref, when it was trained on the model in use), as the paper "
                             "starts from a trained OminiControl; tiny and FLUX folders always train it")
    parser.add_argument("--ship-ref", action="store_true",
                        help="shapes world, with --train-sft: replace the shipped SFT base with this run's "
                             "(pipelines.shipped; its MANIFEST.json records the command)")
    parser.add_argument("--train-sfo", action="store_true",
                        help="train the 'sfo' LoRA in this run; the shapes world otherwise evaluates the shipped one "
                             "(sfo/shapes/sfo, when it was trained on the 'ref' LoRA and model in use: the demo's "
                             "budget cannot train one that shows SFO's gain); tiny and FLUX folders always train it")
    parser.add_argument("--ship-sfo", action="store_true",
                        help="shapes world, with --train-sfo: replace the shipped 'sfo' LoRA with this run's")
    parser.add_argument("--sfo-seed", type=int, default=None, help="the sfo job's train.seed (default: its config's)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    shapes = args.model == "shapes"
    if args.ship_ref and not (shapes and args.train_sft):
        parser.error("--ship-ref: ships a shapes-world SFT base this run trains; add --train-sft (and --model shapes)")
    if args.ship_sfo and not (shapes and args.train_sfo and not args.train_sft):
        parser.error("--ship-sfo: ships a shapes-world 'sfo' LoRA this run trains on the shipped SFT base; add "
                     "--train-sfo, leave --train-sft out (and --model shapes)")


def describe(folder: Path) -> str:
    """One line on a shipped adapter: its steps, triplets and seed, from its manifest."""
    m = json.loads((folder / MANIFEST).read_text())
    return f"{m['steps']} steps on {m['triplets']} triplets, seed {m['seed']}; made {m['made'].split(',')[0]}"


def copy_shipped(destination: str, folder: Path | None = None) -> str:
    """Puts a shipped adapter (default: the "ref" one) where the chain's job would have written it (path or URI)."""
    folder = shipped_ref() if folder is None else folder
    if folder is None:
        raise FileNotFoundError(f"no shipped 'ref' LoRA for the shapes model in use ({SHIPPED_REF}); pass --train-sft")
    storage.makedirs(destination)
    for name in json.loads((folder / MANIFEST).read_text())["files"]:  # the weights and the adapter's scope
        storage.write_bytes(storage.join(destination, name), (folder / name).read_bytes())
    return destination


def ship(trained: str, record: dict, command: str, target: Path = SHIPPED_REF, role: str = "ref") -> Path:
    """Replaces a shipped adapter with one a run trained (``trained``: its adapter folder, path or URI) and writes
    the manifest: ``record`` (steps, seed, rank, triplets, final_loss, seconds, ...), the command, the base model's
    transformer and, for ``role`` "sfo", the shipped "ref" weights it was trained on."""
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for uri in storage.list_files(trained):  # the weights and the adapter's scope (sfo.adapters.SCOPE_FILE)
        (staging / storage.basename(uri)).write_bytes(storage.read_bytes(uri))
    if not (staging / LORA_WEIGHTS).is_file():
        raise FileNotFoundError(f"{trained}: no {LORA_WEIGHTS}; pass the job's adapters/{role} folder")
    manifest = {
        "what": WHAT[role],
        "command": command,
        "made": f"{datetime.date.today()}, {platform.machine()} CPU, {record.get('seconds', 0):.0f} s of training",
        **{k: v for k, v in record.items() if k != "seconds"},
        "base": base_fingerprint(require_pretrained()),  # the transformer it was trained on
        **({"ref": ref_fingerprint(SHIPPED_REF)} if role == "sfo" else {}),
        "files": file_digests(staging),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def without_out(argv: list[str]) -> list[str]:
    """A command line without its --out (a run folder is no part of how a result is made)."""
    kept, skip = [], False
    for a in argv:
        if not skip and a != "--out" and not a.startswith("--out="):
            kept.append(a)
        skip = a == "--out"
    return kept


def _train(args, cfg, ship_it: bool, trained: str, target: Path, role: str, **extra):
    """Runs the training job of ``cfg``; with ``ship_it``, ships what it wrote in ``trained`` to ``target``, its
    manifest recording the command (without --out), steps, seed, rank, triplets, ``extra`` and the final loss."""
    from pipelines import train

    started = time.time()
    result = train.run(cfg)
    if ship_it:
        record = {"steps": cfg.train.steps, "seed": cfg.train.seed, "rank": cfg.lora.rank, "triplets": args.samples,
                  "world_seed": args.world_seed, **extra,
                  "final_loss": (getattr(result, "metrics", None) or {}).get("loss"), "seconds": time.time() - started}
        command = "python -m pipelines.main " + " ".join(without_out(args.argv))
        print(f"[{'sft' if role == 'ref' else role}] shipped to {ship(trained, record, command, target, role)}",
              flush=True)
    return result


def provenance(args) -> str:
    """One sentence for the report: which adapters the run evaluates were shipped, and how to train them instead
    (the stages' own decisions, made the same way)."""
    if args.model != "shapes":
        return ""
    ref = shipped_ref() if not args.train_sft else None
    sfo = shipped_sfo() if ref is not None and not args.train_sfo else None
    if ref is None:
        return "Both adapters were trained in this run."
    said = f"The SFT base is the shipped 'ref' LoRA ({describe(ref)})"
    if sfo is None:
        return said + "; the 'sfo' LoRA was trained in this run (--train-sft trains the base too)."
    return (said + f", and SFO the shipped 'sfo' LoRA ({describe(sfo)}): evaluated here, not trained in this run. "
            "Trained by: " + json.loads((sfo / MANIFEST).read_text())["command"]
            + " (--train-sfo trains one in the run, at the demo's budget).")


def sft_stage(args, configs: dict, p: dict) -> tuple:
    """The chain's sft stage: the shipped SFT base copied in (the shapes world, unless --train-sft or the model in
    use is not the one it was trained on), else the sft job (and, with --ship-ref, the result shipped). Decided
    when the stage runs, after pretrain has settled which model is in use; its line is then a function."""
    said = {}

    def run():
        shipped = shipped_ref() if args.model == "shapes" and not args.train_sft else None
        if shipped is not None:
            said["line"] = (f"the shipped 'ref' LoRA ({describe(shipped)}) in {p['ref_adapter']}; "
                            "--train-sft trains one")
            return copy_shipped(p["ref_adapter"])
        note = "" if args.model != "shapes" or args.train_sft else f" (no shipped SFT base matches the model in use: {SHIPPED_REF})"
        said["line"] = f"'ref' LoRA in {p['ref_adapter']}{note}"
        return _train(args, configs["sft"], args.ship_ref, p["ref_adapter"], SHIPPED_REF, "ref")

    return ("sft", run, lambda: said["line"])


def sfo_stage(args, configs: dict, p: dict) -> tuple:
    """The chain's sfo stage: the shipped "sfo" LoRA with the "ref" one under it copied into the run's adapters
    (the shapes world, unless --train-sfo, or the "ref" LoRA or the model in use is not the one it was trained on),
    else the sfo job (and, with --ship-sfo, the result shipped)."""
    said = {}

    def run():
        shipped = shipped_sfo() if args.model == "shapes" and not args.train_sfo and not args.train_sft else None
        if shipped is not None:
            said["line"] = (f"the shipped 'sfo' LoRA ({describe(shipped)}) and its 'ref' in {p['adapters']}; "
                            "--train-sfo trains one")
            copy_shipped(storage.join(p["adapters"], "ref"), shipped_ref())
            return copy_shipped(storage.join(p["adapters"], "sfo"), shipped)
        note = ("" if args.model != "shapes" or args.train_sfo or args.train_sft
                else f" (no shipped 'sfo' LoRA matches the model and 'ref' LoRA in use: {SHIPPED_SFO})")
        said["line"] = f"'ref' + 'sfo' LoRAs in {p['adapters']}{note}"
        cfg = configs["sfo"]
        extra = {"beta": cfg.sfo.beta, "negatives": "cdns", "preset": args.preset} if args.ship_sfo else {}
        return _train(args, cfg, args.ship_sfo, storage.join(p["adapters"], "sfo"), SHIPPED_SFO, "sfo", **extra)

    return ("sfo", run, lambda: said["line"])
