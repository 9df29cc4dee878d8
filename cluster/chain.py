"""How the stages feed each other: the one place that says which folder each stage reads and writes.

Jobs submitted with ``ray job submit`` each run in their own unpacked copy of the working
directory, so the chain passes every stage absolute paths under one shared ``runs`` folder (the
repository's ``runs/`` on a laptop, a shared volume on a cluster):

    <runs>/data/triplets        prepare -> sft, cdns
    <runs>/train/sft/adapters   sft -> cdns, sfo          ("ref")
    <runs>/data/quadruplets     cdns -> sfo
    <runs>/train/sfo/adapters   sfo -> serve, evaluate    ("ref" + "sfo")
"""

from __future__ import annotations

from pathlib import Path

STAGES = ("prepare", "sft", "cdns", "sfo")


def paths(runs: str | Path) -> dict[str, Path]:
    runs = Path(runs).expanduser().resolve()
    return {
        "triplets": runs / "data" / "triplets",
        "quadruplets": runs / "data" / "quadruplets",
        "train": runs / "train",
        "ref_adapter": runs / "train" / "sft" / "adapters" / "ref",
        "adapters": runs / "train" / "sfo" / "adapters",
    }


def stage_overrides(stage: str, runs: str | Path) -> list[str]:
    """The ``key=value`` overrides that wire ``stage`` into the chain rooted at ``runs``."""
    p = paths(runs)
    wiring = {
        "prepare": [f"data.output={p['triplets']}"],
        "sft": [f"data.path={p['triplets']}", f"output.storage_path={p['train']}", "output.name=sft"],
        "cdns": [f"data.input={p['triplets']}", f"data.output={p['quadruplets']}", f"model.ref_adapter={p['ref_adapter']}"],
        "sfo": [f"data.path={p['quadruplets']}", f"model.ref_adapter={p['ref_adapter']}",
                f"output.storage_path={p['train']}", "output.name=sfo"],
    }
    if stage not in wiring:
        raise ValueError(f"--stages: unknown stage {stage!r}; use some of {list(STAGES)}")
    return wiring[stage]
