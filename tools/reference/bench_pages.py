#!/usr/bin/env python3
"""PyTorch (HF transformers) timings of Kosmos-2.5's page encoder, the baseline `page_bench` is compared with.

    tools/reference/run.sh python tools/reference/bench_pages.py --model DIR --threads N --json OUT \
        [--patches 1024,4096] [--write-model]

With --write-model a missing DIR is first filled with the random benchmark model (HF's own init, seed 0, f32): the
Kosmos-2.5 architecture at a width two cores can time, vision 8 layers x 512 (8 heads of 64, gated MLP 1408,
patch 16 x 16, 4096 patches), the real model's 2048 latent queries, text 4 layers x 512 with a 2048-token
vocabulary, and a word-level tokenizer.json holding Kosmos-2.5's special tokens (the decoder service reads the
`<image>` / `</image>` ids from it), so the decoder's bench (`decoder_bench --model-dir DIR`) runs on it too.

Protocol (shared/model/examples/page_bench.rs replicates it):
  * Model: Kosmos2_5ForConditionalGeneration.from_pretrained(DIR, attn_implementation=IMPL), float32, eval(), for
    IMPL in ("eager", "sdpa"); the faster one per measurement is the baseline (both kept in the JSON);
    torch.set_num_threads(N); OMP_WAIT_POLICY=PASSIVE unless set; torch.inference_mode().
  * Input for P patches: a page whose grid is R x C = P (1024: 32 x 32, 4096: 64 x 64) filling the budget
    (max_patches = P): flattened_patches [1, P, 2 + 768], row ids 1..R, column ids 1..C, pixel values N(0, 1) from
    torch.manual_seed(0).
  * Timed: vision_model(flattened_patches) -> L2 normalise -> image_to_text_projection (what
    Kosmos2_5ForConditionalGeneration.forward runs for image_embeds). WARMUP 1, REPS 3, median of
    time.perf_counter(); pages_per_s_p{P} = 1 / median.
Output JSON: {"pages_per_s_p{P}": ..., "attn_implementation": {P: IMPL}, "median_s", "by_attn_implementation",
"threads", "torch", "transformers", "model"}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import Kosmos2_5Config, Kosmos2_5ForConditionalGeneration, Kosmos2_5ImageProcessor

IMPLEMENTATIONS = ("eager", "sdpa")
GRIDS = {1024: (32, 32), 4096: (64, 64)}
PATCH = 16


def write_model(out: Path) -> None:
    torch.manual_seed(0)
    config = Kosmos2_5Config(
        vision_config=dict(
            hidden_size=512,
            patch_embed_hidden_size=PATCH * PATCH * 3,
            intermediate_size=1408,
            head_dim=64,
            num_hidden_layers=8,
            num_attention_heads=8,
            max_num_patches=4097,
        ),
        text_config=dict(vocab_size=2048, embed_dim=512, layers=4, ffn_dim=2048, attention_heads=8,
                         max_position_embeddings=4096),
        latent_query_num=2048,
    )
    model = Kosmos2_5ForConditionalGeneration(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    Kosmos2_5ImageProcessor(patch_size={"height": PATCH, "width": PATCH}, max_patches=4096).save_pretrained(out)
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<image>", "</image>"]
    vocab = {token: index for index, token in enumerate(specials + ["<ocr>", "<md>"])}
    vocab.update({f"t{i}": i for i in range(len(vocab), 2048)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.save(str(out / "tokenizer.json"))


def page(patches: int) -> torch.Tensor:
    rows, cols = GRIDS[patches]
    torch.manual_seed(0)
    pixels = torch.randn(rows * cols, PATCH * PATCH * 3)
    row_ids = torch.arange(1, rows + 1).repeat_interleave(cols).float()[:, None]
    col_ids = torch.arange(1, cols + 1).repeat(rows).float()[:, None]
    return torch.cat([row_ids, col_ids, pixels], dim=-1)[None]


def timed(fn, warmup: int = 1, reps: int = 3) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), runs


def main() -> None:
    ap = argparse.ArgumentParser(description="PyTorch Kosmos-2.5 page encoder timings")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--patches", default="1024,4096")
    ap.add_argument("--write-model", action="store_true")
    args = ap.parse_args()
    if not (args.model / "model.safetensors").exists():
        if not args.write_model:
            raise SystemExit(f"{args.model} holds no model (pass --write-model to write the benchmark model)")
        write_model(args.model)
    torch.set_num_threads(args.threads)
    sizes = [int(p) for p in args.patches.split(",")]
    by_impl: dict[str, dict] = {}
    with torch.inference_mode():
        for impl in IMPLEMENTATIONS:
            model = Kosmos2_5ForConditionalGeneration.from_pretrained(args.model, attn_implementation=impl).eval()
            results = {}
            for patches in sizes:
                flattened = page(patches)

                def encode(flattened=flattened, model=model):
                    hidden = model.vision_model(flattened_patches=flattened).last_hidden_state
                    return model.image_to_text_projection(torch.nn.functional.normalize(hidden, dim=-1))[0]

                median, runs = timed(encode)
                results[patches] = {"median_s": median, "runs_s": runs}
                print(f"{impl} {patches} patches: {median:.3f} s")
            by_impl[impl] = results
            del model
    out = {"threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
           "model": str(args.model), "attn_implementation": {}, "median_s": {},
           "by_attn_implementation": {impl: {str(p): r for p, r in res.items()} for impl, res in by_impl.items()}}
    for patches in sizes:
        impl = min(IMPLEMENTATIONS, key=lambda i: by_impl[i][patches]["median_s"])
        median = by_impl[impl][patches]["median_s"]
        out[f"pages_per_s_p{patches}"] = 1.0 / median
        out["attn_implementation"][str(patches)] = impl
        out["median_s"][str(patches)] = median
    args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
