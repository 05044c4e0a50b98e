//! The wall clock, as audit records, exports and rollout records count it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now; 0 for a clock set before 1970.
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_is_after_the_store_format_was_made() {
        // 2026-01-01T00:00:00Z.
        assert!(super::now_unix_ms() > 1_767_225_600_000);
    }
}
