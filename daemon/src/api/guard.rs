//! The policy gate of every request: content rules on the prompt, the Cedar decision, the
//! classification ceilings, then the department's limits. A refusal leaves as 403 or 429
//! with the stable reason code and never the policy's text.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use actix_web::{HttpMessage as _, HttpRequest};
use moat_core::policy::content::{ContentScan, Direction, Purpose};
use moat_core::policy::limits::{Admission, LimitRequest};
use moat_core::policy::{
    AccessPolicy, ModelFacts, PolicyAction, PolicyDecision, PolicyRequest, ReasonCode,
};

use super::audit_trail::AuditNotes;
use super::error::ApiError;
use super::{AppState, Caller};

/// Header in which a request states its data classification.
pub const CLASSIFICATION_HEADER: &str = "x-moat-classification";

/// A request the policy let through, whose admission record is durable: the only value
/// the API's inference entry points (`Generator::submit`, `Embedding::embed`) accept, so
/// no model runs for a request the audit has not recorded. Made only by [`admit`]. It
/// holds the policy the decision was made under, the request's audit notes (the answer
/// goes into them) and its hold on the department's limits, released by
/// [`Admitted::settle`] (or when dropped).
#[derive(Debug)]
pub struct Admitted {
    policy: Arc<AccessPolicy>,
    notes: AuditNotes,
    admission: Option<Admission>,
}

impl Admitted {
    /// The policy the request was admitted under: its answer is checked by the same.
    pub fn policy(&self) -> &Arc<AccessPolicy> {
        &self.policy
    }

    /// The request's audit notes.
    pub fn notes(&self) -> &AuditNotes {
        &self.notes
    }

    /// The answer is done with this many output tokens: unused reserved tokens go back.
    pub fn settle(&mut self, output_tokens: u64) {
        if let Some(admission) = self.admission.take() {
            admission.settle(output_tokens, Instant::now());
        }
    }
}

/// A request the policy allowed and the limits took, not yet recorded as admitted.
struct Cleared {
    policy: Arc<AccessPolicy>,
    notes: AuditNotes,
    admission: Admission,
}

/// What a request asks for, as the gate needs it.
#[derive(Debug, Clone)]
pub struct GateRequest<'a> {
    pub action: PolicyAction,
    pub model: Option<ModelFacts<'a>>,
    /// The prompt's text as inference sees it (`redact` rules masked), for the audit.
    pub prompt_text: &'a str,
    /// What the content rules found in the prompt as the client sent it, before any
    /// masking ([`scan_prompt`]).
    pub prompt_scan: ContentScan,
    pub prompt_tokens: u64,
    pub max_tokens: u64,
}

/// Every finding of the content rules in a prompt as the client sent it. Scanned before
/// any `redact` rule masks the text: a masked match is still a finding that policies
/// (`context.findings`) and the audit must see.
pub fn scan_prompt(policy: &AccessPolicy, sent: &str) -> ContentScan {
    policy.content().scan(sent, Direction::Prompt)
}

/// The policy's prompt text for inference: `redact` rules masked.
pub fn redact_for_inference(policy: &AccessPolicy, text: &str) -> String {
    policy
        .content()
        .redact(text, Direction::Prompt, Purpose::Inference)
        .into_owned()
}

/// The gate as one request meets it: the server's state, the caller, the HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct Gate<'a> {
    pub state: &'a AppState,
    pub caller: &'a Caller,
    pub http: &'a HttpRequest,
}

