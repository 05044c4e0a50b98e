//! The hash chain over stored records and the signed checkpoints over the chain.
//!
//! Each stored entry carries the hash `link_hash(node, previous, sequence, time,
//! ciphertext)`; changing, removing, reordering or inserting an entry breaks every later
//! link. A checkpoint signs (node, sequence, chain head, time) with the node's ed25519 key,
//! so a chain cannot be recomputed by someone without the key, and a cut-off tail is
//! detected against the last checkpoint. A prune marker is a checkpoint of another kind: it
//! says the records up to its sequence were removed on purpose, and its head is where the
//! remaining chain continues from.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The "previous hash" of the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// Domain separation: these hashes and signatures mean nothing anywhere else.
const LINK_DOMAIN: &[u8] = b"moat-audit-link-v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"moat-audit-checkpoint-v1\0";

/// The chain hash of node `node_id`'s record `sequence`, stored at `unix_ms`, with body
/// `ciphertext`, after `previous`. The node is part of the hash, so records of one node
/// never fit another's chain; the time is, so that time ranges cannot be shifted.
pub fn link_hash(
    node_id: &str,
    previous: &[u8; 32],
    sequence: u64,
    unix_ms: i64,
    ciphertext: &[u8],
) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(LINK_DOMAIN);
    hasher.update((node_id.len() as u64).to_be_bytes());
    hasher.update(node_id.as_bytes());
    hasher.update(previous);
    hasher.update(sequence.to_be_bytes());
    hasher.update(unix_ms.to_be_bytes());
    hasher.update((ciphertext.len() as u64).to_be_bytes());
    hasher.update(ciphertext);
    hasher.finalize().into()
}

/// One stored record: its sequence number, when it was stored (the only plaintext besides
/// the sequence, so that time ranges can be exported without decrypting), its encrypted
/// body and its chain hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainEntry {
    pub sequence: u64,
    pub unix_ms: i64,
    #[serde(with = "crate::audit::encoding::base64_bytes")]
    pub ciphertext: Vec<u8>,
    #[serde(with = "crate::audit::encoding::hex_array")]
    pub hash: [u8; 32],
}

impl ChainEntry {
    /// Node `node_id`'s entry after `previous` (its hash, or [`GENESIS`]).
    pub fn new(
        node_id: &str,
        previous: &[u8; 32],
        sequence: u64,
        unix_ms: i64,
        ciphertext: Vec<u8>,
    ) -> Self {
        let hash = link_hash(node_id, previous, sequence, unix_ms, &ciphertext);
        Self {
            sequence,
            unix_ms,
            ciphertext,
            hash,
        }
    }

    /// Whether the stored hash is the link from `previous` (`node_id`'s chain).
    pub fn links_to(&self, node_id: &str, previous: &[u8; 32]) -> bool {
        link_hash(
            node_id,
            previous,
            self.sequence,
            self.unix_ms,
            &self.ciphertext,
        ) == self.hash
    }
}

/// A point of a node's chain: a record's sequence number and its chain hash. Written
/// `SEQUENCE:HASH` (the hash in hex), as an auditor notes a head down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainPoint {
    pub sequence: u64,
    #[serde(with = "crate::audit::encoding::hex_array")]
    pub hash: [u8; 32],
}

impl ChainPoint {
    /// The point `entry` puts on the chain.
    pub fn of(entry: &ChainEntry) -> Self {
        Self {
            sequence: entry.sequence,
            hash: entry.hash,
        }
    }
}

impl std::fmt::Display for ChainPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}",
            self.sequence,
            crate::audit::encoding::hex(&self.hash)
        )
    }
}

impl std::str::FromStr for ChainPoint {
    type Err = &'static str;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        const EXPECTED: &str = "a chain head is SEQUENCE:HASH, the hash 64 hex digits";
        let (sequence, hash) = text.trim().split_once(':').ok_or(EXPECTED)?;
        Ok(Self {
            sequence: sequence.parse().map_err(|_| EXPECTED)?,
            hash: crate::audit::encoding::unhex(hash).ok_or(EXPECTED)?,
        })
    }
}

/// What a signed head says about the records up to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// The chain reached this head: nothing up to here may change or go missing.
    #[default]
    Checkpoint,
    /// The records up to here were removed on purpose (retention); the chain goes on from
    /// this head.
    Prune,
}

/// A signed statement: node `node_id`'s chain reached `head` at record `sequence` at
/// `unix_time` (seconds), or, for a prune marker, was pruned through it then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    #[serde(default)]
    pub kind: CheckpointKind,
    pub node_id: String,
    pub sequence: u64,
    #[serde(with = "crate::audit::encoding::hex_array")]
    pub head: [u8; 32],
    pub unix_time: i64,
    #[serde(with = "crate::audit::encoding::hex_array")]
    pub signature: [u8; 64],
}

/// The exact bytes a checkpoint's signature covers.
pub fn checkpoint_message(
    kind: CheckpointKind,
    node_id: &str,
    sequence: u64,
    head: &[u8; 32],
    unix_time: i64,
) -> Vec<u8> {
    let mut message = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + node_id.len() + 57);
    message.extend_from_slice(CHECKPOINT_DOMAIN);
    message.push(match kind {
        CheckpointKind::Checkpoint => 0,
        CheckpointKind::Prune => 1,
    });
    message.extend_from_slice(&(node_id.len() as u64).to_be_bytes());
    message.extend_from_slice(node_id.as_bytes());
    message.extend_from_slice(&sequence.to_be_bytes());
    message.extend_from_slice(head);
    message.extend_from_slice(&unix_time.to_be_bytes());
    message
}

impl Checkpoint {
    /// Signs a checkpoint with the node's key.
    pub fn sign(
        key: &SigningKey,
        node_id: &str,
        sequence: u64,
        head: [u8; 32],
        unix_time: i64,
    ) -> Self {
        Self::sign_kind(
            CheckpointKind::Checkpoint,
            key,
            node_id,
            sequence,
            head,
            unix_time,
        )
    }

    /// Signs a checkpoint of `kind` with the node's key.
    pub fn sign_kind(
        kind: CheckpointKind,
        key: &SigningKey,
        node_id: &str,
        sequence: u64,
        head: [u8; 32],
        unix_time: i64,
    ) -> Self {
        let message = checkpoint_message(kind, node_id, sequence, &head, unix_time);
        let signature = key.sign(&message);
        Self {
            kind,
            node_id: node_id.to_owned(),
            sequence,
            head,
            unix_time,
            signature: signature.to_bytes(),
        }
    }

    /// Whether the signature is the node key's over this checkpoint (strict verification:
    /// no malleable encodings).
    pub fn is_signed_by(&self, key: &VerifyingKey) -> bool {
        let message = checkpoint_message(
            self.kind,
            &self.node_id,
            self.sequence,
            &self.head,
            self.unix_time,
        );
        key.verify_strict(&message, &Signature::from_bytes(&self.signature))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_point_is_written_and_read_as_sequence_and_hash() {
        let point = ChainPoint {
            sequence: 41,
            hash: [0xab; 32],
        };
        let text = point.to_string();
        assert_eq!(text, format!("41:{}", "ab".repeat(32)));
        assert_eq!(text.parse(), Ok(point));
        for bad in ["41", "x:ab", "41:abcd", &format!("-1:{}", "ab".repeat(32))] {
            assert!(bad.parse::<ChainPoint>().is_err(), "{bad}");
        }
    }
}
