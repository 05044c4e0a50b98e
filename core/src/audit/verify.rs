//! Verifying a chain of entries with its checkpoints: the first damage found, located.

use ed25519_dalek::VerifyingKey;

use super::chain::{ChainEntry, Checkpoint, link_hash};

/// The kind of damage found at a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// A record is missing: the sequence jumps.
    Gap,
    /// Records are out of order (a sequence number repeats or goes back).
    OutOfOrder,
    /// The entry's stored hash does not match its content and predecessor: the record or
    /// the one before it was altered, or records were spliced in from another chain.
    BrokenLink,
    /// A checkpoint's signature is not the node key's.
    BadSignature,
    /// A checkpoint names a chain head that the records do not reach.
    CheckpointMismatch,
    /// A checkpoint covers records that are not there: the chain was cut short.
    Truncated,
    /// A checkpoint from another node.
    ForeignCheckpoint,
}

impl Damage {
    pub fn as_str(self) -> &'static str {
        match self {
            Damage::Gap => "gap",
            Damage::OutOfOrder => "out_of_order",
            Damage::BrokenLink => "broken_link",
            Damage::BadSignature => "bad_signature",
            Damage::CheckpointMismatch => "checkpoint_mismatch",
            Damage::Truncated => "truncated",
            Damage::ForeignCheckpoint => "foreign_checkpoint",
        }
    }
}

/// The first damage found, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the audit chain is damaged at record {sequence}: {}", .damage.as_str())]
pub struct VerifyError {
    pub sequence: u64,
    pub damage: Damage,
}

/// What a verified chain covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChain {
    pub first: Option<u64>,
    pub last: Option<u64>,
    pub records: usize,
    pub checkpoints: usize,
    /// Records after the last checkpoint: intact as far as the chain shows, but not yet
    /// vouched for by a signature.
    pub unsigned_tail: usize,
}

