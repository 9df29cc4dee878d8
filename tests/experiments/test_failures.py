"""experiments.failures: an evaluation's images broken down by the reference's details."""

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments import failures
from sfo.records import encode_png
from sfo.shapes.oracle import judge, read_image
from sfo.shapes.world import render, world_triplets


def _evaluation(folder, cells):
    """Two methods: 'exact' draws each target as the world does, 'striped' draws every subject in hstripes."""
    rows = []
    for cell in cells:
        striped = dataclasses.replace(cell.subject, pattern="hstripes")
        for method, image in (("exact", cell.target), ("striped", render(striped, cell.context))):
            verdict = judge(read_image(image), cell.subject, cell.context)
            rows.append({"method": method, "sample_id": cell.sample_id, "image_png": encode_png(image),
                         **{k: verdict[k] for k in ("subject", "pattern", "accent")}})
    (folder / "images").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "images" / "part-0.parquet")


def test_breakdown_counts_what_each_method_drew_for_each_reference_pattern(tmp_path, capsys):
    cells = world_triplets(24, seed=3000)
    _evaluation(tmp_path, cells)
    assert failures.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "## exact (24 images)" in printed and "## striped (24 images)" in printed

    rows = pq.read_table(tmp_path / "images").to_pylist()
    result = failures.breakdown(rows)
    patterns = {c.subject.pattern for c in cells}
    assert len(patterns) > 1  # the cells cover more than one pattern, so the breakdown has rows to tell apart
    for pattern in patterns:
        n = sum(c.subject.pattern == pattern for c in cells)
        assert result["exact"]["confusion"][(pattern, pattern)] == n  # drawn as the world draws it: read back
        assert result["striped"]["confusion"][(pattern, "hstripes")] == n
        assert result["exact"]["by"]["pattern"][f"{pattern}/subject"] == 1.0
        assert result["striped"]["by"]["pattern"][f"{pattern}/pattern"] == (1.0 if pattern == "hstripes" else 0.0)


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(SystemExit):
        failures.main([str(tmp_path)])  # no images/*.parquet
    cells = world_triplets(2, seed=3000)
    _evaluation(tmp_path, cells)
    with pytest.raises(SystemExit):
        failures.main([str(tmp_path), "--methods", "sfo"])
