#!/usr/bin/env python3
"""Writes a tiny, random-weight llama GGUF that the tests use in place of a real model.

    python -m moat_model.make_fixture --out local/models/fixture.gguf [--seed 7]

The file is laid out the way llama.cpp's converter lays out a real llama model (SmolLM2 is
the model it stands in for): the same metadata keys, a GPT-2 byte-level BPE vocabulary with
ChatML control tokens, Q8_0 token embeddings, Q4_1 linear weights, F32 norms, tied output
embeddings, and Q/K rows permuted for llama.cpp's interleaved rope. So the ONNX converter and
the numpy reference take exactly the code paths they take for the real model, in seconds.

The output is a pure function of the seed (same seed, same bytes), and an existing file with
the same bytes is left untouched so its timestamp does not trigger rebuilds downstream.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile

import numpy as np
from gguf import GGUFWriter, GGMLQuantizationType, LlamaFileType, TokenType
from gguf.quants import dequantize, quantize

# -- model shape ------------------------------------------------------------------------------

N_LAYER = 2
D_MODEL = 64
N_HEAD = 4
N_KV_HEAD = 2
HEAD_DIM = D_MODEL // N_HEAD
D_FFN = 128
CONTEXT = 256
ROPE_BASE = 10000.0
RMS_EPS = 1e-5

# Weight scales, chosen so greedy decoding has clear winners: the top1-top2 logit margin
# must stay far above the float noise between numpy and ONNX Runtime (~1e-5 here), or the
# cross-checks would compare coin flips. Logits are <norm(h), embedding row>, so their spread
# grows with the embedding scale and the output norm's gain; the layer gains keep the
# context (attention, FFN) in charge of the residual stream, so the model does not simply
# echo its input token.
EMBED_STD = 1.0
OUTPUT_NORM_GAIN = 6.0
ATTN_QK_GAIN = 4.0
ATTN_VO_GAIN = 3.0
FFN_GAIN = 3.0
# Control tokens get short embedding rows so they seldom win the argmax: runs of 32 tokens
# then rarely stop at <|im_end|>. RMSNorm removes the scale on the input side.
CONTROL_ROW_SCALE = 0.2

# -- tokenizer ----------------------------------------------------------------------------------

CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_MERGES = 100
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# ChatML; a leading system turn is supplied when the conversation has none, as SmolLM2 does.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text the merges are learned from: everyday English plus the chat role words, so prompts
# in tests split into a mix of merged and single-byte tokens.
MERGE_CORPUS = """
The cat sat on the mat and the dog sat by the door. Hello world, hello there!
What is the capital of the country? The answer is in the book on the table.
She said that the weather was nice, and then they went out to the park together.
There is a small house at the end of the street where the old man lives with his cat.
In the morning the children walk to school, and in the evening they read a story.
This is a test of the tokenizer: it should merge the most common pairs of letters.
The system said hello to the user, and the assistant answered the question.
user assistant system user assistant system
I think that this is the right thing to do, and I hope that you think so too.
When the sun is shining, the sea is calm and the sky is blue over the hills.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte maps to one printable unicode character.

    Printable Latin-1 bytes stand for themselves; the others are moved to code points 256+
    in byte order. The returned dict keeps GPT-2's order (printable bytes first), which is
    also the order the byte tokens take in the vocabulary.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# Same splitting as the tokenizer's pre-tokenizer (single digits, then GPT-2's pattern).
_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+|\d| ?[^\s\w]+|\s+(?!\S)|\s+")


def learn_merges(text: str, n_merges: int, byte_map: dict[int, str]) -> list[tuple[str, str]]:
    """Plain byte-level BPE training: repeatedly merge the most frequent adjacent pair.

    Ties go to the lexicographically smallest pair so the result never depends on dict order.
    """
    words = collections.Counter(
        tuple(byte_map[b] for b in piece.encode("utf-8")) for piece in _PRETOKEN.findall(text))
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best_count = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == best_count)
        merges.append(best)
        joined = best[0] + best[1]
        merged_words: collections.Counter = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged_words[tuple(out)] += count
        words = merged_words
    return merges


def build_vocab() -> tuple[list[str], list[int], list[str]]:
    byte_map = bytes_to_unicode()
    tokens = list(CONTROL_TOKENS) + list(byte_map.values())
    types = [TokenType.CONTROL] * len(CONTROL_TOKENS) + [TokenType.NORMAL] * 256
    merges = learn_merges(MERGE_CORPUS, N_MERGES, byte_map)
    for a, b in merges:
        tokens.append(a + b)
        types.append(TokenType.NORMAL)
    if len(set(tokens)) != len(tokens):
        raise AssertionError("duplicate token in fixture vocabulary")
    return tokens, [int(t) for t in types], [f"{a} {b}" for a, b in merges]


