#!/usr/bin/env python3
"""Writes tests/fixtures/kosmos25/: Kosmos-2.5 reference outputs of HF transformers (layout: tests/fixtures/README.md).

Run through `tools/reference/run.sh kosmos25-fixtures` (pinned environment in .venv-ref/). Deterministic.

1. The image processor. `Kosmos2_5ImageProcessor` (transformers 5.23.0, the torchvision backend that
AutoImageProcessor picks) on the shared fixture images and two generated pages, for three configurations that
up- and down-sample and use square and non-square patches:
  * per-image normalisation of the uint8 values: mean and unbiased std over every channel and pixel, the std
    raised to at least 1/sqrt(C*H*W);
  * resize to the largest grid of whole patches, aspect kept, that holds at most `max_patches` patches
    (`torch.nn.functional.interpolate`, bilinear, antialias, align_corners=False, on the normalised floats);
  * patches flattened (row, then column, then channel within a pixel), each row prefixed with its 1-based row and
    column ids, padded with zero rows to `max_patches`; `attention_mask` is 1 on rows whose sum is not zero.
2. A tiny random `Kosmos2_5ForConditionalGeneration` (`tiny/`, eager attention, f32; norms and biases perturbed away
   from their initial values so a weight that is not loaded shows) and its outputs on three pages (12, 15 and 16 of 16 patches used)
   (`reference.safetensors`): the vision tower's last hidden state (after its final RMS norm, padded rows
   included), the image embeddings (L2 normalised, then the connector); with a tiny character-level tokenizer
   holding Kosmos-2.5's tokens, `Kosmos2_5Processor`'s prompts for `<ocr>`, `<md>` and a chat-style `<md>` prompt
   (`<s><image>` + one `<s>` per latent query + `</image>` + text, `image_embeds_position_mask` -1 on the image
   tags and 1 on the placeholders), the chat prompt's logits, and greedy ids from `generate` for two prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    Kosmos2_5Config,
    Kosmos2_5ForConditionalGeneration,
    Kosmos2_5ImageProcessor,
)

torch.set_num_threads(1)

# name -> (patch_size, max_patches)
CONFIGS = {
    # Small images grow, pages shrink; square patches.
    "p8_m64": ({"height": 8, "width": 8}, 64),
    # Non-square patches: rows and columns scale differently.
    "p8x4_m150": ({"height": 8, "width": 4}, 150),
    # Few big patches: everything shrinks, pages by ~10x (the antialiasing filter's wide support).
    "p16_m12": ({"height": 16, "width": 16}, 12),
}


def make_pages(out: Path) -> list[Path]:
    """Two synthetic text pages: landscape on white, portrait on a noisy grey background."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    page = Image.new("RGB", (300, 200), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    draw.text((12, 10), "INVOICE 2026-12", fill=(0, 0, 0))
    for row in range(6):
        draw.text((12, 40 + 22 * row), f"item {row + 1}   {17.5 * (row + 1):8.2f} EUR", fill=(20, 20, 90))
    draw.rectangle((200, 150, 290, 190), outline=(200, 0, 0), width=2)
    p = out / "page_landscape_300x200.png"
    page.save(p, optimize=True)
    paths.append(p)

    rng = np.random.RandomState(25)
    noise = rng.randint(200, 236, size=(260, 90, 1)).astype(np.uint8).repeat(3, axis=2)
    page = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(page)
    for row in range(10):
        draw.text((6, 6 + 25 * row), f"- line {row}", fill=(10, 10, 10))
    p = out / "page_portrait_90x260.png"
    page.save(p, optimize=True)
    paths.append(p)
    return paths


