//! Asking the running moatd to reload its policy: find it by its pid file, make sure the
//! pid is the live moatd that wrote the file, send it SIGHUP.
//!
//! Never by process name: any local user can start a process called moatd, and a second
//! moatd may run beside the one meant. moatd writes its pid to `[admin] pid_file`
//! (`/run/moat/moatd.pid` by default) and holds a POSIX write lock on it while it serves.
//! The signal goes only where all of this holds:
//!
//! - the pid file is a regular file, not a symbolic link, that only its owner can write, in
//!   a directory that only its owner or root can write;
//! - a process holds the file's write lock, as the kernel reports (`F_GETLK`), and it is
//!   the pid the file names: a file left by a moatd that died is held by nobody, and only
//!   moatd's user or root can take a write lock on it;
//! - that process is named moatd and runs as the user that owns the file.
//!
//! The signal goes through a pidfd opened while the lock holder was alive and checked again
//! after, so a pid freed and reused in between is never signalled.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::libc;
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

/// The daemon's process name, as `/proc/PID/status` shows it.
pub const DAEMON_NAME: &str = "moatd";

/// Where moatd writes its pid unless `[admin] pid_file` says otherwise.
pub const DEFAULT_PID_FILE: &str = "/run/moat/moatd.pid";

/// Why moatd was not signalled.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// No pid file where it was looked for.
    #[error(
        "no pid file at {}: moatd is not running, or its [admin] pid_file is elsewhere (name it with --pid-file)",
        .0.display()
    )]
    NoPidFile(PathBuf),
    /// The pid file (or its directory) cannot be read.
    #[error("cannot read the pid file {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The pid file could have been written by someone other than moatd.
    #[error("refusing the pid file {}: {reason}", .path.display())]
    Unsafe { path: PathBuf, reason: String },
    /// The pid file does not hold a pid.
    #[error("the pid file {} does not hold a pid", .0.display())]
    NoPid(PathBuf),
    /// Nobody holds the pid file's lock: the moatd that wrote it has stopped.
    #[error(
        "no process holds the pid file {} (it names pid {pid}): the moatd that wrote it has stopped; start moatd",
        .path.display()
    )]
    NotHeld { path: PathBuf, pid: i32 },
    /// The pid file names one process and another holds its lock.
    #[error(
        "the pid file {} names pid {named}, but pid {holder} holds it: signalling neither",
        .path.display()
    )]
    Mismatch {
        path: PathBuf,
        named: i32,
        holder: i32,
    },
    /// The process holding the pid file is not moatd.
    #[error("pid {pid} holds the pid file but is {name:?}, not moatd: not signalled")]
    NotDaemon { pid: i32, name: String },
    /// The process holding the pid file runs as another user than the file's owner.
    #[error(
        "pid {pid} runs as uid {uid}, not as the pid file's owner (uid {owner}): not signalled"
    )]
    WrongUser { pid: i32, uid: u32, owner: u32 },
    /// The process's details cannot be read.
    #[error("cannot read the details of pid {pid}")]
    Process {
        pid: i32,
        #[source]
        source: io::Error,
    },
    /// moatd stopped between finding it and signalling it.
    #[error("moatd (pid {0}) stopped before it could be signalled")]
    Gone(i32),
    /// The process belongs to another user.
    #[error(
        "not permitted to signal moatd (pid {0}); run moatctl as the user moatd runs as, or as root"
    )]
    NotPermitted(i32),
    /// Any other failure to signal.
    #[error("cannot signal moatd (pid {pid})")]
    Signal {
        pid: i32,
        #[source]
        source: io::Error,
    },
}

/// Finds the moatd holding `pid_file` (see the module's rules), with the process table at
/// `proc_dir` (`/proc`), and sends it SIGHUP; returns its pid.
pub fn reload(pid_file: &Path, proc_dir: &Path) -> Result<i32, ReloadError> {
    let (file, owner) = open_pid_file(pid_file)?;
    let moatd = holder_of(&file, pid_file, owner, proc_dir)?;
    let pidfd = match pidfd_open(pid(moatd)?, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Err(ReloadError::Gone(moatd)),
        Err(e) => {
            return Err(ReloadError::Signal {
                pid: moatd,
                source: e.into(),
            });
        }
    };
    // The lock still held by the same pid after the pidfd was opened: the pidfd is that
    // process, not one that took its pid after it exited.
    if holder_of(&file, pid_file, owner, proc_dir)? != moatd {
        return Err(ReloadError::Gone(moatd));
    }
    pidfd_send_signal(&pidfd, Signal::HUP).map_err(|e| match e {
        rustix::io::Errno::SRCH => ReloadError::Gone(moatd),
        rustix::io::Errno::PERM => ReloadError::NotPermitted(moatd),
        e => ReloadError::Signal {
            pid: moatd,
            source: e.into(),
        },
    })?;
    Ok(moatd)
}

