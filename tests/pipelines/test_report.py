import io
import re

import pyarrow as pa
from PIL import Image

from pipelines.evaluate import IMAGE_SCHEMA
from pipelines.report import write_report


def _png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_report_holds_table_chart_grid_histogram_and_parameters(tmp_path):
    rows = [{"method": m, "subject": "cat", "prompt_index": 0, "prompt": "a cat on a sofa", "seed": seed,
             "image_png": _png(colour), "dino": 0.5, "clip_i": 0.25, "clip_t": -0.125, "random_encoders": True}
            for m, colour in (("sft", "red"), ("sfo", "blue")) for seed in (0, 1)]
    summary = {"methods": {"sft": {"images": 2, "dino": 0.5, "clip_i": 0.25, "clip_t": -0.125},
                           "sfo": {"images": 2, "dino": 0.75, "clip_i": 0.5, "clip_t": 0.125}},
               "subjects": {"sft": {"cat": {"images": 2, "dino": 0.5, "clip_i": 0.25, "clip_t": -0.125}},
                            "sfo": {"cat": {"images": 2, "dino": 0.75, "clip_i": 0.5, "clip_t": 0.125}}},
               "random_encoders": True, "note": "random encoders: not comparable to published numbers"}
    pairs = {"rows": 3, "thresholds": [0.2, 0.6], "counts": {"low": 1, "mid": 1, "high": 1},
             "histogram": {"counts": [1, 0, 2], "edges": [-1.0, -0.33, 0.33, 1.0]}}
    path = write_report(tmp_path / "report.html", title="run", summary=summary,
                        images=pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA),
                        references={"cat": Image.new("RGB", (16, 16), "green")}, pairs=pairs,
                        parameters={"sfo": {"beta": 1000.0}}, served=_png("white"))
    text = path.read_text()
    assert "random encoders: not comparable to published numbers" in text
    assert "<td>0.750</td>" in text and "<td>-0.125</td>" in text  # the metric table
    assert text.count("<rect") == 3 * 2 + 3  # 3 metrics x 2 methods, 3 histogram bins
    assert text.count("<img") == 1 + 2 + 1  # reference, sft, sfo for the one prompt; the served image
    assert "a cat on a sofa" in text and "beta: 1000.0" in text and "low &lt; 0.200" in text
    assert not re.search(r"src=\"(?!data:)", text)  # self-contained: no external files


def test_verdict_pairs_the_same_images_and_says_what_it_shows():
    """sfo = [1, 1, 1, 0], sft = [0, 0, 1, 0] on the same four cells: d = [1, 1, 0, 0], +0.5 ± 0.289,
    1.7 standard errors: no difference shown."""
    from pipelines.report import verdict

    rows = [{"method": m, "sample_id": f"c{i}", "prompt": "p", "seed": 0, "subject": bool(v), "text": True}
            for m, values in (("sfo", [1, 1, 1, 0]), ("sft", [0, 0, 1, 0])) for i, v in enumerate(values)]
    text = verdict(pa.Table.from_pylist(rows), [("subject", "subject fidelity"), ("text", "text alignment")])
    assert "paired over 4 images" in text and "subject fidelity +0.500 ± 0.289 (1.7 standard errors: no difference shown)" in text
    assert "text alignment +0.000 ± 0.000" in text
    rows += [{"method": m, "sample_id": f"d{i}", "prompt": "p", "seed": 0, "subject": m == "sfo", "text": True}
             for m in ("sfo", "sft") for i in range(40)]
    assert "sfo better" in verdict(pa.Table.from_pylist(rows), [("subject", "subject fidelity")])
    # two seeds of each subject: d = [1, 1, 0, 0] in subjects c0, c0, c1, c1 -> se 0.5 (each subject once), not 0.289
    twice = [{"method": m, "sample_id": f"c{i // 2}", "prompt": "p", "seed": i % 2, "subject": bool(v), "text": True}
             for m, values in (("sfo", [1, 1, 0, 0]), ("sft", [0, 0, 0, 0])) for i, v in enumerate(values)]
    text = verdict(pa.Table.from_pylist(twice), [("subject", "subject fidelity")])
    assert "paired over 4 images of 2 subjects" in text and "+0.500 ± 0.500 (1.0 standard errors" in text
    # one subject, two seeds (the main job with --eval-subjects 1): no standard error to give, said, not raised
    one = [r for r in twice if r["sample_id"] == "c0"]
    assert verdict(pa.Table.from_pylist(one), [("subject", "subject fidelity")]).startswith(
        "Too few subjects (1, 2 paired images) to compare sfo with sft: evaluate at least 2 (--eval-subjects).")


