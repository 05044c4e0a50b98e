//! Rollout as one state transition: each command's change to a name's registry entry and
//! its route is computed together, from the old pair, by [`transition`] (pure: no I/O, no
//! loading), and applied by [`Models::commit`] in one step, the registry first. What must
//! be loaded and checked (a version's golden prompts, a canary's evaluation) is done before
//! the transition is computed, so a command refused at any point changes nothing.

use std::sync::Arc;

use moat_core::admin::{
    Activated, CanaryStarted, Promoted, PromotionEvaluation, Removed, RolledBack, RolloutResult,
};

use super::registry::{CanaryEntry, ModelEntry};
use super::serving::{Canary, LoadedModel, Route, Share};
use super::{Models, RolloutError, parse_label, store};

#[cfg(test)]
mod tests;

/// A version as a route holds it: what [`transition`] needs to know of it.
pub(super) trait Versioned {
    /// `None` for a model directory served without a bundle.
    fn version(&self) -> Option<&semver::Version>;
}

impl Versioned for Arc<LoadedModel> {
    fn version(&self) -> Option<&semver::Version> {
        self.version.as_ref()
    }
}

/// A rollout step on one name, with the version it brings already loaded and checked.
#[derive(Debug)]
pub(super) enum Step<M> {
    /// `version` takes all traffic; the active version stays loaded as standby.
    Activate { version: String, model: M },
    /// `version` takes `percent` of the traffic beside the active version.
    Canary {
        version: String,
        percent: u8,
        model: M,
    },
    /// The canary becomes the active version, after `evaluation` (if any) let it.
    Promote {
        evaluation: Option<PromotionEvaluation>,
    },
    /// The canary ends; its share returns to the active version.
    EndCanary,
    /// The previous version is active again.
    Return { model: M },
    /// An imported version that neither serves nor is the canary is forgotten.
    Remove { version: semver::Version },
}

/// What a step changes: the name's registry entry and route after it (`None`: not served),
/// and what the command answers.
#[derive(Debug)]
pub(super) struct Transition<M> {
    pub entry: ModelEntry,
    pub route: Option<Route<M>>,
    pub result: RolloutResult,
}

/// The registry entry and route of `name` after `step`, from the ones before it. Refused,
/// with nothing to apply, when the step does not fit the entry.
pub(super) fn transition<M: Clone + Versioned>(
    name: &str,
    before: &ModelEntry,
    route: Option<&Route<M>>,
    step: Step<M>,
) -> Result<Transition<M>, RolloutError> {
    let mut entry = before.clone();
    let mut route = route.cloned();
    let result = match step {
        Step::Activate { version, model } => {
            if entry.active.as_deref() != Some(version.as_str()) {
                entry.previous = entry.active.take();
            }
            entry.active = Some(version.clone());
            entry.canary = None;
            route = Some(Route {
                standby: route.map(|old| old.active),
                ..Route::new(model)
            });
            RolloutResult::Activated(Activated {
                model: format!("{name}@{version}"),
                previous: entry.previous.clone(),
                note: None,
            })
        }
        Step::Canary {
            version,
            percent,
            model,
        } => {
            if entry.active.as_deref() == Some(version.as_str()) {
                return Err(RolloutError::CanaryIsActive(format!("{name}@{version}")));
            }
            let Some(serving) = route.as_mut() else {
                return Err(RolloutError::NothingActive(name.to_owned()));
            };
            serving.canary = Some(Canary {
                model,
                share: Share::new(percent),
            });
            entry.canary = Some(CanaryEntry {
                version: version.clone(),
                percent,
            });
            RolloutResult::CanaryStarted(CanaryStarted {
                model: format!("{name}@{version}"),
                percent,
            })
        }
        Step::Promote { evaluation } => {
            let no_canary = || RolloutError::NoCanary(name.to_owned());
            let canary = entry.canary.take().ok_or_else(no_canary)?;
            let serving = route.as_mut().ok_or_else(no_canary)?;
            let promoted = serving.canary.take().ok_or_else(no_canary)?;
            let old = std::mem::replace(&mut serving.active, promoted.model);
            serving.standby = Some(old);
            entry.previous = entry.active.replace(canary.version.clone());
            RolloutResult::Promoted(Promoted {
                model: format!("{name}@{}", canary.version),
                previous: entry.previous.clone(),
                evaluation,
            })
        }
        Step::EndCanary => {
            let canary = entry
                .canary
                .take()
                .ok_or_else(|| RolloutError::NoCanary(name.to_owned()))?;
            if let Some(serving) = route.as_mut() {
                serving.canary = None;
            }
            RolloutResult::RolledBack(RolledBack::EndedCanary {
                ended_canary: format!("{name}@{}", canary.version),
            })
        }
        Step::Return { model } => {
            let previous = entry
                .previous
                .clone()
                .ok_or_else(|| RolloutError::NoPrevious(name.to_owned()))?;
            entry.previous = entry.active.replace(previous.clone());
            route = Some(Route {
                standby: route.map(|old| old.active),
                ..Route::new(model)
            });
            RolloutResult::RolledBack(RolledBack::Returned {
                model: format!("{name}@{previous}"),
                previous: entry.previous.clone(),
            })
        }
        Step::Remove { version } => {
            let label = format!("{name}@{version}");
            let text = version.to_string();
            if entry.versions.remove(&text).is_none() {
                return Err(RolloutError::UnknownVersion {
                    name: name.to_owned(),
                    label,
                });
            }
            if entry.active.as_deref() == Some(text.as_str()) {
                return Err(RolloutError::RemoveActive(label));
            }
            if entry.canary.as_ref().is_some_and(|c| c.version == text) {
                return Err(RolloutError::RemoveCanary(label));
            }
            if entry.previous.as_deref() == Some(text.as_str()) {
                entry.previous = None;
            }
            if let Some(serving) = route.as_mut()
                && serving
                    .standby
                    .as_ref()
                    .is_some_and(|m| m.version() == Some(&version))
            {
                serving.standby = None;
            }
            RolloutResult::Removed(Removed { removed: label })
        }
    };
    Ok(Transition {
        entry,
        route,
        result,
    })
}

