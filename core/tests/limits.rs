//! Per-department limits as the daemon uses them: admit, settle, drop, reload, from many
//! threads at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use moat_core::policy::limits::{
    Admission, LimitRefusal, LimitRequest, LimitScope, Limiter, LimitsConfig,
};
use proptest::prelude::*;

fn rpm(n: u32) -> LimitsConfig {
    LimitsConfig {
        requests_per_minute: Some(n),
        ..LimitsConfig::default()
    }
}

fn tpm(n: u64) -> LimitsConfig {
    LimitsConfig {
        tokens_per_minute: Some(n),
        ..LimitsConfig::default()
    }
}

fn concurrent(n: u32) -> LimitsConfig {
    LimitsConfig {
        concurrent_requests: Some(n),
        ..LimitsConfig::default()
    }
}

fn limiter(default: LimitsConfig) -> Limiter {
    Limiter::new(default, HashMap::new())
}

fn tokens(input_tokens: u64, max_output_tokens: u64) -> LimitRequest {
    LimitRequest {
        input_tokens,
        max_output_tokens,
    }
}

fn one() -> LimitRequest {
    tokens(1, 0)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Admits and at once finishes a request, failing the test (at the caller's line) if it
/// is refused.
#[track_caller]
fn pass(limits: &Limiter, department: &str, request: LimitRequest, now: Instant) {
    if let Err(refusal) = limits.admit(department, request, now) {
        panic!("refused: {refusal}");
    }
}

fn refused(result: Result<Admission, LimitRefusal>) -> LimitRefusal {
    match result {
        Ok(admission) => panic!("expected a refusal, got {admission:?}"),
        Err(refusal) => refusal,
    }
}

#[test]
fn requests_per_minute_refuses_until_the_bucket_refills() {
    let limits = limiter(rpm(60));
    let t0 = Instant::now();
    for _ in 0..60 {
        pass(&limits, "finance", one(), t0);
    }
    let refusal = refused(limits.admit("finance", one(), t0));
    assert_eq!(refusal.limit, "requests_per_minute");
    assert_eq!(refusal.reason().as_str(), "limit.requests_per_minute");
    assert_eq!(refusal.retry_after, Some(secs(1)));
    assert_eq!(refusal.scope, LimitScope::Department);
    assert_eq!(
        refusal.to_string(),
        "department finance is over its limit of 60 requests per minute; retry in 1 s"
    );

    // 60 a minute is one a second: not yet at 999 ms, exactly at 1 s.
    assert!(
        limits
            .admit("finance", one(), t0 + Duration::from_millis(999))
            .is_err()
    );
    pass(&limits, "finance", one(), t0 + secs(1));
    assert!(limits.admit("finance", one(), t0 + secs(1)).is_err());
}

#[test]
fn retry_after_is_the_wait_for_the_request_rounded_up() {
    let limits = limiter(tpm(600));
    let t0 = Instant::now();
    pass(&limits, "ops", tokens(500, 0), t0);
    // 100 left, 250 needed: 150 more at 10 a second is 15 s.
    let refusal = refused(limits.admit("ops", tokens(200, 50), t0));
    assert_eq!(refusal.limit, "tokens_per_minute");
    assert_eq!((refusal.asked, refusal.allowed), (250, 600));
    assert_eq!(refusal.retry_after, Some(secs(15)));
    assert!(refusal.to_string().ends_with("retry in 15 s"));

    assert!(
        limits
            .admit("ops", tokens(200, 50), t0 + Duration::from_millis(14_999))
            .is_err()
    );
    pass(&limits, "ops", tokens(200, 50), t0 + secs(15));

    // A partial second rounds up: 7 tokens at 10 a second is 0.7 s, reported as 1 s.
    let refusal = refused(limits.admit("ops", tokens(7, 0), t0 + secs(15)));
    assert_eq!(refusal.retry_after, Some(secs(1)));
}

#[test]
fn retry_after_waits_for_every_rate_limit_not_only_the_first() {
    let limits = limiter(LimitsConfig {
        requests_per_minute: Some(60),
        tokens_per_minute: Some(600),
        ..LimitsConfig::default()
    });
    let t0 = Instant::now();
    for _ in 0..60 {
        pass(&limits, "ops", tokens(10, 0), t0);
    }
    // Requests are back in 1 s, but 100 tokens take 10 s.
    let refusal = refused(limits.admit("ops", tokens(100, 0), t0));
    assert_eq!(refusal.limit, "requests_per_minute");
    assert_eq!(refusal.retry_after, Some(secs(10)));
    pass(&limits, "ops", tokens(100, 0), t0 + secs(10));
}

#[test]
fn a_request_larger_than_a_minutes_tokens_can_never_pass() {
    let limits = limiter(tpm(1000));
    let refusal = refused(limits.admit("legal", tokens(900, 200), Instant::now()));
    assert_eq!(refusal.limit, "tokens_per_minute");
    assert_eq!(refusal.retry_after, None);
    assert_eq!((refusal.asked, refusal.allowed), (1100, 1000));
    let message = refusal.to_string();
    assert!(message.contains("can never be admitted"), "{message}");
    assert!(!message.contains("retry"), "{message}");
}

#[test]
fn sizes_are_refused_with_no_retry() {
    let limits = limiter(LimitsConfig {
        max_input_tokens: Some(100),
        max_output_tokens: Some(50),
        ..LimitsConfig::default()
    });
    let now = Instant::now();
    let refusal = refused(limits.admit("hr", tokens(101, 10), now));
    assert_eq!(refusal.limit, "input_tokens");
    assert_eq!((refusal.asked, refusal.allowed), (101, 100));
    assert_eq!(refusal.retry_after, None);
    assert_eq!(
        refusal.to_string(),
        "the input is 101 tokens, more than department hr's limit of 100; shorten it"
    );

    let refusal = refused(limits.admit("hr", tokens(10, 51), now));
    assert_eq!(refusal.limit, "output_tokens");
    assert_eq!((refusal.asked, refusal.allowed), (51, 50));
    assert_eq!(refusal.retry_after, None);

    pass(&limits, "hr", tokens(100, 50), now);
}

#[test]
fn concurrency_is_refused_until_an_admission_is_dropped() {
    let limits = limiter(concurrent(2));
    let now = Instant::now();
    let first = limits.admit("it", one(), now).expect("slot 1");
    let _second = limits.admit("it", one(), now).expect("slot 2");
    let refusal = refused(limits.admit("it", one(), now));
    assert_eq!(refusal.limit, "concurrent_requests");
    assert_eq!(refusal.retry_after, Some(secs(1)));
    assert_eq!(
        refusal.to_string(),
        "department it is at its limit of 2 requests in progress; retry in 1 s"
    );

    drop(first);
    let third = limits.admit("it", one(), now).expect("slot freed by drop");
    assert!(limits.admit("it", one(), now).is_err());
    third.settle(0, now);
    pass(&limits, "it", one(), now);
}

#[test]
fn a_refused_request_consumes_nothing() {
    let limits = limiter(LimitsConfig {
        requests_per_minute: Some(2),
        tokens_per_minute: Some(100),
        concurrent_requests: Some(1),
        ..LimitsConfig::default()
    });
    let now = Instant::now();
    let held = limits.admit("sales", tokens(10, 10), now).expect("first");
    // Refused for concurrency: takes neither a request nor tokens.
    assert_eq!(
        refused(limits.admit("sales", tokens(10, 10), now)).limit,
        "concurrent_requests"
    );
    drop(held);
    // Refused for tokens (80 left): takes no request.
    assert_eq!(
        refused(limits.admit("sales", tokens(50, 40), now)).limit,
        "tokens_per_minute"
    );
    // So one request and all 80 tokens are still there.
    pass(&limits, "sales", tokens(40, 40), now);
    let refusal = refused(limits.admit("sales", tokens(0, 0), now));
    assert_eq!(refusal.limit, "requests_per_minute");
}

#[test]
fn settle_gives_back_unused_output_tokens() {
    let limits = limiter(tpm(100));
    let now = Instant::now();
    let admission = limits.admit("finance", tokens(10, 90), now).expect("fits");
    assert_eq!(admission.department(), "finance");
    assert!(limits.admit("finance", tokens(1, 0), now).is_err());
    admission.settle(20, now);
    // 70 of the 90 reserved were not produced.
    pass(&limits, "finance", tokens(70, 0), now);
    assert!(limits.admit("finance", tokens(1, 0), now).is_err());
}

#[test]
fn dropping_without_settle_keeps_the_whole_charge() {
    let limits = limiter(tpm(100));
    let now = Instant::now();
    pass(&limits, "finance", tokens(10, 90), now);
    assert_eq!(
        refused(limits.admit("finance", tokens(1, 0), now)).limit,
        "tokens_per_minute"
    );
}

#[test]
fn settle_never_refunds_beyond_capacity() {
    let limits = limiter(tpm(100));
    let t0 = Instant::now();
    let admission = limits.admit("finance", tokens(0, 100), t0).expect("fits");
    // A minute later the bucket is full again; the refund must not push it past 100.
    admission.settle(0, t0 + secs(60));
    pass(&limits, "finance", tokens(100, 0), t0 + secs(60));
    assert!(
        limits
            .admit("finance", tokens(1, 0), t0 + secs(60))
            .is_err()
    );
}

#[test]
fn reconfigure_keeps_levels_clamped_to_the_new_capacity() {
    let limits = limiter(rpm(10));
    let now = Instant::now();
    for _ in 0..8 {
        pass(&limits, "ops", one(), now);
    }
    // Two left; raising the limit does not hand out a fresh burst.
    limits.reconfigure(rpm(100), HashMap::new());
    for _ in 0..2 {
        pass(&limits, "ops", one(), now);
    }
    let refusal = refused(limits.admit("ops", one(), now));
    assert_eq!(refusal.allowed, 100);

    // Refills at the new rate: 100 a minute is one every 0.6 s.
    pass(&limits, "ops", one(), now + Duration::from_millis(600));

    // Lowering the limit clamps what is left (99, after this request a minute later).
    let later = now + secs(60);
    pass(&limits, "ops", one(), later);
    limits.reconfigure(rpm(3), HashMap::new());
    for _ in 0..3 {
        pass(&limits, "ops", one(), later);
    }
    assert!(limits.admit("ops", one(), later).is_err());
}

#[test]
fn reconfigure_carries_requests_in_progress_over() {
    let limits = limiter(LimitsConfig::default());
    let now = Instant::now();
    let held: Vec<Admission> = (0..3)
        .map(|_| limits.admit("it", one(), now).expect("unlimited"))
        .collect();
    limits.reconfigure(concurrent(2), HashMap::new());
    let mut held = held.into_iter();
    assert!(limits.admit("it", one(), now).is_err());
    drop(held.next());
    assert!(limits.admit("it", one(), now).is_err());
    drop(held.next());
    pass(&limits, "it", one(), now);
}

#[test]
fn reconfigure_moves_departments_between_default_and_their_own() {
    let own = rpm(1);
    let limits = Limiter::new(LimitsConfig::default(), HashMap::new());
    let now = Instant::now();
    pass(&limits, "legal", one(), now);
    limits.reconfigure(
        LimitsConfig::default(),
        HashMap::from([("legal".to_owned(), own)]),
    );
    pass(&limits, "legal", one(), now);
    assert!(limits.admit("legal", one(), now).is_err());
    limits.reconfigure(LimitsConfig::default(), HashMap::new());
    pass(&limits, "legal", one(), now);
}

#[test]
fn departments_use_their_own_limits_and_are_independent() {
    let limits = Limiter::new(rpm(5), HashMap::from([("research".to_owned(), rpm(50))]));
    let now = Instant::now();
    let flooded = (0..1000)
        .filter(|_| limits.admit("research", one(), now).is_ok())
        .count();
    assert_eq!(flooded, 50);
    for department in ["finance", "hr"] {
        let admitted = (0..20)
            .filter(|_| limits.admit(department, one(), now).is_ok())
            .count();
        assert_eq!(admitted, 5, "{department}");
    }
}

#[test]
fn unlimited_by_default() {
    let limits = limiter(LimitsConfig::default());
    let now = Instant::now();
    let held: Vec<Admission> = (0..1000)
        .map(|_| {
            limits
                .admit("any", tokens(u64::MAX, u64::MAX), now)
                .expect("no limit")
        })
        .collect();
    assert_eq!(held.len(), 1000);
}

#[test]
fn limits_of_zero_refuse_with_no_retry() {
    let now = Instant::now();
    for (config, limit) in [
        (rpm(0), "requests_per_minute"),
        (concurrent(0), "concurrent_requests"),
    ] {
        let refusal = refused(limiter(config).admit("x", one(), now));
        assert_eq!(refusal.limit, limit);
        assert_eq!(refusal.retry_after, None);
    }
}

#[test]
fn problems_name_every_bad_field() {
    assert!(
        LimitsConfig::default()
            .problems("default_limits")
            .is_empty()
    );
    let sane = LimitsConfig {
        requests_per_minute: Some(60),
        tokens_per_minute: Some(100_000),
        concurrent_requests: Some(4),
        max_input_tokens: Some(8_000),
        max_output_tokens: Some(2_000),
    };
    assert!(sane.problems("default_limits").is_empty());

    let bad = LimitsConfig {
        requests_per_minute: Some(0),
        tokens_per_minute: Some(5_000_000_000),
        concurrent_requests: Some(0),
        max_input_tokens: Some(1),
        max_output_tokens: Some(0),
    };
    let problems = bad.problems("departments.finance.limits");
    assert_eq!(problems.len(), 4, "{problems:#?}");
    for field in [
        "requests_per_minute",
        "tokens_per_minute",
        "concurrent_requests",
        "max_output_tokens",
    ] {
        let name = format!("departments.finance.limits.{field} ");
        assert!(problems.iter().any(|p| p.starts_with(&name)), "{field}");
    }

    let unreachable = LimitsConfig {
        tokens_per_minute: Some(1_000),
        max_output_tokens: Some(4_000),
        ..LimitsConfig::default()
    };
    let problems = unreachable.problems("default_limits");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].contains("could never be admitted"));
}

