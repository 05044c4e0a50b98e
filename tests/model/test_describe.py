"""`moat-model describe` on directories shaped like optimum and onnxruntime-genai exports.

Each refusal is provoked by one edit of an otherwise good export (a config field, the graph's
declared I/O, the weights file, the tokenizer files) and must name the file and field at
fault; a good export must come out with moat-model.json fields that match its graph.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

from moat_model import describe as describe_mod
from moat_model import metadata
from moat_model.decoder import ConversionError

import exports

GRAPH = "model.onnx"
DATA = "model.onnx.data"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The checkpoint and one export of each kind, built once; tests work on copies."""
    root = tmp_path_factory.mktemp("describe")
    ckpt = exports.checkpoint(str(root / "ckpt"))
    return {
        "ckpt": ckpt,
        "optimum": exports.optimum_export(ckpt, str(root / "optimum")),
        "genai": exports.genai_export(ckpt, str(root / "genai")),
    }


@pytest.fixture
def optimum(pristine, tmp_path):
    return shutil.copytree(pristine["optimum"], str(tmp_path / "optimum-export"))


@pytest.fixture
def genai(pristine, tmp_path):
    return shutil.copytree(pristine["genai"], str(tmp_path / "genai-export"))


def run_describe(src: str, **options) -> dict:
    return describe_mod.describe(src, src, log=lambda _line: None, **options)


def edit_json(path: str, change) -> None:
    value = exports.read_json(path)
    change(value)
    exports.write_json(path, value)


def edit_graph(src: str, change) -> None:
    """Changes the graph's declarations only; the weights stay where they are."""
    path = os.path.join(src, GRAPH)
    model = onnx.load(path, load_external_data=False)
    change(model)
    onnx.save(model, path)


def graph_io(src: str) -> tuple[list[str], list[str]]:
    model = onnx.load(os.path.join(src, GRAPH), load_external_data=False)
    return [v.name for v in model.graph.input], [v.name for v in model.graph.output]


# --- good exports --------------------------------------------------------------------------

