//! Continuity across exports: does a new export extend the chain an auditor already holds?
//!
//! Whoever holds the node's key (root on the node) can rewrite history that no auditor has
//! yet, re-chain it and sign it again: such an export verifies on its own. What it cannot
//! change is the chain head an auditor took away with an earlier export (the signed `head`
//! of its end line). A hash chain fixes everything before a point, so the new export is
//! the same history as far as the auditor knows it exactly when its chain passes the held
//! head's sequence number with the held head's hash, and its own head is not older.

use crate::audit::chain::{ChainEntry, ChainPoint};
use crate::audit::encoding::hex;

use super::{ExportEnd, ExportHeader};

/// What the auditor holds: the head of an earlier export of the node, and the node's id
/// where the head came with one (an earlier export file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldHead {
    pub node_id: Option<String>,
    pub head: ChainPoint,
}

/// Why an export does not extend the held head.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContinuityError {
    /// The held head is another node's.
    #[error("the export is of node {found:?}, the head held is of node {held:?}")]
    OtherNode { held: String, found: String },
    /// The export's head is older than the held one: an older export handed over as the
    /// newer, or the node's chain cut back since.
    #[error(
        "the export's chain head is record {}, older than the head held, record {}: this \
         export is older than the one that head came from, or the node's chain was cut back \
         since", .head.sequence, .held.sequence
    )]
    Older { held: ChainPoint, head: ChainPoint },
    /// At the held head's sequence number the export's chain has another hash: the history
    /// the auditor holds was rewritten.
    #[error(
        "at record {sequence} the export's chain has hash {}, the head held has {}: the \
         node's history up to record {sequence} was rewritten (re-chained and re-signed) \
         since the head held was exported", hex(.found), hex(.held)
    )]
    Forked {
        sequence: u64,
        held: [u8; 32],
        found: [u8; 32],
    },
    /// The export starts after the held head, so it cannot show that it extends it.
    #[error(
        "the export starts at record {first} and cannot show record {sequence}, the head \
         held: export from at or before it (no --since, or --since no later than that \
         record's stored time)"
    )]
    NotCovered { sequence: u64, first: u64 },
}

/// Watches an export's records for the held head's sequence number, then judges.
#[derive(Debug, Clone)]
pub struct ContinuityCheck {
    held: HeldHead,
    /// The export's hash at the held head's sequence number, once met.
    seen: Option<[u8; 32]>,
}

impl ContinuityCheck {
    pub fn new(held: HeldHead) -> Self {
        Self { held, seen: None }
    }

    /// Notes a verified record of the export.
    pub fn record(&mut self, entry: &ChainEntry) {
        if entry.sequence == self.held.head.sequence {
            self.seen = Some(entry.hash);
        }
    }

