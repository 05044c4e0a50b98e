"""A model far larger than the memory its handling may take: generated, converted with
external data, packed, signed, imported and served, with the peak memory of each step.

moatctl and moatd stream bundle files through hashing and copying; none is ever held in
memory. `drill` proves it by size: the test suite runs it on a ~400 MB model
(test_large_model.py), `bash scripts/large-model-drill.sh 6` on a 6 GB one. What is measured:

- moatctl's peak resident memory while packing, signing and importing (its high-water mark,
  sampled while it runs);
- moatd's peak resident memory during the import, over what it held before (its high-water
  mark is reset first, through /proc/PID/clear_refs);
- moatd's resident memory once the model is active, over what it held before the import: that
  includes the weights ONNX Runtime holds, reported beside the file sizes, not bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from harness import ONNXRUNTIME, Moatd, binary, moatctl, signing_key, store_config

# The bound on what handling a bundle of any size may add to moatctl or moatd.
STREAMING_BOUND_BYTES = 200 << 20


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int
    heads: int = 16
    kv_heads: int = 4

    def args(self) -> list[str]:
        return ["--layers", str(self.layers), "--hidden", str(self.hidden), "--ffn", str(self.ffn),
                "--heads", str(self.heads), "--kv-heads", str(self.kv_heads)]


# ~110 M parameters: a 450 MB float32 graph, twice the streaming bound.
SUITE = Shape(layers=10, hidden=1024, ffn=2816)
# ~1.5 B parameters: a 6.1 GB float32 graph (the size of a 3 B model in float16).
SIX_GB = Shape(layers=34, hidden=2048, ffn=5632, heads=32, kv_heads=4)


def run_measured(command: list, timeout: float) -> tuple[subprocess.CompletedProcess, int]:
    """Runs a command; returns its result and its peak resident memory in bytes.

    The peak is the kernel's high-water mark of the process's own memory (VmHWM), read every
    10 ms while it runs; it only grows, so the last reading is the peak up to the last 10 ms.
    (wait4's ru_maxrss would not do: it keeps the high-water mark of the Python process the
    child was forked from, before it executed the command.)
    """
    started = time.monotonic()
    peak = 0
    # Output to files, not pipes: nobody reads a pipe while the child runs.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen([str(c) for c in command], stdout=out, stderr=err)
        while process.poll() is None:
            try:
                peak = max(peak, _status_bytes(process.pid, "VmHWM"))
            except (OSError, AssertionError):
                pass  # exited between poll() and the read
            if time.monotonic() - started > timeout:
                process.kill()
                raise AssertionError(f"{command[0]} took longer than {timeout} s")
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if process.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} exited {process.returncode}:\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), peak


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def drill(work: Path, pki, client, shape: Shape, log=print) -> dict:
    python = sys.executable
    checkpoint, model = work / "checkpoint", work / "model"
    figures: dict = {"shape": shape.__dict__}

    started = time.monotonic()
    run_measured([python, "-m", "moat_model.make_checkpoint", "--arch", "llama", "--dtype", "bfloat16",
                  "--out", checkpoint, *shape.args()], timeout=3600)
    figures["checkpoint_seconds"] = round(time.monotonic() - started, 1)
    _, figures["convert_peak_bytes"] = run_measured(
        [python, "-m", "moat_model", "convert", checkpoint, "--out", model, "--variant", "exact",
         "--external-data", "always", "--name", "large"], timeout=3600)
    shutil.rmtree(checkpoint)
    graph, data = model / "model.onnx", model / "model.onnx.data"
    figures["graph_bytes"], figures["external_data_bytes"] = graph.stat().st_size, data.stat().st_size
    log(f"converted: {figures['external_data_bytes'] / 1e9:.2f} GB of external data")

    answer = subprocess.run(
        [binary("moatd"), "generate", "--model", model, "--chat", "Hello", "--max-tokens", "2",
         "--onnxruntime-library", ONNXRUNTIME], capture_output=True, text=True, timeout=3600, check=True)
    (model / "bundle.toml").write_text(
        'name = "large"\nversion = "1.0.0"\ntask = "chat"\nclassification_ceiling = "internal"\n\n'
        '[sampling]\ntemperature = 0.0\n\n'
        f'[[golden]]\nprompt = "Hello"\nexpect = {json.dumps(answer.stdout.removesuffix(chr(10)))}\nmax_tokens = 2\n')
    key, trusted = signing_key(work)

    # Packed and signed as signed_bundle does, each step measured.
    bundle = work / "large-1.0.0.tar"
    started = time.monotonic()
    _, figures["pack_peak_bytes"] = run_measured([binary("moatctl"), "bundle", "pack", model, "--out", bundle], 3600)
    figures["pack_seconds"] = round(time.monotonic() - started, 1)
    shutil.rmtree(model)
    _, figures["sign_peak_bytes"] = run_measured([binary("moatctl"), "bundle", "sign", bundle, "--key", key], 3600)
    figures["bundle_bytes"] = bundle.stat().st_size

    config = store_config(pki, work, trusted)
    socket = ["--socket", config["admin"]["socket"]]
    server = Moatd.start(work / "node", config)
    try:
        pid = server.process.pid
        before = _status_bytes(pid, "VmRSS")
        reset_peak(pid)
        started = time.monotonic()
        _, figures["import_moatctl_peak_bytes"] = run_measured(
            [binary("moatctl"), "model", "import", bundle, *socket], 3600)
        figures["import_seconds"] = round(time.monotonic() - started, 1)
        figures["import_moatd_growth_bytes"] = _status_bytes(pid, "VmHWM") - before
        bundle.unlink()
        started = time.monotonic()
        moatctl("model", "activate", "large@1.0.0", *socket, timeout=3600)
        figures["activate_seconds"] = round(time.monotonic() - started, 1)
        figures["active_moatd_growth_bytes"] = _status_bytes(pid, "VmRSS") - before
        with server.http(pki.ca_cert, client) as http:
            response = http.post("/v1/chat/completions", timeout=600, json={
                "model": "large", "max_tokens": 2, "messages": [{"role": "user", "content": "Hello"}]})
        figures["answered"] = response.status_code == 200 and response.json()["choices"][0]["message"]["content"] \
            == answer.stdout.removesuffix("\n")
    finally:
        server.stop()
    return figures


def over_bound(figures: dict) -> list[str]:
    """The figures that break the streaming bound (empty when all hold)."""
    return [f"{key} = {figures[key] / 2**20:.0f} MiB" for key in
            ("pack_peak_bytes", "sign_peak_bytes", "import_moatctl_peak_bytes", "import_moatd_growth_bytes")
            if figures[key] >= STREAMING_BOUND_BYTES]
