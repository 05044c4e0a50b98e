#!/usr/bin/env bash
# Runs every check moat has, on a fresh clone: provisions what the tests need (setup is
# idempotent), then formatting, lints, and the whole test-suite on the real ONNX Runtime
# with the real demo model and the fixture models.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# A one-shot run gains nothing from incremental compilation, whose caches would add
# gigabytes to the build tree; set CARGO_INCREMENTAL=1 to keep them between runs.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

bash scripts/setup.sh
echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test" >&2
cargo test --workspace --locked
echo "==> end-to-end tests (tests/e2e)" >&2
cargo build --locked --bin moatd --bin moatctl
local/venv/bin/python -m pytest -q tests/e2e
echo "==> all checks passed" >&2
