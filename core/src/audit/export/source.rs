//! Writing an export from a store: the one procedure for moatd's live store (over the
//! admin socket) and a stopped node's store (moatctl), each reading its sled store through
//! [`ExportSource`] and signing with the node's key.

use std::io::Write;
use std::ops::RangeInclusive;

use ed25519_dalek::SigningKey;

use super::select::{AnchorPoint, ExportItem, ExportSelection, TimeRange, in_export_order, select};
use super::{EXPORT_VERSION, ExportEnd, ExportHeader, ExportWriter};
use crate::audit::chain::{ChainEntry, ChainPoint, Checkpoint};
use crate::audit::encoding::hex;
use crate::audit::layout::NodeInfo;

/// A store, as an export reads it.
pub trait ExportSource {
    type Error;

    /// The node that wrote the store.
    fn node(&self) -> Result<NodeInfo, Self::Error>;
    /// The prune marker, if records were pruned.
    fn prune_marker(&self) -> Result<Option<Checkpoint>, Self::Error>;
    /// The chain head: the last stored record, `None` when none is stored. Nothing after
    /// it may show in the other methods: a store written to meanwhile (moatd's) must keep
    /// its view at this head, or the export's signed head would be behind its records.
    fn head(&self) -> Result<Option<ChainPoint>, Self::Error>;
    /// Every stored record's sequence number and stored time, in order, calling
    /// `progress` for each.
    fn record_times(&self, progress: &mut dyn FnMut()) -> Result<Vec<(u64, i64)>, Self::Error>;
    /// The sequence numbers of the stored checkpoints, in order.
    fn checkpoint_sequences(&self) -> Result<Vec<u64>, Self::Error>;
    /// The checkpoint stored at `sequence`.
    fn checkpoint(&self, sequence: u64) -> Result<Checkpoint, Self::Error>;
    /// The stored records with sequence numbers in `range`, in order.
    fn records(
        &self,
        range: RangeInclusive<u64>,
    ) -> impl Iterator<Item = Result<ChainEntry, Self::Error>>;
    /// The stored checkpoints with sequence numbers in `range`, in order.
    fn checkpoints(
        &self,
        range: RangeInclusive<u64>,
    ) -> impl Iterator<Item = Result<Checkpoint, Self::Error>>;
}

/// What an export carries.
#[derive(Debug, Clone)]
pub struct Exported {
    pub node: NodeInfo,
    pub selection: ExportSelection,
    pub anchor: Option<Checkpoint>,
    pub end: ExportEnd,
    /// The stored times of the first and last exported record.
    pub stored: Option<(i64, i64)>,
}

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteExportError<E> {
    #[error("cannot read the store")]
    Source(E),
    #[error("the store holds no record in the range")]
    Empty,
    /// The key given to sign with is not the one the store's node signs with.
    #[error(
        "the signing key given is not this node's: the store's node key is {}, the key given \
         has the public key {}", hex(.node), hex(.given)
    )]
    WrongKey { node: [u8; 32], given: [u8; 32] },
    #[error("cannot write the export")]
    Write(#[source] std::io::Error),
}

/// How far an export has got, for progress reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportProgress {
    /// One more stored record looked at to choose the range.
    Scanned,
    /// The range is chosen: this many records will be written.
    Selected(u64),
    /// One more record written.
    Written,
}

/// Writes the export of `range` of `source` to `out`, created at `created_unix_ms`, signed
/// with the node's `key`; returns what it carries and `out` (to be flushed and synced by
/// the caller).
pub fn write_export<S: ExportSource, W: Write>(
    source: &S,
    range: TimeRange,
    created_unix_ms: i64,
    key: &SigningKey,
    out: W,
    progress: &mut dyn FnMut(ExportProgress),
) -> Result<(Exported, W), WriteExportError<S::Error>> {
    let node = source.node().map_err(WriteExportError::Source)?;
    let given = key.verifying_key().to_bytes();
    if given != node.public_key {
        return Err(WriteExportError::WrongKey {
            node: node.public_key,
            given,
        });
    }
    let head = source
        .head()
        .map_err(WriteExportError::Source)?
        .ok_or(WriteExportError::Empty)?;
    let prune = source.prune_marker().map_err(WriteExportError::Source)?;
    let times = source
        .record_times(&mut || progress(ExportProgress::Scanned))
        .map_err(WriteExportError::Source)?;
    let selection = select(
        range,
        times.iter().copied(),
        source
            .checkpoint_sequences()
            .map_err(WriteExportError::Source)?,
        prune.as_ref().map(|marker| marker.sequence),
    )
    .ok_or(WriteExportError::Empty)?;
    let anchor = match selection.anchor {
        AnchorPoint::ChainStart => None,
        AnchorPoint::Checkpoint(sequence) => Some(
            source
                .checkpoint(sequence)
                .map_err(WriteExportError::Source)?,
        ),
        AnchorPoint::Prune(_) => prune,
    };
    let header = ExportHeader {
        moat_audit_export: EXPORT_VERSION,
        node_id: node.node_id.clone(),
        node_key: node.public_key,
        anchor: anchor.clone(),
        created_unix_ms,
        since_unix_ms: range.since_unix_ms,
        until_unix_ms: range.until_unix_ms,
    };
    let sequences = selection.sequences();
    progress(ExportProgress::Selected(
        sequences.end() - sequences.start() + 1,
    ));
    let mut writer = ExportWriter::new(out, &header).map_err(WriteExportError::Write)?;
    let mut stored: Option<(i64, i64)> = None;
    let items = in_export_order(
        source.records(sequences.clone()),
        source.checkpoints(sequences),
    );
    for item in items {
        match item.map_err(WriteExportError::Source)? {
            ExportItem::Record(entry) => {
                writer.record(&entry).map_err(WriteExportError::Write)?;
                stored = Some(stored.map_or((entry.unix_ms, entry.unix_ms), |(first, _)| {
                    (first, entry.unix_ms)
                }));
                progress(ExportProgress::Written);
            }
            ExportItem::Checkpoint(checkpoint) => writer
                .checkpoint(&checkpoint)
                .map_err(WriteExportError::Write)?,
        }
    }
    let (out, end) = writer.finish(head, key).map_err(WriteExportError::Write)?;
    Ok((
        Exported {
            node,
            selection,
            anchor,
            end,
            stored,
        },
        out,
    ))
}
