//! A stopped node's audit store, opened directly: the sled directory moatd writes, read
//! through `moat_store::audit::AuditReader`, the reader moatd exports its live store with.

use std::fs::{File, TryLockError};
use std::path::{Path, PathBuf};

use moat_store::audit::{AuditReader, ReadError, remove_unfinished_snapshots};

/// Why a store cannot be opened or read.
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
    /// The store cannot be read, or holds damage.
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// Opens the store in `dir` for reading, refusing to create one and to share it with a
/// running moatd.
pub fn open_stopped(dir: &Path) -> Result<AuditReader, StoreError> {
    let db_file = dir.join("db");
    let file = File::open(&db_file).map_err(|_| StoreError::Missing {
        dir: dir.to_path_buf(),
    })?;
    // sled locks its `db` file (flock) while open; look first, so that a running moatd
    // gets a clear message rather than sled's. The lock is released before sled opens.
    match file.try_lock() {
        Ok(()) => {
            drop(file);
            remove_unfinished_snapshots(dir, &mut |file| {
                eprintln!("removing an unfinished sled snapshot: {}", file.display());
            })
            .map_err(|source| StoreError::Cleanup {
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
    AuditReader::open(dir, &db).map_err(|e| match e {
        ReadError::Read { dir, source } => StoreError::Open { dir, source },
        other => StoreError::Read(other),
    })
}
