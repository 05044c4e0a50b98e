//! Models: the registry of imported bundles, their verification, and load / warm-up /
//! golden prompts / swap / rollback.
//!
//! Rollout commands run one at a time. A version loads beside the one serving, answers
//! its golden prompts, and only then takes traffic, in one atomic swap of the serving
//! table; if anything fails the serving version stays as it was. Every command's outcome
//! is an audit record naming the model as `name@version`. Each command's change to the
//! registry and the serving table is one transition (`rollout`), applied in one commit.

mod error;
pub mod eval;
pub mod golden;
pub mod loader;
pub mod registry;
mod report;
mod rollout;
pub mod serving;
pub mod store;

pub use error::RolloutError;

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use moat_core::admin::{ImportSummary, ModelList, Request, RolloutResult, Status};
use moat_core::bundle::VerifiedBundle;

use crate::audit::AuditLog;
use crate::audit::log::admin_record;
use crate::config::Config;
use crate::engine::{ModelDirectory, OrtRuntime};
use crate::policy::PolicyStore;
use moat_store::time::now_unix_ms;
use registry::{ModelEntry, Registry, VersionEntry};
use serving::{Canary, LoadedModel, Route, ServingTable, Share};
use store::BundleStore;

/// `name@version`, parsed.
pub fn parse_label(text: &str) -> Result<(String, semver::Version), RolloutError> {
    let bad = || RolloutError::BadLabel(text.to_owned());
    let (name, version) = text.split_once('@').ok_or_else(bad)?;
    let version = semver::Version::parse(version).map_err(|_| bad())?;
    if !moat_core::bundle::manifest::valid_model_name(name) {
        return Err(bad());
    }
    Ok((name.to_owned(), version))
}

/// The models of one moatd and the commands that change them.
#[derive(Debug)]
pub struct Models {
    pub table: Arc<ServingTable>,
    registry: Registry,
    store: Arc<BundleStore>,
    trusted_keys: PathBuf,
    memory_budget: Option<u64>,
    config: Config,
    runtime: Arc<OrtRuntime>,
    audit: Arc<AuditLog>,
    policy: Arc<PolicyStore>,
    /// One rollout command at a time.
    commands: tokio::sync::Mutex<()>,
    started: Instant,
}

impl Models {
    /// Opens the bundle store and registry. Nothing is loaded yet: see [`Models::restore`].
    pub fn open(
        config: &Config,
        runtime: Arc<OrtRuntime>,
        audit: Arc<AuditLog>,
        policy: Arc<PolicyStore>,
        table: Arc<ServingTable>,
    ) -> Result<Self, RolloutError> {
        let models = &config.models;
        let store = BundleStore::open(&models.store)?;
        let registry = Registry::open(&models.store.join("registry"))?;
        Ok(Self {
            table,
            registry,
            store: Arc::new(store),
            trusted_keys: models.trusted_keys.clone(),
            memory_budget: models.memory_budget_mib.map(|m| m << 20),
            config: config.clone(),
            runtime,
            audit,
            policy,
            commands: tokio::sync::Mutex::new(()),
            started: Instant::now(),
        })
    }

    /// Loads what the registry says is active (and any canary), as before the restart.
    /// A version that no longer verifies or loads is left out, logged and audited; the
    /// others serve. `before_load` hears each version about to load; when it says false
    /// (moatd is stopping) nothing more is loaded.
    pub async fn restore(&self, before_load: &dyn Fn(&str) -> bool) {
        let all = match self.registry.all() {
            Ok(all) => all,
            Err(e) => {
                tracing::error!(error = %e, "the model registry cannot be read; no bundle is served");
                return;
            }
        };
        for (name, entry) in all {
            let Some(active) = &entry.active else {
                continue;
            };
            let label = format!("{name}@{active}");
            if !before_load(&label) {
                tracing::warn!(model = %label, "restore stopped: moatd is stopping");
                return;
            }
            let model = match self.prepare(&name, active).await {
                Ok(model) => model,
                Err(e) => {
                    self.record_restore(&label, Err(&e)).await;
                    continue;
                }
            };
            let mut route = Route::new(model);
            if let Some(canary) = &entry.canary {
                let label = format!("{name}@{}", canary.version);
                if !before_load(&label) {
                    tracing::warn!(model = %label, "restore stopped: moatd is stopping");
                    return;
                }
                match self.prepare(&name, &canary.version).await {
                    Ok(model) => {
                        route.canary = Some(Canary {
                            model,
                            share: Share::new(canary.percent),
                        });
                        self.record_restore(&label, Ok(())).await;
                    }
                    Err(e) => {
                        self.record_restore(&label, Err(&e)).await;
                        // The canary ends: its share goes back to the active version.
                        let mut ended = entry.clone();
                        ended.canary = None;
                        if let Err(e) = self.registry.put(&name, &ended) {
                            tracing::error!(error = %e, "the ended canary could not be recorded");
                        }
                    }
                }
            }
            self.table
                .update(|routes| routes.insert(name.clone(), route));
            self.record_restore(&label, Ok(())).await;
        }
    }

