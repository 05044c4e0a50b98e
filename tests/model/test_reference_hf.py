"""The Hugging Face checkpoint reference (moat_model.reference_hf) on tiny random checkpoints.

Besides self-consistency (cached pieces against one pass, shards against one file), some
tests change a checkpoint in a way that must not change what it computes (GQA heads
duplicated into full multi-head attention, weights rounded to bfloat16 but stored as
float32) and check that the reference agrees, so a wrong head mapping or dtype decoding
shows up here and not only as a disagreement with the converter.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct
from contextlib import redirect_stdout

import ml_dtypes
import numpy as np
import pytest

from moat_model import make_checkpoint
from moat_model.reference_hf import (
    CheckpointReference,
    apply_rotary,
    main,
    read_checkpoint_tensors,
    rope_inverse_frequencies,
    rotary_tables,
)

PROMPT = [5, 17, 40, 3, 22, 9, 31, 12, 7, 28, 14, 19]


def _checkpoint(tmp_path, arch: str, name: str = "ckpt", **options) -> str:
    out = str(tmp_path / name)
    make_checkpoint.write(out, arch, **options)
    return out


def _write_float32_checkpoint(out: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """A single-file float32 checkpoint, written here rather than by the converter's writer."""
    os.makedirs(out, exist_ok=True)
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(blobs))
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def _config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _edit_config(directory: str, **changes) -> None:
    config = _config(directory)
    config.update(changes)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


VARIANTS = [
    ("llama", {}),
    ("llama", {"tied": False, "rope_scaling": "llama3"}),
    ("llama", {"rope_scaling": "linear"}),
    ("mistral", {}),
    ("mistral", {"sliding_window": 4}),
    ("qwen2", {}),
    ("qwen3", {"tied": False}),
]


@pytest.mark.parametrize("arch,options", VARIANTS, ids=[f"{a}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'plain'}"
                                                       for a, o in VARIANTS])
def test_cached_pieces_match_one_pass(tmp_path, arch, options):
    model = CheckpointReference(_checkpoint(tmp_path, arch, **options))
    whole = model.logits(PROMPT)
    assert whole.shape == (len(PROMPT), model.vocab_size) and whole.dtype == np.float32
    assert np.all(np.isfinite(whole))

    cache = model.new_cache(len(PROMPT))
    pieces = [model.forward(PROMPT[:5], cache)] + [model.forward([t], cache) for t in PROMPT[5:]]
    # The fixture's logits reach ~200 (clear winners), so float32 summation-order noise is
    # ~1e-4 absolute; compare relative to that scale. A cache or position bug moves logits by >0.1.
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_greedy_agrees_with_teacher_forcing(tmp_path):
    model = CheckpointReference(_checkpoint(tmp_path, "qwen3"))
    generated, margins = model.greedy(PROMPT[:6], 8, eos=set())
    assert len(generated) == len(margins) == 8
    assert all(m >= 0 for m in margins)
    forced = model.logits(PROMPT[:6] + generated)
    np.testing.assert_array_equal(forced[5:-1].argmax(axis=-1), generated)
    top2 = np.sort(forced[5:-1], axis=-1)[:, -2:]
    np.testing.assert_allclose(top2[:, 1] - top2[:, 0], margins, atol=1e-4)

    # Stops right after an eos id, which is included.
    stopped, stopped_margins = model.greedy(PROMPT[:6], 8, eos={generated[2]})
    first = generated.index(generated[2])
    assert stopped == generated[:first + 1] and len(stopped_margins) == first + 1
    assert model.greedy(PROMPT[:6], 0, eos=set()) == ([], [])


def test_sharded_and_single_file_agree_exactly(tmp_path):
    single = CheckpointReference(_checkpoint(tmp_path, "qwen2", "one", shards=1, tied=False))
    sharded = CheckpointReference(_checkpoint(tmp_path, "qwen2", "two", shards=2, tied=False))
    np.testing.assert_array_equal(single.logits(PROMPT), sharded.logits(PROMPT))


