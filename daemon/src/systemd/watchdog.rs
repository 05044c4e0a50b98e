//! The watchdog pings systemd only while moatd is seen to make progress. It runs on the
//! main async runtime, so a runtime that stops turning stops the pings by itself. Each
//! period it also checks that:
//!
//! - the audit committer answers (it does so between commits, so a write that hangs keeps it
//!   from answering, and no request can be answered without it);
//! - every loaded text model's engine has a running thread, and one that had work at the
//!   last check and still has it now has gone round its loop since.
//!
//! When a check fails moatd logs what is stuck and withholds the ping: systemd then stops
//! and restarts the service after `WatchdogSec`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::api::ServedModel;
use crate::audit::AuditLog;
use crate::engine::EngineProgress;
use crate::models::serving::ServingTable;

/// Pings every half `timeout` while the checks pass. Returns only if nothing watches.
pub async fn run(timeout: Duration, audit: Arc<AuditLog>, table: Arc<ServingTable>) {
    let period = timeout / 2;
    tracing::info!(
        timeout_secs = timeout.as_secs_f64(),
        "the systemd watchdog is on"
    );
    let mut engines = EngineWatch::default();
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let mut stuck = engines.stuck(sample(&table));
        // Half the period at most, so that a late answer still leaves time to ping.
        if let Err(e) = audit.ping(period / 2).await {
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

/// The progress of every loaded text model, by `name@version`.
fn sample(table: &ServingTable) -> BTreeMap<String, EngineProgress> {
    let routes = table.snapshot();
    let mut progress = BTreeMap::new();
    for model in routes.values().flat_map(|route| route.loaded()) {
        // Embeddings run on the blocking pool, one request at a time; the API times them.
        if let ServedModel::Generator(engine) = &model.served {
            progress.insert(model.label(), engine.progress());
        }
    }
    progress
}

/// Engine samples from the previous check.
#[derive(Debug, Default)]
struct EngineWatch {
    last: BTreeMap<String, EngineProgress>,
}

impl EngineWatch {
    /// What is stuck in `now` compared with the previous sample, which `now` replaces.
    fn stuck(&mut self, now: BTreeMap<String, EngineProgress>) -> Vec<String> {
        let mut stuck = Vec::new();
        for (label, progress) in &now {
            if !progress.running {
                stuck.push(format!("{label}: no engine thread is running"));
                continue;
            }
            let Some(before) = self.last.get(label) else {
                continue;
            };
            if before.busy && progress.busy && before.rounds == progress.rounds {
                stuck.push(format!(
                    "{label}: the engine has work and has not moved since the last check"
                ));
            }
        }
        self.last = now;
        stuck
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(rounds: u64, busy: bool, running: bool) -> EngineProgress {
        EngineProgress {
            rounds,
            busy,
            running,
        }
    }

    fn sample(entries: &[(&str, EngineProgress)]) -> BTreeMap<String, EngineProgress> {
        entries
            .iter()
            .map(|(label, p)| ((*label).to_owned(), *p))
            .collect()
    }

    #[test]
    fn an_idle_engine_may_stand_still_and_a_busy_one_must_move() {
        let mut watch = EngineWatch::default();
        assert!(
            watch
                .stuck(sample(&[("a@1.0.0", progress(5, false, true))]))
                .is_empty()
        );
        // Idle both times: nothing to do, nothing done.
        assert!(
            watch
                .stuck(sample(&[("a@1.0.0", progress(5, false, true))]))
                .is_empty()
        );
        // Work arrives: the first sample that sees it has no earlier busy one to compare.
        assert!(
            watch
                .stuck(sample(&[("a@1.0.0", progress(5, true, true))]))
                .is_empty()
        );
        // Busy and moving.
        assert!(
            watch
                .stuck(sample(&[("a@1.0.0", progress(9, true, true))]))
                .is_empty()
        );
        // Busy and not moving: stuck.
        let stuck = watch.stuck(sample(&[("a@1.0.0", progress(9, true, true))]));
        assert_eq!(stuck.len(), 1);
        assert!(
            stuck[0].starts_with("a@1.0.0: the engine has work"),
            "{stuck:?}"
        );
    }

    #[test]
    fn an_engine_without_a_thread_is_stuck_at_once() {
        let mut watch = EngineWatch::default();
        let stuck = watch.stuck(sample(&[
            ("a@1.0.0", progress(0, false, false)),
            ("b@2.0.0", progress(0, false, true)),
        ]));
        assert_eq!(stuck, ["a@1.0.0: no engine thread is running"]);
    }

    #[test]
    fn a_new_version_is_compared_only_with_itself() {
        let mut watch = EngineWatch::default();
        assert!(
            watch
                .stuck(sample(&[("a@1.0.0", progress(3, true, true))]))
                .is_empty()
        );
        // 1.0.0 was replaced by 2.0.0, which has the same round count by chance.
        assert!(
            watch
                .stuck(sample(&[("a@2.0.0", progress(3, true, true))]))
                .is_empty()
        );
    }
}