impl Gate<'_> {
    /// The policy's decision before the prompt is tokenised, rendered or constrained,
    /// where it cannot depend on token counts (no policy mentions them): a refused request
    /// then costs only the decision. `request`'s token counts are not looked at.
    pub fn refuse_early(
        &self,
        policy: &AccessPolicy,
        request: &GateRequest<'_>,
    ) -> Result<(), ApiError> {
        if policy.decides_on_token_counts() {
            return Ok(());
        }
        let decision = decide(policy, self.caller, self.http, request);
        if decision.reason.is_allow() {
            return Ok(());
        }
        Err(self.refuse(policy, request, &decision))
    }

    /// Decides, takes the request's place in its department's limits, and makes its
    /// admission record durable: until that record is stored no inference may run, and
    /// the [`Admitted`] this returns is what inference asks for.
    pub async fn admit(
        &self,
        policy: Arc<AccessPolicy>,
        request: GateRequest<'_>,
    ) -> Result<Admitted, ApiError> {
        let Cleared {
            policy,
            notes,
            admission,
        } = self.clear(policy, request)?;
        // Dropped on failure, the admission gives the limits back.
        notes.admission().await?;
        Ok(Admitted {
            policy,
            notes,
            admission: Some(admission),
        })
    }

    /// The policy's word on a request that runs no model (listing models): decided, noted
    /// and charged to the limits like any other, with nothing to record before answering.
    pub fn permit(
        &self,
        policy: Arc<AccessPolicy>,
        request: GateRequest<'_>,
    ) -> Result<(), ApiError> {
        let cleared = self.clear(policy, request)?;
        cleared.admission.settle(0, Instant::now());
        Ok(())
    }

    /// Decides and, if allowed, takes the request's place in its department's limits.
    fn clear(
        &self,
        policy: Arc<AccessPolicy>,
        request: GateRequest<'_>,
    ) -> Result<Cleared, ApiError> {
        let decision = decide(&policy, self.caller, self.http, &request);
        if !decision.reason.is_allow() {
            return Err(self.refuse(&policy, &request, &decision));
        }
        let notes = audit_notes(self.http)?;
        note_decision(&notes, &policy, &request, &decision);
        let department = &self.caller.identity.department;
        let limits = LimitRequest {
            input_tokens: request.prompt_tokens,
            max_output_tokens: request.max_tokens,
        };
        let admission = match self
            .state
            .policy
            .limiter()
            .admit(department, limits, Instant::now())
        {
            Ok(admission) => admission,
            Err(refusal) => {
                let reason = ReasonCode::Limit(refusal.limit);
                self.count(&reason, &request);
                notes.refused_by_limit(reason.as_str());
                tracing::info!(%reason, "refused by a limit");
                return Err(ApiError::LimitExceeded {
                    reason: reason.as_str(),
                    message: refusal.to_string(),
                    retry_after: refusal.retry_after.map(|d| d.as_secs().max(1)),
                });
            }
        };
        self.count(&decision.reason, &request);
        Ok(Cleared {
            policy,
            notes,
            admission,
        })
    }

    /// Notes, counts and logs a policy refusal; the error the client gets.
    fn refuse(
        &self,
        policy: &AccessPolicy,
        request: &GateRequest<'_>,
        decision: &PolicyDecision,
    ) -> ApiError {
        if let Ok(notes) = audit_notes(self.http) {
            note_decision(&notes, policy, request, decision);
        }
        self.count(&decision.reason, request);
        tracing::info!(reason = %decision.reason, classification = %decision.classification, "refused by policy");
        ApiError::PolicyDenied {
            reason: decision.reason.as_str(),
        }
    }

    /// Counts a decision in the metrics.
    fn count(&self, reason: &ReasonCode, request: &GateRequest<'_>) {
        let model = request.model.map_or("", |m| m.name);
        self.state.metrics.policy_decision(
            &reason.as_str(),
            &self.caller.identity.department,
            model,
        );
    }
}

/// The request's audit notes. No notes, no record: refuse rather than answer unaudited.
fn audit_notes(http: &HttpRequest) -> Result<AuditNotes, ApiError> {
    http.extensions()
        .get::<AuditNotes>()
        .cloned()
        .ok_or_else(|| ApiError::AuditUnavailable("the request has no audit notes".into()))
}

/// Notes the policy's decision on `request`, and its prompt, for the audit.
fn note_decision(
    notes: &AuditNotes,
    policy: &AccessPolicy,
    request: &GateRequest<'_>,
    decision: &PolicyDecision,
) {
    notes.decided(
        policy,
        request.model,
        decision,
        &request.prompt_scan,
        request.prompt_text,
        request.prompt_tokens,
    );
}

/// The policy's decision on `request`, with nothing noted or counted.
pub(super) fn decide(
    policy: &AccessPolicy,
    caller: &Caller,
    http: &HttpRequest,
    request: &GateRequest<'_>,
) -> PolicyDecision {
    // A header that is not text names no label on the scale.
    let classification = http
        .headers()
        .get(CLASSIFICATION_HEADER)
        .map(|value| value.to_str().unwrap_or("\u{fffd}").trim());
    let unix_time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    policy.decide(&PolicyRequest {
        department: &caller.identity.department,
        subject: &caller.identity.subject,
        action: request.action,
        model: request.model,
        classification,
        source_ip: http
            .peer_addr()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip()),
        unix_time,
        prompt_tokens: request.prompt_tokens,
        max_tokens: request.max_tokens,
        prompt_scan: &request.prompt_scan,
    })
}

/// Checks a whole answer: `Err` when a deny rule fires (the answer is withheld), else the
/// answer with `redact` rules masked.
pub fn check_answer(policy: &AccessPolicy, answer: &str) -> Result<String, ApiError> {
    let scan = policy.content().scan(answer, Direction::Answer);
    if let Some(detector) = scan.denied_by {
        return Err(ApiError::AnswerWithheld {
            reason: ReasonCode::Content(detector).as_str(),
        });
    }
    Ok(policy
        .content()
        .redact(answer, Direction::Answer, Purpose::Inference)
        .into_owned())
}
