"""DreamBench (Ruiz et al., 2023) in the google/dreambooth layout: subjects, reference photos, prompts.

    dataset/
      <subject>/00.jpg ...          reference photos of the subject
      prompts_and_classes.txt       a ``subject_name,class`` CSV block, then "Object Prompts" and
                                    "Live Subject Prompts" as Python-style lines
                                    ``'a {0} {1} in the jungle'.format(unique_token, class_token)``

30 subjects x 25 prompts = 750 (subject, prompt) pairs; live subjects (cats, dogs) get the live
prompts. Zero-shot methods have no unique token: a prompt is rendered with the class word
("a backpack in the jungle") or, as the SFO paper does (App. D.3, after Diptych Prompting), with
a descriptive subject name ("a 'Bon appetit' bowl in the jungle").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

PROMPTS_FILE = "prompts_and_classes.txt"
LIVE_CLASSES = ("cat", "dog")  # DreamBench's live subjects: the cats and dogs
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
OBJECT_HEADER = "object prompts"
LIVE_HEADER = "live subject prompts"
CSV_HEADER = "subject_name,class"
_PROMPT_LINE = re.compile(r"""^\s*(['"])(?P<template>.*)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")

# SFO paper App. D.3: descriptive subject names used for every zero-shot method. The paper names
# "dog1", which is the dataset's "dog" folder; its curly quotes are written as ASCII quotes here.
DESCRIPTIVE_NAMES: dict[str, str] = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "bear plushie",
    "berry_bowl": "'Bon appetit' bowl", "can": "'Transatlantic IPA' can", "candle": "jar candle",
    "cat": "tabby cat", "cat2": "grey cat", "clock": "number '3' clock", "colorful_sneaker": "colorful sneaker",
    "dog": "fluffy dog", "dog2": "fluffy dog", "dog3": "curly-haired dog", "dog5": "long-haired dog",
    "dog6": "puppy", "dog7": "dog", "dog8": "dog", "duck_toy": "duck toy", "fancy_boot": "fringed cream boot",
    "grey_sloth_plushie": "grey sloth plushie", "monster_toy": "monster toy", "pink_sunglasses": "sunglasses",
    "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon character", "robot_toy": "robot toy",
    "shiny_sneaker": "sneaker", "teapot": "clay teapot", "vase": "tall vase", "wolf_plushie": "wolf plushie",
}


@dataclass(frozen=True)
class Subject:
    name: str  # folder name, e.g. "backpack_dog"
    class_word: str  # e.g. "backpack"
    live: bool  # cats and dogs: the live-subject prompts apply
    images: tuple[Path, ...]  # reference photos, sorted


@dataclass(frozen=True)
class PromptCase:
    subject: str
    index: int  # position in the subject's prompt list (0..24)
    template: str  # "a {0} {1} in the jungle"
    prompt: str  # rendered without the unique token


@dataclass(frozen=True)
class DreamBench:
    root: Path
    subjects: dict[str, Subject]  # in file order
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]

    def subject_name(self, subject: str, descriptive: bool = False) -> str:
        """The words that fill ``{1}``: the class word, or the paper's descriptive name (App. D.3)."""
        if descriptive:
            if subject not in DESCRIPTIVE_NAMES:
                raise KeyError(f"dreambench: no descriptive name for subject {subject!r}")
            return DESCRIPTIVE_NAMES[subject]
        return self.subjects[subject].class_word

    def cases(self, subject: str, descriptive: bool = False) -> list[PromptCase]:
        """The subject's prompts (25 in DreamBench), rendered."""
        templates = self.live_templates if self.subjects[subject].live else self.object_templates
        name = self.subject_name(subject, descriptive)
        return [PromptCase(subject, i, t, render(t, name)) for i, t in enumerate(templates)]

    def all_cases(self, descriptive: bool = False) -> list[PromptCase]:
        return [c for s in self.subjects for c in self.cases(s, descriptive)]

    def references(self, subject: str, size: int | None = None) -> list[Image.Image]:
        """The subject's reference photos as RGB images (resized to size x size when given)."""
        images = []
        for path in self.subjects[subject].images:
            with Image.open(path) as image:
                image = image.convert("RGB")
            images.append(image.resize((size, size), Image.BICUBIC) if size else image)
        return images


def render(template: str, name: str, unique_token: str = "") -> str:
    """``'a {0} {1} in the jungle'`` -> ``'a backpack in the jungle'`` (empty unique token, spaces collapsed)."""
    return " ".join(template.format(unique_token, name).split())


def parse_prompts_file(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """Parses ``prompts_and_classes.txt``: ({subject: class}, object templates, live templates)."""
    classes: dict[str, str] = {}
    templates: dict[str, list[str]] = {OBJECT_HEADER: [], LIVE_HEADER: []}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        lowered = line.lower()
        if lowered == CSV_HEADER:
            section = "classes"
        elif lowered in templates:
            section = lowered
        elif lowered == "prompts":
            section = None
        elif section == "classes" and "," in line:
            subject, class_word = (part.strip() for part in line.split(",", 1))
            classes[subject] = class_word
        elif section in templates and (match := _PROMPT_LINE.match(line)):
            templates[section].append(match.group("template"))
    if not classes:
        raise ValueError(f"{PROMPTS_FILE}: no '{CSV_HEADER}' block found")
    for header, found in templates.items():
        if not found:
            raise ValueError(f"{PROMPTS_FILE}: no prompts under '{header}'")
    return classes, templates[OBJECT_HEADER], templates[LIVE_HEADER]


def load_dreambench(root: str | Path) -> DreamBench:
    """Reads a DreamBench ``dataset`` folder; fails naming the missing file or subject folder."""
    root = Path(root)
    prompts = root / PROMPTS_FILE
    if not prompts.is_file():
        raise FileNotFoundError(f"dreambench: {str(prompts)!r} does not exist (expected the google/dreambooth "
                                "'dataset' folder with prompts_and_classes.txt)")
    classes, object_templates, live_templates = parse_prompts_file(prompts.read_text(encoding="utf-8"))
    subjects = {}
    for name, class_word in classes.items():
        folder = root / name
        images = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)) if folder.is_dir() else ()
        if not images:
            raise FileNotFoundError(f"dreambench: subject {name!r} has no reference images under {str(folder)!r}")
        subjects[name] = Subject(name, class_word, class_word in LIVE_CLASSES, images)
    return DreamBench(root, subjects, tuple(object_templates), tuple(live_templates))
