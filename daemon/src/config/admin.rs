//! `[admin]`: the admin API's Unix sockets, for `moatctl` on this host: the admin socket
//! for every command, and the audit socket, which serves only the audit trail's export; and
//! the pid file `moatctl policy reload` finds moatd by.

use std::path::PathBuf;

use serde::Deserialize;

/// `[admin]`; every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The socket moatctl connects to (created 0660 at start, removed at stop).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Members of this group may use the socket (it owns the socket file); root and
    /// moatd's own user may always.
    #[serde(default = "default_group")]
    pub group: String,
    /// The auditors' socket: audit exports only (created 0660 at start, removed at stop).
    /// Unset: `audit.sock` beside `socket`.
    #[serde(default)]
    pub audit_socket: Option<PathBuf>,
    /// Members of this group may use the audit socket; root and moatd's own user may
    /// always.
    #[serde(default = "default_audit_group")]
    pub audit_group: String,
    /// moatd's pid, written (0644) and locked while it serves, removed when it stops:
    /// `moatctl policy reload` signals the process that holds it, never one found by name.
    /// Unset: `moatd.pid` beside `socket`.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
}

impl AdminConfig {
    /// Where the audit socket is.
    pub fn audit_socket_path(&self) -> PathBuf {
        self.audit_socket
            .clone()
            .unwrap_or_else(|| self.socket.with_file_name("audit.sock"))
    }

    /// Where the pid file is.
    pub fn pid_file_path(&self) -> PathBuf {
        self.pid_file
            .clone()
            .unwrap_or_else(|| self.socket.with_file_name("moatd.pid"))
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            group: default_group(),
            audit_socket: None,
            audit_group: default_audit_group(),
            pid_file: None,
        }
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/moat/admin.sock")
}

fn default_group() -> String {
    "moat-admin".into()
}

fn default_audit_group() -> String {
    "moat-audit".into()
}
