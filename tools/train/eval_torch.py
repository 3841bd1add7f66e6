#!/usr/bin/env python3
"""Held-out evaluation of the demo model with PyTorch / HF transformers, and the held-out set for the Rust evaluator.

    tools/train/run.sh eval [--model models/demo] [--images 300] [--classify 200] [--dump models/demo/heldout]

Held-out scenes come from data.py with --seed (default 20251126; training uses 1234 and its probe batch 777).
Metrics:
  caption         greedy "An image of" -> every (colour, shape) phrase / the word right, as a multiset
  vqa             greedy "Question: … Answer:" -> the answer word exactly (per question type too)
  classification  rank the candidates by mean log-prob per token of " " + candidate after the prompt (no </s>)
  grounding       greedy "<grounding> An image of", decoded with Kosmos2Processor.post_process_generation; an object
                  counts when an entity with its phrase has a box with IoU >= 0.5 against the true (ink) box
Greedy decoding: HF generate, do_sample=False, max_new_tokens 64, the model's generation_config (no_repeat_ngram_size
from it unless --no-repeat-ngram-size is given). Prompts of equal token length are batched, so there is no padding.

--dump DIR writes a subset of these items with the torch outputs as the held-out set for the Rust evaluator
(set.jsonl, images/, pixels.safetensors, and a README.md describing the format): models/demo/heldout/.
"""

from __future__ import annotations

import os

# Under CPU contention (shared build machines) OpenMP's default spin-waiting makes 2 threads 5-10x slower than one;
# passive waiting must be chosen before torch (and its OpenMP runtime) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vocab  # noqa: E402,F401  (puts tools/reference on sys.path)
import common  # noqa: E402
import data  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = HERE.parents[1]
MAX_NEW_TOKENS = 64


def load(model_dir: Path):
    from transformers import CLIPImageProcessor, Kosmos2ForConditionalGeneration

    model = Kosmos2ForConditionalGeneration.from_pretrained(model_dir)
    model.eval()
    tok = common.wrap_tokenizer(model_dir / "tokenizer.json")
    proc = common.make_processor(tok, CLIPImageProcessor.from_pretrained(model_dir))
    return model, proc


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


PHRASE_RE = re.compile(r"\b(?:an?) (\w+) (\w+)|\bthe word (\w+)")


def caption_attributes(text: str) -> list[tuple[str, ...]]:
    out = []
    for m in PHRASE_RE.finditer(text):
        out.append(("word", m.group(3)) if m.group(3) else (m.group(1), m.group(2)))
    return sorted(out)


def truth_attributes(objects: list[dict]) -> list[tuple[str, ...]]:
    return sorted(("word", o["word"]) if o["kind"] == "word" else (o["color"], o["kind"]) for o in objects)


def obj_dict(o: data.Obj) -> dict:
    d = dict(phrase=o.phrase, kind=o.kind, color=o.color, box=[round(v, 6) for v in o.box])
    if o.word:
        d["word"] = o.word
    return d


def build_items(seed: int, n_images: int, n_classify: int) -> tuple[list, list[dict]]:
    """(images, items): every item names its image by index."""
    rng = random.Random(seed)
    images, items = [], []
    for _ in range(n_images):
        sc = data.sample_scene(rng)
        k = len(images)
        images.append(sc.image)
        objs = [obj_dict(o) for o in sc.objects]
        items.append(dict(task="caption", image=k, prompt=data.CAPTION_PROMPT, expected=data.caption_target(sc),
                          objects=objs))
        items.append(dict(task="grounding", image=k, prompt=data.GROUNDING_PROMPT,
                          expected=data.grounding_target(sc), objects=objs))
        for qtype, q, a in rng.sample(data.vqa_pairs(sc, rng), 2):
            items.append(dict(task="vqa", image=k, qtype=qtype, prompt=data.vqa_prompt(q), expected=a))
    for _ in range(n_classify):
        sc = data.sample_shape_scene(rng, count=1)
        k = len(images)
        images.append(sc.image)
        for it in data.classification_items(sc):
            items.append(dict(it, image=k, objects=[obj_dict(o) for o in sc.objects]))
    return images, items


