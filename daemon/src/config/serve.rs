//! The sections `moatd serve` needs: listeners, TLS, identity mapping, models, metrics and
//! request limits. `moatd generate` ignores them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::client_ca::ClientCa;

/// `[server]`: the department-facing HTTPS listener(s).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Addresses to listen on (`127.0.0.1:8443`, `[::]:8443`; port 0 picks a free port).
    pub listen: Vec<SocketAddr>,
    /// HTTP worker threads; unset: one per processor. Inference runs elsewhere.
    pub workers: Option<usize>,
    /// A client must finish the TLS handshake within this time.
    #[serde(default = "default_handshake_timeout_ms")]
    pub tls_handshake_timeout_ms: u64,
    /// In-flight requests get this long to finish when moatd stops.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// Client source networks every listener accepts (CIDR); others are closed before the
    /// TLS handshake. Empty: any address.
    #[serde(default)]
    pub allowed_networks: Vec<IpNet>,
    /// Per listener (by its `listen` address), networks instead of `allowed_networks`.
    #[serde(default)]
    pub listener_networks: BTreeMap<String, Vec<IpNet>>,
}

impl ServerConfig {
    /// The networks a listener accepts; empty means any.
    pub fn networks_for(&self, listen: SocketAddr) -> &[IpNet] {
        self.listener_networks
            .iter()
            .find(|(address, _)| address.parse::<SocketAddr>().ok() == Some(listen))
            .map_or(&self.allowed_networks, |(_, networks)| networks)
    }
}

/// Whether `peer` is in one of `networks` (empty: any). IPv4 peers on an IPv6 listener
/// arrive as `::ffff:a.b.c.d` and are matched as the IPv4 address they are.
pub fn network_allows(networks: &[IpNet], peer: std::net::IpAddr) -> bool {
    let peer = match peer {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    };
    networks.is_empty() || networks.iter().any(|network| network.contains(&peer))
}

fn default_handshake_timeout_ms() -> u64 {
    3_000
}
fn default_shutdown_grace_secs() -> u64 {
    30
}

/// `[tls]`: the server's certificate and what client certificates are accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate first, then any intermediates.
    pub certificate: PathBuf,
    /// PEM file with the server's private key (PKCS#8, SEC1 or PKCS#1).
    pub private_key: PathBuf,
    /// PEM or DER CRL files. With any CRL configured, every CA in a client's chain must have
    /// a current CRL here: unknown or expired revocation status refuses the client.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// The department CAs (`[[tls.client_ca]]`), each bound to the departments it may vouch
    /// for; a client certificate must chain to one that vouches for its department.
    pub client_ca: Vec<ClientCa>,
}

/// Where a part of the caller's identity is read from in the leaf certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum CertField {
    /// The subject's organization (O).
    #[serde(rename = "subject.O")]
    SubjectOrganization,
    /// The subject's organizational unit (OU).
    #[serde(rename = "subject.OU")]
    SubjectOrganizationalUnit,
    /// The subject's common name (CN).
    #[serde(rename = "subject.CN")]
    SubjectCommonName,
    /// The first DNS name in the subject alternative names.
    #[serde(rename = "san.dns")]
    SanDns,
    /// The first e-mail address (rfc822Name) in the subject alternative names.
    #[serde(rename = "san.email")]
    SanEmail,
    /// The first URI in the subject alternative names.
    #[serde(rename = "san.uri")]
    SanUri,
}

/// `[identity]`: how the leaf client certificate names the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default = "default_department_field")]
    pub department: CertField,
    #[serde(default = "default_subject_field")]
    pub subject: CertField,
}

fn default_department_field() -> CertField {
    CertField::SubjectOrganizationalUnit
}
fn default_subject_field() -> CertField {
    CertField::SubjectCommonName
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            department: default_department_field(),
            subject: default_subject_field(),
        }
    }
}

/// `[models]`: where bundles are kept and checked, and unsigned model directories to serve
/// (development only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// The bundle store: imported bundles and the model registry (sled).
    #[serde(default = "default_store")]
    pub store: PathBuf,
    /// Directory of the public keys (`*.pub`) trusted to sign bundles.
    #[serde(default = "default_trusted_keys")]
    pub trusted_keys: PathBuf,
    /// Memory (MiB) the loaded model versions may take together, by their estimates;
    /// unset: a version loads only if the host has that much available.
    pub memory_budget_mib: Option<u64>,
    /// Unsigned model directories, served as they are (development and tests): a directory
    /// of model directories. Unset in production: models come from signed bundles only.
    pub directory: Option<PathBuf>,
    /// Served name -> subdirectory of `directory`. Empty: every subdirectory holding a
    /// `moat-model.json`, under its directory name.
    #[serde(default)]
    pub serve: BTreeMap<String, PathBuf>,
}

