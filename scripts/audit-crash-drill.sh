#!/usr/bin/env bash
# The audit crash drill at length: moatd killed with SIGKILL at random moments under load,
# RUNS times (default 100), on one audit store; then every request a client saw answered
# must have its record and the chain must verify. Needs `bash scripts/setup.sh` first.
set -euo pipefail
cd "$(dirname "$0")/.."
# ONNX Runtime's own telemetry stays off in everything this starts (moatd sets it itself;
# this covers the tools and tests that load the library too).
export ORT_DISABLE_TELEMETRY=1
cargo build --bin moatd --bin moatctl
exec local/venv/bin/python tests/e2e/crash_drill.py --runs "${1:-100}"
