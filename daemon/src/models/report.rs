//! What `moatctl model list`, `moatctl status` and `moatctl model import` print: the
//! the registry and the serving table as the admin protocol's answers.

use std::io::Read;
use std::path::Path;

use moat_core::admin::{
    CanaryStatus, CheckFigures, CheckReport, ImportSummary, ListedModel, ListedVersion, ModelList,
    ServedStatus, Status,
};
use moat_core::bundle::VerifiedBundle;

use super::{Models, RolloutError};

impl Models {
    /// Every imported version and what serves, for `moatctl model list`.
    pub(super) fn list_report(&self) -> Result<ModelList, RolloutError> {
        let routes = self.table.snapshot();
        let mut models = Vec::new();
        for (name, entry) in self.registry.all()? {
            let route = routes.get(&name);
            // In version order (1.10.0 after 1.9.0), not text order.
            let mut ordered: Vec<_> = entry.versions.iter().collect();
            ordered.sort_by_key(|(version, _)| semver::Version::parse(version).ok());
            let versions = ordered
                .into_iter()
                .map(|(version, info)| {
                    let loaded =
                        route.is_some_and(|r| r.loaded().any(|m| m.version_text() == *version));
                    ListedVersion {
                        version: version.clone(),
                        task: info.task.clone(),
                        bytes: info.bytes,
                        signer: info.signer.clone(),
                        signer_id: info.signer_id.clone(),
                        imported_unix_ms: info.imported_unix_ms,
                        active: entry.active.as_deref() == Some(version.as_str()),
                        canary_percent: entry
                            .canary
                            .as_ref()
                            .filter(|c| c.version == *version)
                            .map(|c| c.percent),
                        previous: entry.previous.as_deref() == Some(version.as_str()),
                        loaded,
                        check: semver::Version::parse(version)
                            .ok()
                            .and_then(|v| check_report(&self.store.version_dir(&name, &v))),
                    }
                })
                .collect();
            models.push(ListedModel {
                highest: self.registry.highest(&name)?.map(|v| v.to_string()),
                name,
                unsigned_directory: false,
                versions,
            });
        }
        for (name, route) in routes.iter() {
            if route.active.version.is_none() {
                models.push(ListedModel {
                    name: name.clone(),
                    unsigned_directory: true,
                    highest: None,
                    versions: Vec::new(),
                });
            }
        }
        Ok(ModelList { models })
    }

    /// What this moatd serves, for `moatctl status`.
    pub(super) fn status_report(&self) -> Status {
        let routes = self.table.snapshot();
        let models = routes
            .iter()
            .map(|(name, route)| {
                let served = ServedStatus {
                    active: route.active.version_text(),
                    healthy: route.active.served.is_healthy(),
                    canary: route.canary.as_ref().map(|c| CanaryStatus {
                        version: c.model.version_text(),
                        percent: c.share.percent,
                    }),
                    standby: route.standby.as_ref().map(|m| m.version_text()),
                };
                (name.clone(), served)
            })
            .collect();
        Status {
            moatd: env!("CARGO_PKG_VERSION").to_owned(),
            node_id: self.audit.node().node_id.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            models,
            memory_estimate_mib: self.table.memory_bytes() >> 20,
            memory_budget_mib: self.memory_budget.map(|b| b >> 20),
        }
    }
}

/// The file `moat-model check` writes into a model directory; `moatctl bundle pack` carries
/// it into the bundle like any other file, so it was verified against the signed manifest.
pub const CHECK_REPORT_FILE: &str = "check.json";
/// A check report is a few kilobytes; a larger file is not read (it is not shown, not fatal).
const MAX_CHECK_REPORT_BYTES: u64 = 1 << 20;

/// The figures of a version's check report, or `None` when the bundle carries none (or one
/// that cannot be read: the list still shows every version).
fn check_report(dir: &Path) -> Option<CheckReport> {
    let path = dir.join(CHECK_REPORT_FILE);
    let file = std::fs::File::open(&path).ok()?;
    let mut text = String::new();
    file.take(MAX_CHECK_REPORT_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    let unreadable = || CheckReport::Unreadable {
        unreadable: CHECK_REPORT_FILE.to_owned(),
    };
    // The report's other fields (per prompt, versions) are not shown.
    Some(
        serde_json::from_str::<CheckFigures>(&text)
            .map_or_else(|_| unreadable(), CheckReport::Figures),
    )
}

/// What an import registered.
pub(super) fn import_summary(verified: &VerifiedBundle) -> ImportSummary {
    let manifest = &verified.manifest;
    ImportSummary {
        model: manifest.label(),
        task: manifest.task.as_str().to_owned(),
        files: manifest.files.len(),
        bytes: manifest.total_bytes(),
        signer: verified.signer.clone(),
        signer_id: verified.signer_id.clone(),
        golden_prompts: manifest.golden.len(),
    }
}
