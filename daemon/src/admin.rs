//! The admin API: Unix sockets for `moatctl` on this host, never on the network. The
//! admin socket (group `moat-admin`) takes every command; the audit socket (group
//! `moat-audit`) serves auditors the trail's export and nothing else.
//!
//! While the sockets are open, moatd holds its pid file ([`pid_file`]), by which
//! `moatctl policy reload` finds it.
//!
//! One request per connection, in the protocol `moat_core::admin` defines for moatd and
//! moatctl alike: a JSON line such as `{"protocol": 1, "command": "audit.export",
//! "since_unix_ms": null, "until_unix_ms": null}`. The first line of the answer is JSON,
//! `{"ok": true}` (with a `result` for model commands and status) or `{"error": "..."}`;
//! an export follows it line by line (or, for a range without records, one more
//! `{"error": ...}` line). `model.import` sends `size` bytes of bundle tar right after its
//! line. A request in another protocol is refused with both versions named. Every
//! connection's peer is checked ([`peer::AdminAccess`]) and every command, allowed or
//! refused, is audited with the peer's uid, gid and pid.

pub mod peer;
pub mod pid_file;

use std::io::{BufWriter, Read, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use moat_core::admin::{
    Hello, PROTOCOL_VERSION, Refusal, Request, RequestLine, accepted_line, answer_line,
};
use moat_core::audit::export::select::TimeRange;
use moat_core::audit::export::source::WriteExportError;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::audit::AuditLog;
use crate::audit::log::admin_record;
use crate::config::AdminConfig;
use crate::models::{Command, Models, RolloutError};
use moat_store::time::now_unix_ms;
use peer::{AdminAccess, Peer};
use pid_file::{PidFile, PidFileError};

/// Longest request line.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// A client that sends nothing for this long is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// An export whose reader stops reading for this long is abandoned.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// An import whose sender stops sending for this long is abandoned.
const BUNDLE_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the admin socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("another moatd already answers on the admin socket {0}")]
    InUse(PathBuf),
    #[error("cannot open the admin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    PidFile(#[from] PidFileError),
}

/// A bundle read from the socket (what the request line's reader had buffered, then the
/// rest of the stream, `size` bytes in all), and the socket to answer on.
fn bundle_reader(
    buffered: Vec<u8>,
    stream: UnixStream,
    size: u64,
) -> std::io::Result<(Box<dyn Read + Send>, std::os::unix::net::UnixStream)> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(BUNDLE_READ_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let answer = stream.try_clone()?;
    let bundle = Read::take(Read::chain(std::io::Cursor::new(buffered), stream), size);
    Ok((Box::new(bundle), answer))
}

/// What a socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every command.
    Admin,
    /// `audit.export` only.
    Audit,
}

impl Scope {
    fn allows(self, request: &Request) -> bool {
        match self {
            Scope::Admin => true,
            Scope::Audit => matches!(request, Request::AuditExport { .. }),
        }
    }
}

/// A bound socket; removed when dropped.
#[derive(Debug)]
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    access: AdminAccess,
    scope: Scope,
    /// The admin socket holds moatd's pid file, so that the file lasts as long as moatd
    /// takes commands.
    pid_file: Option<PidFile>,
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the admin socket and the audit socket (inside the async runtime), and writes the
/// pid file.
pub fn bind(config: &AdminConfig) -> Result<[AdminSocket; 2], AdminError> {
    let mut admin = bind_one(config.socket.clone(), &config.group, Scope::Admin)?;
    let audit = bind_one(
        config.audit_socket_path(),
        &config.audit_group,
        Scope::Audit,
    )?;
    // After the sockets: a second moatd on the same paths is refused for the socket, as
    // before, and never disturbs the first one's pid file.
    let pid_file = PidFile::create(&config.pid_file_path())?;
    tracing::info!(path = %pid_file.path().display(), "pid file written");
    admin.pid_file = Some(pid_file);
    Ok([admin, audit])
}

