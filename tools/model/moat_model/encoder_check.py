#!/usr/bin/env python3
"""Checks a converted embedding model with onnxruntime (a development tool, not the converter).

    python -m moat_model.encoder_check --model DIR --source DIR [--text TEXT]... [--pair A B]...

Runs the texts through model.onnx as ONE right-padded batch and compares every real token's
hidden state with the numpy reference (reference_encoder.py, each text alone, no padding),
then prints the mean-pooled embeddings' cosine similarity for each --pair. Exits 1 when a
hidden state differs by more than --tolerance (default 1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


import numpy as np  # noqa: E402

from . import ort_telemetry  # noqa: E402, F401  (first: switches ONNX Runtime's telemetry off)
import onnxruntime as ort  # noqa: E402

from .reference_encoder import BertReference  # noqa: E402

DEFAULT_TEXTS = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
    "Hi",
]
DEFAULT_PAIRS = [
    ("A man is playing a guitar.", "Someone is playing an instrument."),
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("A man is playing a guitar.", "The stock market fell sharply on Tuesday."),
    ("How do I reset my password?", "Penguins live in the southern hemisphere."),
]


def run_batch(session: ort.InferenceSession, batch: list[list[int]]) -> np.ndarray:
    width = max(len(ids) for ids in batch)
    ids = np.zeros((len(batch), width), dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, seq in enumerate(batch):
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    (hidden,) = session.run(["last_hidden_state"], feeds)
    return hidden


def pooled(hidden: np.ndarray, n: int, normalize: bool) -> np.ndarray:
    v = hidden[:n].astype(np.float64).mean(axis=0)
    return v / max(np.linalg.norm(v), 1e-12) if normalize else v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="converted model directory")
    ap.add_argument("--source", required=True, help="the BERT directory it was converted from")
    ap.add_argument("--text", action="append", help="texts of the padded batch")
    ap.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"))
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args(argv)
    texts = args.text or DEFAULT_TEXTS
    pairs = args.pair or DEFAULT_PAIRS

    with open(os.path.join(args.model, "moat-model.json"), encoding="utf-8") as f:
        meta = json.load(f)
    ref = BertReference(args.source)
    session = ort.InferenceSession(os.path.join(args.model, "model.onnx"),
                                   providers=["CPUExecutionProvider"])

    batch = [ref.token_ids(t) for t in texts]
    t0 = time.perf_counter()
    hidden = run_batch(session, batch)
    ms = (time.perf_counter() - t0) * 1e3
    worst = 0.0
    for row, ids in enumerate(batch):
        diff = float(np.abs(hidden[row, :len(ids)] - ref.hidden(ids)).max())
        worst = max(worst, diff)
        print(f"row {row}: {len(ids):3d} tokens, max |onnx - numpy| = {diff:.2e}")
    print(f"padded batch of {len(batch)}: {ms:.1f} ms; worst difference {worst:.2e}")

    for a, b in pairs:
        ea, eb = (pooled(run_batch(session, [ids])[0], len(ids), meta["normalize"])
                  for ids in (ref.token_ids(a), ref.token_ids(b)))
        cos = float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))
        print(f"cos = {cos:+.3f}  {a!r} ~ {b!r}")
    if worst > args.tolerance:
        print(f"FAIL: difference {worst:.2e} above {args.tolerance:.0e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
