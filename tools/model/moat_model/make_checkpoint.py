"""Writes a tiny, random-weight Hugging Face checkpoint, the way `save_pretrained` lays one out.

    python -m moat_model.make_checkpoint --arch llama|mistral|qwen2|qwen3 --out DIR
        [--dtype float32|float16|bfloat16] [--shards N] [--tied | --untied] [--seed S]
        [--rope-scaling linear|llama3] [--sliding-window N]

config.json, model.safetensors (or N shards and model.safetensors.index.json),
tokenizer.json, tokenizer_config.json (or chat_template.jinja), generation_config.json.
Each architecture carries what sets it apart: qwen2 q/k/v biases and a padded vocabulary,
qwen3 per-head q/k norms and a head_dim that is not hidden/heads, mistral a sliding window
(when asked), llama a tokenizer that adds a BOS. The tests convert these to every variant
and check them against the numpy reference, in seconds.

The weights are scaled so that greedy decoding has clear winners (float noise between numpy
and ONNX Runtime must not decide a token) and so that the network is not chaotic: with the
GGUF fixture's large gains a 4-bit rounding of any weight decorrelates the logits after two
layers, which says nothing about how int4 treats a trained model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import ml_dtypes
import numpy as np
from tokenizers import processors

from . import gguf_tokenizer, make_fixture
from .decoder import TokenizerSpec
from .safetensors_io import write_safetensors

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class Shape:
    """The sizes of a generated checkpoint; the defaults make a tiny one (~0.2 M parameters).
    Large ones (`--layers 30 --hidden 2048 --ffn 5632`: 1.5 B parameters) test that big
    models convert, pack and import without being held in memory."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TORCH_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}

CONTEXT = 256
# Logits of trained models span tens, not hundreds: the GGUF fixture's output gain (6) makes
# margins huge for exactness tests, but would make every small weight error look like a
# disaster in the int4 figures. This gain gives logits ~ +-30 with margins still far above
# float noise.
OUTPUT_NORM_GAIN = 2.0
ATTN_QK_GAIN = 1.5
ATTN_VO_GAIN = 1.0
FFN_GAIN = 1.0
QWEN3_HEAD_DIM = 32  # not D_MODEL / N_HEAD (16): Qwen3 sets head_dim on its own
BOS_TEXT = "<|endoftext|>"


def tokenizer_files(arch: str):
    """(tokenizer, vocab rows): the fixture's byte-level BPE with ChatML tokens.

    The llama flavour's post-processor prepends a BOS, as Llama's tokenizers do; qwen pads
    the embedding beyond the tokenizer, as Qwen2's 151,936 rows for 151,665 tokens do.
    """
    tokens, types, merges = make_fixture.build_vocab()
    tok = gguf_tokenizer.build(TokenizerSpec("gpt2", tokens, types, merges, None, 2, False, None))
    if arch == "llama":
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{BOS_TEXT} $A", pair=f"{BOS_TEXT} $A {BOS_TEXT} $B",
                                          special_tokens=[(BOS_TEXT, 0)]),
        ])
    rows = len(tokens) + (25 if arch.startswith("qwen") else 0)
    return tok, rows


def build_weights(arch: str, seed: int, vocab: int, tied: bool, head_dim: int, shape: Shape,
                  dtype) -> dict[str, np.ndarray]:
    """The weights, each generated straight into the stored dtype (a large checkpoint never
    exists in float32 all at once)."""
    rng = np.random.default_rng(seed)
    D_MODEL, D_FFN, N_HEAD, N_KV_HEAD = shape.hidden, shape.ffn, shape.heads, shape.kv_heads

    def linear(out_dim: int, in_dim: int, gain: float) -> np.ndarray:
        out = np.empty((out_dim, in_dim), dtype)
        for i in range(0, out_dim, 256):  # in slices: float64 temporaries stay small
            rows = min(256, out_dim - i)
            out[i:i + rows] = (rng.standard_normal((rows, in_dim), dtype=np.float32)
                               * np.float32(gain / np.sqrt(in_dim))).astype(dtype)
        return out

    def norm(size: int = D_MODEL, gain: float = 1.0) -> np.ndarray:
        return (rng.uniform(0.7, 1.3, size) * gain).astype(np.float32)

    def bias(size: int) -> np.ndarray:
        return (rng.standard_normal(size) * 0.3).astype(np.float32)

    embed = (rng.standard_normal((vocab, D_MODEL)) * make_fixture.EMBED_STD).astype(np.float32)
    embed[:len(make_fixture.CONTROL_TOKENS)] *= make_fixture.CONTROL_ROW_SCALE
    w = {"model.embed_tokens.weight": embed}
    q_width, kv_width = N_HEAD * head_dim, N_KV_HEAD * head_dim
    for i in range(shape.layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        w[p + "input_layernorm.weight"] = norm()
        w[a + "q_proj.weight"] = linear(q_width, D_MODEL, ATTN_QK_GAIN)
        w[a + "k_proj.weight"] = linear(kv_width, D_MODEL, ATTN_QK_GAIN)
        w[a + "v_proj.weight"] = linear(kv_width, D_MODEL, ATTN_VO_GAIN)
        w[a + "o_proj.weight"] = linear(D_MODEL, q_width, ATTN_VO_GAIN)
        if arch == "qwen2":
            w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"] = (
                bias(q_width), bias(kv_width), bias(kv_width))
        if arch == "qwen3":
            w[a + "q_norm.weight"], w[a + "k_norm.weight"] = norm(head_dim), norm(head_dim)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = linear(D_FFN, D_MODEL, FFN_GAIN)
        w[p + "mlp.up_proj.weight"] = linear(D_FFN, D_MODEL, FFN_GAIN)
        w[p + "mlp.down_proj.weight"] = linear(D_MODEL, D_FFN, FFN_GAIN)
    w["model.norm.weight"] = norm(gain=OUTPUT_NORM_GAIN)
    if not tied:
        w["lm_head.weight"] = (rng.standard_normal((vocab, D_MODEL)) * make_fixture.EMBED_STD).astype(np.float32)
    return {name: value.astype(dtype, copy=False) for name, value in w.items()}


