"""The `moat-model` command line."""

from __future__ import annotations

import argparse
import sys

from . import __doc__ as PACKAGE_DOC, __version__

EPILOG = """examples:
  moat-model convert ./my-finetune --out ./my-finetune-int4 --variant int4-fast
  moat-model check ./my-finetune-int4 --against ./my-finetune
  moat-model describe ./optimum-export --out ./optimum-export
  moat-model convert SmolLM2-135M-Instruct.Q4_1.gguf --out ./smollm2 --name smollm2-135m-instruct

then: moatctl bundle pack DIR ..., moatctl bundle sign, moatctl model import / canary / promote
(docs/bring-your-model.md)."""


def parser() -> argparse.ArgumentParser:
    from .convert import VARIANTS

    ap = argparse.ArgumentParser(prog="moat-model", description=PACKAGE_DOC, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"moat-model {__version__}")
    verbs = ap.add_subparsers(dest="verb", required=True, metavar="VERB")

    c = verbs.add_parser("convert", help="a Hugging Face checkpoint or a GGUF to moat's fused graph",
                         description="Writes model.onnx (+ model.onnx.data), tokenizer.json and moat-model.json.")
    c.add_argument("src", help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer files) "
                               "or a .gguf file")
    c.add_argument("--out", required=True, help="model directory to write (created)")
    c.add_argument("--variant", choices=list(VARIANTS), default="exact",
                   help="exact (default), int4, int4-fast (CPU), float16 / int4-float16 (GPU)")
    c.add_argument("--graph", choices=("fused", "optimum"), default="fused",
                   help="fused (default): ONNX Runtime's fused operators; optimum: standard ops, the I/O of "
                        "an optimum export (exact only)")
    c.add_argument("--name", help="model name in moat-model.json (default: the source's name)")
    c.add_argument("--int4-block", type=int, choices=(32, 64), default=32,
                   help="inputs per int4 quantisation block (default 32)")
    c.add_argument("--int4-minimums", choices=("float", "integer"),
                   help="int4 blocks with a float minimum (Q4_1's form, more accurate; the default of int4) or "
                        "an integer zero point (one plain kernel, faster; the default of int4-fast and "
                        "int4-float16)")
    c.add_argument("--context-length", type=int, help="cap on positions (default: the config's)")
    c.add_argument("--no-chat-template", action="store_true",
                   help="accept a model without a chat template (plain completions only)")
    c.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="weights in model.onnx.data: auto (above 1 GiB), always, never")

    d = verbs.add_parser("describe", help="moat-model.json for an existing ONNX export",
                         description="Reads an optimum-cli or onnxruntime-genai export and writes moat-model.json, "
                                     "after checking that graph, config and tokenizer agree.")
    d.add_argument("src", help="export directory (model.onnx, config files, tokenizer.json)")
    d.add_argument("--out", required=True, help="directory to write moat-model.json to (usually SRC itself)")
    d.add_argument("--name", help="model name (default: the directory's name)")
    d.add_argument("--no-chat-template", action="store_true",
                   help="accept a model without a chat template (plain completions only)")

    k = verbs.add_parser("check", help="a converted model against its checkpoint",
                         description="Runs the graph (ONNX Runtime) and an independent numpy float32 forward pass "
                                     "of the checkpoint on the same prompts; writes DIR/check.json.")
    k.add_argument("dir", help="converted model directory")
    k.add_argument("--against", required=True, help="the checkpoint it was made from (directory or .gguf)")
    k.add_argument("--prompts", help="JSON lines, one {\"text\": ...} per prompt (default: a built-in set)")
    k.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per prompt (default 24)")
    k.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: all cores)")
    k.add_argument("--max-kl", type=float, help="fail (exit 2) when the mean KL divergence is above this")
    k.add_argument("--min-top1", type=float, help="fail (exit 2) when teacher-forced top-1 agreement is below this")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.verb == "convert":
        from .convert import run
    elif args.verb == "describe":
        from .describe import run
    else:
        from .check import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
