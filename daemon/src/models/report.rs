//! What `moatctl model list`, `moatctl status` and `moatctl model import` print: the
//! registry and the serving table as JSON.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

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
                        "check": semver::Version::parse(version)
                            .ok()
                            .map(|v| check_report(&self.store.version_dir(&name, &v))),
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

/// The file `moat-model check` writes into a model directory; `moatctl bundle pack` carries
/// it into the bundle like any other file, so it was verified against the signed manifest.
pub const CHECK_REPORT_FILE: &str = "check.json";
/// A check report is a few kilobytes; a larger file is not read (it is not shown, not fatal).
const MAX_CHECK_REPORT_BYTES: u64 = 1 << 20;

/// The figures of a version's check report, or `null` when the bundle carries none (or one
/// that cannot be read: the list still shows every version).
fn check_report(dir: &Path) -> Value {
    let path = dir.join(CHECK_REPORT_FILE);
    let Ok(file) = std::fs::File::open(&path) else {
        return Value::Null;
    };
    let mut text = String::new();
    if file
        .take(MAX_CHECK_REPORT_BYTES)
        .read_to_string(&mut text)
        .is_err()
    {
        return Value::Null;
    }
    let Ok(report) = serde_json::from_str::<Value>(&text) else {
        return json!({"unreadable": CHECK_REPORT_FILE});
    };
    json!({
        "variant": report["variant"],
        "against": report["against"],
        "passed": report["passed"],
        "greedy": report["greedy"],
        "teacher_forced": report["teacher_forced"],
    })
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
