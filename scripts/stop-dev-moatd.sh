#!/usr/bin/env bash
# Stops the moatd that scripts/quickstart.sh started in DIR (its pid in DIR/moatd.pid):
# SIGTERM, then SIGKILL if it has not exited within 15 s. Does nothing when the pid file is
# absent or names a process that is not a moatd (the pid was reused), and removes the file.
#   scripts/stop-dev-moatd.sh DIR
set -euo pipefail

dir="${1:?usage: scripts/stop-dev-moatd.sh DIR}"
pid="$(cat "$dir/moatd.pid" 2>/dev/null || true)"
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
    && grep -q moatd "/proc/$pid/cmdline" 2>/dev/null; then
  echo "==> stopping the moatd started in $dir (pid $pid)" >&2
  kill -TERM "$pid"
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
fi
rm -f "$dir/moatd.pid"
