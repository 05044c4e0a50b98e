"""Reads a Hugging Face checkpoint directory into the decoder the graph builders read.

A checkpoint is what `save_pretrained` writes after a fine-tune (a LoRA adapter merged
first): `config.json`, `model.safetensors` or shards listed in `model.safetensors.index.json`
(float32, float16 or bfloat16), and the tokenizer files (read by hf_tokenizer). Supported
`model_type`s: llama (Llama 2/3, SmolLM, TinyLlama), mistral, qwen2 (q/k/v biases) and qwen3
(per-head q/k RMSNorm). Everything the graph would get wrong is refused by name: other
architectures, activations, rope scalings, partial rotary, sliding windows on some layers.

Tensors stay memory-mapped; each is checked against the shape config.json implies, so a
config that does not match its weights fails here, naming the tensor and both shapes.
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGMLQuantizationType

from .decoder import ConversionError, Hyper, Layer, Model, RopeScaling, Weight, read_json_object
from .safetensors_io import SafetensorsError, read_safetensors

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

QTYPES = {
    np.dtype("<f4"): GGMLQuantizationType.F32,
    np.dtype("<f2"): GGMLQuantizationType.F16,
}

# Buffers some exporters save beside the weights; the graph computes them itself.
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)


def _config_value(config: dict, key: str, kind, default=None, required=False):
    value = config.get(key, default)
    if value is None:
        if required:
            raise ConversionError(f"config.json has no {key}")
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConversionError(f"config.json {key} must be an integer, not {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConversionError(f"config.json {key} must be a number, not {value!r}")
    return kind(value)


def rope_scaling(config: dict, context_length: int) -> RopeScaling | None:
    """The config's rope scaling, or a refusal naming the kind moat does not implement."""
    s = config.get("rope_scaling")
    if s is None:
        return None
    if not isinstance(s, dict):
        raise ConversionError(f"config.json rope_scaling must be an object, not {s!r}")
    kind = s.get("rope_type", s.get("type"))
    if kind in (None, "default"):
        return None
    factor = s.get("factor")
    if kind == "linear":
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise ConversionError(f"config.json rope_scaling.factor must be a positive number, not {factor!r}")
        return RopeScaling("linear", float(factor))
    if kind == "llama3":
        try:
            scaling = RopeScaling("llama3", float(factor), float(s["low_freq_factor"]), float(s["high_freq_factor"]),
                                  int(s["original_max_position_embeddings"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"config.json rope_scaling (llama3) lacks or mistypes {e}") from None
        if scaling.high_freq_factor <= scaling.low_freq_factor or scaling.factor <= 0:
            raise ConversionError("config.json rope_scaling (llama3): high_freq_factor must exceed "
                                  "low_freq_factor and factor must be positive")
        return scaling
    # Dynamic NTK changes the frequencies of tokens already cached as the sequence grows (in
    # Hugging Face the result depends on the path taken), and yarn/longrope also rescale
    # attention: a static graph would compute something else, so refuse rather than guess.
    raise ConversionError(f"rope scaling {kind!r} (config.json rope_scaling) is not implemented; "
                          "supported: linear, llama3")


def hyper_from_config(config: dict) -> Hyper:
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        named = config.get("architectures") or []
        also = f" ({', '.join(map(str, named))})" if named else ""
        raise ConversionError(f"architecture {arch!r}{also} (config.json model_type) is not supported; "
                              f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"hidden_act {act!r} (config.json) is not supported; {arch} uses silu")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError("partial rotary embedding (config.json partial_rotary_factor) is not supported")
    if config.get("mlp_bias"):
        raise ConversionError("MLP biases (config.json mlp_bias: true) are not supported")

    hidden = _config_value(config, "hidden_size", int, required=True)
    heads = _config_value(config, "num_attention_heads", int, required=True)
    kv_heads = _config_value(config, "num_key_value_heads", int, default=heads)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise ConversionError(f"config.json: num_attention_heads {heads} is not a positive multiple of "
                              f"num_key_value_heads {kv_heads}")
    head_dim = _config_value(config, "head_dim", int, default=hidden // heads)
    if head_dim <= 0 or head_dim % 2:
        raise ConversionError(f"config.json: head_dim {head_dim} must be a positive even number")
    context = _config_value(config, "max_position_embeddings", int, required=True)

    window = None
    if arch in ("qwen2", "qwen3"):
        if config.get("use_sliding_window"):
            raise ConversionError(f"config.json use_sliding_window: true is not supported for {arch} "
                                  "(it applies to some layers only)")
    elif arch == "mistral":
        window = _config_value(config, "sliding_window", int)
        if window is not None and window >= context:
            window = None  # never reached: every key stays visible
    return Hyper(
        architecture=arch,
        num_layers=_config_value(config, "num_hidden_layers", int, required=True),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_size=_config_value(config, "intermediate_size", int, required=True),
        vocab_size=_config_value(config, "vocab_size", int, required=True),
        context_length=context,
        rms_eps=_config_value(config, "rms_norm_eps", float, default=1e-6),
        rope_theta=_config_value(config, "rope_theta", float, default=10000.0),
        rope_scaling=rope_scaling(config, context),
        sliding_window=window,
    )


def weight_files(root: str) -> list[str]:
    """The safetensors files of the checkpoint: the index's shards, or the single file."""
    index = os.path.join(root, INDEX_FILE)
    if os.path.exists(index):
        weight_map = read_json_object(root, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{INDEX_FILE} has no weight_map")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not isinstance(shard, str) or os.path.basename(shard) != shard:
                raise ConversionError(f"{INDEX_FILE} names {shard!r}, not a file beside it")
            if not os.path.exists(os.path.join(root, shard)):
                raise ConversionError(f"{INDEX_FILE} lists {shard}, which is missing")
        return [os.path.join(root, s) for s in shards]
    if os.path.exists(os.path.join(root, SINGLE_FILE)):
        return [os.path.join(root, SINGLE_FILE)]
    if os.path.exists(os.path.join(root, "adapter_config.json")):
        raise ConversionError("this is a LoRA adapter, not a model: merge it into its base model first "
                              "(peft's merge_and_unload, then save_pretrained)")
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(root)):
        raise ConversionError("only safetensors weights are read (no pickled .bin/.pt files); save the model "
                              "with save_pretrained(..., safe_serialization=True)")
    raise ConversionError(f"no {SINGLE_FILE} and no {INDEX_FILE}")


def load_tensors(root: str) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of the checkpoint, name -> (file name, memory-mapped array)."""
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for path in weight_files(root):
        try:
            found = read_safetensors(path)
        except SafetensorsError as e:
            raise ConversionError(str(e)) from None
        for name, array in found.items():
            if name in tensors:
                raise ConversionError(f"tensor {name} is in both {tensors[name][0]} and {os.path.basename(path)}")
            tensors[name] = (os.path.basename(path), array)
    return tensors


def load(root: str) -> Model:
    if not os.path.exists(os.path.join(root, "config.json")):
        raise ConversionError("config.json is missing (not a Hugging Face checkpoint directory)")
    config = read_json_object(root, "config.json")
    h = hyper_from_config(config)
    tensors = load_tensors(root)
    used: set[str] = set()

    def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ConversionError(f"tensor {name} is missing from the weights")
        file, array = tensors[name]
        if tuple(array.shape) != shape:
            raise ConversionError(f"{file}: tensor {name} has shape {list(array.shape)}, but config.json implies "
                                  f"{list(shape)} (config and weights disagree)")
        if array.dtype not in QTYPES and array.dtype.name != "bfloat16":
            raise ConversionError(f"{file}: tensor {name} is {array.dtype}; only float32, float16 and "
                                  "bfloat16 weights are supported")
        used.add(name)
        return array

    def vector(name: str, size: int) -> np.ndarray:
        return tensor(name, (size,)).astype(np.float32)

    def optional_vector(name: str, size: int) -> np.ndarray | None:
        return vector(name, size) if name in tensors else None

    def weight(name: str, out_features: int, in_features: int) -> Weight:
        array = tensor(name, (out_features, in_features))
        qtype = QTYPES.get(array.dtype, GGMLQuantizationType.BF16)
        return Weight(name, qtype, array, in_features)

    d, hd, ff = h.hidden_size, h.head_dim, h.ffn_size
    q_width, kv_width = h.num_heads * hd, h.num_kv_heads * hd
    qkv_bias = h.architecture == "qwen2" or bool(config.get("attention_bias"))
    layers = []
    for i in range(h.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layers.append(Layer(
            attn_norm=vector(p + "input_layernorm.weight", d),
            wq=weight(a + "q_proj.weight", q_width, d),
            wk=weight(a + "k_proj.weight", kv_width, d),
            wv=weight(a + "v_proj.weight", kv_width, d),
            wo=weight(a + "o_proj.weight", d, q_width),
            ffn_norm=vector(p + "post_attention_layernorm.weight", d),
            w_gate=weight(p + "mlp.gate_proj.weight", ff, d),
            w_up=weight(p + "mlp.up_proj.weight", ff, d),
            w_down=weight(p + "mlp.down_proj.weight", d, ff),
            q_bias=vector(a + "q_proj.bias", q_width) if qkv_bias else None,
            k_bias=vector(a + "k_proj.bias", kv_width) if qkv_bias else None,
            v_bias=vector(a + "v_proj.bias", kv_width) if qkv_bias else None,
            o_bias=optional_vector(a + "o_proj.bias", d) if config.get("attention_bias") else None,
            q_norm=vector(a + "q_norm.weight", hd) if h.architecture == "qwen3" else None,
            k_norm=vector(a + "k_norm.weight", hd) if h.architecture == "qwen3" else None,
        ))

    token_embd = weight("model.embed_tokens.weight", h.vocab_size, d)
    tied = config.get("tie_word_embeddings", False)
    if tied:
        output = token_embd
        used.add("lm_head.weight")  # present in some tied checkpoints; Hugging Face ignores it too
    elif "lm_head.weight" in tensors:
        output = weight("lm_head.weight", h.vocab_size, d)
    else:
        raise ConversionError("tensor lm_head.weight is missing, and config.json does not set "
                              "tie_word_embeddings: true")
    output_norm = vector("model.norm.weight", d)

    unused = sorted(n for n in tensors if n not in used and not n.endswith(IGNORED_TENSOR_SUFFIXES))
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise ConversionError(f"the weights hold tensors a {h.architecture} model with this config.json does not "
                              f"have: {', '.join(unused[:3])}{more} (an unmerged adapter, or another architecture?)")
    return Model(
        path=os.path.abspath(root),
        hyper=h,
        token_embd=token_embd,
        output=output,
        output_norm=output_norm,
        layers=layers,
    )
