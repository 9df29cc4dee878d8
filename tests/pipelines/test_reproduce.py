"""The reproduction (``experiments.reproduce``) and App. A in the shapes world: the plan runs only what the chosen
experiments need, its options are checked before any stage, the tables pair each seed with its own SFT base and keep
their arms apart, the oracle's negatives differ in fine details only, and the tiny budget runs every experiment."""

import json

import pyarrow.parquet as pq
import pytest

from experiments import colour_shift, reproduce, tables
from pipelines import prepare
from pipelines.config import load_config
from sfo.records import decode_png
from sfo.shapes.oracle import judge, read_image
from sfo.shapes.world import SIZE, world_triplets


def test_colour_shift_machinery(shapes_pretrained):
    config = colour_shift.ColourShiftConfig(steps=1, eval_every=1, samples=3, sample_steps=2, batch_size=2)
    result = colour_shift.run(config, log=lambda _: None)
    for arm in colour_shift.ARMS:
        assert [point["step"] for point in result[arm]] == [0, 1]
        assert all(abs(sum(point["share"].values()) - 1) < 1e-9 for point in result[arm])
    assert result["sft"][0]["share"] == result["sfo"][0]["share"]  # both start from the same base and seeds
    assert "App. A" in colour_shift.format_curves(result)
    with pytest.raises(ValueError, match="colour_shift.colour"):
        colour_shift.ColourShiftConfig(colour="pink")


def test_plan_runs_only_what_the_experiments_need():
    budget = reproduce.BUDGETS["full"]
    assert reproduce.plan(["appA"], budget).arms == {}
    table4 = reproduce.plan(["table4"], budget)
    assert set(table4.arms) == {"sft-additional", "sfo-self-play", "sfo-cdns"}
    assert table4.arm_negatives["sft-additional"] is None and set(table4.negatives) == {"self-play", "cdns-r2"}
    sweep = reproduce.plan(["tableB"], budget)
    assert set(sweep.arms) == {"sfo-cdns", "sfo-cdns-r0.5", "sfo-cdns-r1", "sfo-cdns-r4"}
    assert sweep.negatives["cdns-r0.5"] == {"cdns.mode": "cdns", "cdns.blur_radius": 0.5}
    assert reproduce.plan(["tableC"], budget).arms["sfo-cdns-uniform"] == ["sfo.scheme=uniform"]
    assert reproduce.plan(["beta"], budget).arms == {"sfo-cdns-beta100": ["sfo.beta=100.0"],
                                                     "sfo-cdns-beta10000": ["sfo.beta=10000.0"]}


def test_a_negative_set_shared_by_arms_stores_the_reference_errors():
    budget = reproduce.BUDGETS["full"]  # 150 steps x batch 8 over 512 triplets: 3 epochs, one draw each
    assert "cdns.score.draws" not in reproduce.plan(["table4"], budget).negatives["cdns-r2"]  # one arm: its own pass
    shared = reproduce.plan(["table4", "tableC", "beta"], budget)  # sfo-cdns, beta100, beta10000 (+ uniform)
    assert shared.negatives["cdns-r2"]["cdns.score.draws"] == 3
    assert "cdns.score.draws" not in shared.negatives["self-play"]
    # the uniform-timestep arm alone does not make a set shared: stored draws follow the default scheme
    assert "cdns.score.draws" not in reproduce.plan(["table4", "tableC"], budget).negatives["cdns-r2"]
    # --set sfo.scheme=... gives every arm its own timesteps: nothing is stored
    assert "cdns.score.draws" not in reproduce.plan(["table4", "beta"], budget, overrides=["sfo.scheme=uniform"]).negatives["cdns-r2"]


def test_reproduce_refuses_unknown_experiments():
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--only", "table9"])


