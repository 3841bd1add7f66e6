"""Shared pieces of the reference tooling: the test tokenizer, model configurations, seeding and weight helpers.

The tokenizer is a real `tokenizers` Unigram model (SentencePiece-like, as XLM-R / Kosmos-2) whose pieces and scores
are learned deterministically from the small English corpus below (see unigram_vocab), wrapped so that HF's `Kosmos2Processor` adds the Kosmos-2 tag and patch-index tokens to it
exactly as it does to the real XLM-R tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import random
import unicodedata
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: E402

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as XLM-R / Kosmos-2
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
UNIGRAM_NUM_PIECES = 996  # ordinary pieces: ids 4..999; the tag tokens start at 1000
UNIGRAM_MAX_PIECE_LEN = 12
TAG_TOKENS = [
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
]
NUM_PATCH_INDEX_TOKENS = 1024
PATCH_TOKENS = [f"<patch_index_{i:04d}>" for i in range(NUM_PATCH_INDEX_TOKENS)]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# A small English corpus (no '<' or '>' so that no learned piece can collide with a tag token).
CORPUS = """
An image of a snowman warming himself by a fire.
An image of a dog running on the beach at sunset.
A photo of a red car parked next to a small house.
A photo of two cats sleeping on a blue sofa.
Describe this image in detail: a man is riding a bicycle down a busy street.
Question: what is the color of the bus? Answer: the bus is yellow.
Question: how many people are in the picture? Answer: there are three people.
Question: what is the sentiment of the opinion? Answer: positive.
Question: does this picture contain real hate speech? Answer: no.
Here are three images. The following image is the correct answer. Is it correct? Yes.
The photo of the mountain shows snow on the top and green trees at the bottom.
A woman is holding an umbrella in the rain while waiting for the train.
A little girl is playing with a ball in the garden.
The kitchen has a white table, four chairs and a window with a view of the city.
A group of friends are sitting around a fire and telling stories.
This is a picture of a cat. This is a picture of a dog.
A bowl of fruit with apples, bananas and oranges sits on the counter.
The sky is clear and the sun is shining over the lake.
An old man reads a newspaper on a bench in the park.
Two children are building a sandcastle near the water.
A plate of pasta with tomato sauce and fresh basil.
The street is full of cars, buses and people walking to work.
A bird is sitting on a branch of a tall tree.
A horse is standing in a field of yellow flowers.
The living room has a large television and a soft brown carpet.
A boat is sailing on the river under a stone bridge.
A cup of coffee and a croissant on a wooden table in a small café.
The naïve artist painted the façade of the old building in Zürich.
She sent her résumé to the company in São Paulo and waited for an answer.
The piñata at the party was shaped like a star.
A chef is cooking in a restaurant kitchen with many pots and pans.
The city at night is bright with lights from the windows and the streets.
A train is crossing a bridge over a deep valley.
A man and a woman are dancing in the middle of the room.
There is a clock on the wall and a lamp on the desk.
A football player kicks the ball toward the goal.
The computer screen shows a chart with numbers from 1 to 100.
In 2023 the team released a model that can read text and see images.
The model generates a caption for every image in the dataset.
Grounding links each phrase in the caption to a box in the image.
The box is given by the top left corner and the bottom right corner.
A person is walking a dog along the side of the road.
A table with a laptop, a phone and a notebook.
Snow is falling on the houses and the trees in the small village.
A fire is burning in the fireplace and the room is warm.
The snowman has a carrot nose, a black hat and a red scarf.
Children are laughing and throwing snowballs at each other.
A cat is looking out of the window at the birds.
The bridge is made of steel and it is painted red.
A plane is flying high above the clouds.
The market sells fresh vegetables, fish, bread and cheese.
A young boy is eating an ice cream on a hot summer day.
The museum has paintings, statues and old maps on the walls.
A girl with a green dress is reading a book under a tree.
Two dogs are playing with a stick on the grass.
The ocean waves crash against the rocks near the lighthouse.
A bicycle is leaning against the wall of a yellow house.
The man in the blue shirt is talking on the phone.
A woman is cutting vegetables on a wooden board.
The shelves are full of books, boxes and small plants.
A truck is carrying wood down the mountain road.
The photo shows a family having dinner together.
There are many colorful umbrellas on the beach.
A baby is sleeping in a white bed with a soft toy.
The garden has roses, tulips and a small pond with fish.
A student is writing notes during the lecture.
The sign on the door says open from nine to five.
A pair of shoes is next to the door.
The teacher is standing in front of the class.
A cake with candles is on the table for the birthday.
Describe the picture. Answer the question. Explain the image.
What is in this image? What is the man doing? Where is the dog?
The answer is yes. The answer is no. It is a cat. It is a dog.
First, second, third, fourth, fifth, sixth, seventh, eighth, ninth, tenth.
Red, orange, yellow, green, blue, purple, black, white, brown, gray.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
Spring, summer, autumn and winter are the four seasons of the year.
The quick brown fox jumps over the lazy dog.
A multimodal large language model can perceive general modalities, learn in context and follow instructions.
Language is not all you need: aligning perception with language models.
The image encoder turns the picture into a sequence of embeddings.
The text decoder predicts the next token given all the previous tokens.
He said: "Look at that!" and pointed at the sky; it was full of stars.
It costs $12.50, about 11 euros, or 50% less than last year.
Email me at the office (room 42) before 10:30 tomorrow.
"""


def _normalize_text(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def unigram_vocab() -> list[tuple[str, float]]:
    """A deterministic Unigram vocabulary learned from CORPUS.

    (`tokenizers.trainers.UnigramTrainer` is not reproducible: its EM sums over hash maps, so the scores change in
    the last digits from run to run and ties reorder ids.) Here: every character of the corpus, plus the most useful
    multi-character substrings of the "▁"-prefixed words (ranked by count * (length - 1), ties by the piece), with
    score = log(count / total). Specials first with score 0.0, as XLM-R; pieces ordered by score, then by piece.
    """
    words: dict[str, int] = {}
    for line in CORPUS.strip().splitlines():
        for w in _normalize_text(line).split():
            w = "▁" + w
            words[w] = words.get(w, 0) + 1
    counts: dict[str, int] = {}
    for w, n in words.items():
        for i in range(len(w)):
            for j in range(i + 1, min(len(w), i + UNIGRAM_MAX_PIECE_LEN) + 1):
                p = w[i:j]
                counts[p] = counts.get(p, 0) + n
    chars = sorted({p for p in counts if len(p) == 1})
    multi = [p for p in counts if len(p) > 1 and counts[p] >= 2]
    multi.sort(key=lambda p: (-counts[p] * (len(p) - 1), p))
    pieces = chars + multi[: UNIGRAM_NUM_PIECES - len(chars)]
    total = float(sum(counts[p] for p in pieces))
    scored = sorted(((p, math.log(counts[p] / total)) for p in pieces), key=lambda x: (-x[1], x[0]))
    return [(t, 0.0) for t in SPECIAL_TOKENS] + scored


def build_base_tokenizer() -> Tokenizer:
    """The XLM-R-like Unigram tokenizer: <s>=0, <pad>=1, </s>=2, <unk>=3, then ordinary pieces from id 4."""
    tok = Tokenizer(models.Unigram(unigram_vocab(), unk_id=UNK_ID, byte_fallback=False))
    # XLM-R uses a precompiled SentencePiece charsmap (nmt_nfkc); NFKC is the portable equivalent here.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    # As transformers' XLMRobertaTokenizer: WhitespaceSplit, then Metaspace with a prepended "▁".
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    # As XLM-R: <s> $A </s> (pairs: <s> $A </s> </s> $B </s>).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)],
    )
    return tok


def wrap_tokenizer(tok_or_file):
    """A transformers fast tokenizer around a `tokenizers.Tokenizer` object or a tokenizer.json path."""
    from transformers import PreTrainedTokenizerFast

    kwargs = dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if isinstance(tok_or_file, (str, Path)):
        t = PreTrainedTokenizerFast(tokenizer_file=str(tok_or_file), **kwargs)
    else:
        t = PreTrainedTokenizerFast(tokenizer_object=tok_or_file, **kwargs)
    return t


def make_image_processor(size: dict, crop: dict | None = None):
    """HF's default CLIPImageProcessor for Kosmos-2 (in transformers 5 the torchvision backend)."""
    from transformers import CLIPImageProcessor

    crop = crop or {"height": size.get("height", size.get("shortest_edge")), "width": size.get("width", size.get("shortest_edge"))}
    return CLIPImageProcessor(
        do_resize=True,
        size=size,
        resample=3,
        do_center_crop=True,
        crop_size=crop,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def make_processor(tokenizer, image_processor):
    """Kosmos2Processor: adds the tag and patch-index tokens to `tokenizer` (a no-op when they are already there)."""
    from transformers import Kosmos2Processor

    return Kosmos2Processor(image_processor, tokenizer)


def build_tokenizer_json() -> str:
    """The complete tokenizer.json (base Unigram model + the tokens Kosmos2Processor adds), as a string."""
    base = build_base_tokenizer()
    tok = wrap_tokenizer(base)
    proc = make_processor(tok, make_image_processor({"height": 32, "width": 32}))
    s = proc.tokenizer.backend_tokenizer.to_str(pretty=True)
    check_tokenizer(proc.tokenizer)
    return s


def check_tokenizer(tok) -> None:
    """The id layout the fixtures promise."""
    n_base = tok.convert_tokens_to_ids(TAG_TOKENS[0])
    assert n_base >= 4 + 64, n_base
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == i, t
    for j in range(4, 68):
        piece = tok.convert_ids_to_tokens(j)
        assert piece not in SPECIAL_TOKENS and not piece.startswith("<"), (j, piece)
    for k, t in enumerate(TAG_TOKENS + PATCH_TOKENS):
        assert tok.convert_tokens_to_ids(t) == n_base + k, (t, tok.convert_tokens_to_ids(t), n_base + k)
    assert len(tok) == n_base + len(TAG_TOKENS) + NUM_PATCH_INDEX_TOKENS, len(tok)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tiny_vision_config() -> dict:
    return dict(
        image_size=32,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
    )


def tiny_text_config(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        embed_dim=32,
        layers=2,
        attention_heads=4,
        ffn_dim=37,
        max_position_embeddings=512,
        activation_function="gelu",
        layer_norm_eps=1e-5,
        scale_embedding=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


@torch.no_grad()
def perturb_norms_and_biases(model: torch.nn.Module, gen: torch.Generator, bias_std: float = 0.02) -> None:
    """LayerNorm weight = 1 + 0.1 N(0,1), bias = 0.1 N(0,1); a T5-style RMS norm (a `*LayerNorm` module with a weight
    and no bias, Kosmos-2.5's) weight = 1 + 0.1 N(0,1); Linear biases += bias_std N(0,1) (HF inits them to 0)."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=gen))
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
        elif type(module).__name__.endswith("LayerNorm") and not hasattr(module, "bias"):
            module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=gen))
        elif isinstance(module, torch.nn.Linear) and module.bias is not None:
            module.bias.add_(bias_std * torch.randn(module.bias.shape, generator=gen))


def generation_config_dict() -> dict:
    return dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, no_repeat_ngram_size=3, use_cache=True)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
