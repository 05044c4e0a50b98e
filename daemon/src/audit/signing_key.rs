//! The node's ed25519 key that signs checkpoints and prune markers: from a systemd
//! credential when one is passed, else from the state directory, created there (mode 0600)
//! at first start.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use moat_core::audit::encoding::{decode_signing_key, hex};

use super::AuditError;
use crate::config::{AuditConfig, SIGNING_KEY_CREDENTIAL};

/// Where the key came from (logged at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Credential(PathBuf),
    File(PathBuf),
    Created(PathBuf),
}

/// The key for `config`: the systemd credential `moat-audit-signing-key` if
/// `$CREDENTIALS_DIRECTORY` holds it, else `audit-signing.key` in the state directory,
/// created if absent. A key file others can read is refused.
pub fn load(config: &AuditConfig) -> Result<(SigningKey, KeySource), AuditError> {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    load_from(config, credentials.as_deref())
}

/// [`load`] with the credentials directory given.
pub fn load_from(
    config: &AuditConfig,
    credentials: Option<&Path>,
) -> Result<(SigningKey, KeySource), AuditError> {
    if let Some(dir) = credentials {
        let path = dir.join(SIGNING_KEY_CREDENTIAL);
        if path.exists() {
            // systemd owns the credential's file and its mode.
            let key = read(&path)?;
            return Ok((key, KeySource::Credential(path)));
        }
    }
    let path = config.signing_key_file();
    match std::fs::metadata(&path) {
        Ok(metadata) => {
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(AuditError::Key {
                    path,
                    reason: format!(
                        "its mode is {mode:04o}; others must not read it (chmod 600, owned by moatd's user)"
                    ),
                });
            }
            Ok((read(&path)?, KeySource::File(path)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok((create(&path)?, KeySource::Created(path)))
        }
        Err(e) => Err(AuditError::Key {
            path,
            reason: e.to_string(),
        }),
    }
}

/// Reads a key: 64 hex digits (what moatd writes) or the 32 raw bytes.
fn read(path: &Path) -> Result<SigningKey, AuditError> {
    let bytes = std::fs::read(path).map_err(|e| AuditError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    decode_signing_key(&bytes).ok_or_else(|| AuditError::Key {
        path: path.to_path_buf(),
        reason: "not an ed25519 key: expected 64 hex digits or 32 bytes".into(),
    })
}

/// Creates a new key file, readable by its owner only, synced to disk.
fn create(path: &Path) -> Result<SigningKey, AuditError> {
    let error = |e: std::io::Error| AuditError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(error)?;
    }
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(error)?;
    file.write_all(format!("{}\n", hex(key.as_bytes())).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(error)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(error)?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> AuditConfig {
        toml::from_str(&format!(
            "state_directory = {:?}\nrecipients = []\n",
            dir.display().to_string()
        ))
        .expect("config")
    }

    #[test]
    fn the_key_is_created_once_private_and_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(dir.path());
        let (created, source) = load(&config).expect("created");
        assert!(matches!(source, KeySource::Created(_)));
        let mode = std::fs::metadata(config.signing_key_file())
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (read, source) = load(&config).expect("read");
        assert!(matches!(source, KeySource::File(_)));
        assert_eq!(read.to_bytes(), created.to_bytes());
    }

    #[test]
    fn a_systemd_credential_wins_over_the_state_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(&dir.path().join("state"));
        let credentials = dir.path().join("credentials");
        std::fs::create_dir(&credentials).expect("dir");
        let seed = [9u8; 32];
        std::fs::write(credentials.join(SIGNING_KEY_CREDENTIAL), seed).expect("write");
        let (key, source) = load_from(&config, Some(&credentials)).expect("credential");
        assert_eq!(key.to_bytes(), seed);
        assert!(matches!(source, KeySource::Credential(_)));
        assert!(!config.signing_key_file().exists(), "no key file is made");
        // A credentials directory without the key falls back to the state directory.
        std::fs::remove_file(credentials.join(SIGNING_KEY_CREDENTIAL)).expect("rm");
        let (_, source) = load_from(&config, Some(&credentials)).expect("file");
        assert!(matches!(source, KeySource::Created(_)));
    }

    #[test]
    fn a_key_others_can_read_or_a_malformed_key_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(dir.path());
        load(&config).expect("created");
        let path = config.signing_key_file();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let error = load(&config).expect_err("group-readable key");
        assert!(error.to_string().contains("0640"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&path, "not a key\n").expect("write");
        let error = load(&config).expect_err("malformed key");
        assert!(error.to_string().contains("64 hex digits"), "{error}");
    }
}
