#!/usr/bin/env bash
# The GPU proof, for an NVIDIA machine without network. Two steps:
#
#   bash bench/gpu.sh prepare      # here, with the registries (after scripts/setup.sh)
#   bash bench/gpu.sh run          # there, from the repository root, offline, <= 6 minutes
#   bash bench/gpu.sh run --cpu    # the same run on this machine's CPU: checks the parts
#
# prepare builds the proof binary (daemon/benches/gpu_proof.rs), records the float32 demo
# graph's greedy continuations of the FACTS prompts on the CPU (the reference), makes the
# demo model's float16 graph (GroupQueryAttention runs on CUDA in float16 only), takes
# libonnxruntime and its CUDA provider out of the onnxruntime-gpu wheel (pinned by hash in
# bench/gpu-requirements.txt), and packs all of it as one xz stream split into parts of at
# most 58 MiB in local/gpu-carry/, with their SHA-256 sums: the provider library alone is
# larger than what one transfer to the lent machine can carry, so the parts travel one per
# call and are joined there.
#
# run joins and checks the parts, finds the CUDA 13 and cuDNN libraries the machine has (the
# nvidia-* Python wheels, or the system's), and prints, as a JSON report and on stderr:
# top-1 agreement of CUDA float16 with the CPU float32 reference over teacher-forced
# positions (goal >= 99%), decode tokens/s of one stream against the HBM bandwidth bound
# (goal >= 50%), aggregate tokens/s at 1, 8, 32 and 64 streams (goal >= 20x one stream at
# 64) and time to first token. MOAT_GPU_BANDWIDTH_GBPS overrides the card's bandwidth when
# the table below does not know it. The report is written to $OUT/gpu-proof.json where OUT
# is set, else to target/bench/gpu-proof.json.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# ONNX Runtime's own telemetry stays off in everything this starts.
export ORT_DISABLE_TELEMETRY=1

ORT_GPU_VERSION="1.31.1"
carry="$root/local/gpu-carry"
part_size="58M"

prepare() {
  local work model reference wheel binary
  work="$(mktemp -d "${TMPDIR:-/tmp}/moat-gpu-prepare.XXXXXX")"
  trap 'rm -rf "$work"' RETURN
  mkdir -p "$work/pack/ort"

  echo "==> the proof binary" >&2
  binary="$(cargo bench -p moat-daemon --bench gpu_proof --no-run --locked \
    --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu_proof" and m.get("executable"):
        print(m["executable"])')"
  [ -x "$binary" ] || { echo "error: the proof binary was not built" >&2; exit 1; }
  cp "$binary" "$work/pack/gpu_proof"
  strip "$work/pack/gpu_proof" 2>/dev/null || true

  echo "==> the CPU float32 reference (local/models/smollm2-135m-instruct-exact)" >&2
  MOAT_BENCH_MODEL_DIR="$root/local/models/smollm2-135m-instruct-exact" \
    "$work/pack/gpu_proof" reference "$work/pack/reference.json"

  echo "==> the demo model's float16 graph" >&2
  model="$work/pack/model"
  local/venv/bin/moat-model convert local/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    --out "$model" --variant float16 --name smollm2-135m-instruct >&2

  echo "==> libonnxruntime $ORT_GPU_VERSION and its CUDA provider, from onnxruntime-gpu" >&2
  grep '^onnxruntime-gpu==' bench/gpu-requirements.txt > "$work/ort-gpu.txt"
  # The wheel for this machine's Python: the libraries inside do not depend on it.
  local/venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps \
    --require-hashes --only-binary=:all: -r "$work/ort-gpu.txt" -d "$work/wheel" >&2
  wheel="$(ls "$work"/wheel/onnxruntime_gpu-*.whl)"
  python3 - "$wheel" "$work/pack/ort" <<'EOF'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
wanted = ("libonnxruntime.so.", "libonnxruntime_providers_cuda.so", "libonnxruntime_providers_shared.so")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if "/capi/" in name and base.startswith(wanted):
            with z.open(name) as src, open(os.path.join(out, base), "wb") as dst:
                dst.write(src.read())
            print(f"    {base}", file=sys.stderr)
EOF
  [ -f "$work/pack/ort/libonnxruntime_providers_cuda.so" ] ||
    { echo "error: the wheel holds no CUDA provider library" >&2; exit 1; }

  echo "==> packing into $carry (parts of at most $part_size)" >&2
  rm -rf "$carry"
  mkdir -p "$carry"
  tar -C "$work/pack" -cf - . | xz -T0 -6 | split -b "$part_size" -d -a 2 - "$carry/gpu-proof.tar.xz.part-"
  (cd "$carry" && sha256sum gpu-proof.tar.xz.part-* > SHA256SUMS)
  echo "carry these, one per call, then run \`bash bench/gpu.sh run\` there:" >&2
  (cd "$carry" && ls -l --block-size=M gpu-proof.tar.xz.part-* SHA256SUMS) >&2
}

