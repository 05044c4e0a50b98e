#!/usr/bin/env bash
# From a fresh clone to an answer: provisions everything (scripts/setup.sh), builds moatd,
# and asks the demo model a question on this machine's CPU (or GPU, when one is usable).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
echo "==> cargo build --release" >&2
cargo build --release --locked --bin moatd
echo "==> moatd generate (SmolLM2-135M-Instruct, exact graph)" >&2
MOAT_ONNXRUNTIME_LIB="$root/local/onnxruntime" target/release/moatd generate \
  --model local/models/smollm2-135m-instruct-exact \
  --chat "What is the capital of France?" --max-tokens 64
