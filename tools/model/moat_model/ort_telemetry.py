"""ONNX Runtime's telemetry, switched off before the library loads.

Import this module before `onnxruntime` (or `onnxruntime_genai`):

    from moat_model import ort_telemetry  # noqa: F401  (first: switches ONNX Runtime's telemetry off)
    import onnxruntime as ort

Official ONNX Runtime builds collect telemetry by default on Linux: a device id and a queue
of events (process path, OS, CPU model, memory, VM detection) under
$HOME/.cache/Microsoft/DeveloperTools/, uploaded later. Only ORT_DISABLE_TELEMETRY=1 in the
environment before the library initialises stops all of it, so this sets it at import and
stops the program if it cannot: no tool of moat runs ONNX Runtime with its telemetry on.
"""

from __future__ import annotations

import ctypes
import os
import sys

VARIABLE = "ORT_DISABLE_TELEMETRY"
VALUE = "1"
# Modules that start ONNX Runtime when imported: once one is loaded, the switch comes too late.
RUNTIMES = ("onnxruntime", "onnxruntime_genai")


class TelemetryOn(RuntimeError):
    """The switch could not be put where ONNX Runtime reads it."""


def switch_off() -> None:
    """Sets the switch in this process's environment and checks that the C library, which
    ONNX Runtime reads it through, sees it."""
    loaded = [name for name in RUNTIMES if name in sys.modules]
    if loaded:
        raise TelemetryOn(f"{', '.join(loaded)} was imported before ort_telemetry; import "
                          "ort_telemetry first")
    try:
        os.environ[VARIABLE] = VALUE
    except OSError as e:
        raise TelemetryOn(f"cannot set {VARIABLE}: {e}") from e
    getenv = ctypes.CDLL(None).getenv
    getenv.restype = ctypes.c_char_p
    seen = getenv(VARIABLE.encode())
    if seen != VALUE.encode():
        raise TelemetryOn(f"{VARIABLE} reads {seen!r} in the process environment, "
                          f"not {VALUE!r}")


try:
    switch_off()
except TelemetryOn as e:
    sys.exit(f"error: ONNX Runtime's telemetry would be on ({e}); not running")
