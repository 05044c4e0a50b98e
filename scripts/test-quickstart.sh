#!/usr/bin/env bash
# The README's first command as a new user runs it, so the quick start cannot rot:
# scripts/quickstart.sh on a fresh directory (MOAT_DEV_DIR) and two free ports, which must
# print the demo model's answer to "What is the capital of France?" (Paris). The moatd it
# leaves running is stopped, and the directory removed, whatever happens.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

dev="$(mktemp -d "${TMPDIR:-/tmp}/moat-quickstart.XXXXXX")"
stop() {
  bash scripts/stop-dev-moatd.sh "$dev"
  rm -rf "$dev"
}
trap stop EXIT

# Two ports free now (bound to 0, then released); the quick start binds them at once.
read -r api_port metrics_port < <(python3 -c '
import socket
held = [socket.socket() for _ in range(2)]
for s in held:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in held))
')

answer="$(MOAT_DEV_DIR="$dev" MOAT_DEV_PORT="$api_port" MOAT_DEV_METRICS_PORT="$metrics_port" \
  bash scripts/quickstart.sh)"
printf '    the quick start answered: %s\n' "$answer" >&2
if ! grep -q "Paris" <<<"$answer"; then
  echo "error: the quick start's answer does not name Paris; moatd's log:" >&2
  cat "$dev/moatd.log" >&2
  exit 1
fi
pid="$(cat "$dev/moatd.pid")"
kill -0 "$pid" || { echo "error: the quick start left no moatd running (pid $pid)" >&2; exit 1; }
