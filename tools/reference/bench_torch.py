#!/usr/bin/env python3
"""PyTorch (HF transformers) timings of a Kosmos-2 model, the baseline the Rust bench is compared with.

    tools/reference/run.sh bench-torch --model DIR --threads N --json OUT
        [--device cpu|cuda] [--dtype f32|f16|bf16] [--attn eager|sdpa] [--vision-batches 8] [--decode-batches 1,8]

Protocol (the Rust bench replicates it exactly):
  * Model: Kosmos2ForConditionalGeneration.from_pretrained(DIR, attn_implementation="eager"), float32, eval();
    torch.set_num_threads(N); everything under torch.inference_mode().
  * Inputs (torch.manual_seed(0)): pixel_values ~ N(0, 1) of shape [8, 3, S, S] (S = vision image_size);
    Q = latent_query_num; the prompt of length L = 128 is
        [<s>=0, <image>, 4, 5, ..., 4+Q-1, </image>] + (L - Q - 3) text ids drawn uniformly from [4+Q, first tag id)
    with image_embeds_position_mask = 1 on the Q placeholders; attention_mask all ones; no padding.
  * Timer: time.perf_counter(). Each measurement: WARMUP untimed runs, then REPS timed runs; the median is reported.
  (a) vision_images_per_s: image features of the 8 images = vision tower -> post_layernorm (all tokens) ->
      L2 normalise -> connector (as Kosmos2Model.get_image_features). 8 / median seconds. WARMUP 1, REPS 5.
  (b) prefill_tokens_per_s: batch 1. image_embeds of one image computed beforehand (untimed). Timed: one
      text_model(input_ids [1,L], attention_mask, image_embeds [1,Q,D], image_embeds_position_mask,
      position_ids = 2..L+1, use_cache=True, logits_to_keep=1) call (a fresh cache each run: the KV of all L
      tokens, logits of the last position only). L / median seconds. WARMUP 1, REPS 5.
  (c) decode_tokens_per_s_b{1,8}: batch B (the same prompt and image embeds repeated B times). Untimed: the prefill
      of (b) with batch B, next = argmax of its last logits. Timed: 32 steps, each one
      text_model(input_ids=next [B,1], attention_mask ones [B, L+s+1], past_key_values=cache,
      position_ids = [[L+s+2]]*B, use_cache=True, logits_to_keep=1) followed by next = argmax(logits[:, -1]),
      s = 0..31 (greedy, no generate() overhead, no stopping at eos). B*32 / median seconds of the 32 steps.
      WARMUP 1, REPS 5 (each from a fresh prefill).
Output JSON: {"vision_images_per_s", "prefill_tokens_per_s", "decode_tokens_per_s_b1", "decode_tokens_per_s_b8",
"threads", "torch"} plus "transformers", "model", the median seconds of each measurement ("median_s") and every
timed run ("runs_s").

The defaults are the protocol above (CPU, f32, eager). The options vary only what they name, for the GPU run
(tools/bench/gpu.sh): the device (timings then end with torch.cuda.synchronize()), the weight dtype, the attention
implementation, and the vision / decode batch sizes (keys vision_images_per_s_b{N} and decode_tokens_per_s_b{N}
for each; vision_images_per_s stays the first vision batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

PROMPT_LEN = 128
DECODE_STEPS = 32
VISION_BATCH = 8
DECODE_REPS = 5


RUNS_S: dict[str, list[float]] = {}


def timed(name: str, fn, warmup: int, reps: int) -> float:
    """Median seconds of `reps` calls of fn() after `warmup` untimed ones; fn may return its own duration."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        own = fn()
        times.append(own if isinstance(own, float) else time.perf_counter() - t0)
    RUNS_S[name] = times
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description="PyTorch Kosmos-2 timings")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("f32", "f16", "bf16"), default="f32")
    ap.add_argument("--attn", choices=("eager", "sdpa"), default="eager")
    ap.add_argument("--vision-batches", default=str(VISION_BATCH), help="comma separated")
    ap.add_argument("--decode-batches", default="1,8", help="comma separated")
    args = ap.parse_args()
    vision_batches = [int(b) for b in args.vision_batches.split(",")]
    decode_batches = [int(b) for b in args.decode_batches.split(",")]
    device = torch.device(args.device)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    import transformers
    from transformers import Kosmos2ForConditionalGeneration

    torch.set_num_threads(args.threads)
    model = Kosmos2ForConditionalGeneration.from_pretrained(args.model, attn_implementation=args.attn, dtype=dtype)
    model.to(device)
    model.eval()
    cfg = model.config
    Q = cfg.latent_query_num
    S = cfg.vision_config.image_size
    V = cfg.text_config.vocab_size
    L = PROMPT_LEN
    tag0 = V - 11 - 1024  # first tag token id (</doc>) of a Kosmos-2 vocabulary
    boi, eoi = tag0 + 1, tag0 + 2

    torch.manual_seed(0)
    pixel_values = torch.randn(max(vision_batches), 3, S, S).to(device, dtype)
    text = torch.randint(4 + Q, tag0, (L - Q - 3,))
    ids = torch.cat([torch.tensor([0, boi]), torch.arange(4, 4 + Q), torch.tensor([eoi]), text])[None].to(device)
    iem = torch.zeros_like(ids)
    iem[0, 2: 2 + Q] = 1
    assert ids.shape == (1, L)

    def image_features(pv):
        # = Kosmos2Model.get_image_features (Kosmos2ForConditionalGeneration.forward/generate inline the same steps)
        x = model.vision_model(pixel_values=pv).last_hidden_state
        x = torch.nn.functional.normalize(model.vision_model.model.post_layernorm(x), dim=-1)
        return model.image_to_text_projection(x)[0]

    def synced(fn):
        def run():
            out = fn()
            sync()
            return out
        return run

    median_s = {}
    with torch.inference_mode():
        for b in vision_batches:
            name = "vision" if b == vision_batches[0] else f"vision_b{b}"
            median_s[name] = timed(name, synced(lambda b=b: image_features(pixel_values[:b])), warmup=1, reps=5)
        img = image_features(pixel_values[:1])

        batched = {b: (ids.repeat(b, 1), iem.repeat(b, 1), img.repeat(b, 1, 1),
                       torch.arange(2, L + 2, device=device)[None].repeat(b, 1))
                   for b in sorted({1, *decode_batches})}

        def prefill(b):
            b_ids, b_iem, b_img, b_pos = batched[b]
            return model.text_model(
                input_ids=b_ids, attention_mask=torch.ones(b, L, dtype=torch.long, device=device), image_embeds=b_img,
                image_embeds_position_mask=b_iem, position_ids=b_pos, use_cache=True, logits_to_keep=1)

        median_s["prefill"] = timed("prefill", synced(lambda: prefill(1)), warmup=1, reps=5)

        for b in decode_batches:
            def decode_run(b=b):
                out = prefill(b)
                cache = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                sync()
                t0 = time.perf_counter()
                for s in range(DECODE_STEPS):
                    o = model.text_model(
                        input_ids=nxt, attention_mask=torch.ones(b, L + s + 1, dtype=torch.long, device=device),
                        past_key_values=cache, position_ids=torch.full((b, 1), L + s + 2, device=device),
                        use_cache=True, logits_to_keep=1)
                    cache = o.past_key_values
                    nxt = o.logits[:, -1].argmax(-1, keepdim=True)
                sync()
                return time.perf_counter() - t0

            median_s[f"decode_b{b}"] = timed(f"decode_b{b}", decode_run, warmup=1, reps=DECODE_REPS)

    result = {
        "vision_images_per_s": vision_batches[0] / median_s["vision"],
        "prefill_tokens_per_s": L / median_s["prefill"],
        **{f"vision_images_per_s_b{b}": b / median_s["vision" if b == vision_batches[0] else f"vision_b{b}"]
           for b in vision_batches},
        **{f"decode_tokens_per_s_b{b}": b * DECODE_STEPS / median_s[f"decode_b{b}"] for b in decode_batches},
        "device": args.device,
        "dtype": args.dtype,
        "attn": args.attn,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": str(args.model),
        "median_s": median_s,
        "runs_s": RUNS_S,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