impl Models {
    /// Applies a transition of `name`: the registry first (if it cannot be written, nothing
    /// changes), then the serving table in one atomic swap.
    fn commit(
        &self,
        name: &str,
        transition: Transition<Arc<LoadedModel>>,
    ) -> Result<RolloutResult, RolloutError> {
        self.registry.put(name, &transition.entry)?;
        self.table.update(|routes| match transition.route {
            Some(route) => routes.insert(name.to_owned(), route),
            None => routes.remove(name),
        });
        Ok(transition.result)
    }

    /// The transition of `name` by `step`, from `entry` and the table as it is now.
    fn planned(
        &self,
        name: &str,
        entry: &ModelEntry,
        step: Step<Arc<LoadedModel>>,
    ) -> Result<Transition<Arc<LoadedModel>>, RolloutError> {
        let routes = self.table.snapshot();
        transition(name, entry, routes.get(name), step)
    }

    pub(super) async fn activate(&self, label: &str) -> Result<RolloutResult, RolloutError> {
        let (name, version) = parse_label(label)?;
        if self.is_unsigned(&name) {
            return Err(RolloutError::Unsigned(name));
        }
        let entry = self.entry(&name)?;
        let version = version.to_string();
        if entry.active.as_deref() == Some(version.as_str())
            && self.table.snapshot().contains_key(&name)
        {
            return Ok(RolloutResult::Activated(Activated {
                model: label.to_owned(),
                previous: None,
                note: Some("already active".to_owned()),
            }));
        }
        let model = self.prepare(&name, &version).await?;
        let step = Step::Activate { version, model };
        let transition = self.planned(&name, &entry, step)?;
        self.commit(&name, transition)
    }

    pub(super) async fn canary(
        &self,
        label: &str,
        percent: u8,
    ) -> Result<RolloutResult, RolloutError> {
        if !(1..=99).contains(&percent) {
            return Err(RolloutError::BadPercent(percent));
        }
        let (name, version) = parse_label(label)?;
        let entry = self.entry(&name)?;
        if entry.active.is_none() || !self.table.snapshot().contains_key(&name) {
            return Err(RolloutError::NothingActive(name));
        }
        let version = version.to_string();
        // Refused before anything is loaded.
        if entry.active.as_deref() == Some(version.as_str()) {
            return Err(RolloutError::CanaryIsActive(label.to_owned()));
        }
        let model = self.prepare(&name, &version).await?;
        let step = Step::Canary {
            version,
            percent,
            model,
        };
        let transition = self.planned(&name, &entry, step)?;
        self.commit(&name, transition)
    }

    /// Makes the canary the active version. When the canary's bundle carries an evaluation
    /// set, both versions answer it first, and a canary scoring below the active version is
    /// refused unless `force`.
    pub(super) async fn promote(
        &self,
        name: &str,
        force: bool,
    ) -> Result<RolloutResult, RolloutError> {
        let entry = self.entry(name)?;
        let no_canary = || RolloutError::NoCanary(name.to_owned());
        let canary = entry.canary.as_ref().ok_or_else(no_canary)?;
        let routes = self.table.snapshot();
        let route = routes.get(name).ok_or_else(no_canary)?;
        let serving_canary = route.canary.as_ref().ok_or_else(no_canary)?;
        // Loaded and checked when the canary began; its signer must still be trusted.
        let trusted = store::trusted_keys(&self.trusted_keys)?;
        let signer = entry.versions.get(&canary.version);
        if !signer.is_some_and(|v| trusted.iter().any(|k| k.id() == v.signer_id)) {
            return Err(RolloutError::NoLongerTrusted {
                label: format!("{name}@{}", canary.version),
                signer: signer.map(|v| v.signer.clone()).unwrap_or_default(),
            });
        }
        let evaluation = self
            .eval_gate(
                name,
                &canary.version,
                &serving_canary.model,
                &route.active,
                force,
            )
            .await?;
        // Commands run one at a time, so the canary checked above is still there.
        let transition = transition(name, &entry, Some(route), Step::Promote { evaluation })?;
        self.commit(name, transition)
    }

    /// Ends a canary, or else returns to the previous version: at once when it is still
    /// loaded (it is, unless moatd restarted since), else after loading and checking it.
    pub(super) async fn rollback(&self, name: &str) -> Result<RolloutResult, RolloutError> {
        let entry = self.entry(name)?;
        if entry.canary.is_some() {
            let transition = self.planned(name, &entry, Step::EndCanary)?;
            return self.commit(name, transition);
        }
        let Some(previous) = &entry.previous else {
            return Err(RolloutError::NoPrevious(name.to_owned()));
        };
        let model = self.prepare(name, previous).await?;
        let transition = self.planned(name, &entry, Step::Return { model })?;
        self.commit(name, transition)
    }

    pub(super) fn remove(&self, label: &str) -> Result<RolloutResult, RolloutError> {
        let (name, version) = parse_label(label)?;
        let entry = self.entry(&name)?;
        let step = Step::Remove {
            version: version.clone(),
        };
        let transition = self.planned(&name, &entry, step)?;
        // Files first: a version whose files are gone cannot load, while files without a
        // registry entry are cleared by the next import of that version.
        self.store.remove(&name, &version)?;
        self.commit(&name, transition)
    }
}
