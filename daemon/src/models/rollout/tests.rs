use std::collections::BTreeMap;

use super::*;
use crate::models::registry::VersionEntry;

/// A version as a test route holds it.
#[derive(Debug, Clone, PartialEq)]
struct Held(semver::Version);

impl Versioned for Held {
    fn version(&self) -> Option<&semver::Version> {
        Some(&self.0)
    }
}

fn held(version: &str) -> Held {
    Held(semver::Version::parse(version).expect("version"))
}

/// An entry with `versions` imported, `active` active and `previous` before it.
fn entry(versions: &[&str], active: Option<&str>, previous: Option<&str>) -> ModelEntry {
    let imported = VersionEntry {
        imported_unix_ms: 1,
        signer: "ml.pub".into(),
        signer_id: "00".into(),
        bytes: 1,
        task: "chat".into(),
    };
    ModelEntry {
        versions: versions
            .iter()
            .map(|v| ((*v).to_owned(), imported.clone()))
            .collect::<BTreeMap<_, _>>(),
        active: active.map(str::to_owned),
        previous: previous.map(str::to_owned),
        canary: None,
    }
}

fn route(active: &str, canary: Option<(&str, u8)>, standby: Option<&str>) -> Route<Held> {
    Route {
        active: held(active),
        canary: canary.map(|(v, percent)| Canary {
            model: held(v),
            share: Share::new(percent),
        }),
        standby: standby.map(held),
    }
}

/// (active, canary with its share, standby) of a route, as version texts.
type Shape = Option<(String, Option<(String, u8)>, Option<String>)>;

/// The shape of a route.
fn shape(route: Option<&Route<Held>>) -> Shape {
    route.map(|r| {
        (
            r.active.0.to_string(),
            r.canary
                .as_ref()
                .map(|c| (c.model.0.to_string(), c.share.percent)),
            r.standby.as_ref().map(|s| s.0.to_string()),
        )
    })
}

/// The shape a route is expected to have.
fn owned(active: &str, canary: Option<(&str, u8)>, standby: Option<&str>) -> Shape {
    Some((
        active.to_owned(),
        canary.map(|(v, p)| (v.to_owned(), p)),
        standby.map(str::to_owned),
    ))
}

/// 1.0.0 active, 2.0.0 its canary at 10%: the entry and the route.
fn canary_at_ten() -> (ModelEntry, Route<Held>) {
    let mut entry = entry(&["1.0.0", "2.0.0"], Some("1.0.0"), None);
    entry.canary = Some(CanaryEntry {
        version: "2.0.0".into(),
        percent: 10,
    });
    (entry, route("1.0.0", Some(("2.0.0", 10)), None))
}

#[test]
fn activation_serves_the_version_and_keeps_the_old_one_as_standby() {
    let before = entry(&["1.0.0", "2.0.0"], Some("1.0.0"), None);
    let old = route("1.0.0", Some(("2.0.0", 10)), None);
    let step = Step::Activate {
        version: "2.0.0".into(),
        model: held("2.0.0"),
    };
    let after = transition("m", &before, Some(&old), step).expect("activates");
    assert_eq!(after.entry.active.as_deref(), Some("2.0.0"));
    assert_eq!(after.entry.previous.as_deref(), Some("1.0.0"));
    assert_eq!(after.entry.canary, None);
    assert_eq!(
        shape(after.route.as_ref()),
        owned("2.0.0", None, Some("1.0.0"))
    );
    assert_eq!(after.result.model(), Some("m@2.0.0"));

    // The first activation of a name: nothing before it.
    let first = entry(&["1.0.0"], None, None);
    let step = Step::Activate {
        version: "1.0.0".into(),
        model: held("1.0.0"),
    };
    let after = transition("m", &first, None, step).expect("activates");
    assert_eq!(after.entry.previous, None);
    assert_eq!(shape(after.route.as_ref()), owned("1.0.0", None, None));
}

#[test]
fn a_canary_takes_its_share_beside_the_active_version() {
    let before = entry(&["1.0.0", "2.0.0"], Some("1.0.0"), None);
    let old = route("1.0.0", None, None);
    let step = |version: &str| Step::Canary {
        version: version.into(),
        percent: 10,
        model: held(version),
    };
    let after = transition("m", &before, Some(&old), step("2.0.0")).expect("starts");
    assert_eq!(
        after.entry.canary,
        Some(CanaryEntry {
            version: "2.0.0".into(),
            percent: 10
        })
    );
    assert_eq!(after.entry.active.as_deref(), Some("1.0.0"));
    assert_eq!(
        shape(after.route.as_ref()),
        owned("1.0.0", Some(("2.0.0", 10)), None)
    );

    assert!(matches!(
        transition("m", &before, Some(&old), step("1.0.0")),
        Err(RolloutError::CanaryIsActive(label)) if label == "m@1.0.0"
    ));
    assert!(matches!(
        transition("m", &before, None, step("2.0.0")),
        Err(RolloutError::NothingActive(_))
    ));
}

