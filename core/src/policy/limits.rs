//! Per-department limits: requests and tokens per minute, requests in progress, and the
//! size of one request.
//!
//! Rates are token buckets holding one minute's allowance and refilling continuously, so a
//! department may burst up to a minute's worth and then proceeds at its rate. A request is
//! charged its input tokens plus the most output it may produce when admitted; when it is
//! done, [`Admission::settle`] gives back what it reserved but did not produce.
//!
//! The caller hands in the current instant, so tests (and the daemon) decide what time it
//! is; nothing here reads a clock.
//!
//! Locking: each department has its own mutex, held only for a few arithmetic steps. The
//! table of departments sits behind a read-write lock, taken for writing only when a
//! department is seen for the first time or the configuration is reloaded.
//!
//! Memory: departments come from verified client certificates, so there are as many as the
//! PKI issues, but the table is capped at [`MAX_DEPARTMENTS`] anyway. At the cap, a new
//! department makes room by forgetting idle ones (nothing in progress, every bucket full):
//! such a state is the same as a fresh one, so forgetting it changes no decision. Only when
//! none is idle is the new department refused, with scope [`LimitScope::Appliance`].

mod bucket;
mod department;
mod refusal;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

use department::DepartmentState;
pub use refusal::{LimitRefusal, LimitScope};

/// Limit name for requests per minute (reason code `limit.requests_per_minute`).
pub const REQUESTS_PER_MINUTE: &str = "requests_per_minute";
/// Limit name for tokens per minute (reason code `limit.tokens_per_minute`).
pub const TOKENS_PER_MINUTE: &str = "tokens_per_minute";
/// Limit name for requests in progress at once (reason code `limit.concurrent_requests`).
pub const CONCURRENT_REQUESTS: &str = "concurrent_requests";
/// Limit name for input tokens of one request (reason code `limit.input_tokens`).
pub const INPUT_TOKENS: &str = "input_tokens";
/// Limit name for output tokens of one request (reason code `limit.output_tokens`).
pub const OUTPUT_TOKENS: &str = "output_tokens";

/// The most departments whose limit state is kept at once.
pub const MAX_DEPARTMENTS: usize = 10_000;

/// Any configured limit above this is taken for a mistake (a billion requests or tokens a
/// minute is beyond what one appliance serves).
pub const MAX_LIMIT_VALUE: u64 = 1_000_000_000;

/// Limits of one department, as written in the policy file (TOML
/// `[departments.<name>.limits]`, and `[default_limits]` for departments without their
/// own). Every field is optional: absent means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests admitted per minute; bursts of up to this many.
    pub requests_per_minute: Option<u32>,
    /// Tokens (input plus reserved output) admitted per minute; bursts of up to this many.
    pub tokens_per_minute: Option<u64>,
    /// Requests in progress at once.
    pub concurrent_requests: Option<u32>,
    /// Input tokens of one request.
    pub max_input_tokens: Option<u64>,
    /// Output tokens one request may ask for (`max_tokens`).
    pub max_output_tokens: Option<u64>,
}

impl LimitsConfig {
    /// Every mistake in this configuration, each naming its field under `prefix` (for
    /// example `departments.finance.limits`); empty when there is none. Zero (which would
    /// refuse every request), values above [`MAX_LIMIT_VALUE`], and sizes that the
    /// tokens-per-minute limit could never admit are mistakes.
    pub fn problems(&self, prefix: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let fields = [
            (REQUESTS_PER_MINUTE, self.requests_per_minute.map(u64::from)),
            (TOKENS_PER_MINUTE, self.tokens_per_minute),
            (CONCURRENT_REQUESTS, self.concurrent_requests.map(u64::from)),
            ("max_input_tokens", self.max_input_tokens),
            ("max_output_tokens", self.max_output_tokens),
        ];
        for (field, value) in fields {
            match value {
                Some(0) => problems.push(format!(
                    "{prefix}.{field} is 0, which refuses every request; remove it for no \
                     limit, or forbid the department in the Cedar policy to shut it out"
                )),
                Some(v) if v > MAX_LIMIT_VALUE => problems.push(format!(
                    "{prefix}.{field} is {v}, more than {MAX_LIMIT_VALUE}; remove it for no \
                     limit"
                )),
                _ => {}
            }
        }
        let Some(per_minute) = self.tokens_per_minute else {
            return problems;
        };
        for (field, value) in [
            ("max_input_tokens", self.max_input_tokens),
            ("max_output_tokens", self.max_output_tokens),
        ] {
            if let Some(v) = value
                && v > per_minute
            {
                problems.push(format!(
                    "{prefix}.{field} is {v}, more than {prefix}.tokens_per_minute \
                     ({per_minute}), so a request of that size could never be admitted; \
                     lower it or raise tokens_per_minute"
                ));
            }
        }
        problems
    }
}

