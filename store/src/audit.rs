//! The sled audit store, laid out as `moat_core::audit::layout` says, read as the one
//! [`ExportSource`] of both binaries: moatd's live store (beside the committer that keeps
//! appending, its view cut at the chain head it had made durable when the export began) and
//! a stopped node's store, which moatctl opens itself.
//!
//! sled trees are shared handles, so a reader sees a consistent prefix of the chain while
//! new records land after it.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use moat_core::audit::export::source::ExportSource;
use moat_core::audit::layout::{self, NodeInfo};
use moat_core::audit::{ChainEntry, ChainPoint, Checkpoint};

#[cfg(test)]
mod tests;

/// Why the store cannot be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    /// sled fails while reading.
    #[error("cannot read the audit store in {}", .dir.display())]
    Read {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// The store has no node identity: it is not a moat audit store, or was never used.
    #[error(
        "the store in {} holds no node identity (tree \"{}\", key \"{}\"): it is not a moat \
         audit store, or moatd never opened it",
        .dir.display(), layout::META, layout::NODE_KEY
    )]
    NoNode { dir: PathBuf },
    /// A stored value cannot be decoded.
    #[error(
        "the audit store in {} is damaged: {what} cannot be read; the store must be repaired \
         from a backup, or exported around it with --since/--until",
        .dir.display()
    )]
    Unreadable { dir: PathBuf, what: StoredItem },
}

/// A value in the store, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredItem {
    Record(u64),
    Checkpoint(u64),
    /// A key in the records or checkpoints tree that is not a sequence number.
    Key,
    NodeIdentity,
    PruneMarker,
}

impl std::fmt::Display for StoredItem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredItem::Record(sequence) => write!(f, "record {sequence}"),
            StoredItem::Checkpoint(sequence) => write!(f, "the checkpoint at record {sequence}"),
            StoredItem::Key => write!(f, "a key that is not a sequence number"),
            StoredItem::NodeIdentity => write!(f, "the node identity"),
            StoredItem::PruneMarker => write!(f, "the prune marker"),
        }
    }
}

/// Read handles on an audit store's trees.
#[derive(Clone)]
pub struct AuditReader {
    dir: PathBuf,
    records: sled::Tree,
    checkpoints: sled::Tree,
    meta: sled::Tree,
    /// Records and checkpoints from this sequence number on are not shown; `None` shows
    /// everything stored, now and later.
    next: Option<u64>,
}

