//! systemd's service protocol, spoken by hand over the notification socket (`sd_notify`):
//! `READY=1` once moatd serves, `EXTEND_TIMEOUT_USEC` while models load, `RELOADING=1` and
//! `READY=1` around a SIGHUP reload, `STOPPING=1` at a stop signal, and `WATCHDOG=1` from
//! [`watchdog`] only while moatd is seen to make progress.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing. A notification that cannot
//! be sent is logged and otherwise ignored: the service keeps serving, and systemd's own
//! timeouts decide what happens next.

pub mod activation;
pub mod watchdog;

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// The process's notifier, from the environment systemd gave it.
static NOTIFIER: LazyLock<Option<Notifier>> = LazyLock::new(|| {
    let target = std::env::var_os("NOTIFY_SOCKET")?;
    match Notifier::connect(target.as_encoded_bytes()) {
        Ok(notifier) => Some(notifier),
        Err(e) => {
            tracing::error!(error = %e, socket = ?target, "NOTIFY_SOCKET is unusable; systemd will not hear from moatd");
            None
        }
    }
});

/// Sends notifications to one systemd notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    address: SocketAddr,
}

impl Notifier {
    /// A notifier for `NOTIFY_SOCKET`'s value: a socket path, or `@name` for the abstract
    /// namespace.
    pub fn connect(target: &[u8]) -> io::Result<Self> {
        let address = match target.split_first() {
            Some((b'@', name)) => {
                use std::os::linux::net::SocketAddrExt as _;
                SocketAddr::from_abstract_name(name)?
            }
            Some((b'/', _)) => {
                use std::os::unix::ffi::OsStrExt as _;
                SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(target))?
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "neither an absolute path nor an abstract name (@...)",
                ));
            }
        };
        Ok(Self {
            socket: UnixDatagram::unbound()?,
            address,
        })
    }

    /// Sends one notification: newline-separated `KEY=value` assignments.
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.socket.send_to_addr(state.as_bytes(), &self.address)?;
        Ok(())
    }
}

fn notify(state: &str) {
    if let Some(notifier) = NOTIFIER.as_ref()
        && let Err(e) = notifier.send(state)
    {
        tracing::warn!(error = %e, state, "a systemd notification could not be sent");
    }
}

/// A status line free of the newlines that would end the assignment.
fn status_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

/// Listeners are bound, the audit trail is open and the models are warm.
pub fn ready(status: &str) {
    notify(&format!("READY=1\nSTATUS={}", status_line(status)));
}

/// Asks for `extra` more time, from now, for the step named by `status`.
fn extend_timeout(extra: Duration, status: &str) {
    notify(&format!(
        "EXTEND_TIMEOUT_USEC={}\nSTATUS={}",
        extra.as_micros(),
        status_line(status)
    ));
}

/// How much more time each extension asks for, and how often one is sent.
const EXTEND_BY: Duration = Duration::from_secs(90);
const EXTEND_EVERY: Duration = Duration::from_secs(30);

