//! Asking a running moatd to reload its policy: find its process, send it SIGHUP.

use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The daemon's process name, as `/proc/PID/comm` shows it.
pub const DAEMON_NAME: &str = "moatd";

/// Why the daemon could not be signalled.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The process table cannot be read.
    #[error("cannot list processes in {}", .dir.display())]
    ProcessTable {
        dir: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    /// No process is named moatd.
    #[error("no moatd process is running; start moatd, or name its process with --pid")]
    NotRunning,
    /// More than one process is named moatd.
    #[error("{} moatd processes are running (pids {}); choose one with --pid", .0.len(), join(.0))]
    Several(Vec<i32>),
    /// The pid names no process.
    #[error("no process has pid {0}")]
    NoSuchProcess(i32),
    /// The process belongs to another user.
    #[error("not permitted to signal pid {0}; run moatctl as the user moatd runs as, or as root")]
    NotPermitted(i32),
    /// Any other failure of kill(2).
    #[error("cannot signal pid {pid}")]
    Signal {
        pid: i32,
        #[source]
        source: Errno,
    },
}

fn join(pids: &[i32]) -> String {
    pids.iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The pid of the one process named moatd in the process table at `proc_dir` (`/proc`).
pub fn find_daemon(proc_dir: &Path) -> Result<i32, ReloadError> {
    let entries = std::fs::read_dir(proc_dir).map_err(|source| ReloadError::ProcessTable {
        dir: proc_dir.to_path_buf(),
        source,
    })?;
    let mut pids: Vec<i32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| process_name(proc_dir, *pid).as_deref() == Some(DAEMON_NAME))
        .collect();
    pids.sort_unstable();
    match pids.as_slice() {
        [] => Err(ReloadError::NotRunning),
        [pid] => Ok(*pid),
        _ => Err(ReloadError::Several(pids)),
    }
}

/// The name of process `pid` (its `comm`), if it is still there.
pub fn process_name(proc_dir: &Path, pid: i32) -> Option<String> {
    // Processes come and go while the table is read: a vanished one is simply not a match.
    let comm = std::fs::read_to_string(proc_dir.join(pid.to_string()).join("comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_owned())
}

/// Sends SIGHUP to `pid`, which must be positive: kill(2) reads 0 and negative pids as
/// process groups.
pub fn send_hangup(pid: i32) -> Result<(), ReloadError> {
    if pid <= 0 {
        return Err(ReloadError::NoSuchProcess(pid));
    }
    kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|errno| match errno {
        Errno::ESRCH => ReloadError::NoSuchProcess(pid),
        Errno::EPERM => ReloadError::NotPermitted(pid),
        source => ReloadError::Signal { pid, source },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process table holding `processes` (pid, comm).
    fn table(processes: &[(i32, &str)]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        for (pid, comm) in processes {
            let dir = tmp.path().join(pid.to_string());
            std::fs::create_dir(&dir).expect("mkdir");
            std::fs::write(dir.join("comm"), format!("{comm}\n")).expect("write");
        }
        std::fs::create_dir(tmp.path().join("self")).expect("mkdir");
        tmp
    }

    #[test]
    fn finds_the_one_daemon() {
        let proc_dir = table(&[(1, "systemd"), (420, "moatd"), (421, "moatd-helper")]);
        assert_eq!(find_daemon(proc_dir.path()).expect("found"), 420);
    }

    #[test]
    fn refuses_to_guess_between_several_or_none() {
        let proc_dir = table(&[(77, "moatd"), (9, "moatd"), (10, "bash")]);
        let error = find_daemon(proc_dir.path()).expect_err("two daemons");
        assert!(matches!(&error, ReloadError::Several(pids) if pids == &[9, 77]));
        assert!(error.to_string().contains("pids 9, 77"), "{error}");
        let proc_dir = table(&[(10, "bash")]);
        assert!(matches!(
            find_daemon(proc_dir.path()),
            Err(ReloadError::NotRunning)
        ));
    }

    #[test]
    fn never_signals_a_process_group() {
        assert!(matches!(send_hangup(0), Err(ReloadError::NoSuchProcess(0))));
        assert!(matches!(
            send_hangup(-1),
            Err(ReloadError::NoSuchProcess(-1))
        ));
    }
}
