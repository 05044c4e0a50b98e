"""Turns a fused graph into its float16 form, the one GPUs run fast.

Every float32 initializer (norm weights, MatMulNBits and embedding scales, rotary caches,
constants) becomes float16, and with them every activation; the KV cache inputs and outputs
become float16 (moat-model.json says `"kv_dtype": "float16"`). The logits are cast back to
float32 at the end, so sampling sees the same type on every graph. Integer parts (token ids,
the mask, quantised blocks) are untouched. GroupQueryAttention on CUDA runs only in float16:
a float32 graph keeps attention on the CPU there.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LOGITS = "logits"


def _half(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(_half(init))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_half(attr.t))
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    # The graph's last node writes the logits in float16; a Cast gives them back as float32.
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == LOGITS:
                node.output[i] = LOGITS + "_float16"
    graph.node.append(helper.make_node("Cast", [LOGITS + "_float16"], [LOGITS],
                                       name="logits/float32", to=TensorProto.FLOAT))
    for value in graph.output:
        if value.name == LOGITS:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    # Shapes and types inside the graph are inferred again by ONNX Runtime.
    del graph.value_info[:]
    return model