    /// Audits a command's outcome: `model` is the version it concerns (`name@version`, or
    /// the name alone when no version is known).
    async fn record(
        &self,
        action: &str,
        subject: &str,
        model: &str,
        outcome: Result<(), &RolloutError>,
    ) -> Result<(), crate::audit::AuditError> {
        let (decision, detail) = match outcome {
            Ok(()) => ("allow", format!("{action} {model}").trim_end().to_owned()),
            Err(e) => {
                tracing::error!(action, model, error = %e, "model command refused");
                ("deny", format!("{}: {e}", e.code()))
            }
        };
        let mut record = admin_record(self.audit.node(), action, subject, decision, detail);
        record.model = model.to_owned();
        self.audit.append(record).await.map(|_| ())
    }

    /// A restore's outcome, audited as moatd's own action.
    async fn record_restore(&self, model: &str, outcome: Result<(), &RolloutError>) {
        if let Err(e) = self.record("model.restore", "moatd", model, outcome).await {
            tracing::error!(error = %e, model, "a model restore could not be audited");
        }
    }

    /// Imports a bundle an admin streams in, and audits it with the admin's identity. The
    /// bundle is received and verified before the command lock is taken, so a slow sender
    /// never holds up another command.
    pub async fn import(
        &self,
        peer: &str,
        bundle: Box<dyn Read + Send>,
        allow_downgrade: bool,
    ) -> Result<ImportSummary, RolloutError> {
        let outcome = match self.receive(bundle).await {
            Ok(staged) => {
                let _one_at_a_time = self.commands.lock().await;
                self.register(staged, allow_downgrade)
                    .map(|verified| report::import_summary(&verified))
            }
            Err(e) => Err(e),
        };
        self.audited("model.import", peer, String::new(), outcome)
            .await
    }

    /// Runs a command, one at a time, and audits it as `action` with the admin's identity.
    pub async fn command(
        &self,
        peer: &str,
        action: &'static str,
        command: Command,
    ) -> Result<RolloutResult, RolloutError> {
        let (outcome, named) = {
            let _one_at_a_time = self.commands.lock().await;
            match command {
                Command::Activate { label } => (self.activate(&label).await, label),
                Command::Canary { label, percent } => (self.canary(&label, percent).await, label),
                Command::Promote { name, force } => (self.promote(&name, force).await, name),
                Command::Eval { label } => {
                    let outcome = self.evaluate(&label).await;
                    (outcome.map(RolloutResult::Evaluated), label)
                }
                Command::Rollback { name } => (self.rollback(&name).await, name),
                Command::Remove { label } => (self.remove(&label), label),
            }
        };
        self.audited(action, peer, named, outcome).await
    }

    /// `status`, audited like a command.
    pub async fn status(&self, peer: &str) -> Result<Status, RolloutError> {
        let outcome = Ok(self.status_report());
        self.audited("status", peer, String::new(), outcome).await
    }

    /// `model.list`, audited like a command.
    pub async fn list(&self, peer: &str) -> Result<ModelList, RolloutError> {
        let outcome = self.list_report();
        self.audited("model.list", peer, String::new(), outcome)
            .await
    }