fn default_store() -> PathBuf {
    PathBuf::from("/var/lib/moat/models")
}

fn default_trusted_keys() -> PathBuf {
    PathBuf::from("/etc/moat/trusted-keys")
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            store: default_store(),
            trusted_keys: default_trusted_keys(),
            memory_budget_mib: None,
            directory: None,
            serve: BTreeMap::new(),
        }
    }
}

/// `[policy]`: the policy directory (Cedar schema and policies, `moat-policy.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub directory: PathBuf,
}

impl PolicyConfig {
    pub(super) fn problems(&self, problems: &mut Vec<String>) {
        if !self.directory.is_dir() {
            problems.push(format!(
                "policy.directory: {} is not a directory",
                self.directory.display()
            ));
        }
    }
}

/// `[metrics]`: the Prometheus endpoint, on its own plain-HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Off with `enabled = false`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
    /// Required to listen on anything but loopback: metrics name departments and models.
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// Label counts with the caller's department. Off by default: any local user can read
    /// the listener, and who uses the node, how much, and how often they are refused is the
    /// departments' business.
    #[serde(default)]
    pub per_department: bool,
}

fn default_true() -> bool {
    true
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_metrics_listen(),
            allow_non_loopback: false,
            per_department: false,
        }
    }
}

/// `[limits]`: what a single request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body; larger ones get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may name (400 above, with the limit in the message).
    #[serde(default = "default_max_tokens_limit")]
    pub max_tokens: usize,
    /// Most chat messages in one request.
    #[serde(default = "default_max_messages")]
    pub max_messages: usize,
    /// A request body must arrive within this time (408 after it).
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// Refusals (4xx) one caller (identity, or source address without one) may get per
    /// `refusal_window_secs`; beyond them it gets 429 at once, and one summary audit
    /// record per window instead of one each. 0: no budget.
    #[serde(default = "default_refusals_per_window")]
    pub refusals_per_window: u32,
    /// Failed TLS handshakes one source address may make per window; beyond them its
    /// connections are closed before any TLS work. 0: no budget.
    #[serde(default = "default_failed_handshakes_per_window")]
    pub failed_handshakes_per_window: u32,
    /// The window of both budgets.
    #[serde(default = "default_refusal_window_secs")]
    pub refusal_window_secs: u64,
}

fn default_max_body_bytes() -> usize {
    1 << 20
}
fn default_max_tokens_limit() -> usize {
    4096
}
fn default_max_messages() -> usize {
    256
}
fn default_body_read_timeout_ms() -> u64 {
    10_000
}
fn default_refusals_per_window() -> u32 {
    60
}
fn default_failed_handshakes_per_window() -> u32 {
    30
}
fn default_refusal_window_secs() -> u64 {
    60
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body_bytes(),
            max_tokens: default_max_tokens_limit(),
            max_messages: default_max_messages(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
            refusals_per_window: default_refusals_per_window(),
            failed_handshakes_per_window: default_failed_handshakes_per_window(),
            refusal_window_secs: default_refusal_window_secs(),
        }
    }
}

impl ServerConfig {
    pub(super) fn problems(&self, problems: &mut Vec<String>) {
        if self.listen.is_empty() {
            problems.push("server.listen must name at least one address".to_owned());
        }
        if self.workers == Some(0) || self.workers.is_some_and(|w| w > 1024) {
            problems.push("server.workers must be between 1 and 1024".to_owned());
        }
        if !(100..=60_000).contains(&self.tls_handshake_timeout_ms) {
            problems.push("server.tls_handshake_timeout_ms must be between 100 and 60000".into());
        }
        if self.shutdown_grace_secs > 3_600 {
            problems.push("server.shutdown_grace_secs must be at most 3600".to_owned());
        }
        for address in self.listener_networks.keys() {
            match address.parse::<SocketAddr>() {
                Ok(parsed) if self.listen.contains(&parsed) => {}
                _ => problems.push(format!(
                    "server.listener_networks: {address:?} is not one of server.listen"
                )),
            }
        }
    }
}

