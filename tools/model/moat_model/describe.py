"""`moat-model describe`: moat-model.json for an ONNX export that another tool made.

Two exporters write decoder graphs moat can serve as they are:

    optimum-cli export onnx --task text-generation-with-past
        model.onnx (+ model.onnx_data), config.json, generation_config.json and the
        tokenizer files. Standard ONNX operators; `position_ids` is an input, so the graph
        runs with moat's `optimum` I/O contract (float32 only).
    python -m onnxruntime_genai.models.builder
        model.onnx + model.onnx.data, genai_config.json and the tokenizer files (config.json
        not always). GroupQueryAttention derives positions from `attention_mask`, so the
        graph has no `position_ids` and runs with moat's `fused` contract.

Why a verb of its own: moatd learns everything it needs from moat-model.json and checks the
graph against it only when it loads the model, on the appliance, after the model was bundled,
signed and imported. Every fact this file states is read here from the export's own files and
held against the graph's declared inputs and outputs first, so that a mismatched config, a
tokenizer from another model, a missing chat template or a truncated weights file is refused
on the workstation with the file and field at fault (docs/model-directory.md has the format).

The graph is read without its weights (`load_external_data=False`) and never copied or
rewritten: moat-model.json is written beside model.onnx, in the export directory itself,
because that is where moatd looks for it. The variant is derived from what the graph holds
(quantised matmuls, their accuracy level, the weights' and the KV cache's element types), not
from what the export's directory name says.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import stat
import sys

import onnx
from onnx import TensorProto

from . import genai_config, hf_tokenizer, metadata
from .decoder import ConversionError, read_json_object, sha256_of

GRAPH_FILE = "model.onnx"
HF_CONFIG = "config.json"
GENAI_CONFIG = "genai_config.json"
# The exporter's small files, hashed into `source` so that the file says which export it
# describes. The weights are not hashed: an external data file may be many GB; its name and
# size are recorded instead (moat's bundles hash every file anyway).
HASHED_FILES = (GRAPH_FILE, HF_CONFIG, GENAI_CONFIG, "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", hf_tokenizer.TEMPLATE_FILE)

# The operator domains moatd serves (core/src/bundle/graph.rs refuses any other at import).
SERVED_DOMAINS = ("", "ai.onnx", "com.microsoft")
MS_DOMAIN = "com.microsoft"
# ONNX Runtime reads a tensor with this location from process memory, not from a file.
MEMORY_ADDRESS_TAG = "*/_ORT_MEM_ADDR_/*"

# numpy's names, the ones moat-model.json and the error messages use.
TYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
              TensorProto.DOUBLE: "float64", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
              TensorProto.BOOL: "bool"}
KV_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}
FLOAT_WEIGHT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
                      TensorProto.BFLOAT16: "bfloat16", TensorProto.DOUBLE: "float64"}
# Dynamic int8 quantisation (onnxruntime.quantization, optimum's quantizer): int8 weights
# and int8 activations.
DYNAMIC_INT8_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                    "QLinearMatMul"}
# MatMulNBits accuracy_level 4: activations quantised to int8 per block (moat's "-fast").
INT8_ACTIVATIONS = 4

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
PRESENT = re.compile(r"present\.(\d+)\.(key|value)")
# The names moatd binds, as genai_config.json spells them (position_ids: optimum-contract graphs).
GENAI_NAMES = {
    **{("inputs", key): name for key, name in genai_config.DECODER_INPUTS.items()},
    ("inputs", "position_ids"): "position_ids",
    **{("outputs", key): name for key, name in genai_config.DECODER_OUTPUTS.items()},
}


@dataclasses.dataclass(frozen=True)
class Expected:
    """What the export's config says the graph is; `where` names each fact's file and field."""

    export: str  # "optimum" | "onnxruntime-genai"
    architecture: str
    num_layers: int
    hidden_size: int | None
    num_heads: int | None
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    where: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Value:
    """A graph input or output as declared: dims are ints, symbolic names, or None (unknown)."""

    name: str
    elem_type: int
    shape: list[int | str | None] | None

    @property
    def type_name(self) -> str:
        if self.elem_type in TYPE_NAMES:
            return TYPE_NAMES[self.elem_type]
        return TensorProto.DataType.Name(self.elem_type).lower() if self.elem_type else "untyped"


# --- the export's config -----------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive(table: dict, key: str, where: str, *, required: bool = True) -> int | None:
    value = table.get(key)
    if value is None and not required:
        return None
    if value is None:
        raise ConversionError(f"{where} is missing")
    if not _is_int(value) or value <= 0:
        raise ConversionError(f"{where} must be a positive integer, not {value!r}")
    return value


def _token_ids(value, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(_is_int(v) and v >= 0 for v in values):
        raise ConversionError(f"{where} must be a token id or a list of them, not {value!r}")
    return list(values)


def _optimum_config(config: dict) -> Expected:
    def field(key: str, **kw) -> int | None:
        return _positive(config, key, f"{HF_CONFIG} {key}", **kw)

    architecture = config.get("model_type")
    if not isinstance(architecture, str) or not architecture:
        raise ConversionError(f"{HF_CONFIG} model_type is missing")
    layers, hidden, heads = field("num_hidden_layers"), field("hidden_size"), field("num_attention_heads")
    # Hugging Face's defaults: no num_key_value_heads means one KV head per query head, no
    # head_dim means the hidden size split over the heads (Qwen3, Gemma set their own).
    kv_heads = field("num_key_value_heads", required=False)
    kv_where = f"{HF_CONFIG} num_key_value_heads"
    if kv_heads is None:
        kv_heads, kv_where = heads, f"{HF_CONFIG} num_attention_heads (there is no num_key_value_heads)"
    head_dim = field("head_dim", required=False)
    dim_where = f"{HF_CONFIG} head_dim"
    if head_dim is None:
        if hidden % heads:
            raise ConversionError(f"{HF_CONFIG} hidden_size {hidden} is not a multiple of num_attention_heads "
                                  f"{heads}, and there is no head_dim")
        head_dim, dim_where = hidden // heads, f"{HF_CONFIG} hidden_size / num_attention_heads"
    return Expected(
        export="optimum", architecture=architecture, num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=field("vocab_size"),
        context_length=field("max_position_embeddings"),
        # config.json's own end and start ids are read by hf_tokenizer with the other text files.
        eos_token_ids=[], bos_token_id=None,
        where={"num_layers": f"{HF_CONFIG} num_hidden_layers", "num_kv_heads": kv_where, "head_dim": dim_where,
               "vocab_size": f"{HF_CONFIG} vocab_size"})


def _genai_config(genai: dict) -> Expected:
    model = genai.get("model")
    if not isinstance(model, dict):
        raise ConversionError(f"{GENAI_CONFIG} has no model object")
    decoder = model.get("decoder")
    if not isinstance(decoder, dict):
        raise ConversionError(f"{GENAI_CONFIG} model has no decoder object")
    filename = decoder.get("filename", GRAPH_FILE)
    if filename != GRAPH_FILE:
        raise ConversionError(f"{GENAI_CONFIG} model.decoder.filename is {filename!r}, but moatd loads the graph "
                              f"from {GRAPH_FILE}: rename the graph (its external data keeps its own name)")
    # onnxruntime-genai can rename the graph's I/O; moatd binds the fixed names of its contracts.
    for (side, key), name in GENAI_NAMES.items():
        table = decoder.get(side) or {}
        given = table.get(key) if isinstance(table, dict) else None
        if given is not None and given != name:
            raise ConversionError(f"{GENAI_CONFIG} model.decoder.{side}.{key} is {given!r}, but moatd uses "
                                  f"{name!r}")

    def field(table: dict, prefix: str, key: str, **kw) -> int | None:
        return _positive(table, key, f"{GENAI_CONFIG} {prefix}.{key}", **kw)

    architecture = model.get("type")
    if not isinstance(architecture, str) or not architecture:
        raise ConversionError(f"{GENAI_CONFIG} model.type is missing")
    bos = model.get("bos_token_id")
    if bos is not None and not (_is_int(bos) and bos >= 0):
        raise ConversionError(f"{GENAI_CONFIG} model.bos_token_id must be a token id, not {bos!r}")
    return Expected(
        export="onnxruntime-genai", architecture=architecture,
        num_layers=field(decoder, "model.decoder", "num_hidden_layers"),
        hidden_size=field(decoder, "model.decoder", "hidden_size", required=False),
        num_heads=field(decoder, "model.decoder", "num_attention_heads", required=False),
        num_kv_heads=field(decoder, "model.decoder", "num_key_value_heads"),
        head_dim=field(decoder, "model.decoder", "head_size"),
        vocab_size=field(model, "model", "vocab_size"),
        context_length=field(model, "model", "context_length"),
        eos_token_ids=_token_ids(model.get("eos_token_id"), f"{GENAI_CONFIG} model.eos_token_id"),
        bos_token_id=bos,
        where={"num_layers": f"{GENAI_CONFIG} model.decoder.num_hidden_layers",
               "num_kv_heads": f"{GENAI_CONFIG} model.decoder.num_key_value_heads",
               "head_dim": f"{GENAI_CONFIG} model.decoder.head_size",
               "vocab_size": f"{GENAI_CONFIG} model.vocab_size"})


def read_config(src: str) -> Expected:
    """The export's own description of its graph: genai_config.json when the builder made
    it (its config.json, when there is one, is the checkpoint's), else config.json."""
    genai = read_json_object(src, GENAI_CONFIG, required=False)
    if genai is not None:
        return _genai_config(genai)
    config = read_json_object(src, HF_CONFIG, required=False)
    if config is not None:
        return _optimum_config(config)
    raise ConversionError(f"neither {GENAI_CONFIG} (onnxruntime-genai's model builder) nor {HF_CONFIG} "
                          "(optimum-cli export onnx) is there: not an export describe reads")


# --- the graph ---------------------------------------------------------------------------

def load_graph(src: str) -> onnx.ModelProto:
    path = os.path.join(src, GRAPH_FILE)
    if not os.path.isfile(path):
        others = sorted(f for f in os.listdir(src) if f.endswith(".onnx"))
        hint = (f" (there is {', '.join(others)}: moatd serves one graph with a KV cache, named {GRAPH_FILE}; "
                "optimum-cli writes it with --task text-generation-with-past)" if others else "")
        raise ConversionError(f"{GRAPH_FILE} is missing{hint}")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError, onnx plain exceptions
        raise ConversionError(f"{GRAPH_FILE} is not a readable ONNX model: {e}") from None


def _values(values, skip: set[str]) -> list[Value]:
    out = []
    for v in values:
        if v.name in skip:
            continue
        t = v.type.tensor_type
        shape = None
        if t.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
        out.append(Value(v.name, t.elem_type, shape))
    return out


def _subgraphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _subgraphs(g)


def _tensors(model: onnx.ModelProto):
    """Every tensor the model stores, wherever it sits: initializers, sparse initializers and
    tensor attributes, in the main graph and in subgraphs."""
    for graph in _subgraphs(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices
                for sparse in attr.sparse_tensors:
                    yield sparse.values
                    yield sparse.indices


def check_served(model: onnx.ModelProto) -> None:
    """moatd refuses, at import, a graph importing an operator domain it does not serve or
    defining functions of its own; say so here with the same reason."""
    for opset in model.opset_import:
        if opset.domain not in SERVED_DOMAINS:
            raise ConversionError(f"{GRAPH_FILE} imports operator domain {opset.domain!r}: moat serves the standard "
                                  f"ONNX operators and ONNX Runtime's {MS_DOMAIN} ones only")
    if model.functions:
        raise ConversionError(f"{GRAPH_FILE} defines function {model.functions[0].name!r} of its own: moat serves no "
                              "model-local functions")


def _plain_relative(location: str) -> bool:
    parts = location.split("/")
    return (location != MEMORY_ADDRESS_TAG and not location.startswith("/") and "\0" not in location
            and not os.path.isabs(location) and all(p not in ("", ".", "..") for p in parts))


def _file_size(src: str, location: str) -> int:
    """The size of the regular file `location` names inside `src`. No component may be a
    symbolic link: moatd reads none (a link could point anywhere), so refuse it now."""
    path = src
    parts = location.split("/")
    for i, part in enumerate(parts):
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ConversionError(f"{GRAPH_FILE} keeps weights in {location}, which is missing "
                                  f"(it must lie beside {GRAPH_FILE})") from None
        if stat.S_ISLNK(st.st_mode):
            raise ConversionError(f"{GRAPH_FILE} keeps weights in {location}, and {'/'.join(parts[:i + 1])} is a "
                                  "symbolic link, which moatd does not follow: copy the file in")
        if i == len(parts) - 1:
            if not stat.S_ISREG(st.st_mode):
                raise ConversionError(f"{GRAPH_FILE} keeps weights in {location}, which is not a regular file")
            return st.st_size
        if not stat.S_ISDIR(st.st_mode):
            break
    raise ConversionError(f"{GRAPH_FILE} keeps weights in {location}, which is not a file inside the export")


def check_external_data(src: str, model: onnx.ModelProto) -> dict[str, int]:
    """Every external data reference names a plain relative path inside `src`, and its bytes
    lie within the file; returns {location: size}."""
    sizes: dict[str, int] = {}
    for tensor in _tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location")
        what = f"{GRAPH_FILE} tensor {tensor.name!r}"
        if not location:
            raise ConversionError(f"{what} is marked external but names no location")
        if not _plain_relative(location):
            raise ConversionError(f"{what} reads its data from {location!r}, which is not a plain relative path "
                                  "inside the export (absolute, '..', '.' or empty components are refused)")
        numbers = {}
        for key in ("offset", "length"):
            text = entries.get(key)
            if text is not None and not (text.isascii() and text.isdigit()):
                raise ConversionError(f"{what} has external data {key} {text!r}, not a number of bytes")
            numbers[key] = None if text is None else int(text)
        if location not in sizes:
            sizes[location] = _file_size(src, location)
        offset, length, size = numbers["offset"] or 0, numbers["length"] or 0, sizes[location]
        if offset + length > size:
            raise ConversionError(f"{what} reads bytes {offset}..{offset + length} of {location}, which has only "
                                  f"{size} bytes (truncated copy?)")
    return sizes


def _fixed(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def check_io(model: onnx.ModelProto, expected: Expected) -> tuple[str, str, list[Value], list[Value]]:
    """Holds the graph's inputs and outputs to one of moat's two decoder contracts and to the
    config; returns (io_contract, kv_dtype, inputs, outputs)."""
    # Initializers listed as inputs (old exports) are not inputs ONNX Runtime asks for.
    stored = {t.name for t in model.graph.initializer}
    inputs, outputs = _values(model.graph.input, stored), _values(model.graph.output, set())
    by_name = {v.name: v for v in inputs}
    # position_ids is what sets the two contracts apart (docs/model-directory.md).
    contract = "optimum" if "position_ids" in by_name else "fused"
    plain = ["input_ids", "attention_mask"] + (["position_ids"] if contract == "optimum" else [])

    for v in inputs:
        if v.name not in plain and not PAST.fullmatch(v.name):
            raise ConversionError(
                f"{GRAPH_FILE} has input {v.name!r}, which moat does not feed (the fused contract feeds input_ids, "
                "attention_mask and past_key_values.{i}.key/value; optimum adds position_ids)")
    for name in plain:
        v = by_name.get(name)
        if v is None:
            raise ConversionError(f"{GRAPH_FILE} has no input {name}, which every moat contract needs")
        if v.elem_type != TensorProto.INT64:
            raise ConversionError(f"{GRAPH_FILE} input {name} is {v.type_name}; moat feeds int64")
        if v.shape is not None and len(v.shape) != 2:
            raise ConversionError(f"{GRAPH_FILE} input {name} has {len(v.shape)} dimensions; moat feeds "
                                  "[batch, tokens]")

    past = [v for v in inputs if PAST.fullmatch(v.name)]
    outputs_by_name = {v.name: v for v in outputs}
    for v in outputs:
        if v.name != "logits" and not PRESENT.fullmatch(v.name):
            raise ConversionError(f"{GRAPH_FILE} has output {v.name!r}, which neither moat contract has (logits "
                                  "and present.{i}.key/value)")
    present = [v for v in outputs if PRESENT.fullmatch(v.name)]
    layers = expected.num_layers
    # By name, not position: onnxruntime-genai's builder lists every layer's key before any
    # value, optimum alternates them; moatd binds them by name either way.
    for kind, values, pattern, template in (("input", past, PAST, "past_key_values.{}.{}"),
                                             ("output", present, PRESENT, "present.{}.{}")):
        names = {v.name for v in values}
        if len(names) != len(values):
            twice = next(v.name for v in values if [w.name for w in values].count(v.name) > 1)
            raise ConversionError(f"{GRAPH_FILE} has cache {kind} {twice} twice")
        found = {int(pattern.fullmatch(n).group(1)) for n in names}
        count = max(found) + 1 if found else 0
        for i in range(count):
            for part in ("key", "value"):
                if template.format(i, part) not in names:
                    raise ConversionError(f"{GRAPH_FILE} lacks cache {kind} {template.format(i, part)} (one key and "
                                          "one value per layer, layers numbered from 0)")
        if count != layers:
            raise ConversionError(f"{GRAPH_FILE} has cache {kind}s for {count} layer{'' if count == 1 else 's'}, "
                                  f"but {expected.where['num_layers']} is {layers}")

    logits = outputs_by_name.get("logits")
    if logits is None:
        raise ConversionError(f"{GRAPH_FILE} has no output logits")
    if logits.elem_type != TensorProto.FLOAT:
        raise ConversionError(f"{GRAPH_FILE} output logits is {logits.type_name}; moat reads float32 logits "
                              "(a float16 graph must cast them back to float32)")
    if logits.shape is not None:
        if len(logits.shape) != 3:
            raise ConversionError(f"{GRAPH_FILE} output logits has {len(logits.shape)} dimensions, not "
                                  "[batch, tokens, vocabulary]")
        width = _fixed(logits.shape[2])
        if width is not None and width != expected.vocab_size:
            raise ConversionError(f"{GRAPH_FILE} output logits has {width} columns but "
                                  f"{expected.where['vocab_size']} is {expected.vocab_size}")

    kv_type = past[0].elem_type
    if kv_type not in KV_DTYPES:
        raise ConversionError(f"{GRAPH_FILE} input {past[0].name} is {past[0].type_name}; moat's KV cache is float32 "
                              "or float16")
    for kind, v in [("input", v) for v in past] + [("output", v) for v in present]:
        if v.elem_type != kv_type:
            raise ConversionError(f"{GRAPH_FILE} {kind} {v.name} is {v.type_name} but {past[0].name} is "
                                  f"{past[0].type_name}: one KV cache type for every layer")
        if v.shape is None:
            continue
        if len(v.shape) != 4:
            raise ConversionError(f"{GRAPH_FILE} {kind} {v.name} has {len(v.shape)} dimensions, not "
                                  "[batch, kv_heads, positions, head_dim]")
        for axis, field, want in ((1, "num_kv_heads", expected.num_kv_heads), (3, "head_dim", expected.head_dim)):
            dim = _fixed(v.shape[axis])
            if dim is not None and dim != want:
                raise ConversionError(f"{GRAPH_FILE} {kind} {v.name} has {dim} in its {field} dimension, but "
                                      f"{expected.where[field]} is {want}")
    kv_dtype = KV_DTYPES[kv_type]

    if contract == "fused":
        # moatd binds past and present of a fused graph to one buffer and lets the graph write
        # the new positions in place: only GroupQueryAttention does that. A standard-ops graph
        # without position_ids would concatenate into a buffer that is not there.
        if not any(n.domain == MS_DOMAIN and n.op_type == "GroupQueryAttention" for n in model.graph.node):
            raise ConversionError(f"{GRAPH_FILE} has no position_ids input, so moat would serve it with the fused "
                                  "contract, whose shared KV buffer needs com.microsoft GroupQueryAttention; the "
                                  "graph has none (an optimum export needs position_ids: --task "
                                  "text-generation-with-past)")
    elif kv_dtype != "float32":
        raise ConversionError(f"{GRAPH_FILE} input {past[0].name} is {kv_dtype}, but moat runs optimum-contract "
                              "graphs (those with position_ids) in float32 only: export in float32")
    return contract, kv_dtype, inputs, outputs


def derive_variant(model: onnx.ModelProto, kv_dtype: str) -> str:
    """The variant name, from what the graph computes with (see convert.VARIANTS):

    int4 / int8     MatMulNBits weights (the fewest bits any of them has: the embedding and
                    lm_head often keep more);
    -fast           int8 activations (a MatMulNBits with accuracy_level 4, or dynamic int8
                    quantisation);
    exact           float32 weights and activations;
    float16         float16 weights and activations (the KV cache in float16); a quantised
                    graph with a float16 cache is int4-float16.
    """
    nodes = [n for g in _subgraphs(model.graph) for n in g.node]
    nbits = [{a.name: a.i for a in n.attribute} for n in nodes if n.domain == MS_DOMAIN and n.op_type == "MatMulNBits"]
    if nbits:
        variant = f"int{min(a.get('bits', 4) for a in nbits)}"
        levels = {a.get("accuracy_level", 0) for a in nbits}
        if INT8_ACTIVATIONS in levels:
            variant += "-fast"
        elif levels - {0, 1}:  # float16 / bfloat16 compute in the matmuls: rare, say it as it is
            variant += f"-accuracy{max(levels)}"
    elif any(n.op_type in DYNAMIC_INT8_OPS for n in nodes):
        variant = "int8-fast"
    else:
        weights = collections.Counter()
        for t in _tensors(model):
            if t.data_type in FLOAT_WEIGHT_TYPES:
                count = 1
                for d in t.dims:
                    count *= d
                weights[FLOAT_WEIGHT_TYPES[t.data_type]] += count
        dominant = weights.most_common(1)[0][0] if weights else "float32"
        if dominant == "float32" or (dominant == "float16" and kv_dtype == "float16"):
            variant = "exact"
        else:  # e.g. float16 weights cast up to float32 activations: not what `exact` promises
            variant = f"{dominant}-weights"
    if kv_dtype == "float16":
        variant = "float16" if variant == "exact" else f"{variant}-float16"
    return variant


# --- the verb ----------------------------------------------------------------------------

def _check_out(src: str, out: str) -> None:
    # moatd finds moat-model.json beside model.onnx, and describe copies no graph: writing it
    # anywhere else would make a directory that is not a model.
    if not (os.path.isdir(out) and os.path.samefile(src, out)):
        raise ConversionError(f"--out {out} is not the export directory itself: moat-model.json must sit beside "
                              f"{GRAPH_FILE}, and describe copies no graph (pass --out {src}, or make a new "
                              "directory with `moat-model convert`)")


def describe(src: str, out: str, *, name: str | None = None, require_chat_template: bool = True,
             log=print) -> dict:
    """Checks the export in `src` and writes its moat-model.json there; returns it."""
    if not os.path.isdir(src):
        raise ConversionError("not a directory (describe reads an export directory: model.onnx, config files, "
                              "tokenizer.json)")
    _check_out(src, out)
    expected = read_config(src)
    model = load_graph(src)
    check_served(model)
    contract, kv_dtype, inputs, outputs = check_io(model, expected)
    external = check_external_data(src, model)
    variant = derive_variant(model, kv_dtype)
    del model

    # The text side (tokenizer.json against the vocabulary, end and start ids, chat template)
    # is read the way `convert` reads a checkpoint's; genai_config.json adds its own ids.
    text = hf_tokenizer.read(src, expected.vocab_size, require_chat_template=require_chat_template,
                             extra_eos=expected.eos_token_ids, extra_bos=expected.bos_token_id)

    files = {f: sha256_of(os.path.join(src, f)) for f in HASHED_FILES if os.path.isfile(os.path.join(src, f))}
    meta = metadata.text_generation(
        name=name or os.path.basename(os.path.abspath(src)), variant=variant, architecture=expected.architecture,
        io_contract=contract, num_layers=expected.num_layers, hidden_size=expected.hidden_size,
        num_heads=expected.num_heads, num_kv_heads=expected.num_kv_heads, head_dim=expected.head_dim,
        vocab_size=expected.vocab_size, context_length=expected.context_length,
        eos_token_ids=text.eos_token_ids, bos_token_id=text.bos_token_id, add_bos_token=text.add_bos_token,
        chat_template=text.chat_template, kv_dtype=kv_dtype,
        inputs=[v.name for v in inputs], outputs=[v.name for v in outputs],
        source={"export": expected.export, "files": files, "external_data": external})
    path = metadata.write(src, meta)
    weights = f" + {', '.join(sorted(external))}" if external else ""
    log(f"{path}: {expected.export} export, {contract}/{variant} graph, {expected.architecture}, "
        f"{expected.num_layers} layers, KV cache {kv_dtype}; the graph stays as it is ({GRAPH_FILE}{weights})")
    return meta


def run(args) -> int:
    try:
        describe(args.src, args.out, name=args.name, require_chat_template=not args.no_chat_template,
                 log=lambda line: print(line, file=sys.stderr))
    except ConversionError as e:
        print(f"error: {args.src}: {e}", file=sys.stderr)
        return 1
    return 0
