//! moatd's pid file (`[admin] pid_file`): how `moatctl policy reload` finds the process to
//! signal, never by its name, which any local user can give a process.
//!
//! moatd writes its pid and holds a POSIX write lock on the file for as long as it serves.
//! The kernel tells anyone who can read the file which process holds that lock (fcntl
//! `F_GETLK`), so moatctl signals only a pid that the file names and that holds its lock: a
//! file left by a moatd that died is held by nobody, and nobody but moatd's user (or root)
//! can take a write lock on it. The lock is released by the kernel when moatd exits, however
//! it exits; the file itself is removed when moatd stops serving.
//!
//! POSIX locks belong to the process and end when it closes any descriptor of the file:
//! moatd opens this file nowhere else.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::libc;

/// Tries before giving up on a file that keeps being replaced while it is locked.
const ATTEMPTS: usize = 3;

/// Why the pid file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error("cannot write the pid file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another moatd{} holds the pid file {path}; give this one its own [admin] pid_file",
        .holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Held { path: PathBuf, holder: Option<i32> },
}

/// The written, locked pid file; removed when dropped (the lock ends with the process).
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    // Holds the lock: closing it would release it.
    _file: File,
}

impl PidFile {
    /// Writes this process's pid to `path` (0644, so that admins can read it) and locks it.
    pub fn create(path: &Path) -> Result<Self, PidFileError> {
        let write_error = |source| PidFileError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(write_error)?;
        }
        for _ in 0..ATTEMPTS {
            // No truncation before the lock is ours: the file may be a live moatd's.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o644)
                .custom_flags(OFlag::O_NOFOLLOW.bits())
                .open(path)
                .map_err(write_error)?;
            match fcntl(&file, FcntlArg::F_SETLK(&whole_file(libc::F_WRLCK))) {
                Ok(_) => {}
                Err(Errno::EAGAIN | Errno::EACCES) => {
                    return Err(PidFileError::Held {
                        path: path.to_path_buf(),
                        holder: holder(&file),
                    });
                }
                Err(errno) => return Err(write_error(errno.into())),
            }
            // A moatd that was stopping may have removed the name after we opened it: the
            // lock must be on the file the name leads to.
            if !same_file(&file, path).map_err(write_error)? {
                continue;
            }
            file.set_len(0).map_err(write_error)?;
            (&file)
                .write_all(format!("{}\n", std::process::id()).as_bytes())
                .map_err(write_error)?;
            // The service's umask (0077) would keep admins from reading it.
            file.set_permissions(std::fs::Permissions::from_mode(0o644))
                .map_err(write_error)?;
            return Ok(Self {
                path: path.to_path_buf(),
                _file: file,
            });
        }
        Err(write_error(std::io::Error::other(
            "it was replaced each time it was locked",
        )))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A lock description covering the whole file.
fn whole_file(kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// The pid holding a lock that conflicts with a write lock on `file`, if the kernel says.
fn holder(file: &File) -> Option<i32> {
    let mut lock = whole_file(libc::F_WRLCK);
    fcntl(file, FcntlArg::F_GETLK(&mut lock)).ok()?;
    (lock.l_type != libc::F_UNLCK as libc::c_short && lock.l_pid > 0).then_some(lock.l_pid)
}

fn same_file(file: &File, path: &Path) -> std::io::Result<bool> {
    let open = file.metadata()?;
    Ok(match std::fs::symlink_metadata(path) {
        Ok(named) => named.dev() == open.dev() && named.ino() == open.ino(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_names_this_process_readably_and_goes_with_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("run").join("moatd.pid");
        let pid_file = PidFile::create(&path).expect("written");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, format!("{}\n", std::process::id()));
        let mode = std::fs::metadata(&path).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o644);
        drop(pid_file);
        assert!(!path.exists());
    }

    #[test]
    fn a_stale_pid_file_is_taken_over_and_a_symlink_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("moatd.pid");
        std::fs::write(&path, "999999999\nleft over by a moatd that died\n").expect("write");
        let pid_file = PidFile::create(&path).expect("taken over");
        let text = std::fs::read_to_string(pid_file.path()).expect("read");
        assert_eq!(text, format!("{}\n", std::process::id()));
        drop(pid_file);

        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        assert!(matches!(
            PidFile::create(&path),
            Err(PidFileError::Write { .. })
        ));
        assert!(!target.exists());
    }
}
