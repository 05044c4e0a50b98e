"""Directories shaped like the two exports `moat-model describe` reads, from a tiny checkpoint.

Neither exporter runs here (optimum needs torch, the builder onnxruntime-genai); what matters
to describe is each tool's directory layout, config files and graph I/O, and moat's own
converter writes graphs with exactly those I/O contracts:

- optimum_export: `optimum-cli export onnx --task text-generation-with-past`: model.onnx
  with position_ids (single file) beside the checkpoint's config.json,
  generation_config.json and tokenizer files;
- genai_export: `onnxruntime_genai.models.builder -p int4 -e cpu`: model.onnx +
  model.onnx.data (GroupQueryAttention, MatMulNBits), genai_config.json, tokenizer.json and
  tokenizer_config.json, and no config.json or generation_config.json (the builder does not
  always write them).

Neither carries a moat-model.json: the one the converter writes is removed.
"""

from __future__ import annotations

import json
import os
import shutil

from moat_model import convert, make_checkpoint
from moat_model.genai_config import config as make_genai_config

OPTIMUM_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json")
GENAI_FILES = ("tokenizer.json", "tokenizer_config.json")
# genai_config.json's end ids: more than the checkpoint's (2), so a test can tell it was read.
GENAI_EOS = [2, 0]


def checkpoint(out: str, arch: str = "llama") -> str:
    make_checkpoint.write(out, arch, dtype="float32")
    return out


def _quiet(_line: str) -> None:
    pass


def _graph(ckpt: str, out: str, **options) -> None:
    convert.convert(ckpt, out, log=_quiet, **options)
    os.remove(os.path.join(out, "moat-model.json"))


def _copy(ckpt: str, out: str, names) -> None:
    for name in names:
        shutil.copyfile(os.path.join(ckpt, name), os.path.join(out, name))


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)


def optimum_export(ckpt: str, out: str) -> str:
    _graph(ckpt, out, variant="exact", graph="optimum", external="never")
    _copy(ckpt, out, OPTIMUM_FILES)
    return out


def genai_config(ckpt_config: dict, eos=GENAI_EOS) -> dict:
    """genai_config.json as the model builder writes it for a CPU int4 export."""
    c = ckpt_config
    heads = c["num_attention_heads"]
    return make_genai_config(
        model_type=c["model_type"], num_layers=c["num_hidden_layers"], num_heads=heads,
        num_kv_heads=c["num_key_value_heads"], head_size=c.get("head_dim") or c["hidden_size"] // heads,
        hidden_size=c["hidden_size"], vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"],
        eos_token_id=eos, bos_token_id=c["bos_token_id"], pad_token_id=2, session_options={},
        search={"max_length": c["max_position_embeddings"]})


def genai_export(ckpt: str, out: str, variant: str = "int4") -> str:
    _graph(ckpt, out, variant=variant, graph="fused", external="always")
    _copy(ckpt, out, GENAI_FILES)
    write_json(os.path.join(out, "genai_config.json"), genai_config(read_json(os.path.join(ckpt, "config.json"))))
    return out
