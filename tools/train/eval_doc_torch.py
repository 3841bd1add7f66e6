#!/usr/bin/env python3
"""Held-out metrics of the demo document model with PyTorch, and the held-out set for `kosmos eval`.

    tools/train/run.sh eval-doc [--model models/demo-doc] [--pages 64] [--dump models/demo-doc/heldout]

Held-out pages come from doc_data.make_page with their own seed (training draws from random.Random(2512)). Each page
is read with both tasks, greedy (HF `generate` on Kosmos2_5Processor's inputs, max_new_tokens 512), and scored the
way `kosmos eval` scores the API's answers (services/kosmos/src/eval.rs):
  * OCR character error rate: Levenshtein distance between the predicted lines' texts and the true lines' texts
    (each list joined with "\\n"), summed over pages, over the true characters;
  * line boxes: predicted and true lines paired one to one, highest IoU first; a true line counts when its pair's
    box (normalised to the page) has IoU >= 0.5 with it;
  * markdown structure: the page's block kinds in order (`h1`, `h2`, `p`, `li`, `table RxC`) read from the
    generated markdown equal the truth's;
  * markdown character error rate (the same distance on the markdown text), for information.
The OCR text is read back as the gateway's post-processing reads it (parse_ocr below: the model card's split of
each `<bbox><x_><y_><x_><y_></bbox>` box and the text up to the next box), coordinates in pixels of the page as the
processor resized it.

--dump DIR writes the set: `images/NNN.png` (as rendered), `set.jsonl` (one item per page and task, with the truth
and PyTorch's greedy ids and text), README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import doc_data  # noqa: E402
import torch  # noqa: E402

ROOT = HERE.parents[1]
BOX = re.compile(r"<bbox><x_(\d+)><y_(\d+)><x_(\d+)><y_(\d+)></bbox>")
TASKS = {"ocr": "<ocr>", "md": "<md>"}


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def parse_ocr(text: str, resized: tuple[int, int]) -> list[tuple[str, list[float] | None]]:
    """(line text, box normalised to the page or None) for each line of an `<ocr>` answer, as the gateway returns
    them (`parse_ocr` in shared/processor/src/ocr.rs): each box's line is the text after it up to the next box (the
    model card's split) less one trailing newline; text before the first box is a line without a box (when not
    blank); an empty box (x0 >= x1 or y0 >= y1) gives no box; the last line ends before a `<bbox>` that the
    generation left unfinished."""
    def line(body: str, box):
        return (body[:-1] if body.endswith("\n") else body, box)

    def unfinished(body: str) -> str:
        return body[: body.rfind("<bbox>")] if "<bbox>" in body else body

    matches = list(BOX.finditer(text))
    if not matches:
        body = unfinished(text)
        return [line(body, None)] if body.strip() else []
    out = []
    head = text[: matches[0].start()]
    if head.strip():
        out.append(line(head, None))
    for k, m in enumerate(matches):
        last = k + 1 == len(matches)
        body = text[m.end(): len(text) if last else matches[k + 1].start()]
        if last:
            body = unfinished(body)
        x0, y0, x1, y1 = (int(v) for v in m.groups())
        box = None
        if x0 < x1 and y0 < y1:
            box = [min(x0 / resized[0], 1.0), min(y0 / resized[1], 1.0), min(x1 / resized[0], 1.0),
                   min(y1 / resized[1], 1.0)]
        out.append(line(body, box))
    return out


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched_lines(pred_boxes: list, true_boxes: list) -> int:
    """True boxes paired one to one with predicted boxes, highest IoU first, with IoU >= 0.5."""
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred_boxes) if p is not None
                    for j, t in enumerate(true_boxes)), reverse=True)
    used_p, used_t, found = set(), set(), 0
    for value, i, j in pairs:
        if value < 0.5:
            break
        if i in used_p or j in used_t:
            continue
        used_p.add(i)
        used_t.add(j)
        found += 1
    return found


def md_structure(text: str) -> list[str]:
    """Block kinds in order: `# ` h1, `## ` h2, `- ` / `N. ` li, a run of `|` lines a `table RxC` (R rows without
    the rule, C the header's cells), any other non-empty line p."""
    kinds: list[str] = []
    table: list[str] = []

    def flush():
        if table:
            rows = [r for r in table if not set(r) <= set("|-: ")]  # the rule line is not a row
            cols = len(table[0].strip("|").split("|"))
            kinds.append(f"table {len(rows)}x{cols}")
            table.clear()

    for raw in text.split("\n"):
        line = raw.strip()
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if not line:
            continue
        if line.startswith("## "):
            kinds.append("h2")
        elif line.startswith("# "):
            kinds.append("h1")
        elif line.startswith("- ") or re.match(r"\d+\. ", line):
            kinds.append("li")
        else:
            kinds.append("p")
    flush()
    return kinds


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo-doc")
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--pages", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dump", type=Path, help="write the held-out set here")
    args = parser.parse_args()

    from transformers import AutoProcessor, Kosmos2_5ForConditionalGeneration

    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(args.model)
    tokenizer = processor.tokenizer
    model = Kosmos2_5ForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    eos = model.config.text_config.eos_token_id
    max_patches = processor.image_processor.max_patches
    rng = random.Random(args.seed)
    pages = [doc_data.make_page(rng) for _ in range(args.pages)]
    started = time.time()
    items = []
    totals = {"ocr_edits": 0, "ocr_chars": 0, "lines_found": 0, "lines": 0, "md_edits": 0, "md_chars": 0,
              "structure": 0, "pages": 0}
    for first in range(0, len(pages), args.batch):
        chunk = pages[first:first + args.batch]
        images = [p.image for p in chunk]
        for task, prompt in TASKS.items():
            enc = processor(text=[prompt] * len(images), images=images, max_patches=max_patches, return_tensors="pt")
            widths, heights = enc.pop("width"), enc.pop("height")
            prompt_len = enc["input_ids"].shape[1]
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
                                 use_cache=True, eos_token_id=eos, pad_token_id=model.config.text_config.pad_token_id)
            for row, page in enumerate(chunk):
                ids = out[row, prompt_len:].tolist()
                if eos in ids:
                    ids = ids[: ids.index(eos) + 1]
                text = tokenizer.decode(ids, skip_special_tokens=True)
                index = first + row
                w, h = page.image.size
                resized = (int(widths[row]), int(heights[row]))
                assert resized == doc_data.resized_geometry(w, h), "the truth's geometry is the processor's"
                item = {"id": f"{index:03d}-{task}", "image": f"images/{index:03d}.png", "task": task,
                        "prompt": prompt, "torch_ids": ids, "torch_output": text}
                if task == "ocr":
                    truth_lines = [{"text": line.text, "box": [line.box[0] / w, line.box[1] / h, line.box[2] / w,
                                                               line.box[3] / h]} for line in page.lines]
                    item["lines"] = truth_lines
                    item["resized"] = list(resized)
                    got = parse_ocr(text, resized)
                    truth_text = "\n".join(line["text"] for line in truth_lines)
                    score = {"edits": levenshtein("\n".join(t for t, _ in got), truth_text), "chars": len(truth_text),
                             "lines_found": matched_lines([b for _, b in got], [t["box"] for t in truth_lines]),
                             "lines": len(truth_lines)}
                    for key in ("edits", "chars", "lines_found", "lines"):
                        totals[{"edits": "ocr_edits", "chars": "ocr_chars"}.get(key, key)] += score[key]
                else:
                    item["markdown"] = page.markdown
                    item["structure"] = page.structure
                    score = {"edits": levenshtein(text.strip(), page.markdown), "chars": len(page.markdown),
                             "structure_right": md_structure(text) == page.structure}
                    totals["md_edits"] += score["edits"]
                    totals["md_chars"] += score["chars"]
                    totals["structure"] += score["structure_right"]
                    totals["pages"] += 1
                # PyTorch's answer scored here: `kosmos eval`'s scoring of the same text must agree (a Rust test).
                item["torch_score"] = score
                items.append(item)
        print(f"  {min(first + args.batch, len(pages))}/{len(pages)} pages, {time.time() - started:.0f} s", flush=True)

    print("| metric | value |")
    print("|---|---:|")
    print(f"| OCR character error rate | {100 * totals['ocr_edits'] / max(1, totals['ocr_chars']):.2f}% "
          f"({totals['ocr_edits']} / {totals['ocr_chars']}) |")
    print(f"| OCR lines, box IoU >= 0.5 | {100 * totals['lines_found'] / max(1, totals['lines']):.1f}% "
          f"({totals['lines_found']} / {totals['lines']}) |")
    print(f"| markdown structure right (pages) | {100 * totals['structure'] / max(1, totals['pages']):.1f}% "
          f"({totals['structure']} / {totals['pages']}) |")
    print(f"| markdown character error rate | {100 * totals['md_edits'] / max(1, totals['md_chars']):.2f}% "
          f"({totals['md_edits']} / {totals['md_chars']}) |")
    print(f"{len(items)} items in {time.time() - started:.0f} s")

    if args.dump:
        (args.dump / "images").mkdir(parents=True, exist_ok=True)
        for index, page in enumerate(pages):
            page.image.save(args.dump / "images" / f"{index:03d}.png", optimize=True)
        with open(args.dump / "set.jsonl", "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        print(f"wrote {args.dump}: {len(items)} items on {len(pages)} pages")


if __name__ == "__main__":
    main()