impl std::fmt::Debug for AuditReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditReader")
            .field("dir", &self.dir)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl AuditReader {
    /// Opens the store's trees in `db`, the sled database in `dir`.
    pub fn open(dir: &Path, db: &sled::Db) -> Result<Self, ReadError> {
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| ReadError::Read {
                dir: dir.to_path_buf(),
                source,
            })
        };
        Ok(Self::from_trees(
            dir,
            tree(layout::RECORDS)?,
            tree(layout::CHECKPOINTS)?,
            tree(layout::META)?,
        ))
    }

    /// A reader on trees already open (the writer's own handles).
    pub fn from_trees(
        dir: &Path,
        records: sled::Tree,
        checkpoints: sled::Tree,
        meta: sled::Tree,
    ) -> Self {
        Self {
            dir: dir.to_path_buf(),
            records,
            checkpoints,
            meta,
            next: None,
        }
    }

    /// This view cut before sequence number `next`: what a writer had made durable.
    pub fn before(self, next: u64) -> Self {
        Self {
            next: Some(next),
            ..self
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_error(&self, source: sled::Error) -> ReadError {
        ReadError::Read {
            dir: self.dir.clone(),
            source,
        }
    }

    fn unreadable(&self, what: StoredItem) -> ReadError {
        ReadError::Unreadable {
            dir: self.dir.clone(),
            what,
        }
    }

    fn sequence(&self, key: &[u8]) -> Result<u64, ReadError> {
        layout::decode_sequence(key).ok_or_else(|| self.unreadable(StoredItem::Key))
    }

    /// The entries of `tree` (records or checkpoints) with sequence numbers in `range`, cut
    /// at what this reader shows.
    fn shown(
        &self,
        tree: &sled::Tree,
        range: RangeInclusive<u64>,
    ) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + use<> {
        let last = match self.next {
            Some(next) => next.checked_sub(1).map(|last| (*range.end()).min(last)),
            None => Some(*range.end()),
        };
        last.filter(|last| range.start() <= last)
            .map(|last| {
                tree.range(layout::sequence_key(*range.start())..=layout::sequence_key(last))
            })
            .into_iter()
            .flatten()
    }

    /// Every entry of `tree` this reader shows, keys that are not sequence numbers
    /// included (they are damage to report).
    fn all_shown(&self, tree: &sled::Tree) -> sled::Iter {
        match self.next {
            None => tree.iter(),
            Some(next) => tree.range(..layout::sequence_key(next)),
        }
    }
}

impl ExportSource for AuditReader {
    type Error = ReadError;

    /// The node that wrote the store.
    fn node(&self) -> Result<NodeInfo, ReadError> {
        let value = self
            .meta
            .get(layout::NODE_KEY)
            .map_err(|e| self.read_error(e))?
            .ok_or_else(|| ReadError::NoNode {
                dir: self.dir.clone(),
            })?;
        serde_json::from_slice(&value).map_err(|_| self.unreadable(StoredItem::NodeIdentity))
    }

    /// The prune marker, if records were pruned.
    fn prune_marker(&self) -> Result<Option<Checkpoint>, ReadError> {
        self.meta
            .get(layout::PRUNE_KEY)
            .map_err(|e| self.read_error(e))?
            .map(|value| {
                layout::decode_checkpoint(&value)
                    .ok_or_else(|| self.unreadable(StoredItem::PruneMarker))
            })
            .transpose()
    }

    /// The last record shown.
    fn head(&self) -> Result<Option<ChainPoint>, ReadError> {
        let Some((key, value)) = self
            .all_shown(&self.records)
            .next_back()
            .transpose()
            .map_err(|e| self.read_error(e))?
        else {
            return Ok(None);
        };
        let sequence = self.sequence(&key)?;
        layout::decode_entry(&key, &value)
            .map(|entry| Some(ChainPoint::of(&entry)))
            .ok_or_else(|| self.unreadable(StoredItem::Record(sequence)))
    }

    /// Every shown record's sequence number and stored time, in order, calling `progress`
    /// for each. A record too short to hold its time is damage, named here: an export that
    /// left it out would choose its range around a hole it cannot see.
    fn record_times(&self, progress: &mut dyn FnMut()) -> Result<Vec<(u64, i64)>, ReadError> {
        let mut times = Vec::new();
        for item in self.all_shown(&self.records) {
            let (key, value) = item.map_err(|e| self.read_error(e))?;
            let sequence = self.sequence(&key)?;
            let time = value
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| self.unreadable(StoredItem::Record(sequence)))?;
            times.push((sequence, i64::from_be_bytes(time)));
            progress();
        }
        Ok(times)
    }

    /// The sequence numbers of the shown checkpoints, in order.
    fn checkpoint_sequences(&self) -> Result<Vec<u64>, ReadError> {
        self.all_shown(&self.checkpoints)
            .map(|item| {
                let (key, _) = item.map_err(|e| self.read_error(e))?;
                self.sequence(&key)
            })
            .collect()
    }

    /// The checkpoint stored at `sequence`.
    fn checkpoint(&self, sequence: u64) -> Result<Checkpoint, ReadError> {
        let unreadable = || self.unreadable(StoredItem::Checkpoint(sequence));
        let value = self
            .checkpoints
            .get(layout::sequence_key(sequence))
            .map_err(|e| self.read_error(e))?
            .ok_or_else(unreadable)?;
        layout::decode_checkpoint(&value).ok_or_else(unreadable)
    }

    /// The shown records with sequence numbers in `range`, in order.
    fn records(
        &self,
        range: RangeInclusive<u64>,
    ) -> impl Iterator<Item = Result<ChainEntry, ReadError>> {
        self.shown(&self.records, range).map(|item| {
            let (key, value) = item.map_err(|e| self.read_error(e))?;
            let sequence = self.sequence(&key)?;
            layout::decode_entry(&key, &value)
                .ok_or_else(|| self.unreadable(StoredItem::Record(sequence)))
        })
    }

    /// The shown checkpoints with sequence numbers in `range`, in order.
    fn checkpoints(
        &self,
        range: RangeInclusive<u64>,
    ) -> impl Iterator<Item = Result<Checkpoint, ReadError>> {
        self.shown(&self.checkpoints, range).map(|item| {
            let (key, value) = item.map_err(|e| self.read_error(e))?;
            let sequence = self.sequence(&key)?;
            layout::decode_checkpoint(&value)
                .ok_or_else(|| self.unreadable(StoredItem::Checkpoint(sequence)))
        })
    }
}

/// Removes the snapshots sled began and never finished in `dir` (a full disk or a crash
/// mid-write; see [`layout::is_unfinished_snapshot`]): sled 0.34 refuses a store holding
/// one, and rebuilds its snapshot from the intact log. Only safe while no process has the
/// store open. `report` hears each file before it is removed.
pub fn remove_unfinished_snapshots(
    dir: &Path,
    report: &mut dyn FnMut(&Path),
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(layout::is_unfinished_snapshot)
        {
            report(&entry.path());
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
