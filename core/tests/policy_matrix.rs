//! Access decisions checked cell by cell against an oracle: every department, model,
//! action, classification and prompt of a small estate, decided by `AccessPolicy` and by a
//! plain function written from the rules' documentation. Then the shipped policy directory,
//! and properties: nothing is allowed that no permit covers, and without permits nothing
//! is allowed at all.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::LazyLock;

use moat_core::policy::content::{ContentScan, Direction};
use moat_core::policy::{
    AccessPolicy, ModelFacts, PolicyAction, PolicyDecision, PolicyRequest, PolicySource,
    ReasonCode, SourceFile,
};
use proptest::prelude::*;

const SCHEMA: &str = include_str!("../../policies/schema.cedarschema");
const SHIPPED_POLICIES: &str = include_str!("../../policies/policies.cedar");
const SHIPPED_DATA: &str = include_str!("../../policies/moat-policy.toml");

/// One department per model, an enclave fenced off by a `forbid`, and finance embedding
/// with any model (so that the fence has something to refuse).
const ESTATE_POLICIES: &str = r#"
@id("everyone-lists-models")
permit (principal, action == Moat::Action::"list_models", resource);

@id("finance-uses-its-models")
permit (
  principal in Moat::Department::"finance",
  action in [Moat::Action::"chat", Moat::Action::"complete"],
  resource
)
when { resource.tags.contains("finance") };

@id("finance-embeds-anything")
permit (principal in Moat::Department::"finance", action == Moat::Action::"embed", resource);

@id("legal-uses-general")
permit (
  principal in Moat::Department::"legal",
  action in [Moat::Action::"chat", Moat::Action::"complete", Moat::Action::"embed"],
  resource == Moat::Model::"general"
);

@id("enclave-uses-enclave-model")
permit (
  principal in Moat::Department::"enclave",
  action in [Moat::Action::"chat", Moat::Action::"complete", Moat::Action::"embed"],
  resource == Moat::Model::"enclave-model"
);

@id("only-the-enclave-reaches-enclave-model")
forbid (principal, action, resource == Moat::Model::"enclave-model")
unless { principal in Moat::Department::"enclave" };
"#;

/// Departments' defaults and ceilings; `visitor` has no table; `general` has no table.
const ESTATE_DATA: &str = r#"
classification = ["public", "internal", "confidential", "secret"]

[default_department]
classification = "internal"
ceiling = "internal"

[departments.finance]
classification = "internal"
ceiling = "confidential"

[departments.legal]
ceiling = "confidential"

[departments.enclave]
classification = "confidential"
ceiling = "secret"

[default_model]
ceiling = "internal"

[models.finance-model]
ceiling = "confidential"
tags = ["finance"]

[models.enclave-model]
ceiling = "secret"
tags = ["enclave"]

[[content]]
detector = "card_number"
action = "deny"

[[content]]
detector = "email"
action = "redact"
"#;

const SCALE: [&str; 4] = ["public", "internal", "confidential", "secret"];
const DEPARTMENTS: [&str; 4] = ["finance", "legal", "enclave", "visitor"];
const MODELS: [&str; 3] = ["finance-model", "enclave-model", "general"];
const ACTIONS: [PolicyAction; 4] = [
    PolicyAction::Chat,
    PolicyAction::Complete,
    PolicyAction::Embed,
    PolicyAction::ListModels,
];
const CLASSIFICATIONS: [Option<&str>; 6] = [
    None,
    Some("public"),
    Some("internal"),
    Some("confidential"),
    Some("secret"),
    Some("bogus"),
];
const PROMPTS: [&str; 3] = [
    "Summarise the quarterly report.",
    "Refund card 4111 1111 1111 1111 please.",
    "Mail jane.doe@example.com the minutes.",
];
/// 2025-01-06 00:00:00 UTC, a Monday.
const MONDAY: i64 = 1_736_121_600;

fn load(policies: &str, data: &str) -> AccessPolicy {
    let source = PolicySource {
        schema: SourceFile {
            name: "schema.cedarschema",
            text: SCHEMA,
        },
        policies: vec![SourceFile {
            name: "policies.cedar",
            text: policies,
        }],
        data: SourceFile {
            name: "moat-policy.toml",
            text: data,
        },
    };
    match AccessPolicy::load(&source) {
        Ok(policy) => policy,
        Err(e) => panic!("policy does not load: {e}"),
    }
}

