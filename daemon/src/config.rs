//! `moat.toml`: loaded, validated as a whole, then used.
//!
//! Every bad field is reported at once, so an admin fixes the file in one pass; moatd exits
//! with [`EXIT_CONFIG`] before it touches a device or a port.

use std::path::{Path, PathBuf};

use serde::Deserialize;

mod admin;
mod audit;
mod client_ca;
mod serve;

pub use admin::AdminConfig;
pub use audit::{AuditConfig, SIGNING_KEY_CREDENTIAL, valid_node_id};
pub use client_ca::{ClientCa, DepartmentScope};
pub use serve::{
    CertField, IdentityConfig, LimitsConfig, MetricsConfig, ModelsConfig, PolicyConfig,
    ServerConfig, TlsConfig, network_allows, valid_model_name,
};

use crate::engine::ort_backend::{DEFAULT_PREFILL_CHUNK_TOKENS, DEFAULT_PREFIX_CACHE_MIB};
use crate::engine::{DevicePreference, EngineSettings, PrefixSharing, SessionOptions};

/// Exit status for a configuration error (`EX_USAGE`, as documented in the README).
pub const EXIT_CONFIG: u8 = 64;

/// The whole configuration file. Relative paths in it are relative to its directory.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub engine: EngineConfig,
    /// Required by `moatd serve`.
    pub server: Option<ServerConfig>,
    /// Required by `moatd serve`.
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub models: ModelsConfig,
    /// Required by `moatd serve`: no policy, no answer.
    pub policy: Option<PolicyConfig>,
    /// Required by `moatd serve`: no audit, no answer.
    pub audit: Option<AuditConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[engine]`: how models run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// The ONNX Runtime library (file or directory). Unset: `$MOAT_ONNXRUNTIME_LIB`, then
    /// `/usr/lib/moat/`.
    pub onnxruntime_library: Option<PathBuf>,
    /// `cpu`, `cuda` or `auto` (CUDA when usable, else CPU with a warning).
    #[serde(default)]
    pub device: DevicePreference,
    /// Threads per operator; unset lets ONNX Runtime use one per physical core.
    pub intra_op_threads: Option<usize>,
    /// With `intra_op_threads` set: pin each worker thread to its own processor (of those
    /// the process may use).
    #[serde(default = "default_pin_threads")]
    pub pin_threads: bool,
    /// `max_tokens` for requests that name none.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: usize,
    /// Requests waiting for the engine at most.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Sequences stepped together at most.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Most prompt tokens run through the graph at once (long prompts run in chunks).
    #[serde(default = "default_prefill_chunk_tokens")]
    pub prefill_chunk_tokens: usize,
    /// Tokens fed in one engine step at most; 0 (the default): no limit. Decodes go
    /// first, prompt chunks fill the rest.
    #[serde(default)]
    pub max_batched_tokens: usize,
    /// Waiting places one department may hold at most; unset: half of `queue_capacity`.
    pub department_queue: Option<usize>,
    /// Turns per round of free engine slots, by department (default 1 each).
    #[serde(default)]
    pub department_weights: std::collections::BTreeMap<String, u32>,
    /// Engine threads per text model, each with its own session and batch.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Whose requests share cached prompt prefixes: `per_department` (the default),
    /// `shared` or `off`.
    #[serde(default)]
    pub prefix_cache: PrefixSharing,
    /// The prefix cache's size per engine thread, in MiB.
    #[serde(default = "default_prefix_cache_mib")]
    pub prefix_cache_mib: usize,
    /// Positions each slot of the KV pool holds; 0 (the default): the model's whole
    /// context. A request whose prompt and `max_tokens` need more runs alone, with a cache
    /// of its own. On a GPU the pool is committed device memory, `max_batch` slots of this
    /// size for every layer.
    #[serde(default)]
    pub kv_slot_tokens: usize,
}

fn default_prefix_cache_mib() -> usize {
    DEFAULT_PREFIX_CACHE_MIB
}

fn default_max_tokens() -> usize {
    EngineSettings::default().default_max_tokens
}
fn default_queue_capacity() -> usize {
    EngineSettings::default().queue_capacity
}
fn default_max_batch() -> usize {
    EngineSettings::default().max_batch
}
fn default_workers() -> usize {
    EngineSettings::default().workers
}
fn default_pin_threads() -> bool {
    false
}
fn default_prefill_chunk_tokens() -> usize {
    DEFAULT_PREFILL_CHUNK_TOKENS
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            onnxruntime_library: None,
            device: DevicePreference::default(),
            intra_op_threads: None,
            pin_threads: default_pin_threads(),
            default_max_tokens: default_max_tokens(),
            queue_capacity: default_queue_capacity(),
            max_batch: default_max_batch(),
            prefill_chunk_tokens: default_prefill_chunk_tokens(),
            max_batched_tokens: 0,
            department_queue: None,
            department_weights: Default::default(),
            workers: default_workers(),
            prefix_cache: PrefixSharing::default(),
            prefix_cache_mib: default_prefix_cache_mib(),
            kv_slot_tokens: 0,
        }
    }
}

/// A configuration that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is not valid TOML for moat: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{} has {} invalid setting(s):\n  {}", .path.display(), .problems.len(), .problems.join("\n  "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` names the file in errors, and relative paths
    /// are resolved against its directory.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        config.validate(path)?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        if let Some(lib) = &mut self.engine.onnxruntime_library {
            serve::resolve(lib, base);
        }
        if let Some(tls) = &mut self.tls {
            tls.resolve(base);
        }
        self.models.resolve(base);
        if let Some(policy) = &mut self.policy {
            serve::resolve(&mut policy.directory, base);
        }
        if let Some(audit) = &mut self.audit {
            serve::resolve(&mut audit.state_directory, base);
        }
        serve::resolve(&mut self.admin.socket, base);
        if let Some(socket) = &mut self.admin.audit_socket {
            serve::resolve(socket, base);
        }
    }

    /// Checks what `moatd serve` needs on top of [`Config::validate`]: the server sections
    /// are present, and every file they name exists and is readable.
    pub fn validate_for_serve(&self, origin: &Path) -> Result<(), ConfigError> {
        let mut problems = self.problems();
        match &self.server {
            Some(server) => server.problems(&mut problems),
            None => problems.push("[server] is required: listen = [\"ADDRESS:PORT\"]".into()),
        }
        match &self.tls {
            Some(tls) => tls.problems(&mut problems),
            None => problems
                .push("[tls] is required: certificate, private_key and client_ca (files)".into()),
        }
        self.models.problems(&mut problems);
        match &self.policy {
            Some(policy) => policy.problems(&mut problems),
            None => problems.push(
                "[policy] is required: directory = \"DIR\" (Cedar schema, *.cedar, moat-policy.toml)"
                    .into(),
            ),
        }
        match &self.audit {
            Some(audit) => audit.problems(&mut problems),
            None => problems.push(
                "[audit] is required: state_directory = \"DIR\" and recipients = [\"age1...\"]"
                    .into(),
            ),
        }
        self.metrics.problems(&mut problems);
        self.limits.problems(&mut problems);
        if self.engine.default_max_tokens > self.limits.max_tokens {
            // A request naming no max_tokens must not get more than one may ask for.
            problems.push(format!(
                "engine.default_max_tokens ({}) must not exceed limits.max_tokens ({})",
                self.engine.default_max_tokens, self.limits.max_tokens
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: origin.to_path_buf(),
                problems,
            })
        }
    }

    /// Checks every field; `origin` names where the values came from in the error.
    pub fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: origin.to_path_buf(),
                problems,
            })
        }
    }

    fn problems(&self) -> Vec<String> {
        let e = &self.engine;
        let mut problems = Vec::new();
        // Upper bounds keep a typo from sizing a huge allocation at start.
        for (name, value, max) in [
            ("engine.default_max_tokens", e.default_max_tokens, 1 << 21),
            ("engine.queue_capacity", e.queue_capacity, 1 << 16),
            ("engine.max_batch", e.max_batch, 1024),
            ("engine.workers", e.workers, 64),
            (
                "engine.prefill_chunk_tokens",
                e.prefill_chunk_tokens,
                1 << 16,
            ),
            (
                "engine.intra_op_threads",
                e.intra_op_threads.unwrap_or(1),
                1024,
            ),
            (
                "engine.max_batched_tokens",
                e.max_batched_tokens.max(1),
                1 << 20,
            ),
            (
                "engine.department_queue",
                e.department_queue.unwrap_or(1),
                e.queue_capacity.max(1),
            ),
            (
                "engine.prefix_cache_mib",
                e.prefix_cache_mib.max(1),
                1 << 16,
            ),
            ("engine.kv_slot_tokens", e.kv_slot_tokens.max(1), 1 << 21),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            } else if value > max {
                problems.push(format!("{name} must be at most {max}, got {value}"));
            }
        }
        if e.max_batched_tokens != 0 && e.max_batched_tokens < e.prefill_chunk_tokens + e.max_batch
        {
            problems.push(format!(
                "engine.max_batched_tokens ({}) must be 0 or at least prefill_chunk_tokens + max_batch ({}), so that a prompt chunk always fits beside the decodes",
                e.max_batched_tokens,
                e.prefill_chunk_tokens + e.max_batch
            ));
        }
        if e.workers > 1 && e.intra_op_threads.is_none() {
            problems.push(format!(
                "engine.workers = {} needs engine.intra_op_threads: each worker's session would \
                 otherwise start a thread per core, {} times over",
                e.workers, e.workers
            ));
        }
        if e.workers > 1 && e.pin_threads {
            problems.push(
                "engine.pin_threads with engine.workers > 1 would pin every worker to the same \
                 processors; leave pinning off with several workers"
                    .to_owned(),
            );
        }
        for (department, &weight) in &e.department_weights {
            if !(1..=1000).contains(&weight) {
                problems.push(format!(
                    "engine.department_weights.{department} must be between 1 and 1000, got {weight}"
                ));
            }
        }
        problems
    }

    pub fn session_options(&self) -> SessionOptions {
        SessionOptions {
            device: self.engine.device,
            intra_op_threads: self.engine.intra_op_threads,
            pin_threads: self.engine.pin_threads,
            prefill_chunk_tokens: self.engine.prefill_chunk_tokens,
            max_batch: self.engine.max_batch,
            prefix_cache_bytes: match self.engine.prefix_cache {
                PrefixSharing::Off => 0,
                _ => self.engine.prefix_cache_mib << 20,
            },
            kv_slot_tokens: (self.engine.kv_slot_tokens > 0).then_some(self.engine.kv_slot_tokens),
            ..SessionOptions::default()
        }
    }

    pub fn engine_settings(&self) -> EngineSettings {
        EngineSettings {
            default_max_tokens: self.engine.default_max_tokens,
            queue_capacity: self.engine.queue_capacity,
            max_batch: self.engine.max_batch,
            prefill_chunk_tokens: self.engine.prefill_chunk_tokens,
            max_batched_tokens: self.engine.max_batched_tokens,
            department_queue: self.engine.department_queue.unwrap_or(0),
            department_weights: self.engine.department_weights.clone(),
            workers: self.engine.workers,
            prefix_cache: self.engine.prefix_cache,
        }
    }
}

