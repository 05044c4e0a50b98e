//! Reading the live store for an export, beside the committer that keeps appending: sled
//! trees are shared handles, so the reader sees a consistent prefix of the chain while new
//! records land after it.

use std::ops::RangeInclusive;

use moat_core::audit::export::source::ExportSource;
use moat_core::audit::layout::{self, NodeInfo};
use moat_core::audit::{ChainEntry, Checkpoint};

use super::AuditError;

/// Read handles on the store's trees.
#[derive(Clone)]
pub struct StoreReader {
    pub(super) node: NodeInfo,
    pub(super) records: sled::Tree,
    pub(super) checkpoints: sled::Tree,
    pub(super) meta: sled::Tree,
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

impl ExportSource for StoreReader {
    type Error = AuditError;

    fn node(&self) -> Result<NodeInfo, AuditError> {
        Ok(self.node.clone())
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
        for item in self.records.iter() {
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
            .iter()
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
        let keys = layout::sequence_key(*range.start())..=layout::sequence_key(*range.end());
        self.records.range(keys).map(|item| {
            let (key, value) = item.map_err(read_error)?;
            layout::decode_entry(&key, &value).ok_or_else(|| damaged(&key))
        })
    }

    fn checkpoints(
        &self,
        range: RangeInclusive<u64>,
    ) -> impl Iterator<Item = Result<Checkpoint, AuditError>> {
        let keys = layout::sequence_key(*range.start())..=layout::sequence_key(*range.end());
        self.checkpoints.range(keys).map(|item| {
            let (key, value) = item.map_err(read_error)?;
            layout::decode_checkpoint(&value).ok_or_else(|| damaged(&key))
        })
    }
}
