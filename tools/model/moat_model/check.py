"""`moat-model check DIR --against SRC`: does the converted graph compute what the checkpoint does?

Runs the graph in DIR with ONNX Runtime and an independent numpy float32 forward pass of
SRC (reference_hf for a Hugging Face checkpoint, reference for a GGUF; neither shares code
with the converter) on the same prompts, and writes DIR/check.json:

- greedy: each prompt continued greedily by both; how many sequences are identical, how
  many tokens agree, where the first divergence is;
- teacher-forced: both run over the reference's sequence (prompt plus its continuation);
  at every position, whether their top-1 tokens agree, the max and mean absolute logit
  error, and the KL divergence KL(reference || graph) of the next-token distributions.

The exact variant must agree token for token (exit status 2 otherwise); other variants
report their figures, and `--max-kl` / `--min-top1` turn those into gates too.
`moatctl bundle pack` carries check.json into the bundle, so the admin sees the figures.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from . import ort_telemetry  # noqa: F401  (first: switches ONNX Runtime's telemetry off)
import onnxruntime as ort  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from . import metadata  # noqa: E402
from .decoder import ConversionError  # noqa: E402

REPORT = "check.json"
REPORT_FORMAT = 1

# Plain text, so no chat template (and no template engine) is needed: the check compares
# numbers, and any text exercises them. A prompts file may carry rendered chat turns.
DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    ",
    "Q: What is 12 times 7?\nA:",
]


class GraphRunner:
    """The graph in a model directory, run the plain way: exact-length past in, present out."""

    def __init__(self, model_dir: str, threads: int = 0):
        self.meta = metadata.read(model_dir)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.kv_dtype = np.float16 if self.meta.get("kv_dtype") == "float16" else np.float32
        self.layers = int(self.meta["num_layers"])
        self.kv_shape = (1, int(self.meta["num_kv_heads"]), 0, int(self.meta["head_dim"]))

    def new_cache(self) -> dict:
        empty = np.zeros(self.kv_shape, self.kv_dtype)
        return {"len": 0, "kv": [(empty, empty)] * self.layers}

    def forward(self, ids: list[int], cache: dict) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) for ids appended after the cache."""
        past = cache["len"]
        total = past + len(ids)
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, total), np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past, total, dtype=np.int64)[None, :]
        for i, (k, v) in enumerate(cache["kv"]):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k, v
        out = self.session.run(None, feed)
        names = [o.name for o in self.session.get_outputs()]
        got = dict(zip(names, out))
        cache["kv"] = [(got[f"present.{i}.key"], got[f"present.{i}.value"]) for i in range(self.layers)]
        cache["len"] = total
        return np.asarray(got["logits"][0], dtype=np.float32)

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.forward(ids, self.new_cache())

    def greedy(self, ids: list[int], max_new: int, eos: set[int]) -> list[int]:
        cache = self.new_cache()
        logits = self.forward(ids, cache)[-1]
        out: list[int] = []
        for _ in range(max_new):
            best = int(np.argmax(logits))
            out.append(best)
            if best in eos or len(out) == max_new:
                break
            logits = self.forward([best], cache)[-1]
        return out


class GgufReference:
    """reference.LlamaReference (a GGUF's numpy float32 forward pass) behind reference_hf's API."""

    def __init__(self, path: str):
        from .reference import LlamaReference

        self.inner = LlamaReference(path)
        self.vocab_size = self.inner.vocab

    def logits(self, ids: list[int]) -> np.ndarray:
        cache = self.inner.new_cache(len(ids))
        return self.inner.forward(ids, cache, all_positions=True)

    def greedy(self, ids: list[int], max_new: int, eos: set[int]):
        generated, margins, _ = self.inner.greedy(ids, max_new, eos)
        return generated, margins


def reference_for(src: str):
    if os.path.isdir(src):
        from .reference_hf import CheckpointReference

        return CheckpointReference(src)
    return GgufReference(src)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_positions(ref: np.ndarray, got: np.ndarray) -> dict:
    """Per-position figures of two logit matrices [positions, vocab]."""
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    log_p, log_q = log_softmax(ref), log_softmax(got)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return {
        "top1_agree": (ref.argmax(axis=-1) == got.argmax(axis=-1)).tolist(),
        "max_abs": diff.max(axis=-1).tolist(),
        "ref_max_abs": np.abs(ref).max(axis=-1).tolist(),
        "mean_abs": diff.mean(axis=-1).tolist(),
        "kl": np.maximum(kl, 0.0).tolist(),
    }


def read_prompts(path: str | None) -> list[dict]:
    if path is None:
        return [{"text": t} for t in DEFAULT_PROMPTS]
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConversionError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(entry, dict) or not (isinstance(entry.get("text"), str) or isinstance(entry.get("ids"), list)):
                raise ConversionError(f"{path}:{n}: each line must be {{\"text\": ...}} or {{\"ids\": [...]}}")
            prompts.append(entry)
    if not prompts:
        raise ConversionError(f"{path}: no prompts")
    return prompts


