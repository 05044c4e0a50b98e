//! The hash chain over stored records and the signed checkpoints over the chain.
//!
//! Each stored entry carries the hash `link_hash(previous, sequence, ciphertext)`; changing,
//! removing, reordering or inserting an entry breaks every later link. A checkpoint signs
//! (node, sequence, chain head, time) with the node's ed25519 key, so a chain cannot be
//! recomputed by someone without the key, and a cut-off tail is detected against the last
//! checkpoint.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The "previous hash" of the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// Domain separation: these hashes and signatures mean nothing anywhere else.
const LINK_DOMAIN: &[u8] = b"moat-audit-link-v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"moat-audit-checkpoint-v1\0";

/// The chain hash of node `node_id`'s record `sequence` with body `ciphertext` after
/// `previous`. The node is part of the hash, so records of one node never fit another's
/// chain.
pub fn link_hash(node_id: &str, previous: &[u8; 32], sequence: u64, ciphertext: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(LINK_DOMAIN);
    hasher.update((node_id.len() as u64).to_be_bytes());
    hasher.update(node_id.as_bytes());
    hasher.update(previous);
    hasher.update(sequence.to_be_bytes());
    hasher.update((ciphertext.len() as u64).to_be_bytes());
    hasher.update(ciphertext);
    hasher.finalize().into()
}

/// One stored record: its sequence number, its encrypted body and its chain hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainEntry {
    pub sequence: u64,
    pub ciphertext: Vec<u8>,
    pub hash: [u8; 32],
}

impl ChainEntry {
    /// Node `node_id`'s entry after `previous` (its hash, or [`GENESIS`]).
    pub fn new(node_id: &str, previous: &[u8; 32], sequence: u64, ciphertext: Vec<u8>) -> Self {
        let hash = link_hash(node_id, previous, sequence, &ciphertext);
        Self {
            sequence,
            ciphertext,
            hash,
        }
    }
}

/// A signed statement: node `node_id`'s chain reached `head` at record `sequence` at
/// `unix_time`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub node_id: String,
    pub sequence: u64,
    pub head: [u8; 32],
    pub unix_time: i64,
    #[serde(with = "signature_bytes")]
    pub signature: [u8; 64],
}

/// The exact bytes a checkpoint's signature covers.
pub fn checkpoint_message(
    node_id: &str,
    sequence: u64,
    head: &[u8; 32],
    unix_time: i64,
) -> Vec<u8> {
    let mut message = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + node_id.len() + 56);
    message.extend_from_slice(CHECKPOINT_DOMAIN);
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
        let signature = key.sign(&checkpoint_message(node_id, sequence, &head, unix_time));
        Self {
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
        let message = checkpoint_message(&self.node_id, self.sequence, &self.head, self.unix_time);
        key.verify_strict(&message, &Signature::from_bytes(&self.signature))
            .is_ok()
    }
}

/// Serde for 64-byte signatures (serde derives arrays only up to 32).
mod signature_bytes {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 64], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<[u8; 64], D::Error> {
        let bytes = Vec::<u8>::deserialize(deserializer)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("a signature is 64 bytes"))
    }
}
