//! Which records and checkpoints an export of a time range carries, and in which order.
//!
//! An export must start right after a signed anchor, so that every record it carries is
//! vouched for: the range asked for is widened back to the latest checkpoint before its
//! first record, or to the chain's start, or, in a pruned store, to the prune marker. The
//! caller reads the store (moatctl a stopped node's, moatd its own) and hands in sequence
//! numbers and times; nothing here touches the store.

use std::iter::Peekable;
use std::ops::RangeInclusive;

use crate::audit::chain::{ChainEntry, Checkpoint};

/// A time range of stored records, in milliseconds since the Unix epoch, both ends
/// included; an open end takes everything on that side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeRange {
    pub since_unix_ms: Option<i64>,
    pub until_unix_ms: Option<i64>,
}

impl TimeRange {
    pub fn contains(&self, unix_ms: i64) -> bool {
        self.since_unix_ms.is_none_or(|since| unix_ms >= since)
            && self.until_unix_ms.is_none_or(|until| unix_ms <= until)
    }
}

/// What the first exported record continues from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnchorPoint {
    /// The chain's first record: no anchor.
    ChainStart,
    /// The stored checkpoint at this sequence number.
    Checkpoint(u64),
    /// The store's prune marker, at this sequence number.
    Prune(u64),
}

impl AnchorPoint {
    /// The sequence number of the record that directly follows the anchor.
    pub fn next(self) -> u64 {
        match self {
            AnchorPoint::ChainStart => 0,
            AnchorPoint::Checkpoint(sequence) | AnchorPoint::Prune(sequence) => sequence + 1,
        }
    }
}

/// What to export: every record from the anchor's next sequence number to `last`, and every
/// checkpoint among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportSelection {
    pub anchor: AnchorPoint,
    /// The last record in the time range.
    pub last: u64,
}

impl ExportSelection {
    /// The sequence numbers of the records to export (and of the checkpoints to export
    /// with them).
    pub fn sequences(&self) -> RangeInclusive<u64> {
        self.anchor.next()..=self.last
    }
}

/// Chooses what to export of `range`.
///
/// `records` are the stored records' sequence numbers and stored times, in any order;
/// `checkpoints` the sequence numbers of the stored checkpoints; `pruned_through` the
/// sequence number of the store's prune marker. Records up to the prune marker count as
/// pruned even while still stored (a prune that a crash interrupted). `None`: no record
/// is in the range.
pub fn select(
    range: TimeRange,
    records: impl IntoIterator<Item = (u64, i64)>,
    checkpoints: impl IntoIterator<Item = u64>,
    pruned_through: Option<u64>,
) -> Option<ExportSelection> {
    let kept = |sequence: u64| pruned_through.is_none_or(|pruned| sequence > pruned);
    let (first, last) = records
        .into_iter()
        .filter(|&(sequence, unix_ms)| kept(sequence) && range.contains(unix_ms))
        .fold(None, |span: Option<(u64, u64)>, (sequence, _)| {
            Some(span.map_or((sequence, sequence), |(first, last)| {
                (first.min(sequence), last.max(sequence))
            }))
        })?;
    // A checkpoint before the prune marker anchors records that are gone.
    let anchor = checkpoints
        .into_iter()
        .filter(|&sequence| sequence < first && pruned_through.is_none_or(|p| sequence >= p))
        .max()
        .map(AnchorPoint::Checkpoint)
        .or(pruned_through.map(AnchorPoint::Prune))
        .unwrap_or(AnchorPoint::ChainStart);
    Some(ExportSelection { anchor, last })
}

/// One line of an export after its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportItem {
    Record(ChainEntry),
    Checkpoint(Checkpoint),
}

/// Records and checkpoints, each in sequence order, merged into the order an export lists
/// them: each checkpoint right after the record it covers (a checkpoint whose record is
/// missing comes where that record would be). An error from either side comes out as soon
/// as it is met.
pub fn in_export_order<E, R, C>(
    records: R,
    checkpoints: C,
) -> InExportOrder<R::IntoIter, C::IntoIter>
where
    R: IntoIterator<Item = Result<ChainEntry, E>>,
    C: IntoIterator<Item = Result<Checkpoint, E>>,
{
    InExportOrder {
        records: records.into_iter().peekable(),
        checkpoints: checkpoints.into_iter().peekable(),
    }
}

/// The iterator of [`in_export_order`].
pub struct InExportOrder<R: Iterator, C: Iterator> {
    records: Peekable<R>,
    checkpoints: Peekable<C>,
}

impl<R: Iterator, C: Iterator> std::fmt::Debug for InExportOrder<R, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InExportOrder").finish_non_exhaustive()
    }
}

