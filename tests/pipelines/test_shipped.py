"""The shipped adapters of the shapes world: the SFT base found only for the model it was trained on, the "sfo"
LoRA only over that base too; copied into a run, replaced by --ship-ref / --ship-sfo with a manifest that verifies."""

import json

import pytest
from safetensors.torch import load_file

from pipelines import main as main_job
from pipelines import shipped as shipped_ref
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
    # the shipped 'sfo' LoRA: trained over exactly this 'ref' LoRA and model, by the command its manifest names
    assert shapes_model.shipped_sfo() == shapes_model.SHIPPED_SFO
    sfo = json.loads((shapes_model.SHIPPED_SFO / shapes_model.MANIFEST).read_text())
    assert "--train-sfo --ship-sfo" in sfo["command"] and f"--sfo-seed {sfo['seed']}" in sfo["command"]
    assert sfo["ref"] == shapes_model.ref_fingerprint(shapes_model.SHIPPED_REF) == shapes_model.ref_fingerprint(copied)


def test_a_rebuilt_model_or_a_damaged_copy_is_not_matched(shapes_pretrained, tmp_path, monkeypatch):
    # shapes_pretrained: a 2-step model in the session cache, which load_flux("shapes") prefers over the shipped one
    assert shapes_model.require_pretrained() == shapes_pretrained
    assert shapes_model.shipped_ref() is None  # trained on another transformer
    assert shapes_model.shipped_sfo() is None  # so is the 'sfo' LoRA over it
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


def test_ship_ref_and_ship_sfo_need_what_they_ship_trained_in_the_run(capsys):
    for argv, flag in ((["--ship-ref"], "--ship-ref"), (["--ship-ref", "--train-sft", "--model", "tiny"], "--ship-ref"),
                       (["--ship-sfo"], "--ship-sfo"), (["--ship-sfo", "--train-sfo", "--train-sft"], "--ship-sfo"),
                       (["--ship-sfo", "--train-sfo", "--model", "tiny"], "--ship-sfo")):
        with pytest.raises(SystemExit):
            main_job.parse_args(argv)
        assert flag in capsys.readouterr().err
    args = main_job.parse_args(["--train-sfo", "--ship-sfo", "--sfo-seed", "34"])
    assert args.ship_sfo and args.sfo_seed == 34
    assert shipped_ref.without_out(["--out", "runs/x", "--train-sft", "--out=y", "--sft-steps", "5"]) == [
        "--train-sft", "--sft-steps", "5"]


def test_a_shipped_sfo_lora_is_used_only_over_the_ref_it_was_trained_on(tmp_path, monkeypatch):
    """ship(role="sfo") records the model's transformer and the shipped 'ref' weights; shipped_sfo finds it while
    both match and every file is intact; the sfo stage then copies 'ref' and 'sfo' into the run's adapters, and
    trains instead with --train-sfo or --train-sft (a 'ref' of this run's own)."""
    monkeypatch.setenv("SFO_CACHE_DIR", str(tmp_path / "cache"))  # a fresh machine: the shipped model is in use
    target = tmp_path / "sfo-shipped"
    monkeypatch.setattr(shapes_model, "SHIPPED_SFO", target)
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / LORA_WEIGHTS).write_bytes((shapes_model.SHIPPED_REF / LORA_WEIGHTS).read_bytes())
    record = {"steps": 3, "seed": 34, "rank": 4, "triplets": 4, "beta": 1000.0, "final_loss": 0.1, "seconds": 2.0}
    shipped_ref.ship(str(tmp_path / "trained"), record, "python -m pipelines.main --train-sfo --ship-sfo", target, "sfo")
    manifest = json.loads((target / shapes_model.MANIFEST).read_text())
    assert manifest["ref"] == shapes_model.ref_fingerprint(shapes_model.SHIPPED_REF) and manifest["beta"] == 1000.0
    assert shapes_model.shipped_sfo() == target

    adapters = tmp_path / "run" / "adapters"
    trained = []
    monkeypatch.setattr("pipelines.train.run", lambda cfg: trained.append(cfg) or "trained")
    p = {"adapters": str(adapters)}
    args = main_job.parse_args([])
    name, run, line = shipped_ref.sfo_stage(args, {"sfo": "config"}, p)
    assert name == "sfo" and run() == str(adapters / "sfo") and not trained
    for role, folder in (("ref", shapes_model.SHIPPED_REF), ("sfo", target)):
        assert (adapters / role / LORA_WEIGHTS).read_bytes() == (folder / LORA_WEIGHTS).read_bytes()
    assert "shipped 'sfo' LoRA (3 steps on 4 triplets, seed 34" in line() and "--train-sfo" in line()
    for argv in (["--train-sfo"], ["--train-sft"]):
        assert shipped_ref.sfo_stage(main_job.parse_args(argv), {"sfo": "config"}, p)[1]() == "trained"
    assert trained == ["config", "config"]
    said = shipped_ref.provenance(args)  # the report's sentence
    assert "shipped 'sfo' LoRA (3 steps on 4 triplets, seed 34" in said and "--train-sfo --ship-sfo" in said
    assert "'sfo' LoRA was trained in this run" in shipped_ref.provenance(main_job.parse_args(["--train-sfo"]))
    assert shipped_ref.provenance(main_job.parse_args(["--train-sft"])) == "Both adapters were trained in this run."

    manifest["ref"] = "0" * 64  # trained over another 'ref' LoRA: not used
    (target / shapes_model.MANIFEST).write_text(json.dumps(manifest))
    assert shapes_model.shipped_sfo() is None
    assert "no shipped 'sfo' LoRA matches" in (lambda s: (s[1](), s[2]())[1])(shipped_ref.sfo_stage(args, {"sfo": "c"}, p))


def test_shipping_records_how_the_adapter_was_trained(tmp_path, monkeypatch):
    """--ship-sfo: the trained 'sfo' LoRA is shipped with the command (no --out), its seed, the world seed of its
    triplets and the final loss; without --ship-sfo nothing is shipped."""
    from types import SimpleNamespace

    shipped = []
    monkeypatch.setattr("pipelines.train.run", lambda cfg: SimpleNamespace(metrics={"loss": 0.25}))
    monkeypatch.setattr(shipped_ref, "ship", lambda *a: shipped.append(a) or tmp_path / "shipped")
    cfg = SimpleNamespace(train=SimpleNamespace(steps=150, seed=34), lora=SimpleNamespace(rank=16),
                          sfo=SimpleNamespace(beta=1000.0))
    argv = ["--train-sfo", "--ship-sfo", "--samples", "512", "--world-seed", "5000", "--sfo-seed", "34"]
    args = main_job.parse_args(argv + ["--out", str(tmp_path / "run")])
    shipped_ref.sfo_stage(args, {"sfo": cfg}, {"adapters": str(tmp_path / "adapters")})[1]()
    (trained, record, command, target, role), = shipped
    assert (trained, target, role) == (str(tmp_path / "adapters" / "sfo"), shapes_model.SHIPPED_SFO, "sfo")
    assert command == "python -m pipelines.main " + " ".join(argv)
    assert {k: record[k] for k in ("steps", "seed", "rank", "triplets", "world_seed", "beta", "final_loss")} == {
        "steps": 150, "seed": 34, "rank": 16, "triplets": 512, "world_seed": 5000, "beta": 1000.0, "final_loss": 0.25}
    shipped_ref.sfo_stage(main_job.parse_args(["--train-sfo"]), {"sfo": cfg}, {"adapters": str(tmp_path)})[1]()
    assert len(shipped) == 1
