"""onnxruntime-genai's `genai_config.json` for a decoder with moat's fused I/O contract.

Standard library only: the benchmark's peer (bench/genai_peer.py) imports it in an
environment without numpy or onnx. `describe` reads the same names back from a builder
export, so the names moatd binds are written down once, here.
"""

from __future__ import annotations

# genai_config.json's decoder I/O names, as moatd binds them (daemon/src/engine/ort_backend).
DECODER_INPUTS = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "past_key_names": "past_key_values.%d.key",
    "past_value_names": "past_key_values.%d.value",
}
DECODER_OUTPUTS = {
    "logits": "logits",
    "present_key_names": "present.%d.key",
    "present_value_names": "present.%d.value",
}


def config(*, model_type: str, num_layers: int, num_heads: int, num_kv_heads: int, head_size: int,
           hidden_size: int, vocab_size: int, context_length: int, eos_token_id, bos_token_id: int,
           pad_token_id: int, session_options: dict, search: dict) -> dict:
    """A genai_config.json for one decoder graph, `model.onnx`."""
    return {
        "model": {
            "type": model_type,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "vocab_size": vocab_size,
            "context_length": context_length,
            "decoder": {
                "filename": "model.onnx",
                "head_size": head_size,
                "hidden_size": hidden_size,
                "num_attention_heads": num_heads,
                "num_key_value_heads": num_kv_heads,
                "num_hidden_layers": num_layers,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [], **session_options},
                "inputs": dict(DECODER_INPUTS),
                "outputs": dict(DECODER_OUTPUTS),
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "past_present_share_buffer": True, "top_k": 1, **search},
    }
