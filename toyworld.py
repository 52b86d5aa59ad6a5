"""The toy world: tiny text-to-image tasks with programmatic rewards (DESIGN section 5).

SD3.5-M cannot be downloaded here, so the project ships a miniature of the paper's setting. This file
first defines the TASKS: for each, a closed prompt grammar, fixed train/test prompt splits, a renderer of
ground-truth images (the data a toy base is pre-trained on) and a reward read from pixels.

    geneval  ~ GenEval (composition). Coloured squares, circles and triangles; GenEval's six tags
             (single_object, two_object, counting, colors, position, color_attr) and its metadata
             layout. Read back by colour segmentation + connected components + a shape classifier.
             Reward = fraction of satisfied constraints. Deviation: GenEval scores each image 0/1;
             partial credit gives RL a denser signal. Unlike GenEval, counting and position name colours.
    ocr      ~ Flow-GRPO's OCR task. `a sign that says "K7T"`: 2-4 characters of a 12-glyph 3x5 bitmap
             font drawn at 2x, black on white. Reward = 1 - min(edit distance, len) / len of the string
             read back by template matching; 1 if the read string contains the target.
    quality  ~ DeQA / aesthetic score: task-agnostic and prompt-agnostic. Rewards pure palette pixels,
             no mid-tones, no isolated specks, and some content (an empty canvas scores 0).
PickScore has no toy counterpart.

Conventions: images are float RGB tensors [B, 3, S, S] in [0, 1], S = IMAGE_SIZE = 32, white background;
coordinates are (row y, column x), y grows downward, so "above" means a smaller y. Rewards are float32
in [0, 1], one per image. Randomness comes from numpy Generators (or int seeds) passed in.

Demo:  python toyworld.py prompts data/toy     (writes {task}_{train,test}.{txt,jsonl})
       python toyworld.py rewards              (mean reward on ground truth / noise / blank per task)
       python toyworld.py build                (regenerate the base and prompt files into toy/)
       python toyworld.py teachers out/toy_table/teacher   (ship the Flow-GRPO teachers of runs/toy_paper_table.sh)
"""
import argparse
import functools
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import file_sha256
from rewards import ocr_score   # Flow-GRPO's OCR rule: 1 - min(edit distance, len) / len

IMAGE_SIZE = 32
TASKS = ("geneval", "ocr", "quality")

# ====================================================================================================
# Tasks
# ====================================================================================================

WHITE, BLACK = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
COLORS = {  # corners of the RGB cube: every pair is at distance >= 1
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0),
}
SPLIT_SEED = 0


def _offgrammar(prompt: str, task: str) -> ValueError:
    return ValueError(f"prompt {prompt!r} is not in the {task} grammar")


def _canvas() -> np.ndarray:
    return np.ones((3, IMAGE_SIZE, IMAGE_SIZE), np.float32)  # [3,S,S] white


# ---------------------------------------------------------------------------------------------------
# geneval: grammar
# ---------------------------------------------------------------------------------------------------

SHAPES = ("square", "circle", "triangle")
NUMBERS = ("one", "two", "three", "four")
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}  # (dy, dx) of A from B


@dataclass(frozen=True)
class Item:
    """One object mention: `a red square`, `three red squares`, `a circle`."""
    shape: str
    color: str | None = None
    count: int | None = None  # None: at least one; n: exactly n (counting prompts)


@dataclass(frozen=True)
class Composition:
    """A parsed geneval prompt; with a relation, items[0] <relation> items[1]."""
    tag: str
    items: tuple[Item, ...]
    relation: str | None = None


def _phrase(item: Item) -> str:
    words = [NUMBERS[item.count - 1] if item.count else "a", item.color, item.shape]
    return " ".join(w for w in words if w) + ("s" if (item.count or 1) > 1 else "")


def geneval_prompt(comp: Composition) -> str:
    joiner = f" {comp.relation} " if comp.relation else " and "
    return "a photo of " + joiner.join(_phrase(item) for item in comp.items)


def _compositions():
    colored = [Item(s, c) for c in COLORS for s in SHAPES]
    yield from (Composition("single_object", (Item(s),)) for s in SHAPES)
    yield from (Composition("two_object", (Item(a), Item(b))) for a, b in itertools.permutations(SHAPES, 2))
    yield from (Composition("counting", (Item(s, c, n),)) for n in range(1, 5) for c in COLORS for s in SHAPES)
    yield from (Composition("colors", (item,)) for item in colored)
    yield from (Composition("position", pair, rel)
                for pair in itertools.permutations(colored, 2) for rel in RELATIONS)
    yield from (Composition("color_attr", (a, b)) for a, b in itertools.product(colored, colored)
                if a.shape != b.shape)


@functools.cache
def geneval_grammar() -> dict[str, Composition]:
    """Every geneval prompt (the grammar is closed and small), in a fixed order."""
    return {geneval_prompt(comp): comp for comp in _compositions()}


def parse_geneval(prompt: str) -> Composition:
    if prompt not in geneval_grammar():
        raise _offgrammar(prompt, "geneval")
    return geneval_grammar()[prompt]


