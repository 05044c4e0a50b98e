//! Why a request was refused by a limit, and when to try again.

use std::fmt;
use std::time::Duration;

use super::{
    CONCURRENT_REQUESTS, INPUT_TOKENS, OUTPUT_TOKENS, REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE,
};
use crate::policy::ReasonCode;

/// Whose limit refused the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    /// The department's own limit (its configuration, or the default one).
    Department,
    /// The appliance already tracks the most departments it will
    /// ([`super::MAX_DEPARTMENTS`]) and none of them is idle; `limit` is then
    /// `concurrent_requests` and `allowed` that maximum.
    Appliance,
}

/// A request refused by a limit. Nothing was consumed: a refused request leaves every
/// bucket and count as it found them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LimitRefusal {
    /// The department that asked.
    pub department: String,
    /// The limit that refused: `requests_per_minute`, `tokens_per_minute`,
    /// `concurrent_requests`, `input_tokens` or `output_tokens`; the stable reason code is
    /// `limit.<limit>`.
    pub limit: &'static str,
    /// What the request needed of that limit: 1 request, its tokens (input plus reserved
    /// output), its input tokens or its max output tokens; for concurrency, one more slot.
    pub asked: u64,
    /// What the limit allows.
    pub allowed: u64,
    /// How long until the same request could be admitted, in whole seconds (for
    /// `Retry-After`); `None` when no wait will ever help: sizes over their limit, a request
    /// needing more tokens than a minute's allowance, a limit of zero.
    pub retry_after: Option<Duration>,
    /// Whether the limit is the department's or the appliance's.
    pub scope: LimitScope,
}

impl LimitRefusal {
    /// The reason code to record and report: `limit.<limit>`.
    pub fn reason(&self) -> ReasonCode {
        ReasonCode::Limit(self.limit)
    }

    fn describe(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let department = &self.department;
        let (asked, allowed) = (self.asked, self.allowed);
        if self.scope == LimitScope::Appliance {
            return write!(
                f,
                "the appliance is tracking its maximum of {allowed} departments and none is \
                 idle, so requests from department {department} cannot be admitted now"
            );
        }
        let never = self.retry_after.is_none();
        match self.limit {
            REQUESTS_PER_MINUTE if never => write!(
                f,
                "department {department} may make no requests (its limit is {allowed} requests \
                 per minute)"
            ),
            REQUESTS_PER_MINUTE => write!(
                f,
                "department {department} is over its limit of {allowed} requests per minute"
            ),
            TOKENS_PER_MINUTE if never => write!(
                f,
                "this request needs {asked} tokens (its input plus max_tokens), more than \
                 department {department}'s whole limit of {allowed} tokens per minute, so it \
                 can never be admitted; lower max_tokens or shorten the input"
            ),
            TOKENS_PER_MINUTE => write!(
                f,
                "department {department} is over its limit of {allowed} tokens per minute (this \
                 request needs {asked}: its input plus max_tokens)"
            ),
            CONCURRENT_REQUESTS if never => write!(
                f,
                "department {department} may run no requests (its limit is {allowed} concurrent \
                 requests)"
            ),
            CONCURRENT_REQUESTS => write!(
                f,
                "department {department} is at its limit of {allowed} requests in progress"
            ),
            INPUT_TOKENS => write!(
                f,
                "the input is {asked} tokens, more than department {department}'s limit of \
                 {allowed}; shorten it"
            ),
            OUTPUT_TOKENS => write!(
                f,
                "this request may produce up to {asked} tokens (max_tokens), more than \
                 department {department}'s limit of {allowed}; lower max_tokens"
            ),
            other => write!(
                f,
                "department {department} is over its {other} limit of {allowed}"
            ),
        }
    }
}

impl fmt::Display for LimitRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.describe(f)?;
        match self.retry_after {
            Some(wait) => write!(f, "; retry in {} s", wait.as_secs()),
            None => Ok(()),
        }
    }
}