def test_optimum_export(optimum, pristine):
    meta = run_describe(optimum)
    on_disk = metadata.read(optimum)
    assert on_disk == json.loads(json.dumps(meta))
    config = exports.read_json(os.path.join(pristine["ckpt"], "config.json"))
    inputs, outputs = graph_io(optimum)
    assert meta["format"] == 1 and meta["name"] == "optimum-export"
    assert meta["io_contract"] == "optimum" and meta["variant"] == "exact" and meta["kv_dtype"] == "float32"
    assert meta["architecture"] == "llama"
    assert meta["num_layers"] == config["num_hidden_layers"] == 2
    assert meta["num_kv_heads"] == config["num_key_value_heads"]
    assert meta["head_dim"] == config["hidden_size"] // config["num_attention_heads"]
    assert meta["vocab_size"] == config["vocab_size"]
    assert meta["context_length"] == config["max_position_embeddings"]
    assert meta["eos_token_ids"] == [2]
    assert meta["bos_token_id"] == 0 and meta["add_bos_token"] is True  # the llama fixture's tokenizer adds one
    assert meta["chat_template"].startswith("{% for message in messages %}")
    assert meta["inputs"] == inputs and "position_ids" in inputs
    assert meta["outputs"] == outputs
    assert inputs[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    source = meta["source"]
    assert source["export"] == "optimum" and source["external_data"] == {}
    assert set(source["files"]) == {GRAPH, "config.json", "generation_config.json", "tokenizer.json",
                                    "tokenizer_config.json", "special_tokens_map.json"}
    # Nothing else was written or copied.
    assert sorted(os.listdir(optimum)) == sorted(os.listdir(pristine["optimum"]) + ["moat-model.json"])


def test_genai_export(genai):
    meta = run_describe(genai, name="tiny-int4")
    inputs, outputs = graph_io(genai)
    assert meta["name"] == "tiny-int4"
    assert meta["io_contract"] == "fused" and meta["variant"] == "int4" and meta["kv_dtype"] == "float32"
    assert (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"], meta["vocab_size"]) == (2, 2, 16, 359)
    assert meta["hidden_size"] == 64 and meta["num_attention_heads"] == 4 and meta["context_length"] == 256
    # genai_config.json's ids; there is no config.json or generation_config.json.
    assert meta["eos_token_ids"] == exports.GENAI_EOS
    assert meta["inputs"] == inputs and "position_ids" not in inputs
    assert meta["outputs"] == outputs
    source = meta["source"]
    assert source["export"] == "onnxruntime-genai"
    # The weights are recorded by size, never hashed; the graph and the small files are.
    assert source["external_data"] == {DATA: os.path.getsize(os.path.join(genai, DATA))}
    assert set(source["files"]) == {GRAPH, "genai_config.json", "tokenizer.json", "tokenizer_config.json"}


@pytest.mark.parametrize("variant, kv_dtype", [("exact", "float32"), ("int4-fast", "float32"),
                                               ("float16", "float16"), ("int4-float16", "float16")])
def test_variant_is_read_from_the_graph(pristine, tmp_path, variant, kv_dtype):
    src = exports.genai_export(pristine["ckpt"], str(tmp_path / variant), variant=variant)
    meta = run_describe(src)
    assert (meta["io_contract"], meta["variant"], meta["kv_dtype"]) == ("fused", variant, kv_dtype)


def test_keys_before_values_as_the_builder_orders_them(genai):
    """onnxruntime-genai's builder lists every layer's key input before any value input (and
    the same for its outputs); moatd binds the cache by name, so that order serves too."""
    def keys_first(m):
        for values in (m.graph.input, m.graph.output):
            ordered = sorted(values, key=lambda v: (v.name.endswith(".value"), v.name.startswith(("past", "present"))))
            copies = [onnx.ValueInfoProto() for _ in ordered]
            for copy, v in zip(copies, ordered):
                copy.CopyFrom(v)
            del values[:]
            values.extend(copies)
    edit_graph(genai, keys_first)
    inputs, _ = graph_io(genai)
    assert inputs.index("past_key_values.1.key") < inputs.index("past_key_values.0.value")
    meta = run_describe(genai)
    assert meta["inputs"] == inputs and meta["io_contract"] == "fused"


def test_describe_again_replaces_the_file(optimum):
    first = run_describe(optimum)
    second = run_describe(optimum, name="renamed")
    assert second["name"] == "renamed"
    assert second["source"] == first["source"]  # moat-model.json itself is not one of the hashed files


def test_no_chat_template_flag(optimum):
    _no_chat_template(optimum)
    with pytest.raises(ConversionError, match="chat_template"):
        run_describe(optimum)
    meta = run_describe(optimum, require_chat_template=False)
    assert meta["chat_template"] is None


# --- refusals ------------------------------------------------------------------------------

def _config(key, value):
    return lambda src: edit_json(os.path.join(src, "config.json"), lambda c: c.__setitem__(key, value))


def _genai(path, value):
    def change(c):
        table = c["model"]
        for key in path[:-1]:
            table = table[key]
        table[path[-1]] = value
    return lambda src: edit_json(os.path.join(src, "genai_config.json"), change)


def _no_chat_template(src):
    edit_json(os.path.join(src, "tokenizer_config.json"), lambda c: c.pop("chat_template"))


def _no_eos(src):
    for name, key in (("config.json", "eos_token_id"), ("generation_config.json", "eos_token_id"),
                      ("tokenizer_config.json", "eos_token")):
        edit_json(os.path.join(src, name), lambda c, key=key: c.pop(key))
    # pad_token names the same token but is not an end id: keep it, the refusal must not rely on it.


def _add_input(src):
    edit_graph(src, lambda m: m.graph.input.append(
        helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])))


def _rename_input(old, new):
    def change(m):
        for v in m.graph.input:
            if v.name == old:
                v.name = new
    return lambda src: edit_graph(src, change)


def _drop_layer(src):
    def change(m):
        for kind in ("key", "value"):
            v = next(v for v in m.graph.input if v.name == f"past_key_values.1.{kind}")
            m.graph.input.remove(v)
    edit_graph(src, change)