def config(arch: str, vocab: int, tied: bool, dtype: str, head_dim: int, rope_scaling: str | None,
           sliding_window: int | None, shape: Shape = Shape()) -> dict:
    c = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-6 if arch.startswith("qwen") else 1e-5,
        "rope_theta": 1000000.0 if arch.startswith("qwen") else 10000.0,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "torch_dtype": TORCH_DTYPE[dtype],
        "bos_token_id": 0,
        "eos_token_id": 2,
        "transformers_version": "4.57.1",
        "use_cache": True,
    }
    if arch == "llama":
        c.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if arch == "qwen3":
        c.update(head_dim=head_dim, attention_bias=False)
    if arch.startswith("qwen"):
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=shape.layers)
    if arch == "mistral":
        c["sliding_window"] = sliding_window
    if rope_scaling == "linear":
        c["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    elif rope_scaling == "llama3":
        c["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return c


def write(out: str, arch: str, *, dtype: str = "float32", shards: int = 1, tied: bool = True, seed: int = 11,
          rope_scaling: str | None = None, sliding_window: int | None = None, shape: Shape = Shape()) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(arch)
    os.makedirs(out, exist_ok=True)
    head_dim = QWEN3_HEAD_DIM if arch == "qwen3" else shape.hidden // shape.heads
    tok, vocab = tokenizer_files(arch)
    stored = build_weights(arch, seed, vocab, tied, head_dim, shape, DTYPES[dtype])

    names = sorted(stored)
    if shards == 1:
        write_safetensors(os.path.join(out, "model.safetensors"), stored, {"format": "pt"})
    else:
        weight_map, total = {}, 0
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: stored[n] for n in names[s::shards]}
            write_safetensors(os.path.join(out, file), part, {"format": "pt"})
            weight_map.update({n: file for n in part})
            total += sum(a.nbytes for a in part.values())
        _json(out, "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})

    _json(out, "config.json", config(arch, vocab, tied, dtype, head_dim, rope_scaling, sliding_window, shape))
    tok.save(os.path.join(out, "tokenizer.json"))
    tok_config = {
        "add_prefix_space": False,
        "bos_token": BOS_TEXT,
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONTEXT,
        "tokenizer_class": "GPT2Tokenizer",
    }
    if arch == "qwen3":
        # Newer transformers save the template beside the tokenizer config.
        with open(os.path.join(out, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(make_fixture.CHAT_TEMPLATE)
    else:
        tok_config["chat_template"] = make_fixture.CHAT_TEMPLATE
    _json(out, "tokenizer_config.json", tok_config)
    _json(out, "special_tokens_map.json", {"bos_token": BOS_TEXT, "eos_token": "<|im_end|>"})
    gen = {"bos_token_id": 0, "eos_token_id": [2, 0] if arch.startswith("qwen") else 2,
           "transformers_version": "4.57.1"}
    _json(out, "generation_config.json", gen)


def _json(out: str, name: str, value) -> None:
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=ARCHITECTURES, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--untied", action="store_true", help="a separate lm_head.weight")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--rope-scaling", choices=("linear", "llama3"))
    ap.add_argument("--sliding-window", type=int)
    default = Shape()
    for field in dataclasses.fields(Shape):
        ap.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=getattr(default, field.name))
    args = ap.parse_args(argv)
    shape = Shape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Shape)})
    write(args.out, args.arch, dtype=args.dtype, shards=args.shards, tied=not args.untied, seed=args.seed,
          rope_scaling=args.rope_scaling, sliding_window=args.sliding_window, shape=shape)
    print(f"{args.out}: {args.arch} checkpoint ({args.dtype}, {args.shards} file(s))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
