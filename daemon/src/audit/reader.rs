//! Reading the live store for an export, beside the committer that keeps appending: sled
//! trees are shared handles, so the reader sees a consistent prefix of the chain while new
//! records land after it. An export's reader stops at the chain head the committer had
//! made durable and signed when the export began ([`ExportSnapshot`]): a record past it may
//! not be on disk yet, and the head the export signs must be one a crash cannot take back.

use std::io::Write;
use std::ops::RangeInclusive;

use ed25519_dalek::SigningKey;
use moat_core::audit::export::select::TimeRange;
use moat_core::audit::export::source::{
    self, ExportProgress, ExportSource, Exported, WriteExportError,
};
use moat_core::audit::layout::{self, NodeInfo};
use moat_core::audit::{ChainEntry, ChainPoint, Checkpoint};

use super::AuditError;

/// Read handles on the store's trees.
#[derive(Clone)]
pub struct StoreReader {
    pub(super) node: NodeInfo,
    pub(super) records: sled::Tree,
    pub(super) checkpoints: sled::Tree,
    pub(super) meta: sled::Tree,
    /// Records and checkpoints from this sequence number on are not shown.
    pub(super) next: u64,
}

/// One export's view of the live store, up to the chain head when it was taken, and the
/// node's key to sign the export with.
pub struct ExportSnapshot {
    reader: StoreReader,
    key: SigningKey,
}

impl std::fmt::Debug for ExportSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportSnapshot")
            .field("node", &self.reader.node.node_id)
            .field("next", &self.reader.next)
            .finish_non_exhaustive()
    }
}

impl ExportSnapshot {
    /// `reader`'s view, to be signed with `key` (the node's).
    pub(super) fn new(reader: StoreReader, key: SigningKey) -> Self {
        Self { reader, key }
    }

    /// Writes the export of `range`, created at `created_unix_ms`, to `out`, signed with
    /// the node's key (see `moat_core::audit::export::source::write_export`).
    pub fn write<W: Write>(
        &self,
        range: TimeRange,
        created_unix_ms: i64,
        out: W,
        progress: &mut dyn FnMut(ExportProgress),
    ) -> Result<(Exported, W), WriteExportError<AuditError>> {
        source::write_export(
            &self.reader,
            range,
            created_unix_ms,
            &self.key,
            out,
            progress,
        )
    }
}

impl std::fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReader")
            .field("node", &self.node.node_id)
            .finish_non_exhaustive()
    }
}

fn read_error(e: sled::Error) -> AuditError {
    AuditError::Write(format!("cannot read the audit store: {e}"))
}

fn damaged(key: &[u8]) -> AuditError {
    AuditError::Damaged {
        sequence: layout::decode_sequence(key).unwrap_or(u64::MAX),
    }
}

impl StoreReader {
    /// The entries of `tree` (records or checkpoints) in `range`, cut at what this reader
    /// shows.
    fn shown(
        &self,
        tree: &sled::Tree,
        range: RangeInclusive<u64>,
    ) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + use<> {
        let end = self
            .next
            .checked_sub(1)
            .map(|last| (*range.end()).min(last));
        end.filter(|end| range.start() <= end)
            .map(|end| tree.range(layout::sequence_key(*range.start())..=layout::sequence_key(end)))
            .into_iter()
            .flatten()
    }
}

impl ExportSource for StoreReader {
    type Error = AuditError;

    fn node(&self) -> Result<NodeInfo, AuditError> {
        Ok(self.node.clone())
    }

    fn head(&self) -> Result<Option<ChainPoint>, AuditError> {
        self.records
            .range(..layout::sequence_key(self.next))
            .next_back()
            .transpose()
            .map_err(read_error)?
            .map(|(key, value)| {
                layout::decode_entry(&key, &value)
                    .map(|entry| ChainPoint::of(&entry))
                    .ok_or_else(|| damaged(&key))
            })
            .transpose()
    }

    fn prune_marker(&self) -> Result<Option<Checkpoint>, AuditError> {
        self.meta
            .get(layout::PRUNE_KEY)
            .map_err(read_error)?
            .map(|value| {
                layout::decode_checkpoint(&value).ok_or(AuditError::Damaged { sequence: 0 })
            })
            .transpose()
    }

    fn record_times(&self, progress: &mut dyn FnMut()) -> Result<Vec<(u64, i64)>, AuditError> {
        let mut times = Vec::new();
        for item in self.records.range(..layout::sequence_key(self.next)) {
            let (key, value) = item.map_err(read_error)?;
            let sequence = layout::decode_sequence(&key).ok_or_else(|| damaged(&key))?;
            let time = value
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| damaged(&key))?;
            times.push((sequence, i64::from_be_bytes(time)));
            progress();
        }
        Ok(times)
    }

    fn checkpoint_sequences(&self) -> Result<Vec<u64>, AuditError> {
        self.checkpoints
            .range(..layout::sequence_key(self.next))
            .keys()
            .map(|key| {
                let key = key.map_err(read_error)?;
                layout::decode_sequence(&key).ok_or_else(|| damaged(&key))
            })
            .collect()
    }

    fn checkpoint(&self, sequence: u64) -> Result<Checkpoint, AuditError> {
        let key = layout::sequence_key(sequence);
        self.checkpoints
            .get(key)
            .map_err(read_error)?
            .and_then(|value| layout::decode_checkpoint(&value))
            .ok_or_else(|| damaged(&key))
    }

    fn records(
        &self,
        range: RangeInclusive<u64>,
    ) -> impl Iterator<Item = Result<ChainEntry, AuditError>> {
        self.shown(&self.records, range).map(|item| {
            let (key, value) = item.map_err(read_error)?;
            layout::decode_entry(&key, &value).ok_or_else(|| damaged(&key))
        })
    }

    fn checkpoints(
        &self,
        range: RangeInclusive<u64>,
    ) -> impl Iterator<Item = Result<Checkpoint, AuditError>> {
        self.shown(&self.checkpoints, range).map(|item| {
            let (key, value) = item.map_err(read_error)?;
            layout::decode_checkpoint(&value).ok_or_else(|| damaged(&key))
        })
    }
}
