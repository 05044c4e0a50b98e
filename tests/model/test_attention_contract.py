"""The shapes of run moat's KV pool gives ONNX Runtime's GroupQueryAttention.

The pool (daemon/src/engine/ort_backend/kv_pool.rs) sends three kinds of run, and holds
back a fourth, on the strength of the runtime's contract; these tests hold the runtime to
it, on one attention node with the pool's layout (keys and values shared as past and
present, a slot of `CAPACITY` positions per row, rotary inside):

- several rows of several tokens as a first prompt, nothing cached, shorter rows padded on
  the right (the batched first prompt chunks of new sequences);
- one token per row over each row's own cache length (the batched decode);
- one row of several tokens over a cache (a later prompt chunk, or the rest of a prompt
  after the prefix cache's blocks);
- and not: several rows of several tokens over caches, which is what decode tokens riding
  in a prompt run would need. The runtime refuses it; the day it accepts it, the last test
  fails and the pool can mix them.

The reference for every row is the same row run alone, token by token.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from moat_model import ort_telemetry  # noqa: F401  (first: switches ONNX Runtime's telemetry off)
import onnxruntime as ort  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, CAPACITY = 4, 2, 16, 32


@pytest.fixture(scope="module")
def attention() -> ort.InferenceSession:
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total", "cos", "sin"],
        ["out", "present_k", "present_v"],
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=KV_HEADS,
        do_rotary=1,
    )
    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", "s", HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", "s", KV_HEADS * HEAD_DIM]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", "s", KV_HEADS * HEAD_DIM]),
        helper.make_tensor_value_info(
            "past_k", TensorProto.FLOAT, ["b", KV_HEADS, CAPACITY, HEAD_DIM]
        ),
        helper.make_tensor_value_info(
            "past_v", TensorProto.FLOAT, ["b", KV_HEADS, CAPACITY, HEAD_DIM]
        ),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos", TensorProto.FLOAT, [CAPACITY, HEAD_DIM // 2]),
        helper.make_tensor_value_info("sin", TensorProto.FLOAT, [CAPACITY, HEAD_DIM // 2]),
    ]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        for name in ("out", "present_k", "present_v")
    ]
    graph = helper.make_graph([node], "attention", inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def rotary() -> tuple[np.ndarray, np.ndarray]:
    angles = np.outer(
        np.arange(CAPACITY), 1.0 / 10000 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    )
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def tokens(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Projected inputs for `count` new positions of one row."""
    return {
        "q": rng.standard_normal((count, HEADS * HEAD_DIM)).astype(np.float32),
        "k": rng.standard_normal((count, KV_HEADS * HEAD_DIM)).astype(np.float32),
        "v": rng.standard_normal((count, KV_HEADS * HEAD_DIM)).astype(np.float32),
    }


def run(session, rows, new, cache_k, cache_v, cached, total):
    """One run over `rows` (each a dict of its new positions, padded to `new`)."""
    cos, sin = rotary()
    feeds = {
        name: np.stack([np.pad(r[name], ((0, new - len(r[name])), (0, 0))) for r in rows])
        for name in ("q", "k", "v")
    }
    feeds |= {
        "past_k": cache_k,
        "past_v": cache_v,
        "seqlens_k": np.array(cached, dtype=np.int32),
        "total": np.array(total, dtype=np.int32),
        "cos": cos,
        "sin": sin,
    }
    out, present_k, present_v = session.run(None, feeds)
    return out, present_k, present_v


def alone(session, row):
    """The row's output run one token at a time in a slot of its own."""
    cache_k = np.zeros((1, KV_HEADS, CAPACITY, HEAD_DIM), np.float32)
    cache_v = np.zeros_like(cache_k)
    outs = []
    for i in range(len(row["q"])):
        token = {name: row[name][i : i + 1] for name in ("q", "k", "v")}
        out, cache_k, cache_v = run(session, [token], 1, cache_k, cache_v, [i], i + 1)
        outs.append(out[0, 0])
    return np.stack(outs), cache_k[0], cache_v[0]


def empty(batch: int) -> tuple[np.ndarray, np.ndarray]:
    cache = np.zeros((batch, KV_HEADS, CAPACITY, HEAD_DIM), np.float32)
    return cache, cache.copy()


def test_rows_of_a_first_prompt_padded_on_the_right_answer_as_alone(attention):
    rng = np.random.default_rng(1)
    rows = [tokens(rng, n) for n in (5, 2, 4)]
    cache_k, cache_v = empty(len(rows))
    # As the pool feeds it: the mask counts each row's real tokens, the run's width is
    # the longest row's.
    out, _, _ = run(attention, rows, 5, cache_k, cache_v, [len(r["q"]) - 1 for r in rows], 5)
    for index, row in enumerate(rows):
        expected, _, _ = alone(attention, row)
        np.testing.assert_allclose(out[index, : len(row["q"])], expected, atol=1e-5)


def test_one_token_per_row_over_each_rows_own_cache_answers_as_alone(attention):
    rng = np.random.default_rng(2)
    rows = [tokens(rng, n) for n in (6, 3, 1)]
    cache_k, cache_v = empty(len(rows))
    expected = []
    for index, row in enumerate(rows):
        outs, k, v = alone(attention, row)
        expected.append(outs[-1])
        # Everything but the last token cached, as the pool holds it.
        cache_k[index], cache_v[index] = k, v
    last = [{name: row[name][-1:] for name in ("q", "k", "v")} for row in rows]
    cached = [len(row["q"]) - 1 for row in rows]
    out, _, _ = run(attention, last, 1, cache_k, cache_v, cached, max(cached) + 1)
    for index in range(len(rows)):
        np.testing.assert_allclose(out[index, 0], expected[index], atol=1e-5)


def test_one_row_of_several_tokens_over_its_cache_answers_as_alone(attention):
    rng = np.random.default_rng(3)
    row = tokens(rng, 7)
    expected, _, _ = alone(attention, row)
    head = {name: row[name][:4] for name in ("q", "k", "v")}
    tail = {name: row[name][4:] for name in ("q", "k", "v")}
    cache_k, cache_v = empty(1)
    _, cache_k, cache_v = run(attention, [head], 4, cache_k, cache_v, [3], 4)
    out, _, _ = run(attention, [tail], 3, cache_k, cache_v, [6], 7)
    np.testing.assert_allclose(out[0], expected[4:], atol=1e-5)


def test_several_rows_of_several_tokens_over_caches_are_refused(attention):
    rng = np.random.default_rng(4)
    # A row decoding its fifth token beside a new row's three-token prompt.
    rows = [tokens(rng, 1), tokens(rng, 3)]
    cache_k, cache_v = empty(2)
    with pytest.raises(Exception, match="batch_size must be 1 when sequence_length > 1"):
        run(attention, rows, 3, cache_k, cache_v, [4 + 3 - 1, 3 - 1], 4 + 3)
