#!/usr/bin/env bash
# The large-model drill: a synthetic model of about SIZE GB (6 or 0.4; default 6) generated
# as a Hugging Face checkpoint, converted by `moat-model convert` with external data, packed,
# signed, imported into a running moatd, activated and asked once; prints the peak memory of
# moatctl and moatd at each step and fails if handling the bundle took 200 MiB or more.
# Needs `bash scripts/setup.sh` first, and about 3x SIZE GB of free disk (checkpoint, model,
# bundle and store exist one after another) and 2x SIZE GB of memory to serve it.
set -euo pipefail
cd "$(dirname "$0")/.."
export ORT_DISABLE_TELEMETRY=1
cargo build --bin moatd --bin moatctl
exec local/venv/bin/python - "${1:-6}" <<'PY'
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests/e2e")
from harness import Pki
from large_model import SIX_GB, SUITE, drill, over_bound

size = sys.argv[1]
shape = {"6": SIX_GB, "0.4": SUITE}.get(size)
if shape is None:
    sys.exit(f"size {size!r}: 6 or 0.4")
with tempfile.TemporaryDirectory(prefix="moat-large-model-") as scratch:
    work = Path(scratch)
    pki = Pki(work / "pki")
    client = pki.issue_client("ml", "drill")
    figures = drill(work / "drill", pki, client, shape, log=lambda line: print(line, file=sys.stderr))
print(json.dumps(figures, indent=2))
broken = over_bound(figures)
if broken or not figures["answered"]:
    sys.exit(f"failed: {broken or 'no answer'}")
PY