#[test]
fn config_reads_from_the_policy_file_and_rejects_unknown_fields() {
    let config: LimitsConfig =
        serde_json::from_str(r#"{"requests_per_minute": 60, "max_output_tokens": 512}"#)
            .expect("valid");
    assert_eq!(
        config,
        LimitsConfig {
            requests_per_minute: Some(60),
            max_output_tokens: Some(512),
            ..LimitsConfig::default()
        }
    );
    assert!(serde_json::from_str::<LimitsConfig>(r#"{"request_per_minute": 60}"#).is_err());
}

#[test]
fn never_more_admitted_at_once_than_the_concurrency_limit() {
    let limits = Arc::new(limiter(concurrent(4)));
    let in_progress = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let admitted = Arc::new(AtomicUsize::new(0));
    let now = Instant::now();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (limits, in_progress, most, admitted) = (
                Arc::clone(&limits),
                Arc::clone(&in_progress),
                Arc::clone(&most),
                Arc::clone(&admitted),
            );
            thread::spawn(move || {
                for _ in 0..2_000 {
                    let Ok(admission) = limits.admit("finance", one(), now) else {
                        continue;
                    };
                    let current = in_progress.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(current, Ordering::SeqCst);
                    admitted.fetch_add(1, Ordering::SeqCst);
                    for _ in 0..20 {
                        thread::yield_now();
                    }
                    // Counted out before the slot is freed, so the count never lags behind.
                    in_progress.fetch_sub(1, Ordering::SeqCst);
                    drop(admission);
                }
            })
        })
        .collect();
    for handle in threads {
        handle.join().expect("thread panicked");
    }
    assert!(most.load(Ordering::SeqCst) <= 4);
    assert!(admitted.load(Ordering::SeqCst) > 0);
    // Every slot came back.
    let held: Vec<Admission> = (0..4)
        .map(|_| limits.admit("finance", one(), now).expect("slot free"))
        .collect();
    assert!(limits.admit("finance", one(), now).is_err());
    drop(held);
}

#[test]
fn exactly_a_minutes_requests_pass_from_many_threads_at_one_instant() {
    let limits = Arc::new(limiter(rpm(100)));
    let now = Instant::now();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let limits = Arc::clone(&limits);
            thread::spawn(move || {
                (0..50)
                    .filter(|_| limits.admit("finance", one(), now).is_ok())
                    .count()
            })
        })
        .collect();
    let admitted: usize = threads
        .into_iter()
        .map(|handle| handle.join().expect("thread panicked"))
        .sum();
    assert_eq!(admitted, 100);
}

