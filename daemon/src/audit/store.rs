//! The sled store under the state directory, laid out as `moat_core::audit::layout` says:
//! entries by sequence number, checkpoints, the node's identity and the prune marker.
//!
//! `sled::Db::flush` does not reach the disk's cache on Linux (it uses `sync_file_range`),
//! and sled never syncs the blob files it keeps big pages in ([`blobs`]), so
//! [`Store::make_durable`] also syncs sled's files and directories: once it returns, what
//! was written survives a crash or a power cut.

use std::fs::File;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use moat_core::audit::export::source::ExportSource;
use moat_core::audit::layout::{self, NodeInfo};
use moat_core::audit::{ChainEntry, Checkpoint, CheckpointKind, GENESIS};

use moat_store::audit::{AuditReader, ReadError, StoredItem, remove_unfinished_snapshots};

use super::AuditError;
use super::reader::ExportSnapshot;
use blobs::BlobFiles;

mod blobs;

/// How long opening waits for a store that is still locked.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the chain stands: the next sequence number and the hash it continues from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHead {
    pub next: u64,
    pub previous: [u8; 32],
}

/// One record to chain: when it was made and its encrypted body.
#[derive(Debug)]
pub struct Sealed {
    pub unix_ms: i64,
    pub ciphertext: Vec<u8>,
}

/// What a prune removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub through: u64,
    pub records: usize,
}

/// The open store.
pub struct Store {
    dir: PathBuf,
    node: NodeInfo,
    db: sled::Db,
    records: sled::Tree,
    checkpoints: sled::Tree,
    meta: sled::Tree,
    blobs: BlobFiles,
    head: ChainHead,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("node", &self.node.node_id)
            .field("head", &self.head.next)
            .finish_non_exhaustive()
    }
}

fn write_error(e: impl std::fmt::Display) -> AuditError {
    AuditError::Write(e.to_string())
}

