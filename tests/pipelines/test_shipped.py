"""The shipped SFT base of the shapes world: found only for the model it was trained on, copied into a run,
replaced by --ship-ref with a manifest that verifies."""

import json

import pytest
from safetensors.torch import load_file

from pipelines import main as main_job
from pipelines import shipped_ref
from sfo.adapters import LORA_WEIGHTS
from sfo.shapes import model as shapes_model


def test_the_shipped_ref_matches_the_shipped_model_and_its_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("SFO_CACHE_DIR", str(tmp_path / "cache"))  # a fresh machine: the shipped model is in use
    assert shapes_model.shipped_ref() == shapes_model.SHIPPED_REF
    manifest = json.loads((shapes_model.SHIPPED_REF / shapes_model.MANIFEST).read_text())
    assert "--train-sft --ship-ref" in manifest["command"] and f"--sft-steps {manifest['steps']}" in manifest["command"]
    assert manifest["base"] == shapes_model.base_fingerprint(shapes_model.SHIPPED)
    copied = shipped_ref.copy_shipped(str(tmp_path / "run" / "ref"))
    weights = load_file(f"{copied}/{LORA_WEIGHTS}")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert "steps on" in shipped_ref.describe(shapes_model.SHIPPED_REF)


def test_a_rebuilt_model_or_a_damaged_copy_is_not_matched(shapes_pretrained, tmp_path, monkeypatch):
    # shapes_pretrained: a 2-step model in the session cache, which load_flux("shapes") prefers over the shipped one
    assert shapes_model.require_pretrained() == shapes_pretrained
    assert shapes_model.shipped_ref() is None  # trained on another transformer
    with pytest.raises(FileNotFoundError, match="--train-sft"):
        shipped_ref.copy_shipped(str(tmp_path / "ref"))
    # ship() over a run's adapter for the model in use: then it matches, until a byte changes
    target = tmp_path / "ref-shipped"
    monkeypatch.setattr(shapes_model, "SHIPPED_REF", target)
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / LORA_WEIGHTS).write_bytes((shapes_model.SHIPPED.parent / "ref" / LORA_WEIGHTS).read_bytes())
    record = {"steps": 3, "seed": 1, "rank": 16, "triplets": 4, "final_loss": 0.5, "seconds": 2.0}
    shipped_ref.ship(str(tmp_path / "trained"), record, "python -m pipelines.main --train-sft --ship-ref", target)
    assert shapes_model.shipped_ref() == target
    manifest = json.loads((target / shapes_model.MANIFEST).read_text())
    assert {k: manifest[k] for k in record if k != "seconds"} == {k: v for k, v in record.items() if k != "seconds"}
    (target / LORA_WEIGHTS).write_bytes(b"damaged")
    assert shapes_model.shipped_ref() is None


def test_ship_ref_needs_a_trained_shapes_base(capsys):
    for argv in (["--ship-ref"], ["--ship-ref", "--train-sft", "--model", "tiny"]):
        with pytest.raises(SystemExit):
            main_job.parse_args(argv)
        assert "--ship-ref" in capsys.readouterr().err
    assert shipped_ref.without_out(["--out", "runs/x", "--train-sft", "--out=y", "--sft-steps", "5"]) == [
        "--train-sft", "--sft-steps", "5"]
