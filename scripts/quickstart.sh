#!/usr/bin/env bash
# From a fresh clone to an answer over mutual TLS:
#   1. provisions everything (scripts/setup.sh) and builds moatd and moatctl;
#   2. makes a development PKI in .moat-dev/pki (CA, server certificate, a client
#      certificate for the department "demo"), two auditors' age identities in
#      .moat-dev/auditors (on a real appliance they stay on the auditors' machines),
#      .moat-dev/policies (the shipped policy set plus a permit for "demo") and
#      .moat-dev/moat.toml (audit trail in .moat-dev/state);
#   3. makes a bundle signing key (.moat-dev/signing; its public key in
#      .moat-dev/trusted-keys), packs and signs the demo models as bundles
#      (.moat-dev/bundles, from packaging/bundles/*.toml);
#   4. starts moatd in the background on 127.0.0.1 (pid in .moat-dev/moatd.pid, log in
#      .moat-dev/moatd.log), replacing one started earlier, and imports and activates the
#      bundles through its admin socket (they stay active across restarts);
#   5. asks it "What is the capital of France?" with curl and a client certificate.
# moatd keeps running afterwards; the last line printed says how to stop it.
#
# Ports: MOAT_DEV_PORT (API, default 8443) and MOAT_DEV_METRICS_PORT (default 9464). The
# directory: MOAT_DEV_DIR (default .moat-dev in the clone; scripts/test-quickstart.sh runs
# this on a fresh one).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# ONNX Runtime's own telemetry stays off in everything this starts (moatd sets it itself;
# this covers the tools and tests that load the library too).
export ORT_DISABLE_TELEMETRY=1
dev="${MOAT_DEV_DIR:-$root/.moat-dev}"
pki="$dev/pki"
port="${MOAT_DEV_PORT:-8443}"
metrics_port="${MOAT_DEV_METRICS_PORT:-9464}"

bash scripts/setup.sh
echo "==> cargo build --release" >&2
cargo build --release --locked --bin moatd --bin moatctl
moatd="$root/target/release/moatd"
moatctl="$root/target/release/moatctl"

# The moatd started here earlier, if any.
bash scripts/stop-dev-moatd.sh "$dev"

echo "==> development PKI in $dev/pki" >&2
mkdir -p "$dev"
chmod 700 "$dev"
if [ ! -f "$pki/ca.crt" ]; then
  "$moatctl" pki init --dir "$pki" --org "moat dev" >/dev/null
fi
"$moatctl" pki issue-server --dir "$pki" --dns localhost --ip 127.0.0.1 --force >/dev/null
if [ ! -f "$pki/clients/demo.crt" ]; then
  "$moatctl" pki issue-client --dir "$pki" --department demo --name demo >/dev/null
fi
"$moatctl" pki crl --dir "$pki" >/dev/null

echo "==> auditors' keys in $dev/auditors" >&2
mkdir -p "$dev/auditors"
recipients=""
for auditor in auditor-1 auditor-2; do
  if [ ! -f "$dev/auditors/$auditor.key" ]; then
    "$moatctl" audit keygen --out "$dev/auditors/$auditor.key" 2>/dev/null >/dev/null
  fi
  recipient="$(sed -n 's/^# public key: //p' "$dev/auditors/$auditor.key")"
  recipients="$recipients${recipients:+, }\"$recipient\""
done

echo "==> policies in $dev/policies (the shipped set plus a permit for the demo department)" >&2
mkdir -p "$dev/policies"
cp policies/schema.cedarschema policies/policies.cedar policies/moat-policy.toml "$dev/policies/"
cat > "$dev/policies/dev.cedar" <<'EOF_POLICY'
// Development: the department "demo" (the quick start's client certificate) may use every
// model.
@id("dev-demo-uses-every-model")
permit (
  principal in Moat::Department::"demo",
  action in [Moat::Action::"chat", Moat::Action::"complete", Moat::Action::"embed"],
  resource
);
EOF_POLICY