impl Store {
    /// Opens (or creates) the store of `node` in `dir` and finds where the chain stands. A
    /// store written by another node id or key is refused: appending to it would make a
    /// chain that verifies under neither.
    pub fn open(dir: &Path, node: &NodeInfo) -> Result<Self, AuditError> {
        let open_error = |reason: String| AuditError::Open {
            dir: dir.to_path_buf(),
            reason,
        };
        create_private_dir(dir).map_err(|e| open_error(e.to_string()))?;
        // sled locks its log while open: only with the lock free is it safe to tidy up.
        // A store this process just closed may stay locked for a moment while sled's
        // background work on it ends.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        while let Ok(Err(std::fs::TryLockError::WouldBlock)) =
            File::open(dir.join("db")).map(|file| file.try_lock())
        {
            if std::time::Instant::now() >= deadline {
                return Err(open_error(
                    "another process has it open (a second moatd, or moatctl audit export)".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        remove_unfinished_snapshots(dir, &mut |file| {
            tracing::warn!(file = %file.display(), "removing an unfinished sled snapshot");
        })
        .map_err(|e| open_error(e.to_string()))?;
        let db = sled::Config::new()
            .path(dir)
            // moatd flushes (and syncs) at every commit; a background flusher would only
            // race it.
            .flush_every_ms(None)
            .open()
            .map_err(|e| open_error(e.to_string()))?;
        let blobs = BlobFiles::watch(dir).map_err(|e| open_error(e.to_string()))?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| open_error(e.to_string()));
        let records = tree(layout::RECORDS)?;
        let checkpoints = tree(layout::CHECKPOINTS)?;
        let meta = tree(layout::META)?;
        match meta
            .get(layout::NODE_KEY)
            .map_err(|e| open_error(e.to_string()))?
        {
            Some(stored) => {
                let stored: NodeInfo = serde_json::from_slice(&stored)
                    .map_err(|_| open_error("its node identity is damaged".into()))?;
                if stored != *node {
                    return Err(AuditError::ForeignStore {
                        dir: dir.to_path_buf(),
                        stored: stored.node_id,
                        configured: node.node_id.clone(),
                    });
                }
            }
            None => {
                let value = serde_json::to_vec(node).map_err(|e| open_error(e.to_string()))?;
                meta.insert(layout::NODE_KEY, value)
                    .map_err(|e| open_error(e.to_string()))?;
            }
        }
        let mut store = Self {
            dir: dir.to_path_buf(),
            node: node.clone(),
            db,
            records,
            checkpoints,
            meta,
            blobs,
            head: ChainHead {
                next: 0,
                previous: GENESIS,
            },
        };
        store.head = store.find_head()?;
        store.sync_all()?;
        Ok(store)
    }

    /// The chain head: after the last record, or after the prune marker of an emptied
    /// store.
    fn find_head(&self) -> Result<ChainHead, AuditError> {
        if let Some((key, value)) = self.records.last().map_err(write_error)? {
            let sequence = layout::decode_sequence(&key).unwrap_or(u64::MAX);
            let entry =
                layout::decode_entry(&key, &value).ok_or(AuditError::Damaged { sequence })?;
            return Ok(ChainHead {
                next: entry.sequence + 1,
                previous: entry.hash,
            });
        }
        Ok(match self.prune_marker()? {
            Some(marker) => ChainHead {
                next: marker.sequence + 1,
                previous: marker.head,
            },
            None => ChainHead {
                next: 0,
                previous: GENESIS,
            },
        })
    }

    pub fn head(&self) -> ChainHead {
        self.head
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Read handles on everything stored, now and later.
    pub fn reader(&self) -> AuditReader {
        AuditReader::from_trees(
            &self.dir,
            self.records.clone(),
            self.checkpoints.clone(),
            self.meta.clone(),
        )
    }

    /// The view an export signed with `key` takes, beside the committer: what is stored up
    /// to the chain head now (durable, since the committer only moves the head once it is).
    pub fn snapshot(&self, key: &SigningKey) -> ExportSnapshot {
        ExportSnapshot::new(self.reader().before(self.head.next), key.clone())
    }

    /// Chains `batch` after the head and makes it durable; returns the first sequence
    /// number. On error nothing is acknowledged and the store must be reopened (sled keeps
    /// failing after an I/O error), which finds the head again from what reached the disk.
    pub fn append(&mut self, batch: Vec<Sealed>) -> Result<u64, AuditError> {
        let first = self.head.next;
        let mut head = self.head;
        let mut writes = sled::Batch::default();
        for sealed in batch {
            let entry = ChainEntry::new(
                &self.node.node_id,
                &head.previous,
                head.next,
                sealed.unix_ms,
                sealed.ciphertext,
            );
            writes.insert(
                &layout::sequence_key(entry.sequence),
                layout::encode_entry(&entry),
            );
            head = ChainHead {
                next: entry.sequence + 1,
                previous: entry.hash,
            };
        }
        self.records.apply_batch(writes).map_err(write_error)?;
        self.make_durable()?;
        self.head = head;
        Ok(first)
    }

    /// Signs a checkpoint over the chain head (if any record is unsigned) and stores it
    /// durably.
    pub fn checkpoint(
        &self,
        key: &SigningKey,
        unix_time: i64,
    ) -> Result<Option<Checkpoint>, AuditError> {
        let Some(sequence) = self.head.next.checked_sub(1) else {
            return Ok(None);
        };
        if self.latest_checkpoint()?.map(|c| c.sequence) == Some(sequence) {
            return Ok(None);
        }
        if self.prune_marker()?.map(|m| m.sequence) == Some(sequence) {
            return Ok(None);
        }
        let checkpoint = Checkpoint::sign(
            key,
            &self.node.node_id,
            sequence,
            self.head.previous,
            unix_time,
        );
        let value = serde_json::to_vec(&checkpoint).map_err(write_error)?;
        self.checkpoints
            .insert(layout::sequence_key(sequence), value)
            .map_err(write_error)?;
        self.make_durable()?;
        Ok(Some(checkpoint))
    }

    pub fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        self.checkpoints
            .last()
            .map_err(write_error)?
            .map(|(key, value)| decode_checkpoint(&key, &value))
            .transpose()
    }

    /// The newest time the chain holds signed, in milliseconds since the epoch: its latest
    /// checkpoint's or its prune marker's, whichever is later. `None` before the first.
    pub fn newest_signed_ms(&self) -> Result<Option<i64>, AuditError> {
        let checkpoint = self.latest_checkpoint()?.map(|c| c.unix_time);
        let marker = self.prune_marker()?.map(|m| m.unix_time);
        Ok(checkpoint.max(marker).map(|secs| secs.saturating_mul(1000)))
    }

    pub fn prune_marker(&self) -> Result<Option<Checkpoint>, AuditError> {
        ExportSource::prune_marker(&self.reader()).map_err(AuditError::from)
    }

    /// Removes the records made before `cutoff_ms` that a checkpoint covers: everything up
    /// to the latest such checkpoint. A signed prune marker at that checkpoint is stored
    /// first, so the rest verifies from it, and a crash half-way leaves a store that the
    /// next prune finishes.
    pub fn prune(
        &self,
        key: &SigningKey,
        cutoff_ms: i64,
        unix_time: i64,
    ) -> Result<Option<Pruned>, AuditError> {
        let mut boundary = None;
        for item in self.checkpoints.iter() {
            let (ckey, value) = item.map_err(write_error)?;
            let checkpoint = decode_checkpoint(&ckey, &value)?;
            let stored = self
                .records
                .get(layout::sequence_key(checkpoint.sequence))
                .map_err(write_error)?;
            let Some(stored) = stored else {
                continue; // already pruned
            };
            let entry = layout::decode_entry(&ckey, &stored).ok_or(AuditError::Damaged {
                sequence: checkpoint.sequence,
            })?;
            if entry.unix_ms >= cutoff_ms {
                break;
            }
            boundary = Some(checkpoint);
        }
        let previous = self.prune_marker()?;
        let advance =
            boundary.filter(|b| previous.as_ref().is_none_or(|p| p.sequence < b.sequence));
        let marker = match (advance, previous) {
            (Some(boundary), _) => {
                let marker = Checkpoint::sign_kind(
                    CheckpointKind::Prune,
                    key,
                    &self.node.node_id,
                    boundary.sequence,
                    boundary.head,
                    unix_time,
                );
                let value = serde_json::to_vec(&marker).map_err(write_error)?;
                self.meta
                    .insert(layout::PRUNE_KEY, value)
                    .map_err(write_error)?;
                self.make_durable()?;
                marker
            }
            // Nothing new to prune; finish a prune a crash interrupted, if any.
            (_, Some(previous)) => previous,
            (None, None) => return Ok(None),
        };
        let removed = remove_through(&self.records, marker.sequence)?;
        remove_through(&self.checkpoints, marker.sequence)?;
        self.make_durable()?;
        Ok((removed > 0).then_some(Pruned {
            through: marker.sequence,
            records: removed,
        }))
    }

    /// sled's flush, then fsync of its log file and of every blob file made since the last
    /// call. sled appends to the one log file it created at open; [`Store::open`] syncs the
    /// configuration file and the directory that names them.
    pub fn make_durable(&self) -> Result<(), AuditError> {
        // sled writes a blob while the write that needs it runs, before the log entry
        // pointing at it is flushed: synced first, it is on disk before that entry can be.
        self.blobs.sync_new().map_err(write_error)?;
        self.db.flush().map_err(write_error)?;
        // And any a reader's consolidation of a page made meanwhile, before the caller
        // acknowledges anything.
        self.blobs.sync_new().map_err(write_error)?;
        sync_path(&self.dir.join("db")).map_err(write_error)
    }

    /// Everything sled keeps, and the directory entries naming it.
    fn sync_all(&self) -> Result<(), AuditError> {
        self.make_durable()?;
        sync_path(&self.dir.join("conf")).map_err(write_error)?;
        sync_path(&self.dir).map_err(write_error)
    }
}

/// The store's directory, readable by moatd's user only.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn sync_path(path: &Path) -> std::io::Result<()> {
    match File::open(path) {
        Ok(file) => file.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the keys of `tree` up to sequence `through`; returns how many.
fn remove_through(tree: &sled::Tree, through: u64) -> Result<usize, AuditError> {
    let mut writes = sled::Batch::default();
    let mut count = 0;
    for item in tree.range(..=layout::sequence_key(through)) {
        let (key, _) = item.map_err(write_error)?;
        writes.remove(key);
        count += 1;
    }
    tree.apply_batch(writes).map_err(write_error)?;
    Ok(count)
}

fn decode_checkpoint(key: &[u8], value: &[u8]) -> Result<Checkpoint, AuditError> {
    layout::decode_checkpoint(value).ok_or(AuditError::Damaged {
        sequence: layout::decode_sequence(key).unwrap_or(u64::MAX),
    })
}

impl From<ReadError> for AuditError {
    /// Damage keeps its sequence number; anything else is a failure to read.
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::Unreadable {
                what: StoredItem::Record(sequence) | StoredItem::Checkpoint(sequence),
                ..
            } => AuditError::Damaged { sequence },
            ReadError::Unreadable {
                what: StoredItem::PruneMarker,
                ..
            } => AuditError::Damaged { sequence: 0 },
            other => AuditError::Write(format!("cannot read the audit store: {other}")),
        }
    }
}
