//! What `moatctl model list`, `moatctl status` and `moatctl model import` print: the
//! registry and the serving table as JSON.

use std::collections::BTreeMap;

use moat_core::bundle::VerifiedBundle;
use serde_json::{Value, json};

use super::{Models, RolloutError};

impl Models {
    /// Every imported version and what serves, for `moatctl model list`.
    pub fn list(&self) -> Result<Value, RolloutError> {
        let routes = self.table.snapshot();
        let mut models = Vec::new();
        for (name, entry) in self.registry.all()? {
            let route = routes.get(&name);
            // In version order (1.10.0 after 1.9.0), not text order.
            let mut ordered: Vec<_> = entry.versions.iter().collect();
            ordered.sort_by_key(|(version, _)| semver::Version::parse(version).ok());
            let versions: Vec<Value> = ordered
                .into_iter()
                .map(|(version, info)| {
                    let loaded = route.is_some_and(|r| {
                        r.loaded().any(|m| m.version_text() == *version)
                    });
                    json!({
                        "version": version,
                        "task": info.task,
                        "bytes": info.bytes,
                        "signer": info.signer,
                        "signer_id": info.signer_id,
                        "imported_unix_ms": info.imported_unix_ms,
                        "active": entry.active.as_deref() == Some(version.as_str()),
                        "canary_percent": entry.canary.as_ref().filter(|c| c.version == *version).map(|c| c.percent),
                        "previous": entry.previous.as_deref() == Some(version.as_str()),
                        "loaded": loaded,
                    })
                })
                .collect();
            models.push(json!({
                "name": name,
                "highest": self.registry.highest(&name)?.map(|v| v.to_string()),
                "versions": versions,
            }));
        }
        for (name, route) in routes.iter() {
            if route.active.version.is_none() {
                models.push(json!({"name": name, "unsigned_directory": true, "versions": []}));
            }
        }
        Ok(json!({"models": models}))
    }

    /// What this moatd serves, for `moatctl status`.
    pub fn status(&self) -> Value {
        let routes = self.table.snapshot();
        let served: BTreeMap<&String, Value> = routes
            .iter()
            .map(|(name, route)| {
                (
                    name,
                    json!({
                        "active": route.active.version_text(),
                        "healthy": route.active.served.is_healthy(),
                        "canary": route.canary.as_ref().map(|c| json!({"version": c.model.version_text(), "percent": c.share.percent})),
                        "standby": route.standby.as_ref().map(|m| m.version_text()),
                    }),
                )
            })
            .collect();
        json!({
            "moatd": env!("CARGO_PKG_VERSION"),
            "node_id": self.audit.node().node_id,
            "uptime_secs": self.started.elapsed().as_secs(),
            "models": served,
            "memory_estimate_mib": self.table.memory_bytes() >> 20,
            "memory_budget_mib": self.memory_budget.map(|b| b >> 20),
        })
    }
}

/// What an import registered.
pub(super) fn import_summary(verified: &VerifiedBundle) -> Value {
    let manifest = &verified.manifest;
    json!({
        "model": manifest.label(),
        "task": manifest.task.as_str(),
        "files": manifest.files.len(),
        "bytes": manifest.total_bytes(),
        "signer": verified.signer,
        "signer_id": verified.signer_id,
        "golden_prompts": manifest.golden.len(),
    })
}
