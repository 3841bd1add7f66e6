#!/usr/bin/env python3
"""Does a document model read its pages? Teacher-forced accuracy per kind of answer token on train_doc.py's probe
pages, with each page's own image and with the images rotated by one page (every text paired with another page).

    tools/train/run.sh probe-doc MODEL_DIR

A model that reads loses its word and digit accuracy when the images are swapped; one that has learned only the
text prior and the layout keeps it. Kinds: `coord` (<x_N>, <y_N>), `digit` (pieces of digits), `word` (pieces of
two or more letters), `other` (markup, punctuation, the tags, </s>). The tokenizer is the model directory's (a
digit piece is one digit under train_doc.py's default `--number-pieces digits`, up to three under `bpe`, so digit
accuracies of the two kinds of model do not compare).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import doc_data  # noqa: E402
import torch  # noqa: E402
import train_doc  # noqa: E402


def kinds(tokenizer, targets: torch.Tensor, x0: int) -> dict[str, torch.Tensor]:
    pieces = [tokenizer.decode([int(t)]).strip() for t in targets]
    coord = (targets >= x0) & (targets < x0 + 2 * doc_data.MAX_COORD)
    digit = torch.tensor([p.isdigit() for p in pieces]) & ~coord
    word = torch.tensor([len(p) >= 2 and p.isalpha() for p in pieces]) & ~coord
    return {"coord": coord, "digit": digit, "word": word, "other": ~coord & ~digit & ~word}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--pages", type=int, default=8, help="probe pages (train_doc.py's: seeds 777, 778, ...)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from transformers import AutoTokenizer, Kosmos2_5ForConditionalGeneration

    torch.set_num_threads(args.threads)
    model = Kosmos2_5ForConditionalGeneration.from_pretrained(args.model, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    queries = model.config.latent_query_num
    processor = train_doc.processor_for(tokenizer, queries)
    pages = [doc_data.make_page(random.Random(777 + i)) for i in range(args.pages)]
    batch = train_doc.build_batch(processor, tokenizer, pages, queries // train_doc.QUERY_ROWS)
    x0, _ = train_doc.coord_ranges(tokenizer)
    keep = batch["labels"] != -100
    targets = batch["labels"][keep]
    by_kind = kinds(tokenizer, targets, x0)
    print("| images | " + " | ".join(f"{k} (n={int(v.sum())})" for k, v in by_kind.items()) + " | text |")
    print("|---" * (len(by_kind) + 2) + "|")
    for name, order in (("own", torch.arange(len(pages))), ("rotated", torch.roll(torch.arange(len(pages)), 1))):
        swapped = dict(batch)
        for key in ("flattened_patches", "attention_mask_patches"):
            swapped[key] = batch[key][order]
        embeds, _ = train_doc.image_embeds(model, swapped)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       image_embeds=embeds.repeat(len(train_doc.TASKS), 1, 1),
                       image_embeds_position_mask=batch["iemask"]).logits
        right = logits[keep].argmax(-1) == targets
        cells = [f"{right[mask].float().mean():.3f}" for mask in by_kind.values()]
        print(f"| {name} | " + " | ".join(cells) + f" | {right[~by_kind['coord']].float().mean():.3f} |")


if __name__ == "__main__":
    main()