/// Pushes a problem for each file that is not a readable regular file.
fn check_file(problems: &mut Vec<String>, field: &str, path: &Path) {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => {
            if let Err(e) = std::fs::File::open(path) {
                problems.push(format!("{field}: cannot read {}: {e}", path.display()));
            }
        }
        Ok(_) => problems.push(format!("{field}: {} is not a file", path.display())),
        Err(e) => problems.push(format!("{field}: {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let text =
            "[engine]\nintra_op_threads = 0\nqueue_capacity = 0\nmax_batch = 0\nworkers = 0\n";
        let err = Config::parse(text, Path::new("moat.toml")).expect_err("invalid");
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("wrong error: {err}");
        };
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains("engine.workers")),
            "{problems:?}"
        );
    }

    #[test]
    fn several_workers_need_their_own_thread_counts_and_no_pinning() {
        for (text, expected) in [
            ("[engine]\nworkers = 2\n", "needs engine.intra_op_threads"),
            (
                "[engine]\nworkers = 2\nintra_op_threads = 2\npin_threads = true\n",
                "engine.pin_threads",
            ),
        ] {
            let err = Config::parse(text, Path::new("moat.toml")).expect_err("invalid");
            assert!(err.to_string().contains(expected), "{err}");
        }
        let text = "[engine]\nworkers = 2\nintra_op_threads = 2\n";
        Config::parse(text, Path::new("moat.toml")).expect("two workers of two threads");
    }

    #[test]
    fn serve_reports_every_missing_section_and_file_at_once() {
        let text = "[engine]\ndefault_max_tokens = 900\n[limits]\nmax_tokens = 800\n[server]\nlisten = []\n[tls]\ncertificate = \"nope.crt\"\nprivate_key = \"nope.key\"\nclient_ca = []\n[metrics]\nlisten = \"0.0.0.0:9464\"\n";
        let config = Config::parse(text, Path::new("/nonexistent/moat.toml")).expect("parses");
        let err = config
            .validate_for_serve(Path::new("moat.toml"))
            .expect_err("invalid");
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("wrong error: {err}");
        };
        let all = problems.join("\n");
        for expected in [
            "server.listen",
            "tls.certificate: /nonexistent/nope.crt",
            "tls.private_key",
            "tls.client_ca",
            "[audit] is required",
            "metrics.listen",
            "engine.default_max_tokens (900) must not exceed limits.max_tokens (800)",
        ] {
            assert!(all.contains(expected), "{expected:?} missing from:\n{all}");
        }
    }

    #[test]
    fn identity_fields_are_named_as_in_the_certificate() {
        let text = "[identity]\ndepartment = \"subject.O\"\nsubject = \"san.email\"\n";
        let config = Config::parse(text, Path::new("m")).expect("valid");
        assert_eq!(config.identity.department, CertField::SubjectOrganization);
        assert_eq!(config.identity.subject, CertField::SanEmail);
        assert!(Config::parse("[identity]\ndepartment = \"subject.X\"\n", Path::new("m")).is_err());
    }

    #[test]
    fn unknown_fields_and_bad_devices_are_refused() {
        assert!(Config::parse("[engine]\ndevcie = \"cpu\"\n", Path::new("m")).is_err());
        assert!(Config::parse("[engine]\ndevice = \"tpu\"\n", Path::new("m")).is_err());
        let ok = Config::parse("[engine]\ndevice = \"cuda\"\n", Path::new("m")).expect("valid");
        assert_eq!(ok.engine.device, DevicePreference::Cuda);
        assert_eq!(
            Config::parse("", Path::new("m"))
                .expect("empty ok")
                .engine
                .device,
            DevicePreference::Auto
        );
    }
}