/// Verifies `entries` (in stored order) and `checkpoints` of node `node_id`. `start` is the
/// sequence number and previous hash the entries continue from (`(0, GENESIS)` for a chain
/// from its beginning; an export of a time range starts later).
pub fn verify_chain(
    node_id: &str,
    key: &VerifyingKey,
    start: (u64, [u8; 32]),
    entries: &[ChainEntry],
    checkpoints: &[Checkpoint],
) -> Result<VerifiedChain, VerifyError> {
    let (mut expected, mut previous) = start;
    let mut heads = std::collections::HashMap::with_capacity(entries.len());
    for entry in entries {
        let fail = |damage| VerifyError {
            sequence: entry.sequence,
            damage,
        };
        if entry.sequence < expected {
            return Err(fail(Damage::OutOfOrder));
        }
        if entry.sequence > expected {
            return Err(VerifyError {
                sequence: expected,
                damage: Damage::Gap,
            });
        }
        if link_hash(node_id, &previous, entry.sequence, &entry.ciphertext) != entry.hash {
            return Err(fail(Damage::BrokenLink));
        }
        heads.insert(entry.sequence, entry.hash);
        previous = entry.hash;
        expected = entry.sequence + 1;
    }
    let last = entries.last().map(|e| e.sequence);
    let mut signed_up_to = None;
    for checkpoint in checkpoints {
        let fail = |damage| VerifyError {
            sequence: checkpoint.sequence,
            damage,
        };
        if checkpoint.node_id != node_id {
            return Err(fail(Damage::ForeignCheckpoint));
        }
        if !checkpoint.is_signed_by(key) {
            return Err(fail(Damage::BadSignature));
        }
        if checkpoint.sequence < start.0 {
            continue; // before this range
        }
        match heads.get(&checkpoint.sequence) {
            Some(head) if *head == checkpoint.head => {
                signed_up_to = signed_up_to.max(Some(checkpoint.sequence));
            }
            Some(_) => return Err(fail(Damage::CheckpointMismatch)),
            None => return Err(fail(Damage::Truncated)),
        }
    }
    let unsigned_tail = match (last, signed_up_to) {
        (Some(last), Some(signed)) => (last - signed) as usize,
        (Some(_), None) => entries.len(),
        (None, _) => 0,
    };
    Ok(VerifiedChain {
        first: entries.first().map(|e| e.sequence),
        last,
        records: entries.len(),
        checkpoints: checkpoints.len(),
        unsigned_tail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::GENESIS;
    use ed25519_dalek::SigningKey;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    /// A chain of `n` records with checkpoints after records 4 and `n - 1`.
    fn chain(n: u64, signer: &SigningKey, node: &str) -> (Vec<ChainEntry>, Vec<Checkpoint>) {
        let mut previous = GENESIS;
        let mut entries = Vec::new();
        let mut checkpoints = Vec::new();
        for sequence in 0..n {
            let entry = ChainEntry::new(
                node,
                &previous,
                sequence,
                format!("body {sequence}").into_bytes(),
            );
            previous = entry.hash;
            if sequence == 4 || sequence == n - 1 {
                checkpoints.push(Checkpoint::sign(
                    signer,
                    node,
                    sequence,
                    entry.hash,
                    1_000 + sequence as i64,
                ));
            }
            entries.push(entry);
        }
        (entries, checkpoints)
    }

    fn check(
        entries: &[ChainEntry],
        checkpoints: &[Checkpoint],
    ) -> Result<VerifiedChain, VerifyError> {
        verify_chain(
            "node-a",
            &key(1).verifying_key(),
            (0, GENESIS),
            entries,
            checkpoints,
        )
    }

    #[test]
    fn an_intact_chain_verifies() {
        let (entries, checkpoints) = chain(10, &key(1), "node-a");
        let verified = check(&entries, &checkpoints).expect("intact");
        assert_eq!(
            (verified.first, verified.last, verified.records),
            (Some(0), Some(9), 10)
        );
        assert_eq!(verified.unsigned_tail, 0);
    }

    #[test]
    fn every_kind_of_tampering_is_found_where_it_happened() {
        let (entries, checkpoints) = chain(10, &key(1), "node-a");
        let at = |sequence, damage| Err(VerifyError { sequence, damage });

        let mut flipped = entries.clone();
        flipped[6].ciphertext[0] ^= 1;
        assert_eq!(check(&flipped, &checkpoints), at(6, Damage::BrokenLink));

        let mut deleted = entries.clone();
        deleted.remove(3);
        assert_eq!(check(&deleted, &checkpoints), at(3, Damage::Gap));

        let mut reordered = entries.clone();
        reordered.swap(2, 3);
        assert_eq!(check(&reordered, &checkpoints), at(2, Damage::Gap));

        let mut repeated = entries.clone();
        repeated.insert(5, entries[4].clone());
        assert_eq!(check(&repeated, &checkpoints), at(4, Damage::OutOfOrder));

        let truncated = &entries[..8];
        assert_eq!(check(truncated, &checkpoints), at(9, Damage::Truncated));

        // A rewritten chain with valid links but no key: the checkpoint does not match.
        let mut rewritten = Vec::new();
        let mut previous = GENESIS;
        for entry in &entries {
            let body = if entry.sequence == 2 {
                b"forged".to_vec()
            } else {
                entry.ciphertext.clone()
            };
            let forged = ChainEntry::new("node-a", &previous, entry.sequence, body);
            previous = forged.hash;
            rewritten.push(forged);
        }
        assert_eq!(
            check(&rewritten, &checkpoints),
            at(4, Damage::CheckpointMismatch)
        );

        // Records and checkpoints spliced in from another node.
        let (other, other_checkpoints) = chain(10, &key(2), "node-b");
        let mut spliced = entries.clone();
        spliced[7] = other[7].clone();
        assert_eq!(check(&spliced, &checkpoints), at(7, Damage::BrokenLink));
        assert_eq!(
            check(&entries, &other_checkpoints),
            at(4, Damage::ForeignCheckpoint)
        );
        let mut resigned = checkpoints.clone();
        resigned[1] = Checkpoint::sign(&key(2), "node-a", 9, entries[9].hash, 2_000);
        assert_eq!(check(&entries, &resigned), at(9, Damage::BadSignature));
    }

    #[test]
    fn a_range_verifies_from_where_it_starts() {
        let (entries, checkpoints) = chain(10, &key(1), "node-a");
        let start = (5, entries[4].hash);
        let verified = verify_chain(
            "node-a",
            &key(1).verifying_key(),
            start,
            &entries[5..],
            &checkpoints,
        )
        .expect("range intact");
        assert_eq!((verified.first, verified.records), (Some(5), 5));
    }

    #[test]
    fn records_after_the_last_checkpoint_are_reported_unsigned() {
        let (entries, checkpoints) = chain(10, &key(1), "node-a");
        let verified = check(&entries, &checkpoints[..1]).expect("intact");
        assert_eq!(verified.unsigned_tail, 5);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any single flipped bit in any record body is found, at that record.
        #[test]
        fn any_flipped_bit_is_found_at_its_record(n in 2u64..40, at in 0usize..1000, bit in 0u8..8) {
            let (mut entries, checkpoints) = chain(n, &key(1), "node-a");
            let index = at % entries.len();
            let body = &mut entries[index].ciphertext;
            let byte = at % body.len();
            body[byte] ^= 1 << bit;
            let found = check(&entries, &checkpoints);
            proptest::prop_assert_eq!(
                found,
                Err(VerifyError { sequence: index as u64, damage: Damage::BrokenLink })
            );
        }
    }
}
