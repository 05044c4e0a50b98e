//! What each request's audit records say, gathered as the request goes.
//!
//! The request middleware starts an [`AuditNotes`] for every department request; the
//! policy gate adds the decision, the classification, the findings and the prompt (as the
//! department's retention keeps it); the handlers add token counts and the answer. Before
//! any inference runs, the gate's [`AuditNotes::admission`] record must be durable (the
//! gate's `Admitted` is the proof).
//!
//! The final [`RecordKind::Request`] record has one writer at a time: whoever holds the
//! request's [`FinalRecord`]. The audit middleware holds it while the handler runs and
//! writes it with the response's status before the response leaves; a streamed answer
//! takes it ([`FinalRecordSlot::take`]) and writes it before its last event; whoever holds
//! it when the request is cancelled (the client went away) hands it in as abandoned by
//! dropping it. Written or dropped, it is gone: a request cannot have two final records.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix_web::{HttpMessage as _, HttpRequest};
use moat_core::audit::{AuditRecord, Finding, RecordKind, RetainedText, Retention};
use moat_core::policy::content::{ContentScan, Direction, Purpose};
use moat_core::policy::{AccessPolicy, ModelFacts, PolicyDecision};

use super::error::{ApiError, CLIENT_CLOSED_REQUEST};
use crate::audit::AuditLog;
use moat_store::time::now_unix_ms;

/// Who asked, from where, through which endpoint: known before the handler runs.
#[derive(Debug, Clone, Default)]
pub struct RequestOrigin {
    pub request_id: String,
    pub department: String,
    pub subject: String,
    pub source_address: String,
    pub action: &'static str,
}

#[derive(Debug, Default)]
struct Notes {
    origin: RequestOrigin,
    model: String,
    decision: &'static str,
    reason: String,
    classification: String,
    /// What the content rules found in the prompt.
    findings: Vec<Finding>,
    /// What they found in the answer (set once the answer is known).
    answer_findings: Vec<Finding>,
    prompt_tokens: u64,
    completion_tokens: u64,
    retention: Retention,
    prompt: Option<RetainedText>,
    answer: Option<RetainedText>,
}

/// A request's audit notes, shared between the middleware, the handler and its stream
/// (all on one worker thread).
#[derive(Debug, Clone)]
pub struct AuditNotes {
    notes: Rc<RefCell<Notes>>,
    started: Instant,
    log: Arc<AuditLog>,
}

impl AuditNotes {
    pub fn new(log: Arc<AuditLog>, origin: RequestOrigin, started: Instant) -> Self {
        Self {
            notes: Rc::new(RefCell::new(Notes {
                origin,
                ..Notes::default()
            })),
            started,
            log,
        }
    }

    /// The policy's decision on the request, and its prompt as the audit keeps it
    /// (`redact`, `redact_in_audit` and `deny` matches masked, then the department's
    /// retention).
    pub fn decided(
        &self,
        policy: &AccessPolicy,
        model: Option<ModelFacts<'_>>,
        decision: &PolicyDecision,
        prompt_scan: &ContentScan,
        prompt_text: &str,
        prompt_tokens: u64,
    ) {
        let mut notes = self.notes.borrow_mut();
        let retention = policy.data().retention(&notes.origin.department);
        let (model, version) = model.map_or(("", ""), |m| (m.name, m.version));
        // The served bundle's version; else the one the policy gives the model, if any.
        let version = match version {
            "" => policy
                .data()
                .models
                .get(model)
                .and_then(|m| m.version.as_deref())
                .unwrap_or_default(),
            served => served,
        };
        notes.model = match version {
            "" => model.to_owned(),
            version => format!("{model}@{version}"),
        };
        notes.decision = if decision.reason.is_allow() {
            "allow"
        } else {
            "deny"
        };
        notes.reason = decision.reason.as_str();
        decision
            .classification
            .clone_into(&mut notes.classification);
        notes.findings = findings(prompt_scan);
        notes.prompt_tokens = prompt_tokens;
        notes.retention = retention;
        notes.prompt = keep(policy, retention, prompt_text, Direction::Prompt);
    }

    /// The served model the request named, unless the policy's decision already named it.
    pub fn named_model(&self, name: &str) {
        let mut notes = self.notes.borrow_mut();
        if notes.model.is_empty() {
            name.clone_into(&mut notes.model);
        }
    }

    /// A limit refused what the policy allowed.
    pub fn refused_by_limit(&self, reason: String) {
        let mut notes = self.notes.borrow_mut();
        notes.decision = "deny";
        notes.reason = reason;
    }

    /// The answer (before the client's redaction), what the content rules found in it, and
    /// its length in tokens. Called again with a longer answer, it replaces what it noted.
    pub fn answered(&self, policy: &AccessPolicy, answer: &str, completion_tokens: u64) {
        let mut notes = self.notes.borrow_mut();
        let scan = policy.content().scan(answer, Direction::Answer);
        notes.answer_findings = findings(&scan);
        notes.completion_tokens = completion_tokens;
        notes.answer = keep(policy, notes.retention, answer, Direction::Answer);
    }