    /// Audits what `action` came to for `peer`, naming the version it ended on where the
    /// result names one (else `named`); an answer whose record failed is an error that
    /// says whether the action was done.
    async fn audited<T: NamesModel>(
        &self,
        action: &'static str,
        peer: &str,
        named: String,
        outcome: Result<T, RolloutError>,
    ) -> Result<T, RolloutError> {
        let model = outcome
            .as_ref()
            .ok()
            .and_then(NamesModel::model)
            .map_or(named, str::to_owned);
        if let Err(e) = self
            .record(action, peer, &model, outcome.as_ref().map(|_| ()))
            .await
        {
            // The admin must know both what happened and that its record is missing.
            let what = match &outcome {
                Ok(_) => "was done".to_owned(),
                Err(refusal) => format!("was refused ({})", refusal.code()),
            };
            return Err(RolloutError::NotAudited(format!(
                "{action} {model} {what}, but its audit record could not be written: {e}"
            )));
        }
        outcome
    }

    /// Streams a bundle into staging and verifies it (signature and manifest before any
    /// file is accepted, then every file's hash). Runs before the command lock is taken,
    /// so a slow sender never holds up another command.
    async fn receive(&self, bundle: Box<dyn Read + Send>) -> Result<store::Staged, RolloutError> {
        let trusted = store::trusted_keys(&self.trusted_keys)?;
        // Unpacking and hashing read the whole bundle: off the async workers.
        let store = Arc::clone(&self.store);
        actix_web::rt::task::spawn_blocking(move || store.receive(bundle, &trusted))
            .await
            .map_err(|e| RolloutError::Interrupted(e.to_string()))?
            .map_err(RolloutError::from)
    }

    /// Registers a verified bundle: anti-rollback, then into place, then the registry.
    fn register(
        &self,
        staged: store::Staged,
        allow_downgrade: bool,
    ) -> Result<VerifiedBundle, RolloutError> {
        let manifest = &staged.verified.manifest;
        if let Some(highest) = self.registry.highest(&manifest.name)?
            && manifest.version <= highest
            && !allow_downgrade
        {
            return Err(RolloutError::Downgrade {
                name: manifest.name.clone(),
                label: manifest.label(),
                highest: highest.to_string(),
            });
        }
        if self.is_unsigned(&manifest.name) {
            return Err(RolloutError::Unsigned(manifest.name.clone()));
        }
        let registered = self
            .registry
            .get(&manifest.name)?
            .is_some_and(|entry| entry.versions.contains_key(&manifest.version.to_string()));
        if !registered {
            // Files of an import that died before it was registered: not a version.
            self.store.remove(&manifest.name, &manifest.version)?;
        }
        let verified = self.store.install(staged)?;
        let manifest = &verified.manifest;
        self.registry.record_import(
            &manifest.name,
            &manifest.version,
            VersionEntry {
                imported_unix_ms: now_unix_ms(),
                signer: verified.signer.clone(),
                signer_id: verified.signer_id.clone(),
                bytes: manifest.total_bytes(),
                task: manifest.task.to_string(),
            },
        )?;
        tracing::info!(bundle = %manifest.label(), signer = %verified.signer, "bundle imported");
        Ok(verified)
    }

    fn is_unsigned(&self, name: &str) -> bool {
        self.table
            .snapshot()
            .get(name)
            .is_some_and(|route| route.active.version.is_none())
    }

    fn entry(&self, name: &str) -> Result<ModelEntry, RolloutError> {
        self.registry
            .get(name)?
            .ok_or_else(|| RolloutError::UnknownModel(name.to_owned()))
    }