/// What one request asks for, known before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitRequest {
    /// Tokens of the prompt.
    pub input_tokens: u64,
    /// The most tokens the answer may have (`max_tokens`, or the default); 0 for requests
    /// that produce no tokens, such as embeddings.
    pub max_output_tokens: u64,
}

impl LimitRequest {
    /// What the request is charged against tokens per minute when admitted.
    fn cost(&self) -> u64 {
        self.input_tokens.saturating_add(self.max_output_tokens)
    }
}

/// Thread-safe limit state for every department. Departments are created on first use; a
/// department named in `per_department` uses its own configuration, any other the default.
#[derive(Debug)]
pub struct Limiter {
    table: RwLock<Table>,
}

#[derive(Debug)]
struct Table {
    default: LimitsConfig,
    per_department: HashMap<String, LimitsConfig>,
    departments: HashMap<String, Arc<Department>>,
    max_departments: usize,
}

#[derive(Debug)]
struct Department {
    name: String,
    state: Mutex<DepartmentState>,
}

/// A request admitted by the [`Limiter`]. Holds one of its department's concurrency slots
/// until dropped.
#[derive(Debug)]
#[must_use = "dropping an Admission at once frees its concurrency slot"]
pub struct Admission {
    department: Arc<Department>,
    reserved_output_tokens: u64,
}

// The server shares one limiter between its workers and moves admissions across tasks:
// this stops compiling if either could not.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    const fn moved<T: Send>() {}
    shared::<Limiter>();
    moved::<Admission>();
};

impl Limiter {
    /// A limiter with no department seen yet.
    pub fn new(default: LimitsConfig, per_department: HashMap<String, LimitsConfig>) -> Self {
        Self::with_max_departments(default, per_department, MAX_DEPARTMENTS)
    }

    fn with_max_departments(
        default: LimitsConfig,
        per_department: HashMap<String, LimitsConfig>,
        max_departments: usize,
    ) -> Self {
        Limiter {
            table: RwLock::new(Table {
                default,
                per_department,
                departments: HashMap::new(),
                max_departments,
            }),
        }
    }

    /// Admits a request of `department` at `now`, or refuses it. Checks the sizes (input
    /// tokens against `max_input_tokens`, max output tokens against `max_output_tokens`),
    /// then limits no wait could satisfy (a limit of zero, more tokens than a minute's
    /// allowance), then requests in progress, requests per minute and tokens per minute
    /// (charging input plus max output tokens). All or nothing: a refused request consumes
    /// nothing.
    ///
    /// `now` should come from one monotonic clock; an instant earlier than one already seen
    /// for the department adds no refill.
    pub fn admit(
        &self,
        department: &str,
        request: LimitRequest,
        now: Instant,
    ) -> Result<Admission, LimitRefusal> {
        let department = self.department(department, now)?;
        lock(&department.state).admit(&department.name, request, now)?;
        Ok(Admission {
            department,
            reserved_output_tokens: request.max_output_tokens,
        })
    }

    /// Replaces the configuration (policy reload), keeping current usage: buckets keep
    /// their level, clamped to the new capacity; requests in progress still count. A rate
    /// newly limited starts with a full bucket. Time since a department's last request is
    /// refilled at the new rate.
    pub fn reconfigure(
        &self,
        default: LimitsConfig,
        per_department: HashMap<String, LimitsConfig>,
    ) {
        let mut table = write(&self.table);
        table.default = default;
        table.per_department = per_department;
        for (name, department) in &table.departments {
            lock(&department.state).reconfigure(table.config_for(name));
        }
    }

    /// The department's state, created if new.
    fn department(&self, name: &str, now: Instant) -> Result<Arc<Department>, LimitRefusal> {
        if let Some(department) = read(&self.table).departments.get(name) {
            return Ok(Arc::clone(department));
        }
        let mut table = write(&self.table);
        if let Some(department) = table.departments.get(name) {
            return Ok(Arc::clone(department));
        }
        if table.departments.len() >= table.max_departments {
            table.forget_idle(now);
        }
        if table.departments.len() >= table.max_departments {
            // Departments turn idle as their requests finish and their buckets refill, so
            // room is likely soon.
            return Err(LimitRefusal {
                department: name.to_owned(),
                limit: CONCURRENT_REQUESTS,
                asked: u64::try_from(table.departments.len())
                    .unwrap_or(u64::MAX)
                    .saturating_add(1),
                allowed: u64::try_from(table.max_departments).unwrap_or(u64::MAX),
                retry_after: Some(Duration::from_secs(1)),
                scope: LimitScope::Appliance,
            });
        }
        let department = Arc::new(Department {
            name: name.to_owned(),
            state: Mutex::new(DepartmentState::new(table.config_for(name))),
        });
        table
            .departments
            .insert(name.to_owned(), Arc::clone(&department));
        Ok(department)
    }
}