    /// A content rule withheld the answer: the record says `deny` with the rule's reason,
    /// and keeps what [`AuditNotes::answered`] noted (the answer's findings and the answer,
    /// masked, as retention says) as the evidence of what was withheld.
    pub fn withheld(&self, reason: &str) {
        let mut notes = self.notes.borrow_mut();
        notes.decision = "deny";
        reason.clone_into(&mut notes.reason);
    }

    /// Stores the admission record; until it is durable no inference may run.
    pub async fn admission(&self) -> Result<(), ApiError> {
        let record = self.record(RecordKind::Admission, 0, "");
        self.log
            .append(record)
            .await
            .map(drop)
            .map_err(|e| ApiError::AuditUnavailable(e.to_string()))
    }

    fn record(&self, kind: RecordKind, status: u16, error_code: &str) -> AuditRecord {
        let notes = self.notes.borrow();
        let origin = &notes.origin;
        let admission = kind == RecordKind::Admission;
        AuditRecord {
            kind,
            unix_ms: now_unix_ms(),
            node_id: self.log.node().node_id.clone(),
            request_id: origin.request_id.clone(),
            department: origin.department.clone(),
            subject: origin.subject.clone(),
            source_address: origin.source_address.clone(),
            model: notes.model.clone(),
            action: origin.action.to_owned(),
            decision: notes.decision.to_owned(),
            reason: if notes.reason.is_empty() {
                error_code.to_owned()
            } else {
                notes.reason.clone()
            },
            classification: notes.classification.clone(),
            findings: notes
                .findings
                .iter()
                .chain(&notes.answer_findings)
                .cloned()
                .collect(),
            prompt_tokens: notes.prompt_tokens,
            completion_tokens: notes.completion_tokens,
            latency_ms: self.started.elapsed().as_millis() as u64,
            status,
            // The admission record holds the prompt; the final record the answer, and
            // the prompt only when no admission record was written.
            prompt: if admission || notes.decision != "allow" {
                notes.prompt.clone()
            } else {
                None
            },
            answer: if admission {
                None
            } else {
                notes.answer.clone()
            },
            detail: None,
        }
    }
}

/// A request's final record, not yet written. Its holder is the one writer of the record
/// (see the module's documentation); dropped unwritten, it is handed in as abandoned, with
/// the status of a request whose client closed it.
#[derive(Debug)]
pub struct FinalRecord {
    notes: Option<AuditNotes>,
}

impl FinalRecord {
    pub fn new(notes: AuditNotes) -> Self {
        Self { notes: Some(notes) }
    }

    /// Stores the final record with the status the client gets; `error_code` is the
    /// refusal's code when the policy never decided.
    pub async fn write(mut self, status: u16, error_code: &str) -> Result<(), ApiError> {
        let Some(notes) = self.notes.take() else {
            return Ok(());
        };
        let record = notes.record(RecordKind::Request, status, error_code);
        notes
            .log
            .append(record)
            .await
            .map(drop)
            .map_err(|e| ApiError::AuditUnavailable(e.to_string()))
    }
}

impl Drop for FinalRecord {
    fn drop(&mut self) {
        if let Some(notes) = self.notes.take() {
            let record = notes.record(RecordKind::Request, CLIENT_CLOSED_REQUEST, "");
            // The client is gone: nobody waits for it to be durable.
            notes.log.submit(record);
        }
    }
}

/// Where a request's [`FinalRecord`] waits while the handler runs, shared by the audit
/// middleware and the handler (in the request's extensions).
#[derive(Debug, Clone, Default)]
pub struct FinalRecordSlot(Rc<RefCell<Option<FinalRecord>>>);

impl FinalRecordSlot {
    pub fn new(record: FinalRecord) -> Self {
        Self(Rc::new(RefCell::new(Some(record))))
    }

    /// Takes the final record and with it the duty to write it; `None` once taken.
    pub fn take(&self) -> Option<FinalRecord> {
        self.0.borrow_mut().take()
    }

    /// Takes a request's final record from its extensions, for a handler that answers
    /// past the middleware (a stream). No record, no answer.
    pub fn take_from(http: &HttpRequest) -> Result<FinalRecord, ApiError> {
        http.extensions()
            .get::<FinalRecordSlot>()
            .and_then(FinalRecordSlot::take)
            .ok_or_else(|| ApiError::AuditUnavailable("the request has no final record".into()))
    }
}

fn findings(scan: &ContentScan) -> Vec<Finding> {
    scan.findings
        .iter()
        .map(|f| Finding {
            detector: f.detector.clone(),
            count: f.count,
        })
        .collect()
}

/// `text` as the audit may keep it: masked for the audit, then as `retention` says.
fn keep(
    policy: &AccessPolicy,
    retention: Retention,
    text: &str,
    direction: Direction,
) -> Option<RetainedText> {
    if retention == Retention::None {
        return None;
    }
    let masked = policy.content().redact(text, direction, Purpose::Audit);
    RetainedText::keep(retention, &masked)
}