@pytest.mark.parametrize("dtype,numpy_dtype", [("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)])
def test_half_precision_weights_widen_exactly(tmp_path, dtype, numpy_dtype):
    """A bf16/f16 checkpoint computes exactly what its float32 twin rounded the same way does."""
    full = _checkpoint(tmp_path, "llama", "f32", dtype="float32", tied=False)
    half = _checkpoint(tmp_path, "llama", "half", dtype=dtype, tied=False)
    rounded = {name: t.astype(numpy_dtype).astype(np.float32) for name, t in read_checkpoint_tensors(full).items()}
    half_tensors = read_checkpoint_tensors(half)
    assert sorted(half_tensors) == sorted(rounded)
    for name in rounded:
        np.testing.assert_array_equal(half_tensors[name], rounded[name], err_msg=name)

    twin = str(tmp_path / "rounded")
    _write_float32_checkpoint(twin, _config(half), rounded)
    np.testing.assert_array_equal(CheckpointReference(half).logits(PROMPT), CheckpointReference(twin).logits(PROMPT))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_grouped_query_attention_equals_duplicated_heads(tmp_path, arch):
    """Repeating each kv head for its group of query heads (h -> h // group) must not change anything."""
    source = _checkpoint(tmp_path, arch)
    config = _config(source)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    group = heads // kv_heads
    assert group > 1
    tensors = read_checkpoint_tensors(source)
    for name in list(tensors):
        if any(f"self_attn.{p}_proj." in name for p in "kv"):
            per_head = tensors[name].reshape(kv_heads, head_dim, -1)
            tensors[name] = np.repeat(per_head, group, axis=0).reshape(heads * head_dim, *tensors[name].shape[1:])
    expanded = str(tmp_path / "mha")
    _write_float32_checkpoint(expanded, {**config, "num_key_value_heads": heads}, tensors)
    grouped = CheckpointReference(source).logits(PROMPT)
    np.testing.assert_allclose(CheckpointReference(expanded).logits(PROMPT), grouped,
                               rtol=0, atol=1e-5 * np.abs(grouped).max())


def test_mistral_sliding_window(tmp_path):
    windowed = CheckpointReference(_checkpoint(tmp_path, "mistral", "w4", sliding_window=4))
    unlimited = CheckpointReference(_checkpoint(tmp_path, "mistral", "wnone", sliding_window=None))
    np.testing.assert_array_equal(windowed.logits(PROMPT[:3]), unlimited.logits(PROMPT[:3]))
    long_w, long_u = windowed.logits(PROMPT), unlimited.logits(PROMPT)
    # Positions 0..3 see at most 4 keys, all inside the window; position 4 loses key 0.
    np.testing.assert_array_equal(long_w[:4], long_u[:4])
    assert np.all(np.abs(long_w[4:] - long_u[4:]).max(axis=-1) > 1e-3)


def test_rotary_is_half_split_and_relative():
    head_dim, inv_freq = 8, rope_inverse_frequencies(8, 10000.0, None)
    rng = np.random.default_rng(3)
    q, k = rng.standard_normal((2, 1, 1, head_dim)).astype(np.float32)

    # Element i turns with element i + head_dim/2 by position * inv_freq[i].
    cos, sin = rotary_tables(np.array([5]), inv_freq)
    turned = apply_rotary(q, cos, sin)[0, 0]
    angle = 5 * inv_freq
    x0, x1 = q[0, 0, :4].astype(np.float64), q[0, 0, 4:].astype(np.float64)
    expected = np.concatenate([x0 * np.cos(angle) - x1 * np.sin(angle), x1 * np.cos(angle) + x0 * np.sin(angle)])
    np.testing.assert_allclose(turned, expected, atol=1e-6)

    # q at m against k at n depends only on m - n.
    def score(m, n):
        cq, sq = rotary_tables(np.array([m]), inv_freq)
        ck, sk = rotary_tables(np.array([n]), inv_freq)
        return float(np.sum(apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)))
    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-5)


def test_rope_scaling_frequencies():
    plain = rope_inverse_frequencies(16, 10000.0, None)
    np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(8) / 8))
    np.testing.assert_allclose(rope_inverse_frequencies(16, 10000.0, {"type": "linear", "factor": 4.0}), plain / 4)
    np.testing.assert_array_equal(rope_inverse_frequencies(16, 10000.0, {"rope_type": "default"}), plain)

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    scaled = rope_inverse_frequencies(16, 10000.0, llama3)
    wavelength = 2 * math.pi / plain
    short, long = wavelength < 64 / 4, wavelength > 64 / 1
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long], plain[long] / 8)
    middle = ~short & ~long
    smooth = (64 / wavelength[middle] - 1) / 3
    np.testing.assert_allclose(scaled[middle], (1 - smooth) * plain[middle] / 8 + smooth * plain[middle])


