//! sled's blob files, made durable with the log that points at them.
//!
//! sled 0.34 writes any page bigger than a quarter of a log segment (128 KiB less a header,
//! with the default 512 KiB segments) to a file of its own, `blobs/<lsn>`, and puts only a
//! pointer to it in the log. It never syncs these files nor the directory that names them,
//! and `Db::flush` syncs only the log. Big records go there, and so do ordinary ones: a
//! leaf holds up to 16 records, and when sled consolidates a leaf whose records add up past
//! the threshold it rewrites the whole leaf, records acknowledged long ago included, as a
//! new blob. After a power cut, a pointer whose blob is missing is skipped on recovery and
//! one whose blob is torn ends recovery there: either way acknowledged records are gone.
//!
//! [`BlobFiles`] learns of every file created in the directory from the kernel (inotify,
//! so no listing of a directory that grows with the trail) and syncs each, then the
//! directory, before a commit is acknowledged.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::sync_path;

/// The directory sled keeps blobs in, inside the store.
const BLOBS: &str = "blobs";

/// The blob directory of an open store, watched for new files.
#[derive(Debug)]
pub(super) struct BlobFiles {
    dir: PathBuf,
    created: Inotify,
}

impl BlobFiles {
    /// Watches `store`'s blob directory (sled made it at open) and makes what it already
    /// holds durable: a moatd that stopped a moment ago may have left blobs in the page
    /// cache only. Must be called before anything is written to the store.
    pub(super) fn watch(store: &Path) -> io::Result<Self> {
        let dir = store.join(BLOBS);
        std::fs::create_dir_all(&dir)?;
        let created = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        created.add_watch(
            &dir,
            AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ONLYDIR,
        )?;
        let directory = File::open(&dir)?;
        if std::fs::read_dir(&dir)?.next().is_some() {
            // One call for all of them: a sync of each would flush the disk's cache once
            // per file, and a long trail has many.
            nix::unistd::syncfs(&directory)?;
        }
        directory.sync_all()?;
        Ok(Self { dir, created })
    }

    /// Syncs every blob file created since the last call, then the directory naming them;
    /// returns how many there were.
    pub(super) fn sync_new(&self) -> io::Result<usize> {
        let mut names = Vec::new();
        let mut overflowed = false;
        loop {
            let events = match self.created.read_events() {
                Ok(events) => events,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    overflowed = true;
                } else if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory itself went away: nothing it gets from now on is seen.
                    return Err(io::Error::other(format!(
                        "sled's blob directory {} was removed",
                        self.dir.display()
                    )));
                } else if let Some(name) = event.name {
                    names.push(name);
                }
            }
        }
        if overflowed {
            // More files came than the kernel queues events for: sync every one there is.
            names = self.all_names()?;
        }
        if names.is_empty() {
            return Ok(0);
        }
        for name in &names {
            // A blob sled removed again (an abandoned write) needs nothing.
            sync_path(&self.dir.join(name))?;
        }
        File::open(&self.dir)?.sync_all()?;
        Ok(names.len())
    }

    fn all_names(&self) -> io::Result<Vec<OsString>> {
        std::fs::read_dir(&self.dir)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::store::{Sealed, Store};
    use moat_core::audit::layout::NodeInfo;

    #[test]
    fn each_new_blob_is_reported_once() {
        let store = tempfile::tempdir().expect("temp dir");
        let blobs = BlobFiles::watch(store.path()).expect("watches");
        assert_eq!(blobs.sync_new().expect("syncs"), 0);
        for name in ["100", "200"] {
            std::fs::write(store.path().join(BLOBS).join(name), b"blob").expect("write");
        }
        assert_eq!(blobs.sync_new().expect("syncs"), 2);
        assert_eq!(blobs.sync_new().expect("syncs"), 0);
        // Created and removed before the commit: nothing to sync, and no error.
        let gone = store.path().join(BLOBS).join("300");
        std::fs::write(&gone, b"blob").expect("write");
        std::fs::remove_file(&gone).expect("remove");
        assert_eq!(blobs.sync_new().expect("syncs"), 1);
    }

    #[test]
    fn a_removed_blob_directory_fails_the_commit() {
        let store = tempfile::tempdir().expect("temp dir");
        let blobs = BlobFiles::watch(store.path()).expect("watches");
        std::fs::remove_dir(store.path().join(BLOBS)).expect("remove");
        assert!(blobs.sync_new().is_err());
    }

    /// The store's commit leaves no blob unsynced, and sled does put a big record in a
    /// blob file (the reason this module exists).
    #[test]
    fn a_commit_syncs_the_blob_of_a_big_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = NodeInfo {
            node_id: "node-a".into(),
            public_key: [1; 32],
        };
        let mut store = Store::open(dir.path(), &node).expect("opens");
        let big = Sealed {
            unix_ms: 1,
            ciphertext: vec![0x5a; 300 * 1024],
        };
        store.append(vec![big]).expect("durable");
        let files = std::fs::read_dir(dir.path().join(BLOBS))
            .expect("blob dir")
            .count();
        assert!(files >= 1, "sled wrote no blob file for a 300 KiB record");
        assert_eq!(store.blobs.sync_new().expect("syncs"), 0);
    }
}