impl<E, R, C> Iterator for InExportOrder<R, C>
where
    R: Iterator<Item = Result<ChainEntry, E>>,
    C: Iterator<Item = Result<Checkpoint, E>>,
{
    type Item = Result<ExportItem, E>;

    fn next(&mut self) -> Option<Self::Item> {
        let checkpoint_first = match (self.records.peek(), self.checkpoints.peek()) {
            (None, None) => return None,
            (_, Some(Err(_))) | (None, Some(_)) => true,
            (Some(Err(_)), _) | (Some(_), None) => false,
            (Some(Ok(record)), Some(Ok(checkpoint))) => checkpoint.sequence < record.sequence,
        };
        if checkpoint_first {
            self.checkpoints
                .next()
                .map(|item| item.map(ExportItem::Checkpoint))
        } else {
            self.records.next().map(|item| item.map(ExportItem::Record))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::GENESIS;
    use ed25519_dalek::SigningKey;

    /// Records 0..n stored at 1000, 1010, 1020, ...
    fn stored(sequences: RangeInclusive<u64>) -> Vec<(u64, i64)> {
        sequences.map(|s| (s, 1_000 + 10 * s as i64)).collect()
    }

    fn range(since: Option<i64>, until: Option<i64>) -> TimeRange {
        TimeRange {
            since_unix_ms: since,
            until_unix_ms: until,
        }
    }

    #[test]
    fn a_whole_chain_is_exported_from_its_start() {
        let selection = select(TimeRange::default(), stored(0..=9), [3, 7, 9], None);
        assert_eq!(
            selection,
            Some(ExportSelection {
                anchor: AnchorPoint::ChainStart,
                last: 9
            })
        );
        assert_eq!(selection.map(|s| s.sequences()), Some(0..=9));
    }

    #[test]
    fn a_range_is_widened_back_to_the_latest_checkpoint_before_it() {
        // Records 5..=8 are in the range; checkpoint 3 is the latest before record 5.
        let selection = select(
            range(Some(1_050), Some(1_080)),
            stored(0..=9),
            [3, 7, 9],
            None,
        )
        .expect("records in range");
        assert_eq!(selection.anchor, AnchorPoint::Checkpoint(3));
        assert_eq!(selection.sequences(), 4..=8);

        // A checkpoint at the first record in range does not anchor it: it covers it.
        let selection = select(range(Some(1_070), None), stored(0..=9), [3, 7, 9], None)
            .expect("records in range");
        assert_eq!(selection.anchor, AnchorPoint::Checkpoint(3));
        assert_eq!(selection.sequences(), 4..=9);

        // Right after a checkpoint: nothing to widen.
        let selection = select(range(Some(1_080), None), stored(0..=9), [3, 7, 9], None)
            .expect("records in range");
        assert_eq!(selection.sequences(), 8..=9);
    }

    #[test]
    fn without_an_earlier_checkpoint_a_range_starts_at_the_chain_start() {
        let selection = select(range(Some(1_020), Some(1_030)), stored(0..=9), [7], None)
            .expect("records in range");
        assert_eq!(selection.anchor, AnchorPoint::ChainStart);
        assert_eq!(selection.sequences(), 0..=3);
    }

    #[test]
    fn a_pruned_store_is_anchored_at_its_prune_marker() {
        // Records up to 3 were pruned; checkpoint 3 went with them.
        let selection =
            select(TimeRange::default(), stored(4..=9), [7, 9], Some(3)).expect("records in range");
        assert_eq!(selection.anchor, AnchorPoint::Prune(3));
        assert_eq!(selection.sequences(), 4..=9);

        // Checkpoints before the prune marker left behind never anchor.
        let selection = select(TimeRange::default(), stored(4..=9), [1, 2, 7], Some(3))
            .expect("records in range");
        assert_eq!(selection.anchor, AnchorPoint::Prune(3));

        // A later checkpoint does.
        let selection = select(range(Some(1_090), None), stored(4..=9), [1, 7], Some(3))
            .expect("records in range");
        assert_eq!(selection.anchor, AnchorPoint::Checkpoint(7));
        assert_eq!(selection.sequences(), 8..=9);
    }

    #[test]
    fn records_a_prune_left_behind_count_as_pruned() {
        // The marker says 0..=5 are pruned, the crash left 4 and 5 stored.
        let selection =
            select(TimeRange::default(), stored(4..=9), [7], Some(5)).expect("records in range");
        assert_eq!(selection.sequences(), 6..=9);
        assert_eq!(
            select(range(None, Some(1_050)), stored(4..=9), [7], Some(5)),
            None
        );
    }

    #[test]
    fn a_range_without_records_selects_nothing() {
        assert_eq!(
            select(range(Some(5_000), None), stored(0..=9), [3], None),
            None
        );
        assert_eq!(select(TimeRange::default(), [], [], None), None);
        assert_eq!(select(TimeRange::default(), [], [], Some(9)), None);
    }

    #[test]
    fn times_out_of_order_select_from_the_first_to_the_last_match() {
        // A clock step back: record 6 is stored before record 2's time.
        let records = [
            (0, 100),
            (1, 200),
            (2, 300),
            (3, 400),
            (4, 500),
            (5, 600),
            (6, 250),
        ];
        let selection =
            select(range(Some(240), Some(310)), records, [0, 4], None).expect("records in range");
        assert_eq!(selection.anchor, AnchorPoint::Checkpoint(0));
        assert_eq!(selection.sequences(), 1..=6);
    }

    proptest::proptest! {
        /// Every kept record in the range is exported, the export ends at the last of them,
        /// and it starts right after the latest usable anchor before the first of them.
        #[test]
        fn the_selection_covers_the_range_from_the_latest_anchor(
            times in proptest::collection::vec(0i64..100, 1..40),
            checkpoints in proptest::collection::btree_set(0u64..40, 0..8),
            pruned in proptest::option::of(0u64..20),
            since in 0i64..100,
            length in 0i64..100,
        ) {
            let range = range(Some(since), Some(since + length));
            let records: Vec<(u64, i64)> = times.iter().copied().enumerate()
                .map(|(s, t)| (s as u64, t))
                .filter(|&(s, _)| pruned.is_none_or(|p| s > p))
                .collect();
            let wanted: Vec<u64> = records.iter()
                .filter(|&&(_, t)| range.contains(t))
                .map(|&(s, _)| s)
                .collect();
            let selection = select(range, records.iter().copied(), checkpoints.iter().copied(), pruned);
            let (Some(&first), Some(selection)) = (wanted.first(), selection) else {
                proptest::prop_assert!(wanted.is_empty() && selection.is_none());
                return Ok(());
            };
            proptest::prop_assert_eq!(Some(&selection.last), wanted.last());
            proptest::prop_assert!(selection.sequences().contains(&first));
            let usable = |c: &&u64| **c < first && pruned.is_none_or(|p| **c >= p);
            let expected = match checkpoints.iter().filter(usable).max() {
                Some(&c) => AnchorPoint::Checkpoint(c),
                None => pruned.map_or(AnchorPoint::ChainStart, AnchorPoint::Prune),
            };
            proptest::prop_assert_eq!(selection.anchor, expected);
        }
    }

    fn entry(sequence: u64) -> Result<ChainEntry, ()> {
        Ok(ChainEntry::new("node-a", &GENESIS, sequence, 0, Vec::new()))
    }

    fn checkpoint(sequence: u64) -> Result<Checkpoint, ()> {
        let key = SigningKey::from_bytes(&[1; 32]);
        Ok(Checkpoint::sign(&key, "node-a", sequence, GENESIS, 0))
    }

    /// `r4 c4 r5` for record 4, its checkpoint and record 5; `!` for an error.
    fn order(items: impl Iterator<Item = Result<ExportItem, ()>>) -> String {
        let names: Vec<String> = items
            .map(|item| match item {
                Ok(ExportItem::Record(entry)) => format!("r{}", entry.sequence),
                Ok(ExportItem::Checkpoint(checkpoint)) => format!("c{}", checkpoint.sequence),
                Err(()) => "!".into(),
            })
            .collect();
        names.join(" ")
    }

    #[test]
    fn checkpoints_follow_the_records_they_cover() {
        let records = (4..=9).map(entry);
        let checkpoints = [5, 9].into_iter().map(checkpoint);
        assert_eq!(
            order(in_export_order(records, checkpoints)),
            "r4 r5 c5 r6 r7 r8 r9 c9"
        );
    }

    #[test]
    fn a_checkpoint_whose_record_is_missing_comes_in_its_place() {
        let records = [4, 5, 7].into_iter().map(entry);
        let checkpoints = [6, 8].into_iter().map(checkpoint);
        assert_eq!(
            order(in_export_order(records, checkpoints)),
            "r4 r5 c6 r7 c8"
        );
    }

    #[test]
    fn errors_come_out_when_they_are_met() {
        let records = [entry(1), Err(()), entry(3)];
        let checkpoints = [checkpoint(1), checkpoint(3)];
        assert_eq!(
            order(in_export_order(records, checkpoints)),
            "r1 ! c1 r3 c3"
        );
        let checkpoints = [Err(()), checkpoint(3)];
        assert_eq!(order(in_export_order([entry(1)], checkpoints)), "! r1 c3");
    }
}