echo "==> signed bundles of the demo models in $dev/bundles" >&2
mkdir -p "$dev/signing" "$dev/trusted-keys" "$dev/bundles"
if [ ! -f "$dev/signing/dev-ml.key" ]; then
  rm -f "$dev/bundles"/*.tar
  "$moatctl" keys generate --out "$dev/signing/dev-ml" --comment "moat development" >/dev/null
fi
cp "$dev/signing/dev-ml.pub" "$dev/trusted-keys/"
bundles=()
for pair in smollm2-135m-instruct:smollm2-135m-instruct-exact all-minilm-l6-v2:all-minilm-l6-v2; do
  name="${pair%%:*}"
  version="$(sed -n 's/^version = "\(.*\)"/\1/p' "packaging/bundles/$name.toml")"
  tar="$dev/bundles/$name-$version.tar"
  if [ ! -f "$tar" ]; then
    "$moatctl" bundle pack "local/models/${pair#*:}" --info "packaging/bundles/$name.toml" --out "$tar" >/dev/null
    "$moatctl" bundle sign "$tar" --key "$dev/signing/dev-ml.key" >/dev/null
  fi
  bundles+=("$name@$version:$tar")
done
cat > "$dev/moat.toml" <<EOF
# Development configuration written by scripts/quickstart.sh (rewritten on each run).
# Start by hand with: target/release/moatd serve --config $dev/moat.toml
[engine]
onnxruntime_library = "$root/local/onnxruntime"

[server]
listen = ["127.0.0.1:$port"]

[tls]
certificate = "pki/server.crt"
private_key = "pki/server.key"
crl = ["pki/crl.pem"]

# The development CA issues every department's certificates, so it may vouch for any
# department. With one CA per department, bind each to its own: departments = ["finance"].
[[tls.client_ca]]
file = "pki/ca.crt"
departments = "*"

[models]
store = "state/models"
trusted_keys = "trusted-keys"

[policy]
directory = "policies"

[metrics]
listen = "127.0.0.1:$metrics_port"

[audit]
state_directory = "state"
node_id = "moat-dev"
recipients = [$recipients]

[admin]
socket = "state/admin.sock"
EOF

echo "==> starting moatd (log: $dev/moatd.log)" >&2
: > "$dev/moatd.log"
setsid nohup "$moatd" serve --config "$dev/moat.toml" >>"$dev/moatd.log" 2>&1 < /dev/null &
echo $! > "$dev/moatd.pid"
pid="$(cat "$dev/moatd.pid")"

for _ in $(seq 1 600); do
  if curl -fsS "http://127.0.0.1:$metrics_port/healthz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "error: moatd exited during start; its log:" >&2
    cat "$dev/moatd.log" >&2
    rm -f "$dev/moatd.pid"
    exit 1
  fi
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$metrics_port/healthz" >/dev/null

socket="$dev/state/admin.sock"
for entry in "${bundles[@]}"; do
  label="${entry%%:*}"
  if ! "$moatctl" model list --json --socket "$socket" | python3 -c '
import json, sys
name, version = sys.argv[1].split("@")
models = json.load(sys.stdin)["models"]
sys.exit(0 if any(m["name"] == name and any(v["version"] == version for v in m["versions"]) for m in models) else 1)
' "$label"; then
    echo "==> importing $label" >&2
    "$moatctl" model import "${entry#*:}" --socket "$socket" >&2
  fi
  if ! "$moatctl" status --json --socket "$socket" | python3 -c '
import json, sys
name, version = sys.argv[1].split("@")
sys.exit(0 if json.load(sys.stdin)["models"].get(name, {}).get("active") == version else 1)
' "$label"; then
    echo "==> activating $label (golden prompts first)" >&2
    "$moatctl" model activate "$label" --socket "$socket" >&2
  fi
done
curl -fsS "http://127.0.0.1:$metrics_port/readyz" >/dev/null

echo "==> asking over mTLS: What is the capital of France?" >&2
curl -sS --fail-with-body \
  --cacert "$pki/ca.crt" --cert "$pki/clients/demo.crt" --key "$pki/clients/demo.key" \
  -H 'content-type: application/json' \
  "https://127.0.0.1:$port/v1/chat/completions" \
  -d '{"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 64,
       "messages": [{"role": "user", "content": "What is the capital of France?"}]}' \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])'

echo "moatd is running on https://127.0.0.1:$port (pid $pid); stop it with: bash scripts/stop-dev-moatd.sh $dev" >&2
echo "read its audit trail: $moatctl audit export --socket $dev/state/admin.sock --out trail.jsonl && $moatctl audit decrypt --identity $dev/auditors/auditor-1.key --format csv trail.jsonl" >&2
