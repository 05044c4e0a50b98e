//! The admin socket's protocol, defined once for both ends: moatd answers with these types
//! and moatctl reads its answers into the same types, so a field renamed on one side is a
//! compile error on the other rather than a "-" in `moatctl status`.
//!
//! One request per connection: a JSON line, [`RequestLine`], that names the protocol the
//! client speaks ([`PROTOCOL_VERSION`]) beside the command, for example
//! `{"protocol": 1, "command": "audit.export", "since_unix_ms": null, "until_unix_ms": null}`.
//! The first line of the answer is `{"ok": true, "result": ...}` (the result of a model
//! command or status), `{"ok": true}` (an export follows it line by line) or a
//! [`Refusal`], `{"error": "...", "code": "..."}`. A client of another protocol is refused
//! with [`Refusal::protocol_mismatch`], which names both versions.
//!
//! Plain data only: no sockets, no files.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

/// The admin protocol this build speaks. Raised whenever a request or answer changes shape.
pub const PROTOCOL_VERSION: u32 = 1;

/// The protocol a request line without a `protocol` field speaks: moatctl from before the
/// protocol was versioned.
pub const UNVERSIONED: u32 = 0;

/// The [`Refusal::code`] of a request in another protocol than moatd's.
pub const PROTOCOL_MISMATCH: &str = "protocol_mismatch";

/// A request line: the protocol the client speaks and its command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestLine {
    pub protocol: u32,
    #[serde(flatten)]
    pub request: Request,
}

impl RequestLine {
    /// `request` in this build's protocol.
    pub fn new(request: Request) -> Self {
        Self {
            protocol: PROTOCOL_VERSION,
            request,
        }
    }
}

/// Only the protocol of a request line, read before the rest so that a client of another
/// protocol is told so rather than that its request is malformed.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Hello {
    #[serde(default)]
    pub protocol: Option<u32>,
}

impl Hello {
    /// The protocol a request line speaks ([`UNVERSIONED`] without the field); `None` when
    /// the line is not a JSON object.
    pub fn protocol_of(line: &str) -> Option<u32> {
        serde_json::from_str::<Hello>(line)
            .ok()
            .map(|hello| hello.protocol.unwrap_or(UNVERSIONED))
    }
}

/// A command on the socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", deny_unknown_fields)]
pub enum Request {
    /// The audit trail (or a time range of it) as an export file.
    #[serde(rename = "audit.export")]
    AuditExport {
        since_unix_ms: Option<i64>,
        until_unix_ms: Option<i64>,
    },
    /// A bundle tar of `size` bytes follows the request line.
    #[serde(rename = "model.import")]
    ModelImport {
        size: u64,
        #[serde(default)]
        allow_downgrade: bool,
    },
    #[serde(rename = "model.list")]
    ModelList {},
    #[serde(rename = "model.activate")]
    ModelActivate { model: String },
    #[serde(rename = "model.canary")]
    ModelCanary { model: String, percent: u8 },
    #[serde(rename = "model.promote")]
    ModelPromote {
        name: String,
        /// Promote even when the canary scores below the active version on its evaluation set.
        #[serde(default)]
        force: bool,
    },
    #[serde(rename = "model.eval")]
    ModelEval { model: String },
    #[serde(rename = "model.rollback")]
    ModelRollback { name: String },
    #[serde(rename = "model.remove")]
    ModelRemove { model: String },
    #[serde(rename = "status")]
    Status {},
}

impl Request {
    /// The command's name, as on the wire and in audit records.
    pub fn action(&self) -> &'static str {
        match self {
            Request::AuditExport { .. } => "audit.export",
            Request::ModelImport { .. } => "model.import",
            Request::ModelList {} => "model.list",
            Request::ModelActivate { .. } => "model.activate",
            Request::ModelCanary { .. } => "model.canary",
            Request::ModelPromote { .. } => "model.promote",
            Request::ModelEval { .. } => "model.eval",
            Request::ModelRollback { .. } => "model.rollback",
            Request::ModelRemove { .. } => "model.remove",
            Request::Status {} => "status",
        }
    }
}

/// Why moatd refused a request: the answer's only line (or, for an export of a range
/// without records, the line after `{"ok": true}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// What was wrong and what to do, for the admin.
    pub error: String,
    /// A short stable code where the refusal has one (rollout refusals: as in audit records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// On a protocol mismatch: the protocol moatd speaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
}

impl Refusal {
    pub fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            code: None,
            protocol: None,
        }
    }

    pub fn with_code(error: impl Into<String>, code: &str) -> Self {
        Self {
            code: Some(code.to_owned()),
            ..Self::new(error)
        }
    }

    /// A client speaking `client` asked a moatd speaking [`PROTOCOL_VERSION`].
    pub fn protocol_mismatch(client: u32) -> Self {
        Self {
            error: AnswerError::ProtocolMismatch {
                moatctl: client,
                moatd: PROTOCOL_VERSION,
            }
            .to_string(),
            code: Some(PROTOCOL_MISMATCH.to_owned()),
            protocol: Some(PROTOCOL_VERSION),
        }
    }
}

