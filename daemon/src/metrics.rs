//! Prometheus metrics, served as text on the separate metrics listener.
//!
//! Labels carry model names, and department names only with `[metrics] per_department =
//! true` (the listener answers any local user; by default it says nothing of who uses the
//! node: every department is counted as [`ALL_DEPARTMENTS`]). Never request content. Gauges
//! that mirror engine state (queue depth, active sequences) are read when scraped.

use std::fmt::Write as _;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::{PrefixFigures, Usage};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
    pub department: String,
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerLabels {
    pub department: String,
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub reason: String,
    pub department: String,
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

type HistogramFamily = Family<ModelLabels, Histogram, fn() -> Histogram>;

/// The department label of every count without `[metrics] per_department = true`.
pub const ALL_DEPARTMENTS: &str = "(all)";

/// Every metric moatd exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    prompt_tokens: Family<CallerLabels, Counter>,
    completion_tokens: Family<CallerLabels, Counter>,
    time_to_first_token: HistogramFamily,
    inter_token_latency: HistogramFamily,
    queue_depth: Family<ModelLabels, Gauge>,
    active_sequences: Family<ModelLabels, Gauge>,
    prefix_cache_hits: Family<ModelLabels, Gauge>,
    prefix_cache_misses: Family<ModelLabels, Gauge>,
    prefix_cache_bytes: Family<ModelLabels, Gauge>,
    client_certificates_refused: Family<RefusalLabels, Counter>,
    policy_decisions: Family<DecisionLabels, Counter>,
    per_department: bool,
}

fn ttft_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn itl_histogram() -> Histogram {
    // 0.5 ms .. ~2 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 13))
}