def test_plan_new_experiments():
    budget = reproduce.BUDGETS["full"]
    negatives = reproduce.plan(["negatives"], budget)
    assert negatives.arm_negatives == {"sfo-image-only": "image-only-r2", "sfo-oracle": reproduce.ORACLE}
    assert negatives.negatives["image-only-r2"] == {"cdns.mode": "image-only", "cdns.blur_radius": 2.0}
    anchors = reproduce.plan(["anchor"], budget).arms
    assert anchors["sfo-cdns-dpop"] == ["sfo.anchor=dpop", "sfo.anchor_weight=5.0"] and len(anchors) == 3
    assert reproduce.plan(["scope"], budget).arms == {"sfo-cdns-condition": ["lora.scope=condition"]}
    world = reproduce.plan(["table4", "scope"], budget, "world").arms
    assert world["sfo-cdns"] == ["lora.scope=condition"]
    assert world["sft-additional"] == ["lora.scope=condition", "sfo.variant=sft-additional"]
    assert world["sfo-cdns-all"] == ["lora.scope=condition", "lora.scope=all"]  # the arm's own override wins
    filtered = reproduce.plan(["filter"], budget)
    assert filtered.arm_negatives == {"sfo-cdns-filtered": "cdns-r2-filtered"}
    assert filtered.negatives["cdns-r2-filtered"]["cdns.oracle_filter"] is True
    strength = reproduce.plan(["sft-strength"], budget)
    assert strength.sft_runs == {"sft-600": 600, "sft-1200": 1200} and not strength.arms


def test_modes_experiment_names_and_samples_each_method_in_each_mode():
    from experiments import modes
    from pipelines.evaluate_methods import MethodConfig

    sweep = modes.sweep((0.9, 0.6), (3, 5))
    assert [(s.mode, s.switch, s.min_rounds, s.max_rounds) for s in sweep] == [
        ("decoupled", 0.9, 3, 5), ("decoupled", 0.6, 3, 5), ("dual-branch", 0.9, 3, 5), ("dual-branch", 0.6, 3, 5)]
    methods = [MethodConfig("base"), MethodConfig("sft@0", ref_adapter="r", active=["ref"]),
               MethodConfig("sfo-self-play@0", ref_adapter="r", sfo_adapter="s", active=["ref", "sfo"])]
    moded = modes.mode_methods(methods, sweep)
    assert [m.name for m in moded] == ["sft~decoupled0.9@0", "sft~decoupled0.6@0", "sft~dual-branch0.9@0",
                                       "sft~dual-branch0.6@0"]
    assert moded[3].sampling == sweep[3] and moded[3].ref_adapter == "r" and methods[1].sampling is None
    assert reproduce.plan(["modes"], reproduce.BUDGETS["full"]).arms.keys() == {"sfo-cdns"}
    svg = modes.scatter_svg({"sft": (0.66, 0.19), "sfo-cdns~decoupled0.6": (0.5, 0.3)})
    assert svg.count("<circle") == 2 and ">0.190</text>" in svg and ">0.660</text>" in svg


def test_seeds_are_parsed_and_checked():
    assert reproduce.parse_args(["--seeds", "0,1,2"]).seeds == [0, 1, 2]
    for bad in ("0,0", "a", ""):
        with pytest.raises(SystemExit):
            reproduce.parse_args(["--seeds", bad])


def test_set_overrides_every_sfo_arm_after_the_preset_and_is_checked_before_any_stage(capsys):
    args = reproduce.parse_args(["--set", "sfo.anchor=dpop", "--set", "sfo.anchor_weight=1", "--only", "table4,anchor"])
    assert args.sfo_set == ["sfo.anchor=dpop", "sfo.anchor_weight=1"]
    arms = reproduce.plan(args.experiments, reproduce.BUDGETS["full"], "world", args.sfo_set).arms
    assert arms["sfo-self-play"] == ["lora.scope=condition", "sfo.anchor=dpop", "sfo.anchor_weight=1"]
    assert arms["sfo-cdns-rpo"][-2:] == ["sfo.anchor=rpo", "sfo.anchor_weight=1000.0"]  # the arm's own win
    for bad, named in (["sfo.anchor=dpx"], "sfo.anchor"), (["sfo.anchr=dpop"], "anchr"), (["sfo.anchor"], "section.key=value"):
        with pytest.raises(SystemExit):
            reproduce.parse_args(["--set", *bad])
        assert "--set" in (err := capsys.readouterr().err) and named in err