/// Binds one socket: 0660, owned by `group` if it exists. A socket file left by a moatd
/// that died is replaced; one a live moatd answers on is not.
fn bind_one(path: PathBuf, group: &str, scope: Scope) -> Result<AdminSocket, AdminError> {
    let bind_error = |source| AdminError::Bind {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_error)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(AdminError::InUse(path));
        }
        std::fs::remove_file(&path).map_err(bind_error)?;
    }
    let listener = UnixListener::bind(&path).map_err(bind_error)?;
    let access = AdminAccess::for_host(group).map_err(bind_error)?;
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let gid = peer::find_group(&groups, group).map(|g| g.gid);
    if gid.is_none() {
        tracing::warn!(group, socket = %path.display(), "this group does not exist on this host; only root and moatd's user may use the socket");
    }
    std::os::unix::fs::chown(&path, None, gid).map_err(bind_error)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).map_err(bind_error)?;
    Ok(AdminSocket {
        listener,
        path,
        access,
        scope,
        pid_file: None,
    })
}

impl AdminSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Serves connections until the task is dropped.
    /// Serves connections until the task is dropped. Without `models` (a server given
    /// its models directly), model commands are refused.
    pub async fn serve(self, audit: Arc<AuditLog>, models: Option<Arc<Models>>) {
        let socket = Arc::new(self);
        loop {
            match socket.listener.accept().await {
                Ok((stream, _)) => {
                    let socket = Arc::clone(&socket);
                    let audit = Arc::clone(&audit);
                    let models = models.clone();
                    actix_web::rt::spawn(async move {
                        if let Err(e) = socket.connection(stream, audit, models).await {
                            tracing::warn!(error = %e, "admin connection failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot accept on the admin socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn connection(
        &self,
        stream: UnixStream,
        audit: Arc<AuditLog>,
        models: Option<Arc<Models>>,
    ) -> std::io::Result<()> {
        let credentials = stream.peer_cred()?;
        let peer = Peer {
            uid: credentials.uid(),
            gid: credentials.gid(),
            pid: credentials.pid(),
        };
        let mut stream = BufReader::new(stream);
        let mut line = String::new();
        let read = tokio::time::timeout(
            REQUEST_TIMEOUT,
            (&mut stream).take(MAX_REQUEST_BYTES).read_line(&mut line),
        )
        .await;
        // What the reader holds past the line is the start of an imported bundle.
        let buffered = stream.buffer().to_vec();
        let mut stream = stream.into_inner();
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            let refusal = Refusal::new("send one JSON request line");
            return answer(&mut stream, Err(refusal)).await;
        }
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let request = serde_json::from_str::<RequestLine>(&line).map(|line| line.request);
        let action = request.as_ref().map_or("admin.unknown", Request::action);
        let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        let refusal = if !self.access.allows(peer, &passwd, &groups) {
            Some(format!(
                "not root, moatd's user or a member of {}",
                self.access.group
            ))
        } else if request.as_ref().is_ok_and(|r| !self.scope.allows(r)) {
            Some(format!(
                "{action} is not served on the audit socket {}: use the admin socket",
                self.path.display()
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            tracing::warn!(%peer, action, socket = %self.path.display(), %reason, "admin socket: refused");
            let record = admin_record(
                audit.node(),
                action,
                &peer.to_string(),
                "deny",
                reason.clone(),
            );
            // Refused either way; the record says someone tried.
            let _ = audit.append(record).await;
            let refusal = Refusal::new(format!("permission denied: {reason}"));
            return answer(&mut stream, Err(refusal)).await;
        }
        // Another protocol is named as such, before its request is judged as this one's.
        if let Some(client) = Hello::protocol_of(&line)
            && client != PROTOCOL_VERSION
        {
            tracing::warn!(%peer, client, "admin socket: a client of another protocol");
            return answer(&mut stream, Err(Refusal::protocol_mismatch(client))).await;
        }
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                let message = format!("not a request this moatd knows: {e}");
                return answer(&mut stream, Err(Refusal::new(message))).await;
            }
        };
        let peer_text = peer.to_string();
        let (request, models) = match (request, models) {
            (
                Request::AuditExport {
                    since_unix_ms,
                    until_unix_ms,
                },
                _,
            ) => {
                let range = TimeRange {
                    since_unix_ms,
                    until_unix_ms,
                };
                return export(stream, range, peer, audit).await;
            }
            (_, None) => {
                let refusal = Refusal::new(
                    "this moatd serves fixed models; model commands are not available",
                );
                return answer(&mut stream, Err(refusal)).await;
            }
            (request, Some(models)) => (request, models),
        };
        let line = match request {
            Request::ModelImport {
                size,
                allow_downgrade,
            } => {
                let (bundle, mut answer_stream) = bundle_reader(buffered, stream, size)?;
                let outcome = models.import(&peer_text, bundle, allow_downgrade).await;
                // One short line on a socket the client is waiting to read.
                let line = result_line(outcome);
                return answer_stream.write_all(format!("{line}\n").as_bytes());
            }
            Request::Status {} => result_line(models.status(&peer_text).await),
            Request::ModelList {} => result_line(models.list(&peer_text).await),
            request => {
                // The audit record names the command as the protocol does.
                let action = request.action();
                match Command::of(request) {
                    Some(command) => result_line(models.command(&peer_text, action, command).await),
                    None => answer_line(&Err::<(), _>(Refusal::new("not a rollout command"))),
                }
            }
        };
        stream.write_all(format!("{line}\n").as_bytes()).await?;
        stream.flush().await
    }
}

/// A model command's answer line: its result, or its refusal with the refusal's code.
fn result_line<T: serde::Serialize>(outcome: Result<T, RolloutError>) -> String {
    answer_line(&outcome.map_err(|e| Refusal::with_code(e.to_string(), e.code())))
}

/// Writes the answer's first line.
async fn answer(stream: &mut UnixStream, outcome: Result<(), Refusal>) -> std::io::Result<()> {
    let line = match outcome {
        Ok(()) => accepted_line(),
        Err(refusal) => answer_line(&Err::<(), _>(refusal)),
    };
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    stream.flush().await
}

/// Audits the export, then streams it from a blocking thread (it reads the whole range).
async fn export(
    mut stream: UnixStream,
    range: TimeRange,
    peer: Peer,
    audit: Arc<AuditLog>,
) -> std::io::Result<()> {
    let bound = |end: Option<i64>, open: &str| end.map_or(open.to_owned(), |ms| format!("{ms} ms"));
    let detail = format!(
        "export of the records stored from {} to {} (Unix time)",
        bound(range.since_unix_ms, "the first"),
        bound(range.until_unix_ms, "the last")
    );
    let record = admin_record(
        audit.node(),
        "audit.export",
        &peer.to_string(),
        "allow",
        detail,
    );
    let prepared = match audit.append(record).await {
        Ok(_) => audit.snapshot().await,
        Err(e) => Err(e),
    };
    let snapshot = match prepared {
        Ok(snapshot) => snapshot,
        Err(e) => {
            let message = format!("the audit trail cannot be exported now: {e}");
            return answer(&mut stream, Err(Refusal::new(message))).await;
        }
    };
    answer(&mut stream, Ok(())).await?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let written = actix_web::rt::task::spawn_blocking(move || {
        let out = BufWriter::new(&stream);
        match snapshot.write(range, now_unix_ms(), out, &mut |_| {}) {
            Ok((exported, mut out)) => out.flush().map(|()| Some(exported)),
            Err(WriteExportError::Empty) => {
                let line = answer_line(&Err::<(), _>(Refusal::new(
                    "the audit trail holds no record in the range",
                )));
                (&stream)
                    .write_all(format!("{line}\n").as_bytes())
                    .map(|()| None)
            }
            Err(WriteExportError::Write(e)) => Err(e),
            Err(WriteExportError::Source(e)) => Err(std::io::Error::other(e.to_string())),
            Err(e @ WriteExportError::WrongKey { .. }) => Err(std::io::Error::other(e.to_string())),
        }
    })
    .await
    .map_err(std::io::Error::other)??;
    match written {
        Some(exported) => tracing::info!(%peer, records = exported.end.records, "audit exported"),
        None => tracing::info!(%peer, "audit export: no record in the range"),
    }
    Ok(())
}
