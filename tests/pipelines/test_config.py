from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.common import ModelConfig, ScalingConfig
from pipelines.config import ConfigError, load_config, to_dict


@dataclass
class Train:
    steps: int = 10
    lr: float = 1.0
    tags: list[str] = field(default_factory=list)
    resume: bool = True


@dataclass
class Job:
    output: Path = Path("out")
    model: ModelConfig = field(default_factory=ModelConfig)
    train: Train = field(default_factory=Train)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("# python -m x --config job.yaml\ntrain:\n  lr: 1e-4\n  steps: 5\nmodel:\n  source: /m\n")
    cfg = load_config(Job, path, ["train.steps=7", "scaling.num_workers=2", "train.tags=a,b", "train.resume=false"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)  # PyYAML alone reads "1e-4" as a string
    assert cfg.train.steps == 7 and cfg.scaling.num_workers == 2 and cfg.train.tags == ["a", "b"]
    assert cfg.train.resume is False and cfg.model.source == "/m" and cfg.output == Path("out")
    assert to_dict(cfg)["output"] == "out"


@pytest.mark.parametrize("override,message", [
    (["train.stpes=3"], r"train: unknown key\(s\) \['stpes'\]"),
    (["train.steps=abc"], "train.steps: expected an integer"),
    (["train.steps=1.5"], "train.steps: expected an integer"),
    (["scaling.num_workers=0"], "scaling.num_workers: must be at least 1"),
    (["model.dtype=int8"], "model.dtype"),
    (["steps"], "section.key=value"),
])
def test_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Job, None, override)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(Job, tmp_path / "nope.yaml")


def test_a_partial_section_keeps_the_jobs_own_section_defaults():
    """SfoConfig's output defaults to name 'sfo' (OutputConfig's own default is 'sft'): overriding only
    output.storage_path must not turn the sfo run into the sft run's folder (it resumed from sft's checkpoint)."""
    from pipelines.train_config import SfoConfig

    config = load_config(SfoConfig, None, ["output.storage_path=s3://bucket/train", "model.ref_adapter=x",
                                           "lora.rank=8"])

    assert config.output.name == "sfo" and config.output.storage_path == "s3://bucket/train"
    assert config.lora.name == "sfo" and config.lora.rank == 8  # SfoConfig's lora default: "sfo", rank 16
