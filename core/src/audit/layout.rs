//! How moatd lays the audit trail out in its sled store, shared with moatctl, which reads
//! a stopped node's store directly.
//!
//! Tree [`RECORDS`] maps the big-endian sequence number to `unix_ms (8, big-endian) ||
//! hash (32) || ciphertext`; tree [`CHECKPOINTS`] maps the big-endian sequence number to a
//! JSON [`Checkpoint`]; tree [`META`] holds the node's identity ([`NODE_KEY`]: JSON
//! [`NodeInfo`]) and the latest prune marker ([`PRUNE_KEY`]: JSON [`Checkpoint`] of kind
//! prune).

use serde::{Deserialize, Serialize};

use super::chain::{ChainEntry, Checkpoint};

pub const RECORDS: &str = "records";
pub const CHECKPOINTS: &str = "checkpoints";
pub const META: &str = "meta";
pub const NODE_KEY: &str = "node";
pub const PRUNE_KEY: &str = "prune";

/// The node's checkpoint signing key, in moatd's state directory beside the store: moatd
/// writes it, moatctl's offline export reads it there.
pub const SIGNING_KEY_FILE: &str = "audit-signing.key";

const HEADER: usize = 8 + 32;

/// Whether `file_name`, in the store's directory, is a snapshot sled began and never
/// finished. sled writes `snap.<lsn>.generating` and renames it when complete; one left
/// behind (a full disk or a crash mid-write) is never authoritative, yet sled 0.34 refuses
/// to open a store that has one ("Read corrupted data"). The log it summarises is intact,
/// so such a file is removed before the store is opened.
pub fn is_unfinished_snapshot(file_name: &str) -> bool {
    file_name.starts_with("snap.") && file_name.ends_with(".generating")
}

/// Who wrote the store: the node id and the public half of its checkpoint key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: String,
    #[serde(with = "super::encoding::hex_array")]
    pub public_key: [u8; 32],
}

/// The stored value of an entry (its key is the sequence number).
pub fn encode_entry(entry: &ChainEntry) -> Vec<u8> {
    let mut value = Vec::with_capacity(HEADER + entry.ciphertext.len());
    value.extend_from_slice(&entry.unix_ms.to_be_bytes());
    value.extend_from_slice(&entry.hash);
    value.extend_from_slice(&entry.ciphertext);
    value
}

/// The entry stored under `key` as `value`, or `None` when either is malformed.
pub fn decode_entry(key: &[u8], value: &[u8]) -> Option<ChainEntry> {
    let sequence = decode_sequence(key)?;
    let unix_ms = i64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let hash = value.get(8..HEADER)?.try_into().ok()?;
    Some(ChainEntry {
        sequence,
        unix_ms,
        ciphertext: value.get(HEADER..)?.to_vec(),
        hash,
    })
}

/// The key of record or checkpoint `sequence`: big-endian, so sled's order is the chain's.
pub fn sequence_key(sequence: u64) -> [u8; 8] {
    sequence.to_be_bytes()
}

pub fn decode_sequence(key: &[u8]) -> Option<u64> {
    key.try_into().ok().map(u64::from_be_bytes)
}

/// A stored checkpoint, or `None` when it is malformed.
pub fn decode_checkpoint(value: &[u8]) -> Option<Checkpoint> {
    serde_json::from_slice(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::GENESIS;

    #[test]
    fn only_unfinished_snapshots_are_named_unfinished() {
        assert!(is_unfinished_snapshot("snap.000000000007DA24.generating"));
        assert!(!is_unfinished_snapshot("snap.000000000007DA24"));
        assert!(!is_unfinished_snapshot("db"));
    }

    #[test]
    fn entries_round_trip_and_malformed_values_are_refused() {
        let entry = ChainEntry::new("node-a", &GENESIS, 7, 1_795_913_185_000, vec![1, 2, 3]);
        let value = encode_entry(&entry);
        assert_eq!(decode_entry(&sequence_key(7), &value), Some(entry));
        assert_eq!(decode_entry(&sequence_key(7), &value[..39]), None);
        assert_eq!(decode_entry(&[0; 7], &value), None);
    }
}
