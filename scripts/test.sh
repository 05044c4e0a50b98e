#!/usr/bin/env bash
# Runs every check moat has, on a fresh clone: provisions what the tests need (setup is
# idempotent), then formatting, lints, the whole test-suite on the real ONNX Runtime with
# the real demo model and the fixture models, and the Debian package installed, upgraded and
# purged in a clean Debian 12 chroot.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# A one-shot run gains nothing from incremental compilation, whose caches would add
# gigabytes to the build tree; set CARGO_INCREMENTAL=1 to keep them between runs.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# ONNX Runtime's own telemetry stays off in everything this starts: moatd sets it itself, this
# covers the test binaries and tools that load the library too. The telemetry test runs moatd
# without it, to prove moatd needs nobody to set it.
export ORT_DISABLE_TELEMETRY=1

bash scripts/setup.sh
# The package test's tools and chroot base come from the registries now, with the rest of
# the set-up, not while the tests run (it needs root, as CI is).
if [ "$(id -u)" = 0 ]; then
  bash scripts/provision-packaging.sh
fi
echo "==> model tool tests (tests/model)" >&2
local/venv/bin/python -m pytest -q tests/model
echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test" >&2
cargo test --workspace --locked
echo "==> end-to-end tests (tests/e2e)" >&2
cargo build --locked --bin moatd --bin moatctl
local/venv/bin/python -m pytest -q tests/e2e
echo "==> the Debian package (scripts/test-package.sh)" >&2
if [ "$(id -u)" = 0 ]; then
  bash scripts/test-package.sh
else
  # debootstrap, chroot and mount need root; CI runs as root.
  echo "    skipped: building and installing the package in a chroot needs root" >&2
fi
echo "==> all checks passed" >&2
