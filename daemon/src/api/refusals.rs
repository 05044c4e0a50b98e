//! Refusal budgets: what a caller who keeps being refused may cost the node.
//!
//! Every refused request (a wrong path, a model it may not use, a bad body) used to cost an
//! encrypted, fsynced audit record and a full pass through the handlers, so any certificate
//! holder could fill the disk or starve the audit committer. Each caller (an identity, or the
//! source address when there is none) may be refused `refusals_per_window` times per window;
//! beyond that it gets 429 at once, before its body is read or anything is parsed, and those
//! refusals are counted into one summary record per caller and window instead of one record
//! each. Failed TLS handshakes have a budget of their own per source address: once spent,
//! the address's connections are closed before any TLS work.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moat_core::audit::{AuditRecord, RecordKind};

use moat_store::time::now_unix_ms;

/// Callers tracked at most; beyond this, new callers share one tally (so a flood of fresh
/// source addresses costs bounded memory and still meets a budget).
const MAX_TRACKED: usize = 65_536;

/// The reason code of a request turned away by its caller's budget.
pub const BUDGET_SPENT: &str = "refusal_budget_exceeded";

/// Who a refusal is charged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RefusalKey {
    Caller {
        department: String,
        subject: String,
    },
    Address(IpAddr),
    /// Every caller that did not fit in the table.
    Overflow,
}

/// One caller's refusals in the current window.
#[derive(Debug)]
struct Tally {
    since: Instant,
    since_unix_ms: i64,
    refused: u32,
    /// Turned away because the budget was spent: summarised, not recorded one by one.
    turned_away: u32,
    reasons: BTreeMap<String, u32>,
}

/// A window in which a caller was turned away, for its summary record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub key: RefusalKey,
    pub since_unix_ms: i64,
    pub until_unix_ms: i64,
    pub turned_away: u32,
    pub reasons: BTreeMap<String, u32>,
}

/// Refusals per caller and window.
#[derive(Debug)]
pub struct RefusalBudgets {
    limit: u32,
    window: Duration,
    tallies: Mutex<HashMap<RefusalKey, Tally>>,
}

impl RefusalBudgets {
    /// `limit` refusals per caller in each `window`; a limit of 0 turns budgets off.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            tallies: Mutex::new(HashMap::new()),
        }
    }

    /// How long the caller must wait, if its budget for this window is spent.
    pub fn spent(&self, key: &RefusalKey, now: Instant) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        let tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        let tally = tallies.get(key)?;
        let ends = tally.since + self.window;
        (tally.refused >= self.limit && now < ends).then(|| ends - now)
    }

    /// Counts one refusal of `key` (`turned_away`: by the spent budget itself). Returns the
    /// summary of the caller's previous window when it ended with callers turned away.
    pub fn charge(
        &self,
        key: RefusalKey,
        reason: &str,
        turned_away: bool,
        now: Instant,
    ) -> Option<Summary> {
        if self.limit == 0 {
            return None;
        }
        let mut tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        let key = if tallies.len() >= MAX_TRACKED && !tallies.contains_key(&key) {
            self.forget_ended(&mut tallies, now);
            if tallies.len() >= MAX_TRACKED {
                RefusalKey::Overflow
            } else {
                key
            }
        } else {
            key
        };
        let mut ended = None;
        if let Some(tally) = tallies.get(&key)
            && now >= tally.since + self.window
        {
            ended = tallies
                .remove(&key)
                .and_then(|tally| summary(key.clone(), tally));
        }
        let tally = tallies.entry(key).or_insert_with(|| Tally {
            since: now,
            since_unix_ms: now_unix_ms(),
            refused: 0,
            turned_away: 0,
            reasons: BTreeMap::new(),
        });
        tally.refused = tally.refused.saturating_add(1);
        if turned_away {
            tally.turned_away = tally.turned_away.saturating_add(1);
            *tally.reasons.entry(reason.to_owned()).or_default() += 1;
        }
        ended
    }

    /// The summaries of the windows that have ended (all of them with `everything`, at
    /// shutdown), forgetting those callers.
    pub fn drain(&self, now: Instant, everything: bool) -> Vec<Summary> {
        let mut tallies = self.tallies.lock().unwrap_or_else(|p| p.into_inner());
        let ended: Vec<RefusalKey> = tallies
            .iter()
            .filter(|(_, tally)| everything || now >= tally.since + self.window)
            .map(|(key, _)| key.clone())
            .collect();
        ended
            .into_iter()
            .filter_map(|key| {
                let tally = tallies.remove(&key)?;
                summary(key, tally)
            })
            .collect()
    }

    fn forget_ended(&self, tallies: &mut HashMap<RefusalKey, Tally>, now: Instant) {
        // Ended windows with callers turned away stay until drained, so none is lost.
        tallies.retain(|_, tally| now < tally.since + self.window || tally.turned_away > 0);
    }
}

