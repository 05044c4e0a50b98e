#!/usr/bin/env python3
"""Draws the peer benchmark's results (target/bench/peers.json) as one PNG.

    python bench/plot_peers.py target/bench/peers.json target/bench/peers.png

Left: single-stream decode tokens/s per engine. Right: aggregate tokens/s against concurrent
streams for moatd and llama-server. Runs in the `peers` environment of
bench/install-peers.sh (matplotlib).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        report = json.load(f)

    fig, (single, load) = plt.subplots(1, 2, figsize=(13, 5))
    engines = report["single_stream"]
    names = [e["engine"] for e in engines]
    rates = [e["decode_tokens_per_s"] for e in engines]
    colours = ["tab:blue" if n.startswith("moatd") else "tab:gray" for n in names]
    bars = single.barh(names, rates, color=colours)
    single.bar_label(bars, fmt="%.0f", padding=3)
    single.invert_yaxis()
    single.set_xlabel("decode tokens/s, one stream")
    single.set_title("Single stream")

    for server, style in (("moatd", "o-"), ("llama-server", "s--")):
        points = report["concurrency"].get(server) or []
        if points:
            load.plot([p["streams"] for p in points], [p["tokens_per_s"] for p in points],
                      style, label=server)
    load.set_xscale("log", base=2)
    load.set_xticks([1, 4, 16, 32], labels=["1", "4", "16", "32"])
    load.set_xlabel("concurrent streams")
    load.set_ylabel("aggregate tokens/s")
    load.set_title(f"{report['concurrency']['tokens_per_answer']} tokens per answer")
    load.legend()
    load.grid(alpha=0.3)

    fig.suptitle(f"{report['model']} on {report['machine']} ({report['device']}, "
                 f"{report['threads']} threads)")
    fig.tight_layout()
    fig.savefig(argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