fn pid(raw: i32) -> Result<Pid, ReloadError> {
    Pid::from_raw(raw).ok_or(ReloadError::Gone(raw))
}

/// Opens the pid file if it is one only its owner could have written; returns it and its
/// owner.
fn open_pid_file(path: &Path) -> Result<(File, u32), ReloadError> {
    let unsafe_file = |reason: String| ReloadError::Unsafe {
        path: path.to_path_buf(),
        reason,
    };
    let read_error = |source| ReloadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::options()
        .read(true)
        .custom_flags(OFlag::O_NOFOLLOW.bits() | OFlag::O_NONBLOCK.bits())
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ReloadError::NoPidFile(path.to_path_buf()));
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(unsafe_file("it is a symbolic link".into()));
        }
        Err(e) => return Err(read_error(e)),
    };
    let meta = file.metadata().map_err(read_error)?;
    if !meta.file_type().is_file() {
        return Err(unsafe_file("it is not a regular file".into()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_file(format!(
            "others than its owner may write it (mode {:o})",
            meta.mode() & 0o777
        )));
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let dir_meta = std::fs::metadata(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })
    .map_err(read_error)?;
    if dir_meta.mode() & 0o022 != 0 {
        return Err(unsafe_file(format!(
            "others may write its directory {} (mode {:o}), and so replace it",
            dir.display(),
            dir_meta.mode() & 0o777
        )));
    }
    if dir_meta.uid() != 0 && dir_meta.uid() != meta.uid() {
        return Err(unsafe_file(format!(
            "its directory {} belongs to uid {}, neither root nor the file's owner",
            dir.display(),
            dir_meta.uid()
        )));
    }
    Ok((file, meta.uid()))
}

/// The process holding the write lock on `file`, if it is the moatd the file names, run by
/// `owner`.
fn holder_of(file: &File, path: &Path, owner: u32, proc_dir: &Path) -> Result<i32, ReloadError> {
    let named = named_pid(file, path)?;
    let mut lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(file, FcntlArg::F_GETLK(&mut lock)).map_err(|e| ReloadError::Read {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    // A read lock is anyone's who can read the file: only moatd's write lock counts.
    if lock.l_type != libc::F_WRLCK as libc::c_short || lock.l_pid <= 0 {
        return Err(ReloadError::NotHeld {
            path: path.to_path_buf(),
            pid: named,
        });
    }
    if lock.l_pid != named {
        return Err(ReloadError::Mismatch {
            path: path.to_path_buf(),
            named,
            holder: lock.l_pid,
        });
    }
    let status = process_status(proc_dir, named)?;
    if status.name != DAEMON_NAME {
        return Err(ReloadError::NotDaemon {
            pid: named,
            name: status.name,
        });
    }
    if let Some(uid) = [status.real_uid, status.effective_uid]
        .into_iter()
        .find(|uid| *uid != owner)
    {
        return Err(ReloadError::WrongUser {
            pid: named,
            uid,
            owner,
        });
    }
    Ok(named)
}

/// The pid the file holds: one decimal number above 1 (1 is init; 0 and below name
/// process groups).
fn named_pid(file: &File, path: &Path) -> Result<i32, ReloadError> {
    // Read from the start each time (the lock is checked twice), and no more than a pid.
    let mut bytes = [0u8; 32];
    let read = std::os::unix::fs::FileExt::read_at(file, &mut bytes, 0).map_err(|source| {
        ReloadError::Read {
            path: path.to_path_buf(),
            source,
        }
    })?;
    std::str::from_utf8(&bytes[..read])
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 1)
        .ok_or_else(|| ReloadError::NoPid(path.to_path_buf()))
}

/// What `/proc/PID/status` says of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStatus {
    pub name: String,
    pub real_uid: u32,
    pub effective_uid: u32,
}

fn process_status(proc_dir: &Path, pid: i32) -> Result<ProcessStatus, ReloadError> {
    let path = proc_dir.join(pid.to_string()).join("status");
    let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ReloadError::Gone(pid),
        _ => ReloadError::Process { pid, source },
    })?;
    parse_status(&text).ok_or_else(|| ReloadError::Process {
        pid,
        source: io::Error::other(format!("{} has no Name or Uid line", path.display())),
    })
}

/// The name and user ids in the text of a `/proc/PID/status`.
pub fn parse_status(text: &str) -> Option<ProcessStatus> {
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .map(str::trim)
    };
    let name = field("Name")?.to_owned();
    let mut uids = field("Uid")?.split_whitespace().map(str::parse::<u32>);
    let real_uid = uids.next()?.ok()?;
    let effective_uid = uids.next()?.ok()?;
    Some(ProcessStatus {
        name,
        real_uid,
        effective_uid,
    })
}

#[cfg(test)]
mod tests;