fn summary(key: RefusalKey, tally: Tally) -> Option<Summary> {
    (tally.turned_away > 0).then(|| Summary {
        key,
        since_unix_ms: tally.since_unix_ms,
        until_unix_ms: now_unix_ms(),
        turned_away: tally.turned_away,
        reasons: tally.reasons,
    })
}

impl Summary {
    /// The audit record of the summary: one per caller and window, with the count and the
    /// reasons of the requests turned away.
    pub fn record(&self, node_id: &str) -> AuditRecord {
        let (department, subject, source_address) = match &self.key {
            RefusalKey::Caller {
                department,
                subject,
            } => (department.clone(), subject.clone(), String::new()),
            RefusalKey::Address(address) => (String::new(), String::new(), address.to_string()),
            RefusalKey::Overflow => (String::new(), String::new(), "(many)".to_owned()),
        };
        let detail = serde_json::json!({
            "turned_away": self.turned_away,
            "since_unix_ms": self.since_unix_ms,
            "until_unix_ms": self.until_unix_ms,
            "reasons": self.reasons,
        });
        AuditRecord {
            kind: RecordKind::Request,
            unix_ms: now_unix_ms(),
            node_id: node_id.to_owned(),
            request_id: String::new(),
            department,
            subject,
            source_address,
            model: String::new(),
            action: "refusals".to_owned(),
            decision: "deny".to_owned(),
            reason: BUDGET_SPENT.to_owned(),
            classification: String::new(),
            findings: Vec::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            latency_ms: 0,
            status: 429,
            prompt: None,
            answer: None,
            detail: Some(detail.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str) -> RefusalKey {
        RefusalKey::Caller {
            department: "research".to_owned(),
            subject: name.to_owned(),
        }
    }

    #[test]
    fn a_spent_budget_turns_the_caller_away_until_its_window_ends() {
        let budgets = RefusalBudgets::new(3, Duration::from_secs(10));
        let start = Instant::now();
        let mallory = caller("mallory");
        for _ in 0..3 {
            assert_eq!(budgets.spent(&mallory, start), None);
            assert_eq!(
                budgets.charge(mallory.clone(), "not_found", false, start),
                None
            );
        }
        let wait = budgets.spent(&mallory, start + Duration::from_secs(4));
        assert_eq!(wait, Some(Duration::from_secs(6)));
        // Others are not affected.
        assert_eq!(budgets.spent(&caller("alice"), start), None);
        for _ in 0..1000 {
            budgets.charge(mallory.clone(), BUDGET_SPENT, true, start);
        }
        let later = start + Duration::from_secs(11);
        assert_eq!(budgets.spent(&mallory, later), None);
        // The next refusal after the window starts a new one and hands back one summary.
        let summary = budgets
            .charge(mallory.clone(), "not_found", false, later)
            .expect("a summary");
        assert_eq!(summary.turned_away, 1000);
        assert_eq!(summary.reasons[BUDGET_SPENT], 1000);
        assert!(budgets.drain(later, false).is_empty());
        budgets.charge(mallory.clone(), BUDGET_SPENT, true, later);
        assert_eq!(budgets.drain(later, true).len(), 1);
    }

    #[test]
    fn fresh_addresses_beyond_the_table_share_one_tally() {
        let budgets = RefusalBudgets::new(1, Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 10) {
            let address = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i)));
            budgets.charge(RefusalKey::Address(address), "handshake", false, now);
        }
        let tallies = budgets.tallies.lock().expect("lock");
        assert!(tallies.len() <= MAX_TRACKED + 1);
        assert!(tallies.contains_key(&RefusalKey::Overflow));
    }

    #[test]
    fn a_zero_limit_turns_budgets_off() {
        let budgets = RefusalBudgets::new(0, Duration::from_secs(60));
        let now = Instant::now();
        budgets.charge(caller("x"), "not_found", false, now);
        assert_eq!(budgets.spent(&caller("x"), now), None);
    }
}
