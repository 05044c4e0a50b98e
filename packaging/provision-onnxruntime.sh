#!/usr/bin/env bash
# Puts the pinned ONNX Runtime shared library where moatd can load it, from PyPI only.
#
#   packaging/provision-onnxruntime.sh [DEST]      (default: local/onnxruntime)
#
# The CPU build of ONNX Runtime ships inside the `onnxruntime` wheel; the wheel is a zip, so
# we check its sha256 and extract the two libraries moatd needs. Idempotent: a DEST that
# already holds the pinned library is left alone. Prints DEST's library path.
set -euo pipefail

ORT_VERSION="1.32.0"
ORT_WHEEL="onnxruntime-1.32.0-cp311-cp311-manylinux_2_28_x86_64.whl"
ORT_WHEEL_SHA256="5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/local/onnxruntime}"
lib="$dest/libonnxruntime.so.$ORT_VERSION"

if [ -f "$lib" ] && [ -f "$dest/.wheel-sha256" ] && [ "$(cat "$dest/.wheel-sha256")" = "$ORT_WHEEL_SHA256" ]; then
  echo "$lib"
  exit 0
fi

downloads="$root/local/downloads"
mkdir -p "$downloads" "$dest"
wheel="$downloads/$ORT_WHEEL"
if [ ! -f "$wheel" ] || ! echo "$ORT_WHEEL_SHA256  $wheel" | sha256sum --check --quiet 2>/dev/null; then
  rm -f "$wheel"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp \
    --dest "$downloads" "onnxruntime==$ORT_VERSION" >&2
fi
if ! echo "$ORT_WHEEL_SHA256  $wheel" | sha256sum --check --quiet; then
  echo "error: $wheel does not have the pinned sha256 $ORT_WHEEL_SHA256; refusing to use it" >&2
  exit 1
fi

python3 - "$wheel" "$dest" "$ORT_VERSION" <<'PY'
import sys, zipfile, pathlib
wheel, dest, version = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
wanted = {f"onnxruntime/capi/libonnxruntime.so.{version}", "onnxruntime/capi/libonnxruntime_providers_shared.so"}
with zipfile.ZipFile(wheel) as z:
    found = wanted & set(z.namelist())
    if found != wanted:
        sys.exit(f"error: {wheel} lacks {sorted(wanted - found)}")
    for name in sorted(wanted):
        target = dest / pathlib.Path(name).name
        target.write_bytes(z.read(name))
        target.chmod(0o755)
PY
ln -sf "libonnxruntime.so.$ORT_VERSION" "$dest/libonnxruntime.so"
echo "$ORT_WHEEL_SHA256" > "$dest/.wheel-sha256"
echo "$lib"
