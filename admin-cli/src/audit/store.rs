//! A stopped node's audit store, read directly: the sled directory moatd writes as
//! `moat_core::audit::layout` lays it out.

use std::fs::{File, TryLockError};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use moat_core::audit::export::source::ExportSource;
use moat_core::audit::layout::{self, NodeInfo};
use moat_core::audit::{ChainEntry, ChainPoint, Checkpoint};

/// Why a store cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory holds no sled database.
    #[error(
        "there is no audit store in {} (moatd keeps it in audit/ under its state directory; \
         give that directory with --store)",
        .dir.display()
    )]
    Missing { dir: PathBuf },
    /// Another process holds the store: moatd is running.
    #[error(
        "the audit store in {} is locked by another process: moatd is running. A running node's \
         store must be exported through moatd (`moatctl audit export` without --store, over its \
         admin socket); to read the store directly, stop moatd first",
        .dir.display()
    )]
    Locked { dir: PathBuf },
    /// A snapshot sled left unfinished cannot be removed.
    #[error("cannot remove an unfinished sled snapshot in {}", .dir.display())]
    Cleanup {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// sled cannot open the store.
    #[error("cannot open the audit store in {}", .dir.display())]
    Open {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },
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

/// A stopped node's store, open for reading.
#[derive(Debug)]
pub struct StoppedStore {
    dir: PathBuf,
    records: sled::Tree,
    checkpoints: sled::Tree,
    meta: sled::Tree,
}

impl StoppedStore {
    /// Opens the store in `dir`, refusing to create one and to share it with a running
    /// moatd.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db_file = dir.join("db");
        let file = File::open(&db_file).map_err(|_| StoreError::Missing {
            dir: dir.to_path_buf(),
        })?;
        // sled locks its `db` file (flock) while open; look first, so that a running moatd
        // gets a clear message rather than sled's. The lock is released before sled opens.
        match file.try_lock() {
            Ok(()) => {
                drop(file);
                remove_unfinished_snapshots(dir).map_err(|source| StoreError::Cleanup {
                    dir: dir.to_path_buf(),
                    source,
                })?;
            }
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            Err(TryLockError::Error(_)) => {} // no locking here: sled will say what it finds
        }
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|source| StoreError::Open {
                dir: dir.to_path_buf(),
                source,
            })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Open {
                dir: dir.to_path_buf(),
                source,
            })
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            records: tree(layout::RECORDS)?,
            checkpoints: tree(layout::CHECKPOINTS)?,
            meta: tree(layout::META)?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_error(&self, source: sled::Error) -> StoreError {
        StoreError::Read {
            dir: self.dir.clone(),
            source,
        }
    }

    fn unreadable(&self, what: StoredItem) -> StoreError {
        StoreError::Unreadable {
            dir: self.dir.clone(),
            what,
        }
    }
}

impl ExportSource for StoppedStore {
    type Error = StoreError;

    /// The node that wrote the store.
    fn node(&self) -> Result<NodeInfo, StoreError> {
        let value = self
            .meta
            .get(layout::NODE_KEY)
            .map_err(|e| self.read_error(e))?
            .ok_or_else(|| StoreError::NoNode {
                dir: self.dir.clone(),
            })?;
        serde_json::from_slice(&value).map_err(|_| self.unreadable(StoredItem::NodeIdentity))
    }

    /// The prune marker, if records were pruned.
    fn prune_marker(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.meta
            .get(layout::PRUNE_KEY)
            .map_err(|e| self.read_error(e))?
            .map(|value| {
                layout::decode_checkpoint(&value)
                    .ok_or_else(|| self.unreadable(StoredItem::PruneMarker))
            })
            .transpose()
    }

    /// The last stored record.
    fn head(&self) -> Result<Option<ChainPoint>, StoreError> {
        let Some((key, value)) = self.records.last().map_err(|e| self.read_error(e))? else {
            return Ok(None);
        };
        let sequence =
            layout::decode_sequence(&key).ok_or_else(|| self.unreadable(StoredItem::Key))?;
        layout::decode_entry(&key, &value)
            .map(|entry| Some(ChainPoint::of(&entry)))
            .ok_or_else(|| self.unreadable(StoredItem::Record(sequence)))
    }

    /// Every stored record's sequence number and stored time, in order, calling `progress`
    /// for each. A record too short to hold a time is left out: it is reported if it falls
    /// in what is exported.
    fn record_times(&self, progress: &mut dyn FnMut()) -> Result<Vec<(u64, i64)>, StoreError> {
        let mut times = Vec::new();
        for item in self.records.iter() {
            let (key, value) = item.map_err(|e| self.read_error(e))?;
            let sequence =
                layout::decode_sequence(&key).ok_or_else(|| self.unreadable(StoredItem::Key))?;
            if let Some(time) = value.get(..8).and_then(|b| b.try_into().ok()) {
                times.push((sequence, i64::from_be_bytes(time)));
            }
            progress();
        }
        Ok(times)
    }

    /// The sequence numbers of the stored checkpoints, in order.
    fn checkpoint_sequences(&self) -> Result<Vec<u64>, StoreError> {
        self.checkpoints
            .iter()
            .keys()
            .map(|key| {
                let key = key.map_err(|e| self.read_error(e))?;
                layout::decode_sequence(&key).ok_or_else(|| self.unreadable(StoredItem::Key))
            })
            .collect()
    }

    /// The checkpoint stored at `sequence`.
    fn checkpoint(&self, sequence: u64) -> Result<Checkpoint, StoreError> {
        let unreadable = || self.unreadable(StoredItem::Checkpoint(sequence));
        let value = self
            .checkpoints
            .get(layout::sequence_key(sequence))
            .map_err(|e| self.read_error(e))?
            .ok_or_else(unreadable)?;
        layout::decode_checkpoint(&value).ok_or_else(unreadable)
    }

    /// The stored records with sequence numbers in `range`, in order.
    fn records(
        &self,
        range: RangeInclusive<u64>,
    ) -> impl Iterator<Item = Result<ChainEntry, StoreError>> {
        let keys = layout::sequence_key(*range.start())..=layout::sequence_key(*range.end());
        self.records.range(keys).map(|item| {
            let (key, value) = item.map_err(|e| self.read_error(e))?;
            let sequence =
                layout::decode_sequence(&key).ok_or_else(|| self.unreadable(StoredItem::Key))?;
            layout::decode_entry(&key, &value)
                .ok_or_else(|| self.unreadable(StoredItem::Record(sequence)))
        })
    }

    /// The stored checkpoints with sequence numbers in `range`, in order.
    fn checkpoints(
        &self,
        range: RangeInclusive<u64>,
    ) -> impl Iterator<Item = Result<Checkpoint, StoreError>> {
        let keys = layout::sequence_key(*range.start())..=layout::sequence_key(*range.end());
        self.checkpoints.range(keys).map(|item| {
            let (key, value) = item.map_err(|e| self.read_error(e))?;
            let sequence =
                layout::decode_sequence(&key).ok_or_else(|| self.unreadable(StoredItem::Key))?;
            layout::decode_checkpoint(&value)
                .ok_or_else(|| self.unreadable(StoredItem::Checkpoint(sequence)))
        })
    }
}

/// Removes snapshots sled began and never finished (a full disk or a crash mid-write):
/// sled 0.34 refuses a store holding one, and rebuilds its snapshot from the intact log.
fn remove_unfinished_snapshots(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(layout::is_unfinished_snapshot)
        {
            eprintln!(
                "removing an unfinished sled snapshot: {}",
                entry.path().display()
            );
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