impl Table {
    fn config_for(&self, name: &str) -> LimitsConfig {
        self.per_department
            .get(name)
            .copied()
            .unwrap_or(self.default)
    }

    /// Drops every department whose state is the same as a fresh one.
    fn forget_idle(&mut self, now: Instant) {
        // Clones of a department's Arc are made only under the table lock, which the caller
        // holds for writing: a count of one means no admission and no admit in flight
        // holds it, so it cannot change behind our back.
        self.departments.retain(|_, department| {
            Arc::strong_count(department) > 1 || !lock(&department.state).is_idle(now)
        });
    }
}

impl Admission {
    /// Ends the request: gives back to tokens per minute the output tokens reserved but not
    /// produced, and frees the concurrency slot. Call once the answer is complete; dropping
    /// the admission without settling frees the slot but keeps the whole charge.
    pub fn settle(self, actual_output_tokens: u64, now: Instant) {
        let unused = self
            .reserved_output_tokens
            .saturating_sub(actual_output_tokens);
        lock(&self.department.state).refund(unused, now);
    }

    /// The department the request was admitted for.
    pub fn department(&self) -> &str {
        &self.department.name
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        lock(&self.department.state).release();
    }
}

// A panic never happens in the middle of an update (every step is saturating arithmetic),
// so a poisoned lock still guards consistent state; refusing a department forever would be
// the worse failure.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpm(n: u32) -> LimitsConfig {
        LimitsConfig {
            requests_per_minute: Some(n),
            ..LimitsConfig::default()
        }
    }

    fn one() -> LimitRequest {
        LimitRequest {
            input_tokens: 1,
            max_output_tokens: 0,
        }
    }

    fn tracked(limiter: &Limiter) -> usize {
        read(&limiter.table).departments.len()
    }

    #[test]
    fn at_the_cap_idle_departments_make_room() {
        let limiter = Limiter::with_max_departments(rpm(60), HashMap::new(), 2);
        let t0 = Instant::now();
        drop(limiter.admit("a", one(), t0).expect("a"));
        drop(limiter.admit("b", one(), t0).expect("b"));
        // Both have spent a request and are still refilling: neither may be forgotten.
        let refusal = limiter.admit("c", one(), t0).expect_err("table full");
        assert_eq!(refusal.scope, LimitScope::Appliance);
        assert_eq!(refusal.limit, CONCURRENT_REQUESTS);
        assert_eq!(refusal.retry_after, Some(Duration::from_secs(1)));
        assert_eq!(refusal.allowed, 2);
        assert!(refusal.to_string().contains("department c"));

        // A second later both buckets are full again, so both are forgettable.
        let t1 = t0 + Duration::from_secs(1);
        drop(limiter.admit("c", one(), t1).expect("room made"));
        assert_eq!(tracked(&limiter), 1);
    }

    #[test]
    fn a_department_with_requests_in_progress_is_kept() {
        let limiter = Limiter::with_max_departments(LimitsConfig::default(), HashMap::new(), 1);
        let now = Instant::now();
        let held = limiter.admit("a", one(), now).expect("a");
        let refusal = limiter.admit("b", one(), now).expect_err("a is busy");
        assert_eq!(refusal.scope, LimitScope::Appliance);
        drop(held);
        drop(limiter.admit("b", one(), now).expect("a is idle now"));
        assert_eq!(tracked(&limiter), 1);
    }

    #[test]
    fn forgetting_an_idle_department_changes_no_decision() {
        let limiter = Limiter::with_max_departments(rpm(2), HashMap::new(), 1);
        let t0 = Instant::now();
        drop(limiter.admit("a", one(), t0).expect("a"));
        let t1 = t0 + Duration::from_secs(30);
        drop(limiter.admit("b", one(), t1).expect("a forgotten"));
        // "a" comes back with a full bucket, exactly what it would have had: two requests.
        let t2 = t1 + Duration::from_secs(30);
        drop(limiter.admit("a", one(), t2).expect("a again"));
        drop(limiter.admit("a", one(), t2).expect("a again"));
        assert!(limiter.admit("a", one(), t2).is_err());
    }
}
