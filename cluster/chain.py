"""How the stages feed each other: the one place that says which folder each stage reads and writes.

Jobs submitted with ``ray job submit`` each run in their own unpacked copy of the working
directory, so the chain passes every stage absolute paths under one shared ``runs`` root: the
repository's ``runs/`` on a laptop, a shared volume on a cluster, or an object store URI
(``s3://bucket/runs``, ``gs://...``; ``cluster.storage``), which every node reaches without a mount:

    <runs>/data/triplets        prepare -> sft, cdns, sfo (the cached tensors, joined back by sample id)
    <runs>/train/sft/adapters   sft -> cdns, sfo          ("ref")
    <runs>/data/quadruplets     cdns -> sfo
    <runs>/train/sfo/adapters   sfo -> serve, evaluate    ("ref" + "sfo")
    <runs>/analysis/pairs       pair_analysis (optional): DINO gap per pair, High/Mid/Low buckets
    <runs>/evaluate             evaluate: SFT base ("ref") vs SFO ("ref" + "sfo")
"""

from __future__ import annotations

from pathlib import Path

from cluster import storage

DEFAULT_CHAIN = ("prepare", "sft", "cdns", "sfo", "evaluate")
STAGES = ("prepare", "sft", "cdns", "pair_analysis", "sfo", "evaluate")


def paths(runs: str | Path) -> dict[str, str]:
    """Every stage's folder under ``runs`` (a local path, made absolute, or an ``s3://`` / ``gs://`` URI)."""
    root = storage.absolute(storage.check_uri(runs, "--runs"))
    return {
        "triplets": storage.join(root, "data", "triplets"),
        "quadruplets": storage.join(root, "data", "quadruplets"),
        "train": storage.join(root, "train"),
        "ref_adapter": storage.join(root, "train", "sft", "adapters", "ref"),
        "adapters": storage.join(root, "train", "sfo", "adapters"),
        "pairs": storage.join(root, "analysis", "pairs"),
        "evaluate": storage.join(root, "evaluate"),
    }


def evaluation_methods(runs: str | Path, base: bool = False) -> str:
    """The evaluate job's ``methods`` override: the SFT base against SFO, as the paper's tables; with
    ``base``, first the model with no LoRA (it never learned to read the reference tokens: the floor)."""
    a = paths(runs)["adapters"]
    ref, sfo = storage.join(a, "ref"), storage.join(a, "sfo")
    return ("methods=[" + ("{name: base, active: []}, " if base else "")
            + f"{{name: sft, ref_adapter: '{ref}', active: [ref]}}, "
            f"{{name: sfo, ref_adapter: '{ref}', sfo_adapter: '{sfo}', active: [ref, sfo]}}]")


def stage_overrides(stage: str, runs: str | Path) -> list[str]:
    """The ``key=value`` overrides that wire ``stage`` into the chain rooted at ``runs``."""
    p = paths(runs)
    wiring = {
        "prepare": [f"data.output={p['triplets']}"],
        "sft": [f"data.path={p['triplets']}", f"output.storage_path={p['train']}", "output.name=sft"],
        "cdns": [f"data.input={p['triplets']}", f"data.output={p['quadruplets']}", f"model.ref_adapter={p['ref_adapter']}"],
        "pair_analysis": [f"analysis.input={p['quadruplets']}", f"analysis.output={p['pairs']}"],
        "sfo": [f"data.path={p['quadruplets']}", f"data.cache_path={p['triplets']}", f"model.ref_adapter={p['ref_adapter']}",
                f"output.storage_path={p['train']}", "output.name=sfo"],
        "evaluate": [evaluation_methods(runs), f"output={p['evaluate']}"],
    }
    if stage not in wiring:
        raise ValueError(f"--stages: unknown stage {stage!r}; use some of {list(STAGES)}")
    return wiring[stage]
