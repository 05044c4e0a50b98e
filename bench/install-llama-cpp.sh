#!/usr/bin/env bash
# Builds llama.cpp's Python binding from its PyPI sdist into a cache outside the clone, so
# the benchmark can compare moat with llama.cpp on the same GGUF. Slow (~13 min on 2 cores),
# which is why the test command never runs it. Idempotent: a finished build is reused.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
cache="${MOAT_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moat-bench}"
venv="$cache/llama-cpp-$LLAMA_CPP_PYTHON_VERSION"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import llama_cpp' 2>/dev/null; then
  echo "$venv"
  exit 0
fi

mkdir -p "$cache"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip >&2
# Built for this CPU (GGML_NATIVE) as llama.cpp's own build would be.
CMAKE_ARGS="-DGGML_NATIVE=ON" "$venv/bin/pip" install --quiet --no-binary llama-cpp-python \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
"$venv/bin/python" -c 'import llama_cpp' >&2
echo "$venv"
