//! Where the ONNX Runtime shared library comes from.
//!
//! moatd never downloads anything: it loads a library that setup or the package put on
//! disk. The first of these that is set wins: the config (`engine.onnxruntime_library`),
//! then `$MOAT_ONNXRUNTIME_LIB`, then the packaged default in `/usr/lib/moat/`. Each may name
//! the library file or a directory holding it.

use std::fmt;
use std::path::{Path, PathBuf};

/// The environment variable that names the library when the config does not.
pub const LIBRARY_ENV: &str = "MOAT_ONNXRUNTIME_LIB";
/// Where the Debian package installs the pinned library.
pub const PACKAGED_LIBRARY_DIR: &str = "/usr/lib/moat";
/// The ONNX Runtime release this build is pinned to and tested with.
pub const PINNED_VERSION: &str = "1.32.0";

/// Which setting named the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibrarySource {
    Config,
    Environment,
    PackagedDefault,
}

impl fmt::Display for LibrarySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LibrarySource::Config => "config engine.onnxruntime_library",
            LibrarySource::Environment => "environment variable MOAT_ONNXRUNTIME_LIB",
            LibrarySource::PackagedDefault => "packaged default /usr/lib/moat/",
        })
    }
}

/// A library file chosen by [`locate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedLibrary {
    pub path: PathBuf,
    pub origin: LibrarySource,
}

/// The ONNX Runtime library could not be found or could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeLibraryError {
    #[error("ONNX Runtime library not found at {path} (from {origin}). {HOW_TO_FIX}")]
    NotFound {
        path: PathBuf,
        origin: LibrarySource,
    },
    #[error(
        "{path} (from {origin}) could not be loaded as ONNX Runtime {PINNED_VERSION}: {reason}. {HOW_TO_FIX}"
    )]
    Unusable {
        path: PathBuf,
        origin: LibrarySource,
        reason: String,
    },
    /// Loading it now would turn its telemetry on.
    #[error(transparent)]
    TelemetryOn(#[from] super::TelemetryOn),
}

const HOW_TO_FIX: &str = "Fix: run `packaging/provision-onnxruntime.sh` (it fetches the pinned \
     onnxruntime==1.32.0 wheel from PyPI and extracts the library into local/onnxruntime/), then \
     set engine.onnxruntime_library in the config or MOAT_ONNXRUNTIME_LIB to that file; on an \
     installed appliance, reinstall the moat package, which ships it in /usr/lib/moat/";

/// Picks the library from the config value, else the environment value, else the packaged
/// default, and checks that the file exists. `env_value` is the value of [`LIBRARY_ENV`]
/// (passed in so that callers and tests decide where it comes from).
pub fn locate(
    configured: Option<&Path>,
    env_value: Option<&std::ffi::OsStr>,
) -> Result<LocatedLibrary, RuntimeLibraryError> {
    let (given, source) = match (configured, env_value.filter(|v| !v.is_empty())) {
        (Some(path), _) => (path.to_path_buf(), LibrarySource::Config),
        (None, Some(env)) => (PathBuf::from(env), LibrarySource::Environment),
        (None, None) => (
            PathBuf::from(PACKAGED_LIBRARY_DIR),
            LibrarySource::PackagedDefault,
        ),
    };
    let path = if given.is_dir() {
        find_in_dir(&given)
    } else {
        given
    };
    if !path.is_file() {
        return Err(RuntimeLibraryError::NotFound {
            path,
            origin: source,
        });
    }
    Ok(LocatedLibrary {
        path,
        origin: source,
    })
}

/// In a directory, prefer the pinned versioned file, then the unversioned name.
fn find_in_dir(dir: &Path) -> PathBuf {
    let pinned = dir.join(format!("libonnxruntime.so.{PINNED_VERSION}"));
    if pinned.is_file() {
        pinned
    } else {
        dir.join("libonnxruntime.so")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_wins_over_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = dir.path().join("libonnxruntime.so.1.32.0");
        std::fs::write(&lib, b"x").expect("write");
        let found = locate(Some(dir.path()), Some("/nowhere".as_ref())).expect("found");
        assert_eq!(found.path, lib);
        assert_eq!(found.origin, LibrarySource::Config);
    }

    #[test]
    fn environment_is_used_when_config_is_silent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = dir.path().join("libonnxruntime.so");
        std::fs::write(&lib, b"x").expect("write");
        let found = locate(None, Some(lib.as_os_str())).expect("found");
        assert_eq!(found.origin, LibrarySource::Environment);
    }

    #[test]
    fn an_empty_environment_value_counts_as_unset() {
        let err = locate(None, Some("".as_ref())).map(|l| l.origin);
        match err {
            Ok(origin) => assert_eq!(origin, LibrarySource::PackagedDefault),
            Err(RuntimeLibraryError::NotFound { origin, .. }) => {
                assert_eq!(origin, LibrarySource::PackagedDefault)
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn missing_library_says_how_to_fix() {
        let err =
            locate(Some(Path::new("/nonexistent/libonnxruntime.so")), None).expect_err("missing");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/libonnxruntime.so"), "{text}");
        assert!(text.contains("provision-onnxruntime.sh"), "{text}");
        assert!(text.contains("config engine.onnxruntime_library"), "{text}");
    }
}