/// One step of a random workload: a department asks for some tokens after some time.
#[derive(Debug, Clone)]
struct Step {
    department: usize,
    tokens: u64,
    advance_ms: u64,
}

fn step() -> impl Strategy<Value = Step> {
    (0..3usize, 1..=150u64, 0..3_000u64).prop_map(|(department, tokens, advance_ms)| Step {
        department,
        tokens,
        advance_ms,
    })
}

const TOKENS_PER_MINUTE: u64 = 600;
const NANOS_PER_MINUTE: u128 = 60_000_000_000;

proptest! {
    /// Within any window, a department is admitted at most a minute's allowance plus what
    /// refills over the window, and a rate refusal's Retry-After is enough.
    #[test]
    fn admitted_tokens_never_exceed_capacity_plus_refill(
        steps in proptest::collection::vec(step(), 1..200),
    ) {
        let limits = limiter(tpm(TOKENS_PER_MINUTE));
        let t0 = Instant::now();
        let mut elapsed = Duration::ZERO;
        let mut admitted: Vec<Vec<(u128, u64)>> = vec![Vec::new(); 3];
        for step in &steps {
            elapsed += Duration::from_millis(step.advance_ms);
            let name = format!("department-{}", step.department);
            match limits.admit(&name, tokens(step.tokens, 0), t0 + elapsed) {
                Ok(admission) => {
                    admitted[step.department].push((elapsed.as_nanos(), step.tokens));
                    drop(admission);
                }
                Err(refusal) => {
                    prop_assert_eq!(refusal.limit, "tokens_per_minute");
                    let wait = refusal.retry_after.expect("within capacity");
                    prop_assert!(wait >= Duration::from_secs(1));
                    prop_assert!(wait <= Duration::from_secs(60));
                }
            }
        }
        for events in &admitted {
            for (i, &(start, _)) in events.iter().enumerate() {
                let mut total: u128 = 0;
                for &(at, cost) in &events[i..] {
                    total += u128::from(cost);
                    let allowance = u128::from(TOKENS_PER_MINUTE) * NANOS_PER_MINUTE
                        + u128::from(TOKENS_PER_MINUTE) * (at - start);
                    prop_assert!(
                        total * NANOS_PER_MINUTE <= allowance,
                        "{} tokens admitted in {} ns",
                        total,
                        at - start
                    );
                }
            }
        }
    }

    /// Waiting the Retry-After of a refusal, with nothing else happening, is enough for
    /// the same request to pass.
    #[test]
    fn retry_after_is_enough(
        spent in proptest::collection::vec(1..=200u64, 1..20),
        ask in 1..=600u64,
    ) {
        let limits = limiter(LimitsConfig {
            tokens_per_minute: Some(TOKENS_PER_MINUTE),
            requests_per_minute: Some(7),
            ..LimitsConfig::default()
        });
        let now = Instant::now();
        for cost in spent {
            let _ = limits.admit("ops", tokens(cost, 0), now);
        }
        if let Err(refusal) = limits.admit("ops", tokens(ask, 0), now) {
            let wait = refusal.retry_after.expect("within capacity");
            prop_assert!(limits.admit("ops", tokens(ask, 0), now + wait).is_ok());
        }
    }
}