# -- weights ------------------------------------------------------------------------------------

def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permutation of HF Q/K rows for its interleaved (pairwise) rope.

    Within each head, HF rotates row i with row i + head_dim/2; after this permutation those
    two rows sit next to each other (rows 2i and 2i+1).
    """
    rows, cols = w.shape
    return (w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols))


def quantized(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    q = quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
    # The fixture is only useful if readers see the values we think we wrote.
    back = dequantize(q, qtype)
    if back.shape != w.shape or not np.all(np.isfinite(back)):
        raise AssertionError(f"{qtype.name} round trip failed")
    return q


def build_tensors(seed: int, n_vocab: int) -> list[tuple[str, np.ndarray, GGMLQuantizationType]]:
    rng = np.random.default_rng(seed)

    def linear(out_dim: int, in_dim: int, gain: float) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) * (gain / np.sqrt(in_dim))).astype(np.float32)

    def norm_weight() -> np.ndarray:
        # Not all ones, so a graph that skipped a norm's weight would be caught.
        return rng.uniform(0.7, 1.3, D_MODEL).astype(np.float32)

    embd = (rng.standard_normal((n_vocab, D_MODEL)) * EMBED_STD).astype(np.float32)
    embd[:len(CONTROL_TOKENS)] *= CONTROL_ROW_SCALE
    out = [("token_embd.weight", quantized(embd, GGMLQuantizationType.Q8_0),
            GGMLQuantizationType.Q8_0)]
    q4 = GGMLQuantizationType.Q4_1
    for i in range(N_LAYER):
        wq = permute_qk(linear(N_HEAD * HEAD_DIM, D_MODEL, ATTN_QK_GAIN), N_HEAD)
        wk = permute_qk(linear(N_KV_HEAD * HEAD_DIM, D_MODEL, ATTN_QK_GAIN), N_KV_HEAD)
        wv = linear(N_KV_HEAD * HEAD_DIM, D_MODEL, ATTN_VO_GAIN)
        wo = linear(D_MODEL, N_HEAD * HEAD_DIM, ATTN_VO_GAIN)
        w_gate = linear(D_FFN, D_MODEL, FFN_GAIN)
        w_up = linear(D_FFN, D_MODEL, FFN_GAIN)
        w_down = linear(D_MODEL, D_FFN, FFN_GAIN)
        attn_norm, ffn_norm = norm_weight(), norm_weight()
        p = f"blk.{i}."
        # The order llama.cpp's converter emits a block in (alphabetical by HF name).
        out += [
            (p + "attn_norm.weight", attn_norm, GGMLQuantizationType.F32),
            (p + "ffn_down.weight", quantized(w_down, q4), q4),
            (p + "ffn_gate.weight", quantized(w_gate, q4), q4),
            (p + "ffn_up.weight", quantized(w_up, q4), q4),
            (p + "ffn_norm.weight", ffn_norm, GGMLQuantizationType.F32),
            (p + "attn_k.weight", quantized(wk, q4), q4),
            (p + "attn_output.weight", quantized(wo, q4), q4),
            (p + "attn_q.weight", quantized(wq, q4), q4),
            (p + "attn_v.weight", quantized(wv, q4), q4),
        ]
    out.append(("output_norm.weight", norm_weight() * np.float32(OUTPUT_NORM_GAIN),
                GGMLQuantizationType.F32))
    return out


# -- file ---------------------------------------------------------------------------------------

def write_gguf(path: str, seed: int) -> None:
    tokens, token_types, merges = build_vocab()
    tensors = build_tensors(seed, len(tokens))

    w = GGUFWriter(path, "llama")  # writes general.architecture first
    w.add_type("model")
    w.add_name(f"moat fixture llama (seed {seed})")
    w.add_block_count(N_LAYER)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(D_MODEL)
    w.add_feed_forward_length(D_FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV_HEAD)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_file_type(LlamaFileType.MOSTLY_Q4_1)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(False)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    w.add_quantization_version(2)
    for name, data, qtype in tensors:
        w.add_tensor(name, data, raw_dtype=None if qtype == GGMLQuantizationType.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _same_bytes(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="GGUF file to write")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fixture-", suffix=".gguf", dir=out_dir)
    os.close(fd)
    try:
        write_gguf(tmp, args.seed)
        if os.path.exists(args.out) and _same_bytes(tmp, args.out):
            print(f"{args.out}: up to date", file=sys.stderr)
            return 0
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out)  # atomic: readers never see a half-written model
        tmp = None
        print(f"{args.out}: written", file=sys.stderr)
        return 0
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


if __name__ == "__main__":
    sys.exit(main())
