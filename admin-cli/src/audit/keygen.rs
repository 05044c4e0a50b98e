//! `moatctl audit keygen`: an auditor's age X25519 identity, made on the auditor's machine.
//! The identity stays there; its public key (`age1...`) goes into every node's
//! `[audit] recipients`.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use age::secrecy::ExposeSecret as _;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Error;

/// Writes a new identity to `out` (mode 0600, never over an existing file) and returns
/// its public key.
pub fn run(out: &Path) -> Result<String, Error> {
    let output_error = |source| Error::Output {
        path: out.to_path_buf(),
        source,
    };
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let created = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(output_error)?;
    let text = format!(
        "# moat auditor identity, created {created}\n# public key: {recipient}\n{}\n",
        identity.to_string().expose_secret()
    );
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(output_error)?;
    Ok(recipient)
}
