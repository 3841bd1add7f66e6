#!/usr/bin/env python3
"""Trains the small demo Kosmos-2 (HF `Kosmos2ForConditionalGeneration`) on procedural images and writes models/demo/.

    tools/train/run.sh train [--out models/demo] [--steps 2500] ...

The defaults are the shipped model's recipe (seeded: the same command gives the same weights on the same machine).

Data: tools/train/data.py (captions, grounding, VQA in the KOSMOS formats), a fresh batch of scenes every step
from random.Random(seed). Inputs are built by HF's Kosmos2Processor (num_image_tokens = latent_query_num), so the
ids are the ones the Rust processor builds. Loss: next-token cross-entropy on the answer tokens and </s> only (not
on the image placeholders or the prompt); the <patch_index_…> tokens get Gaussian soft targets over the 32x32 grid
(--patch-sigma), so a near miss costs less than a far one. The vision tower + connector run once per image and their
output is shared by the image's texts (the same computation as the HF forward, done once).

A training-only auxiliary head (not saved) on the ViT's patch tokens predicts, per patch, what covers it and that
object's box (--aux-weight): a dense signal that teaches the vision tower shapes, colours and extents far sooner
than the texts alone.

Initialisation is HF's, except: the ViT position embeddings and the 1024 <patch_index_NNNN> embeddings (tied to the
LM head) start from smooth 2D codes of their grid position, so neighbouring cells start with similar vectors; and
the connector's `dense` starts at unit scale (see structured_init).
The architecture and the checkpoint layout are the stock HF ones.
"""

from __future__ import annotations

import os

# Under CPU contention (shared build machines) OpenMP's default spin-waiting makes 2 threads 5-10x slower than one;
# passive waiting must be chosen before torch (and its OpenMP runtime) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vocab  # noqa: E402  (puts tools/reference on sys.path)
import common  # noqa: E402
import data  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = HERE.parents[1]
AUX_BOX_WEIGHT = 5.0  # box L1 (normalised coordinates, ~0.05 when good) against the patch-class cross-entropy


def model_config(vocab_size: int, args) -> "Kosmos2Config":
    from transformers import Kosmos2Config

    text = common.tiny_text_config(vocab_size)
    text.update(embed_dim=args.text_width, layers=args.text_layers, attention_heads=args.text_width // 64,
                ffn_dim=args.text_ffn, max_position_embeddings=256)
    vision = common.tiny_vision_config()
    vision.update(image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.vision_width,
                  num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_width // 32,
                  intermediate_size=4 * args.vision_width)
    return Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=args.queries)


@torch.no_grad()
def smooth_grid_codes(n_side: int, dim: int, lengthscale: float, gen: torch.Generator) -> torch.Tensor:
    """Random Fourier features of the (x, y) cell: dot products approximate an RBF kernel of width `lengthscale`."""
    ys, xs = torch.meshgrid(torch.arange(n_side, dtype=torch.float32), torch.arange(n_side, dtype=torch.float32),
                            indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], dim=1)  # row-major: idx = y * n + x
    omega = torch.randn(2, dim, generator=gen) / lengthscale
    phase = torch.rand(dim, generator=gen) * 2 * math.pi
    return torch.cos(pos @ omega + phase) * math.sqrt(2.0 / dim)  # unit-norm rows on average


@torch.no_grad()
def structured_init(model, tok, gen: torch.Generator, pos_amplitude: float) -> None:
    emb = model.text_model.model.embed_tokens.weight
    first = tok.convert_tokens_to_ids(common.PATCH_TOKENS[0])
    codes = smooth_grid_codes(data.NUM_PATCHES_PER_SIDE, emb.shape[1], 2.5, gen)
    emb[first:first + len(common.PATCH_TOKENS)] = codes * (0.02 * math.sqrt(emb.shape[1]))
    vis = model.vision_model.model.embeddings
    n = vis.num_patches_per_side if hasattr(vis, "num_patches_per_side") else int(math.sqrt(vis.num_patches))
    pcodes = smooth_grid_codes(n, vis.embed_dim, 1.5, gen) * math.sqrt(vis.embed_dim) * pos_amplitude
    vis.position_embedding.weight[1:] = pcodes
    # HF's init gives the connector's projected image features a per-dimension scale of ~0.02 next to latent queries
    # of scale 1, so the cross-attention output hardly depends on the image and training first settles on the text
    # prior. Unit-scale projected features (the input rows are L2-normalised) put both on the same footing.
    model.image_to_text_projection.dense.weight.normal_(0.0, 1.0, generator=gen)


