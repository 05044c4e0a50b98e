#!/usr/bin/env bash
# Installs the peers of the benchmark (`cargo bench -p moat-daemon --bench peers`) into a
# cache outside the clone, all from PyPI, pinned by version and hash:
#
#   peers/                   onnxruntime-genai and matplotlib (bench/requirements.txt)
#   llama-server-<v>/        llama.cpp's own server (parallel slots, continuous batching),
#                            built for this CPU from the llama.cpp sources that the
#                            llama-cpp-python <v> sdist on PyPI vendors
#
# Slow the first time (~15 min on 2 cores, most of it building llama.cpp), which is why the
# test command never runs it. Idempotent: finished parts are reused. Prints the cache
# directory.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# ONNX Runtime's own telemetry (and onnxruntime-genai's) stays off in everything this starts.
export ORT_DISABLE_TELEMETRY=1
LLAMA_CPP_PYTHON_VERSION="0.3.36"
cache="${MOAT_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moat-bench}"
mkdir -p "$cache"

peers="$cache/peers"
if ! "$peers/bin/python" -c 'import onnxruntime_genai, matplotlib' 2>/dev/null; then
  echo "==> onnxruntime-genai and matplotlib ($peers)" >&2
  rm -rf "$peers"
  python3 -m venv "$peers"
  "$peers/bin/pip" install --quiet --require-hashes --no-deps -r "$root/bench/requirements.txt" >&2
fi

sdist_dir="$cache/downloads"
sdist="$sdist_dir/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  echo "==> llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist" >&2
  mkdir -p "$sdist_dir"
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python --require-hashes \
    -r "$root/bench/llama-cpp-requirements.txt" -d "$sdist_dir" >&2
fi

server="$cache/llama-server-$LLAMA_CPP_PYTHON_VERSION"
if [ ! -x "$server/bin/llama-server" ]; then
  echo "==> llama-server (built from the sdist's llama.cpp, ~12 min)" >&2
  tools="$cache/build-tools"
  if [ ! -x "$tools/bin/cmake" ]; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet --require-hashes --no-deps \
      -r "$root/bench/build-tools-requirements.txt" >&2
  fi
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  tar -xzf "$sdist" -C "$work"
  src="$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  # No web UI (it would be fetched from the network) and no network client.
  "$tools/bin/cmake" -S "$src" -B "$work/build" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$tools/bin/ninja" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  "$tools/bin/cmake" --build "$work/build" --target llama-server -j "$(nproc)" >&2
  mkdir -p "$server/bin"
  cp "$work/build/bin/llama-server" "$server/bin/llama-server"
fi

echo "$cache"