def test_bar_chart_has_an_axis_and_values_on_the_bars():
    from pipelines.report import bar_chart

    svg = bar_chart({"methods": {"sft": {"subject": 0.21}, "sfo": {"subject": 0.25}}}, [("subject", "subject fidelity")])
    assert ">0.21</text>" in svg and ">0.25</text>" in svg  # values written on the bars
    assert ">0.5</text>" in svg and ">1</text>" in svg and ">-1</text>" not in svg  # rates: a [0, 1] axis
    assert ">-1</text>" in bar_chart({"methods": {"a": {"dino": -0.2}}}, [("dino", "DINO")])  # similarities: [-1, 1]


def test_training_curves_are_drawn_from_the_jobs_metrics(tmp_path):
    """training_curves reads each job's metrics.jsonl; the report draws one polyline per series, with the
    value range on the axis."""
    import json
    from types import SimpleNamespace

    from pipelines.report import training_curves
    from pipelines.report import line_chart

    def job(name: str, rows: list[dict]):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return SimpleNamespace(output=SimpleNamespace(run_dir=folder))

    configs = {"sft": job("sft", [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]),
               "sfo": job("sfo", [{"step": 1, "loss": 0.7, "implicit_accuracy": 0.5, "positive_rise": 0.0, "negative_rise": 0.01},
                                  {"step": 2, "loss": 0.6, "implicit_accuracy": 0.75, "positive_rise": 0.001,
                                   "negative_rise": 0.02}])}
    curves = training_curves(configs)
    rises = next(series for title, series in curves.items() if title.startswith("SFO: policy error minus"))
    assert rises == {"positive": [(1, 0.0), (2, 0.001)], "negative": [(1, 0.01), (2, 0.02)]}
    assert curves["loss (per step)"] == {"sft": [(1, 0.5), (2, 0.25)], "sfo": [(1, 0.7), (2, 0.6)]}
    assert list(curves["SFO implicit accuracy (share of pairs ranked right)"]["sfo"]) == [(1, 0.5), (2, 0.75)]
    svg = line_chart(curves["loss (per step)"], "loss")
    assert svg.count("<polyline") == 2 and ">0.7</text>" in svg and ">0.25</text>" in svg
    assert line_chart({"sfo": []}, "empty") == ""
    assert training_curves({"sft": SimpleNamespace(output=SimpleNamespace(run_dir=tmp_path / "absent"))}) == {}


def test_the_picked_grid_shows_the_cells_where_sfo_and_sft_disagree():
    from pipelines.report import disagreement_section, disagreements

    verdicts = {("a", 0): (True, False), ("b", 0): (False, True), ("c", 0): (True, True), ("a", 1): (True, True)}
    rows = [{"method": m, "subject": s, "prompt_index": 0, "prompt": "p", "seed": seed, "image_png": _png("red"),
             "oracle_subject": v[i], "oracle_text": True}
            for (s, seed), v in verdicts.items() for i, m in enumerate(("sfo", "sft"))]
    table = pa.Table.from_pylist(rows)
    assert disagreements(table) == ([("a", 0, 0)], [("b", 0, 0)])
    section = "".join(disagreement_section(table, {}, ["sft", "sfo"]))
    assert "1 with SFO right and 1 with SFT right" in section and section.count("<img") == 2 * 2
    agreeing = pa.Table.from_pylist([r for r in rows if r["subject"] in ("c",)])
    assert disagreement_section(agreeing, {}, ["sft", "sfo"]) == []
    assert disagreements(agreeing.drop_columns(["oracle_subject"])) == ([], [])


def test_grid_shows_each_images_oracle_verdicts_when_the_table_has_them():
    from pipelines.report import image_grid

    rows = [{"method": m, "subject": "t1", "prompt_index": 0, "prompt": "a red square", "seed": 0,
             "image_png": _png("red"), "oracle_subject": m == "sfo", "oracle_text": True} for m in ("sft", "sfo")]
    grid = image_grid(pa.Table.from_pylist(rows), {}, ["sft", "sfo"])
    assert "subject &#10007; text &#10003;" in grid and "subject &#10003; text &#10003;" in grid
    plain = image_grid(pa.Table.from_pylist([{k: v for k, v in r.items() if not k.startswith("oracle")} for r in rows]),
                       {}, ["sft", "sfo"])
    assert "&#10003;" not in plain and plain.count("<img") == 2
    floor = image_grid(pa.Table.from_pylist(rows), {}, ["base", "sft", "sfo"])  # base sampled on fewer subjects
    assert floor.count("not sampled") == 1 and floor.count("<img") == 2