def _retype(names, elem_type, outputs=False):
    def change(m):
        for v in (m.graph.output if outputs else m.graph.input):
            if v.name in names:
                v.type.tensor_type.elem_type = elem_type
    return lambda src: edit_graph(src, change)


def _drop_position_ids(src):
    edit_graph(src, lambda m: m.graph.input.remove(next(v for v in m.graph.input if v.name == "position_ids")))


def _domain(src):
    edit_graph(src, lambda m: m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3)))


def _relocate(location):
    def change(m):
        for t in m.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
    return lambda src: edit_graph(src, change)


def _truncate(src):
    path = os.path.join(src, DATA)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)


def _symlink(src):
    target = os.path.join(os.path.dirname(src), "elsewhere.data")
    shutil.move(os.path.join(src, DATA), target)
    os.symlink(target, os.path.join(src, DATA))


def _remove(name):
    return lambda src: os.remove(os.path.join(src, name))


KV_16 = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]

def refusal(name, kind, edit, message):
    return pytest.param(kind, edit, message, id=name)


REFUSALS = [
    # The config against the graph.
    refusal("config-vocab", "optimum", _config("vocab_size", 360),
            r"model.onnx output logits has 359 columns but config.json vocab_size is 360"),
    refusal("config-kv-heads", "optimum", _config("num_key_value_heads", 4),
            r"past_key_values.0.key has 2 in its num_kv_heads dimension, but config.json num_key_value_heads is 4"),
    refusal("config-head-dim", "optimum", _config("head_dim", 8),
            r"has 16 in its head_dim dimension, but config.json head_dim is 8"),
    refusal("config-layers", "optimum", _config("num_hidden_layers", 3),
            r"cache inputs for 2 layers, but config.json num_hidden_layers is 3"),
    refusal("config-not-a-number", "optimum", _config("vocab_size", "many"),
            r"config.json vocab_size must be a positive integer"),
    refusal("genai-vocab", "genai", _genai(("vocab_size",), 358),
            r"logits has 359 columns but genai_config.json model.vocab_size is 358"),
    refusal("genai-kv-heads", "genai", _genai(("decoder", "num_key_value_heads"), 1),
            r"genai_config.json model.decoder.num_key_value_heads is 1"),
    refusal("genai-head-size", "genai", _genai(("decoder", "head_size"), 32),
            r"genai_config.json model.decoder.head_size is 32"),
    refusal("genai-layers", "genai", _genai(("decoder", "num_hidden_layers"), 3),
            r"cache inputs for 2 layers, but genai_config.json model.decoder.num_hidden_layers is 3"),
    refusal("genai-renamed-cache", "genai", _genai(("decoder", "inputs", "past_key_names"), "past.%d.key"),
            r"genai_config.json model.decoder.inputs.past_key_names is 'past.%d.key'"),
    refusal("genai-filename", "genai", _genai(("decoder", "filename"), "decoder.onnx"),
            r"model.decoder.filename is 'decoder.onnx'"),
    refusal("genai-no-context", "genai", _genai(("context_length",), None),
            r"genai_config.json model.context_length is missing"),
    # The text side (hf_tokenizer).
    refusal("no-chat-template", "optimum", _no_chat_template,
            r"no chat template: tokenizer_config.json has no chat_template"),
    refusal("no-eos", "optimum", _no_eos, r"no end-of-sequence id"),
    refusal("genai-eos-not-a-token", "genai", _genai(("eos_token_id",), [400]),
            r"genai_config.json eos_token_id 400 is not a token of tokenizer.json"),
    refusal("no-tokenizer", "optimum", _remove("tokenizer.json"), r"tokenizer.json is missing"),
    # The graph's I/O against the two contracts.
    refusal("unknown-input", "optimum", _add_input,
            r"model.onnx has input 'use_cache_branch', which moat does not feed"),
    refusal("past-misnamed", "genai", _rename_input("past_key_values.1.key", "past_key_values.2.key"),
            r"lacks cache input past_key_values.1.key"),
    refusal("past-missing", "genai", _rename_input("past_key_values.1.key", "past_key_values.1.keys"),
            r"has input 'past_key_values.1.keys'"),
    refusal("past-one-layer-short", "genai", _drop_layer,
            r"cache inputs for 1 layer, but genai_config.json model.decoder.num_hidden_layers is 2"),
    refusal("mixed-kv-types", "optimum", _retype(KV_16, TensorProto.FLOAT16),
            r"output present.0.key is float32 but past_key_values.0.key is float16: one KV cache type"),
    refusal("logits-float16", "genai", _retype({"logits"}, TensorProto.FLOAT16, outputs=True),
            r"output logits is float16; moat reads float32"),
    refusal("input-ids-int32", "genai", _retype({"input_ids"}, TensorProto.INT32),
            r"input input_ids is int32; moat feeds int64"),
    refusal("no-position-ids-no-gqa", "optimum", _drop_position_ids, r"no position_ids input.*GroupQueryAttention"),
    refusal("foreign-domain", "optimum", _domain, r"imports operator domain 'ai.onnx.ml'"),
    # The weights file.
    refusal("data-missing", "genai", _remove(DATA), r"keeps weights in model.onnx.data, which is missing"),
    refusal("data-truncated", "genai", _truncate, r"of model.onnx.data, which has only \d+ bytes"),
    refusal("data-symlink", "genai", _symlink, r"model.onnx.data is a symbolic link"),
    refusal("data-parent-dir", "genai", _relocate("../model.onnx.data"),
            r"reads its data from '../model.onnx.data', which is not a plain relative"),
    refusal("data-absolute", "genai", _relocate("/tmp/model.onnx.data"),
            r"'/tmp/model.onnx.data', which is not a plain relative"),
    # The directory.
    refusal("no-config", "optimum", _remove("config.json"), r"neither genai_config.json .* nor config.json"),
    refusal("no-graph", "optimum", _remove(GRAPH), r"model.onnx is missing"),
]


