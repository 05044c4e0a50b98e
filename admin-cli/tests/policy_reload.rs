//! `moatctl policy reload` against real processes, as an attacker on the host would set
//! them up: a decoy named moatd started first, pid files that lead elsewhere. Only the
//! process that holds the pid file's lock, that the file names, and that is moatd is ever
//! signalled.
//!
//! The stand-in for moatd is this test binary copied to a file named `moatd` and run as
//! [`pid_file_holder`]: it takes the pid file's write lock as moatd does, writes a pid and
//! waits. It and the decoys run with SIGHUP's default action, so a signal ends them.

use std::fs;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, fcntl};
use nix::libc;

const SIGHUP: i32 = 1;
/// Set for the stand-in: the pid file to hold.
const HOLD: &str = "MOAT_TEST_HOLD_PID_FILE";
/// Set for the stand-in: what to write in it instead of its own pid.
const WRITE: &str = "MOAT_TEST_PID_TEXT";

/// Not a test: the stand-in for moatd, run by the tests below in a process of its own
/// (with `--ignored --exact pid_file_holder`). Without its variable it does nothing.
#[test]
#[ignore = "run by the reload tests as a stand-in for moatd"]
fn pid_file_holder() {
    let Some(path) = std::env::var_os(HOLD) else {
        return;
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .expect("pid file");
    let lock = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(&file, FcntlArg::F_SETLK(&lock)).expect("locked");
    let text = std::env::var(WRITE).unwrap_or_else(|_| std::process::id().to_string());
    (&file)
        .write_all(format!("{text}\n").as_bytes())
        .expect("written");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
    println!("holding");
    std::io::stdout().flush().expect("flush");
    // Until the test closes stdin, or a signal ends it.
    let _ = std::io::stdin().read_line(&mut String::new());
}

/// A child process, killed when the test ends, whether it passed or not.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// A process that must survive: `program` copied to DIR/NAME and run with `args`.
fn run_as(dir: &Path, name: &str, program: &Path, args: &[&str]) -> Running {
    fs::create_dir_all(dir).expect("mkdir");
    let copy = dir.join(name);
    fs::copy(program, &copy).expect("copy");
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod");
    Running(
        hangup_ends(&copy)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("runs"),
    )
}

/// A copy of `sleep` named moatd: what any local user can start.
fn decoy(dir: &Path) -> Running {
    run_as(
        &dir.join("decoy"),
        "moatd",
        Path::new("/bin/sleep"),
        &["60"],
    )
}

/// The stand-in, named `name`, holding `pid_file` with `text` (its own pid if `None`) in
/// it; returns once it holds the lock.
fn holder(dir: &Path, name: &str, pid_file: &Path, text: Option<&str>) -> Running {
    fs::create_dir_all(dir).expect("mkdir");
    let copy = dir.join(name);
    fs::copy(std::env::current_exe().expect("test binary"), &copy).expect("copy");
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut command = hangup_ends(&copy);
    command
        .args(["--ignored", "--exact", "pid_file_holder", "--nocapture"])
        .env(HOLD, pid_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(text) = text {
        command.env(WRITE, text);
    }
    let mut child = Running(command.spawn().expect("stand-in runs"));
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let held = lines.any(|line| line.is_ok_and(|line| line == "holding"));
    assert!(held, "the stand-in did not take the lock");
    child
}

fn reload(pid_file: &Path) -> Output {
    // The pid file as an operator's environment names it: old and new moatctl alike are
    // run as `moatctl policy reload`.
    Command::new(env!("CARGO_BIN_EXE_moatctl"))
        .args(["policy", "reload"])
        .env("MOAT_PID_FILE", pid_file)
        .output()
        .expect("moatctl runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `program`, run with SIGHUP's default action (ending it) even where this process ignores
/// SIGHUP (as under nohup), which children inherit: whether it got the signal shows.
fn hangup_ends(program: &Path) -> Command {
    let mut command = Command::new("env");
    command.arg("--default-signal=HUP").arg(program);
    command
}

/// Whether `child` is still running, after a moment for a signal to land.
fn still_running(child: &mut Running) -> bool {
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// `out` is moatctl refusing to signal, with `reason` in what it says.
fn assert_refused(out: &Output, reason: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(reason), "{}", text(&out.stderr));
}

fn run_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let pid_file = tmp.path().join("moatd.pid");
    (tmp, pid_file)
}

#[test]
fn reload_signals_the_moatd_holding_its_pid_file_never_a_decoy_named_moatd() {
    let (tmp, pid_file) = run_dir();
    let mut decoy = decoy(tmp.path());
    let mut moatd = holder(&tmp.path().join("real"), "moatd", &pid_file, None);
    let out = reload(&pid_file);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains(&format!("(pid {},", moatd.id())),
        "{}",
        text(&out.stdout)
    );
    let status = moatd.wait().expect("moatd ends");
    assert_eq!(status.signal(), Some(SIGHUP), "{status:?}");
    assert!(
        still_running(&mut decoy),
        "the decoy named moatd got the signal"
    );
}

#[test]
fn reload_without_a_pid_file_signals_no_process_named_moatd() {
    let (tmp, pid_file) = run_dir();
    let mut decoy = decoy(tmp.path());
    let out = reload(&pid_file);
    assert!(
        still_running(&mut decoy),
        "the decoy named moatd got the signal: {}",
        text(&out.stdout)
    );
    assert_refused(&out, "no pid file");
}

#[test]
fn reload_signals_no_pid_a_left_over_pid_file_names() {
    // moatd died; its pid file names a pid a decoy now has. Nobody holds the file.
    let (tmp, pid_file) = run_dir();
    let mut decoy = decoy(tmp.path());
    fs::write(&pid_file, format!("{}\n", decoy.id())).expect("write");
    let out = reload(&pid_file);
    assert!(
        still_running(&mut decoy),
        "the decoy named moatd got the signal: {}",
        text(&out.stdout)
    );
    assert_refused(&out, "no process holds the pid file");
}

#[test]
fn reload_signals_neither_when_the_pid_file_names_another_process_than_its_holder() {
    let (tmp, pid_file) = run_dir();
    let mut decoy = decoy(tmp.path());
    let decoy_pid = decoy.id().to_string();
    let mut moatd = holder(
        &tmp.path().join("real"),
        "moatd",
        &pid_file,
        Some(&decoy_pid),
    );
    let out = reload(&pid_file);
    assert_refused(
        &out,
        &format!("names pid {decoy_pid}, but pid {}", moatd.id()),
    );
    assert!(
        still_running(&mut decoy),
        "the decoy named moatd got the signal"
    );
    assert!(still_running(&mut moatd), "the holder got the signal");
}

#[test]
fn reload_signals_no_holder_that_is_not_moatd() {
    let (tmp, pid_file) = run_dir();
    let mut other = holder(&tmp.path().join("other"), "not-moatd", &pid_file, None);
    let out = reload(&pid_file);
    assert_refused(&out, "\"not-moatd\", not moatd");
    assert!(
        still_running(&mut other),
        "a process not named moatd got the signal"
    );
}
