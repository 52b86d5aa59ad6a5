"""The toy world's tasks: tiny text-to-image tasks with programmatic rewards (docs/toy_world.md).

SD3.5-M cannot be downloaded here, so the project ships a miniature of the paper's setting. This file
defines the TASKS: for each, a closed prompt grammar, fixed train/test prompt splits, a renderer of
ground-truth images (the data a toy base is pre-trained on) and a reward read from pixels.

    geneval  ~ GenEval (composition). Coloured squares, circles and triangles; GenEval's six tags
             (single_object, two_object, counting, colors, position, color_attr) and its metadata
             layout. Read back by colour segmentation + connected components + a shape classifier.
             Reward = fraction of satisfied constraints. Deviation: GenEval scores each image 0/1;
             partial credit gives RL a denser signal. Unlike GenEval, counting and position name colours.
    ocr      ~ Flow-GRPO's OCR task. `a sign that says "K7T"`: 2-4 characters of a 12-glyph 3x5 bitmap
             font drawn at 2x, black on white. Reward = 1 - min(edit distance, len) / len of the string
             read back by template matching; 1 if the read string contains the target (Flow-GRPO's OCR
             rule, `ocr_score`, which rewards.py's real `ocr` reward applies to PP-OCR's reads).
    quality  ~ DeQA / aesthetic score: task-agnostic and prompt-agnostic. Counts defect pixels: off the
             palette, or in a 3x3 neighbourhood that no clean render contains (specks, jagged edges,
             1-px strokes, blur fringes); reward = exp(-defects / 5) times some content (an empty canvas
             scores 0). Not a function of the geneval or ocr scores: a specialist's RL can trade it away.
PickScore has no toy counterpart. The toy base model is toy_model.py; building the shipped assets and the
command line are toyworld.py. This module imports no other module of the project.

Conventions: images are float RGB tensors [B, 3, S, S] in [0, 1], S = IMAGE_SIZE = 32, white background;
coordinates are (row y, column x), y grows downward, so "above" means a smaller y. Rewards are float32
in [0, 1], one per image. Randomness comes from numpy Generators (or int seeds) passed in.

Demo:  python toyworld.py rewards              (mean reward on ground truth / noise / blank per task)
       python -c "import toy_tasks as t; print(t.prompt_split('geneval', 'test')[:3])"
"""
import functools
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
TASKS = ("geneval", "ocr", "quality")
TOY_DIR = Path(__file__).resolve().parent / "toy"                # the shipped prompt files, base and teachers

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


# Flow-GRPO's OCR rule, on strings (rewards.py's real `ocr` reward applies it to what PP-OCR reads)

def ocr_target(prompt: str) -> str | None:
    """Text between the first pair of double quotes, lower-cased, spaces removed; None if there is none."""
    match = re.search(r'"([^"]*)"', prompt)
    target = match.group(1).replace(" ", "").lower() if match else ""
    return target or None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insert, delete, substitute: cost 1 each), two-row dynamic programming."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_score(read: str, prompt: str) -> float:
    """1 - min(edit_distance, len(target)) / len(target); 1 if the target is inside the read text."""
    target = ocr_target(prompt)
    if target is None:
        return 0.0
    read = read.replace(" ", "").lower()
    if target in read:
        return 1.0
    return 1.0 - min(edit_distance(read, target), len(target)) / len(target)


def score_ocr(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    for prompt in prompts:
        parse_ocr(prompt)                                                       # refuse prompts outside the grammar
    return torch.tensor([ocr_score(read_text(img), p) for img, p in zip(images, prompts)], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# quality
# ---------------------------------------------------------------------------------------------------

DEFECT_SCALE = 5.0  # defect pixels that cost a factor e; the shipped base scores 0.50 on held-out prompts (ODE)
CONTENT_PIXELS = 20  # clean palette pixels (not background) needed for full credit (the smallest object has 31)
NEIGHBOURS = [(dy, dx) for dy, dx in itertools.product((-1, 0, 1), repeat=2) if (dy, dx) != (0, 0)]  # bit k


def neighbourhood_codes(classes: torch.Tensor) -> torch.Tensor:
    """int [B,S,S] pixel classes -> [B,S,S] codes in [0, 256): bit k is set when neighbour NEIGHBOURS[k]
    has the pixel's class; outside the canvas is background (class 0)."""
    padded = F.pad(classes, (1, 1, 1, 1), value=0)  # [B,S+2,S+2]
    h, w = classes.shape[1:]
    return sum((padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == classes).long() << k
               for k, (dy, dx) in enumerate(NEIGHBOURS))


@functools.cache
def drawn_codes() -> torch.Tensor:
    """bool [256]: the codes clean renders contain (40 of the 256), read off every shape at every size and
    every glyph, each alone on the background (objects and glyphs are >= GAP, SPACING = 2 px apart: no 3x3
    window sees two)."""
    masks = [shape_mask(shape, size) for shape in SHAPES for size in SIZES]
    masks += [np.kron(template, np.ones((SCALE, SCALE))) > 0 for template in TEMPLATES]
    canvases = torch.zeros(len(masks), IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)  # [M,S,S]
    for canvas, mask in zip(canvases, masks):
        canvas[1:1 + mask.shape[0], 1:1 + mask.shape[1]][torch.from_numpy(mask)] = 1
    drawn = torch.zeros(256, dtype=torch.bool)
    drawn[neighbourhood_codes(canvases).flatten()] = True
    return drawn


def quality_defects(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,3,S,S] -> defects [B], content [B]: pixel counts. Each pixel takes the class of the nearest of
    white, black and the palette colours within COLOR_TOLERANCE, else off-palette. A defect is an
    off-palette pixel, or one whose 3x3 neighbourhood (which neighbours share its class) no clean render
    contains: specks, jagged edges and notches, 1-px strokes, blur fringes, touching objects. Content:
    the non-background palette pixels that are not defects."""
    palette = torch.tensor([WHITE, BLACK, *COLORS.values()])  # [P,3]; class 0 is the background
    rgb = images.detach().float().clamp(0, 1).cpu()  # [B,3,S,S]
    dist, cls = (rgb[:, None] - palette[None, :, :, None, None]).norm(dim=2).min(1)  # [B,S,S] each
    cls = torch.where(dist < COLOR_TOLERANCE, cls, -1)  # -1: off-palette
    defect = (cls < 0) | ~drawn_codes()[neighbourhood_codes(cls)]  # [B,S,S]
    return defect.sum((1, 2)).float(), ((cls > 0) & ~defect).sum((1, 2)).float()


def score_quality(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """[B,3,S,S] -> [B]: min(content / CONTENT_PIXELS, 1) * exp(-defects / DEFECT_SCALE) (quality_defects).
    A clean render scores 1, an empty canvas 0. The prompts are ignored."""
    defects, content = quality_defects(images)
    return (content / CONTENT_PIXELS).clamp(max=1) * torch.exp(-defects / DEFECT_SCALE)


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


def prompt_file(task: str, split: str, folder: Path = TOY_DIR) -> Path:
    """The shipped prompt file of a toy task (train.py's default --prompts when no --base is given)."""
    _check_task(task)
    return Path(folder) / f"{task}_{split}.{'jsonl' if task == 'geneval' else 'txt'}"