@torch.no_grad()
def generate(model, proc, images, items, ngram: int | None, log) -> None:
    """Greedy continuation of every item (classification prompts too, for the held-out set), batched by prompt token
    length (no padding)."""
    q = model.config.latent_query_num
    groups = defaultdict(list)
    for it in items:
        n = len(proc(text=it["prompt"], images=images[it["image"]], num_image_tokens=q)["input_ids"])
        groups[n].append(it)
    kw = dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    if ngram is not None:
        kw["no_repeat_ngram_size"] = ngram
    done = 0
    for _, group in sorted(groups.items()):
        for s in range(0, len(group), 32):
            chunk = group[s:s + 32]
            enc = proc(text=[it["prompt"] for it in chunk], images=[images[it["image"]] for it in chunk],
                       num_image_tokens=q, return_tensors="pt", padding=True)
            assert bool(enc["attention_mask"].all())
            out = model.generate(pixel_values=enc["pixel_values"], input_ids=enc["input_ids"],
                                 attention_mask=enc["attention_mask"],
                                 image_embeds_position_mask=enc["image_embeds_position_mask"], **kw)
            n_prompt = enc["input_ids"].shape[1]
            for it, ids in zip(chunk, out):
                new = ids[n_prompt:].tolist()
                if common.EOS_ID in new:
                    new = new[: new.index(common.EOS_ID) + 1]
                it["output_ids"] = new
                it["generated_text"] = proc.tokenizer.decode(new, skip_special_tokens=True)
                text = proc.batch_decode([ids], skip_special_tokens=True)[0]
                it["output_text"] = proc.post_process_generation(text, cleanup_and_extract=False)
            done += len(chunk)
            log(f"generated {done}")


@torch.no_grad()
def score_candidates(model, proc, images, items) -> None:
    q = model.config.latent_query_num
    for it in items:
        if it["task"] != "classify":
            continue
        img = images[it["image"]]
        n_prompt = len(proc(text=it["prompt"], images=img, num_image_tokens=q)["input_ids"])
        texts = [f"{it['prompt']} {c}" for c in it["candidates"]]
        encs = [proc(text=t, images=img, num_image_tokens=q)["input_ids"] for t in texts]
        width = max(len(e) for e in encs)
        ids = torch.full((len(encs), width), common.PAD_ID)
        am = torch.zeros((len(encs), width), dtype=torch.long)
        for i, e in enumerate(encs):  # right padding: the candidate tokens keep their positions
            ids[i, : len(e)] = torch.tensor(e)
            am[i, : len(e)] = 1
        ipm = torch.zeros_like(ids)
        ipm[:, 2:2 + q] = 1
        pv = proc.image_processor([img], return_tensors="pt")["pixel_values"].expand(len(encs), -1, -1, -1)
        logits = model(pixel_values=pv, input_ids=ids, attention_mask=am, image_embeds_position_mask=ipm).logits
        logp = F.log_softmax(logits.float(), dim=-1)
        scores = []
        for i, e in enumerate(encs):
            tgt = torch.tensor(e[n_prompt:])
            lp = logp[i, n_prompt - 1: len(e) - 1].gather(1, tgt[:, None]).squeeze(1)
            scores.append(lp.mean().item())
        it["scores"] = scores
        it["predicted"] = it["candidates"][max(range(len(scores)), key=scores.__getitem__)]


def judge(items) -> dict:
    res = defaultdict(lambda: [0, 0])
    from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

    ious = []
    for it in items:
        t = it["task"]
        if t == "caption":
            pred = it["output_text"].split(data.CAPTION_PROMPT, 1)[-1]
            ok = caption_attributes(pred) == truth_attributes(it["objects"])
            it["correct"] = ok
            res["caption"][0] += ok
            res["caption"][1] += 1
            exact = pred.strip() == it["expected"].strip()
            res["caption (exact text)"][0] += exact
            res["caption (exact text)"][1] += 1
        elif t == "vqa":
            ans = it["output_text"].split("Answer:", 1)[-1].strip().lower().rstrip(".?!")
            ok = ans == it["expected"]
            it["correct"] = ok
            for key in ("vqa", f"vqa/{it['qtype']}"):
                res[key][0] += ok
                res[key][1] += 1
        elif t == "classify":
            ok = it["predicted"] == it["label"]
            it["correct"] = ok
            for key in ("classification", f"classification/{it['kind']}"):
                res[key][0] += ok
                res[key][1] += 1
        elif t == "grounding":
            _, entities = clean_text_and_extract_entities_with_bboxes(it["output_text"])
            used = set()
            all_ok = True
            it["pred_entities"] = [[e[0], [list(b) for b in e[2]]] for e in entities]
            for o in it["objects"]:
                best = 0.0
                for j, (phrase, _, boxes) in enumerate(entities):
                    if j in used or phrase != o["phrase"] or not boxes:
                        continue
                    used.add(j)
                    best = iou(boxes[0], o["box"])
                    break
                ious.append(best)
                ok = best >= 0.5
                all_ok &= ok
                res["grounding IoU@0.5 (objects)"][0] += ok
                res["grounding IoU@0.5 (objects)"][1] += 1
            it["correct"] = all_ok
            res["grounding (all objects of an image)"][0] += all_ok
            res["grounding (all objects of an image)"][1] += 1
    out = {k: dict(correct=c, total=n, accuracy=round(c / n, 4)) for k, (c, n) in sorted(res.items())}
    if ious:
        out["grounding mean IoU"] = round(sum(ious) / len(ious), 4)
    return out


