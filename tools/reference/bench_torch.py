#!/usr/bin/env python3
"""PyTorch (HF transformers) timings of a Kosmos-2 model, the baseline the Rust bench is compared with.

    tools/reference/run.sh bench-torch --model DIR --threads N --json OUT
        [--device cpu|cuda] [--dtype f32|f16|bf16] [--attn best|eager|sdpa] [--vision-batches 8] [--decode-batches 1,8]

The defaults are the protocol below (CPU, f32, best of eager and sdpa). The options vary only what they name, for
the GPU run (tools/bench/gpu.sh): the device (each timed run then ends with torch.cuda.synchronize()), the weight
dtype, one attention implementation instead of the best of both, and the vision / decode batch sizes (keys
vision_images_per_s_b{N} for the vision batches after the first, whose rate stays vision_images_per_s, and
decode_tokens_per_s_b{N} for each decode batch).

Protocol (the Rust bench replicates it exactly):
  * Model: Kosmos2ForConditionalGeneration.from_pretrained(DIR, attn_implementation=IMPL), float32, eval(), loaded
    once per IMPL in ("eager", "sdpa"); torch.set_num_threads(N); OMP_WAIT_POLICY=PASSIVE unless the environment
    sets it; everything under torch.inference_mode().
    Each measurement below runs for both implementations back to back and the faster one is the baseline: the
    JSON names it ("attn_implementation") and keeps both results ("by_attn_implementation"). An implementation
    this transformers version refuses for Kosmos-2 is skipped and named in "skipped".
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
"threads", "torch"} (each rate the faster implementation's) plus "attn_implementation" (which one, per
measurement), "transformers", "model", the median seconds of each measurement ("median_s"), every timed run
("runs_s") and the same per implementation ("by_attn_implementation").
"""

from __future__ import annotations

import os

# Under CPU contention (this project's shared 2-core machines) OpenMP's default spin-waiting makes 2 threads several
# times slower than one, which would flatter every ratio against this baseline; passive waiting must be chosen
# before torch (and its OpenMP runtime) is loaded. An OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


IMPLEMENTATIONS = ("eager", "sdpa")
RATES = {  # measurement -> (JSON key, work units per timed run)
    "vision": ("vision_images_per_s", VISION_BATCH),
    "prefill": ("prefill_tokens_per_s", PROMPT_LEN),
    "decode_b1": ("decode_tokens_per_s_b1", 1 * DECODE_STEPS),
    "decode_b8": ("decode_tokens_per_s_b8", 8 * DECODE_STEPS),
}


DEVICE = "cpu"  # set by main (--device); timings on cuda end with torch.cuda.synchronize()
DTYPE = "f32"  # set by main (--dtype)
VISION_BATCHES = [VISION_BATCH]  # set by main (--vision-batches); the first is "vision"
DECODE_BATCHES = [1, 8]  # set by main (--decode-batches)


def set_rates() -> None:
    """RATES for the chosen batch lists (the defaults give the four measurements of the header)."""
    RATES.clear()
    for b in VISION_BATCHES:
        name = "vision" if b == VISION_BATCHES[0] else f"vision_b{b}"
        RATES[name] = ("vision_images_per_s" if b == VISION_BATCHES[0] else f"vision_images_per_s_b{b}", b)
    RATES["prefill"] = ("prefill_tokens_per_s", PROMPT_LEN)
    for b in DECODE_BATCHES:
        RATES[f"decode_b{b}"] = (f"decode_tokens_per_s_b{b}", b * DECODE_STEPS)


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, warmup: int, reps: int) -> tuple[float, list[float]]:
    """Median seconds of `reps` calls of fn() after `warmup` untimed ones (fn may return its own duration), and
    every timed run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        own = fn()
        sync()
        times.append(own if isinstance(own, float) else time.perf_counter() - t0)
    return statistics.median(times), times


class Protocol:
    """The four measurements of the header on one model instance."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        Q = cfg.latent_query_num
        S = cfg.vision_config.image_size
        V = cfg.text_config.vocab_size
        L = PROMPT_LEN
        tag0 = V - 11 - 1024  # first tag token id (</doc>) of a Kosmos-2 vocabulary
        boi, eoi = tag0 + 1, tag0 + 2

        torch.manual_seed(0)
        dev = torch.device(DEVICE)
        self.pixel_values = torch.randn(max(VISION_BATCHES), 3, S, S).to(dev, model.dtype)
        text = torch.randint(4 + Q, tag0, (L - Q - 3,))
        ids = torch.cat([torch.tensor([0, boi]), torch.arange(4, 4 + Q), torch.tensor([eoi]), text])[None].to(dev)
        iem = torch.zeros_like(ids)
        iem[0, 2: 2 + Q] = 1
        assert ids.shape == (1, L)
        img = self.image_features(self.pixel_values[:1])
        self.batched = {b: (ids.repeat(b, 1), iem.repeat(b, 1), img.repeat(b, 1, 1),
                            torch.arange(2, L + 2, device=dev)[None].repeat(b, 1))
                        for b in sorted({1, *DECODE_BATCHES})}

    def image_features(self, pv):
        # = Kosmos2Model.get_image_features (Kosmos2ForConditionalGeneration.forward/generate inline the same steps)
        model = self.model
        x = model.vision_model(pixel_values=pv).last_hidden_state
        x = torch.nn.functional.normalize(model.vision_model.model.post_layernorm(x), dim=-1)
        return model.image_to_text_projection(x)[0]

    def prefill(self, b):
        b_ids, b_iem, b_img, b_pos = self.batched[b]
        return self.model.text_model(
            input_ids=b_ids, attention_mask=torch.ones(b, PROMPT_LEN, dtype=torch.long, device=DEVICE), image_embeds=b_img,
            image_embeds_position_mask=b_iem, position_ids=b_pos, use_cache=True, logits_to_keep=1)

    def decode_run(self, b):
        L = PROMPT_LEN
        out = self.prefill(b)
        cache = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t0 = time.perf_counter()
        for s in range(DECODE_STEPS):
            o = self.model.text_model(
                input_ids=nxt, attention_mask=torch.ones(b, L + s + 1, dtype=torch.long, device=DEVICE),
                past_key_values=cache, position_ids=torch.full((b, 1), L + s + 2, device=DEVICE), use_cache=True,
                logits_to_keep=1)
            cache = o.past_key_values
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        return time.perf_counter() - t0

    def measure(self, name: str) -> tuple[float, list[float]]:
        work = {"prefill": (lambda: self.prefill(1), 5)}
        for b in VISION_BATCHES:
            work["vision" if b == VISION_BATCHES[0] else f"vision_b{b}"] = (
                lambda b=b: self.image_features(self.pixel_values[:b]), 5)
        for b in DECODE_BATCHES:
            work[f"decode_b{b}"] = (lambda b=b: self.decode_run(b), DECODE_REPS)
        fn, reps = work[name]
        return timed(fn, warmup=1, reps=reps)


