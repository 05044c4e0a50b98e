//! One audit record: the plaintext that is encrypted to the auditors before it is stored.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::encoding::hex;

/// What the audit keeps of prompt and answer text (always inside the encrypted body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Retention {
    /// Nothing.
    None,
    /// The SHA-256 of the text: proves what was sent without keeping it.
    #[default]
    Sha256,
    /// The text itself.
    Full,
}

/// Prompt or answer text as the retention policy keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kept", rename_all = "snake_case")]
pub enum RetainedText {
    Sha256 { sha256: String },
    Full { text: String },
}

impl RetainedText {
    /// `text` as `retention` keeps it (`None` keeps nothing).
    pub fn keep(retention: Retention, text: &str) -> Option<Self> {
        match retention {
            Retention::None => None,
            Retention::Sha256 => Some(RetainedText::Sha256 {
                sha256: hex(&Sha256::digest(text.as_bytes())),
            }),
            Retention::Full => Some(RetainedText::Full {
                text: text.to_owned(),
            }),
        }
    }
}

/// A content detector that fired, and how often: never the matched text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub detector: String,
    pub count: usize,
}

/// What the record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A request the policy allowed, written before any inference runs for it: if it
    /// cannot be stored, the request gets 503 and the model never sees the prompt.
    Admission,
    /// A department's request as it ended, allowed or refused: every request has exactly
    /// one, stored before its response is released (for a stream, before its last event).
    Request,
    /// An administrator's or the node's own action (start, stop, policy reload, ...).
    Admin,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Admission => "admission",
            RecordKind::Request => "request",
            RecordKind::Admin => "admin",
        }
    }
}

/// The plaintext body of one record. Field names are the documented JSONL columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub kind: RecordKind,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: i64,
    pub node_id: String,
    pub request_id: String,
    pub department: String,
    pub subject: String,
    pub source_address: String,
    /// `name@version`, empty when the request named no served model.
    pub model: String,
    /// chat, complete, embed, list_models, or the admin action.
    pub action: String,
    /// `allow`, `deny`, or empty when the request was refused before the policy saw it
    /// (malformed, unknown model) or for an admin action that failed.
    pub decision: String,
    /// The policy's stable reason code, or the error code of a request refused before the
    /// policy decided.
    pub reason: String,
    pub classification: String,
    pub findings: Vec<Finding>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: u64,
    /// The HTTP status the client got (499: it went away first); 0 in admission and admin
    /// records.
    pub status: u16,
    pub prompt: Option<RetainedText>,
    pub answer: Option<RetainedText>,
    /// What an admin record is about (the policy files loaded, what a prune removed, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AuditRecord {
    /// The bytes that are encrypted: compact JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data of strings, numbers and enums: serialisation cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_what_it_says() {
        assert_eq!(RetainedText::keep(Retention::None, "secret"), None);
        assert_eq!(
            RetainedText::keep(Retention::Sha256, "abc"),
            Some(RetainedText::Sha256 {
                sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into()
            })
        );
        let full = RetainedText::keep(Retention::Full, "text");
        assert_eq!(
            full,
            Some(RetainedText::Full {
                text: "text".into()
            })
        );
    }

    #[test]
    fn records_round_trip_through_their_bytes() {
        let record = AuditRecord {
            kind: RecordKind::Request,
            unix_ms: 1_795_913_185_000,
            node_id: "node-a".into(),
            request_id: "r1".into(),
            department: "finance".into(),
            subject: "alice".into(),
            source_address: "10.0.0.7".into(),
            model: "smollm2@1.0.0".into(),
            action: "chat".into(),
            decision: "allow".into(),
            reason: "allow".into(),
            classification: "internal".into(),
            findings: vec![Finding {
                detector: "email".into(),
                count: 2,
            }],
            prompt_tokens: 40,
            completion_tokens: 8,
            latency_ms: 120,
            status: 200,
            prompt: RetainedText::keep(Retention::Sha256, "hi"),
            answer: None,
            detail: None,
        };
        assert_eq!(
            AuditRecord::from_bytes(&record.to_bytes()).expect("parses"),
            record
        );
    }
}
