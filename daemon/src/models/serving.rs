//! What is served right now, by name: the active version, an optional canary taking a
//! share of the requests, and the previous version kept loaded for an instant rollback;
//! and what a served model is ([`ServedModel`]: a generator or an embedding service).
//!
//! A request resolves its model once and holds that `Arc` to the end, so a swap never
//! touches a request in flight: it finishes on the version it started on, and the old
//! engine stops when its last request lets go.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use moat_core::bundle::manifest::SamplingDefaults;

use crate::engine::{Embedder, Engine};

/// A model moatd serves, by what it does.
#[derive(Debug, Clone)]
pub enum ServedModel {
    /// Chat and completions.
    Generator(Arc<Engine>),
    /// Embeddings.
    Embedder(Arc<EmbeddingService>),
}

/// An embedding model with a bound on the requests in its hands: it runs on blocking
/// threads, one batch at a time, and past `capacity` requests more get 503 instead of
/// piling up threads.
#[derive(Debug)]
pub struct EmbeddingService {
    pub embedder: Embedder,
    admissions: Arc<tokio::sync::Semaphore>,
    capacity: usize,
}

impl EmbeddingService {
    pub fn new(embedder: Embedder, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            embedder,
            admissions: Arc::new(tokio::sync::Semaphore::new(capacity)),
            capacity,
        }
    }

    /// A place for one request, or `None` when `capacity` requests are already in.
    pub fn try_admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.admissions).try_acquire_owned().ok()
    }

    /// Requests admitted and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.capacity - self.admissions.available_permits()
    }
}

/// One loaded model version and the terms its bundle sets.
#[derive(Debug)]
pub struct LoadedModel {
    pub name: String,
    /// `None` for a model directory served without a bundle.
    pub version: Option<semver::Version>,
    pub served: ServedModel,
    /// The bundle's classification ceiling, on top of the policy's.
    pub classification_ceiling: Option<String>,
    /// The bundle's mandatory answer schema.
    pub response_schema: Option<serde_json::Value>,
    /// Sampling for parameters a request leaves out.
    pub sampling: SamplingDefaults,
    /// What loading it was estimated to take, in bytes (the memory budget's unit).
    pub memory_bytes: u64,
}

impl LoadedModel {
    /// `name@version` (audit records, logs), or the bare name without a version.
    pub fn label(&self) -> String {
        match &self.version {
            Some(version) => format!("{}@{version}", self.name),
            None => self.name.clone(),
        }
    }

    pub fn version_text(&self) -> String {
        self.version
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default()
    }
}

/// A version taking a share of a name's requests. `M` is how a version is held: a loaded
/// model when served, anything that names a version in the rollout's own tests.
#[derive(Debug, Clone)]
pub struct Canary<M = Arc<LoadedModel>> {
    pub model: M,
    pub share: Share,
}

/// A fixed percentage of a stream of requests, kept exactly rather than drawn.
#[derive(Debug, Clone)]
pub struct Share {
    pub percent: u8,
    /// Requests routed since the share began.
    routed: Arc<AtomicU64>,
}

impl Share {
    pub fn new(percent: u8) -> Self {
        Self {
            percent: percent.min(100),
            routed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether the next request (number `n`, from 0) is in the share: after `n + 1`
    /// requests the share holds `floor((n + 1) * percent / 100)`, so over any run of
    /// requests it is the percentage to within one request, evenly spread.
    pub fn takes(&self) -> bool {
        let n = self.routed.fetch_add(1, Ordering::Relaxed);
        let percent = u64::from(self.percent);
        (n + 1) * percent / 100 > n * percent / 100
    }
}

/// How one name is served.
#[derive(Debug, Clone)]
pub struct Route<M = Arc<LoadedModel>> {
    pub active: M,
    pub canary: Option<Canary<M>>,
    /// The version active before this one, still loaded: rollback swaps it back at once.
    pub standby: Option<M>,
}

impl<M> Route<M> {
    pub fn new(active: M) -> Self {
        Self {
            active,
            canary: None,
            standby: None,
        }
    }

    /// Every loaded version of the route.
    pub fn loaded(&self) -> impl Iterator<Item = &M> {
        std::iter::once(&self.active)
            .chain(self.canary.as_ref().map(|c| &c.model))
            .chain(self.standby.as_ref())
    }
}

/// The served names. Readers take a snapshot (one `Arc` clone under a read lock);
/// writers replace the whole map.
#[derive(Debug, Default)]
pub struct ServingTable {
    routes: RwLock<Arc<BTreeMap<String, Route>>>,
}

impl ServingTable {
    pub fn snapshot(&self) -> Arc<BTreeMap<String, Route>> {
        // A panic while holding the lock cannot leave the map half-replaced: writers swap
        // the Arc in one assignment.
        Arc::clone(&self.routes.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The version that serves the next request for `name`.
    pub fn pick(&self, name: &str) -> Option<Arc<LoadedModel>> {
        let routes = self.snapshot();
        let route = routes.get(name)?;
        match &route.canary {
            Some(canary) if canary.share.takes() => Some(Arc::clone(&canary.model)),
            _ => Some(Arc::clone(&route.active)),
        }
    }

    /// Changes the routes in one atomic swap.
    pub fn update<T>(&self, change: impl FnOnce(&mut BTreeMap<String, Route>) -> T) -> T {
        let mut guard = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let mut routes = BTreeMap::clone(&guard);
        let outcome = change(&mut routes);
        *guard = Arc::new(routes);
        outcome
    }

    /// Bytes the loaded versions were estimated to take.
    pub fn memory_bytes(&self) -> u64 {
        self.snapshot()
            .values()
            .flat_map(Route::loaded)
            .map(|m| m.memory_bytes)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_is_exact_over_any_run_and_evenly_spread() {
        for percent in [0u8, 1, 5, 20, 33, 50, 99, 100] {
            let share = Share::new(percent);
            let taken = (0..1000).filter(|_| share.takes()).count();
            assert_eq!(taken, usize::from(percent) * 10, "{percent}%");
            // Any 100 consecutive requests hold the share, not a burst of it.
            let window = (0..100).filter(|_| share.takes()).count();
            assert_eq!(window, usize::from(percent), "{percent}%");
        }
    }
}
