//! The limit state of one department: its configuration, buckets and requests in progress.

use std::time::{Duration, Instant};

use super::bucket::TokenBucket;
use super::refusal::{LimitRefusal, LimitScope};
use super::{
    CONCURRENT_REQUESTS, INPUT_TOKENS, LimitRequest, LimitsConfig, OUTPUT_TOKENS,
    REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE,
};

/// Retry-After for a department at its concurrency limit: requests finish at no predictable
/// time, so the client is asked to come back soon.
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// Buckets exist only for the rates the configuration limits.
#[derive(Debug)]
pub(super) struct DepartmentState {
    config: LimitsConfig,
    requests: Option<TokenBucket>,
    tokens: Option<TokenBucket>,
    /// Counted whether or not concurrency is limited, so that a reload that adds the limit
    /// starts from the true count.
    in_flight: u64,
}

impl DepartmentState {
    /// Fresh state: full buckets, nothing in progress.
    pub(super) fn new(config: LimitsConfig) -> Self {
        DepartmentState {
            config,
            requests: config
                .requests_per_minute
                .map(|n| TokenBucket::full(u64::from(n))),
            tokens: config.tokens_per_minute.map(TokenBucket::full),
            in_flight: 0,
        }
    }

    /// Applies a new configuration, keeping bucket levels (clamped to the new capacities)
    /// and the count in progress. A rate newly limited starts with a full bucket.
    pub(super) fn reconfigure(&mut self, config: LimitsConfig) {
        self.config = config;
        reshape(
            &mut self.requests,
            config.requests_per_minute.map(u64::from),
        );
        reshape(&mut self.tokens, config.tokens_per_minute);
    }

    /// Admits the request, taking one request, its tokens and a concurrency slot, or
    /// refuses it taking nothing. Checks, in order: sizes; limits that no wait could
    /// satisfy; concurrency; requests per minute; tokens per minute.
    pub(super) fn admit(
        &mut self,
        department: &str,
        request: LimitRequest,
        now: Instant,
    ) -> Result<(), LimitRefusal> {
        let cost = request.cost();
        let refuse = |limit, asked, allowed, retry_after| LimitRefusal {
            department: department.to_owned(),
            limit,
            asked,
            allowed,
            retry_after,
            scope: LimitScope::Department,
        };
        self.check_fixed(request)
            .map_err(|(limit, asked, allowed)| refuse(limit, asked, allowed, None))?;

        if let Some(bucket) = &mut self.requests {
            bucket.refill(now);
        }
        if let Some(bucket) = &mut self.tokens {
            bucket.refill(now);
        }
        let requests_wait = self.requests.as_ref().and_then(|b| b.wait_for(1, now));
        let tokens_wait = self.tokens.as_ref().and_then(|b| b.wait_for(cost, now));
        // The client should come back when every limit would let it through, not only the
        // first one that refused.
        let rate_wait = requests_wait.max(tokens_wait);

        if let Some(max) = self.config.concurrent_requests
            && self.in_flight >= u64::from(max)
        {
            let wait = rate_wait.unwrap_or_default().max(CONCURRENCY_RETRY);
            return Err(refuse(
                CONCURRENT_REQUESTS,
                self.in_flight.saturating_add(1),
                u64::from(max),
                Some(wait),
            ));
        }
        if requests_wait.is_some() {
            let allowed = self.requests.as_ref().map_or(0, TokenBucket::capacity);
            return Err(refuse(REQUESTS_PER_MINUTE, 1, allowed, rate_wait));
        }
        if tokens_wait.is_some() {
            let allowed = self.tokens.as_ref().map_or(0, TokenBucket::capacity);
            return Err(refuse(TOKENS_PER_MINUTE, cost, allowed, rate_wait));
        }

        if let Some(bucket) = &mut self.requests {
            bucket.take(1);
        }
        if let Some(bucket) = &mut self.tokens {
            bucket.take(cost);
        }
        self.in_flight = self.in_flight.saturating_add(1);
        Ok(())
    }

    /// The limits a retry can never get past, as `(limit, asked, allowed)`.
    fn check_fixed(&self, request: LimitRequest) -> Result<(), (&'static str, u64, u64)> {
        let config = &self.config;
        if let Some(max) = config.max_input_tokens
            && request.input_tokens > max
        {
            return Err((INPUT_TOKENS, request.input_tokens, max));
        }
        if let Some(max) = config.max_output_tokens
            && request.max_output_tokens > max
        {
            return Err((OUTPUT_TOKENS, request.max_output_tokens, max));
        }
        if config.concurrent_requests == Some(0) {
            return Err((CONCURRENT_REQUESTS, 1, 0));
        }
        if let Some(bucket) = &self.requests
            && bucket.capacity() == 0
        {
            return Err((REQUESTS_PER_MINUTE, 1, 0));
        }
        if let Some(bucket) = &self.tokens
            && request.cost() > bucket.capacity()
        {
            return Err((TOKENS_PER_MINUTE, request.cost(), bucket.capacity()));
        }
        Ok(())
    }

    /// Frees one concurrency slot.
    pub(super) fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Returns `tokens` to the tokens-per-minute bucket, if there is one.
    pub(super) fn refund(&mut self, tokens: u64, now: Instant) {
        if let Some(bucket) = &mut self.tokens {
            bucket.refill(now);
            bucket.give_back(tokens);
        }
    }

    /// Whether nothing is in progress and every bucket is full at `now`: the state is then
    /// the same as a fresh one, and can be dropped without changing any later decision.
    pub(super) fn is_idle(&mut self, now: Instant) -> bool {
        let mut full = true;
        for bucket in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            bucket.refill(now);
            full &= bucket.is_full();
        }
        full && self.in_flight == 0
    }
}

/// Brings a bucket in line with a (possibly absent) new rate.
fn reshape(bucket: &mut Option<TokenBucket>, per_minute: Option<u64>) {
    match (bucket.as_mut(), per_minute) {
        (Some(existing), Some(n)) => existing.set_per_minute(n),
        (None, Some(n)) => *bucket = Some(TokenBucket::full(n)),
        (_, None) => *bucket = None,
    }
}
