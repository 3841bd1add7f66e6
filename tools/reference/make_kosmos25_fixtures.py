#!/usr/bin/env python3
"""Writes tests/fixtures/kosmos25/: Kosmos-2.5 reference outputs of HF transformers (layout: tests/fixtures/README.md).

Run through `tools/reference/run.sh kosmos25-fixtures` (pinned environment in .venv-ref/). Deterministic.

So far: the image processor. `Kosmos2_5ImageProcessor` (transformers 5.23.0, the torchvision backend that
AutoImageProcessor picks) on the shared fixture images and two generated pages, for three configurations that
up- and down-sample and use square and non-square patches:
  * per-image normalisation of the uint8 values: mean and unbiased std over every channel and pixel, the std
    raised to at least 1/sqrt(C*H*W);
  * resize to the largest grid of whole patches, aspect kept, that holds at most `max_patches` patches
    (`torch.nn.functional.interpolate`, bilinear, antialias, align_corners=False, on the normalised floats);
  * patches flattened (row, then column, then channel within a pixel), each row prefixed with its 1-based row and
    column ids, padded with zero rows to `max_patches`; `attention_mask` is 1 on rows whose sum is not zero.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from transformers import Kosmos2_5ImageProcessor

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


if __name__ == "__main__":
    main()