def dump(dir_: Path, images, items, seed: int, n_images: int, n_classify: int, n_pixels: int, proc) -> None:
    """The held-out set for the Rust evaluator (see HELDOUT_README): the first `n_images` caption/VQA/grounding scenes
    and the first `n_classify` classification scenes with all their items and the torch outputs, plus the exact pixel
    values of the first `n_pixels` images."""
    from PIL import Image
    from safetensors.torch import save_file

    img_dir = dir_ / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.glob("*.png"):
        old.unlink()
    gen_imgs = sorted({it["image"] for it in items if it["task"] != "classify"})[:n_images]
    cls_imgs = sorted({it["image"] for it in items if it["task"] == "classify"})[:n_classify]
    # The images with pixel values (the first n_pixels) cover every task: a quarter of them are classification scenes.
    n_cls_px = min(len(cls_imgs), n_pixels // 4)
    n_gen_px = n_pixels - n_cls_px
    chosen = gen_imgs[:n_gen_px] + cls_imgs[:n_cls_px] + gen_imgs[n_gen_px:] + cls_imgs[n_cls_px:]
    index = {k: i for i, k in enumerate(chosen)}
    for k in chosen:
        images[k].save(img_dir / f"{index[k]:03d}.png", optimize=True)
    lines = []
    per_image = defaultdict(int)
    for it in sorted((it for it in items if it["image"] in index), key=lambda it: index[it["image"]]):
        i = index[it["image"]]
        d = dict(id=f"{i:03d}-{per_image[i]}", image=f"images/{i:03d}.png", task=it["task"], prompt=it["prompt"])
        per_image[i] += 1
        if it["task"] in ("caption", "vqa"):
            d["answer"] = it["expected"].strip()
        if it["task"] == "vqa":
            d["qtype"] = it["qtype"]
        if it["task"] == "classify":
            d["candidates"] = it["candidates"]
            d["label"] = it["candidates"].index(it["label"])
            d["torch_scores"] = [round(x, 6) for x in it["scores"]]
        if it["task"] == "grounding":
            d["objects"] = [dict(phrase=o["phrase"], box=o["box"]) for o in it["objects"]]
        d["torch_output"] = it["generated_text"]
        d["torch_ids"] = it["output_ids"]
        if i < n_pixels:
            d["pixel_row"] = i
        lines.append(json.dumps(d, ensure_ascii=False))
    (dir_ / "set.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    px_images = [Image.open(img_dir / f"{i:03d}.png").convert("RGB") for i in range(min(n_pixels, len(chosen)))]
    pv = proc.image_processor(px_images, return_tensors="pt")["pixel_values"].contiguous()
    rows = [[json.loads(line)["id"] for line in lines if json.loads(line).get("pixel_row") == r] for r in range(len(px_images))]
    save_file({"pixel_values": pv}, str(dir_ / "pixels.safetensors"),
              metadata={"images": json.dumps([f"images/{r:03d}.png" for r in range(len(px_images))]),
                        "item_ids": json.dumps(rows)})
    (dir_ / "README.md").write_text(HELDOUT_README.format(seed=seed, rows=len(px_images), items=len(lines),
                                                          images=len(chosen), h=pv.shape[2], w=pv.shape[3]),
                                    encoding="utf-8")


HELDOUT_README = """# Held-out set of the demo model

Generated by `tools/train/run.sh eval --dump models/demo/heldout` (tools/train/eval_torch.py) from held-out seed
{seed} (training uses seed 1234): {items} items on {images} images (`images/NNN.png`, 128x128 RGB, as rendered).

## set.jsonl

One item per line:

| field | tasks | meaning |
| --- | --- | --- |
| `id` | all | `NNN-k`: image NNN, item k of that image |
| `image` | all | PNG path relative to this folder |
| `task` | all | `caption`, `vqa`, `classify` or `grounding` |
| `prompt` | all | the text after the image, exactly as the model is prompted (`<s><image>` + latent_query_num image positions + `</image>` come before it, as Kosmos2Processor builds them) |
| `answer` | caption, vqa | the expected text (caption: every phrase, in left-to-right order; vqa: one word) |
| `qtype` | vqa | question type (color, shape, count, exists, classify_shape, classify_color, word) |
| `candidates`, `label` | classify | candidate labels and the index of the right one; rank `" " + candidate` after the prompt by mean log-prob per token (no `</s>`) |
| `torch_scores` | classify | PyTorch's mean log-prob per token of each candidate |
| `objects` | grounding | `[{{"phrase", "box": [x1, y1, x2, y2]}}]`, the tight ink box normalised to [0, 1] |
| `torch_ids` | all | PyTorch greedy new token ids (HF `generate`, do_sample=False, the shipped generation_config, max_new_tokens 64), up to and including `</s>` (id 2) |
| `torch_output` | all | `tokenizer.decode(torch_ids, skip_special_tokens=True)`: the generated text only (tags such as `<phrase>` and `<patch_index_NNNN>` kept) |
| `pixel_row` | items of the first {rows} images | row of `pixels.safetensors` holding this item's pixel values |

The torch outputs were produced with HF's own image preprocessing (CLIPImageProcessor of preprocessor_config.json) of
the PNG.

## pixels.safetensors

* tensor `pixel_values`: f32 [{rows}, 3, {h}, {w}], the CLIPImageProcessor output for `images/000.png` ... in order
  (row r = `images/{{r:03d}}.png`), exactly what the PyTorch model was given.
* metadata `images`: JSON list of the image paths of the rows; metadata `item_ids`: JSON list (per row) of the ids of
  the items that use that row.

With these pixels the Rust pipeline's greedy ids must equal `torch_ids` exactly.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--seed", type=int, default=20251126)
    ap.add_argument("--images", type=int, default=300, help="scenes for caption, grounding and 2 questions each")
    ap.add_argument("--classify", type=int, default=200, help="one-object scenes for classification (2 items each)")
    ap.add_argument("--no-repeat-ngram-size", type=int, default=None, help="override the generation_config value")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dump", type=Path, default=None,
                    help="write the held-out set for the Rust evaluator here (set.jsonl, images/, pixels.safetensors)")
    ap.add_argument("--dump-images", type=int, default=60, help="caption/VQA/grounding scenes in the dump (4 items each)")
    ap.add_argument("--dump-classify", type=int, default=20, help="classification scenes in the dump (2 items each)")
    ap.add_argument("--dump-pixels", type=int, default=24, help="images whose exact pixel values are dumped")
    ap.add_argument("--json", type=Path, default=None, help="write the metrics here")
    ap.add_argument("--show", type=int, default=0, help="print this many outputs per task")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, proc = load(args.model)
    images, items = build_items(args.seed, args.images, args.classify)

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    generate(model, proc, images, items, args.no_repeat_ngram_size, log)
    score_candidates(model, proc, images, items)
    log("scored")
    metrics = judge(items)
    ngram = args.no_repeat_ngram_size if args.no_repeat_ngram_size is not None else model.generation_config.no_repeat_ngram_size
    print(f"model {args.model}  held-out seed {args.seed}  no_repeat_ngram_size {ngram}")
    print(f"{'metric':40s} {'accuracy':>9s} {'correct':>8s} {'total':>6s}")
    for k, v in metrics.items():
        if isinstance(v, dict):
            print(f"{k:40s} {100 * v['accuracy']:8.1f}% {v['correct']:8d} {v['total']:6d}")
        else:
            print(f"{k:40s} {v:9.3f}")
    if args.show:
        shown = defaultdict(int)
        for it in items:
            if shown[it["task"]] < args.show and "output_text" in it:
                shown[it["task"]] += 1
                print(f"  [{it['task']}] {'OK ' if it['correct'] else 'BAD'} {it['output_text']!r}  expected {it.get('expected', it.get('label'))!r}")
    if args.json:
        args.json.write_text(json.dumps(dict(seed=args.seed, no_repeat_ngram_size=ngram, metrics=metrics), indent=2) + "\n")
    if args.dump:
        dump(args.dump, images, items, args.seed, args.dump_images, args.dump_classify, args.dump_pixels, proc)
        log(f"wrote {args.dump}")


if __name__ == "__main__":
    main()