impl TlsConfig {
    pub(super) fn problems(&self, problems: &mut Vec<String>) {
        super::check_file(problems, "tls.certificate", &self.certificate);
        super::check_file(problems, "tls.private_key", &self.private_key);
        if self.client_ca.is_empty() {
            // Without a CA nobody could connect; an empty list is a mistake, not a policy.
            problems.push(
                "tls.client_ca must name at least one CA: [[tls.client_ca]] file = \"...\" \
                 departments = [\"...\"]"
                    .to_owned(),
            );
        }
        for (index, ca) in self.client_ca.iter().enumerate() {
            ca.problems(index + 1, problems);
        }
        for crl in &self.crl {
            super::check_file(problems, "tls.crl", crl);
        }
    }

    pub(super) fn resolve(&mut self, base: &Path) {
        resolve(&mut self.certificate, base);
        resolve(&mut self.private_key, base);
        self.client_ca
            .iter_mut()
            .for_each(|ca| resolve(&mut ca.file, base));
        self.crl.iter_mut().for_each(|p| resolve(p, base));
    }
}

impl ModelsConfig {
    pub(super) fn problems(&self, problems: &mut Vec<String>) {
        if self.memory_budget_mib == Some(0) {
            problems.push("models.memory_budget_mib must be above 0".to_owned());
        }
        let Some(directory) = &self.directory else {
            if !self.serve.is_empty() {
                problems.push("models.serve needs models.directory".to_owned());
            }
            return;
        };
        if !directory.is_dir() {
            problems.push(format!(
                "models.directory: {} is not a directory",
                directory.display()
            ));
            return;
        }
        for (name, dir) in &self.serve {
            if !valid_model_name(name) {
                problems.push(format!(
                    "models.serve: name {name:?} must be 1-64 characters of letters, digits, '.', '_', '-'"
                ));
            }
            let path = directory.join(dir);
            if !path.join(crate::engine::model_dir::METADATA_FILE).is_file() {
                problems.push(format!(
                    "models.serve.{name}: {} holds no {}",
                    path.display(),
                    crate::engine::model_dir::METADATA_FILE
                ));
            }
        }
    }

    pub(super) fn resolve(&mut self, base: &Path) {
        resolve(&mut self.store, base);
        resolve(&mut self.trusted_keys, base);
        if let Some(directory) = &mut self.directory {
            resolve(directory, base);
        }
    }

    /// Served name and directory of every unsigned model directory to load.
    pub fn selected(&self) -> std::io::Result<Vec<(String, PathBuf)>> {
        let Some(directory) = &self.directory else {
            return Ok(Vec::new());
        };
        if !self.serve.is_empty() {
            return Ok(self
                .serve
                .iter()
                .map(|(name, dir)| (name.clone(), directory.join(dir)))
                .collect());
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(directory)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
            if let Some(name) = name
                && valid_model_name(&name)
                && path.join(crate::engine::model_dir::METADATA_FILE).is_file()
            {
                found.push((name, path));
            }
        }
        found.sort();
        Ok(found)
    }
}

pub use moat_core::bundle::manifest::valid_model_name;

impl MetricsConfig {
    pub(super) fn problems(&self, problems: &mut Vec<String>) {
        if self.enabled && !self.listen.ip().is_loopback() && !self.allow_non_loopback {
            problems.push(format!(
                "metrics.listen {} is not a loopback address; set metrics.allow_non_loopback = true to expose it",
                self.listen
            ));
        }
    }
}

impl LimitsConfig {
    pub(super) fn problems(&self, problems: &mut Vec<String>) {
        for (name, value, min, max) in [
            ("limits.max_body_bytes", self.max_body_bytes, 1024, 1 << 30),
            ("limits.max_tokens", self.max_tokens, 1, 1 << 21),
            ("limits.max_messages", self.max_messages, 1, 1 << 16),
        ] {
            if !(min..=max).contains(&value) {
                problems.push(format!(
                    "{name} must be between {min} and {max}, got {value}"
                ));
            }
        }
        if !(100..=600_000).contains(&self.body_read_timeout_ms) {
            problems.push(format!(
                "limits.body_read_timeout_ms must be between 100 and 600000, got {}",
                self.body_read_timeout_ms
            ));
        }
        if !(1..=86_400).contains(&self.refusal_window_secs) {
            problems.push(format!(
                "limits.refusal_window_secs must be between 1 and 86400, got {}",
                self.refusal_window_secs
            ));
        }
    }
}

/// Relative paths in the file are relative to the file's directory.
pub(super) fn resolve(path: &mut PathBuf, base: &Path) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}
