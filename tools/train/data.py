"""Procedural images and KOSMOS-format texts for the demo model (models/demo/).

A scene is 1-3 coloured shapes (4 shapes, 5 colours; distinct within a scene) on a light background, or one short
rendered word (4 words).
Images are drawn at RENDER_SIZE x RENDER_SIZE pixels; the image processor squashes them to the model's image size.
Every scene yields texts in the formats of MODEL_SPEC §1.2 / §2.6:

  caption     "An image of"                 -> " a red circle and a blue square."
  grounding   "<grounding> An image of"     -> "<phrase> a red circle</phrase><object><patch_index_0137><patch_index_0499></object> and<phrase> ..."
  vqa         "Question: what color is the circle? Answer:"   -> " red"
  classify    "Question: what shape is in the image? Answer:" ranked over the candidates (one-object scenes)

Objects are listed left to right (by the centre of their box). Boxes are the tight ink boxes of the objects,
normalised to [0, 1], turned into `<patch_index_…>` pairs by HF's `coordinate_to_patch_index` on a 32x32 grid.
Everything is driven by a `random.Random(seed)`: training and held-out data use different seeds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RENDER_SIZE = 128
NUM_PATCHES_PER_SIDE = 32

# Few, visually distinct classes: at the model's 64-px input an object is only a few 8-px patches wide.
SHAPES = ["circle", "square", "triangle", "cross"]
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 180),
}
COLOR_NAMES = list(COLORS)
WORDS = ["cat", "dog", "sun", "box"]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

CAPTION_PROMPT = "An image of"
GROUNDING_PROMPT = "<grounding> An image of"
CLASSIFY_SHAPE_QUESTION = "what shape is in the image?"
CLASSIFY_COLOR_QUESTION = "what color is the shape?"

WORD_SCENE_PROB = 0.15
# Object sizes (box side, render pixels) by object count: fewer objects, more room.
SIZE_RANGE = {1: (52, 96), 2: (44, 70), 3: (38, 56)}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def vqa_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


@dataclass
class Obj:
    kind: str  # a shape name, or "word"
    color: str  # a colour name (words: "black")
    box: tuple[float, float, float, float]  # normalised tight ink box (x1, y1, x2, y2)
    word: str | None = None

    @property
    def phrase(self) -> str:
        if self.kind == "word":
            return f"the word {self.word}"
        return f"{article(self.color)} {self.color} {self.kind}"


# Training-only auxiliary target: what covers each vision patch (background, a (shape, colour) pair, or a word).
NUM_AUX_CLASSES = 1 + len(SHAPES) * len(COLORS) + len(WORDS)


def aux_class(o: "Obj") -> int:
    if o.kind == "word":
        return 1 + len(SHAPES) * len(COLORS) + WORDS.index(o.word)
    return 1 + SHAPES.index(o.kind) * len(COLORS) + COLOR_NAMES.index(o.color)


@dataclass
class Scene:
    objects: list[Obj]
    image: Image.Image = field(repr=False)
    label_map: Image.Image | None = field(default=None, repr=False)  # "L" image of aux_class values

    def patch_boxes(self, labels: np.ndarray) -> np.ndarray:
        """[len(labels), 4] the normalised box of the object each patch label names (zeros for background)."""
        boxes = {aux_class(o): o.box for o in self.objects}
        return np.array([boxes.get(int(c), (0.0, 0.0, 0.0, 0.0)) for c in labels], dtype=np.float32)

    def patch_labels(self, grid: int, min_cover: float = 0.2) -> np.ndarray:
        """[grid * grid] aux class per patch (row-major): the object covering the most of the patch if it covers at
        least `min_cover` of it, else background (0)."""
        lab = np.asarray(self.label_map, dtype=np.int64)
        cell = RENDER_SIZE // grid
        blocks = lab.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, cell * cell)
        counts = np.stack([(blocks == c).sum(1) for c in range(NUM_AUX_CLASSES)], axis=1)
        counts[:, 0] = 0
        best = counts.argmax(1)
        best[counts.max(1) < min_cover * cell * cell] = 0
        return best

    @property
    def is_word(self) -> bool:
        return self.objects[0].kind == "word"


# ---------------------------------------------------------------------------------------------------- rendering


def _shape_polygon(kind: str, x: float, y: float, s: float, rng: random.Random) -> list[tuple[float, float]] | None:
    if kind == "square":
        return [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]
    if kind == "triangle":
        return [(x + s / 2, y), (x + s, y + s), (x, y + s)]
    if kind == "cross":
        t = s / 3
        return [
            (x + t, y), (x + 2 * t, y), (x + 2 * t, y + t), (x + s, y + t), (x + s, y + 2 * t), (x + 2 * t, y + 2 * t),
            (x + 2 * t, y + s), (x + t, y + s), (x + t, y + 2 * t), (x, y + 2 * t), (x, y + t), (x + t, y + t),
        ]
    return None  # circle


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _draw_mask(kind: str, x: float, y: float, s: float, rng: random.Random) -> Image.Image:
    mask = Image.new("L", (RENDER_SIZE, RENDER_SIZE), 0)
    d = ImageDraw.Draw(mask)
    poly = _shape_polygon(kind, x, y, s, rng)
    if poly is None:
        d.ellipse([x, y, x + s, y + s], fill=255)
    else:
        d.polygon(poly, fill=255)
    return mask


def _background(rng: random.Random) -> Image.Image:
    base = tuple(rng.randint(215, 255) for _ in range(3))
    return Image.new("RGB", (RENDER_SIZE, RENDER_SIZE), base)


def _norm_box(px_box: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = px_box
    return (x1 / RENDER_SIZE, y1 / RENDER_SIZE, x2 / RENDER_SIZE, y2 / RENDER_SIZE)


def _overlaps(a, b, margin: float) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def sample_shape_scene(rng: random.Random, count: int | None = None) -> Scene:
    count = count or rng.randint(1, 3)
    kinds = rng.sample(SHAPES, count)
    colors = rng.sample(COLOR_NAMES, count)
    lo, hi = SIZE_RANGE[count]
    while True:
        placed: list[tuple[float, float, float]] = []
        boxes: list[tuple[float, float, float, float]] = []
        ok = True
        for _ in range(count):
            for _attempt in range(60):
                s = rng.uniform(lo, hi)
                x = rng.uniform(2, RENDER_SIZE - 2 - s)
                y = rng.uniform(2, RENDER_SIZE - 2 - s)
                b = (x, y, x + s, y + s)
                if all(not _overlaps(b, o, 6) for o in boxes):
                    placed.append((x, y, s))
                    boxes.append(b)
                    break
            else:
                ok = False
                break
        if ok:
            break
    img = _background(rng)
    label_map = Image.new("L", img.size, 0)
    objs = []
    for kind, color, (x, y, s) in zip(kinds, colors, placed):
        mask = _draw_mask(kind, x, y, s, rng)
        img.paste(Image.new("RGB", img.size, _jitter(COLORS[color], rng)), (0, 0), mask)
        o = Obj(kind=kind, color=color, box=_norm_box(mask.getbbox()))
        label_map.paste(aux_class(o), (0, 0), mask)
        objs.append(o)
    objs.sort(key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3]))
    return Scene(objects=objs, image=img, label_map=label_map)


_FONT_CACHE: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int):
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


def sample_word_scene(rng: random.Random) -> Scene:
    word = rng.choice(WORDS)
    font = _font(rng.randint(30, 46))
    img = _background(rng)
    mask = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(mask)
    l, t, r, b = d.textbbox((0, 0), word, font=font)
    w, h = r - l, b - t
    x = rng.uniform(4, RENDER_SIZE - 4 - w) - l
    y = rng.uniform(4, RENDER_SIZE - 4 - h) - t
    d.text((x, y), word, font=font, fill=255)
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    img.paste(Image.new("RGB", img.size, ink), (0, 0), mask)
    o = Obj(kind="word", color="black", box=_norm_box(mask.getbbox()), word=word)
    # The word's whole box (not just its ink) is its region: thin strokes cover little of a patch.
    label_map = Image.new("L", img.size, 0)
    ImageDraw.Draw(label_map).rectangle(mask.getbbox(), fill=aux_class(o))
    return Scene(objects=[o], image=img, label_map=label_map)


def sample_scene(rng: random.Random) -> Scene:
    if rng.random() < WORD_SCENE_PROB:
        return sample_word_scene(rng)
    return sample_shape_scene(rng)


# ---------------------------------------------------------------------------------------------------- texts


def patch_tokens(box: tuple[float, float, float, float]) -> str:
    from transformers.models.kosmos2.processing_kosmos2 import coordinate_to_patch_index

    ul, lr = coordinate_to_patch_index(box, NUM_PATCHES_PER_SIDE)
    return f"<patch_index_{ul:04d}><patch_index_{lr:04d}>"


def _join(parts: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c" (the separators as they appear between phrases)."""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_target(scene: Scene) -> str:
    return " " + _join([o.phrase for o in scene.objects]) + "."