# The tiny model: shapes unlike the real one's (patch 4x4, 16 patches, 5 latent queries).
TINY_PATCH = {"height": 4, "width": 4}
TINY_MAX_PATCHES = 16
TINY_QUERIES = 5
BOS, PAD, EOS, BOI, EOI = 0, 1, 2, 4, 5
# The tiny tokenizer: special tokens, task and box tokens, an 8x8 coordinate grid, then one token per character.
TINY_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<image>", "</image>"]
TINY_TAGS = ["<ocr>", "<md>", "<bbox>", "</bbox>"] + [f"<x_{i}>" for i in range(8)] + [f"<y_{i}>" for i in range(8)]
TINY_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
TINY_VOCAB = len(TINY_SPECIALS) + len(TINY_TAGS) + len(TINY_CHARS)
# Prompts through Kosmos2_5Processor: the two tasks, and a chat-style one with text after the task.
PROMPTS = {"ocr": "<ocr>", "md": "<md>", "chat": "<md>Total? A:"}


def tiny_tokenizer(tiny: Path):
    """A character-level tokenizer with Kosmos-2.5's tokens; `<s>` … `</image>` special (skipped when decoding,
    as the real tokenizer skips them), the task, box and coordinate tokens not (they stay in decoded text)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(TINY_SPECIALS + TINY_TAGS + TINY_CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TINY_TAGS])
    assert tok.get_vocab_size(with_added_tokens=True) == TINY_VOCAB
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"boi_token": "<image>", "eoi_token": "</image>", "image_token": "<s>"},
    )
    assert fast.convert_tokens_to_ids(["<image>", "</image>"]) == [BOI, EOI]
    return fast


def tiny_config() -> Kosmos2_5Config:
    vision = dict(
        hidden_size=32,
        patch_embed_hidden_size=TINY_PATCH["height"] * TINY_PATCH["width"] * 3,
        intermediate_size=40,
        head_dim=8,
        num_hidden_layers=2,
        num_attention_heads=4,
        dense_act_fn="gelu_new",
        layer_norm_eps=1e-6,
        max_num_patches=TINY_MAX_PATCHES + 1,
    )
    text = dict(
        vocab_size=TINY_VOCAB,
        max_position_embeddings=256,
        embed_dim=24,
        layers=2,
        ffn_dim=37,
        attention_heads=4,
        activation_function="gelu",
        layer_norm_eps=1e-5,
        scale_embedding=True,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return Kosmos2_5Config(text_config=text, vision_config=vision, latent_query_num=TINY_QUERIES)


@torch.no_grad()
def write_tiny(out: Path, pages: list[Path]) -> None:
    torch.manual_seed(2025)
    config = tiny_config()
    config._attn_implementation = "eager"
    model = Kosmos2_5ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(25)
    common.perturb_norms_and_biases(model, gen)
    tiny = out / "tiny"
    model.save_pretrained(tiny, safe_serialization=True)
    ip = Kosmos2_5ImageProcessor(patch_size=TINY_PATCH, max_patches=TINY_MAX_PATCHES)
    ip.save_pretrained(tiny)
    names = sorted(k for k in model.state_dict())
    print(f"tiny/: {len(names)} tensors, e.g. {names[:3]} ... {names[-3:]}")

    images = []
    for path in pages:
        with Image.open(path) as im:
            im.load()
            images.append(im.convert("RGB"))
    enc = ip(images, return_tensors="pt")
    patches, mask = enc["flattened_patches"].float(), enc["attention_mask"].float()
    t = {"images.flattened_patches": patches.contiguous(), "images.attention_mask": mask.contiguous()}
    vision = model.vision_model(flattened_patches=patches, attention_mask=mask).last_hidden_state
    t["images.vision_last_hidden_state"] = vision.contiguous()
    embeds, _ = model.image_to_text_projection(torch.nn.functional.normalize(vision, dim=-1))
    t["images.image_embeds"] = embeds.contiguous()

    tokenizer = tiny_tokenizer(tiny)
    from transformers import Kosmos2_5Processor

    processor = Kosmos2_5Processor(image_processor=ip, tokenizer=tokenizer, num_image_tokens=TINY_QUERIES)
    processor.save_pretrained(tiny)
    for name, text in PROMPTS.items():
        # The processor passes its own images_kwargs default (max_patches=4096) over the image processor's.
        enc = processor(text=text, images=images[0], max_patches=TINY_MAX_PATCHES, return_tensors="pt")
        assert torch.equal(enc["flattened_patches"][0], patches[0]), "the processor's patches are the image processor's"
        t[f"{name}.input_ids"] = enc["input_ids"]
        t[f"{name}.image_embeds_position_mask"] = enc["image_embeds_position_mask"]
        t[f"{name}.geometry"] = torch.tensor([int(enc["width"][0]), int(enc["height"][0])], dtype=torch.int64)
        print(f"{name}: {text!r} -> {enc['input_ids'][0].tolist()}")

    # The chat prompt's logits, from the pixels and from precomputed embeddings (what the decoder service gets).
    input_ids = t["chat.input_ids"]
    iemask = t["chat.image_embeds_position_mask"]
    attention_mask = torch.ones_like(input_ids)
    out_full = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        flattened_patches=patches[:1],
        image_embeds_position_mask=iemask,
    )
    t["chat.logits"] = out_full.logits.float().contiguous()
    out_embeds = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        image_embeds=embeds[:1],
        image_embeds_position_mask=iemask,
    )
    assert torch.allclose(out_embeds.logits, out_full.logits, atol=1e-6)

    for name in ("chat", "ocr"):
        generated = model.generate(
            input_ids=t[f"{name}.input_ids"],
            attention_mask=torch.ones_like(t[f"{name}.input_ids"]),
            flattened_patches=patches[:1],
            image_embeds_position_mask=t[f"{name}.image_embeds_position_mask"],
            max_new_tokens=12,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=PAD,
        )
        key = f"{name}.greedy_ids"
        t[key] = generated[0, t[f"{name}.input_ids"].shape[1] :].contiguous()
        print(f"{name} greedy ids: {t[key].tolist()}: {tokenizer.decode(t[key])!r}")
    save_file(t, out / "reference.safetensors", metadata={"transformers": transformers.__version__})
    print(f"wrote {out / 'reference.safetensors'}: {len(t)} tensors; vision {tuple(vision.shape)}, embeds {tuple(embeds.shape)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    args = parser.parse_args()
    out = args.out / "kosmos25"
    pages = make_pages(out / "images")
    images = sorted((args.out / "images").iterdir()) + pages

    (out / "preprocessor").mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, (patch_size, max_patches) in CONFIGS.items():
        ip = Kosmos2_5ImageProcessor(patch_size=patch_size, max_patches=max_patches)
        (out / "preprocessor" / f"{key}.json").write_text(ip.to_json_string(), encoding="utf-8")
        for path in images:
            with Image.open(path) as im:
                im.load()
                result = ip(im, return_tensors="pt")
            name = f"{key}.{path.name}"
            tensors[f"{name}.flattened_patches"] = result["flattened_patches"][0].float().contiguous()
            tensors[f"{name}.attention_mask"] = result["attention_mask"][0].float().contiguous()
            tensors[f"{name}.geometry"] = torch.tensor(
                [int(result["width"][0]), int(result["height"][0]), int(result["rows"][0]), int(result["cols"][0])],
                dtype=torch.int64,
            )
            rows, cols = int(result["rows"][0]), int(result["cols"][0])
            print(f"{name}: {im.size} {im.mode} -> {rows}x{cols} patches, {tuple(result['flattened_patches'][0].shape)}")
    save_file(tensors, out / "processor.safetensors", metadata={"transformers": transformers.__version__})
    print(f"wrote {out / 'processor.safetensors'}: {len(tensors)} tensors")
    # Three pages whose grids fill 12, 15 and 16 of the tiny model's 16 patches.
    write_tiny(out, [pages[0], args.out / "images" / "d_gray_37x23.png", args.out / "images" / "e_blocks_64x64.png"])


if __name__ == "__main__":
    main()