class Batcher:
    """Fresh scenes each call; texts through Kosmos2Processor; labels = answer tokens + </s>."""

    def __init__(self, proc, queries: int, seed: int, images: int, num_vqa: int, both: bool = False, grid: int = 8):
        self.proc, self.queries, self.images, self.num_vqa, self.both = proc, queries, images, num_vqa, both
        self.grid = grid
        self.rng = random.Random(seed)
        self.prompt_ids: dict[str, list[int]] = {}
        self.checked = 0

    def _prompt_ids(self, prompt: str, image) -> list[int]:
        if prompt not in self.prompt_ids:
            self.prompt_ids[prompt] = self.proc(text=prompt, images=image, num_image_tokens=self.queries)["input_ids"]
        return self.prompt_ids[prompt]

    def __call__(self):
        scenes = [data.sample_scene(self.rng) for _ in range(self.images)]
        texts, owner, plens, tasks = [], [], [], []
        for i, sc in enumerate(scenes):
            for task, prompt, target in data.training_examples(sc, self.rng, self.num_vqa, both=self.both):
                texts.append(prompt + target)
                owner.append(i)
                plens.append(len(self._prompt_ids(prompt, sc.image)))
                tasks.append(task)
                if self.checked < 2000:  # the prompt's ids must be a prefix of the full text's ids
                    full = self.proc(text=prompt + target, images=sc.image, num_image_tokens=self.queries,
                                     add_eos_token=True)["input_ids"]
                    assert full[: plens[-1]] == self._prompt_ids(prompt, sc.image), (prompt, target)
                    assert full[-1] == common.EOS_ID
                    self.checked += 1
        enc = self.proc(text=texts, images=[scenes[i].image for i in owner], num_image_tokens=self.queries,
                        add_eos_token=True, padding=True, return_tensors="pt")
        first_of = {}
        for j, i in enumerate(owner):
            first_of.setdefault(i, j)
        pixel_values = enc["pixel_values"][[first_of[i] for i in range(len(scenes))]]
        patch_labels = [sc.patch_labels(self.grid) for sc in scenes]
        ids, am = enc["input_ids"], enc["attention_mask"]
        labels = ids.clone()
        pos = torch.arange(ids.shape[1])[None, :]
        labels[(pos < torch.tensor(plens)[:, None]) | (am == 0)] = -100
        return dict(pixel_values=pixel_values, input_ids=ids, attention_mask=am,
                    image_embeds_position_mask=enc["image_embeds_position_mask"], labels=labels,
                    owner=torch.tensor(owner), tasks=tasks,
                    patch_labels=torch.from_numpy(np.stack(patch_labels)),
                    patch_boxes=torch.from_numpy(np.stack([sc.patch_boxes(p) for sc, p in zip(scenes, patch_labels)])))


