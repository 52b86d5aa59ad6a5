"""Toy-world tasks: renderer and rewards agree, partial credit is exact, splits are fixed and disjoint."""
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import toy_model
import toy_tasks as tw
import toyworld

S = tw.IMAGE_SIZE


def rendered(task: str, prompt: str, seeds=range(8)) -> torch.Tensor:
    return torch.stack([tw.render(task, prompt, seed) for seed in seeds])  # [len(seeds),3,S,S]


@pytest.mark.parametrize("task", tw.TASKS)
def test_ground_truth_scores_one(task):
    prompts = tw.prompt_split(task, "test") + tw.prompt_split(task, "train")[:300]
    rng = np.random.default_rng(1)
    images = torch.stack([tw.render(task, p, rng) for p in prompts])
    rewards = tw.score(task, images, prompts)
    assert rewards.dtype == torch.float32 and rewards.shape == (len(prompts),)
    assert rewards.min().item() == 1.0


@pytest.mark.parametrize("task", tw.TASKS)
def test_blank_and_noise_score_low(task):
    prompts = tw.prompt_split(task, "test")
    blank = torch.ones(len(prompts), 3, S, S)
    noise = torch.rand(len(prompts), 3, S, S, generator=torch.Generator().manual_seed(0))
    assert tw.score(task, blank, prompts).max().item() == 0.0  # quality too: an empty canvas has no content
    assert tw.score(task, noise, prompts).mean().item() <= 0.1


@pytest.mark.parametrize("prompt, drawn, expected", [
    ("a photo of a circle", "a photo of a square", 0),  # shape
    ("a photo of a triangle and a circle", "a photo of a triangle and a square", 1 / 2),  # one of two shapes
    ("a photo of a square and a circle", "a photo of a square", 1 / 2),  # missing object
    ("a photo of three red squares", "a photo of two red squares", 2 / 3),  # count
    ("a photo of three red squares", "a photo of four red squares", 2 / 3),  # count
    ("a photo of three red squares", "a photo of three blue squares", 1 / 3),  # colour (so count of red too)
    ("a photo of a red square", "a photo of a blue square", 1 / 2),  # colour
    ("a photo of a red square and a blue circle", "a photo of a red square and a green circle", 3 / 4),
    ("a photo of a red square left of a blue circle", "a photo of a red square right of a blue circle", 4 / 5),
    ("a photo of a red square left of a blue circle", "a photo of a red square above a blue circle", 4 / 5),
    ("a photo of a red square left of a blue circle", "a photo of a green square left of a blue circle", 3 / 5),
])
def test_geneval_partial_credit(prompt, drawn, expected):
    rewards = tw.score("geneval", rendered("geneval", drawn), [prompt] * 8)
    assert rewards.tolist() == pytest.approx([expected] * 8)


@pytest.mark.parametrize("prompt, drawn, expected", [
    ('a sign that says "K7T"', 'a label reading "K7Z"', 2 / 3),  # wrong character
    ('a sign that says "K7T"', 'a sign that says "K7"', 2 / 3),  # missing character
    ('a sign that says "K7T"', 'a sign that says "KX7T"', 2 / 3),  # extra character inside
    ('a sign that says "K7T"', 'a sign that says "K7TJ"', 1.0),  # contains the target
    ('a poster with the text "LJ4Y"', 'a label reading "LJ"', 1 / 2),
    ('a poster with the text "LJ"', 'a label reading "TY"', 0.0),
])
def test_ocr_partial_credit(prompt, drawn, expected):
    rewards = tw.score("ocr", rendered("ocr", drawn), [prompt] * 8)
    assert rewards.tolist() == pytest.approx([expected] * 8)