    /// The verdict on an export, once it verified, with its `header` and signed `end`.
    pub fn verdict(&self, header: &ExportHeader, end: &ExportEnd) -> Result<(), ContinuityError> {
        let held = self.held.head;
        if let Some(node) = self.held.node_id.as_ref().filter(|n| **n != header.node_id) {
            return Err(ContinuityError::OtherNode {
                held: node.clone(),
                found: header.node_id.clone(),
            });
        }
        if end.head.sequence < held.sequence {
            return Err(ContinuityError::Older {
                held,
                head: end.head,
            });
        }
        let anchor = header.anchor.as_ref().map(|a| (a.sequence, a.head));
        let found = if end.head.sequence == held.sequence {
            Some(end.head.hash)
        } else if let Some((_, hash)) = anchor.filter(|(sequence, _)| *sequence == held.sequence) {
            Some(hash)
        } else {
            self.seen
        };
        match found {
            Some(hash) if hash == held.hash => Ok(()),
            Some(found) => Err(ContinuityError::Forked {
                sequence: held.sequence,
                held: held.hash,
                found,
            }),
            None => Err(ContinuityError::NotCovered {
                sequence: held.sequence,
                first: header.start().0,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::{Checkpoint, GENESIS};
    use ed25519_dalek::SigningKey;

    const NODE: &str = "node-a";

    /// Records 0..n whose bodies are `tag` from `fork_at` on.
    fn chain(n: u64, fork_at: u64, tag: &str) -> Vec<ChainEntry> {
        let mut previous = GENESIS;
        (0..n)
            .map(|sequence| {
                let body = if sequence < fork_at { "kept" } else { tag };
                let entry = ChainEntry::new(
                    NODE,
                    &previous,
                    sequence,
                    sequence as i64,
                    format!("{body} {sequence}").into_bytes(),
                );
                previous = entry.hash;
                entry
            })
            .collect()
    }

    /// The verdict on an export of `entries[from..]` (anchored at `from - 1`) with head
    /// `head`, for `held`.
    fn judge(
        held: HeldHead,
        entries: &[ChainEntry],
        from: usize,
        head: ChainPoint,
    ) -> Result<(), ContinuityError> {
        let key = SigningKey::from_bytes(&[1; 32]);
        let anchor = from
            .checked_sub(1)
            .map(|a| Checkpoint::sign(&key, NODE, a as u64, entries[a].hash, 0));
        let header = ExportHeader {
            moat_audit_export: super::super::EXPORT_VERSION,
            node_id: NODE.into(),
            node_key: key.verifying_key().to_bytes(),
            anchor,
            created_unix_ms: 0,
            since_unix_ms: None,
            until_unix_ms: None,
        };
        let last = entries.last().map(ChainPoint::of);
        let end = ExportEnd::sign(&header, 0, 0, last, head, &key);
        let mut check = ContinuityCheck::new(held);
        for entry in &entries[from..] {
            check.record(entry);
        }
        check.verdict(&header, &end)
    }

    fn held(entries: &[ChainEntry], sequence: usize) -> HeldHead {
        HeldHead {
            node_id: Some(NODE.into()),
            head: ChainPoint::of(&entries[sequence]),
        }
    }

    #[test]
    fn an_export_that_passes_through_the_held_head_extends_it() {
        let entries = chain(20, 20, "");
        let head = ChainPoint::of(&entries[19]);
        assert_eq!(judge(held(&entries, 9), &entries, 0, head), Ok(()));
        // From the checkpoint at the held head, or one before it.
        assert_eq!(judge(held(&entries, 9), &entries, 10, head), Ok(()));
        assert_eq!(judge(held(&entries, 9), &entries, 5, head), Ok(()));
        // Nothing new: the same head.
        assert_eq!(judge(held(&entries, 19), &entries, 0, head), Ok(()));
        // A range that ends before the held head, with the same signed head.
        assert_eq!(judge(held(&entries, 19), &entries[..8], 0, head), Ok(()));
    }

    #[test]
    fn an_older_export_is_refused() {
        let entries = chain(20, 20, "");
        let older = ChainPoint::of(&entries[12]);
        assert_eq!(
            judge(held(&entries, 19), &entries[..13], 0, older),
            Err(ContinuityError::Older {
                held: ChainPoint::of(&entries[19]),
                head: older
            })
        );
    }

    #[test]
    fn a_rewritten_history_is_found_at_the_held_head() {
        let entries = chain(20, 20, "");
        let fork = chain(25, 7, "forged");
        let head = ChainPoint::of(&fork[24]);
        let forked = Err(ContinuityError::Forked {
            sequence: 12,
            held: entries[12].hash,
            found: fork[12].hash,
        });
        assert_eq!(judge(held(&entries, 12), &fork, 0, head), forked);
        // Through the anchor, and through the head, as well as through a record.
        assert_eq!(judge(held(&entries, 12), &fork, 13, head), forked);
        assert_eq!(
            judge(
                held(&entries, 12),
                &fork[..13],
                0,
                ChainPoint::of(&fork[12])
            ),
            forked
        );
        // A rewrite after the held head is history the auditor did not have.
        assert_eq!(judge(held(&entries, 5), &fork, 0, head), Ok(()));
    }

    #[test]
    fn an_export_that_cannot_show_the_held_head_or_is_of_another_node_is_refused() {
        let entries = chain(20, 20, "");
        let head = ChainPoint::of(&entries[19]);
        assert_eq!(
            judge(held(&entries, 9), &entries, 14, head),
            Err(ContinuityError::NotCovered {
                sequence: 9,
                first: 14
            })
        );
        assert_eq!(
            judge(held(&entries, 15), &entries[..12], 0, head),
            Err(ContinuityError::NotCovered {
                sequence: 15,
                first: 0
            })
        );
        let mut other = held(&entries, 9);
        other.node_id = Some("node-b".into());
        assert!(matches!(
            judge(other, &entries, 0, head),
            Err(ContinuityError::OtherNode { .. })
        ));
        // A head noted down without its node is judged by the chain alone.
        let mut bare = held(&entries, 9);
        bare.node_id = None;
        assert_eq!(judge(bare, &entries, 0, head), Ok(()));
    }
}
