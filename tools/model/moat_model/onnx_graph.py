"""A small ONNX graph builder: unique names, shared constants, one call per node."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
MS_DOMAIN = "com.microsoft"

# ONNX forbids 2 GiB protobufs; a single-file model must stay below.
MAX_MODEL_BYTES = (2 << 30) - (16 << 20)


class GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        # Constants go straight into the model that `model()` returns: protobuf copies a
        # message whenever it is put inside another, so a list handed to make_graph and then
        # make_model would hold every weight two or three times at the peak.
        self._model = onnx.ModelProto()
        self._used: set[str] = set()
        self._scalars: dict[tuple, str] = {}

    def unique(self, base: str) -> str:
        name, n = base, 1
        while name in self._used:
            name = f"{base}_{n}"
            n += 1
        self._used.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Claims a fixed name (a graph input or output)."""
        if name in self._used:
            raise ValueError(f"name {name} used twice")
        self._used.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.unique(base)
        self._model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, *values: int) -> str:
        """A shared 1-D int64 constant."""
        key = ("i64", values)
        if key not in self._scalars:
            self._scalars[key] = self.const("const_i64", np.array(values, dtype=np.int64))
        return self._scalars[key]

    def scalar(self, value, dtype) -> str:
        """A shared 0-D constant."""
        key = (np.dtype(dtype).str, value)
        if key not in self._scalars:
            self._scalars[key] = self.const(f"const_{np.dtype(dtype).name}", np.array(value, dtype=dtype))
        return self._scalars[key]

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, *,
           name: str | None = None, domain: str = "", **attrs) -> str | list[str]:
        """Adds one node; returns its output name, or the list of names when there are several.

        `outputs` may name the outputs ("" leaves an optional output unset) or count them.
        """
        base = name or op_type
        node_name = self.unique(base)
        if isinstance(outputs, int):
            out_names = [self.unique(f"{node_name}/out{i}" if outputs > 1 else f"{node_name}/out")
                         for i in range(outputs)]
        else:
            out_names = list(outputs)
        self.nodes.append(helper.make_node(op_type, inputs, out_names, name=node_name, domain=domain, **attrs))
        return out_names[0] if len(out_names) == 1 else out_names

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              use_ms_domain: bool, doc: str = "") -> onnx.ModelProto:
        """The finished model. The builder hands over its constants: call this once."""
        m, self._model = self._model, onnx.ModelProto()
        m.graph.name = self.name
        m.graph.node.extend(self.nodes)
        m.graph.input.extend(inputs)
        m.graph.output.extend(outputs)
        m.opset_import.append(helper.make_opsetid("", OPSET))
        if use_ms_domain:
            m.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        m.producer_name = "moat-model"
        m.doc_string = doc
        # ONNX Runtime 1.16+ reads IR 9; newer IR versions would only narrow who can load it.
        m.ir_version = 9
        return m


def tensor_info(name: str, elem_type: int, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
INT32 = TensorProto.INT32
BOOL = TensorProto.BOOL


def decoder_io(num_layers: int, num_kv_heads: int, head_dim: int, vocab_size: int,
               position_ids: bool):
    """The value infos of a decoder's I/O contract (see docs/model-directory.md): the fused
    contract without `position_ids`, the optimum one with it."""
    kv = ["batch", num_kv_heads, "past_sequence_length", head_dim]
    kv_out = ["batch", num_kv_heads, "present_sequence_length", head_dim]
    inputs = [tensor_info("input_ids", INT64, ["batch", "sequence_length"]),
              tensor_info("attention_mask", INT64, ["batch", "total_sequence_length"])]
    if position_ids:
        inputs.append(tensor_info("position_ids", INT64, ["batch", "sequence_length"]))
    outputs = [tensor_info("logits", FLOAT, ["batch", "sequence_length", vocab_size])]
    for i in range(num_layers):
        inputs += [tensor_info(f"past_key_values.{i}.key", FLOAT, kv),
                   tensor_info(f"past_key_values.{i}.value", FLOAT, kv)]
        outputs += [tensor_info(f"present.{i}.key", FLOAT, kv_out),
                    tensor_info(f"present.{i}.value", FLOAT, kv_out)]
    return inputs, outputs


EXTERNAL_DATA_SUFFIX = ".data"
# Single-file graphs load fastest and are simplest to handle; above this, weights move to
# `model.onnx.data` (and must, from 2 GiB on: a protobuf cannot be larger).
EXTERNAL_DATA_ABOVE = 1 << 30
# Initializers at least this large go to the external file; small ones stay in the graph.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data the graph carries (without serialising it, which fails past 2 GiB)."""
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes
    return total


def goes_external(model: onnx.ModelProto, external: str) -> bool:
    """Whether `save` writes the weights to an external data file."""
    return external == "always" or (external == "auto" and initializer_bytes(model) > EXTERNAL_DATA_ABOVE)


def save(model: onnx.ModelProto, path: str, external: str = "auto") -> list[str]:
    """Writes the graph to `path`; returns the files written (the graph first).

    `external`: "auto" (external data above EXTERNAL_DATA_ABOVE), "always" or "never".
    External data goes to one file beside the graph, `<graph name>.data`, referenced by a
    relative location, which is what moat's bundles accept.
    """
    if not goes_external(model, external):
        data = model.SerializeToString()
        if len(data) > MAX_MODEL_BYTES:
            raise ValueError(f"model is {len(data)} bytes, too large for a single-file ONNX model "
                             "(write external data)")
        with open(path, "wb") as f:
            f.write(data)
        return [path]
    location = os.path.basename(path) + EXTERNAL_DATA_SUFFIX
    data_path = os.path.join(os.path.dirname(path), location)
    if os.path.exists(data_path):
        os.remove(data_path)  # onnx appends to an existing file
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=EXTERNAL_TENSOR_MIN_BYTES, convert_attribute=False)
    return [path, data_path]
