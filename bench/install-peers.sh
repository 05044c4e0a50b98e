#!/usr/bin/env bash
# Installs the peers of the benchmark (`cargo bench -p moat-daemon --bench peers`) into a
# cache outside the clone, all from PyPI, pinned by version and hash:
#
#   peers/                   onnxruntime-genai and matplotlib (bench/requirements.txt)
#   llama-server-<v>-portable/  llama.cpp's own server (parallel slots, continuous batching),
#                            built without AMX for the instruction sets named below
#                            and llama-quantize, built for this CPU from the llama.cpp
#                            sources that the llama-cpp-python <v> sdist on PyPI vendors
#
# With --converters (for `cargo bench -p moat-daemon --bench conversions`), also:
#
#   converters/              torch, transformers 5.x, onnx_ir and onnxruntime-genai
#                            (bench/converters-requirements.txt; ~5.8 GB, CUDA wheels included)
#   llama.cpp-src-<v>/       the sdist's convert_hf_to_gguf.py with its gguf-py
#   conversions/builder-int4/          onnxruntime-genai's model builder, int4 for the CPU
#   conversions/llama.cpp-q4_0.gguf    convert_hf_to_gguf.py (f32), then llama-quantize Q4_0
#
# both made from the demo model's Hugging Face checkpoint (local/models/
# smollm2-135m-instruct-hf, or MOAT_BENCH_CHECKPOINT), offline and, where `unshare` can, in
# a network namespace of their own; redone when the checkpoint's files change.
#
# Slow the first time (~15 min on 2 cores, most of it building llama.cpp; the converters add
# a few GB of downloads and a few minutes), which is why the test command never runs it.
# Idempotent: finished parts are reused. Prints the cache directory.
set -euo pipefail

converters=false
for arg in "$@"; do
  case "$arg" in
    --converters) converters=true ;;
    *) echo "usage: bash bench/install-peers.sh [--converters]" >&2; exit 64 ;;
  esac
done

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

server="$cache/llama-server-$LLAMA_CPP_PYTHON_VERSION-portable"
if [ ! -x "$server/bin/llama-server" ] || [ ! -x "$server/bin/llama-quantize" ]; then
  echo "==> llama-server and llama-quantize (built from the sdist's llama.cpp, ~12 min)" >&2
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
  # Instruction sets named, not GGML_NATIVE: a native build on a Xeon with AMX compiles
  # llama.cpp's AMX path, which crashes (SIGSEGV in ggml_backend_amx_mul_mat) in a VM that
  # does not hand the tile state to guests. AVX2, FMA, F16C and BMI2 always; AVX-512 (F, BW,
  # VL, DQ, CD) with VBMI, VNNI and BF16 where this CPU has all of them (both machine types
  # this project runs on do); AMX never.
  isa=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
       -DGGML_BMI2=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
  has_all() { for f in "$@"; do [[ " $flags " == *" $f "* ]] || return 1; done; }
  if has_all avx512f avx512bw avx512vl avx512dq avx512cd avx512vbmi avx512_vnni avx512_bf16; then
    isa+=(-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON)
  else
    isa+=(-DGGML_AVX512=OFF)
  fi
  echo "    llama.cpp instruction sets: ${isa[*]}" >&2
  "$tools/bin/cmake" -S "$src" -B "$work/build" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$tools/bin/ninja" -DCMAKE_BUILD_TYPE=Release "${isa[@]}" \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
  "$tools/bin/cmake" --build "$work/build" --target llama-server llama-quantize \
    -j "$(nproc)" >&2
  mkdir -p "$server/bin"
  cp "$work/build/bin/llama-server" "$work/build/bin/llama-quantize" "$server/bin/"
fi

if $converters; then
  # Nothing a converter runs may reach the network: the hub is never asked, and where this
  # shell may make a network namespace, none is there to reach.
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
  offline() {
    if unshare --net true 2>/dev/null; then unshare --net "$@"; else "$@"; fi
  }

  conv="$cache/converters"
  if ! "$conv/bin/python" -c 'import torch, transformers, onnx_ir, onnxruntime_genai, yaml, sentencepiece' \
      2>/dev/null; then
    echo "==> converters: torch, transformers, onnxruntime-genai ($conv, ~5.8 GB)" >&2
    wheels="$cache/downloads/converters"
    mkdir -p "$wheels"
    # Wheels already downloaded (and matching their hashes) are not fetched again.
    python3 -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
      -r "$root/bench/converters-requirements.txt" -d "$wheels" >&2
    rm -rf "$conv"
    python3 -m venv "$conv"
    "$conv/bin/pip" install --quiet --no-index --find-links "$wheels" --require-hashes \
      --no-deps -r "$root/bench/converters-requirements.txt" >&2
  fi

  llama_src="$cache/llama.cpp-src-$LLAMA_CPP_PYTHON_VERSION"
  if [ ! -f "$llama_src/convert_hf_to_gguf.py" ]; then
    echo "==> llama.cpp's convert_hf_to_gguf.py and gguf-py (from the sdist)" >&2
    rm -rf "$llama_src"
    mkdir -p "$llama_src"
    vendored="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
    tar -xzf "$sdist" -C "$llama_src" --strip-components=3 "$vendored/convert_hf_to_gguf.py" \
      "$vendored/conversion" "$vendored/gguf-py"
  fi

  checkpoint="${MOAT_BENCH_CHECKPOINT:-$root/local/models/smollm2-135m-instruct-hf}"
  [ -f "$checkpoint/config.json" ] || {
    echo "no Hugging Face checkpoint at $checkpoint: run scripts/setup.sh first" >&2
    exit 1
  }
  # What the conversions were made from: they are redone when this changes.
  key="$(cd "$checkpoint" && sha256sum config.json tokenizer.json ./*.safetensors | sha256sum)"
  conversions="$cache/conversions"
  mkdir -p "$conversions"
  scratch="$(mktemp -d)"
  trap 'rm -rf "${work:-}" "$scratch"' EXIT

  builder="$conversions/builder-int4"
  if [ "$(cat "$builder.key" 2>/dev/null)" != "$key" ]; then
    echo "==> onnxruntime-genai model builder, int4 for the CPU ($builder)" >&2
    rm -rf "$builder" "$builder.key"
    (cd "$scratch" && offline "$conv/bin/python" -m onnxruntime_genai.models.builder \
      -i "$checkpoint" -o "$scratch/builder" -p int4 -e cpu -c "$scratch/builder-cache" >&2)
    mv "$scratch/builder" "$builder"
    echo "$key" >"$builder.key"
  fi

  gguf="$conversions/llama.cpp-q4_0.gguf"
  if [ "$(cat "$gguf.key" 2>/dev/null)" != "$key" ]; then
    echo "==> llama.cpp: convert_hf_to_gguf.py (f32), llama-quantize Q4_0 ($gguf)" >&2
    rm -f "$gguf" "$gguf.key"
    PYTHONPATH="$llama_src/gguf-py" offline "$conv/bin/python" \
      "$llama_src/convert_hf_to_gguf.py" "$checkpoint" --outtype f32 \
      --outfile "$scratch/model-f32.gguf" >&2
    offline "$server/bin/llama-quantize" "$scratch/model-f32.gguf" "$scratch/model-q4_0.gguf" \
      Q4_0 "$(nproc)" >&2
    mv "$scratch/model-q4_0.gguf" "$gguf"
    echo "$key" >"$gguf.key"
  fi
fi

echo "$cache"
