//! Verifying a chain of entries with its checkpoints: the first damage found, located.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;

use super::chain::{ChainEntry, Checkpoint, CheckpointKind};

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
    /// An entry or checkpoint that cannot be read at all (an export line that is not one).
    Unreadable,
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
            Damage::Unreadable => "unreadable",
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
    /// The latest checkpoint met: its sequence and signing time (seconds). Records cut off
    /// at a checkpoint boundary leave an intact chain; what shows it is this checkpoint
    /// being older than the export (moatd signs one at every export and at shutdown).
    pub last_checkpoint: Option<(u64, i64)>,
}

/// Verifies `entries` (in stored order) and `checkpoints` of node `node_id`. `start` is the
/// sequence number and previous hash the entries continue from (`(0, GENESIS)` for a chain
/// from its beginning; an export or a pruned store starts later).
pub fn verify_chain(
    node_id: &str,
    key: &VerifyingKey,
    start: (u64, [u8; 32]),
    entries: &[ChainEntry],
    checkpoints: &[Checkpoint],
) -> Result<VerifiedChain, VerifyError> {
    let mut verifier = ChainVerifier::new(node_id, key, start);
    for entry in entries {
        verifier.entry(entry)?;
    }
    for checkpoint in checkpoints {
        verifier.checkpoint(checkpoint)?;
    }
    verifier.finish()
}

/// Verifies a chain as it is read, entry by entry and checkpoint by checkpoint, in any
/// interleaving, keeping 32 bytes per record (the heads checkpoints are compared with).
#[derive(Debug)]
pub struct ChainVerifier<'k> {
    node_id: String,
    key: &'k VerifyingKey,
    start: u64,
    expected: u64,
    previous: [u8; 32],
    /// Hash of record `start + i` at index `i`.
    heads: Vec<[u8; 32]>,
    /// Checkpoints of records not read yet.
    pending: BTreeMap<u64, ([u8; 32], i64)>,
    checkpoints: usize,
    signed_up_to: Option<(u64, i64)>,
}

impl<'k> ChainVerifier<'k> {
    /// A verifier of node `node_id`'s chain continuing from `start` (sequence number and
    /// previous hash).
    pub fn new(node_id: &str, key: &'k VerifyingKey, start: (u64, [u8; 32])) -> Self {
        Self {
            node_id: node_id.to_owned(),
            key,
            start: start.0,
            expected: start.0,
            previous: start.1,
            heads: Vec::new(),
            pending: BTreeMap::new(),
            checkpoints: 0,
            signed_up_to: None,
        }
    }

    /// The sequence number the next entry must have.
    pub fn expected(&self) -> u64 {
        self.expected
    }

    /// Checks the next entry.
    pub fn entry(&mut self, entry: &ChainEntry) -> Result<(), VerifyError> {
        let fail = |damage| VerifyError {
            sequence: entry.sequence,
            damage,
        };
        if entry.sequence < self.expected {
            return Err(fail(Damage::OutOfOrder));
        }
        if entry.sequence > self.expected {
            return Err(VerifyError {
                sequence: self.expected,
                damage: Damage::Gap,
            });
        }
        if !entry.links_to(&self.node_id, &self.previous) {
            return Err(fail(Damage::BrokenLink));
        }
        if let Some((head, unix_time)) = self.pending.remove(&entry.sequence) {
            if head != entry.hash {
                return Err(fail(Damage::CheckpointMismatch));
            }
            self.signed(entry.sequence, unix_time);
        }
        self.heads.push(entry.hash);
        self.previous = entry.hash;
        self.expected = entry.sequence + 1;
        Ok(())
    }

    /// Checks a checkpoint: the node's, signed by its key, over a head the chain reaches.
    pub fn checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), VerifyError> {
        let fail = |damage| VerifyError {
            sequence: checkpoint.sequence,
            damage,
        };
        if checkpoint.node_id != self.node_id {
            return Err(fail(Damage::ForeignCheckpoint));
        }
        if !checkpoint.is_signed_by(self.key) {
            return Err(fail(Damage::BadSignature));
        }
        if checkpoint.kind != CheckpointKind::Checkpoint {
            // A prune marker anchors a chain; among its checkpoints it is misplaced.
            return Err(fail(Damage::CheckpointMismatch));
        }
        self.checkpoints += 1;
        if checkpoint.sequence < self.start {
            return Ok(()); // before this range
        }
        if checkpoint.sequence >= self.expected {
            self.pending
                .insert(checkpoint.sequence, (checkpoint.head, checkpoint.unix_time));
            return Ok(());
        }
        let index = (checkpoint.sequence - self.start) as usize;
        if self.heads.get(index) != Some(&checkpoint.head) {
            return Err(fail(Damage::CheckpointMismatch));
        }
        self.signed(checkpoint.sequence, checkpoint.unix_time);
        Ok(())
    }

    fn signed(&mut self, sequence: u64, unix_time: i64) {
        self.signed_up_to = self.signed_up_to.max(Some((sequence, unix_time)));
    }

    /// The verdict once everything is read: a checkpoint of records that never came means
    /// the chain was cut short.
    pub fn finish(self) -> Result<VerifiedChain, VerifyError> {
        if let Some((&sequence, _)) = self.pending.first_key_value() {
            return Err(VerifyError {
                sequence,
                damage: Damage::Truncated,
            });
        }
        let records = self.heads.len();
        let last = self.expected.checked_sub(1).filter(|_| records > 0);
        let unsigned_tail = match (last, self.signed_up_to) {
            (Some(last), Some((signed, _))) => (last - signed) as usize,
            (Some(_), None) => records,
            (None, _) => 0,
        };
        Ok(VerifiedChain {
            first: (records > 0).then_some(self.start),
            last,
            records,
            checkpoints: self.checkpoints,
            unsigned_tail,
            last_checkpoint: self.signed_up_to,
        })
    }
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
                1_795_913_185_000 + sequence as i64,
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

        let mut shifted = entries.clone();
        shifted[5].unix_ms += 3_600_000;
        assert_eq!(check(&shifted, &checkpoints), at(5, Damage::BrokenLink));

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
            let forged = ChainEntry::new("node-a", &previous, entry.sequence, entry.unix_ms, body);
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