def geneval_metadata(comp: Composition) -> dict:
    """GenEval's *_metadata.jsonl layout: position objects are [B, A with ("rel", 0)]; counting excludes n+1."""
    def entry(item: Item) -> dict:
        return {"class": item.shape, "count": item.count or 1} | ({"color": item.color} if item.color else {})
    include = [entry(item) for item in comp.items]
    if comp.relation:
        include = [include[1], include[0] | {"position": [comp.relation, 0]}]
    meta = {"tag": comp.tag, "include": include}
    if comp.tag == "counting":
        meta["exclude"] = [include[0] | {"count": include[0]["count"] + 1}]
    return meta | {"prompt": geneval_prompt(comp)}


# ---------------------------------------------------------------------------------------------------
# geneval: drawing
# ---------------------------------------------------------------------------------------------------

SIZES = (7, 8, 9)  # side of an object's bounding box in pixels
GAP = 2  # min empty pixels between objects' boxes, so same-colour objects never touch
RENDER_CONE, READ_CONE = 0.8, 0.5  # cos of the max angle off the relation's axis (GenEval reads at 60 deg)


@functools.cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """bool [size, size]; the triangle points up, so its mass sits low (what tells it from a circle)."""
    y, x = np.mgrid[:size, :size] - (size - 1) / 2  # centred pixel coordinates
    masks = {
        "square": np.ones((size, size), bool),
        "circle": y**2 + x**2 <= ((size - 1) / 2 + 0.3) ** 2,  # the 0.3 keeps the fill well below a square's
        "triangle": np.abs(x) <= (y + (size - 1) / 2 + 1) / 2,  # row r is ~r+1 wide
    }
    return masks[shape]


def _relation_holds(rel: str, centre_a: np.ndarray, centre_b: np.ndarray, cone: float) -> bool:
    offset = centre_a - centre_b  # [2] (dy, dx)
    norm = np.linalg.norm(offset)
    return bool(norm > 0 and offset @ np.array(RELATIONS[rel]) > cone * norm)


