//! The watchdog pings systemd only while moatd is seen to make progress. It runs on the
//! main async runtime (the one that accepts admin connections and handles signals), so a
//! runtime that stops turning stops the pings by itself. Every quarter of the watchdog
//! timeout it also checks that:
//!
//! - the audit committer answers within half the timeout (it answers between commits, so a
//!   write that hangs keeps it from answering, and no request is answered without it);
//! - every engine thread of every loaded text model is alive, and none that has work has
//!   stood still for three quarters of the timeout (one step of a full batch takes far
//!   less; a thread stuck inside the runtime never comes back).
//!
//! When a check fails moatd logs what is stuck and withholds the ping: systemd then stops
//! and restarts the service when the timeout runs out. Embedding models run on the blocking
//! pool, one request at a time, and the HTTP workers on their own threads; neither is
//! watched here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::audit::AuditLog;
use crate::engine::WorkerProgress;
use crate::models::serving::ServedModel;
use crate::models::serving::ServingTable;

/// Pings while the checks pass. Returns only if nothing watches.
pub async fn run(timeout: Duration, audit: Arc<AuditLog>, table: Arc<ServingTable>) {
    let period = timeout / 4;
    tracing::info!(
        timeout_secs = timeout.as_secs_f64(),
        "the systemd watchdog is on"
    );
    let mut engines = EngineWatch::new(timeout * 3 / 4);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let mut stuck = engines.stuck(Instant::now(), sample(&table));
        if let Err(e) = audit.ping(timeout / 2).await {
            stuck.push(format!("the audit committer does not answer: {e}"));
        }
        if stuck.is_empty() {
            super::watchdog_ping();
        } else {
            tracing::error!(
                stuck = ?stuck,
                "moatd is not making progress; the watchdog ping is withheld so that systemd restarts it"
            );
        }
    }
}

/// Every engine thread of every loaded text model, by `name@version` and thread index.
fn sample(table: &ServingTable) -> BTreeMap<(String, usize), WorkerProgress> {
    let routes = table.snapshot();
    let mut progress = BTreeMap::new();
    for model in routes.values().flat_map(|route| route.loaded()) {
        if let ServedModel::Generator(engine) = &model.served {
            for (index, worker) in engine.progress().into_iter().enumerate() {
                progress.insert((model.label(), index), worker);
            }
        }
    }
    progress
}

/// When each engine thread was last seen to move.
#[derive(Debug)]
struct EngineWatch {
    /// Longer than this with work and no round done: stuck.
    limit: Duration,
    /// Per thread: rounds, and since when it has had work without a round done (`None`
    /// while idle).
    moved: BTreeMap<(String, usize), (u64, Option<Instant>)>,
}

impl EngineWatch {
    fn new(limit: Duration) -> Self {
        Self {
            limit,
            moved: BTreeMap::new(),
        }
    }

    /// What is stuck at `now`, given this sample; threads no longer loaded are forgotten.
    fn stuck(
        &mut self,
        now: Instant,
        sample: BTreeMap<(String, usize), WorkerProgress>,
    ) -> Vec<String> {
        let mut stuck = Vec::new();
        let mut moved = BTreeMap::new();
        for (key, progress) in sample {
            let (label, index) = &key;
            // The clock runs from the first sample that saw work, and starts again whenever
            // a round is done; idle, there is none.
            let since = match self.moved.get(&key) {
                _ if !progress.busy => None,
                Some(&(rounds, Some(since))) if rounds == progress.rounds => Some(since),
                _ => Some(now),
            };
            let still = since.map_or(Duration::ZERO, |since| now.duration_since(since));
            if !progress.running {
                stuck.push(format!("{label}: engine thread {index} is not running"));
            } else if still >= self.limit {
                stuck.push(format!(
                    "{label}: engine thread {index} has had work and not moved for {} s",
                    still.as_secs()
                ));
            }
            moved.insert(key, (progress.rounds, since));
        }
        self.moved = moved;
        stuck
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(22);

    fn at(start: Instant, secs: u64) -> Instant {
        start + Duration::from_secs(secs)
    }

    fn sample(
        entries: &[(&str, usize, u64, bool, bool)],
    ) -> BTreeMap<(String, usize), WorkerProgress> {
        entries
            .iter()
            .map(|&(label, index, rounds, busy, running)| {
                (
                    (label.to_owned(), index),
                    WorkerProgress {
                        rounds,
                        busy,
                        running,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn an_idle_thread_may_stand_still_and_a_busy_one_must_move_within_the_limit() {
        let start = Instant::now();
        let mut watch = EngineWatch::new(LIMIT);
        let idle = sample(&[("a@1", 0, 5, false, true)]);
        assert!(watch.stuck(at(start, 0), idle.clone()).is_empty());
        assert!(
            watch.stuck(at(start, 60), idle).is_empty(),
            "idle for a minute is fine"
        );
        // Work arrives and one long step runs: 21 s without a round is still fine.
        let busy = sample(&[("a@1", 0, 5, true, true)]);
        assert!(watch.stuck(at(start, 61), busy.clone()).is_empty());
        assert!(watch.stuck(at(start, 82), busy.clone()).is_empty());
        assert_eq!(
            watch.stuck(at(start, 83), busy).len(),
            1,
            "22 s without a round"
        );
        // The step ends: the clock starts again.
        let moved = sample(&[("a@1", 0, 6, true, true)]);
        assert!(watch.stuck(at(start, 83), moved.clone()).is_empty());
        assert!(watch.stuck(at(start, 104), moved.clone()).is_empty());
        // 22 s with work and no round: stuck.
        let stuck = watch.stuck(at(start, 105), moved);
        assert_eq!(
            stuck,
            ["a@1: engine thread 0 has had work and not moved for 22 s"]
        );
    }

    #[test]
    fn one_stuck_thread_is_found_beside_a_moving_sibling() {
        let start = Instant::now();
        let mut watch = EngineWatch::new(LIMIT);
        watch.stuck(
            at(start, 0),
            sample(&[("a@1", 0, 1, true, true), ("a@1", 1, 1, true, true)]),
        );
        let stuck = watch.stuck(
            at(start, 30),
            sample(&[("a@1", 0, 90, true, true), ("a@1", 1, 1, true, true)]),
        );
        assert_eq!(
            stuck,
            ["a@1: engine thread 1 has had work and not moved for 30 s"]
        );
    }

    #[test]
    fn a_thread_that_ended_is_stuck_at_once() {
        let mut watch = EngineWatch::new(LIMIT);
        let stuck = watch.stuck(
            Instant::now(),
            sample(&[("a@1", 0, 0, false, false), ("b@2", 0, 0, false, true)]),
        );
        assert_eq!(stuck, ["a@1: engine thread 0 is not running"]);
    }

    #[test]
    fn a_new_version_is_timed_from_when_it_is_first_seen() {
        let start = Instant::now();
        let mut watch = EngineWatch::new(LIMIT);
        watch.stuck(at(start, 0), sample(&[("a@1", 0, 3, true, true)]));
        // 1 was replaced by 2, with the same round count by chance.
        assert!(
            watch
                .stuck(at(start, 30), sample(&[("a@2", 0, 3, true, true)]))
                .is_empty()
        );
    }
}
