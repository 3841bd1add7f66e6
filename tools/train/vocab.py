"""The demo model's tokenizer: the Kosmos-2 layout of tools/reference/common.py with a vocabulary for our texts.

common.py learns its Unigram pieces from a fixed English corpus that lacks most of our words (colours, shapes,
numbers). Here the ordinary pieces are every character of the domain corpus (data.domain_corpus) plus ASCII letters,
digits and punctuation (so any prompt stays representable), plus every word of the corpus as one "▁word" piece
(trailing punctuation split off), scored log(count / total) like common.unigram_vocab. The rest is common.py's:
the XLM-R-like normaliser / pre-tokeniser / decoder / post-processor (<s>=0, <pad>=1, </s>=2, <unk>=3, ordinary
pieces from 4) and HF's Kosmos2Processor appending the 11 tag tokens and the 1024 <patch_index_NNNN> tokens.
"""

from __future__ import annotations

import math
import string
import sys
import unicodedata
from pathlib import Path

REF = Path(__file__).resolve().parents[1] / "reference"
sys.path.insert(0, str(REF))

import common  # noqa: E402

PUNCT = ".,?:;!'\"-()"


def domain_vocab(lines: list[str]) -> list[tuple[str, float]]:
    words: dict[str, int] = {}
    for line in lines:
        for w in unicodedata.normalize("NFKC", line).split():
            if w.startswith("<"):
                continue
            words["▁" + w] = words.get("▁" + w, 0) + 1
    counts: dict[str, int] = {}

    def add(p: str, n: int) -> None:
        counts[p] = counts.get(p, 0) + n

    for w, n in words.items():
        for ch in w:
            add(ch, n)
        core = "▁" + w[1:].rstrip(PUNCT)
        if len(core) > 1:
            add(core, n)
    for ch in string.ascii_letters + string.digits + PUNCT + "▁":
        if ch not in counts:
            counts[ch] = 1
    total = float(sum(counts.values()))
    scored = sorted(((p, math.log(n / total)) for p, n in counts.items()), key=lambda x: (-x[1], x[0]))
    return [(t, 0.0) for t in common.SPECIAL_TOKENS] + scored


def build_tokenizer_json(lines: list[str], num_image_tokens: int) -> str:
    """The complete tokenizer.json, built exactly as common.build_tokenizer_json but with domain_vocab(lines)."""
    vocab = domain_vocab(lines)
    original = common.unigram_vocab
    common.unigram_vocab = lambda: vocab  # build_base_tokenizer reads the vocabulary through this function
    try:
        base = common.build_base_tokenizer()
    finally:
        common.unigram_vocab = original
    tok = common.wrap_tokenizer(base)
    proc = common.make_processor(tok, common.make_image_processor({"height": 32, "width": 32}))
    check_tokenizer(proc.tokenizer, num_image_tokens)
    return proc.tokenizer.backend_tokenizer.to_str(pretty=True)


def check_tokenizer(tok, num_image_tokens: int) -> None:
    """The Kosmos-2 layout: specials 0..3, ordinary pieces for the image placeholders, then tags and patch tokens."""
    n_base = tok.convert_tokens_to_ids(common.TAG_TOKENS[0])
    assert n_base >= 4 + num_image_tokens, n_base
    for i, t in enumerate(common.SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == i, t
    for j in range(4, n_base):
        piece = tok.convert_ids_to_tokens(j)
        assert piece not in common.SPECIAL_TOKENS and not piece.startswith("<"), (j, piece)
    for k, t in enumerate(common.TAG_TOKENS + common.PATCH_TOKENS):
        assert tok.convert_tokens_to_ids(t) == n_base + k, (t, tok.convert_tokens_to_ids(t), n_base + k)
    assert len(tok) == n_base + len(common.TAG_TOKENS) + common.NUM_PATCH_INDEX_TOKENS, len(tok)
