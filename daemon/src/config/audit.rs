//! `[audit]`: where the audit trail lives, who can read it, how often it is signed and how
//! long it is kept.

use std::path::PathBuf;

use moat_core::audit::layout::SIGNING_KEY_FILE;
use serde::Deserialize;

/// `[audit]`, required by `moatd serve`: no audit, no answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The state directory: the store lives in `audit/` under it and, unless a systemd
    /// credential supplies it, the node's signing key in `audit-signing.key`.
    pub state_directory: PathBuf,
    /// The auditors' age X25519 public keys (`age1...`). Every record is encrypted to all
    /// of them; moatd holds no identity and cannot read what it stored. At least one; two
    /// or more, so that losing one key loses nothing.
    pub recipients: Vec<String>,
    /// This node's name in the chain; unset: the host name.
    pub node_id: Option<String>,
    /// A checkpoint is signed after this many records ...
    #[serde(default = "default_checkpoint_records")]
    pub checkpoint_every_records: u64,
    /// ... or this many seconds after the first unsigned record, whichever comes first
    /// (and always at shutdown and before an export).
    #[serde(default = "default_checkpoint_secs")]
    pub checkpoint_every_secs: u64,
    /// Records older than this many days are pruned once a checkpoint covers them; 0 keeps
    /// everything. Age is judged by the newest signed checkpoint's time, never by a clock
    /// more than a day ahead of it: setting the clock forward deletes nothing early.
    #[serde(default)]
    pub retention_days: u64,
    /// How long a request waits for its record to be durable before it gets 503.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
}

/// Name of the systemd credential (`LoadCredential=` / `LoadCredentialEncrypted=`) that
/// holds the node's signing key, read from `$CREDENTIALS_DIRECTORY`.
pub const SIGNING_KEY_CREDENTIAL: &str = "moat-audit-signing-key";

fn default_checkpoint_records() -> u64 {
    1000
}
fn default_checkpoint_secs() -> u64 {
    60
}
fn default_write_timeout_ms() -> u64 {
    1000
}

impl AuditConfig {
    pub fn store_directory(&self) -> PathBuf {
        self.state_directory.join("audit")
    }

    pub fn signing_key_file(&self) -> PathBuf {
        self.state_directory.join(SIGNING_KEY_FILE)
    }

    pub(super) fn problems(&self, problems: &mut Vec<String>) {
        if self.recipients.is_empty() {
            problems.push(
                "audit.recipients: at least one auditor's age public key (age1...) is required"
                    .into(),
            );
        }
        for (index, recipient) in self.recipients.iter().enumerate() {
            if let Err(reason) = recipient.trim().parse::<age::x25519::Recipient>() {
                problems.push(format!(
                    "audit.recipients[{index}]: not an age X25519 public key (age1...): {reason}"
                ));
            }
        }
        if let Some(node) = &self.node_id
            && !valid_node_id(node)
        {
            problems.push(format!(
                "audit.node_id: {node:?} must be 1-64 letters, digits, '.', '-' or '_'"
            ));
        }
        for (name, value, max) in [
            (
                "audit.checkpoint_every_records",
                self.checkpoint_every_records,
                1 << 24,
            ),
            (
                "audit.checkpoint_every_secs",
                self.checkpoint_every_secs,
                86_400,
            ),
            ("audit.write_timeout_ms", self.write_timeout_ms, 60_000),
        ] {
            if value == 0 || value > max {
                problems.push(format!("{name} must be between 1 and {max}, got {value}"));
            }
        }
        if self.retention_days > 36_500 {
            problems.push(format!(
                "audit.retention_days must be at most 36500 (0 keeps everything), got {}",
                self.retention_days
            ));
        }
    }
}

/// A node id fit for chains, file names and logs.
pub fn valid_node_id(node: &str) -> bool {
    (1..=64).contains(&node.len())
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}