/// Why an answer line gave no result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AnswerError {
    /// moatctl and moatd speak different protocols.
    #[error(
        "moatctl speaks admin protocol {moatctl}, moatd speaks {moatd}: install matching versions"
    )]
    ProtocolMismatch { moatctl: u32, moatd: u32 },
    /// moatd refused the request.
    #[error("{}", .0.error)]
    Refused(Refusal),
    /// The line is not an answer of this protocol.
    #[error("moatd's answer is not one of admin protocol {PROTOCOL_VERSION} ({reason}): {line:?}")]
    Malformed { line: String, reason: String },
}

/// The first line of an accepted request, with its result.
#[derive(Serialize, Deserialize)]
struct Accepted<T> {
    ok: bool,
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    result: Option<T>,
}

/// Only the refusal fields of a line, whatever else it holds.
#[derive(Deserialize)]
struct MaybeRefused {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    protocol: Option<u32>,
}

/// The answer line (without its newline) for a result or a refusal.
pub fn answer_line<T: Serialize>(answer: &Result<T, Refusal>) -> String {
    let line = match answer {
        Ok(result) => serde_json::to_string(&Accepted {
            ok: true,
            result: Some(result),
        }),
        Err(refusal) => serde_json::to_string(refusal),
    };
    // Structs of strings, numbers and JSON values always serialize.
    line.unwrap_or_else(|e| format!("{{\"error\":\"the answer could not be written: {e}\"}}"))
}

/// The answer line that accepts a request whose output follows (an export).
pub fn accepted_line() -> String {
    let accepted = Accepted::<()> {
        ok: true,
        result: None,
    };
    serde_json::to_string(&accepted).unwrap_or_else(|_| "{\"ok\":true}".to_owned())
}

/// The refusal a line carries, if it is one.
pub fn refusal_in(line: &str) -> Option<Refusal> {
    let maybe: MaybeRefused = serde_json::from_str(line).ok()?;
    Some(Refusal {
        error: maybe.error?,
        code: maybe.code,
        protocol: maybe.protocol,
    })
}

fn refused(refusal: Refusal) -> AnswerError {
    match (refusal.code.as_deref(), refusal.protocol) {
        (Some(PROTOCOL_MISMATCH), Some(moatd)) => AnswerError::ProtocolMismatch {
            moatctl: PROTOCOL_VERSION,
            moatd,
        },
        _ => AnswerError::Refused(refusal),
    }
}

/// Reads an answer line into its result.
pub fn read_answer<T: DeserializeOwned>(line: &str) -> Result<T, AnswerError> {
    if let Some(refusal) = refusal_in(line) {
        return Err(refused(refusal));
    }
    let malformed = |reason: String| AnswerError::Malformed {
        line: line.trim_end().to_owned(),
        reason,
    };
    let accepted: Accepted<T> = serde_json::from_str(line).map_err(|e| malformed(e.to_string()))?;
    accepted
        .result
        .ok_or_else(|| malformed("it carries no result".to_owned()))
}

/// Reads the answer line of a request whose output follows (an export).
pub fn read_acceptance(line: &str) -> Result<(), AnswerError> {
    if let Some(refusal) = refusal_in(line) {
        return Err(refused(refusal));
    }
    match serde_json::from_str::<Accepted<serde::de::IgnoredAny>>(line) {
        Ok(Accepted { ok: true, .. }) => Ok(()),
        Ok(_) => Err(AnswerError::Malformed {
            line: line.trim_end().to_owned(),
            reason: "it is not ok".to_owned(),
        }),
        Err(e) => Err(AnswerError::Malformed {
            line: line.trim_end().to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// What `moatctl status` shows: the moatd and what it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// moatd's version.
    pub moatd: String,
    pub node_id: String,
    pub uptime_secs: u64,
    /// By served name.
    pub models: BTreeMap<String, ServedStatus>,
    /// What the loaded versions were estimated to take.
    pub memory_estimate_mib: u64,
    /// `None`: no budget set, what the host has available must hold each load.
    pub memory_budget_mib: Option<u64>,
}

/// How one name is served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedStatus {
    /// The active version; empty for an unsigned model directory.
    pub active: String,
    pub healthy: bool,
    pub canary: Option<CanaryStatus>,
    /// The version kept loaded for an instant rollback.
    pub standby: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryStatus {
    pub version: String,
    pub percent: u8,
}

/// What `moatctl model list` shows: every imported version, and the unsigned directories
/// served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub models: Vec<ListedModel>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// One name: its imported versions, or an unsigned model directory (no versions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedModel {
    pub name: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub unsigned_directory: bool,
    /// The highest version ever imported (anti-rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest: Option<String>,
    /// In version order.
    pub versions: Vec<ListedVersion>,
}

/// One imported version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedVersion {
    pub version: String,
    pub task: String,
    pub bytes: u64,
    /// The trusted key file that signed it, and the key's id.
    pub signer: String,
    pub signer_id: String,
    pub imported_unix_ms: i64,
    pub active: bool,
    pub canary_percent: Option<u8>,
    pub previous: bool,
    pub loaded: bool,
    /// The bundle's `moat-model check` figures; `None` when it carries none.
    pub check: Option<CheckReport>,
}

/// A version's check report (`check.json`, written by `moat-model check`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CheckReport {
    /// The file is in the bundle but is not a check report; it names the file.
    Unreadable {
        unreadable: String,
    },
    Figures(CheckFigures),
}

