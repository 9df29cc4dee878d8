"""The shapes world's shipped SFT base: the main job starts from it, and ``--ship-ref`` replaces it.

The paper starts SFO from a trained OminiControl; the world ships its counterpart, a "ref" LoRA trained on the
shipped pretrained model (``sfo.shapes.model.SHIPPED_REF``, with ``MANIFEST.json``: the command that made it,
its steps, seed and triplets, the sha256 of the base model's transformer and of every file). Retraining it is
one command, the one its manifest names:

    python -m pipelines.main --train-sft --ship-ref --samples 512 --sft-steps 2400
"""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import time
from pathlib import Path

from cluster import storage
from sfo.adapters import LORA_WEIGHTS
from sfo.shapes.model import MANIFEST, SHIPPED_REF, base_fingerprint, file_digests, require_pretrained, shipped_ref


def describe(folder: Path) -> str:
    """One line on a shipped "ref" LoRA: its steps, triplets and seed, from its manifest."""
    m = json.loads((folder / MANIFEST).read_text())
    return f"{m['steps']} steps on {m['triplets']} triplets, seed {m['seed']}; made {m['made'].split(',')[0]}"


def copy_shipped(destination: str) -> str:
    """Puts the shipped "ref" LoRA where the chain's sft stage would have written it (a path or URI)."""
    folder = shipped_ref()
    if folder is None:
        raise FileNotFoundError(f"no shipped 'ref' LoRA for the shapes model in use ({SHIPPED_REF}); pass --train-sft")
    storage.makedirs(destination)
    for name in json.loads((folder / MANIFEST).read_text())["files"]:  # the weights and the adapter's scope
        storage.write_bytes(storage.join(destination, name), (folder / name).read_bytes())
    return destination


def ship(trained: str, record: dict, command: str, target: Path = SHIPPED_REF) -> Path:
    """Replaces the shipped "ref" LoRA with one a run trained (``trained``: its adapter folder, path or URI) and
    writes the manifest: ``record`` (steps, seed, rank, triplets, final_loss, seconds), the command, the base."""
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for uri in storage.list_files(trained):  # the weights and the adapter's scope (sfo.adapters.SCOPE_FILE)
        (staging / storage.basename(uri)).write_bytes(storage.read_bytes(uri))
    if not (staging / LORA_WEIGHTS).is_file():
        raise FileNotFoundError(f"{trained}: no {LORA_WEIGHTS}; pass the sft job's adapters/ref folder")
    manifest = {
        "what": "the shapes world's SFT base: the 'ref' LoRA (condition tokens, OminiControl-style) trained on the "
                "shipped model sfo/shapes/pretrained; the main job starts from it",
        "command": command,
        "made": f"{datetime.date.today()}, {platform.machine()} CPU, {record.get('seconds', 0):.0f} s of training",
        **{k: record.get(k) for k in ("steps", "seed", "rank", "triplets", "final_loss")},
        "base": base_fingerprint(require_pretrained()),  # the transformer it was trained on
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


def sft_stage(args, configs: dict, p: dict) -> tuple:
    """The chain's sft stage: the shipped SFT base copied in (the shapes world, unless --train-sft or the model in
    use is not the one it was trained on), else the sft job (and, with --ship-ref, the result shipped). Decided
    when the stage runs, after pretrain has settled which model is in use; its line is then a function."""
    from pipelines import train

    said = {}

    def run():
        shipped = shipped_ref() if args.model == "shapes" and not args.train_sft else None
        if shipped is not None:
            said["line"] = (f"the shipped 'ref' LoRA ({describe(shipped)}) in {p['ref_adapter']}; "
                            "--train-sft trains one")
            return copy_shipped(p["ref_adapter"])
        note = "" if args.model != "shapes" or args.train_sft else f" (no shipped SFT base matches the model in use: {SHIPPED_REF})"
        said["line"] = f"'ref' LoRA in {p['ref_adapter']}{note}"
        started = time.time()
        result = train.run(configs["sft"])
        if args.ship_ref:
            cfg = configs["sft"]
            record = {"steps": cfg.train.steps, "seed": cfg.train.seed, "rank": cfg.lora.rank, "triplets": args.samples,
                      "final_loss": (getattr(result, "metrics", None) or {}).get("loss"),
                      "seconds": time.time() - started}
            command = "python -m pipelines.main " + " ".join(without_out(args.argv))
            print(f"[sft] shipped to {ship(p['ref_adapter'], record, command)}", flush=True)
        return result

    return ("sft", run, lambda: said["line"])