/// One request of the matrix or of a property.
#[derive(Debug, Clone)]
struct Ask {
    department: String,
    subject: String,
    action: PolicyAction,
    model: String,
    classification: Option<String>,
    hour: i64,
    prompt: &'static str,
}

impl Ask {
    fn new(department: &str, model: &str, action: PolicyAction) -> Self {
        Ask {
            department: department.to_owned(),
            subject: "tester".to_owned(),
            action,
            model: model.to_owned(),
            classification: None,
            hour: 10,
            prompt: PROMPTS[0],
        }
    }

    /// The model, unless the action is `list_models`.
    fn model(&self) -> Option<&str> {
        (self.action != PolicyAction::ListModels).then_some(self.model.as_str())
    }

    fn decide(&self, policy: &AccessPolicy) -> PolicyDecision {
        let scan: ContentScan = policy.content().scan(self.prompt, Direction::Prompt);
        let task = match self.action {
            PolicyAction::Embed => "embedding",
            _ => "text-generation",
        };
        policy.decide(&PolicyRequest {
            department: &self.department,
            subject: &self.subject,
            action: self.action,
            model: self.model().map(|name| ModelFacts {
                name,
                task,
                version: "",
                ceiling: None,
            }),
            classification: self.classification.as_deref(),
            source_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
            unix_time: MONDAY + self.hour * 3_600,
            prompt_tokens: 10,
            max_tokens: 100,
            prompt_scan: &scan,
        })
    }
}

/// What the estate's rules say, written from their documentation: the label must be on
/// the scale; a forbid wins; a permit is needed; the label must not exceed the department's
/// or the model's ceiling; a denying content rule refuses. Returns the reason and the
/// policies that decided.
fn oracle(ask: &Ask) -> (String, Vec<&'static str>) {
    let department = ask.department.as_str();
    let (default_label, department_ceiling) = match department {
        "finance" => ("internal", "confidential"),
        // legal's table names a ceiling and no label: the label is [default_department]'s.
        "legal" => ("internal", "confidential"),
        "enclave" => ("confidential", "secret"),
        _ => ("internal", "internal"),
    };
    let label = ask.classification.as_deref().unwrap_or(default_label);
    let rank = |label: &str| SCALE.iter().position(|l| *l == label);
    let Some(rank_of_label) = rank(label) else {
        return ("deny.unknown_classification".to_owned(), Vec::new());
    };
    let model = ask.model();
    if model == Some("enclave-model") && department != "enclave" {
        return (
            "deny.forbidden".to_owned(),
            vec!["only-the-enclave-reaches-enclave-model"],
        );
    }
    let permits = estate_permits(department, model, ask.action);
    if permits.is_empty() {
        return ("deny.no_permit".to_owned(), permits);
    }
    let model_ceiling = match model {
        Some("finance-model") => "confidential",
        Some("enclave-model") => "secret",
        Some(_) => "internal",
        None => "secret",
    };
    let over = |ceiling| rank(ceiling).is_some_and(|max| rank_of_label > max);
    let reason = if over(department_ceiling) || over(model_ceiling) {
        "deny.classification"
    } else if ask.prompt.contains("4111") {
        "content.card_number"
    } else {
        "allow"
    };
    (reason.to_owned(), permits)
}

/// The estate's permits that match the request.
fn estate_permits(
    department: &str,
    model: Option<&str>,
    action: PolicyAction,
) -> Vec<&'static str> {
    use PolicyAction::{Chat, Complete, Embed, ListModels};
    let mut permits = Vec::new();
    let Some(model) = model else {
        return vec!["everyone-lists-models"];
    };
    if department == "finance" && matches!(action, Chat | Complete) && model == "finance-model" {
        permits.push("finance-uses-its-models");
    }
    if department == "finance" && action == Embed {
        permits.push("finance-embeds-anything");
    }
    if department == "legal" && action != ListModels && model == "general" {
        permits.push("legal-uses-general");
    }
    if department == "enclave" && action != ListModels && model == "enclave-model" {
        permits.push("enclave-uses-enclave-model");
    }
    permits
}