def test_cores_size_the_local_ray_unless_it_is_given():
    assert reproduce.parse_args(["--cores", "3"]).num_cpus == 6  # one 0.5-CPU actor per core, room for Ray Data's tasks
    assert reproduce.parse_args(["--cores", "1"]).num_cpus == 4
    assert reproduce.parse_args(["--cores", "3", "--num-cpus", "8"]).num_cpus == 8
    assert reproduce.parse_args([]).cores == reproduce.CORES >= 1
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--cores", "0"])
    # inside a Ray the caller started: two logical CPUs per core, at least one core
    assert [reproduce.cores_that_fit(16, cpus) for cpus in (4, 5, 64, 1)] == [2, 2, 16, 1]


def test_report_keeps_blur_radii_and_anchors_apart():
    """Table B and the anchors in one run: sfo-cdns-rpo is the RPO anchor, not a blur radius ("po")."""
    entry = {"images": 512, "stderr": dict.fromkeys(("subject", "fine", "coarse", "text"), 0.01), "paired_vs_sft": {},
             **dict.fromkeys(("subject", "fine", "coarse", "text"), 0.2)}
    names = ["sft", "sfo-cdns", "sfo-cdns-r4", "sfo-cdns-r0.5", "sfo-cdns-rpo", "sfo-cdns-dpop"]
    report = tables.format_results({"budget": {"beta": 1000.0}, "seconds": {}, "methods": dict.fromkeys(names, entry)})
    table_b = report.split("## Table B")[1].split("##")[0]
    assert [line.split(" | ")[0] for line in table_b.splitlines() if line.startswith("| sfo")] == [
        "| sfo-cdns-r0.5", "| sfo-cdns-r4", "| sfo-cdns"]
    assert "| sfo-cdns-rpo |" in report.split("## Positive anchors")[1]


def test_aggregate_pairs_each_seed_with_its_own_sft():
    """Two seeds, two cells each. subject: sft@0 = [1, 0], x@0 = [1, 1]; sft@1 = [0, 0], x@1 = [1, 0].
    Per-seed paired diffs: +0.5 (d = [0, 1]) and +0.5 (d = [1, 0]), each se 0.5 -> mean +0.5,
    sampling se sqrt(0.25 + 0.25) / 2 = 0.354, seed se 0; rate of x = (1 + 0.5) / 2 = 0.75."""
    import pyarrow as pa

    def rows(method, subject):
        return [{"method": method, "sample_id": f"c{i}", "seed": 0, "subject": bool(v), "fine": bool(v),
                 "coarse": True, "text": True} for i, v in enumerate(subject)]

    table = pa.Table.from_pylist(rows("base", [0, 0]) + rows("sft@0", [1, 0]) + rows("x@0", [1, 1])
                                 + rows("sft@1", [0, 0]) + rows("x@1", [1, 0]))
    out = tables.aggregate(table, [0, 1], ["base", "sft", "x"], {"x": ["base", "absent"]})
    x = out["x"]
    assert x["images"] == 4 and x["subject"] == 0.75 and x["per_seed"]["subject"] == {"0": 1.0, "1": 0.5}
    paired = x["paired_vs_sft"]["subject"]
    assert paired["diffs"] == [0.5, 0.5] and paired["seed_se"] == 0.0
    assert paired["cell_se"] == 0.0  # each cell's diff averaged over the seeds: 0.5 and 0.5
    assert paired["sampling_se"] == pytest.approx(0.5**0.5 / 2) and paired["claim"] == "no difference shown"
    assert out["base"]["images"] == 2 and out["base"]["paired_vs_sft"]["subject"]["diffs"] == [-0.5, 0.0]
    assert "paired_vs_sft" in out["sft"] and out["sft"]["paired_vs_sft"] == {}
    assert x["paired_vs"]["base"]["subject"]["diffs"] == [1.0, 0.5] and "absent" not in x["paired_vs"]


