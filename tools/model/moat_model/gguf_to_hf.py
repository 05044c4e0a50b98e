"""Writes a llama GGUF's model as a Hugging Face checkpoint directory.

    python -m moat_model.gguf_to_hf --gguf MODEL.gguf --out DIR [--dtype float32|bfloat16]

config.json, model.safetensors (the weights dequantised, in Hugging Face's row order: the
GGUF's Q/K permutation undone), tokenizer.json (from the GGUF's vocabulary and merges),
tokenizer_config.json with the GGUF's chat template, and generation_config.json: what
`save_pretrained` writes for the same model. float32 keeps every dequantised value exactly,
so a graph converted from this checkpoint must compute what the GGUF's own exact graph does;
the tests hold the two to the same greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import ml_dtypes
import numpy as np

from . import gguf_source, gguf_tokenizer
from .safetensors_io import write_safetensors

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def write(gguf_path: str, out: str, dtype: str = "float32") -> None:
    model = gguf_source.load(gguf_path)
    h, tok = model.hyper, model.tokenizer
    if h.rope_scaling is not None or model.inv_freq_divisor is not None:
        raise SystemExit("gguf_to_hf: GGUFs with rope scaling or rope_freqs are not written as checkpoints")
    cast = DTYPES[dtype]
    tensors = {"model.embed_tokens.weight": model.token_embd.dense().astype(cast),
               "model.norm.weight": model.output_norm.astype(cast)}
    if not model.tied_embeddings:
        tensors["lm_head.weight"] = model.output.dense().astype(cast)
    for i, layer in enumerate(model.layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        tensors.update({
            p + "input_layernorm.weight": layer.attn_norm.astype(cast),
            a + "q_proj.weight": layer.wq.dense().astype(cast),
            a + "k_proj.weight": layer.wk.dense().astype(cast),
            a + "v_proj.weight": layer.wv.dense().astype(cast),
            a + "o_proj.weight": layer.wo.dense().astype(cast),
            p + "post_attention_layernorm.weight": layer.ffn_norm.astype(cast),
            p + "mlp.gate_proj.weight": layer.w_gate.dense().astype(cast),
            p + "mlp.up_proj.weight": layer.w_up.dense().astype(cast),
            p + "mlp.down_proj.weight": layer.w_down.dense().astype(cast),
        })
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), tensors, {"format": "pt"})
    del tensors

    tokenizer = gguf_tokenizer.build(tok)
    tokenizer.save(os.path.join(out, "tokenizer.json"))

    def text(token_id):
        return None if token_id is None else tok.tokens[token_id]

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": h.hidden_size,
        "intermediate_size": h.ffn_size,
        "num_hidden_layers": h.num_layers,
        "num_attention_heads": h.num_heads,
        "num_key_value_heads": h.num_kv_heads,
        "head_dim": h.head_dim,
        "max_position_embeddings": h.context_length,
        "rms_norm_eps": h.rms_eps,
        "rope_theta": h.rope_theta,
        "rope_scaling": None,
        "vocab_size": h.vocab_size,
        "tie_word_embeddings": model.tied_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "torch_dtype": dtype,
    }
    eos_text = text(tok.eos_token_id)
    tok_config = {"bos_token": text(tok.bos_token_id), "eos_token": eos_text, "add_bos_token": tok.add_bos_token,
                  "clean_up_tokenization_spaces": False, "model_max_length": h.context_length,
                  "tokenizer_class": "GPT2Tokenizer"}
    if tok.chat_template is not None:
        tok_config["chat_template"] = tok.chat_template
    generation = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    for name, value in (("config.json", config), ("tokenizer_config.json", tok_config),
                        ("generation_config.json", generation)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, ensure_ascii=False)
            f.write("\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = ap.parse_args(argv)
    write(args.gguf, args.out, args.dtype)
    print(f"{args.out}: Hugging Face checkpoint of {os.path.basename(args.gguf)} ({args.dtype})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