def grounding_target(scene: Scene) -> str:
    items = [f"<phrase> {o.phrase}</phrase><object>{patch_tokens(o.box)}</object>" for o in scene.objects]
    if len(items) == 1:
        return items[0] + "."
    return ",".join(items[:-1]) + " and" + items[-1] + "."


def vqa_pairs(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """All (question type, question, answer) that apply to the scene; yes/no questions balanced."""
    if scene.is_word:
        w = scene.objects[0].word
        return [("word", "what does the text say?", w), ("word", "what word is written?", w)]
    out = []
    present = [o.kind for o in scene.objects]
    for o in scene.objects:
        out.append(("color", f"what color is the {o.kind}?", o.color))
        out.append(("shape", f"what shape is the {o.color} one?", o.kind))
    out.append(("count", "how many shapes are there?", NUMBER_WORDS[len(scene.objects)]))
    absent = [k for k in SHAPES if k not in present]
    out.append(("exists", f"is there a {rng.choice(present)}?", "yes"))
    out.append(("exists", f"is there a {rng.choice(absent)}?", "no"))
    if len(scene.objects) == 1:
        out.append(("classify_shape", CLASSIFY_SHAPE_QUESTION, present[0]))
        out.append(("classify_color", CLASSIFY_COLOR_QUESTION, scene.objects[0].color))
    return out


def classification_items(scene: Scene) -> list[dict]:
    """Zero-shot classification by scoring (one-object shape scenes): rank the candidates after the prompt."""
    assert len(scene.objects) == 1 and not scene.is_word
    o = scene.objects[0]
    return [
        dict(task="classify", kind="shape", prompt=vqa_prompt(CLASSIFY_SHAPE_QUESTION), candidates=list(SHAPES), label=o.kind),
        dict(task="classify", kind="color", prompt=vqa_prompt(CLASSIFY_COLOR_QUESTION), candidates=list(COLOR_NAMES), label=o.color),
    ]


def training_examples(scene: Scene, rng: random.Random, num_vqa: int = 1, grounding_prob: float = 0.6,
                      both: bool = False) -> list[tuple[str, str, str]]:
    """(task, prompt, target) for one scene: a grounded caption (probability `grounding_prob`) or a plain caption
    (both with `both`), and `num_vqa` questions."""
    cap = ("caption", CAPTION_PROMPT, caption_target(scene))
    grd = ("grounding", GROUNDING_PROMPT, grounding_target(scene))
    ex = [cap, grd] if both else [grd if rng.random() < grounding_prob else cap]
    pairs = vqa_pairs(scene, rng)
    for qtype, q, a in rng.sample(pairs, min(num_vqa, len(pairs))):
        ex.append(("vqa", vqa_prompt(q), " " + a))
    return ex


def domain_corpus() -> list[str]:
    """Every text the generator can produce (minus patch tokens), one template instance per line: the vocabulary."""
    lines = [CAPTION_PROMPT, vqa_prompt(CLASSIFY_SHAPE_QUESTION), vqa_prompt(CLASSIFY_COLOR_QUESTION)]
    for c in COLOR_NAMES:
        for s in SHAPES:
            lines.append(f"{CAPTION_PROMPT} {article(c)} {c} {s}, {article(c)} {c} {s} and {article(c)} {c} {s}.")
            lines.append(vqa_prompt(f"what color is the {s}?") + f" {c}")
            lines.append(vqa_prompt(f"what shape is the {c} one?") + f" {s}")
            lines.append(vqa_prompt(f"is there a {s}?") + " yes no")
    for n in NUMBER_WORDS.values():
        lines.append(vqa_prompt("how many shapes are there?") + f" {n}")
    for w in WORDS:
        lines.append(f"{CAPTION_PROMPT} the word {w}.")
        lines.append(vqa_prompt("what does the text say?") + f" {w}")
        lines.append(vqa_prompt("what word is written?") + f" {w}")
    return lines