    /// A loaded version: one already loaded for this name if there is one, else verified
    /// from disk, loaded beside what serves, warmed, and put through its golden prompts.
    async fn prepare(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, RolloutError> {
        let label = format!("{name}@{version}");
        let version =
            semver::Version::parse(version).map_err(|_| RolloutError::BadLabel(label.clone()))?;
        let entry = self.entry(name)?;
        let Some(imported) = entry.versions.get(&version.to_string()) else {
            return Err(RolloutError::UnknownVersion {
                name: name.to_owned(),
                label,
            });
        };
        let trusted = store::trusted_keys(&self.trusted_keys)?;
        if let Some(route) = self.table.snapshot().get(name)
            && let Some(loaded) = route
                .loaded()
                .find(|m| m.version.as_ref() == Some(&version))
        {
            // Loaded and checked already; its signer must still be trusted.
            if !trusted.iter().any(|k| k.id() == imported.signer_id) {
                return Err(RolloutError::NoLongerTrusted {
                    label,
                    signer: imported.signer.clone(),
                });
            }
            return Ok(Arc::clone(loaded));
        }
        // Every file is hashed again: off the async workers.
        let (verified, dir) = {
            let store = Arc::clone(&self.store);
            let (name, version) = (name.to_owned(), version.clone());
            actix_web::rt::task::spawn_blocking(move || {
                store.open_version(&name, &version, &trusted)
            })
            .await
            .map_err(|e| RolloutError::Interrupted(e.to_string()))??
        };
        let manifest = verified.manifest;
        if let Some(ceiling) = &manifest.classification_ceiling
            && self.policy.current().data().rank(ceiling).is_none()
        {
            return Err(RolloutError::Ceiling {
                label,
                ceiling: ceiling.clone(),
            });
        }
        let needed = loader::memory_estimate(&manifest.model, manifest.total_bytes());
        self.check_budget(&label, needed)?;
        let directory = ModelDirectory {
            root: dir,
            metadata: manifest.model.clone(),
        };
        let config = self.config.clone();
        let runtime = Arc::clone(&self.runtime);
        let served =
            actix_web::rt::task::spawn_blocking(move || loader::load(&config, &runtime, directory))
                .await
                .map_err(|e| RolloutError::Interrupted(e.to_string()))?
                .map_err(|source| RolloutError::Load {
                    label: label.clone(),
                    source,
                })?;
        let passed =
            golden::check(&manifest, &served)
                .await
                .map_err(|source| RolloutError::Golden {
                    label: label.clone(),
                    source,
                })?;
        tracing::info!(model = %label, golden = passed, "version loaded and passed its golden prompts");
        Ok(Arc::new(LoadedModel {
            name: name.to_owned(),
            version: Some(version),
            served,
            classification_ceiling: manifest.classification_ceiling,
            response_schema: manifest.response_schema,
            sampling: manifest.sampling,
            memory_bytes: needed,
        }))
    }

    fn check_budget(&self, label: &str, needed: u64) -> Result<(), RolloutError> {
        let Some(budget) = self.memory_budget else {
            // No budget set: what the host has available now must hold it.
            return match loader::host_available_bytes() {
                Some(available) if needed > available => Err(RolloutError::HostMemory {
                    label: label.to_owned(),
                    needed: needed >> 20,
                    available: available >> 20,
                }),
                _ => Ok(()),
            };
        };
        let loaded = self.table.memory_bytes();
        if loaded.saturating_add(needed) > budget {
            return Err(RolloutError::MemoryBudget {
                label: label.to_owned(),
                needed: needed >> 20,
                loaded: loaded >> 20,
                budget: budget >> 20,
            });
        }
        Ok(())
    }
}

/// A rollout command from the admin socket (imports come with a stream: [`Models::import`]).
#[derive(Debug)]
pub enum Command {
    Activate {
        label: String,
    },
    Canary {
        label: String,
        percent: u8,
    },
    Promote {
        name: String,
        force: bool,
    },
    /// Runs a version's evaluation set (loading the version if it is not loaded).
    Eval {
        label: String,
    },
    Rollback {
        name: String,
    },
    Remove {
        label: String,
    },
}

impl Command {
    /// The rollout command a request asks for; `None` for the other requests.
    pub fn of(request: Request) -> Option<Self> {
        Some(match request {
            Request::ModelActivate { model } => Command::Activate { label: model },
            Request::ModelCanary { model, percent } => Command::Canary {
                label: model,
                percent,
            },
            Request::ModelPromote { name, force } => Command::Promote { name, force },
            Request::ModelEval { model } => Command::Eval { label: model },
            Request::ModelRollback { name } => Command::Rollback { name },
            Request::ModelRemove { model } => Command::Remove { label: model },
            Request::AuditExport { .. }
            | Request::ModelImport { .. }
            | Request::ModelList {}
            | Request::Status {} => return None,
        })
    }
}

/// An answer that may name the version it concerns (`name@version`), for its audit record.
trait NamesModel {
    fn model(&self) -> Option<&str>;
}

impl NamesModel for RolloutResult {
    fn model(&self) -> Option<&str> {
        RolloutResult::model(self)
    }
}

impl NamesModel for ImportSummary {
    fn model(&self) -> Option<&str> {
        Some(&self.model)
    }
}

impl NamesModel for Status {
    fn model(&self) -> Option<&str> {
        None
    }
}

impl NamesModel for ModelList {
    fn model(&self) -> Option<&str> {
        None
    }
}
