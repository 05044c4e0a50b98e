"""moat-model.json for a text-generation model directory (see docs/model-directory.md).

One writer for every path into moat: `convert` (from a GGUF or a Hugging Face checkpoint)
and `describe` (for an existing ONNX export).
"""

from __future__ import annotations

import json
import os

FORMAT_VERSION = 1
FILE = "moat-model.json"


def text_generation(*, name: str, variant: str, architecture: str, io_contract: str, num_layers: int,
                    hidden_size: int | None, num_heads: int | None, num_kv_heads: int, head_dim: int,
                    vocab_size: int, context_length: int, eos_token_ids: list[int], bos_token_id: int | None,
                    add_bos_token: bool, chat_template: str | None, kv_dtype: str, inputs: list[str],
                    outputs: list[str], source: dict) -> dict:
    return {
        "format": FORMAT_VERSION,
        "name": name,
        "variant": variant,
        "architecture": architecture,
        "io_contract": io_contract,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "context_length": context_length,
        "eos_token_ids": eos_token_ids,
        "bos_token_id": bos_token_id if add_bos_token else None,
        "add_bos_token": add_bos_token,
        "chat_template": chat_template,
        "default_system_prompt": None,
        "kv_dtype": kv_dtype,
        "inputs": inputs,
        "outputs": outputs,
        "source": source,
    }


def write(directory: str, meta: dict) -> str:
    path = os.path.join(directory, FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def read(directory: str) -> dict:
    with open(os.path.join(directory, FILE), encoding="utf-8") as f:
        return json.load(f)
