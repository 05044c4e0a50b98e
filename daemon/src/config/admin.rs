//! `[admin]`: the admin API's Unix socket, for `moatctl` on this host.

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
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            group: default_group(),
        }
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/moat/admin.sock")
}

fn default_group() -> String {
    "moat-admin".into()
}
