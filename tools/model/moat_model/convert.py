"""`moat-model convert`: a GGUF or a Hugging Face checkpoint to a moat model directory.

Writes model.onnx (plus model.onnx.data when the weights are large), tokenizer.json and
moat-model.json. Variants (see docs/bring-your-model.md):

    exact         the source's weights as they are (float32 MatMul, or a GGUF's quantised
                  blocks kept exactly), float32 activations: computes what the checkpoint
                  computes. The reference for every other variant.
    int4          float weights quantised to 4 bits per block of 32 with float minimums
                  (quantize.q4_1_blocks); float32 activations, float32 embedding and lm_head.
    int4-fast     int4 weights with integer zero points (quantize.int4_blocks), int8
                  activations (accuracy_level 4), 8-bit embedding, 4-bit lm_head: the CPU
                  variant. `--int4-minimums float` trades ~13% of its speed for Q4_1's form.
    float16       exact weights and activations in float16: the GPU variant for quality.
    int4-float16  int4 weights, float16 activations: the GPU variant for speed.

For a GGUF, whose weights are already 4-bit blocks, `int4` keeps them (as `exact` does) and
`int4-fast` runs them on int8 activations.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time

import onnx

from . import gguf_source, gguf_tokenizer, hf_source, hf_tokenizer, metadata, onnx_fp16, onnx_fused, onnx_graph
from . import onnx_optimum
from .decoder import ConversionError, Model, sha256_of

GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    fast: bool  # int8 activations in the quantised matmuls
    int4: bool  # float weights quantised to 4 bits
    float16: bool  # activations and KV cache in float16
    # int4 blocks with a float minimum (Q4_1's form: more accurate, one more input column per
    # block to carry it) rather than an integer zero point (one plain kernel, faster).
    float_minimums: bool = True


VARIANTS = {v.name: v for v in (
    Variant("exact", fast=False, int4=False, float16=False),
    Variant("int4", fast=False, int4=True, float16=False, float_minimums=True),
    Variant("int4-fast", fast=True, int4=True, float16=False, float_minimums=False),
    Variant("float16", fast=False, int4=False, float16=True),
    Variant("int4-float16", fast=False, int4=True, float16=True, float_minimums=False),
)}
INT4_MINIMUMS = ("float", "integer")


def check_graph(model: onnx.ModelProto, directory: str | None = None) -> None:
    """onnx.checker, with strict shape inference, over the graph.

    SimplifiedLayerNormalization lives in the default domain but its schema comes from ONNX
    Runtime, not onnx, so the checker would reject it: it is checked as a Mul of the same
    inputs and outputs, then put back. (The checker skips com.microsoft nodes itself.)

    The checker works on a serialised copy, so a graph carrying its weights would be held
    three times over: a graph whose weights went to external data is checked from a
    weightless copy written beside it (`directory`), the checker reading the data file's
    references, not its bytes.
    """
    swapped = {}
    for i, node in enumerate(model.graph.node):
        if node.domain == "" and node.op_type == "SimplifiedLayerNormalization":
            swapped[i] = onnx.NodeProto()
            swapped[i].CopyFrom(node)
            node.ClearField("attribute")
            del node.output[1:]
            node.op_type = "Mul"
    try:
        if directory is None:
            onnx.checker.check_model(model, full_check=True)
        else:
            with tempfile.NamedTemporaryFile(dir=directory, suffix=".onnx") as skeleton:
                skeleton.write(model.SerializeToString())
                skeleton.flush()
                onnx.checker.check_model(skeleton.name, full_check=True)
    finally:
        for i, original in swapped.items():
            model.graph.node[i].CopyFrom(original)


def is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


@dataclasses.dataclass(frozen=True)
class Source:
    model: Model
    write_tokenizer: object  # callable(out_path)
    text: dict  # eos_token_ids, bos_token_id, add_bos_token, chat_template
    source: dict


def read_source(path: str, require_chat_template: bool) -> Source:
    if is_gguf(path):
        model = gguf_source.load(path)
        tokenizer = gguf_tokenizer.build(model.tokenizer)
        tok = model.tokenizer
        eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
        im_end = tokenizer.token_to_id("<|im_end|>")
        if im_end is not None and im_end not in eos:
            eos.append(im_end)
        if tok.chat_template is None and require_chat_template:
            raise ConversionError("the GGUF has no tokenizer.chat_template (pass --no-chat-template to serve "
                                  "plain completions only)")
        text = {"eos_token_ids": eos, "bos_token_id": tok.bos_token_id, "add_bos_token": tok.add_bos_token,
                "chat_template": tok.chat_template}
        return Source(model, tokenizer.save, text,
                      {"file": os.path.basename(path), "sha256": sha256_of(path)})
    if os.path.isdir(path):
        model = hf_source.load(path)
        spec = hf_tokenizer.read(path, model.hyper.vocab_size, require_chat_template=require_chat_template)
        text = {"eos_token_ids": spec.eos_token_ids, "bos_token_id": spec.bos_token_id,
                "add_bos_token": spec.add_bos_token, "chat_template": spec.chat_template}
        files = sorted(f for f in os.listdir(path) if f.endswith((".json", ".safetensors", ".jinja")))
        return Source(model, lambda out: shutil.copyfile(spec.tokenizer_path, out), text,
                      {"checkpoint": os.path.basename(os.path.abspath(path)),
                       "files": {f: sha256_of(os.path.join(path, f)) for f in files}})
    raise ConversionError("not a GGUF file and not a Hugging Face checkpoint directory")


def convert(src: str, out: str, *, variant: str = "exact", graph: str = "fused", name: str | None = None,
            int4_block: int = 32, int4_minimums: str | None = None, context_length: int | None = None,
            require_chat_template: bool = True, external: str = "auto", log=print) -> dict:
    """Converts `src` into the model directory `out`; returns its moat-model.json."""
    v = VARIANTS[variant]
    if graph == "optimum" and v.name != "exact":
        raise ConversionError("the optimum graph has float32 weights and activations only: use --variant exact")
    t0 = time.perf_counter()
    source = read_source(src, require_chat_template)
    model = source.model
    if context_length is not None:
        if context_length <= 0:
            raise ConversionError("--context-length must be positive")
        # The rotary tables hold one row per position: a model trained on 128k positions
        # need not carry them all when it will never be asked for that many.
        model = dataclasses.replace(model, hyper=dataclasses.replace(
            model.hyper, context_length=min(context_length, model.hyper.context_length)))
    h = model.hyper
    if graph == "fused" and h.head_dim % 16:
        raise ConversionError(f"head_dim {h.head_dim} is not a multiple of 16, which ONNX Runtime's "
                              "GroupQueryAttention needs; convert with --graph optimum instead")
    if graph == "fused":
        float_minimums = v.float_minimums if int4_minimums is None else int4_minimums == "float"
        if float_minimums and int4_block != 32 and v.int4:
            raise ConversionError("float minimums come in blocks of 32 (Q4_1's form): use --int4-block 32 or "
                                  "--int4-minimums integer")
        proto, inputs, outputs = onnx_fused.build(model, fast=v.fast, int4_block=int4_block if v.int4 else None,
                                                  float_minimums=float_minimums)
    else:
        proto, inputs, outputs = onnx_optimum.build(model)
    if v.float16:
        proto = onnx_fp16.to_float16(proto)
    os.makedirs(out, exist_ok=True)
    graph_path = os.path.join(out, "model.onnx")
    if not onnx_graph.goes_external(proto, external):
        check_graph(proto)
    written = onnx_graph.save(proto, graph_path, external=external)
    del proto
    if len(written) > 1:
        check_graph(onnx.load(graph_path, load_external_data=False), out)
    source.write_tokenizer(os.path.join(out, "tokenizer.json"))
    meta = metadata.text_generation(
        name=name or default_name(src), variant=v.name, architecture=h.architecture, io_contract=graph,
        num_layers=h.num_layers, hidden_size=h.hidden_size, num_heads=h.num_heads, num_kv_heads=h.num_kv_heads,
        head_dim=h.head_dim, vocab_size=h.vocab_size, context_length=h.context_length,
        kv_dtype="float16" if v.float16 else "float32", inputs=inputs, outputs=outputs, source=source.source,
        **source.text)
    metadata.write(out, meta)
    size = sum(os.path.getsize(p) for p in written)
    log(f"{out}: {graph}/{v.name} graph, {h.architecture}, {h.num_layers} layers, "
        f"{' + '.join(os.path.basename(p) for p in written)} {size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s")
    return meta


def default_name(src: str) -> str:
    base = os.path.basename(os.path.abspath(src))
    return base[:-5] if base.endswith(".gguf") else base


def run(args) -> int:
    try:
        convert(args.src, args.out, variant=args.variant, graph=args.graph, name=args.name,
                int4_block=args.int4_block, int4_minimums=args.int4_minimums, context_length=args.context_length,
                require_chat_template=not args.no_chat_template, external=args.external_data,
                log=lambda line: print(line, file=sys.stderr))
    except ConversionError as e:
        print(f"error: {args.src}: {e}", file=sys.stderr)
        return 1
    return 0
