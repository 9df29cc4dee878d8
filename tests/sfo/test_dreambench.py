"""DreamBench parsing: the shared google/dreambooth folder (30 x 25) and a small one built here."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sfo.dreambench import DESCRIPTIVE_NAMES, load_dreambench, parse_prompts_file, render
from tests.conftest import shared_path

LIVE = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}


def write_dreambench(root: Path, prompts: int = 3, size: int = 32) -> Path:
    """A DreamBench-layout folder: subjects backpack (object, 2 photos) and dog (live, 1 photo)."""
    photos = {"backpack": [(200, 30, 30), (180, 40, 40)], "dog": [(120, 90, 40)]}
    for subject, colours in photos.items():
        (root / subject).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (size + 8, size), colour).save(root / subject / f"{i:02d}.jpg")
    line = "'a {{0}} {{1}} {}'.format(unique_token, class_token),"
    objects = [line.format(w) for w in ("in the jungle", "in the snow", "on the beach")[:prompts]]
    live = [line.format(w) for w in ("wearing a red hat", "in the snow", "on the beach")[:prompts]]
    text = ["Classes", "", "subject_name,class", "backpack,backpack", "dog,dog", "", "Prompts", "",
            "Object Prompts", "", "prompt_list = [", *objects, "]", "", "Live Subject Prompts", "", "prompt_list = [",
            *live, "'a red {0} {1}'.format(unique_token, class_token)", "]"]
    (root / "prompts_and_classes.txt").write_text("\n".join(text) + "\n")
    return root


def test_shared_dreambench_has_30_subjects_of_25_prompts():
    bench = load_dreambench(shared_path("data", "dreambench", "dataset"))
    assert len(bench.subjects) == 30 and len(bench.object_templates) == 25 and len(bench.live_templates) == 25
    assert {s for s, v in bench.subjects.items() if v.live} == LIVE
    assert len(bench.all_cases()) == 750 and all(len(bench.cases(s)) == 25 for s in bench.subjects)
    assert sum(len(s.images) for s in bench.subjects.values()) == 158  # shared/data/README.md
    assert set(DESCRIPTIVE_NAMES) == set(bench.subjects)
    assert bench.cases("backpack")[0].prompt == "a backpack in the jungle"
    assert bench.cases("berry_bowl", descriptive=True)[0].prompt == "a 'Bon appetit' bowl in the jungle"
    assert bench.cases("dog")[10].prompt == "a dog wearing a red hat"  # live prompt 11
    assert bench.cases("bear_plushie")[20].prompt == "a red stuffed animal"


def test_small_folder_and_rendering(tmp_path):
    bench = load_dreambench(write_dreambench(tmp_path / "dataset"))
    assert list(bench.subjects) == ["backpack", "dog"]
    assert not bench.subjects["backpack"].live and bench.subjects["dog"].live
    assert [c.prompt for c in bench.cases("dog")] == [
        "a dog wearing a red hat", "a dog in the snow", "a dog on the beach", "a red dog"]
    assert [c.prompt for c in bench.cases("dog", descriptive=True)][-1] == "a red fluffy dog"
    refs = bench.references("backpack", size=16)
    assert len(refs) == 2 and refs[0].size == (16, 16)
    assert render("a {0} {1} in the snow", "cat", "sks") == "a sks cat in the snow"


def test_bad_folders_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts_and_classes.txt"):
        load_dreambench(tmp_path)
    root = write_dreambench(tmp_path / "d")
    for photo in (root / "dog").iterdir():
        photo.unlink()
    with pytest.raises(FileNotFoundError, match="subject 'dog' has no reference images"):
        load_dreambench(root)
    with pytest.raises(ValueError, match="no prompts under 'live subject prompts'"):
        parse_prompts_file("subject_name,class\na,b\nObject Prompts\n'a {0} {1}'.format(unique_token, class_token)\n")