def test_quality_counts_specks_closed_form():
    """A lone pixel of another class costs 4 defects: itself (no neighbour of its class) and the background
    pixels left of, right of and below it (one differing side neighbour: only a triangle's apex draws that,
    and only from above). Far apart, specks add up: score = exp(-4 n / DEFECT_SCALE)."""
    image = torch.ones(3, S, S)
    image[:, 10:18, 10:18] = torch.tensor(tw.COLORS["blue"])[:, None, None]  # a clean 8 px square
    assert tw.score("quality", image[None], ["ignored"]).item() == 1.0
    specks = [(2, 2, tw.COLORS["red"]), (2, 28, (0.5, 0.5, 0.5)), (28, 2, tw.BLACK), (28, 28, tw.COLORS["blue"])]
    for n, (y, x, color) in enumerate(specks, 1):  # grey: off the palette, and still a lone class of its own
        image[:, y, x] = torch.tensor(color)
        defects, content = tw.quality_defects(image[None])
        assert (defects.item(), content.item()) == (4 * n, 64)  # a speck is no content
        assert tw.score("quality", image[None], ["ignored"]).item() == pytest.approx(math.exp(-4 * n / tw.DEFECT_SCALE))


def degrade(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Clean renders [B,3,S,S] -> blurred, speckled (3 red pixels on the background), off-palette (every
    non-white pixel moved 0.43 off its colour) or jagged (3 pixels toggled along object edges)."""
    background = (images == 1).all(1)  # [B,S,S]
    if kind == "blur":
        return torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "off-palette":
        return torch.where(background[:, None], images, 0.5 * images + 0.25)
    out = images.clone()
    for image, white, source in zip(out, background, images):
        near_ink, near_white = (torch.nn.functional.max_pool2d(m.float()[None], 3, 1, padding=1)[0].bool()
                                for m in (~white, white))  # [S,S]: the pixel or one of its 8 neighbours is ...
        edge = near_ink & near_white
        candidates = torch.nonzero(white if kind == "speckle" else edge)
        for y, x in candidates[torch.randperm(len(candidates), generator=generator)[:3]].tolist():
            if kind == "speckle":
                image[:, y, x] = torch.tensor(tw.COLORS["red"])
            elif white[y, x]:                                      # grow: copy the colour of an inked neighbour
                ny, nx = torch.nonzero(~white[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2])[0].tolist()
                image[:, y, x] = source[:, max(y - 1, 0) + ny, max(x - 1, 0) + nx]
            else:                                                  # erode
                image[:, y, x] = 1.0
    return out


@pytest.mark.parametrize("kind", ["blur", "speckle", "off-palette", "jagged"])
def test_quality_ranks_degraded_renders_below_clean(kind):
    prompts = tw.prompt_split("quality", "test")[:32]
    clean = torch.stack([tw.render("quality", p, i) for i, p in enumerate(prompts)])
    degraded = degrade(clean, kind, torch.Generator().manual_seed(0))
    assert not torch.equal(degraded, clean)
    assert tw.score("quality", clean, prompts).min().item() == 1.0
    scores = tw.score("quality", degraded, prompts)
    assert scores.max().item() < 1.0 and scores.mean().item() < 0.5


def test_quality_penalises_blur():
    prompts = tw.prompt_split("quality", "test")[:32]
    sharp = torch.stack([tw.render("quality", p, i) for i, p in enumerate(prompts)])
    blurred = torch.nn.functional.avg_pool2d(sharp, 3, stride=1, padding=1, count_include_pad=False)
    assert tw.score("quality", blurred, prompts).mean().item() < 0.5


def test_every_shape_size_and_colour_reads_back():
    cases = list(itertools.product(tw.SHAPES, tw.SIZES, tw.COLORS))
    images = torch.ones(len(cases), 3, S, S)
    for image, (shape, size, color) in zip(images, cases):
        image[:, 5:5 + size, 9:9 + size][:, torch.from_numpy(tw.shape_mask(shape, size))] = \
            torch.tensor(tw.COLORS[color])[:, None]
    found = tw.read_objects(images)
    assert [[(f.shape, f.color) for f in objects] for objects in found] == [[(s, c)] for s, _, c in cases]


def test_label_components_closed_form():
    masks = np.array([[1, 1, 0, 0],
                      [0, 1, 0, 1],
                      [0, 0, 1, 0],  # touches its neighbours only diagonally: its own component
                      [1, 0, 0, 1]], bool)[None]
    labels = tw.label_components(masks)
    assert (labels[~masks] == 0).all()
    assert len(np.unique(labels[masks])) == 5
    assert labels[0, 0, 0] == labels[0, 0, 1] == labels[0, 1, 1]


def test_render_is_seeded_and_diverse():
    prompt = "a photo of a red square"
    assert torch.equal(tw.render("geneval", prompt, 3), tw.render("geneval", prompt, 3))
    assert len({tw.render("geneval", prompt, seed).numpy().tobytes() for seed in range(8)}) == 8
    ocr = {tw.render("ocr", 'a sign that says "K7T"', seed).numpy().tobytes() for seed in range(8)}
    assert len(ocr) >= 4


def test_font_is_legible_by_construction():
    glyphs = tw.TEMPLATES.astype(bool)  # [A,5,3]
    assert glyphs.any(1).all() and glyphs.any(2).all()  # every glyph touches all four sides of its box
    assert min((a != b).sum() for a, b in itertools.combinations(glyphs, 2)) >= 4


def test_splits_are_disjoint_and_sized():
    for task in tw.TASKS:
        train, test = tw.prompt_split(task, "train"), tw.prompt_split(task, "test")
        assert len(set(train)) == len(train) and len(set(test)) == len(test)
        assert not set(train) & set(test)
    sizes = {task: (len(tw.prompt_split(task, "train")), len(tw.prompt_split(task, "test"))) for task in tw.TASKS}
    assert sizes == {"geneval": (1384, 155), "ocr": (2000, 200), "quality": (2768, 200)}
    ocr_strings = {split: {tw.parse_ocr(p) for p in tw.prompt_split("ocr", split)} for split in ("train", "test")}
    assert not ocr_strings["train"] & ocr_strings["test"]
    test_tags = {tw.parse_geneval(p).tag for p in tw.prompt_split("geneval", "test")}
    assert test_tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    for split in ("train", "test"):  # quality prompts come from the same split of the other tasks
        sources = {*tw.prompt_split("geneval", split), *tw.prompt_split("ocr", split)}
        assert set(tw.prompt_split("quality", split)) <= sources


def test_prompt_files_are_deterministic_and_parse_back(tmp_path):
    paths = tw.write_prompt_files(tmp_path / "here")
    script = Path(toyworld.__file__)
    subprocess.run([sys.executable, script, "prompts", tmp_path / "fresh"], check=True, capture_output=True)
    names = ["geneval_train.jsonl", "geneval_test.jsonl", "ocr_train.txt", "ocr_test.txt",
             "quality_train.txt", "quality_test.txt"]
    assert [p.name for p in paths] == names
    for path in paths:
        assert path.read_bytes() == (tmp_path / "fresh" / path.name).read_bytes()
        lines = path.read_text().splitlines()
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in lines]
            assert all(r == tw.geneval_metadata(tw.parse_geneval(r["prompt"])) for r in records)
            assert [r["prompt"] for r in records] == tw.prompt_split("geneval", path.stem.split("_")[1])
        else:
            task, split = path.stem.split("_")
            assert lines == tw.prompt_split(task, split)
            assert all(tw.render(task, p).shape == (3, S, S) for p in lines[:50])


def test_geneval_metadata_layout():
    position = tw.geneval_metadata(tw.parse_geneval("a photo of a red square left of a blue circle"))
    assert position == {"tag": "position", "include": [
        {"class": "circle", "count": 1, "color": "blue"},
        {"class": "square", "count": 1, "color": "red", "position": ["left of", 0]}],
        "prompt": "a photo of a red square left of a blue circle"}
    counting = tw.geneval_metadata(tw.parse_geneval("a photo of three green triangles"))
    assert counting["include"] == [{"class": "triangle", "count": 3, "color": "green"}]
    assert counting["exclude"] == [{"class": "triangle", "count": 4, "color": "green"}]


def test_bad_inputs_raise_one_line_errors():
    image = torch.ones(1, 3, S, S)
    cases = [
        (lambda: tw.score("pickscore", image, ["x"]), "known tasks: geneval, ocr, quality"),
        (lambda: tw.render("aesthetic", "x"), "known tasks: geneval, ocr, quality"),
        (lambda: tw.score("geneval", image, ["a photo of a dog"]), "'a photo of a dog' is not in the geneval"),
        (lambda: tw.score("geneval", image, ["a photo of a red square"] * 2), "expected images [2,3,32,32]"),
        (lambda: tw.score("ocr", image, ['a sign that says "AB"']), "is not in the ocr grammar"),  # A: not a glyph
        (lambda: tw.render("ocr", 'a sign that says "K7T'), "is not in the ocr grammar"),
        (lambda: tw.render("quality", "a cat"), "'a cat' is not in the quality"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as error:
            call()
        assert message in str(error.value) and "\n" not in str(error.value)
    assert tw.score("quality", image, ["any prompt at all"]).item() == 0.0  # quality ignores its prompt


def test_adopt_teachers_ships_each_run_with_checksums_and_log(tmp_path):
    """`toyworld.py teachers RUNS` copies RUNS/<task>/lora.safetensors to <task>.safetensors, logs the run's
    settings in build.json and rewrites SHA256SUMS so that verify_assets accepts the new files."""
    runs, folder = tmp_path / "teacher", tmp_path / "toy"
    folder.mkdir()
    (folder / "ocr_test.txt").write_text('a sign that says "K7"\n')
    for i, task in enumerate(tw.TASKS):
        (runs / task).mkdir(parents=True)
        (runs / task / "lora.safetensors").write_bytes(bytes([i]) * 64)     # contents only need to differ
        (runs / task / "config.json").write_text(json.dumps({"config": {"algo": "grpo", "reward": f"toy_{task}",
                                                                        "lr": 1e-3}, "git_sha": "abc"}))
        (runs / task / "metrics.jsonl").write_text("{}\n" * (i + 2))
    toyworld.adopt_teachers(folder, runs)
    names = [f"{task}.safetensors" for task in tw.TASKS] + ["ocr_test.txt"]
    toy_model.verify_assets(folder, names)
    assert [(folder / f"{task}.safetensors").read_bytes()[0] for task in tw.TASKS] == list(range(len(tw.TASKS)))
    log = json.loads((folder / "build.json").read_text())["log"]
    assert [(e["stage"], e["iterations"], e["reward"], e["git_sha"]) for e in log] == \
        [(f"teacher {task}", i + 2, f"toy_{task}", "abc") for i, task in enumerate(tw.TASKS)]
    (folder / "ocr.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="toy asset corrupted"):
        toy_model.verify_assets(folder, names)
    with pytest.raises(FileNotFoundError, match="no teacher LoRA at .*quality.*toy_paper_table.sh"):
        (runs / "quality" / "lora.safetensors").unlink()
        toyworld.adopt_teachers(folder, runs)


def test_paper_table_mean_and_standard_error_over_seeds(tmp_path):
    """`toyworld.py table OUT` merges the evaluate.py parts of runs/toy_paper_table.sh: a seeded row's cells are
    the mean and std(ddof=1) / sqrt(n) of its seeds; a row trained once has no error bar."""
    def part(name, table):
        (tmp_path / "eval" / name).mkdir(parents=True)
        record = {"table": table, "average": {row: sum(m.values()) / len(m) for row, m in table.items()}}
        (tmp_path / "eval" / name / "results.json").write_text(json.dumps(record))
    part("base", {"base": {"geneval": 0.5, "ocr": 0.25}, "teacher_ocr": {"geneval": 0.5, "ocr": 0.75}})
    part("s0", {"opd_s0": {"geneval": 0.5, "ocr": 0.6}})
    part("s1", {"opd_s1": {"geneval": 0.7, "ocr": 0.6}})
    for run, n in [("teacher/ocr", 7), ("opd_s0", 5), ("opd_s1", 4)]:
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "metrics.jsonl").write_text("{}\n" * n)
    lines = toyworld.paper_table(tmp_path).splitlines()
    assert lines[0] == "| model | seeds | iterations | geneval | ocr | average |"
    assert lines[2:] == ["| base | 1 | - | 0.500 | 0.250 | 0.375 |",
                         "| teacher_ocr | 1 | 7 | 0.500 | 0.750 | 0.625 |",
                         "| opd | 2 | 4-5 | 0.600 ± 0.100 | 0.600 ± 0.000 | 0.600 ± 0.050 |"]  # SE of (a, b) = |a - b| / 2
    assert toyworld.mean_se([1.0, 2.0, 3.0, 6.0]) == pytest.approx((3.0, math.sqrt(14 / 3 / 4)))
