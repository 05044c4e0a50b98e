//! A token bucket in exact integer arithmetic.

use std::time::{Duration, Instant};

/// Nanoseconds in a minute. Levels are kept in tokens times this, so that a limit of `n`
/// per minute refills exactly `n` units per elapsed nanosecond: no rounding, no drift, and
/// the proof that a bucket never lets through more than it should is plain arithmetic.
pub(super) const UNITS_PER_TOKEN: u128 = 60_000_000_000;

const NANOS_PER_SECOND: u128 = 1_000_000_000;

/// Holds up to `per_minute` tokens and refills continuously at `per_minute` per minute.
#[derive(Debug, Clone)]
pub(super) struct TokenBucket {
    per_minute: u64,
    /// Tokens held, in [`UNITS_PER_TOKEN`] units; never above the capacity.
    level: u128,
    /// When `level` was last brought up to date; `None` until first used, the bucket being
    /// full until then.
    refilled_at: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket.
    pub(super) fn full(per_minute: u64) -> Self {
        TokenBucket {
            per_minute,
            level: units(per_minute),
            refilled_at: None,
        }
    }

    /// The most tokens the bucket can ever hold.
    pub(super) fn capacity(&self) -> u64 {
        self.per_minute
    }

    /// Adds what has flowed in since the last refill. An instant earlier than the last one
    /// adds nothing and leaves the clock where it was.
    pub(super) fn refill(&mut self, now: Instant) {
        let Some(then) = self.refilled_at else {
            self.refilled_at = Some(now);
            return;
        };
        if now <= then {
            // Threads read the clock before queueing for the lock, so instants may arrive
            // slightly out of order; moving the clock back would credit the same time twice.
            return;
        }
        let gained = now.duration_since(then).as_nanos() * u128::from(self.per_minute);
        self.level = self
            .level
            .saturating_add(gained)
            .min(units(self.per_minute));
        self.refilled_at = Some(now);
    }

    /// How long from `now` until the bucket holds `cost` tokens, in whole seconds and at
    /// least one; `None` when it holds them already. Assumes a refill to `now` just happened
    /// and `cost` is within the capacity.
    pub(super) fn wait_for(&self, cost: u64, now: Instant) -> Option<Duration> {
        let deficit = units(cost).checked_sub(self.level).filter(|d| *d > 0)?;
        let mut nanos = deficit.div_ceil(u128::from(self.per_minute.max(1)));
        if let Some(then) = self.refilled_at {
            nanos += then.saturating_duration_since(now).as_nanos();
        }
        let seconds = nanos.div_ceil(NANOS_PER_SECOND).max(1);
        Some(Duration::from_secs(
            u64::try_from(seconds).unwrap_or(u64::MAX),
        ))
    }

    /// Removes `cost` tokens; the caller has checked with [`Self::wait_for`] that they are
    /// there.
    pub(super) fn take(&mut self, cost: u64) {
        self.level = self.level.saturating_sub(units(cost));
    }

    /// Puts back `amount` tokens, up to the capacity.
    pub(super) fn give_back(&mut self, amount: u64) {
        self.level = self
            .level
            .saturating_add(units(amount))
            .min(units(self.per_minute));
    }

    /// Changes the rate and capacity, keeping the level (clamped to the new capacity).
    pub(super) fn set_per_minute(&mut self, per_minute: u64) {
        self.per_minute = per_minute;
        self.level = self.level.min(units(per_minute));
    }

    /// Whether the bucket holds all it can, so that forgetting it and starting afresh
    /// changes nothing.
    pub(super) fn is_full(&self) -> bool {
        self.level >= units(self.per_minute)
    }
}

fn units(tokens: u64) -> u128 {
    u128::from(tokens) * UNITS_PER_TOKEN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refills_exactly_one_token_per_interval() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(60);
        bucket.refill(t0);
        bucket.take(60);
        assert_eq!(bucket.wait_for(1, t0), Some(Duration::from_secs(1)));

        bucket.refill(t0 + Duration::from_millis(999));
        assert!(
            bucket
                .wait_for(1, t0 + Duration::from_millis(999))
                .is_some()
        );
        bucket.refill(t0 + Duration::from_secs(1));
        assert_eq!(bucket.wait_for(1, t0 + Duration::from_secs(1)), None);
    }

    #[test]
    fn wait_rounds_up_to_whole_seconds() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(7);
        bucket.refill(t0);
        bucket.take(7);
        // One token takes 60/7 s = 8.57 s.
        assert_eq!(bucket.wait_for(1, t0), Some(Duration::from_secs(9)));
        assert_eq!(bucket.wait_for(7, t0), Some(Duration::from_secs(60)));
    }

    #[test]
    fn never_fills_beyond_capacity() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(10);
        bucket.refill(t0);
        bucket.refill(t0 + Duration::from_secs(3600));
        assert!(bucket.is_full());
        bucket.give_back(5);
        bucket.take(10);
        assert_eq!(
            bucket.wait_for(1, t0 + Duration::from_secs(3600)),
            Some(Duration::from_secs(6))
        );
    }

    #[test]
    fn an_earlier_instant_neither_refills_nor_rewinds() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(10);
        let mut bucket = TokenBucket::full(60);
        bucket.refill(later);
        bucket.take(60);
        bucket.refill(t0);
        // Waiting counts from the caller's instant, which is 10 s before the bucket's clock.
        assert_eq!(bucket.wait_for(1, t0), Some(Duration::from_secs(11)));
        bucket.refill(later + Duration::from_secs(1));
        assert_eq!(bucket.wait_for(1, later + Duration::from_secs(1)), None);
    }

    #[test]
    fn shrinking_clamps_the_level() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(100);
        bucket.refill(t0);
        bucket.set_per_minute(10);
        assert!(bucket.is_full());
        bucket.take(10);
        assert!(bucket.wait_for(1, t0).is_some());
    }
}
