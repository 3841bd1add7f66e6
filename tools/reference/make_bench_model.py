#!/usr/bin/env python3
"""Writes a mid-size random Kosmos-2 in Hugging Face layout, for benchmarks (not a fixture: keep it out of git).

    tools/reference/run.sh bench-model DIR [--shape mid|kosmos2] [--device cpu|cuda]

--shape mid (the default; e.g. DIR = .ref-cache/bench-model):
vision: CLIP ViT 12 layers x 768, 12 heads, MLP 3072, image 224, patch 16 (197 tokens), quick_gelu;
text: 12 layers x 768, 12 heads, FFN 3072, max positions 2048, vocab = the test tokenizer (tests/fixtures/tiny);
connector: latent_query_num 64. HF's own random init under a fixed seed (about 175 M parameters, ~700 MB f32).
--shape kosmos2: the shapes of microsoft/kosmos-2-patch14-224 (HF's Kosmos2Config defaults): vision 24 x 1024,
16 heads, MLP 4096, image 224, patch 14 (257 tokens); text 24 x 2048, 32 heads, FFN 8192, vocab 65037 (the test
tokenizer covers only its first ids; the benchmarks feed ids, not text); 64 latent queries. About 1.66 B parameters,
6.6 GB f32. --device cuda initialises the weights on the GPU (seconds instead of minutes); the file is the same
format either way (f32), though not the same random values as a CPU init.
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


def bench_config(vocab_size: int, shape: str = "mid"):
    from transformers import Kosmos2Config

    text = common.tiny_text_config(vocab_size)
    vision = common.tiny_vision_config()
    if shape == "kosmos2":
        text.update(vocab_size=65037, embed_dim=2048, layers=24, attention_heads=32, ffn_dim=8192,
                    max_position_embeddings=2048)
        vision.update(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096)
    else:
        text.update(embed_dim=768, layers=12, attention_heads=12, ffn_dim=3072, max_position_embeddings=2048)
        vision.update(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072)
    return Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=64)


def main() -> None:
    ap = argparse.ArgumentParser(description="write the random benchmark model")
    ap.add_argument("dir", type=Path)
    ap.add_argument("--shape", choices=("mid", "kosmos2"), default="mid",
                    help="mid: 12 x 768 (the CPU benchmark); kosmos2: the real microsoft/kosmos-2-patch14-224 shapes")
    ap.add_argument("--device", default="cpu", help="where the random init runs (cpu, cuda)")
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
    config = bench_config(len(tok), args.shape)
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
    print(f"wrote {out}: {n / 1e6:.1f} M parameters, vocab {len(tok)}")
    for p in sorted(out.iterdir()):
        print(f"  {p.name}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
