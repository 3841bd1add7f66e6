"""Generated documents for the demo document model (models/demo-doc, a tiny Kosmos-2.5): pages and their truth.

A page is drawn with PIL at a random size (width 224-288 px, height 192-288 px, so the processor's resize to at most
256 patches of 16 px keeps the scale near 1) on a plain or slightly noisy light background, in one of three DejaVu
families (Sans, Serif, Sans Mono; Debian's fonts-dejavu-core), and holds an optional heading and 1-3 more blocks,
top to bottom:
  * a heading (`#` at 21-23 px or `##` at 17-18 px, bold, 1-2 capitalised words),
  * a paragraph line (15-17 px; 2-4 words and numbers),
  * a list (2-3 items of 1-3 words, `- ` or `1. ` printed before each),
  * a small table (2-3 columns, a header row and 1-2 rows, ruled or with one rule under the header), one OCR line
    per cell.
Words come from a 50-word dictionary (lower case or capitalised); numbers are integers below 1000, one-decimal
numbers and percentages. Glyphs are about a patch high, so a patch holds one or two characters: small enough a
problem for a 6 M-parameter model to learn on two CPU cores in an hour.

Truth for the two Kosmos-2.5 tasks:
  * `<ocr>`: every text line in reading order (top to bottom; a table row's cells left to right) as
    `<bbox><x_X0><y_Y0><x_X1><y_Y1></bbox>TEXT\n`, the box the line's tight ink box in pixels of the page as
    Kosmos2_5ImageProcessor resizes it (its `width` x `height`, from `resized_geometry`), as the model card's
    post-processing reads it back;
  * `<md>`: the page as markdown, blocks separated by a blank line (`# H`, `## H`, a paragraph line, `- item` /
    `1. item`, a pipe table with a `| --- |` rule under its header).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_DIR = "/usr/share/fonts/truetype/dejavu"
FAMILIES = {
    "sans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf"),
    "serif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf"),
    "mono": ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"),
}
PATCH = 16  # the model's patch side (pixels of the resized page)
MAX_PATCHES = 256  # the model's max_num_patches as the processor uses it
MAX_COORD = 512  # <x_0> ... <x_511>, <y_0> ... <y_511>

WORDS = """
area bank blue book box cash city cost data date desk door east file gate gold green hour item key lamp list
main map milk name note order page park plan price rate red room sale shop size tax tea team text time total
tree unit user view west year
""".split()


@dataclass
class Line:
    text: str
    box: tuple[int, int, int, int]  # tight ink box in page pixels (x0, y0, x1, y1), exclusive ends
    # Each printed character and the centre of its advance box in page pixels (for training's patch labels).
    chars: list[tuple[str, float, float]] = field(default_factory=list)


@dataclass
class Page:
    image: Image.Image
    lines: list[Line] = field(default_factory=list)
    markdown: str = ""
    # Block kinds in order, for the structure metric: "h1", "h2", "p", "li", "table RxC".
    structure: list[str] = field(default_factory=list)


@lru_cache(maxsize=None)
def font(family: str, bold: bool, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(f"{FONT_DIR}/{FAMILIES[family][int(bold)]}", size)


def number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        return str(rng.randint(0, 999))
    if kind < 0.8:
        return f"{rng.randint(0, 99)}.{rng.randint(0, 9)}"
    return f"{rng.randint(1, 99)}%"


def token(rng: random.Random, numbers: float = 0.3) -> str:
    if rng.random() < numbers:
        return number(rng)
    word = rng.choice(WORDS)
    return word.capitalize() if rng.random() < 0.25 else word


def fit_words(rng: random.Random, make, width: int, fnt, lo: int, hi: int) -> str:
    """Up to `hi` tokens (at least `lo` if they fit) whose rendered width stays within `width`."""
    words: list[str] = []
    for _ in range(rng.randint(lo, hi)):
        candidate = words + [make()]
        if fnt.getlength(" ".join(candidate)) > width:
            break
        words = candidate
    return " ".join(words)


def resized_geometry(width: int, height: int, patch: int = PATCH, max_patches: int = MAX_PATCHES) -> tuple[int, int]:
    """(width, height) of the page as Kosmos2_5ImageProcessor resizes it: the largest grid of whole patches, aspect
    kept, within max_patches (its `rows`/`cols` arithmetic)."""
    scale = math.sqrt(max_patches * (patch / height) * (patch / width))
    rows = max(min(math.floor(scale * height / patch), max_patches), 1)
    cols = max(min(math.floor(scale * width / patch), max_patches), 1)
    return cols * patch, rows * patch


ALPHABET = sorted(set("".join(WORDS) + "".join(WORDS).upper() + "0123456789.%-|"))


def patch_labels(page: Page) -> list[set[int]]:
    """For each patch of the resized page (row-major, as Kosmos2_5ImageProcessor orders them), the indices in
    ALPHABET of the characters whose centres fall in it."""
    w, h = page.image.size
    rw, rh = resized_geometry(w, h)
    cols, rows = rw // PATCH, rh // PATCH
    labels: list[set[int]] = [set() for _ in range(rows * cols)]
    for line in page.lines:
        for ch, cx, cy in line.chars:
            c = min(max(int(cx * rw / w) // PATCH, 0), cols - 1)
            r = min(max(int(cy * rh / h) // PATCH, 0), rows - 1)
            if ch in ALPHABET:
                labels[r * cols + c].add(ALPHABET.index(ch))
    return labels


def cell_labels(page: Page, rows: int, cols: int) -> list[set[int]]:
    """For each cell of a rows x cols grid laid over the page (row-major, whatever its aspect), the indices in
    ALPHABET of the characters whose centres fall in it."""
    w, h = page.image.size
    labels: list[set[int]] = [set() for _ in range(rows * cols)]
    for line in page.lines:
        for ch, cx, cy in line.chars:
            c = min(max(int(cx / w * cols), 0), cols - 1)
            r = min(max(int(cy / h * rows), 0), rows - 1)
            if ch in ALPHABET:
                labels[r * cols + c].add(ALPHABET.index(ch))
    return labels


def ocr_text(page: Page) -> str:
    """The `<ocr>` answer (without `</s>`)."""
    w, h = page.image.size
    rw, rh = resized_geometry(w, h)
    out = []
    for line in page.lines:
        x0, y0, x1, y1 = line.box
        c = [round(x0 * rw / w), round(y0 * rh / h), round(x1 * rw / w), round(y1 * rh / h)]
        c = [min(max(v, 0), MAX_COORD - 1) for v in c]
        out.append(f"<bbox><x_{c[0]}><y_{c[1]}><x_{c[2]}><y_{c[3]}></bbox>{line.text}\n")
    return "".join(out)


class Painter:
    def __init__(self, rng: random.Random, width: int, height: int):
        self.rng = rng
        self.width, self.height = width, height
        base = np.array([rng.randint(232, 255) for _ in range(3)], dtype=np.float32)
        if rng.random() < 0.6:
            base[:] = rng.randint(240, 255)
        pixels = np.broadcast_to(base, (height, width, 3)).copy()
        if rng.random() < 0.5:  # slight noise
            nrng = np.random.default_rng(rng.getrandbits(32))
            pixels += nrng.normal(0.0, rng.uniform(3.0, 9.0), size=(height, width, 1))
        self.image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        self.draw = ImageDraw.Draw(self.image)
        dark = rng.randint(0, 50)
        self.ink = tuple(min(255, dark + rng.randint(0, 40)) for _ in range(3))
        self.family = rng.choice(sorted(FAMILIES))
        self.left = rng.randint(8, 20)
        self.y = rng.randint(6, 14)
        self.lines: list[Line] = []

    def text(self, x: int, y: int, text: str, fnt) -> Line:
        self.draw.text((x, y), text, font=fnt, fill=self.ink)
        x0, y0, x1, y1 = self.draw.textbbox((x, y), text, font=fnt)
        cy = (y0 + y1) / 2
        chars = [(ch, x + (fnt.getlength(text[:i]) + fnt.getlength(text[: i + 1])) / 2, cy)
                 for i, ch in enumerate(text) if not ch.isspace()]
        line = Line(text, (x0, y0, x1, y1), chars)
        self.lines.append(line)
        return line

    def room(self, needed: int) -> bool:
        return self.y + needed <= self.height - 6


def heading(p: Painter, level: int) -> tuple[str, str] | None:
    size = p.rng.randint(21, 23) if level == 1 else p.rng.randint(17, 18)
    fnt = font(p.family, True, size)
    if not p.room(size + 4):
        return None
    text = fit_words(p.rng, lambda: p.rng.choice(WORDS).capitalize(), p.width - 2 * p.left, fnt, 1, 2)
    if not text:
        return None
    p.text(p.left, p.y, text, fnt)
    p.y += size + p.rng.randint(6, 10)
    return "#" * level + " " + text, f"h{level}"


def paragraph(p: Painter) -> tuple[str, str] | None:
    size = p.rng.randint(15, 17)
    fnt = font(p.family, False, size)
    if not p.room(size + 2):
        return None
    text = fit_words(p.rng, lambda: token(p.rng), p.width - 2 * p.left, fnt, 2, 4)
    if not text:
        return None
    p.text(p.left, p.y, text, fnt)
    p.y += size + p.rng.randint(6, 10)
    return text, "p"


def bullets(p: Painter) -> list[tuple[str, str]]:
    size = p.rng.randint(15, 17)
    fnt = font(p.family, False, size)
    numbered = p.rng.random() < 0.35
    indent = p.left + p.rng.randint(0, 10)
    items = []
    for index in range(p.rng.randint(2, 3)):
        if not p.room(size + 2):
            break
        marker = f"{index + 1}. " if numbered else "- "
        body = fit_words(p.rng, lambda: token(p.rng, 0.2), p.width - indent - p.left - 20, fnt, 1, 3)
        if not body:
            break
        p.text(indent, p.y, marker + body, fnt)
        p.y += size + p.rng.randint(3, 6)
        items.append((marker + body, "li"))
    p.y += p.rng.randint(3, 6)
    return items


def table(p: Painter) -> tuple[str, str] | None:
    size = p.rng.randint(15, 16)
    fnt = font(p.family, False, size)
    head_font = font(p.family, p.rng.random() < 0.5, size)
    cols = p.rng.randint(2, 3)
    rows = p.rng.randint(2, 3)  # header + 1-2
    row_h = size + 10
    while rows > 2 and not p.room(rows * row_h + 4):
        rows -= 1
    if not p.room(rows * row_h + 4):
        return None
    avail = p.width - 2 * p.left
    col_w = avail // cols
    cells = [[p.rng.choice(WORDS).capitalize() for _ in range(cols)]]
    for _ in range(rows - 1):
        cells.append([token(p.rng, 0.6) for _ in range(cols)])
    # Keep every cell inside its column: a cell too wide is drawn again (a short number at last).
    for r, row in enumerate(cells):
        f = head_font if r == 0 else fnt
        for c, text in enumerate(row):
            for _ in range(8):
                if f.getlength(text) <= col_w - 8:
                    break
                text = p.rng.choice(WORDS).capitalize() if r == 0 else token(p.rng, 0.6)
            else:
                text = str(p.rng.randint(0, 99))
            row[c] = text
    top = p.y
    ruled = p.rng.random() < 0.7
    for r, row in enumerate(cells):
        y = top + r * row_h
        for c, text in enumerate(row):
            p.text(p.left + c * col_w + 4, y + 4, text, head_font if r == 0 else fnt)
    bottom = top + rows * row_h
    if ruled:
        for r in range(rows + 1):
            p.draw.line((p.left, top + r * row_h, p.left + cols * col_w, top + r * row_h), fill=p.ink, width=1)
        for c in range(cols + 1):
            p.draw.line((p.left + c * col_w, top, p.left + c * col_w, bottom), fill=p.ink, width=1)
    else:
        p.draw.line((p.left, top + row_h, p.left + cols * col_w, top + row_h), fill=p.ink, width=1)
    p.y = bottom + p.rng.randint(8, 12)
    md = ["| " + " | ".join(cells[0]) + " |", "|" + " --- |" * cols]
    md += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(md), f"table {rows}x{cols}"


def make_page(rng: random.Random) -> Page:
    """One page and its truth."""
    width, height = rng.randint(224, 288), rng.randint(192, 288)
    p = Painter(rng, width, height)
    blocks: list[str] = []
    structure: list[str] = []
    if rng.random() < 0.8:
        got = heading(p, 1 if rng.random() < 0.6 else 2)
        if got:
            blocks.append(got[0])
            structure.append(got[1])
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.35:
            got = paragraph(p)
            got = [got] if got else []
        elif kind < 0.65:
            got = bullets(p)
        elif kind < 0.85:
            got = table(p)
            got = [got] if got else []
        else:
            got = heading(p, 2)
            got = [got] if got else []
        if not got:
            continue
        if got[0][1] == "li":
            blocks.append("\n".join(md for md, _ in got))
        else:
            blocks.append(got[0][0])
        structure += [kind for _, kind in got]
    if not p.lines:  # nothing fitted (tiny page): one paragraph line
        got = paragraph(p)
        blocks.append(got[0])
        structure.append(got[1])
    return Page(p.image, p.lines, "\n\n".join(blocks), structure)


def corpus(seed: int, pages: int) -> list[str]:
    """Texts of generated pages (for training the tokenizer)."""
    rng = random.Random(seed)
    out = []
    for _ in range(pages):
        page = make_page(rng)
        out.append("\n".join(line.text for line in page.lines))
        out.append(page.markdown)
    return out