def test_oracle_quadruplets_differ_from_the_positive_in_fine_details_only(tmp_path):
    import pyarrow.parquet as pq

    triplets = tmp_path / "triplets"
    prepare.run(load_config(prepare.PrepareConfig, None, ["data.source=shapes", f"data.size={SIZE}", "data.limit=12",
                                                           f"data.output={triplets}"]))
    assert reproduce.oracle_quadruplets(triplets, tmp_path / "q", seed=3) == 12
    rows = pq.read_table(tmp_path / "q").to_pylist()
    for row, t in zip(rows, world_triplets(12, seed=0), strict=True):
        negative = read_image(decode_png(row["negative_png"]))
        verdict = judge(negative, t.subject, t.context)
        assert verdict["coarse"] and verdict["text"] and not verdict["fine"]


def test_reproduce_tiny_budget_runs_every_experiment(shapes_pretrained, ray_local, tmp_path, capsys):
    out = tmp_path / "run"
    # --cores 8 in the fixture's Ray of 4 logical CPUs: 2 cores (two 0.5-CPU actors, two training jobs side by side)
    assert reproduce.main(["--budget", "tiny", "--preset", "paper", "--cores", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--cores 8 -> 2" in printed and "training: 12 jobs, 2 at a time" in printed
    assert "no shipped SFT base matches the model in use" in printed  # the fixture's 2-step model: trained per seed
    results = json.loads((out / "results.json").read_text())
    assert results["sft_base"] == "trained per seed: 1 steps"
    assert set(results["methods"]) == {"base", "sft", "sft-additional", "sfo-self-play", "sfo-cdns",
                                       "sfo-cdns-uniform", "sfo-cdns-r1", "sfo-cdns-beta100", "sfo-image-only",
                                       "sfo-oracle", "sfo-cdns-sdpo", "sfo-cdns-condition", "sfo-cdns-filtered", "sft-2",
                                       "sft-ig2", "sfo-cdns-ig2", "sft~decoupled0.6", "sft~dual-branch0.6",
                                       "sfo-cdns~decoupled0.6", "sfo-cdns~dual-branch0.6"}
    assert all(m["images"] == 2 for m in results["methods"].values())
    assert set(results["mode_throughput"]) == {"standard", "decoupled0.6", "dual-branch0.6"}
    assert "sfo-cdns" in results["methods"]["sfo-cdns~decoupled0.6"]["paired_vs"]
    assert (out / "modes.svg").read_text().count("<circle") == 6  # sft and sfo-cdns, each standard + 2 modes
    assert {"pretrain", "prepare", "sft", "cdns self-play", "cdns cdns-r2", "cdns cdns-r1", "sfo sfo-cdns-uniform",
            "negatives oracle-fine", "cdns image-only-r2", "sfo sfo-cdns-condition", "evaluate", "evaluate-ig2",
            "appA", "sft-2", "cdns cdns-r2-filtered", "sfo sfo-cdns-filtered", "evaluate-modes",
            "modes throughput", "training"} <= set(results["seconds"])  # "training": the jobs side by side
    assert results["wall_seconds"] >= results["seconds"]["training"]
    assert [p["step"] for p in results["appA"]["sfo"]] == [0, 1]
    assert set(results["methods"]["sfo-cdns"]["paired_vs_sft"]) == {"subject", "fine", "coarse", "text"}
    assert results["pairs"]["oracle-fine@0"]["fine"] == 1.0 and results["pairs"]["oracle-fine@0"]["context"] == 0.0
    assert results["pairs"]["cdns-r2@0"]["pairs"] == 4
    # cdns-r2 serves several arms: it stored the reference's errors (plan.share_reference_errors); r1 serves one
    assert "score_ref_err_pos" in pq.read_schema(next((out / "data" / "cdns-r2").glob("*.parquet"))).names
    assert "score_ref_err_pos" not in pq.read_schema(next((out / "data" / "cdns-r1").glob("*.parquet"))).names
    report = (out / "report.md").read_text()
    assert "SFT base: trained per seed" in report
    for title in ("Table 4", "Table C", "Table B", "beta (SFO", "Negatives in", "Positive anchors", "LoRA scope",
                  "What separates the pairs", "Image guidance 2", "filtered by the oracles", "SFT strength",
                  "App. A", "Wall time", "Δ subject vs SFT", "Inference modes", "](modes.svg)"):
        assert title in report
