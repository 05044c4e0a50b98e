//! The audit trail: every request's record, encrypted to the auditors, chained, signed at
//! checkpoints, and durable on disk before its answer leaves.
//!
//! - [`store`]: the sled store under the state directory;
//! - [`log`]: the one thread that chains and commits records in groups, signs
//!   checkpoints and prunes, and the async front requests wait on;
//! - [`signing_key`]: the node's checkpoint key.
//!
//! Bodies are age-encrypted to the configured X25519 recipients before they reach the
//! store; moatd holds no identity and cannot read what it stored.

pub mod log;
pub mod reader;
pub mod signing_key;
pub mod store;

use std::io::Write as _;
use std::path::PathBuf;
use std::str::FromStr as _;

pub use log::{AuditLog, AuditSettings};

/// Why the audit trail failed. A request whose record fails is answered 503.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("no auditor recipient is configured: moatd must encrypt every record to at least one")]
    NoRecipients,
    #[error("auditor recipient {index} is not an age X25519 recipient (age1...): {reason}")]
    BadRecipient { index: usize, reason: String },
    #[error("cannot open the audit store in {dir}: {reason}")]
    Open { dir: PathBuf, reason: String },
    #[error(
        "the audit store in {dir} belongs to node {stored:?} (or another signing key), not {configured:?}: keep its node_id and key, or give this node its own state directory"
    )]
    ForeignStore {
        dir: PathBuf,
        stored: String,
        configured: String,
    },
    #[error("the node signing key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the audit store holds a damaged entry at record {sequence}")]
    Damaged { sequence: u64 },
    #[error("cannot encrypt an audit record: {0}")]
    Encrypt(String),
    #[error("cannot write the audit record durably: {0}")]
    Write(String),
    #[error("the audit record was not durable within {0} ms")]
    Timeout(u64),
    #[error("the audit trail is closed")]
    Closed,
}

/// Parses auditor recipients (`age1...`); at least one is required.
pub fn parse_recipients(texts: &[String]) -> Result<Vec<age::x25519::Recipient>, AuditError> {
    if texts.is_empty() {
        return Err(AuditError::NoRecipients);
    }
    texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            age::x25519::Recipient::from_str(text.trim()).map_err(|reason| {
                AuditError::BadRecipient {
                    index,
                    reason: reason.to_string(),
                }
            })
        })
        .collect()
}

/// One age file of `plaintext` for every recipient.
pub fn encrypt(
    recipients: &[age::x25519::Recipient],
    plaintext: &[u8],
) -> Result<Vec<u8>, AuditError> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| AuditError::Encrypt(e.to_string()))?;
    let mut ciphertext = Vec::with_capacity(plaintext.len() + 128 + 128 * recipients.len());
    let mut writer = encryptor
        .wrap_output(&mut ciphertext)
        .map_err(|e| AuditError::Encrypt(e.to_string()))?;
    writer
        .write_all(plaintext)
        .map_err(|e| AuditError::Encrypt(e.to_string()))?;
    // An unfinished age stream does not decrypt.
    writer
        .finish()
        .map_err(|e| AuditError::Encrypt(e.to_string()))?;
    Ok(ciphertext)
}