def test_refuses_what_it_does_not_implement(tmp_path):
    source = _checkpoint(tmp_path, "qwen2")
    for changes, named in [({"model_type": "gpt2"}, "gpt2"),
                           ({"use_sliding_window": True}, "use_sliding_window"),
                           ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn")]:
        edited = str(tmp_path / f"edited-{named}")
        shutil.copytree(source, edited)
        _edit_config(edited, **changes)
        with pytest.raises(ValueError, match=named):
            CheckpointReference(edited)

    # A tensor the reference would ignore (qwen2's biases read as llama without attention_bias).
    as_llama = str(tmp_path / "as-llama")
    shutil.copytree(source, as_llama)
    _edit_config(as_llama, model_type="llama")
    with pytest.raises(ValueError, match="q_proj.bias"):
        CheckpointReference(as_llama)


def test_command_line(tmp_path):
    directory = _checkpoint(tmp_path, "mistral")
    expected = CheckpointReference(directory).greedy(PROMPT[:4], 5, eos={2})
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--checkpoint", directory, "--ids", "5,17,40,3", "--max-new-tokens", "5", "--eos", "2"]) == 0
    result = json.loads(out.getvalue())
    assert (result["generated_ids"], result["margins"]) == (expected[0], pytest.approx(expected[1]))


def test_qwen3_head_norms_undo_query_and_key_scale(tmp_path):
    """qwen3 normalises each q and k head, so scaling q_proj and k_proj changes (almost) nothing."""
    source = _checkpoint(tmp_path, "qwen3")
    tensors = read_checkpoint_tensors(source)
    for name in tensors:
        if "q_proj.weight" in name or "k_proj.weight" in name:
            tensors[name] = tensors[name] * np.float32(3.0)
    scaled = str(tmp_path / "scaled")
    _write_float32_checkpoint(scaled, _config(source), tensors)
    original = CheckpointReference(source).logits(PROMPT)
    np.testing.assert_allclose(CheckpointReference(scaled).logits(PROMPT), original,
                               rtol=0, atol=1e-4 * np.abs(original).max())


def test_qwen2_biases_count(tmp_path):
    """Zeroed q/k/v biases equal a bias-free (llama-typed) model; the real ones change the logits."""
    source = _checkpoint(tmp_path, "qwen2")
    tensors = read_checkpoint_tensors(source)
    unbiased = {n: t for n, t in tensors.items() if not n.endswith(".bias")}
    zeroed = {n: (np.zeros_like(t) if n.endswith(".bias") else t) for n, t in tensors.items()}
    assert len(unbiased) < len(tensors)
    llama_config = {**_config(source), "model_type": "llama", "attention_bias": False}
    _write_float32_checkpoint(str(tmp_path / "unbiased"), llama_config, unbiased)
    _write_float32_checkpoint(str(tmp_path / "zeroed"), _config(source), zeroed)
    without = CheckpointReference(str(tmp_path / "unbiased")).logits(PROMPT)
    np.testing.assert_allclose(CheckpointReference(str(tmp_path / "zeroed")).logits(PROMPT), without,
                               rtol=0, atol=1e-5 * np.abs(without).max())
    assert np.abs(CheckpointReference(source).logits(PROMPT) - without).max() > 0.1