def _prefix_kv(model, batch, image_embeds, bf16: bool):
    """Runs the shared prefix `<s><image> [image embeddings] </image>` once per image; returns per-layer (k, v)."""
    q = image_embeds.shape[1]
    n_img = image_embeds.shape[0]
    prefix = batch["input_ids"][:1, : q + 3].expand(n_img, -1)
    mask = batch["image_embeds_position_mask"][:1, : q + 3].expand(n_img, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model.text_model.model(input_ids=prefix, attention_mask=torch.ones_like(prefix), image_embeds=image_embeds,
                                     image_embeds_position_mask=mask, use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


@torch.no_grad()
def patch_soft_targets(sigma: float) -> torch.Tensor:
    """[1024, 1024] target distributions for the <patch_index_…> tokens: a Gaussian of `sigma` grid cells around the
    true cell (row i for true cell i), so a near miss costs less than a far one. The argmax stays the true cell."""
    n = data.NUM_PATCHES_PER_SIDE
    idx = torch.arange(n * n)
    x, y = (idx % n).float(), (idx // n).float()
    d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    return torch.softmax(-d2 / (2 * sigma**2), dim=1)


def forward_loss(model, batch, bf16: bool = False, return_pred: bool = False, share_prefix: bool = True,
                 aux_head=None, return_aux: bool = False, soft=None):
    """Mean next-token loss over the labelled tokens.

    `soft` = (first patch token id, patch_soft_targets(...)): the patch-token labels use those soft targets.

    The image embeddings are computed once per image. With `share_prefix`, so is the text model's pass over the
    image block `<s><image> … </image>` (identical for all texts of an image): its keys/values are reused by every
    text of the image, which is the same computation as the full forward (causal attention) at a third less cost.
    The texts run in two length groups (grounding answers are long, the others short) to waste little on padding.
    """
    from transformers import DynamicCache

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        vis = model.vision_model(pixel_values=batch["pixel_values"])
        post = model.vision_model.model.post_layernorm(vis[0])
        image_embeds, _ = model.image_to_text_projection(F.normalize(post, dim=-1))
        aux_out = aux_head(post[:, 1:]).float() if aux_head is not None else None
    aux_loss = None
    if aux_head is not None:
        # classes, then the box (x1, y1, x2, y2) of the covering object (L1, on object patches only)
        n_cls = data.NUM_AUX_CLASSES
        lab = batch["patch_labels"].reshape(-1)
        aux_loss = F.cross_entropy(aux_out[..., :n_cls].reshape(-1, n_cls), lab)
        on_obj = lab > 0
        if on_obj.any():
            box_err = (aux_out[..., n_cls:].reshape(-1, 4)[on_obj] - batch["patch_boxes"].reshape(-1, 4)[on_obj]).abs()
            aux_loss = aux_loss + AUX_BOX_WEIGHT * box_err.mean()
    q = image_embeds.shape[1]
    start = q + 3 if share_prefix else 0
    kv = _prefix_kv(model, batch, image_embeds, bf16) if share_prefix else None
    is_long = torch.tensor([t == "grounding" for t in batch["tasks"]])
    n = len(batch["tasks"])
    width = batch["input_ids"].shape[1] - 1
    tok_loss = torch.zeros(n, width)
    correct = torch.ones(n, width, dtype=torch.bool)
    pred = torch.zeros(n, width, dtype=torch.long) if return_pred else None
    labels_all = batch["labels"][:, 1:]
    for group in (is_long, ~is_long):
        rows = group.nonzero().flatten()
        if len(rows) == 0:
            continue
        am = batch["attention_mask"][rows]
        t = int(am.sum(1).max())
        owner = batch["owner"][rows]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if share_prefix:
                cache = DynamicCache()
                for i, (k, v) in enumerate(kv):
                    cache.update(k[owner], v[owner], i)
                positions = torch.arange(start, t)[None, :].expand(len(rows), -1) + 2  # pad-aware: no pads before
                out = model.text_model(input_ids=batch["input_ids"][rows, start:t], attention_mask=am[:, :t],
                                       past_key_values=cache, position_ids=positions, use_cache=True)
            else:
                out = model.text_model(input_ids=batch["input_ids"][rows, :t], attention_mask=am[:, :t],
                                       image_embeds=image_embeds[owner],
                                       image_embeds_position_mask=batch["image_embeds_position_mask"][rows, :t],
                                       use_cache=False)
        logits = out.logits[:, :-1].float()
        labels = labels_all[rows, start: t - 1]
        loss_g = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                 reduction="none").view(labels.shape)
        if soft is not None:
            first_patch, targets = soft
            is_patch = labels >= first_patch
            if is_patch.any():
                lp = F.log_softmax(logits[is_patch], dim=-1)[:, first_patch:first_patch + targets.shape[0]]
                soft_loss = -(targets[labels[is_patch] - first_patch] * lp).sum(-1)
                loss_g = loss_g.masked_scatter(is_patch, soft_loss)
        cols = torch.arange(start, t - 1)[None, :]
        tok_loss = tok_loss.index_put((rows[:, None], cols), loss_g)
        correct[rows[:, None], cols] = (logits.argmax(-1) == labels).detach()
        if return_pred:
            pred[rows[:, None], cols] = logits.argmax(-1)
    valid = labels_all != -100
    correct |= ~valid
    loss = tok_loss.sum() / valid.sum()
    if return_aux:
        return loss, tok_loss.detach(), valid, correct, pred, aux_loss
    return loss, tok_loss.detach(), valid, correct, pred


@torch.no_grad()
def probe(model, batch, bf16: bool, first_patch_id: int) -> dict[str, float]:
    """Teacher-forced progress signal on a fixed held-out batch: exact answers per task, and for the grounding answers
    the rate of right non-patch tokens, the mean corner error of the predicted patch tokens (in grid cells) and the
    rate of predicted boxes with IoU >= 0.5 against the true (quantised) box."""
    model.eval()
    loss, _, valid, correct, pred = forward_loss(model, batch, bf16, return_pred=True)
    model.train()
    seq_ok = correct.all(dim=1)
    res = {"loss": loss.item()}
    for task in ("caption", "grounding", "vqa"):
        m = torch.tensor([t == task for t in batch["tasks"]])
        res[task] = seq_ok[m].float().mean().item()
    labels = batch["labels"][:, 1:]
    is_patch = labels >= first_patch_id
    res["ground_text"] = (correct | is_patch).all(dim=1)[torch.tensor([t == "grounding" for t in batch["tasks"]])].float().mean().item()
    lab = labels[is_patch] - first_patch_id
    prd = (pred[is_patch] - first_patch_id).clamp(min=0)
    n = data.NUM_PATCHES_PER_SIDE
    err = ((lab % n - prd % n).abs() + (lab // n - prd // n).abs()).float()
    res["corner_L1"] = err.mean().item()
    # teacher-forced boxes: (ul, lr) pairs of patch tokens, decoded like HF's patch_index_to_coordinate
    lab_pairs, prd_pairs = lab.view(-1, 2), prd.view(-1, 2)
    ious = [box_iou(patch_box(*l.tolist()), patch_box(*p.tolist())) for l, p in zip(lab_pairs, prd_pairs)]
    res["box_iou50"] = sum(i >= 0.5 for i in ious) / max(1, len(ious))
    return res


def patch_box(ul: int, lr: int) -> tuple[float, float, float, float]:
    from transformers.models.kosmos2.processing_kosmos2 import patch_index_to_coordinate

    return patch_index_to_coordinate(ul, lr, data.NUM_PATCHES_PER_SIDE)


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def write_model_dir(model, out: Path, tok_json: str, image_size: int, no_repeat_ngram_size: int) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=common.BOS_ID, eos_token_id=common.EOS_ID,
                                               pad_token_id=common.PAD_ID, no_repeat_ngram_size=no_repeat_ngram_size,
                                               use_cache=True, max_new_tokens=64)
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    size = {"height": image_size, "width": image_size}
    common.make_image_processor(size, size).save_pretrained(out)
    for extra in ("tokenizer_config.json", "special_tokens_map.json", "processor_config.json"):
        if (out / extra).exists():
            (out / extra).unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--probe-seed", type=int, default=777)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--images", type=int, default=32, help="scenes per step")
    ap.add_argument("--num-vqa", type=int, default=2, help="questions per scene (besides the captions)")
    ap.add_argument("--both-captions", action=argparse.BooleanOptionalAction, default=True,
                    help="every scene gives its caption and its grounded caption (else one of them, grounded w.p. 0.6)")
    ap.add_argument("--patch-sigma", type=float, default=1.0,
                    help="width (grid cells) of the Gaussian soft targets of the <patch_index_…> tokens; 0: one-hot")
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--vision-lr-mult", type=float, default=3.0, help="learning-rate factor for the vision tower and connector")
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--aux-weight", type=float, default=1.0, help="weight of the auxiliary patch-classification loss")
    ap.add_argument("--pos-amplitude", type=float, default=1.0, help="scale of the ViT position-embedding init")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--share-prefix", action=argparse.BooleanOptionalAction, default=True,
                    help="run the image block once per image and reuse its keys/values for the image's texts")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast for the matmuls (weights, optimiser and loss stay f32)")
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="stop early (and save) past this wall time; 0: no limit (the run is then reproducible)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--vision-width", type=int, default=192)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-width", type=int, default=256)
    ap.add_argument("--text-layers", type=int, default=3)
    ap.add_argument("--text-ffn", type=int, default=768)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--no-repeat-ngram-size", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--probe-every", type=int, default=100)
    args = ap.parse_args()

    t_start = time.time()
    cpu_start = time.process_time()
    torch.set_num_threads(args.threads)
    common.seed_everything(args.seed)
    from transformers import Kosmos2ForConditionalGeneration

    tok_json = vocab.build_tokenizer_json(data.domain_corpus(), args.queries)
    from tokenizers import Tokenizer

    tok = common.wrap_tokenizer(Tokenizer.from_str(tok_json))
    vocab.check_tokenizer(tok, args.queries)
    size = {"height": args.image_size, "width": args.image_size}
    proc = common.make_processor(tok, common.make_image_processor(size, size))

    config = model_config(len(tok), args)
    model = Kosmos2ForConditionalGeneration(config)
    structured_init(model, tok, torch.Generator().manual_seed(args.seed), args.pos_amplitude)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M ({n_params * 4 / 2**20:.1f} MiB f32), vocab {len(tok)}", flush=True)
    print("config", json.dumps({k: v for k, v in vars(args).items() if k != "out"}), flush=True)

    # Training-only auxiliary head (not saved): every vision patch token predicts what covers its patch
    # (data.Scene.patch_labels) and that object's box, a dense signal that teaches the ViT shapes and extents far
    # sooner than the texts alone.
    grid = args.image_size // args.patch_size
    aux_head = torch.nn.Linear(args.vision_width, data.NUM_AUX_CLASSES + 4) if args.aux_weight > 0 else None
    named = list(model.named_parameters()) + ([(f"aux_head.{n}", p) for n, p in aux_head.named_parameters()]
                                              if aux_head is not None else [])
    params = [p for _, p in named]
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in named:
        wd = p.ndim >= 2 and "embed" not in name and "latent_query" not in name
        vision = not name.startswith("text_model.")
        groups.setdefault((wd, vision), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": args.weight_decay if wd else 0.0,
                              "lr_mult": args.vision_lr_mult if vision else 1.0}
                             for (wd, vision), ps in sorted(groups.items())], lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    first_patch_id = tok.convert_tokens_to_ids(common.PATCH_TOKENS[0])
    batcher = Batcher(proc, args.queries, args.seed, args.images, args.num_vqa, both=args.both_captions, grid=grid)
    soft = (first_patch_id, patch_soft_targets(args.patch_sigma)) if args.patch_sigma > 0 else None
    probe_batch = Batcher(proc, args.queries, args.probe_seed, 48, 2, both=True, grid=grid)()
    model.train()
    t_loop = time.time()
    acc_loss, acc_n, t_data, acc_aux = 0.0, 0, 0.0, 0.0
    task_loss: dict[str, list[float]] = {}
    step = 0
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["lr_mult"]
        t0 = time.time()
        batch = batcher()
        t_data += time.time() - t0
        loss, tok_loss, valid, _, _, aux_loss = forward_loss(model, batch, args.bf16, share_prefix=args.share_prefix,
                                                             aux_head=aux_head, return_aux=True, soft=soft)
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux_loss if aux_loss is not None else loss).backward()
        if aux_loss is not None:
            acc_aux += aux_loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc_loss += loss.item()
        acc_n += 1
        per_seq = tok_loss.sum(1) / valid.sum(1).clamp(min=1)
        for t, l in zip(batch["tasks"], per_seq.tolist()):
            task_loss.setdefault(t, []).append(l)
        elapsed = time.time() - t_start
        if (step + 1) % args.log_every == 0:
            parts = " ".join(f"{t}={sum(v) / len(v):.3f}" for t, v in sorted(task_loss.items()))
            print(f"step {step + 1:5d} loss {acc_loss / acc_n:.4f} [{parts}] aux {acc_aux / acc_n:.3f} lr {lr_at(step):.2e} "
                  f"{(time.time() - t_loop) / (step + 1):.2f}s/step (data {t_data / (step + 1):.2f}s) "
                  f"elapsed {elapsed / 60:.1f} min (cpu {(time.process_time() - cpu_start) / 60:.1f} min)", flush=True)
            acc_loss, acc_n, task_loss, acc_aux = 0.0, 0, {}, 0.0
        if (step + 1) % args.probe_every == 0 or step + 1 == args.steps:
            res = probe(model, probe_batch, args.bf16, first_patch_id)
            print("probe " + " ".join(f"{k} {v:.3f}" for k, v in res.items()), flush=True)
        if args.max_minutes > 0 and elapsed > args.max_minutes * 60:
            print(f"stopping at step {step + 1}: wall time {elapsed / 60:.1f} min > --max-minutes", flush=True)
            break

    model.eval()
    write_model_dir(model, args.out, tok_json, args.image_size, args.no_repeat_ngram_size)
    total = time.time() - t_start
    size_mb = (args.out / "model.safetensors").stat().st_size / 1e6
    cpu = time.process_time() - cpu_start
    print(f"wrote {args.out} ({size_mb:.2f} MB safetensors) after {step + 1} steps in {total / 60:.1f} min wall, "
          f"{cpu / 60:.1f} min cpu ({cpu / args.threads / 60:.1f} min on {args.threads} uncontended cores) "
          f"(load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())})", flush=True)


if __name__ == "__main__":
    main()
