#!/usr/bin/env python3
"""Writes a mid-size random Kosmos-2 in Hugging Face layout, for benchmarks (not a fixture: keep it out of git).

    tools/reference/run.sh bench-model DIR [--preset base|small|kosmos2] [--shape mid|kosmos2] [--device cpu|cuda] [--text-width W --text-layers N ...]

Presets (any size flag overrides its preset value):
  base (default): vision CLIP ViT 12 layers x 768, 12 heads, MLP 3072, image 224, patch 16 (197 tokens),
      quick_gelu; text 12 layers x 768, 12 heads, FFN 3072 (85 M text parameters); about 175 M parameters,
      ~700 MB f32.
  small: vision 12 layers x 384, 6 heads, MLP 1536 (ViT-S/16, image 224, 197 tokens); text 8 layers x 512,
      8 heads, FFN 2048 (25 M text parameters); about 48 M parameters.
Both: max positions 2048, vocab = the test tokenizer (tests/fixtures/tiny), connector latent_query_num 64, HF's own
random init under a fixed seed.
  kosmos2 (alias --shape kosmos2; --shape mid = base): the shapes of microsoft/kosmos-2-patch14-224: vision 24 x 1024,
      16 heads, MLP 4096, image 224, patch 14 (257 tokens); text 24 x 2048, 32 heads, FFN 8192, vocab 65037 (the
      test tokenizer covers only its first ids; the benchmarks feed ids, not text); 64 latent queries. About
      1.66 B parameters, 6.6 GB f32.
--device cuda initialises the weights on the GPU (seconds instead of minutes); the file is the same format (f32),
though not the same random values as a CPU init.
Files: config.json, model.safetensors, generation_config.json, tokenizer.json, preprocessor_config.json
(CLIPImageProcessor squashing to 224x224).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import torch  # noqa: E402

SEED = 4321


PRESETS = {
    "base": dict(text_width=768, text_layers=12, text_heads=12, text_ffn=3072,
                 vision_width=768, vision_layers=12, vision_heads=12, vision_mlp=3072,
                 image_size=224, patch_size=16, queries=64),
    "small": dict(text_width=512, text_layers=8, text_heads=8, text_ffn=2048,
                  vision_width=384, vision_layers=12, vision_heads=6, vision_mlp=1536,
                  image_size=224, patch_size=16, queries=64),
    # The shapes of microsoft/kosmos-2-patch14-224 (HF's Kosmos2Config defaults), for the GPU run (tools/bench/gpu.sh).
    "kosmos2": dict(text_width=2048, text_layers=24, text_heads=32, text_ffn=8192,
                    vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
                    image_size=224, patch_size=14, queries=64),
}
# Presets whose vocabulary is not the test tokenizer's (the benchmarks feed ids, not text).
PRESET_VOCAB = {"kosmos2": 65037}


def bench_config(vocab_size: int, size: dict):
    from transformers import Kosmos2Config

    text = common.tiny_text_config(vocab_size)
    text.update(embed_dim=size["text_width"], layers=size["text_layers"], attention_heads=size["text_heads"],
                ffn_dim=size["text_ffn"], max_position_embeddings=2048)
    vision = common.tiny_vision_config()
    vision.update(image_size=size["image_size"], patch_size=size["patch_size"], hidden_size=size["vision_width"],
                  num_hidden_layers=size["vision_layers"], num_attention_heads=size["vision_heads"],
                  intermediate_size=size["vision_mlp"])
    return Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=size["queries"])


def main() -> None:
    ap = argparse.ArgumentParser(description="write the random benchmark model")
    ap.add_argument("dir", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--shape", choices=("mid", "kosmos2"), default=None,
                    help="alias of --preset (the cuda branch's name, used by tools/bench/gpu.sh): mid = base")
    ap.add_argument("--device", default="cpu", help="where the random init runs (cpu, cuda)")
    for name in PRESETS["base"]:
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                        help=f"overrides the preset's {name}")
    args = ap.parse_args()
    shape_preset = {"mid": "base", "kosmos2": "kosmos2", None: None}[args.shape]
    if args.preset and shape_preset and args.preset != shape_preset:
        ap.error(f"--preset {args.preset} contradicts --shape {args.shape}")
    args.preset = args.preset or shape_preset or "base"
    size = {name: getattr(args, name) if getattr(args, name) is not None else value
            for name, value in PRESETS[args.preset].items()}
    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)

    from transformers import GenerationConfig, Kosmos2ForConditionalGeneration

    tok_json = common.build_tokenizer_json()
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    tok = common.wrap_tokenizer(out / "tokenizer.json")
    common.check_tokenizer(tok)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    common.seed_everything(SEED)
    config = bench_config(PRESET_VOCAB.get(args.preset, len(tok)), size)
    with torch.device(args.device):
        model = Kosmos2ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(**common.generation_config_dict())
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if (out / extra).exists():
            (out / extra).unlink()
    common.make_image_processor({"height": 224, "width": 224}, {"height": 224, "width": 224}).save_pretrained(out)

    n = sum(p.numel() for p in model.parameters())
    n_text = sum(p.numel() for p in model.text_model.parameters())
    print(f"wrote {out}: {n / 1e6:.1f} M parameters ({n_text / 1e6:.1f} M text), vocab {config.text_config.vocab_size}, {args.preset} {size}")
    for p in sorted(out.iterdir()):
        print(f"  {p.name}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