def _draw_objects(objects: list[tuple[str, str]], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Place (shape, colour) objects at random non-touching spots; -> image [3,S,S], centroids [N,2]."""
    while True:
        sizes = rng.choice(SIZES, len(objects))
        corners = [rng.integers(1, IMAGE_SIZE - s, size=2) for s in sizes]  # (y, x) of each box, 1 px margin
        pairs = itertools.combinations(range(len(objects)), 2)
        if all(_apart(corners[i], sizes[i], corners[j], sizes[j]) for i, j in pairs):
            break
    image, centroids = _canvas(), []
    for (shape, color), (y, x), s in zip(objects, corners, sizes):
        mask = shape_mask(shape, s)
        image[:, y:y + s, x:x + s][:, mask] = np.array(COLORS[color])[:, None]
        centroids.append(np.argwhere(mask).mean(0) + (y, x))
    return image, np.array(centroids)


def _apart(corner_a, size_a, corner_b, size_b) -> bool:
    """Two boxes are GAP pixels apart along y or along x."""
    return any(corner_a[k] >= corner_b[k] + size_b + GAP or corner_b[k] >= corner_a[k] + size_a + GAP
               for k in (0, 1))


def render_geneval(prompt: str, rng: np.random.Generator) -> np.ndarray:
    """[3,S,S]: exactly the objects the prompt names; unnamed colours, sizes and spots are random."""
    comp = parse_geneval(prompt)
    objects = [(item.shape, item.color or str(rng.choice(list(COLORS))))
               for item in comp.items for _ in range(item.count or 1)]
    while True:
        image, centroids = _draw_objects(objects, rng)
        if not comp.relation or _relation_holds(comp.relation, *centroids, cone=RENDER_CONE):
            return image


# ---------------------------------------------------------------------------------------------------
# geneval: reading and reward
# ---------------------------------------------------------------------------------------------------

COLOR_TOLERANCE = 0.4  # a pixel belongs to a palette colour within this RGB distance (colours are >= 1 apart)
MIN_AREA, MAX_SIDE, MAX_ASPECT = 12, 13, 1.5  # components outside these are specks or blobs, not objects
SQUARE_FILL, CIRCLE_FILL, TRIANGLE_LOW_MASS = 0.9, 0.6, 0.565


@dataclass(frozen=True)
class Found:
    """An object read from an image: colour, shape and centroid (y, x)."""
    color: str
    shape: str
    y: float
    x: float


def label_components(masks: np.ndarray) -> np.ndarray:
    """Connected components (4-neighbour) of bool [N,S,S] -> int [N,S,S]: 0 off-mask, else a label unique
    over the whole batch. Propagates the minimum pixel index through each component until stable."""
    n, h, w = masks.shape
    off = np.iinfo(np.int32).max
    labels = np.where(masks, np.arange(1, n * h * w + 1, dtype=np.int32).reshape(n, h, w), off)  # [N,S,S]
    while True:
        p = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=off)  # [N,S+2,S+2]
        up_down = np.minimum(p[:, :-2, 1:-1], p[:, 2:, 1:-1])
        left_right = np.minimum(p[:, 1:-1, :-2], p[:, 1:-1, 2:])
        smallest = np.where(masks, np.minimum(np.minimum(up_down, left_right), labels), off)
        if np.array_equal(smallest, labels):
            return np.where(masks, labels, 0)
        labels = smallest


def _classify(area, height, width, low_mass) -> np.ndarray:
    """Per component [K] stats -> shape index into SHAPES, or -1 for a speck/blob."""
    fill = area / (height * width)
    side, aspect = np.maximum(height, width), np.maximum(height, width) / np.minimum(height, width)
    round_or_square = np.where(fill >= SQUARE_FILL, 0, np.where(fill >= CIRCLE_FILL, 1, -1))
    shape = np.where(low_mass > TRIANGLE_LOW_MASS, 2, round_or_square)
    return np.where((area >= MIN_AREA) & (side <= MAX_SIDE) & (aspect <= MAX_ASPECT), shape, -1)


def read_objects(images: torch.Tensor) -> list[list[Found]]:
    """[B,3,S,S] -> the objects in each image: palette colour segments, components, shape by fill/mass."""
    rgb = images.detach().float().clamp(0, 1).cpu().numpy()  # [B,3,S,S]
    palette = np.array(list(COLORS.values()), np.float32)  # [C,3]
    dist = np.linalg.norm(rgb[:, None] - palette[None, :, :, None, None], axis=2)  # [B,C,S,S]
    masks = dist < COLOR_TOLERANCE
    b, c, h, w = masks.shape
    planes = np.flatnonzero(masks.reshape(b * c, -1).any(1))  # the (image, colour) planes with any pixel
    labels = label_components(masks.reshape(b * c, h, w)[planes])  # [N,S,S]
    local, ys, xs = np.nonzero(labels)  # one entry per coloured pixel
    if len(local) == 0:
        return [[] for _ in range(b)]
    _, comp = np.unique(labels[local, ys, xs], return_inverse=True)  # component index per pixel
    area = np.bincount(comp).astype(float)  # [K]
    (top, height), (_, width) = _extent(comp, ys, len(area)), _extent(comp, xs, len(area))
    cy, cx = np.bincount(comp, ys) / area, np.bincount(comp, xs) / area
    low_mass = (cy - top + 0.5) / height  # centroid height inside the box: 0.5 symmetric, ~0.63 triangle
    shape = _classify(area, height, width, low_mass)
    owner = np.zeros(len(area), int)
    owner[comp] = planes[local]  # the (image, colour) plane of each component
    found = [[] for _ in range(b)]
    names = list(COLORS)
    for k in np.flatnonzero(shape >= 0):
        found[owner[k] // c].append(Found(names[owner[k] % c], SHAPES[shape[k]], cy[k], cx[k]))
    return found


def _extent(comp: np.ndarray, coord: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels' coordinate along one axis [P] and component [P] -> each box's start [n] and length [n]."""
    low, high = np.full(n, IMAGE_SIZE), np.full(n, -1)
    np.minimum.at(low, comp, coord)
    np.maximum.at(high, comp, coord)
    return low, (high - low + 1).astype(float)


def geneval_checks(comp: Composition, found: list[Found]) -> list[bool]:
    """The constraints, in order. Per item: its shape is present; if coloured, a match of shape and colour
    is present; if counted, exactly `count` matches. Per relation: some match of A <rel> some match of B."""
    def matches(item: Item) -> list[Found]:
        return [f for f in found if f.shape == item.shape and item.color in (None, f.color)]
    checks = []
    for item in comp.items:
        checks.append(any(f.shape == item.shape for f in found))
        if item.color:
            checks.append(len(matches(item)) > 0)
        if item.count:
            checks.append(len(matches(item)) == item.count)
    if comp.relation:
        a, b = (matches(item) for item in comp.items)
        centres = [(np.array([fa.y, fa.x]), np.array([fb.y, fb.x])) for fa in a for fb in b]
        checks.append(any(_relation_holds(comp.relation, *pair, cone=READ_CONE) for pair in centres))
    return checks


def score_geneval(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """[B,3,S,S], B prompts -> [B] fraction of satisfied constraints."""
    comps = [parse_geneval(p) for p in prompts]
    return torch.tensor([float(np.mean(geneval_checks(comp, found)))
                         for comp, found in zip(comps, read_objects(images))], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# ocr
# ---------------------------------------------------------------------------------------------------

GLYPHS = {  # 3x5, every glyph touches all four sides of its box; any two differ in >= 4 cells
    "1": ".#.|##.|.#.|.#.|###", "4": "#.#|#.#|###|..#|..#", "7": "###|..#|..#|..#|..#",
    "J": "..#|..#|..#|#.#|###", "K": "#.#|##.|#..|##.|#.#", "L": "#..|#..|#..|#..|###",
    "P": "###|#.#|###|#..|#..", "S": ".##|#..|.#.|..#|##.", "T": "###|.#.|.#.|.#.|.#.",
    "X": "#.#|#.#|.#.|#.#|#.#", "Y": "#.#|#.#|.#.|.#.|.#.", "Z": "###|..#|.#.|#..|###",
}
ALPHABET = "".join(GLYPHS)
TEMPLATES = np.array([[[c == "#" for c in row] for row in glyph.split("|")]
                      for glyph in GLYPHS.values()], np.float32)  # [A,5,3]
SCALE, SPACING = 2, 2  # glyph pixels are SCALE x SCALE; SPACING empty columns between glyphs
PITCH = 3 * SCALE + SPACING
OCR_FRAMES = ("a sign that says", "a poster with the text", "a label reading")
_OCR_PROMPT = re.compile(rf'({"|".join(OCR_FRAMES)}) "([{ALPHABET}]{{2,4}})"')
INK, MIN_INK, MAX_GLYPH_ERROR = 0.5, 2, 0.2  # ink: every channel below INK; a column/row needs MIN_INK ink pixels


def parse_ocr(prompt: str) -> str:
    """`a sign that says "K7T"` -> "K7T"."""
    match = _OCR_PROMPT.fullmatch(prompt)
    if match is None:
        raise _offgrammar(prompt, "ocr")
    return match.group(2)


def render_ocr(prompt: str, rng: np.random.Generator) -> np.ndarray:
    """[3,S,S]: the string centred, black on white, jittered by a few pixels."""
    text = parse_ocr(prompt)
    width, height = PITCH * len(text) - SPACING, 5 * SCALE
    x0 = int(np.clip((IMAGE_SIZE - width) // 2 + rng.integers(-2, 3), 0, IMAGE_SIZE - width))
    y0 = (IMAGE_SIZE - height) // 2 + int(rng.integers(-4, 5))
    image = _canvas()
    for i, char in enumerate(text):
        glyph = np.kron(TEMPLATES[ALPHABET.index(char)], np.ones((SCALE, SCALE))) > 0  # [10,6]
        x = x0 + i * PITCH
        image[:, y0:y0 + height, x:x + 3 * SCALE][:, glyph] = 0.0
    return image


def _runs(occupied: np.ndarray) -> list[tuple[int, int]]:
    """bool [S] -> [(start, stop)] of maximal True runs."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], occupied.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def read_text(image: torch.Tensor) -> str:
    """[3,S,S] -> the string: ink columns -> glyph cells (a wide run is cut at the pitch) -> ink rows ->
    binary crop pooled to 5x3 -> nearest template; '?' when no template is close."""
    ink = image.detach().float().cpu().amax(0) < INK  # [S,S] near-black pixels
    text = ""
    for start, stop in _runs(ink.sum(0).numpy() >= MIN_INK):
        n_cells = max(1, round((stop - start + SPACING) / PITCH))
        cuts = np.linspace(start, stop, n_cells + 1).round().astype(int)
        for left, right in zip(cuts[:-1], cuts[1:]):
            rows = _runs(ink[:, left:right].sum(1).numpy() >= MIN_INK)
            if rows:
                crop = ink[rows[0][0]:rows[-1][1], left:right].float()  # [h,w]
                text += _nearest_glyph(F.adaptive_avg_pool2d(crop[None, None], (5, 3))[0, 0].numpy())
    return text


def _nearest_glyph(cells: np.ndarray) -> str:
    """[5,3] ink fractions -> the closest glyph by mean absolute difference, or '?'."""
    error = np.abs(TEMPLATES - cells).mean((1, 2))  # [A]
    return ALPHABET[error.argmin()] if error.min() <= MAX_GLYPH_ERROR else "?"


def score_ocr(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    for prompt in prompts:
        parse_ocr(prompt)                                                       # refuse prompts outside the grammar
    return torch.tensor([ocr_score(read_text(img), p) for img, p in zip(images, prompts)], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# quality
# ---------------------------------------------------------------------------------------------------

CLEAN_TOLERANCE = 0.2  # stricter than COLOR_TOLERANCE: blur and mid-tones are what this reward punishes
MAX_BAD_FRACTION = 0.25  # this fraction of off-palette or speck pixels scores 0
CONTENT_PIXELS = 20  # clean, non-background pixels needed for full credit (the smallest object has 31)


def score_quality(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """[B,3,S,S] -> [B]: content * clamp(1 - bad_fraction / MAX_BAD_FRACTION, 0, 1). A pixel is good if it
    is within CLEAN_TOLERANCE of white, black or a palette colour and, unless white, has >= 2 of its 8
    neighbours in the same class (no specks). The prompts are ignored."""
    palette = torch.tensor([WHITE, BLACK, *COLORS.values()])  # [P,3]; class 0 is the background
    rgb = images.detach().float().clamp(0, 1).cpu()  # [B,3,S,S]
    dist, cls = (rgb[:, None] - palette[None, :, :, None, None]).norm(dim=2).min(1)  # [B,S,S] each
    cls = torch.where(dist < CLEAN_TOLERANCE, cls, -1)  # -1: off-palette
    padded = F.pad(cls, (1, 1, 1, 1), value=-2)  # [B,S+2,S+2]
    same = sum((padded[:, 1 + dy:1 + dy + IMAGE_SIZE, 1 + dx:1 + dx + IMAGE_SIZE] == cls).int()
               for dy, dx in itertools.product((-1, 0, 1), repeat=2) if (dy, dx) != (0, 0))  # [B,S,S]
    ink = (cls > 0) & (same >= 2)
    good = (cls == 0) | ink
    bad_fraction = 1 - good.float().mean((1, 2))  # [B]
    content = (ink.sum((1, 2)) / CONTENT_PIXELS).clamp(max=1)  # [B]
    return content * (1 - bad_fraction / MAX_BAD_FRACTION).clamp(0, 1)


def render_quality(prompt: str, rng: np.random.Generator) -> np.ndarray:
    """Quality prompts are other tasks' prompts: render whichever grammar the prompt belongs to."""
    if prompt in geneval_grammar():
        return render_geneval(prompt, rng)
    if _OCR_PROMPT.fullmatch(prompt):
        return render_ocr(prompt, rng)
    raise _offgrammar(prompt, "quality (geneval or ocr)")


# ---------------------------------------------------------------------------------------------------
# task registry
# ---------------------------------------------------------------------------------------------------

_RENDER = {"geneval": render_geneval, "ocr": render_ocr, "quality": render_quality}
_SCORE = {"geneval": score_geneval, "ocr": score_ocr, "quality": score_quality}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def render(task: str, prompt: str, seed: int | np.random.Generator = 0) -> torch.Tensor:
    """A ground-truth image [3,S,S] for the prompt; seed picks the random colours/sizes/spots/jitter."""
    _check_task(task)
    return torch.from_numpy(_RENDER[task](prompt, np.random.default_rng(seed)))


def score(task: str, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Rewards [B] float32 in [0, 1] for images [B,3,S,S] in [0, 1] and their B prompts."""
    _check_task(task)
    if images.shape != (len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images [{len(prompts)},3,{IMAGE_SIZE},{IMAGE_SIZE}], got {list(images.shape)}")
    return _SCORE[task](images, prompts)


# ---------------------------------------------------------------------------------------------------
# prompt splits and files
# ---------------------------------------------------------------------------------------------------

GENEVAL_TEST_FRACTION = 0.1  # per tag, at least one prompt
OCR_SPLIT = {2: (100, 40), 3: (950, 80), 4: (950, 80)}  # length: (train, test); 144, 1728, 20736 strings exist
QUALITY_TEST_PER_TASK = 100


def _shuffled(prompts: list[str], rng: np.random.Generator) -> list[str]:
    return [prompts[i] for i in rng.permutation(len(prompts))]


@functools.cache
def geneval_split() -> dict[str, list[str]]:
    """{"train": [...], "test": [...]}: every geneval prompt, each tag shuffled and split."""
    by_tag: dict[str, list[str]] = {}
    for prompt, comp in geneval_grammar().items():
        by_tag.setdefault(comp.tag, []).append(prompt)
    rng, split = np.random.default_rng(SPLIT_SEED), {"train": [], "test": []}
    for prompts in by_tag.values():
        n_test = max(1, round(GENEVAL_TEST_FRACTION * len(prompts)))
        prompts = _shuffled(prompts, rng)
        split["test"] += prompts[:n_test]
        split["train"] += prompts[n_test:]
    return split


@functools.cache
def ocr_split() -> dict[str, list[str]]:
    """Per length, distinct strings shuffled and split (a test string never appears in train); each prompt
    gets a random frame; each split is shuffled."""
    rng, split = np.random.default_rng(SPLIT_SEED), {"train": [], "test": []}
    for length, (n_train, n_test) in OCR_SPLIT.items():
        strings = _shuffled(["".join(s) for s in itertools.product(ALPHABET, repeat=length)], rng)
        split["test"] += strings[:n_test]
        split["train"] += strings[n_test:n_test + n_train]
    return {name: [f'{OCR_FRAMES[rng.integers(len(OCR_FRAMES))]} "{s}"' for s in _shuffled(strings, rng)]
            for name, strings in split.items()}


@functools.cache
def quality_split() -> dict[str, list[str]]:
    """Train: all geneval train prompts and as many ocr train prompts; test: 100 random test prompts of each."""
    geneval, ocr, rng = geneval_split(), ocr_split(), np.random.default_rng(SPLIT_SEED)
    train = geneval["train"] + ocr["train"][:len(geneval["train"])]
    test = _shuffled(geneval["test"], rng)[:QUALITY_TEST_PER_TASK] + ocr["test"][:QUALITY_TEST_PER_TASK]
    return {"train": _shuffled(train, rng), "test": _shuffled(test, rng)}


def prompt_split(task: str, split: str) -> list[str]:
    """The fixed prompts of a task's "train" or "test" split."""
    _check_task(task)
    return {"geneval": geneval_split, "ocr": ocr_split, "quality": quality_split}[task]()[split]


def write_prompt_files(folder: str | Path) -> list[Path]:
    """Write {task}_{train,test}.jsonl for geneval (GenEval metadata + prompt) and .txt (one prompt a line)
    for ocr and quality. Deterministic: the same bytes every time."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, split in itertools.product(TASKS, ("train", "test")):
        prompts = prompt_split(task, split)
        if task == "geneval":
            path = folder / f"{task}_{split}.jsonl"
            lines = [json.dumps(geneval_metadata(parse_geneval(p))) for p in prompts]
        else:
            path, lines = folder / f"{task}_{split}.txt", prompts
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


# ====================================================================================================
# The toy base: a small SD3 transformer in pixel space and a small text encoder
# ====================================================================================================
# Same classes and interface as a real base (models.Base): diffusers' SD3Transformer2DModel over 32x32
# RGB "latents" x = 2 * image - 1 (decode is the identity map back to [0, 1]), conditioned on a tiny
# transformer text encoder over the closed vocabulary of the toy prompts (a quoted string is read one
# character a token). Pre-trained with the flow-matching loss (sft.py) on rendered ground truth, and
# stopped early on purpose: the base must be mediocre at every task, leaving room to improve.

TOY_DIR = Path(__file__).resolve().parent / "toy"
MAX_TOKENS = 16
SHIFT = 3.0                                                      # SD3.5-M's scheduler shift, kept for the toy
TRANSFORMER_CONFIG = dict(sample_size=IMAGE_SIZE, patch_size=2, in_channels=3, out_channels=3, num_layers=4,
                          attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                          caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=IMAGE_SIZE // 2,
                          qk_norm="rms_norm")
TEXT_WIDTH = 64
# Training recipe for the toy world: applied by train.py when no --base is given, for flags not set.
# Tiny images are launch-bound on a GPU, so few large calls: target_batch=144 rolls out all 16 images in one call
# per step and labels the 16 x 9 states in one call per adapter; train_batch=72 trains an optimizer step's 8 x 9
# rows in one forward+backward (issue 14: 15 forwards + 2 backwards per iteration instead of 44 + 18).
TRAIN_DEFAULTS = dict(images_per_iteration=16, group_size=2, micro_batch=8, target_batch=144, train_batch=72,
                      optimizer_steps=2, iterations=20, rank=16, alpha=32.0, lr=1e-3, resolution=IMAGE_SIZE, save_every=10)


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Special tokens, every word of every toy prompt, and the OCR alphabet (lower case)."""
    words = {w for task in ("geneval", "ocr") for split in ("train", "test") for p in prompt_split(task, split)
             for w in _words(p)}
    return ("<pad>", "<bos>", "<unk>") + tuple(sorted(words | set(ALPHABET.lower()) | {'"'}))


def _words(prompt: str) -> list[str]:
    """'a sign that says "K7"' -> ['a', 'sign', 'that', 'says', '"', 'k', '7', '"']"""
    tokens = []
    for part, quoted in _split_quotes(prompt.lower()):
        tokens += ['"', *part, '"'] if quoted else [part]
    return tokens


def _split_quotes(prompt: str) -> list[tuple[str, bool]]:
    return [(m.group(1), True) if m.group(1) is not None else (m.group(2), False)
            for m in re.finditer(r'"([^"]*)"|([^\s"]+)', prompt)]


_warned_long = False


def tokenize(prompts: list[str]) -> torch.Tensor:
    """[B] prompts -> token ids [B, MAX_TOKENS]: <bos>, words (unknown ones <unk>), <pad>; long prompts truncated."""
    return torch.tensor([_token_ids(p) for p in prompts], dtype=torch.long).view(len(prompts), MAX_TOKENS)


@functools.lru_cache(maxsize=65536)
def _token_ids(prompt: str) -> tuple[int, ...]:
    global _warned_long
    index = _vocabulary_index()
    tokens = [1] + [index.get(w, 2) for w in _words(prompt)]
    if len(tokens) > MAX_TOKENS and not _warned_long:
        print(f"warning: toy prompt longer than {MAX_TOKENS} tokens is truncated: {prompt!r}", file=sys.stderr)
        _warned_long = True
    return tuple(tokens[:MAX_TOKENS] + [0] * (MAX_TOKENS - len(tokens)))


@functools.cache
def _vocabulary_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(vocabulary())}


class TextEncoder(torch.nn.Module):
    """Token ids [B, L] -> (embeds [B, L, joint_attention_dim], pooled [B, pooled_projection_dim])."""

    def __init__(self, vocab_size: int, width: int = TEXT_WIDTH):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, width)
        self.position = torch.nn.Parameter(torch.randn(MAX_TOKENS, width) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.to_embeds = torch.nn.Linear(width, TRANSFORMER_CONFIG["joint_attention_dim"])
        self.to_pooled = torch.nn.Linear(width, TRANSFORMER_CONFIG["pooled_projection_dim"])

    def forward(self, ids):
        pad = ids == 0                                                           # [B, L]
        h = self.encoder(self.embed(ids) + self.position, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        pooled = (h * keep).sum(1) / keep.sum(1)                                 # mean over real tokens (<bos> always)
        return self.to_embeds(h), self.to_pooled(pooled)


def new_base_modules(seed: int = 0):
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TRANSFORMER_CONFIG), TextEncoder(len(vocabulary()))


def to_latent(images: torch.Tensor) -> torch.Tensor:
    return images * 2 - 1                                                        # [0, 1] -> [-1, 1]


def decode(latents: torch.Tensor) -> torch.Tensor:
    return ((latents.float() + 1) / 2).clamp(0, 1)                                # identity decode


def make_base(transformer, text_encoder, name: str):
    """Wrap toy modules as a models.Base (a fresh prompt cache: make a new one after the encoder changes)."""
    from models import Base
    device = next(transformer.parameters()).device

    def encode_prompts(prompts):
        return text_encoder(tokenize(prompts).to(device))

    return Base(transformer, encode_prompts, decode, (3, IMAGE_SIZE, IMAGE_SIZE), SHIFT, name)


def load_base(device, dtype=torch.float32, folder: Path = TOY_DIR, verify: bool = True):
    """The shipped toy base (checksums verified against SHA256SUMS)."""
    path = Path(folder) / "base.safetensors"
    if verify:
        verify_assets(folder, [path.name])
    from safetensors.torch import load_file
    state = load_file(path)
    transformer, text_encoder = new_base_modules()
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")})
    text_encoder.load_state_dict({k[len("text."):]: v for k, v in state.items() if k.startswith("text.")})
    transformer.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    return make_base(transformer.to(device, dtype), text_encoder.to(device), f"toy:{file_sha256(path)[:16]}")


def prompt_file(task: str, split: str, folder: Path = TOY_DIR) -> Path:
    """The shipped prompt file of a toy task (train.py's default --prompts when no --base is given)."""
    _check_task(task)
    return Path(folder) / f"{task}_{split}.{'jsonl' if task == 'geneval' else 'txt'}"


def verify_assets(folder: Path, names: list[str]) -> None:
    """Check shipped files against SHA256SUMS; a clear error names a missing or corrupted one."""
    sums = dict(line.split()[::-1] for line in (Path(folder) / "SHA256SUMS").read_text().splitlines() if line.strip()) \
        if (Path(folder) / "SHA256SUMS").is_file() else {}
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            raise FileNotFoundError(f"toy asset missing: {path} (rebuild with `python toyworld.py build`)")
        if name in sums and file_sha256(path) != sums[name]:
            raise ValueError(f"toy asset corrupted: {path} does not match toy/SHA256SUMS "
                             "(restore it with `git checkout toy/` or rebuild with `python toyworld.py build`)")



# ----------------------------------------------------------------------------------------------------
# Building the toy world: prompt files, the pre-trained base; shipping the Flow-GRPO teachers
# ----------------------------------------------------------------------------------------------------

def render_dataset(task: str, prompts: list[str], copies: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`copies` ground-truth renders of every prompt.  -> latents [N, 3, S, S] float16, prompts [N]"""
    rng = np.random.default_rng(seed)
    prompts = [p for p in prompts for _ in range(copies)]
    return to_latent(torch.stack([render(task, p, rng) for p in prompts])).half(), prompts


def measure(base, prompts_by_task: dict[str, list[str]], steps: int = 40, guidance: float = 4.5):
    """Mean reward per task of ODE samples (seed i for prompt i), as evaluate.py computes it.
    -> ({task: mean}, {task: first 8 images})"""
    from evaluate import generate
    from train import sample_seed
    means, firsts = {}, {}
    for task, prompts in prompts_by_task.items():
        with torch.no_grad():
            images = generate(base, prompts, [sample_seed(0, i) for i in range(len(prompts))], steps, guidance, 256)
        means[task], firsts[task] = round(score(task, images, prompts).mean().item(), 4), images[:8]
    return means, firsts


def pretrain_base(data, probe, device, max_steps: int, every: int, target: float, batch: int, lr: float, log,
                  samples_png: Path) -> tuple:
    """Flow-matching pre-training of transformer + text encoder (AdamW, linear warm-up), stopped at the first
    check where every probed task (train prompts) reaches `target`: a deliberately under-trained base."""
    from evaluate import save_grid
    from sft import train_flow_matching
    transformer, text = (m.to(device) for m in new_base_modules())
    params = [*transformer.parameters(), *text.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 200))
    latents, prompts = (torch.cat([d[0] for d in data]).to(device), [p for d in data for p in d[1]])
    encode = lambda ps: text(tokenize(ps).to(device))  # noqa: E731
    for step in range(every, max_steps + 1, every):
        loss = train_flow_matching(transformer, encode, latents, prompts, optimizer, every, batch, seed=step,
                                   scheduler=warmup, desc="base")
        scores, images = measure(make_base(transformer, text, "toy"), probe)
        log({"stage": "base", "step": step, "loss": round(loss, 4), **scores})
        save_grid({f"step {step}": images}, {t: (p, None) for t, p in probe.items()}, samples_png)
        save_base(transformer, text, samples_png.parent / "base.safetensors")   # a kill keeps the latest check
        if min(scores.values()) >= target:
            break
    return transformer.requires_grad_(False).eval(), text.requires_grad_(False).eval()


def save_base(transformer, text, path: Path) -> None:
    from safetensors.torch import save_file
    state = {f"transformer.{k}": v.float().contiguous() for k, v in transformer.state_dict().items()}
    state |= {f"text.{k}": v.float().contiguous() for k, v in text.state_dict().items()}
    save_file(state, path)


def build(folder: Path, device, max_base_steps: int, target: float, batch: int, lr: float, probe_size: int,
          check_every: int, seed: int = 0) -> dict:
    """Regenerate the toy base and prompt files into `folder` (the teachers come from Flow-GRPO runs:
    `adopt_teachers`). Appends to build.json; rewrites SHA256SUMS."""
    folder, log, record = Path(folder), *build_log(folder)
    write_prompt_files(folder)
    copies = {"geneval": 16, "ocr": 12}
    data = [render_dataset(task, prompt_split(task, "train"), copies[task], seed) for task in copies]
    probe = {task: prompt_split(task, "train")[:probe_size] for task in copies}
    transformer, text = pretrain_base(data, probe, device, max_base_steps, check_every, target, batch, lr, log,
                                      folder / "base_samples.png")
    held_out = {task: prompt_split(task, "test") for task in TASKS}
    log({"stage": "base test", **measure(make_base(transformer, text, "toy"), held_out)[0]})
    return write_record(folder, record)


def adopt_teachers(folder: Path, runs: Path) -> dict:
    """Ship the stage-1 Flow-GRPO teachers that `STAGE=teachers bash runs/toy_paper_table.sh` trained
    (runs/<task>/lora.safetensors) as folder/<task>.safetensors, logging each run's settings in build.json."""
    import shutil
    folder, runs = Path(folder), Path(runs)
    missing = [str(runs / task / "lora.safetensors") for task in TASKS if not (runs / task / "lora.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"no teacher LoRA at {missing[0]}: run STAGE=teachers bash runs/toy_paper_table.sh first")
    log, record = build_log(folder)
    for task in TASKS:
        record_of_run = json.loads((runs / task / "config.json").read_text())
        config = record_of_run["config"] | {"git_sha": record_of_run["git_sha"]}
        iterations = sum(1 for _ in (runs / task / "metrics.jsonl").open())
        shutil.copyfile(runs / task / "lora.safetensors", folder / f"{task}.safetensors")
        log({"stage": f"teacher {task}", "from": str(runs / task), "iterations": iterations,
             **{k: config.get(k) for k in ("algo", "reward", "lr", "clip_range", "beta", "images_per_iteration",
                                           "group_size", "git_sha")}})
    return write_record(folder, record)


def build_log(folder: Path):
    """-> (log(entry): appends a timed entry to the build record and prints it, the record of folder/build.json)"""
    import time
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = json.loads((folder / "build.json").read_text()) if (folder / "build.json").is_file() else {"log": []}
    start = time.time()

    def log(entry):
        entry["seconds"] = round(time.time() - start, 1)
        record["log"].append(entry)
        print(json.dumps(entry), flush=True)
    return log, record


def write_record(folder: Path, record: dict) -> dict:
    """Write build.json and SHA256SUMS (every shipped weight and prompt file)."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".txt", ".jsonl"))
    (folder / "SHA256SUMS").write_text("".join(f"{file_sha256(folder / n)}  {n}\n" for n in names))
    (folder / "build.json").write_text(json.dumps(record, indent=2))
    return record


# ====================================================================================================
# Command line
# ====================================================================================================

def reward_table() -> dict[str, dict[str, float]]:
    """Mean reward per task over its test prompts on ground truth, uniform noise and blank white images."""
    torch.manual_seed(0)
    table = {}
    for task in TASKS:
        prompts, rng = prompt_split(task, "test"), np.random.default_rng(0)
        images = {"ground truth": torch.stack([render(task, p, rng) for p in prompts]),
                  "noise": torch.rand(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE),
                  "blank": torch.ones(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE)}
        table[task] = {kind: score(task, x, prompts).mean().item() for kind, x in images.items()}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prompts", help="write the prompt split files").add_argument("folder")
    commands.add_parser("rewards", help="print mean rewards on ground truth / noise / blank")
    build_cli = commands.add_parser("build", help="regenerate the toy base and prompt files")
    build_cli.add_argument("--out", default=str(TOY_DIR))
    build_cli.add_argument("--max_base_steps", type=int, default=8000)
    build_cli.add_argument("--target", type=float, default=0.2, help="stop pre-training once every task reaches this")
    build_cli.add_argument("--batch", type=int, default=512)
    build_cli.add_argument("--lr", type=float, default=1e-3)
    build_cli.add_argument("--probe_size", type=int, default=128, help="train prompts a task scored at each check")
    build_cli.add_argument("--check_every", type=int, default=500, help="pre-training steps between checks")
    teachers_cli = commands.add_parser("teachers", help="ship the Flow-GRPO teachers of runs/toy_paper_table.sh")
    teachers_cli.add_argument("runs", help="the teacher folder of that run, e.g. out/toy_table/teacher")
    teachers_cli.add_argument("--out", default=str(TOY_DIR))
    args = parser.parse_args()
    if args.command == "build":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        build(Path(args.out), device, args.max_base_steps, args.target, args.batch, args.lr, args.probe_size,
              args.check_every)
    if args.command == "teachers":
        adopt_teachers(Path(args.out), Path(args.runs))
    if args.command == "prompts":
        for path in write_prompt_files(args.folder):
            print(path, sum(1 for _ in path.open()))
    if args.command == "rewards":
        for task, row in reward_table().items():
            print(f"{task:8s} " + "  ".join(f"{kind} {value:.3f}" for kind, value in row.items()))


if __name__ == "__main__":
    main()