/// Every cell of the estate: department × model × action × classification × prompt.
fn matrix() -> Vec<Ask> {
    let mut cells = Vec::new();
    for department in DEPARTMENTS {
        for model in MODELS {
            for action in ACTIONS {
                for classification in CLASSIFICATIONS {
                    for prompt in PROMPTS {
                        cells.push(Ask {
                            classification: classification.map(str::to_owned),
                            prompt,
                            ..Ask::new(department, model, action)
                        });
                    }
                }
            }
        }
    }
    cells
}

#[test]
fn every_cell_of_the_estate_matches_the_oracle() {
    let policy = load(ESTATE_POLICIES, ESTATE_DATA);
    let cells = matrix();
    assert!(cells.len() >= 200, "{} cells", cells.len());
    let mut wrong = Vec::new();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for ask in &cells {
        let decision = ask.decide(&policy);
        let (reason, mut policies) = oracle(ask);
        let mut got_policies: Vec<&str> = decision.policies.iter().map(String::as_str).collect();
        got_policies.sort_unstable();
        policies.sort_unstable();
        let got = decision.reason.as_str();
        *seen.entry(got.clone()).or_default() += 1;
        if got != reason || got_policies != policies {
            wrong.push(format!(
                "{ask:?}: expected {reason} {policies:?}, got {got} {got_policies:?}"
            ));
        }
        let stated = ask.classification.as_deref();
        assert!(stated.is_none_or(|label| decision.classification == label));
    }
    assert!(
        wrong.is_empty(),
        "{} wrong cells:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // The matrix reaches every outcome, so a change that loses one cannot pass unnoticed.
    for reason in [
        "allow",
        "deny.no_permit",
        "deny.forbidden",
        "deny.classification",
        "deny.unknown_classification",
        "content.card_number",
    ] {
        assert!(
            seen.get(reason).is_some_and(|n| *n > 0),
            "no cell gave {reason}: {seen:?}"
        );
    }
}

#[test]
fn the_judged_label_is_the_stated_one_or_the_departments_default() {
    let policy = load(ESTATE_POLICIES, ESTATE_DATA);
    for (department, label) in [
        ("finance", "internal"),
        // legal's table names no default label: it inherits [default_department]'s.
        ("legal", "internal"),
        ("enclave", "confidential"),
        ("visitor", "internal"),
    ] {
        let ask = Ask::new(department, "general", PolicyAction::Chat);
        assert_eq!(ask.decide(&policy).classification, label, "{department}");
    }
}

#[test]
fn the_shipped_policy_loads_and_permits_only_listing_models() {
    let policy = load(SHIPPED_POLICIES, SHIPPED_DATA);
    for department in DEPARTMENTS {
        for model in MODELS {
            for action in ACTIONS {
                for classification in CLASSIFICATIONS {
                    let ask = Ask {
                        classification: classification.map(str::to_owned),
                        ..Ask::new(department, model, action)
                    };
                    let reason = ask.decide(&policy).reason;
                    let expected = match (action, classification) {
                        (_, Some("bogus")) => ReasonCode::UnknownClassification,
                        (PolicyAction::ListModels, Some("confidential" | "secret")) => {
                            ReasonCode::Classification
                        }
                        (PolicyAction::ListModels, _) => ReasonCode::Allow,
                        _ => ReasonCode::NoPermit,
                    };
                    assert_eq!(reason, expected, "{ask:?}");
                }
            }
        }
    }
}

/// Permits whose conditions the property below restates: by department, by subject, by
/// hour and by model tag.
const CONDITIONAL_POLICIES: &str = r#"
@id("finance-uses-its-models")
permit (
  principal in Moat::Department::"finance",
  action in [Moat::Action::"chat", Moat::Action::"complete"],
  resource
)
when { resource.tags.contains("finance") };

@id("night-shift-chats-at-night")
permit (principal in Moat::Department::"night", action == Moat::Action::"chat", resource)
when { context.hour >= 22 || context.hour < 6 };

@id("bob-embeds-with-general")
permit (principal == Moat::Subject::"visitor/bob", action == Moat::Action::"embed", resource == Moat::Model::"general");

@id("no-secrets-at-night")
forbid (principal, action, resource)
when { context.classification_rank >= 3 && context.hour < 6 };
"#;

/// Whether some permit of [`CONDITIONAL_POLICIES`] holds for `ask`, and no forbid does.
fn conditional_oracle(ask: &Ask, rank: usize) -> bool {
    let model = ask.model();
    let finance = ask.department == "finance"
        && matches!(ask.action, PolicyAction::Chat | PolicyAction::Complete)
        && model == Some("finance-model");
    let night = ask.department == "night"
        && ask.action == PolicyAction::Chat
        && (ask.hour >= 22 || ask.hour < 6);
    let bob = ask.department == "visitor"
        && ask.subject == "bob"
        && ask.action == PolicyAction::Embed
        && model == Some("general");
    let forbidden = rank >= 3 && ask.hour < 6;
    (finance || night || bob) && !forbidden
}

/// Only forbids and commented-out permits: the default must deny everything.
const NO_PERMITS: &str = r#"
// @id("everyone-lists-models")
// permit (principal, action == Moat::Action::"list_models", resource);

@id("no-secrets-at-night")
forbid (principal, action, resource)
when { context.classification_rank >= 3 && context.hour < 6 };

@id("only-the-enclave-reaches-enclave-model")
forbid (principal, action, resource == Moat::Model::"enclave-model")
unless { principal in Moat::Department::"enclave" };
"#;

/// A department, subject or model name: a known one, or any string at all.
fn name(known: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(known).prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

fn ask_strategy() -> impl Strategy<Value = Ask> {
    (
        name(&["finance", "legal", "enclave", "visitor", "night"]),
        name(&["tester", "bob", "alice"]),
        proptest::sample::select(ACTIONS.to_vec()),
        name(&["finance-model", "enclave-model", "general"]),
        proptest::option::of(name(&SCALE)),
        0..24_i64,
        proptest::sample::select(PROMPTS.to_vec()),
    )
        .prop_map(
            |(department, subject, action, model, classification, hour, prompt)| Ask {
                department,
                subject,
                action,
                model,
                classification,
                hour,
                prompt,
            },
        )
}

/// The default tables of the properties: everything may go up to "secret".
const OPEN_DATA: &str = "[default_department]\nceiling = \"secret\"\n\
    [default_model]\nceiling = \"secret\"\n\
    [models.finance-model]\nceiling = \"secret\"\ntags = [\"finance\"]\n";

static CONDITIONAL: LazyLock<AccessPolicy> =
    LazyLock::new(|| load(CONDITIONAL_POLICIES, OPEN_DATA));
static WITHOUT_PERMITS: LazyLock<AccessPolicy> = LazyLock::new(|| load(NO_PERMITS, OPEN_DATA));

#[test]
fn each_conditional_permit_allows_where_its_condition_holds() {
    // So that the property below is not vacuous: each permit does allow something.
    let policy = &*CONDITIONAL;
    let at = |hour, ask: Ask| Ask { hour, ..ask };
    let bob = Ask {
        subject: "bob".to_owned(),
        ..Ask::new("visitor", "general", PolicyAction::Embed)
    };
    let secret = |ask: Ask| Ask {
        classification: Some("secret".to_owned()),
        ..ask
    };
    for (ask, allowed) in [
        (
            Ask::new("finance", "finance-model", PolicyAction::Complete),
            true,
        ),
        (
            Ask::new("finance", "general", PolicyAction::Complete),
            false,
        ),
        (
            at(23, Ask::new("night", "general", PolicyAction::Chat)),
            true,
        ),
        (
            at(12, Ask::new("night", "general", PolicyAction::Chat)),
            false,
        ),
        (bob.clone(), true),
        // A permit names one department's subject: legal's bob is not visitor's bob, and a
        // department whose name holds the separator is refused outright.
        (
            Ask {
                department: "legal".to_owned(),
                ..bob.clone()
            },
            false,
        ),
        (
            Ask {
                department: "visitor/bob".to_owned(),
                subject: String::new(),
                ..bob.clone()
            },
            false,
        ),
        (secret(at(3, bob.clone())), false),
        (secret(at(7, bob)), true),
    ] {
        let decision = ask.decide(policy);
        assert_eq!(decision.reason.is_allow(), allowed, "{ask:?}: {decision:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn nothing_is_allowed_that_no_permit_covers(ask in ask_strategy()) {
        let decision = ask.decide(&CONDITIONAL);
        if decision.reason.is_allow() {
            let label = ask.classification.as_deref().unwrap_or("public");
            let rank = SCALE.iter().position(|l| *l == label);
            prop_assert!(rank.is_some_and(|rank| conditional_oracle(&ask, rank)), "{ask:?}: {decision:?}");
            prop_assert!(!decision.policies.is_empty());
        }
    }

    #[test]
    fn without_permits_nothing_is_allowed(ask in ask_strategy()) {
        let decision = ask.decide(&WITHOUT_PERMITS);
        prop_assert!(!decision.reason.is_allow(), "{ask:?}: {decision:?}");
    }
}

/// A schema edit that the requests moatd builds no longer fit (here a department attribute
/// moatd does not supply) is refused at load, instead of denying every request later.
#[test]
fn a_schema_the_requests_do_not_fit_is_refused_at_load() {
    let schema = SCHEMA.replace(
        "ceiling_label: String,",
        "ceiling_label: String,\n    region: String,",
    );
    assert_ne!(schema, SCHEMA);
    let source = PolicySource {
        schema: SourceFile {
            name: "schema.cedarschema",
            text: &schema,
        },
        policies: vec![SourceFile {
            name: "policies.cedar",
            text: SHIPPED_POLICIES,
        }],
        data: SourceFile {
            name: "moat-policy.toml",
            text: SHIPPED_DATA,
        },
    };
    let error = AccessPolicy::load(&source).expect_err("refused");
    assert!(
        error
            .problems
            .iter()
            .any(|p| p.contains("does not fit the chat requests")),
        "{error}"
    );
}

/// Data-rule syntax errors carry the file, line and column.
#[test]
fn data_syntax_errors_are_located() {
    let source = PolicySource {
        schema: SourceFile {
            name: "schema.cedarschema",
            text: SCHEMA,
        },
        policies: vec![SourceFile {
            name: "policies.cedar",
            text: SHIPPED_POLICIES,
        }],
        data: SourceFile {
            name: "moat-policy.toml",
            text: "classification = [\"public\"]\n\n[default_model]\nceiling = \n",
        },
    };
    let error = AccessPolicy::load(&source).expect_err("refused");
    assert!(
        error
            .problems
            .iter()
            .any(|p| p.starts_with("moat-policy.toml:4:")),
        "{error}"
    );
}

#[test]
fn a_bundles_version_and_ceiling_reach_the_decision() {
    let policies = r#"
@id("only-version-2")
permit (principal, action == Moat::Action::"chat", resource)
when { resource.version like "2.*" };
"#;
    let data = "classification = [\"public\", \"internal\", \"confidential\", \"secret\"]\n\
                [default_department]\nclassification = \"internal\"\nceiling = \"secret\"\n\
                [default_model]\nceiling = \"secret\"\n";
    let policy = load(policies, data);
    let scan = ContentScan::default();
    let decide = |version: &str, ceiling: Option<&str>, label: &str| {
        policy
            .decide(&PolicyRequest {
                department: "finance",
                subject: "tester",
                action: PolicyAction::Chat,
                model: Some(ModelFacts {
                    name: "m",
                    task: "text-generation",
                    version,
                    ceiling,
                }),
                classification: Some(label),
                source_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
                unix_time: MONDAY,
                prompt_tokens: 10,
                max_tokens: 100,
                prompt_scan: &scan,
            })
            .reason
    };
    // Policies see the served version as resource.version.
    assert_eq!(decide("2.1.0", None, "internal"), ReasonCode::Allow);
    assert_eq!(decide("1.9.0", None, "internal"), ReasonCode::NoPermit);
    // The bundle's ceiling holds even where the policy's would allow more.
    assert_eq!(
        decide("2.1.0", Some("internal"), "internal"),
        ReasonCode::Allow
    );
    assert_eq!(
        decide("2.1.0", Some("internal"), "confidential"),
        ReasonCode::Classification
    );
    // A ceiling that is no label of the scale refuses everything (fails closed).
    assert_eq!(
        decide("2.1.0", Some("top-secret"), "public"),
        ReasonCode::Classification
    );
}
