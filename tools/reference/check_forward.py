#!/usr/bin/env python3
"""Checks the Rust forward harness against HF transformers on any model directory.

    tools/reference/run.sh python tools/reference/check_forward.py --model DIR [--work DIR]

Writes IN.safetensors (a left-padded batch of 3: one image then text; text, image, text, image, text; text only),
runs HF Kosmos2 (eager, f32) on it, runs
`cargo run --release -p kosmos-model --example forward -- --model DIR --inputs IN --out OUT`, and prints the max
absolute difference of the logits (non-pad positions) and of the image embeddings.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path(".ref-cache/check-forward"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    from transformers import Kosmos2ForConditionalGeneration

    model = Kosmos2ForConditionalGeneration.from_pretrained(args.model, attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    cfg = model.config
    q, size, vocab = cfg.latent_query_num, cfg.vision_config.image_size, cfg.text_config.vocab_size
    first_tag = vocab - 11 - 1024
    boi, eoi = first_tag + 1, first_tag + 2
    g = torch.Generator().manual_seed(7)

    def text(n):
        return torch.randint(4 + q, first_tag, (n,), generator=g).tolist()

    image = [boi] + list(range(4, 4 + q)) + [eoi]
    rows = [[0] + image + text(9), [0] + text(5) + image + text(3) + image + text(4), [0] + text(12)]
    width = max(len(r) for r in rows)
    ids = torch.full((3, width), 1, dtype=torch.long)
    att = torch.zeros((3, width), dtype=torch.long)
    iem = torch.zeros((3, width), dtype=torch.long)
    for b, r in enumerate(rows):
        pad = width - len(r)
        ids[b, pad:] = torch.tensor(r)
        att[b, pad:] = 1
        for p, tok in enumerate(r):
            if 4 <= tok < 4 + q and p > 0 and (r[p - 1] == boi or 4 <= r[p - 1] < 4 + q):
                iem[b, pad + p] = 1
    n_images = int(iem.sum()) // q
    pixels = torch.randn(n_images, 3, size, size, generator=g)
    inputs = args.work / "in.safetensors"
    save_file({"input_ids": ids, "attention_mask": att, "image_embeds_position_mask": iem,
               "pixel_values": pixels}, str(inputs))

    with torch.inference_mode():
        x = model.vision_model(pixel_values=pixels).last_hidden_state
        x = torch.nn.functional.normalize(model.vision_model.model.post_layernorm(x), dim=-1)
        embeds = model.image_to_text_projection(x)[0]
        logits = model.text_model(input_ids=ids, attention_mask=att, image_embeds=embeds,
                                  image_embeds_position_mask=iem).logits

    out = args.work / "out.safetensors"
    subprocess.run(["cargo", "run", "--release", "-q", "-p", "kosmos-model", "--example", "forward", "--",
                    "--model", str(args.model), "--inputs", str(inputs), "--out", str(out)], check=True)
    ours = load_file(str(out))
    mask = att.bool()
    logit_err = (ours["logits"] - logits).abs()[mask].max().item()
    embed_err = (ours["image_embeds"] - embeds).abs().max().item()
    print(f"model {args.model}: batch {tuple(ids.shape)}, {n_images} images; "
          f"max |logits diff| on non-pad positions {logit_err:.3e}; max |image_embeds diff| {embed_err:.3e}; "
          f"|logits| max {logits.abs().max().item():.2f}")


if __name__ == "__main__":
    main()