impl Metrics {
    /// `per_department`: label counts with the caller's department (else
    /// [`ALL_DEPARTMENTS`]).
    pub fn new(per_department: bool) -> Self {
        let mut registry = Registry::with_prefix("moat");
        let requests = Family::default();
        registry.register(
            "requests",
            "API requests by endpoint, status, department and model",
            requests.clone(),
        );
        let prompt_tokens = Family::default();
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        let completion_tokens = Family::default();
        registry.register(
            "completion_tokens",
            "Completion tokens generated",
            completion_tokens.clone(),
        );
        let time_to_first_token: HistogramFamily = Family::new_with_constructor(ttft_histogram);
        registry.register(
            "time_to_first_token_seconds",
            "Time from request arrival to the first generated token",
            time_to_first_token.clone(),
        );
        let inter_token_latency: HistogramFamily = Family::new_with_constructor(itl_histogram);
        registry.register(
            "inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request",
            inter_token_latency.clone(),
        );
        let queue_depth = Family::default();
        registry.register(
            "queue_depth",
            "Requests waiting for a model's engine",
            queue_depth.clone(),
        );
        let active_sequences = Family::default();
        registry.register(
            "active_sequences",
            "Generations a model's engine is running",
            active_sequences.clone(),
        );
        let prefix_cache_hits = Family::default();
        registry.register(
            "prefix_cache_hits",
            "Prompt blocks a model's engine copied from its prefix cache instead of computing, \
             since the model's version loaded",
            prefix_cache_hits.clone(),
        );
        let prefix_cache_misses = Family::default();
        registry.register(
            "prefix_cache_misses",
            "Prefix cache lookups that found no block, since the model's version loaded",
            prefix_cache_misses.clone(),
        );
        let prefix_cache_bytes = Family::default();
        registry.register(
            "prefix_cache_bytes",
            "Bytes a model's prefix cache holds",
            prefix_cache_bytes.clone(),
        );
        let client_certificates_refused = Family::default();
        registry.register(
            "client_certificates_refused",
            "Client certificates refused at the TLS handshake, by reason",
            client_certificates_refused.clone(),
        );
        let policy_decisions = Family::default();
        registry.register(
            "policy_decisions",
            "Policy decisions by reason code, department and model",
            policy_decisions.clone(),
        );
        Self {
            per_department,
            registry,
            client_certificates_refused,
            policy_decisions,
            requests,
            prompt_tokens,
            completion_tokens,
            time_to_first_token,
            inter_token_latency,
            queue_depth,
            active_sequences,
            prefix_cache_hits,
            prefix_cache_misses,
            prefix_cache_bytes,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, mut labels: RequestLabels) {
        if !self.per_department {
            ALL_DEPARTMENTS.clone_into(&mut labels.department);
        }
        self.requests.get_or_create(&labels).inc();
    }

    fn department<'d>(&self, department: &'d str) -> &'d str {
        if self.per_department {
            department
        } else {
            ALL_DEPARTMENTS
        }
    }

    /// Counts one policy decision.
    pub fn policy_decision(&self, reason: &str, department: &str, model: &str) {
        self.policy_decisions
            .get_or_create(&DecisionLabels {
                reason: reason.to_owned(),
                department: self.department(department).to_owned(),
                model: model.to_owned(),
            })
            .inc();
    }

    /// Counts a client certificate refused at the handshake.
    pub fn client_refused(&self, reason: &'static str) {
        self.client_certificates_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    /// Records the current queue depth and active sequences of a model.
    pub fn engine_state(&self, model: &str, queued: usize, active: usize) {
        let labels = ModelLabels {
            model: model.to_owned(),
        };
        self.queue_depth.get_or_create(&labels).set(queued as i64);
        self.active_sequences
            .get_or_create(&labels)
            .set(active as i64);
    }

    /// Records a model's prefix cache counters.
    pub fn prefix_cache(&self, model: &str, figures: PrefixFigures) {
        let labels = ModelLabels {
            model: model.to_owned(),
        };
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.prefix_cache_hits
            .get_or_create(&labels)
            .set(gauge(figures.hits));
        self.prefix_cache_misses
            .get_or_create(&labels)
            .set(gauge(figures.misses));
        self.prefix_cache_bytes
            .get_or_create(&labels)
            .set(gauge(figures.bytes));
    }

    /// A timer for one generation; `started` is when the request arrived.
    pub fn generation_timer(
        &self,
        department: &str,
        model: &str,
        started: Instant,
    ) -> GenerationTimer {
        let caller = CallerLabels {
            department: self.department(department).to_owned(),
            model: model.to_owned(),
        };
        let model = ModelLabels {
            model: model.to_owned(),
        };
        GenerationTimer {
            started,
            last_token: None,
            time_to_first_token: self.time_to_first_token.get_or_create(&model).clone(),
            inter_token_latency: self.inter_token_latency.get_or_create(&model).clone(),
            prompt_tokens: self.prompt_tokens.get_or_create(&caller).clone(),
            completion_tokens: self.completion_tokens.get_or_create(&caller).clone(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            // Encoding into a String only fails on a formatter error; say so in the output.
            let _ = writeln!(text, "# metrics encoding failed");
        }
        text
    }
}

/// Measures one generation: time to first token, time between tokens, token counts.
#[derive(Debug)]
pub struct GenerationTimer {
    started: Instant,
    last_token: Option<Instant>,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    prompt_tokens: Counter,
    completion_tokens: Counter,
}

impl GenerationTimer {
    /// A token was generated.
    pub fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => self
                .time_to_first_token
                .observe((now - self.started).as_secs_f64()),
            Some(last) => self.inter_token_latency.observe((now - last).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    /// The generation finished with these counts.
    pub fn finished(&mut self, usage: Usage) {
        self.prompt_tokens.inc_by(usage.prompt_tokens as u64);
        self.completion_tokens
            .inc_by(usage.completion_tokens as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_per_department_no_department_is_named() {
        let metrics = Metrics::new(false);
        metrics.request(RequestLabels {
            endpoint: "chat".into(),
            status: 403,
            department: "finance".into(),
            model: "m".into(),
        });
        metrics.policy_decision("deny.no_permit", "legal", "m");
        metrics
            .generation_timer("research", "m", Instant::now())
            .finished(Usage {
                prompt_tokens: 3,
                completion_tokens: 1,
            });
        let text = metrics.encode();
        for department in ["finance", "legal", "research"] {
            assert!(!text.contains(department), "{department} in:\n{text}");
        }
        assert!(text.contains("department=\"(all)\""), "{text}");
    }

    #[test]
    fn exposition_names_departments_models_and_latencies() {
        let metrics = Metrics::new(true);
        metrics.request(RequestLabels {
            endpoint: "chat".into(),
            status: 200,
            department: "finance".into(),
            model: "m".into(),
        });
        let mut timer = metrics.generation_timer("finance", "m", Instant::now());
        timer.token();
        timer.token();
        timer.finished(Usage {
            prompt_tokens: 7,
            completion_tokens: 2,
        });
        metrics.engine_state("m", 3, 1);
        metrics.client_refused("revoked");
        let text = metrics.encode();
        for expected in [
            "moat_requests_total{endpoint=\"chat\",status=\"200\",department=\"finance\",model=\"m\"} 1",
            "moat_prompt_tokens_total{department=\"finance\",model=\"m\"} 7",
            "moat_completion_tokens_total{department=\"finance\",model=\"m\"} 2",
            "moat_time_to_first_token_seconds_count{model=\"m\"} 1",
            "moat_inter_token_latency_seconds_count{model=\"m\"} 1",
            "moat_queue_depth{model=\"m\"} 3",
            "moat_active_sequences{model=\"m\"} 1",
            "moat_client_certificates_refused_total{reason=\"revoked\"} 1",
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
    }
}
