//! The outcome of a policy check and its stable reason code.

use std::fmt;

/// Why a request was allowed or refused. The string form (`as_str`) is stable: it appears
/// in error bodies, metrics labels and audit records, and admins write tests against it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    /// A Cedar policy permitted the request and nothing refused it.
    Allow,
    /// No Cedar policy permitted the request (default deny).
    NoPermit,
    /// A Cedar `forbid` policy matched.
    Forbidden,
    /// The request's classification is above the model's or the department's ceiling.
    Classification,
    /// The request named a classification label that is not on the scale.
    UnknownClassification,
    /// A content rule with action `deny` fired; the detector's name.
    Content(String),
    /// A per-department limit: `requests_per_minute`, `tokens_per_minute`,
    /// `concurrent_requests`, `input_tokens` or `output_tokens`.
    Limit(&'static str),
}

impl ReasonCode {
    /// The stable name: `allow`, `deny.no_permit`, `deny.forbidden`, `deny.classification`,
    /// `deny.unknown_classification`, `content.<detector>`, `limit.<limit>`.
    pub fn as_str(&self) -> String {
        match self {
            ReasonCode::Allow => "allow".to_owned(),
            ReasonCode::NoPermit => "deny.no_permit".to_owned(),
            ReasonCode::Forbidden => "deny.forbidden".to_owned(),
            ReasonCode::Classification => "deny.classification".to_owned(),
            ReasonCode::UnknownClassification => "deny.unknown_classification".to_owned(),
            ReasonCode::Content(detector) => format!("content.{detector}"),
            ReasonCode::Limit(limit) => format!("limit.{limit}"),
        }
    }

    /// Whether the request may go on.
    pub fn is_allow(&self) -> bool {
        matches!(self, ReasonCode::Allow)
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}
