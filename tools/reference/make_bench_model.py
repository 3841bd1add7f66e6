#!/usr/bin/env python3
"""Writes a mid-size random Kosmos-2 in Hugging Face layout, for benchmarks (not a fixture: keep it out of git).

    tools/reference/run.sh bench-model DIR        (e.g. DIR = .ref-cache/bench-model)

vision: CLIP ViT 12 layers x 768, 12 heads, MLP 3072, image 224, patch 16 (197 tokens), quick_gelu;
text: 12 layers x 768, 12 heads, FFN 3072, max positions 2048, vocab = the test tokenizer (tests/fixtures/tiny);
connector: latent_query_num 64. HF's own random init under a fixed seed (about 175 M parameters, ~700 MB f32).
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


def bench_config(vocab_size: int):
    from transformers import Kosmos2Config

    text = common.tiny_text_config(vocab_size)
    text.update(embed_dim=768, layers=12, attention_heads=12, ffn_dim=3072, max_position_embeddings=2048)
    vision = common.tiny_vision_config()
    vision.update(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072)
    return Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=64)


def main() -> None:
    ap = argparse.ArgumentParser(description="write the random benchmark model")
    ap.add_argument("dir", type=Path)
    args = ap.parse_args()
    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)

    from transformers import GenerationConfig, Kosmos2ForConditionalGeneration

    tok_json = common.build_tokenizer_json()
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    tok = common.wrap_tokenizer(out / "tokenizer.json")
    common.check_tokenizer(tok)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    common.seed_everything(SEED)
    config = bench_config(len(tok))
    model = Kosmos2ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(**common.generation_config_dict())
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if (out / extra).exists():
            (out / extra).unlink()
    common.make_image_processor({"height": 224, "width": 224}, {"height": 224, "width": 224}).save_pretrained(out)

    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {n / 1e6:.1f} M parameters, vocab {len(tok)}")
    for p in sorted(out.iterdir()):
        print(f"  {p.name}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