@pytest.mark.parametrize("kind, edit, message", REFUSALS)
def test_refused(request, kind, edit, message):
    src = request.getfixturevalue(kind)
    edit(src)
    with pytest.raises(ConversionError, match=message):
        run_describe(src)
    assert not os.path.exists(os.path.join(src, "moat-model.json"))


def test_float16_cache_in_an_optimum_graph_is_refused(optimum):
    """A float16 optimum export (optimum-cli --dtype fp16): moatd runs that contract in float32."""
    names = set(KV_16) | {f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    edit_graph(optimum, lambda m: [setattr(v.type.tensor_type, "elem_type", TensorProto.FLOAT16)
                                   for v in list(m.graph.input) + list(m.graph.output) if v.name in names])
    with pytest.raises(ConversionError, match=r"is float16, but moat runs optimum-contract graphs .* in float32 only"):
        run_describe(optimum)


def test_out_must_be_the_export(optimum, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(ConversionError, match=r"--out .* is not the export directory itself"):
        describe_mod.describe(optimum, str(other), log=lambda _line: None)
    assert os.listdir(other) == []
    # The same directory by another spelling is fine.
    describe_mod.describe(optimum, os.path.join(optimum, "."), log=lambda _line: None)


# --- the command line ----------------------------------------------------------------------

def _cli(*args):
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="1")
    return subprocess.run([sys.executable, "-m", "moat_model", "describe", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli(optimum):
    done = _cli(optimum, "--out", optimum, "--name", "from-cli")
    assert done.returncode == 0, done.stderr
    assert metadata.read(optimum)["name"] == "from-cli"
    assert "optimum export, optimum/exact graph" in done.stderr

    os.remove(os.path.join(optimum, "moat-model.json"))
    _config("vocab_size", 360)(optimum)
    done = _cli(optimum, "--out", optimum)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: {optimum}: model.onnx output logits has 359 columns but config.json "
                                   "vocab_size is 360")
    assert not os.path.exists(os.path.join(optimum, "moat-model.json"))
