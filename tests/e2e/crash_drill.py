"""The audit crash drill, at length: `python tests/e2e/crash_drill.py --runs 100`.

Each run starts moatd on the same audit store, puts it under load and kills it with SIGKILL
at a random moment. At the end the store is exported and verified, and every request a
client saw answered must have its record (the suite runs the same drill 20 times)."""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit_trail import check_every_answer_recorded, crash_drill, records_of  # noqa: E402
from harness import Pki, auditors, server_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moat-crash-drill-") as scratch:
        root = Path(scratch)
        pki = Pki(root / "pki")
        client = pki.issue_client("finance", "drill")
        config = server_config(pki, {"fixture": "fixture-fused"},
                               audit={"checkpoint_every_records": 50})
        started = time.monotonic()
        answered = crash_drill(root / "moatd", config, pki.ca_cert, client, args.runs,
                               seed=args.seed)
        records = records_of(config, auditors(root / "auditors"), root)
        check_every_answer_recorded(records, answered)
        starts = sum(1 for r in records if r["action"] == "node.start")
        assert starts == args.runs, f"{starts} starts recorded for {args.runs} runs"
        print(f"{args.runs} kill -9 runs (seed {args.seed}) in "
              f"{time.monotonic() - started:.0f} s: {len(answered)} answered requests, "
              f"all recorded; {len(records)} records; the chain verifies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