/// Keeps systemd's start timeout from running out while models load: `EXTEND_TIMEOUT_USEC`
/// (90 s from now) every 30 s, naming the model, until dropped or until `limit` has passed
/// (then systemd's own timeout decides about a load that does not end).
#[derive(Debug)]
pub struct StartupProgress {
    shared: Arc<(Mutex<Progress>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Progress {
    loading: Option<String>,
    done: bool,
}

impl StartupProgress {
    pub fn begin(limit: Duration) -> Self {
        let shared = Arc::new((Mutex::new(Progress::default()), Condvar::new()));
        let thread = NOTIFIER.as_ref().and_then(|_| {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("moat-startup".into())
                .spawn(move || extend_while_loading(&shared, limit))
                .ok()
        });
        Self { shared, thread }
    }

    /// `label` starts loading: systemd hears it at once.
    pub fn loading(&self, label: &str) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(|p| p.into_inner()).loading = Some(label.to_owned());
        wake.notify_one();
    }
}

impl Drop for StartupProgress {
    fn drop(&mut self) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(|p| p.into_inner()).done = true;
        wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn extend_while_loading(shared: &(Mutex<Progress>, Condvar), limit: Duration) {
    let (lock, wake) = shared;
    let started = Instant::now();
    let mut progress = lock.lock().unwrap_or_else(|p| p.into_inner());
    let mut announced: Option<String> = None;
    let mut last = Instant::now();
    loop {
        if progress.done {
            return;
        }
        if started.elapsed() > limit {
            tracing::warn!(
                limit_secs = limit.as_secs(),
                "models are still loading; no more start time is asked of systemd"
            );
            return;
        }
        let changed = progress.loading != announced;
        if let Some(label) = &progress.loading
            && (changed || last.elapsed() >= EXTEND_EVERY)
        {
            extend_timeout(EXTEND_BY, &format!("loading {label}"));
            announced = progress.loading.clone();
            last = Instant::now();
        }
        progress = wake
            .wait_timeout(progress, EXTEND_EVERY)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// A SIGHUP reload begins; [`ready`] ends it.
pub fn reloading() {
    // systemd matches the reload to this moment on the monotonic clock.
    let monotonic = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|now| Duration::from(now).as_micros())
        .unwrap_or(0);
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={monotonic}\nSTATUS=reloading policies and certificates"
    ));
}

/// A stop signal arrived: in-flight requests are draining for up to `grace`. The stop
/// timeout is extended past it, so that the final audit checkpoint is written even when
/// the grace period is longer than the unit's `TimeoutStopSec=`.
pub fn stopping(grace: Duration) {
    notify(&format!(
        "STOPPING=1\nEXTEND_TIMEOUT_USEC={}\nSTATUS=stopping: finishing in-flight requests",
        (grace + Duration::from_secs(15)).as_micros()
    ));
}

/// How often systemd expects `WATCHDOG=1`, if it watches this process.
pub fn watchdog_timeout() -> Option<Duration> {
    NOTIFIER.as_ref()?;
    parse_watchdog(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&usec| usec > 0)?;
    // WATCHDOG_PID, when set, names the process systemd watches; it may not be this one.
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

fn watchdog_ping() {
    notify("WATCHDOG=1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_a_socket_path_and_an_abstract_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).expect("binds");
        let notifier = Notifier::connect(path.as_os_str().as_encoded_bytes()).expect("connects");
        notifier.send("READY=1\nSTATUS=serving").expect("sends");
        let mut buffer = [0u8; 64];
        let n = listener.recv(&mut buffer).expect("receives");
        assert_eq!(&buffer[..n], b"READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("moat-test-{}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let listener = UnixDatagram::bind_addr(&address).expect("binds");
        let notifier = Notifier::connect(format!("@{name}").as_bytes()).expect("connects");
        notifier.send("WATCHDOG=1").expect("sends");
        let n = listener.recv(&mut buffer).expect("receives");
        assert_eq!(&buffer[..n], b"WATCHDOG=1");
    }

    #[test]
    fn a_relative_or_empty_socket_is_refused() {
        for target in [&b""[..], b"notify", b"./notify"] {
            assert!(Notifier::connect(target).is_err(), "{target:?}");
        }
    }

    #[test]
    fn status_lines_cannot_add_assignments() {
        assert_eq!(status_line("a\nREADY=1\r"), "a READY=1 ");
    }

    #[test]
    fn the_watchdog_belongs_to_the_named_process_only() {
        let thirty = Some(Duration::from_secs(30));
        assert_eq!(parse_watchdog(Some("30000000"), None, 7), thirty);
        assert_eq!(parse_watchdog(Some("30000000"), Some("7"), 7), thirty);
        assert_eq!(parse_watchdog(None, None, 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("30000000"), Some("8"), 7), None);
    }
}