/// The figures `moatctl model list --details` shows of a check report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckFigures {
    /// The model directory's variant (exact, fast, int4-fast, ...).
    pub variant: Option<String>,
    /// The checkpoint it was checked against.
    pub against: Option<String>,
    pub passed: Option<bool>,
    pub greedy: Option<GreedyFigures>,
    pub teacher_forced: Option<TeacherForcedFigures>,
}

/// Greedy generation compared with the checkpoint's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GreedyFigures {
    #[serde(default)]
    pub identical_sequences: Option<u64>,
    #[serde(default)]
    pub of: Option<u64>,
    /// The report's other greedy figures, passed through.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Logits compared with the checkpoint's, token by token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherForcedFigures {
    #[serde(default)]
    pub top1_agreement: Option<f64>,
    #[serde(default)]
    pub max_abs_logit_error: Option<f64>,
    #[serde(default)]
    pub mean_abs_logit_error: Option<f64>,
    #[serde(default)]
    pub kl_mean: Option<f64>,
    #[serde(default)]
    pub kl_max: Option<f64>,
    /// The report's other figures, passed through.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// What an import registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportSummary {
    /// `name@version`.
    pub model: String,
    pub task: String,
    pub files: usize,
    pub bytes: u64,
    pub signer: String,
    pub signer_id: String,
    pub golden_prompts: usize,
}

/// A rollout command's result, one shape per command; on the wire, the shape alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RolloutResult {
    Activated(Activated),
    CanaryStarted(CanaryStarted),
    Promoted(Promoted),
    Evaluated(Evaluated),
    RolledBack(RolledBack),
    Removed(Removed),
}

impl RolloutResult {
    /// The version the command ended on (`name@version`), where the result names one.
    pub fn model(&self) -> Option<&str> {
        match self {
            RolloutResult::Activated(a) => Some(&a.model),
            RolloutResult::CanaryStarted(c) => Some(&c.model),
            RolloutResult::Promoted(p) => Some(&p.model),
            RolloutResult::Evaluated(e) => Some(&e.model),
            RolloutResult::RolledBack(RolledBack::Returned { model, .. }) => Some(model),
            RolloutResult::RolledBack(RolledBack::EndedCanary { .. }) => None,
            RolloutResult::Removed(_) => None,
        }
    }
}

/// `model.activate`: the version now active and the one before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activated {
    pub model: String,
    pub previous: Option<String>,
    /// Set when nothing changed: `already active`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// `model.canary`: the version taking a share, and the share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryStarted {
    pub model: String,
    pub percent: u8,
}

/// `model.promote`: the version now active, the one before it, and the scores that gated
/// it (`None` without an evaluation set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Promoted {
    pub model: String,
    pub previous: Option<String>,
    pub evaluation: Option<PromotionEvaluation>,
}

/// Both versions' scores on the canary's evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromotionEvaluation {
    pub canary: EvalScore,
    pub active: EvalScore,
    /// The active version it was compared with, `name@version`.
    pub active_version: String,
    /// Promoted with `--force` despite a lower score.
    pub forced: bool,
}

/// `model.eval`: a version's score on its evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluated {
    pub model: String,
    pub evaluation: EvalScore,
}

/// What one version scored on an evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalScore {
    pub items: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Well-formed answers over the items with a pattern or schema; `None` without such.
    pub format_validity: Option<f64>,
    pub format_checked_items: usize,
    pub mean_output_tokens: f64,
    pub latency_ms: LatencyMs,
    /// The first failed items.
    pub failures: Vec<EvalFailure>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyMs {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
}

/// One failed item: its number (from 1), prompt and answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalFailure {
    pub item: usize,
    pub prompt: String,
    pub answer: String,
}

/// `model.rollback`: a canary ended, or the previous version active again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RolledBack {
    /// The canary (`name@version`) ended; the active version takes every request.
    EndedCanary { ended_canary: String },
    /// `model` is active again; `previous` is the version it replaced.
    Returned {
        model: String,
        previous: Option<String>,
    },
}

/// `model.remove`: the version removed, `name@version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub removed: String,
}