#[test]
fn promotion_makes_the_canary_active_and_the_old_version_standby() {
    let (before, old) = canary_at_ten();
    let step = Step::Promote { evaluation: None };
    let after = transition("m", &before, Some(&old), step).expect("promotes");
    assert_eq!(after.entry.active.as_deref(), Some("2.0.0"));
    assert_eq!(after.entry.previous.as_deref(), Some("1.0.0"));
    assert_eq!(after.entry.canary, None);
    assert_eq!(
        shape(after.route.as_ref()),
        owned("2.0.0", None, Some("1.0.0"))
    );
    assert_eq!(after.result.model(), Some("m@2.0.0"));

    let without = entry(&["1.0.0"], Some("1.0.0"), None);
    let step = Step::Promote { evaluation: None };
    assert!(matches!(
        transition("m", &without, Some(&old), step),
        Err(RolloutError::NoCanary(_))
    ));
}

#[test]
fn rollback_ends_a_canary_or_returns_to_the_previous_version() {
    let (canary, old) = canary_at_ten();
    let after = transition("m", &canary, Some(&old), Step::EndCanary).expect("ends");
    assert_eq!(after.entry.canary, None);
    assert_eq!(after.entry.active.as_deref(), Some("1.0.0"));
    assert_eq!(shape(after.route.as_ref()), owned("1.0.0", None, None));
    assert_eq!(
        after.result,
        RolloutResult::RolledBack(RolledBack::EndedCanary {
            ended_canary: "m@2.0.0".into()
        })
    );

    let promoted = entry(&["1.0.0", "2.0.0"], Some("2.0.0"), Some("1.0.0"));
    let old = route("2.0.0", None, Some("1.0.0"));
    let step = Step::Return {
        model: held("1.0.0"),
    };
    let after = transition("m", &promoted, Some(&old), step).expect("returns");
    assert_eq!(after.entry.active.as_deref(), Some("1.0.0"));
    assert_eq!(after.entry.previous.as_deref(), Some("2.0.0"));
    assert_eq!(
        shape(after.route.as_ref()),
        owned("1.0.0", None, Some("2.0.0"))
    );
    assert_eq!(after.result.model(), Some("m@1.0.0"));

    let first = entry(&["1.0.0"], Some("1.0.0"), None);
    let step = Step::Return {
        model: held("1.0.0"),
    };
    assert!(matches!(
        transition("m", &first, Some(&old), step),
        Err(RolloutError::NoPrevious(_))
    ));
}

#[test]
fn removal_forgets_an_idle_version_and_unloads_its_standby() {
    let before = entry(&["1.0.0", "2.0.0"], Some("2.0.0"), Some("1.0.0"));
    let old = route("2.0.0", None, Some("1.0.0"));
    let remove = |version: &str| Step::Remove {
        version: semver::Version::parse(version).expect("version"),
    };
    let after = transition("m", &before, Some(&old), remove("1.0.0")).expect("removes");
    assert!(!after.entry.versions.contains_key("1.0.0"));
    assert_eq!(after.entry.previous, None);
    assert_eq!(shape(after.route.as_ref()), owned("2.0.0", None, None));
    assert_eq!(
        after.result,
        RolloutResult::Removed(Removed {
            removed: "m@1.0.0".into()
        })
    );

    assert!(matches!(
        transition("m", &before, Some(&old), remove("2.0.0")),
        Err(RolloutError::RemoveActive(label)) if label == "m@2.0.0"
    ));
    assert!(matches!(
        transition("m", &before, Some(&old), remove("3.0.0")),
        Err(RolloutError::UnknownVersion { .. })
    ));
    let mut canary = before.clone();
    canary.canary = Some(CanaryEntry {
        version: "1.0.0".into(),
        percent: 5,
    });
    assert!(matches!(
        transition("m", &canary, Some(&old), remove("1.0.0")),
        Err(RolloutError::RemoveCanary(_))
    ));
}
