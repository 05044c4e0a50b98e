#!/usr/bin/env bash
# The peer benchmark on an NVIDIA GPU. On a machine with the NVIDIA driver (nvidia-smi works):
#
#   bash bench/gpu.sh
#
# 1. runs setup (the pinned runtime for the build, the demo model, the Python tools);
# 2. installs onnxruntime-gpu and the CUDA and cuDNN wheels it loads from PyPI, pinned by
#    version and hash (bench/gpu-requirements.txt), into the bench cache outside the clone;
# 3. makes the demo model's float16 graph (local/models/smollm2-135m-instruct-float16:
#    GroupQueryAttention runs on CUDA only in float16);
# 4. runs `cargo bench -p moat-daemon --bench peers` with moatd and the bare loop on the GPU
#    (`MOAT_BENCH_DEVICE=cuda`, `MOAT_ONNXRUNTIME_LIB` = the GPU build);
# 5. prints decode tokens/s against the memory-bandwidth bound: every decoded token reads all
#    the weights once, so bandwidth / weight bytes is the most a single stream can reach.
#
# MOAT_GPU_BANDWIDTH_GBPS overrides the card's bandwidth when the table below does not know it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# ONNX Runtime's own telemetry (and onnxruntime-genai's) stays off in everything this starts.
export ORT_DISABLE_TELEMETRY=1

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "error: no usable NVIDIA GPU here (nvidia-smi -L failed); install the driver first" >&2
  exit 1
fi

bash scripts/setup.sh

ORT_GPU_VERSION="1.31.1"
cache="${MOAT_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moat-bench}"
gpu="$cache/onnxruntime-gpu-$ORT_GPU_VERSION"
if [ ! -f "$gpu/.installed" ]; then
  echo "==> onnxruntime-gpu $ORT_GPU_VERSION with CUDA and cuDNN wheels ($gpu)" >&2
  rm -rf "$gpu"
  python3 -m venv "$gpu"
  "$gpu/bin/pip" install --quiet --require-hashes --no-deps -r bench/gpu-requirements.txt >&2
  touch "$gpu/.installed"
fi
site="$("$gpu/bin/python" -c 'import os, onnxruntime; print(os.path.dirname(onnxruntime.__file__))')"
library="$site/capi/libonnxruntime.so.$ORT_GPU_VERSION"
# The CUDA libraries come from the nvidia-* wheels, not from a system CUDA install.
cuda_libs="$(find "$(dirname "$site")/nvidia" -maxdepth 2 -type d -name lib | sort | paste -sd:)"

model="smollm2-135m-instruct-float16"
if [ ! -f "local/models/$model/moat-model.json" ]; then
  echo "==> float16 graph of the demo model" >&2
  local/venv/bin/moat-model convert local/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    --out "local/models/$model" --variant float16 --name smollm2-135m-instruct
fi

echo "==> peer benchmark on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" >&2
LD_LIBRARY_PATH="$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
MOAT_ONNXRUNTIME_LIB="$library" MOAT_BENCH_DEVICE=cuda MOAT_BENCH_MODEL="$model" \
  cargo bench -p moat-daemon --bench peers

# Decode reads every weight once per token: bandwidth / weight bytes bounds one stream.
name="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
bandwidth="${MOAT_GPU_BANDWIDTH_GBPS:-}"
if [ -z "$bandwidth" ]; then
  case "$name" in
    *H200*) bandwidth=4800 ;;
    *H100*NVL*) bandwidth=3900 ;;
    *H100*PCIe*) bandwidth=2000 ;;
    *H100*) bandwidth=3350 ;;
    *A100*80GB*) bandwidth=2039 ;;
    *A100*) bandwidth=1555 ;;
    *L40S*|*L40*) bandwidth=864 ;;
    *L4*) bandwidth=300 ;;
    *A10*) bandwidth=600 ;;
    *) bandwidth="" ;;
  esac
fi
weights="$(stat -c %s "local/models/$model/model.onnx")"
local/venv/bin/python - "$root/target/bench/peers.json" "$weights" "$bandwidth" "$name" <<'EOF'
import json, sys
report, weights, bandwidth, name = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if not bandwidth:
    print(f"\n{name}: bandwidth unknown; set MOAT_GPU_BANDWIDTH_GBPS to get the bound")
    raise SystemExit
bound = float(bandwidth) * 1e9 / weights
print(f"\n{name}, {float(bandwidth):.0f} GB/s; weights {weights / 1e6:.1f} MB per token: "
      f"bound {bound:,.0f} tokens/s for one stream")
for engine in report["single_stream"]:
    rate = engine["decode_tokens_per_s"]
    print(f"  {engine['engine']}: {rate:.1f} tok/s, {100 * rate / bound:.2f}% of the bound")
EOF