def main() -> None:
    ap = argparse.ArgumentParser(description="PyTorch Kosmos-2 timings")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--dtype", choices=("f32", "f16", "bf16"), default="f32")
    ap.add_argument("--attn", choices=("best", *IMPLEMENTATIONS), default="best",
                    help="one attention implementation, or the faster of eager and sdpa (default)")
    ap.add_argument("--vision-batches", default=str(VISION_BATCH), help="comma separated (default 8)")
    ap.add_argument("--decode-batches", default="1,8", help="comma separated (default 1,8)")
    args = ap.parse_args()
    global DEVICE, DTYPE, VISION_BATCHES, DECODE_BATCHES
    DEVICE, DTYPE = args.device, args.dtype
    VISION_BATCHES = [int(b) for b in args.vision_batches.split(",")]
    DECODE_BATCHES = [int(b) for b in args.decode_batches.split(",")]
    set_rates()
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    impls = IMPLEMENTATIONS if args.attn == "best" else (args.attn,)

    import transformers
    from transformers import Kosmos2ForConditionalGeneration

    torch.set_num_threads(args.threads)
    protocols: dict[str, Protocol] = {}
    skipped: dict[str, str] = {}
    for impl in impls:
        try:
            model = Kosmos2ForConditionalGeneration.from_pretrained(args.model, attn_implementation=impl,
                                                                    dtype=dtype)
        except (ValueError, ImportError) as error:  # this transformers version does not offer impl for Kosmos-2
            skipped[impl] = str(error).splitlines()[0]
            continue
        model.to(DEVICE)
        model.eval()
        with torch.inference_mode():
            protocols[impl] = Protocol(model)
    if not protocols:
        raise SystemExit(f"no attention implementation loads: {skipped}")

    by_impl: dict[str, dict] = {impl: {"median_s": {}, "runs_s": {}} for impl in protocols}
    with torch.inference_mode():
        for name in RATES:
            # Back to back, so both implementations see the same machine load.
            for impl, protocol in protocols.items():
                median, runs = protocol.measure(name)
                by_impl[impl]["median_s"][name] = median
                by_impl[impl]["runs_s"][name] = runs

    result: dict = {}
    chosen: dict[str, str] = {}
    median_s: dict[str, float] = {}
    runs_s: dict[str, list[float]] = {}
    for name, (key, units) in RATES.items():
        impl = min(protocols, key=lambda i: by_impl[i]["median_s"][name])
        chosen[name] = impl
        median_s[name] = by_impl[impl]["median_s"][name]
        runs_s[name] = by_impl[impl]["runs_s"][name]
        result[key] = units / median_s[name]
        for other in protocols:
            by_impl[other][key] = units / by_impl[other]["median_s"][name]
    # The first vision batch under its batch-named key too, as model_bench writes it (the report pairs keys).
    first = f"vision_images_per_s_b{VISION_BATCHES[0]}"
    if "vision_images_per_s" in result:
        result.setdefault(first, result["vision_images_per_s"])
    result.update({
        "attn_implementation": chosen,
        "device": args.device,
        "dtype": args.dtype,
        "attn": args.attn,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": str(args.model),
        "median_s": median_s,
        "runs_s": runs_s,
        "by_attn_implementation": by_impl,
        "skipped": skipped,
    })
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
