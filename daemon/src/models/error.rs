//! Why a rollout command was refused, with a short stable code for audit records.

use super::golden;
use super::registry::RegistryError;
use super::store::StoreError;
use crate::engine::StartError;

/// Why a rollout command was refused. The serving state is unchanged whenever one is
/// returned, except [`RolloutError::NotAudited`], which says whether the command was done.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(
        "{label} is not newer than {highest}, the highest version of {name} ever imported; \
         pass --allow-downgrade to import it anyway"
    )]
    Downgrade {
        name: String,
        label: String,
        highest: String,
    },
    #[error("{0:?} is not NAME@VERSION with a semantic version")]
    BadLabel(String),
    #[error("no model {0} is imported (moatctl model list shows what is)")]
    UnknownModel(String),
    #[error("{label} is not imported (moatctl model list shows the versions of {name})")]
    UnknownVersion { name: String, label: String },
    #[error(
        "{0} is served from an unsigned model directory (models.directory); bundles cannot replace it under the same name"
    )]
    Unsigned(String),
    #[error("{label} did not load: {source}")]
    Load {
        label: String,
        #[source]
        source: StartError,
    },
    #[error("{label} is refused: {source}")]
    Golden {
        label: String,
        #[source]
        source: golden::GoldenFailure,
    },
    #[error(
        "{label} needs about {needed} MiB, but {loaded} MiB of the {budget} MiB memory budget \
         are already loaded; remove or roll back a version, or raise models.memory_budget_mib"
    )]
    MemoryBudget {
        label: String,
        needed: u64,
        loaded: u64,
        budget: u64,
    },
    #[error(
        "{label} sets classification ceiling {ceiling:?}, which is not a label of the policy in force"
    )]
    Ceiling { label: String, ceiling: String },
    #[error("{0} is active; activate another version before removing it")]
    RemoveActive(String),
    #[error("{0} is the canary; roll the canary back before removing it")]
    RemoveCanary(String),
    #[error("{0} has no active version; activate one first")]
    NothingActive(String),
    #[error("{0} has no canary to promote")]
    NoCanary(String),
    #[error("{0} has no previous version to roll back to")]
    NoPrevious(String),
    #[error("the canary share must be between 1 and 99 percent, got {0}")]
    BadPercent(u8),
    #[error("{label} was signed by {signer}, which is no longer a trusted key")]
    NoLongerTrusted { label: String, signer: String },
    #[error("{0} is already active; a canary must be another version")]
    CanaryIsActive(String),
    #[error(
        "{label} needs about {needed} MiB, but the host has {available} MiB available; \
         free memory (remove or roll back a version) or set models.memory_budget_mib"
    )]
    HostMemory {
        label: String,
        needed: u64,
        available: u64,
    },
    #[error("{0} carries no evaluation set (eval.jsonl in the bundle)")]
    NoEvalSet(String),
    #[error("{label}: {source}")]
    BadEvalSet {
        label: String,
        #[source]
        source: moat_core::bundle::eval::EvalError,
    },
    #[error("evaluating {label} failed: {source}")]
    Eval {
        label: String,
        #[source]
        source: super::eval::EvalRunError,
    },
    #[error(
        "{canary} scores {canary_accuracy:.3} on its evaluation set, below {active} ({active_accuracy:.3}); \
         promoting it would make answers worse (moatctl model eval shows both; --force promotes anyway)"
    )]
    EvalRegression {
        canary: String,
        active: String,
        canary_accuracy: f64,
        active_accuracy: f64,
    },
    #[error("the command stopped unexpectedly: {0}")]
    Interrupted(String),
    #[error("{0}")]
    NotAudited(String),
}

impl RolloutError {
    /// A short stable code for audit records.
    pub fn code(&self) -> &'static str {
        match self {
            RolloutError::Store(e) => e.code(),
            RolloutError::Registry(_) => "registry_error",
            RolloutError::Downgrade { .. } => "downgrade",
            RolloutError::BadLabel(_) => "bad_request",
            RolloutError::UnknownModel(_) | RolloutError::UnknownVersion { .. } => "not_imported",
            RolloutError::Unsigned(_) => "unsigned_model",
            RolloutError::Load { .. } => "load_failed",
            RolloutError::Golden { .. } => "golden_failed",
            RolloutError::MemoryBudget { .. } => "memory_budget",
            RolloutError::Ceiling { .. } => "bad_ceiling",
            RolloutError::RemoveActive(_) | RolloutError::RemoveCanary(_) => "in_use",
            RolloutError::NothingActive(_)
            | RolloutError::NoCanary(_)
            | RolloutError::NoPrevious(_) => "nothing_to_do",
            RolloutError::BadPercent(_) => "bad_request",
            RolloutError::Interrupted(_) => "interrupted",
            RolloutError::NotAudited(_) => "audit_unavailable",
            RolloutError::NoLongerTrusted { .. } => "untrusted_key",
            RolloutError::CanaryIsActive(_) => "bad_request",
            RolloutError::HostMemory { .. } => "memory_budget",
            RolloutError::NoEvalSet(_) => "no_eval_set",
            RolloutError::BadEvalSet { .. } => "bad_eval_set",
            RolloutError::Eval { .. } => "eval_failed",
            RolloutError::EvalRegression { .. } => "eval_regression",
        }
    }
}
