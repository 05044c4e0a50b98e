//! When pruning may remove records: judged by the chain's own signed time, not by the wall
//! clock alone.
//!
//! A cut-off taken from the wall clock alone lets whoever sets the clock decide what is
//! deleted: set it a year forward (an admin, a wrong NTP server) and the next prune removes
//! every record a checkpoint covers, though none has reached its retention. So the cut-off
//! is never later than the newest signed checkpoint's time less the retention, and nothing
//! is pruned while the clock is more than a day ahead of that checkpoint, or more than a
//! day ahead of where this process's monotonic clock (which setting the time does not
//! move) says it should be.

use std::time::{Duration, Instant};

/// How far the wall clock may run ahead of the chain, or of the monotonic clock, before
/// pruning stops.
pub const CLOCK_SLACK: Duration = Duration::from_secs(86_400);

/// The times a prune is judged by, in milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneClock {
    /// The wall clock now.
    pub now_ms: i64,
    /// The newest time the chain holds signed: its newest checkpoint's, or its prune
    /// marker's. `None` before the first checkpoint.
    pub signed_ms: Option<i64>,
    /// Where the wall clock should be if nobody set it: what it said when this process
    /// started, plus the monotonic time since ([`ClockAnchor`]).
    pub expected_ms: i64,
}

/// Why nothing is pruned now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PruneHold {
    /// No checkpoint is signed yet, so none covers anything to prune.
    #[error("no checkpoint is signed yet")]
    NothingSigned,
    /// The clock is more than [`CLOCK_SLACK`] ahead of the newest signed checkpoint: moved
    /// forward, or idle for a day; a checkpoint signed within a day of the clock resumes
    /// pruning.
    #[error(
        "the clock is {} ahead of the newest signed checkpoint; nothing is pruned until a checkpoint is signed within a day of it (if the clock is wrong, set it right)",
        days(.now_ms - .signed_ms)
    )]
    AheadOfChain { now_ms: i64, signed_ms: i64 },
    /// The clock moved more than [`CLOCK_SLACK`] further than the monotonic clock since
    /// moatd started: someone set it forward while moatd ran.
    #[error(
        "the clock moved {} further than time has passed since moatd started; nothing is pruned until moatd is restarted with the clock right",
        days(.now_ms - .expected_ms)
    )]
    SetForward { now_ms: i64, expected_ms: i64 },
}

impl PruneClock {
    /// Records made before the returned time (ms) may be pruned, once a checkpoint covers
    /// them, or the reason nothing may be now.
    pub fn cutoff(&self, retention: Duration) -> Result<i64, PruneHold> {
        let slack = CLOCK_SLACK.as_millis() as i64;
        let signed_ms = self.signed_ms.ok_or(PruneHold::NothingSigned)?;
        if self.now_ms > signed_ms.saturating_add(slack) {
            return Err(PruneHold::AheadOfChain {
                now_ms: self.now_ms,
                signed_ms,
            });
        }
        if self.now_ms > self.expected_ms.saturating_add(slack) {
            return Err(PruneHold::SetForward {
                now_ms: self.now_ms,
                expected_ms: self.expected_ms,
            });
        }
        let retention = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        Ok(self.now_ms.min(signed_ms).saturating_sub(retention))
    }
}

/// The wall clock's reading when the committer started, with the monotonic instant then.
#[derive(Debug, Clone, Copy)]
pub struct ClockAnchor {
    wall_ms: i64,
    at: Instant,
}

impl ClockAnchor {
    pub fn new(wall_ms: i64) -> Self {
        Self {
            wall_ms,
            at: Instant::now(),
        }
    }

    /// Where the wall clock should be now, had nobody set it since the anchor.
    pub fn expected_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.at.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.wall_ms.saturating_add(elapsed)
    }
}

/// `ms` as days, to one decimal.
fn days(ms: i64) -> String {
    format!("{:.1} days", ms as f64 / 86_400_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    const HOUR: i64 = 3_600_000;
    // 2026-12-01, a checkpoint's time.
    const SIGNED: i64 = 1_796_083_200_000;
    const THIRTY_DAYS: Duration = Duration::from_secs(30 * 86_400);

    fn at(now_ms: i64, expected_ms: i64) -> PruneClock {
        PruneClock {
            now_ms,
            signed_ms: Some(SIGNED),
            expected_ms,
        }
    }

    #[test]
    fn the_cutoff_is_the_newest_checkpoint_less_the_retention() {
        let now = SIGNED + HOUR;
        assert_eq!(at(now, now).cutoff(THIRTY_DAYS), Ok(SIGNED - 30 * DAY));
        // A clock behind the chain prunes by the clock.
        let behind = SIGNED - 2 * DAY;
        assert_eq!(
            at(behind, behind).cutoff(THIRTY_DAYS),
            Ok(behind - 30 * DAY)
        );
        // Up to a day ahead of the chain (an idle node) still prunes, by the chain's time.
        let idle = SIGNED + 23 * HOUR;
        assert_eq!(at(idle, idle).cutoff(THIRTY_DAYS), Ok(SIGNED - 30 * DAY));
    }

    #[test]
    fn a_clock_set_a_year_forward_before_start_prunes_nothing() {
        let forward = SIGNED + 400 * DAY;
        let hold = at(forward, forward)
            .cutoff(THIRTY_DAYS)
            .expect_err("held back");
        assert_eq!(
            hold,
            PruneHold::AheadOfChain {
                now_ms: forward,
                signed_ms: SIGNED
            }
        );
        assert!(hold.to_string().contains("400.0 days ahead"), "{hold}");
    }

    #[test]
    fn a_clock_set_forward_while_running_prunes_nothing_even_after_a_new_checkpoint() {
        // Started an hour after the checkpoint; two hours later the clock says a year on,
        // and a checkpoint has since been signed at that time.
        let forward = SIGNED + 365 * DAY;
        let clock = PruneClock {
            now_ms: forward + HOUR,
            signed_ms: Some(forward),
            expected_ms: SIGNED + 3 * HOUR,
        };
        assert!(matches!(
            clock.cutoff(THIRTY_DAYS),
            Err(PruneHold::SetForward { .. })
        ));
    }

    #[test]
    fn nothing_signed_prunes_nothing() {
        let clock = PruneClock {
            now_ms: SIGNED,
            signed_ms: None,
            expected_ms: SIGNED,
        };
        assert_eq!(clock.cutoff(THIRTY_DAYS), Err(PruneHold::NothingSigned));
    }

    #[test]
    fn the_anchor_expects_the_time_that_passed() {
        let anchor = ClockAnchor::new(SIGNED);
        let expected = anchor.expected_ms();
        assert!((SIGNED..SIGNED + HOUR).contains(&expected), "{expected}");
    }
}
