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

# How much room the run starts with, in the log: a full run needs about 10 GiB free beside
# the clone (build trees, the model files, the package test's chroot).
df -h "$root" | sed 's/^/    /' >&2

bash scripts/setup.sh
# The package test's tools and chroot base come from the registries now, with the rest of
# the set-up, not while the tests run (it needs root, as CI is).
if [ "$(id -u)" = 0 ]; then
  bash scripts/provision-packaging.sh
fi
echo "==> model tool tests (tests/model)" >&2
PYTHONPATH=tests local/venv/bin/python -m pytest -q -rs -p no_quiet_skips \
  -o tmp_path_retention_policy=failed tests/model
echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test" >&2
cargo test --workspace --locked
echo "==> end-to-end tests (tests/e2e)" >&2
cargo build --locked --bin moatd --bin moatctl
# Test directories are kept only for tests that failed: the passing ones hold stores and
# model copies worth half a gigabyte per run.
PYTHONPATH=tests local/venv/bin/python -m pytest -q -rs -p no_quiet_skips \
  -o tmp_path_retention_policy=failed tests/e2e
# The quick start and the package are built in release; nothing after this reads the debug
# build tree. Where the disk is short it goes, so that the release build and the chroot fit
# beside it.
free_kib="$(df -Pk "$root" | awk 'NR == 2 { print $4 }')"
debug_tree="$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug"
if [ "$free_kib" -lt $((12 * 1024 * 1024)) ] && [ -d "$debug_tree" ]; then
  echo "    under 12 GiB free: removing the debug build tree $debug_tree" >&2
  rm -rf "$debug_tree"
fi
echo "==> the quick start, on a fresh directory (scripts/test-quickstart.sh)" >&2
bash scripts/test-quickstart.sh
echo "==> the Debian package (scripts/test-package.sh)" >&2
if [ "$(id -u)" = 0 ]; then
  bash scripts/test-package.sh
elif [ "${CI:-}" = true ]; then
  echo "error: the package test needs root (debootstrap, chroot, mount), and CI=true runs every check" >&2
  exit 1
else
  # debootstrap, chroot and mount need root; CI runs as root.
  echo "    skipped: building and installing the package in a chroot needs root" >&2
fi
echo "==> all checks passed" >&2
