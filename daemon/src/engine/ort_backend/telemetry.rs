//! ONNX Runtime's own telemetry, kept off.
//!
//! Official ONNX Runtime builds carry a telemetry uploader that is on by default on Linux:
//! when its environment is created it writes a device id and an event queue (process path,
//! OS, CPU model, memory, VM detection) under `$HOME/.cache/Microsoft/DeveloperTools/`, and
//! later tries to upload them. The C API's `DisableTelemetryEvents` comes too late (the
//! environment already exists); only this variable, read when the library initialises,
//! stops all of it. moatd sets it in its own environment before any thread starts, and
//! [`check_switched_off`] refuses to load the library in any process where it is not set.

/// The variable ONNX Runtime reads at initialisation, and the value that turns telemetry off.
pub const TELEMETRY_SWITCH: (&str, &str) = ("ORT_DISABLE_TELEMETRY", "1");

/// Telemetry could not be shown to be off, so ONNX Runtime is not loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "ONNX Runtime is not loaded: its telemetry would be on, because {variable}={found} is not \
     {expected} in this process's environment. moatd sets it itself at start; any other \
     program that loads the engine must set {variable}={expected} before it starts"
)]
pub struct TelemetryOn {
    pub variable: &'static str,
    pub expected: &'static str,
    /// What the environment held instead (`(unset)` when nothing).
    pub found: String,
}

/// Puts [`TELEMETRY_SWITCH`] in this process's environment, so that ONNX Runtime (and
/// every process moatd starts) reads it. Call it first thing in `main`.
///
/// # Safety
///
/// No other thread may exist yet: changing the environment races with any concurrent read
/// of it.
#[allow(unsafe_code)]
pub unsafe fn switch_off_in_environment() -> Result<(), TelemetryOn> {
    let (variable, value) = TELEMETRY_SWITCH;
    // SAFETY: the caller guarantees that this process has a single thread.
    unsafe { std::env::set_var(variable, value) };
    check_switched_off()
}

/// Whether the environment turns ONNX Runtime's telemetry off; checked before the library
/// is loaded, so that no path to ONNX Runtime can forget it.
pub fn check_switched_off() -> Result<(), TelemetryOn> {
    let (variable, expected) = TELEMETRY_SWITCH;
    match std::env::var_os(variable) {
        Some(value) if value == expected => Ok(()),
        other => Err(TelemetryOn {
            variable,
            expected,
            found: other.map_or_else(
                || "(unset)".to_owned(),
                |v| format!("{:?}", v.to_string_lossy()),
            ),
        }),
    }
}