# Directories holding the CUDA 13 / cuDNN libraries: the nvidia-* wheels of any Python on
# the machine, else the system's.
cuda_library_dirs() {
  local py dirs=""
  for py in python3 python3.12 python3.11; do
    command -v "$py" >/dev/null || continue
    dirs="$("$py" - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
found = set()
for root in roots:
    for lib in glob.glob(os.path.join(root, "nvidia", "**", "lib"), recursive=True):
        found.add(lib)
print(":".join(sorted(found)))
EOF
)"
    [ -n "$dirs" ] && break
  done
  for system in /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu; do
    [ -d "$system" ] && dirs="${dirs:+$dirs:}$system"
  done
  echo "$dirs"
}

run() {
  local device="cuda" work out report bandwidth name
  [ "${1:-}" = "--cpu" ] && device="cpu"
  [ -f "$carry/SHA256SUMS" ] || { echo "error: no parts in $carry: run \`bash bench/gpu.sh prepare\` and carry them" >&2; exit 1; }
  (cd "$carry" && sha256sum --quiet -c SHA256SUMS) ||
    { echo "error: a part in $carry is missing or damaged" >&2; exit 1; }
  work="$(mktemp -d "${TMPDIR:-/tmp}/moat-gpu-run.XXXXXX")"
  trap 'rm -rf "$work"' RETURN
  cat "$carry"/gpu-proof.tar.xz.part-* | xz -d | tar -C "$work" -xf -

  if [ "$device" = cuda ]; then
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
      echo "error: no usable NVIDIA GPU here (nvidia-smi -L failed); \`run --cpu\` checks the parts on the CPU" >&2
      exit 1
    fi
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
      esac
    fi
    echo "==> the GPU proof on $name (${bandwidth:-unknown} GB/s)" >&2
    export LD_LIBRARY_PATH="$work/ort:$(cuda_library_dirs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  else
    echo "==> the GPU proof's run, on the CPU (a check of the parts, not a GPU figure)" >&2
    bandwidth="${MOAT_GPU_BANDWIDTH_GBPS:-}"
    export LD_LIBRARY_PATH="$work/ort${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  out="${OUT:-$root/target/bench}"
  mkdir -p "$out"
  report="$out/gpu-proof.json"
  MOAT_ONNXRUNTIME_LIB="$(ls "$work"/ort/libonnxruntime.so.*)" \
  MOAT_BENCH_DEVICE="$device" MOAT_BENCH_MODEL_DIR="$work/model" \
  MOAT_GPU_BANDWIDTH_GBPS="$bandwidth" \
    timeout 330 "$work/gpu_proof" measure "$work/reference.json" > "$report"
  echo "report: $report" >&2
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *)
    echo "usage: bash bench/gpu.sh prepare | run [--cpu]" >&2
    exit 2
    ;;
esac
