#!/usr/bin/env python3
"""Writes a tiny, random-weight BERT checkpoint that the tests use in place of a real encoder.

    python -m moat_model.make_encoder_fixture --out local/models/fixture-bert-source [--seed 7]

The directory is laid out like the sentence-transformers repository of all-MiniLM-L6-v2
(the model it stands in for): config.json, model.safetensors with the same tensor names,
a WordPiece tokenizer.json (BERT normaliser and pre-tokenizer, [CLS] ... [SEP]
post-processor), modules.json with a Normalize module, mean pooling and a max_seq_length.
So convert_encoder.py and reference_encoder.py take exactly the code paths they take for the
real model, in well under a second.

Everything is a pure function of the seed, and files whose bytes did not change are left
untouched so their timestamps do not trigger rebuilds downstream.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
import tempfile


import numpy as np  # noqa: E402
from tokenizers import (  # noqa: E402
    AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors)

from .safetensors_io import write_safetensors  # noqa: E402

# -- model shape ------------------------------------------------------------------------------

N_LAYER = 2
HIDDEN = 32
N_HEAD = 4
INTERMEDIATE = 64
MAX_POSITIONS = 64
TYPE_VOCAB = 2
LAYER_NORM_EPS = 1e-12

# Query/key weights are scaled up so attention is far from uniform: a mask that let padding
# through, or a wrong position, then changes the output visibly.
ATTN_QK_GAIN = 3.0
LINEAR_GAIN = 1.0

# -- tokenizer ----------------------------------------------------------------------------------

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Whole words of the vocabulary; anything else splits into single letters (word-initial and
# "##" continuation pieces), and characters outside ASCII letters, digits and punctuation
# become [UNK].
WORD_CORPUS = """
the a an is are was were be to of and in on at by for with from that this it as or not
cat dog man woman child children house street park school book table door sea sky sun
play playing plays guitar music song sing sings eat eating food bread apple water drink
run running walk walking read reading write writing story question answer hello world
weather nice good bad day night morning evening today tomorrow yesterday city country
how what when where why who do does i you he she we they my your his her our their
reset password change steps stock market fell sharply tuesday penguins live southern
"""


def build_vocab() -> dict[str, int]:
    pieces = list(SPECIAL_TOKENS)
    pieces += list(string.ascii_lowercase) + list(string.digits) + list(string.punctuation)
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits]
    seen = set(pieces)
    for word in re.findall(r"[a-z]+", WORD_CORPUS):
        if word not in seen:
            seen.add(word)
            pieces.append(word)
    return {piece: i for i, piece in enumerate(pieces)}


def build_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for t in SPECIAL_TOKENS:
        if tok.token_to_id(t) != vocab[t]:
            raise AssertionError(f"special token {t} lost its id")
    return tok


# -- weights ------------------------------------------------------------------------------------

def build_tensors(seed: int, n_vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def normal(shape, std) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm(prefix: str, out: dict) -> None:
        # Not all ones and zeros, so a graph that skipped a norm's weight or bias is caught.
        out[prefix + ".weight"] = rng.uniform(0.7, 1.3, HIDDEN).astype(np.float32)
        out[prefix + ".bias"] = normal(HIDDEN, 0.1)

    def linear(prefix: str, n_out: int, n_in: int, gain: float, out: dict) -> None:
        out[prefix + ".weight"] = normal((n_out, n_in), gain / np.sqrt(n_in))
        out[prefix + ".bias"] = normal(n_out, 0.1)

    t: dict[str, np.ndarray] = {
        "embeddings.word_embeddings.weight": normal((n_vocab, HIDDEN), 1.0),
        "embeddings.position_embeddings.weight": normal((MAX_POSITIONS, HIDDEN), 0.5),
        "embeddings.token_type_embeddings.weight": normal((TYPE_VOCAB, HIDDEN), 0.5),
        # Present in the real checkpoint, unused by the encoder.
        "embeddings.position_ids": np.arange(MAX_POSITIONS, dtype=np.int64)[None, :],
    }
    norm("embeddings.LayerNorm", t)
    for i in range(N_LAYER):
        p = f"encoder.layer.{i}."
        linear(p + "attention.self.query", HIDDEN, HIDDEN, ATTN_QK_GAIN, t)
        linear(p + "attention.self.key", HIDDEN, HIDDEN, ATTN_QK_GAIN, t)
        linear(p + "attention.self.value", HIDDEN, HIDDEN, LINEAR_GAIN, t)
        linear(p + "attention.output.dense", HIDDEN, HIDDEN, LINEAR_GAIN, t)
        norm(p + "attention.output.LayerNorm", t)
        linear(p + "intermediate.dense", INTERMEDIATE, HIDDEN, LINEAR_GAIN, t)
        linear(p + "output.dense", HIDDEN, INTERMEDIATE, LINEAR_GAIN, t)
        norm(p + "output.LayerNorm", t)
    return t


def config(n_vocab: int) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": "gelu",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "layer_norm_eps": LAYER_NORM_EPS,
        "max_position_embeddings": MAX_POSITIONS,
        "num_attention_heads": N_HEAD,
        "num_hidden_layers": N_LAYER,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "type_vocab_size": TYPE_VOCAB,
        "vocab_size": n_vocab,
    }


SENTENCE_TRANSFORMERS_FILES = {
    "modules.json": [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ],
    "1_Pooling/config.json": {"word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False,
                              "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                              "pooling_mode_mean_sqrt_len_tokens": False},
    "sentence_bert_config.json": {"max_seq_length": MAX_POSITIONS, "do_lower_case": False},
}


# -- files --------------------------------------------------------------------------------------

def write_files(out_dir: str, seed: int) -> list[str]:
    """Writes every file into out_dir; returns their paths relative to it."""
    vocab = build_vocab()
    written = []

    def json_file(rel: str, value) -> None:
        os.makedirs(os.path.dirname(os.path.join(out_dir, rel)), exist_ok=True)
        with open(os.path.join(out_dir, rel), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
            f.write("\n")
        written.append(rel)

    json_file("config.json", config(len(vocab)))
    for rel, value in SENTENCE_TRANSFORMERS_FILES.items():
        json_file(rel, value)
    build_tokenizer(vocab).save(os.path.join(out_dir, "tokenizer.json"))
    written.append("tokenizer.json")
    write_safetensors(os.path.join(out_dir, "model.safetensors"), build_tensors(seed, len(vocab)))
    written.append("model.safetensors")
    return written


def _same_bytes(a: str, b: str) -> bool:
    if not os.path.exists(b) or os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    os.makedirs(args.out, exist_ok=True)
    changed = 0
    with tempfile.TemporaryDirectory(prefix=".fixture-", dir=args.out) as tmp:
        for rel in write_files(tmp, args.seed):
            target = os.path.join(args.out, rel)
            if _same_bytes(os.path.join(tmp, rel), target):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(tmp, rel), target)  # atomic per file
            changed += 1
    print(f"{args.out}: {'written' if changed else 'up to date'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