def check(model_dir: str, src: str, prompts: list[dict], new_tokens: int = 24, threads: int = 0,
          max_kl: float | None = None, min_top1: float | None = None) -> dict:
    t0 = time.perf_counter()
    graph = GraphRunner(model_dir, threads)
    meta = graph.meta
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    reference = reference_for(src)
    if reference.vocab_size != int(meta["vocab_size"]):
        raise ConversionError(f"the graph has {meta['vocab_size']} vocabulary rows, the checkpoint "
                              f"{reference.vocab_size}: DIR was not made from SRC")
    eos = set(meta.get("eos_token_ids") or [])
    bos = meta.get("bos_token_id") if meta.get("add_bos_token") else None

    per_prompt = []
    positions: dict[str, list] = {"top1_agree": [], "max_abs": [], "ref_max_abs": [], "mean_abs": [], "kl": []}
    for p in prompts:
        ids = list(p["ids"]) if "ids" in p else tokenizer.encode(p["text"], add_special_tokens=False).ids
        if bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        if not ids:
            raise ConversionError("a prompt encodes to no tokens")
        ref_tokens, margins = reference.greedy(ids, new_tokens, eos)
        got_tokens = graph.greedy(ids, new_tokens, eos)
        divergence = next((i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens)) if a != b),
                          None if len(ref_tokens) == len(got_tokens) else min(len(ref_tokens), len(got_tokens)))
        # Teacher forcing on the reference's text: every position of prompt and continuation
        # predicts its next token, the last one (no next token) left out.
        sequence = ids + ref_tokens
        figures = compare_positions(reference.logits(sequence)[:-1], graph.logits(sequence)[:-1])
        for key in positions:
            positions[key] += figures[key]
        per_prompt.append({
            "prompt": p.get("text"),
            "prompt_tokens": len(ids),
            "reference_text": tokenizer.decode(ref_tokens, skip_special_tokens=False),
            "graph_text": tokenizer.decode(got_tokens, skip_special_tokens=False),
            "identical": divergence is None,
            "reference_tokens": len(ref_tokens),
            "agreeing_tokens": len(ref_tokens) if divergence is None else divergence,
            "first_divergence": divergence,
            "min_reference_margin": min(margins) if margins else None,
            "kl_mean": float(np.mean(figures["kl"])),
        })

    identical = sum(r["identical"] for r in per_prompt)
    report = {
        "format": REPORT_FORMAT,
        "model": meta.get("name"),
        "variant": meta.get("variant"),
        "io_contract": meta.get("io_contract"),
        "against": os.path.basename(os.path.abspath(src)),
        "reference": "numpy float32 forward pass of the checkpoint",
        "onnxruntime": ort.__version__,
        "prompts": len(per_prompt),
        "new_tokens": new_tokens,
        "greedy": {
            "identical_sequences": identical,
            "of": len(per_prompt),
            # Tokens equal before the first divergence, over all tokens the reference generated.
            "token_agreement": sum(r["agreeing_tokens"] for r in per_prompt)
            / max(1, sum(r["reference_tokens"] for r in per_prompt)),
        },
        "teacher_forced": {
            "positions": len(positions["kl"]),
            "top1_agreement": float(np.mean(positions["top1_agree"])),
            "max_abs_logit_error": float(np.max(positions["max_abs"])),
            "mean_abs_logit_error": float(np.mean(positions["mean_abs"])),
            # The scale the errors are relative to: logits of trained models reach ~30, of
            # random test checkpoints ~200.
            "max_abs_reference_logit": float(np.max(positions["ref_max_abs"])),
            "kl_mean": float(np.mean(positions["kl"])),
            "kl_max": float(np.max(positions["kl"])),
        },
        "per_prompt": per_prompt,
    }
    failures = []
    if meta.get("variant") == "exact" and identical != len(per_prompt):
        failures.append(f"the exact variant must agree token for token; {len(per_prompt) - identical} of "
                        f"{len(per_prompt)} greedy continuations differ")
    tf = report["teacher_forced"]
    if max_kl is not None and tf["kl_mean"] > max_kl:
        failures.append(f"mean KL divergence {tf['kl_mean']:.4g} is above --max-kl {max_kl}")
    if min_top1 is not None and tf["top1_agreement"] < min_top1:
        failures.append(f"top-1 agreement {tf['top1_agreement']:.4f} is below --min-top1 {min_top1}")
    report["passed"] = not failures
    report["failures"] = failures
    report["seconds"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(model_dir, REPORT), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return report


def summary(report: dict) -> str:
    tf = report["teacher_forced"]
    g = report["greedy"]
    return (f"{report['model']} ({report['variant']}): greedy {g['identical_sequences']}/{g['of']} identical "
            f"({g['token_agreement']:.2%} of tokens before the first divergence); "
            f"teacher-forced over {tf['positions']} positions: top-1 {tf['top1_agreement']:.4f}, "
            f"logit error max {tf['max_abs_logit_error']:.3g} mean {tf['mean_abs_logit_error']:.3g}, "
            f"KL mean {tf['kl_mean']:.3g} max {tf['kl_max']:.3g}")


def run(args) -> int:
    try:
        report = check(args.dir, args.against, read_prompts(args.prompts), args.new_tokens, args.threads,
                       getattr(args, "max_kl", None), getattr(args, "min_top1", None))
    except (ConversionError, ValueError, OSError) as e:
        print(f"error: {args.dir}: {e}", file=sys.stderr)
        return 1
    print(summary(report), file=sys.stderr)
    for failure in report["failures"]:
        print(f"failed: {failure}", file=sys.stderr)
    print(f"wrote {os.path.join(args.dir, REPORT)}", file=sys.stderr)
    return 0 if report["passed"] else 2
