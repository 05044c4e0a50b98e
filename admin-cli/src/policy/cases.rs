//! Policy test cases: a TOML file of `[[case]]` tables, each a request and the reason code
//! the policy is expected to give it.
//!
//! ```toml
//! [[case]]
//! name = "finance chats with its model"
//! department = "finance"
//! action = "chat"
//! model = "finance-model"
//! classification = "confidential"
//! expect = "allow"
//! ```

use std::net::{IpAddr, Ipv4Addr};

use moat_core::policy::content::Direction;
use moat_core::policy::{AccessPolicy, ModelFacts, PolicyAction, PolicyRequest};
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Reason codes a case may expect besides `content.<detector>`.
const REASON_CODES: [&str; 5] = [
    "allow",
    "deny.no_permit",
    "deny.forbidden",
    "deny.classification",
    "deny.unknown_classification",
];

/// Why a cases file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CasesError {
    /// Not TOML, or a field of the wrong type or unknown.
    #[error("{0}")]
    Syntax(String),
    /// The file holds no `[[case]]` table.
    #[error("no [[case]] table: nothing to test")]
    Empty,
    /// Cases that are well-formed TOML but do not describe a request; every problem, each
    /// naming its case.
    #[error("{} problem(s):\n  {}", .0.len(), .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    case: Vec<CaseSpec>,
}

/// One `[[case]]` table as written; the defaults are those documented in `--help`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseSpec {
    name: Option<String>,
    department: String,
    #[serde(default = "default_subject")]
    subject: String,
    action: CaseAction,
    model: Option<String>,
    task: Option<String>,
    classification: Option<String>,
    #[serde(default = "default_source_ip")]
    source_ip: IpAddr,
    time: Option<CaseTime>,
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    max_tokens: u64,
    expect: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CaseAction {
    Chat,
    Complete,
    Embed,
    ListModels,
}

/// A time written either as a TOML date-time or as a string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CaseTime {
    Toml(toml::value::Datetime),
    Text(String),
}

/// The model of a case.
#[derive(Debug)]
struct CaseModel {
    name: String,
    task: String,
}

/// One checked case, ready to put to a policy.
#[derive(Debug)]
pub struct TestCase {
    pub name: String,
    department: String,
    subject: String,
    action: PolicyAction,
    model: Option<CaseModel>,
    classification: Option<String>,
    source_ip: IpAddr,
    unix_time: i64,
    prompt: String,
    prompt_tokens: u64,
    max_tokens: u64,
    pub expect: String,
}

/// What the policy said about one case.
#[derive(Debug)]
pub struct CaseResult {
    /// The reason code decided.
    pub got: String,
    /// The Cedar policies that decided.
    pub policies: Vec<String>,
}

fn default_subject() -> String {
    "tester".to_owned()
}

fn default_source_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

impl From<CaseAction> for PolicyAction {
    fn from(action: CaseAction) -> Self {
        match action {
            CaseAction::Chat => PolicyAction::Chat,
            CaseAction::Complete => PolicyAction::Complete,
            CaseAction::Embed => PolicyAction::Embed,
            CaseAction::ListModels => PolicyAction::ListModels,
        }
    }
}

/// Parses a cases file. `now` (seconds since the Unix epoch) is the time of cases that
/// state none. Every problem of every case is reported at once.
pub fn parse(text: &str, now: i64) -> Result<Vec<TestCase>, CasesError> {
    let file: CaseFile = toml::from_str(text).map_err(|e| CasesError::Syntax(e.to_string()))?;
    if file.case.is_empty() {
        return Err(CasesError::Empty);
    }
    let mut cases = Vec::new();
    let mut problems = Vec::new();
    for (index, spec) in file.case.into_iter().enumerate() {
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("case {}", index + 1));
        match check(spec, name.clone(), now) {
            Ok(case) => cases.push(case),
            Err(found) => problems.extend(
                found
                    .into_iter()
                    .map(|p| format!("case {} ({name}): {p}", index + 1)),
            ),
        }
    }
    if problems.is_empty() {
        Ok(cases)
    } else {
        Err(CasesError::Invalid(problems))
    }
}

/// Checks what serde cannot: the model against the action, the task, the time and the
/// expected reason code.
fn check(spec: CaseSpec, name: String, now: i64) -> Result<TestCase, Vec<String>> {
    let mut problems = Vec::new();
    let action = PolicyAction::from(spec.action);
    let model = check_model(action, spec.model, spec.task, &mut problems);
    let unix_time = match spec.time.map(|t| parse_time(&t)) {
        None => now,
        Some(Ok(time)) => time,
        Some(Err(problem)) => {
            problems.push(problem);
            now
        }
    };
    if let Err(problem) = check_expect(&spec.expect) {
        problems.push(problem);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(TestCase {
        name,
        department: spec.department,
        subject: spec.subject,
        action,
        model,
        classification: spec.classification,
        source_ip: spec.source_ip,
        unix_time,
        prompt: spec.prompt,
        prompt_tokens: spec.prompt_tokens,
        max_tokens: spec.max_tokens,
        expect: spec.expect,
    })
}

/// The model and task of a case: a model for every action but `list_models`, and one of
/// the two tasks.
fn check_model(
    action: PolicyAction,
    model: Option<String>,
    task: Option<String>,
    problems: &mut Vec<String>,
) -> Option<CaseModel> {
    let default_task = match action {
        PolicyAction::Embed => "embedding",
        _ => "text-generation",
    };
    let task = task.unwrap_or_else(|| default_task.to_owned());
    if task != "text-generation" && task != "embedding" {
        problems.push(format!(
            "task is {task:?}; it must be \"text-generation\" or \"embedding\""
        ));
    }
    match (action, model) {
        (PolicyAction::ListModels, None) => None,
        (PolicyAction::ListModels, Some(_)) => {
            problems.push("list_models takes no model".to_owned());
            None
        }
        (_, Some(name)) => Some(CaseModel { name, task }),
        (_, None) => {
            problems.push(format!("{} needs a model", action.as_str()));
            None
        }
    }
}

fn parse_time(time: &CaseTime) -> Result<i64, String> {
    let text = match time {
        CaseTime::Toml(datetime) => datetime.to_string(),
        CaseTime::Text(text) => text.clone(),
    };
    OffsetDateTime::parse(&text, &Rfc3339)
        .map(OffsetDateTime::unix_timestamp)
        .map_err(|e| {
            format!("time {text:?} is not an RFC 3339 date-time with an offset ({e}), e.g. 2025-01-06T09:30:00+01:00")
        })
}

fn check_expect(expect: &str) -> Result<(), String> {
    if REASON_CODES.contains(&expect) {
        return Ok(());
    }
    if expect
        .strip_prefix("content.")
        .is_some_and(|d| !d.is_empty())
    {
        return Ok(());
    }
    if expect.starts_with("limit.") {
        return Err(format!(
            "expect is {expect:?}, but limits hold state and are not evaluated by `policy test`"
        ));
    }
    Err(format!(
        "expect is {expect:?}; it must be one of {}, or content.<detector>",
        REASON_CODES.join(", ")
    ))
}

impl TestCase {
    /// Scans the prompt with the policy's content rules, then decides the request.
    pub fn evaluate(&self, policy: &AccessPolicy) -> CaseResult {
        let prompt_scan = policy.content().scan(&self.prompt, Direction::Prompt);
        let request = PolicyRequest {
            department: &self.department,
            subject: &self.subject,
            action: self.action,
            model: self.model.as_ref().map(|m| ModelFacts {
                name: &m.name,
                task: &m.task,
                version: "",
                ceiling: None,
            }),
            classification: self.classification.as_deref(),
            source_ip: self.source_ip,
            unix_time: self.unix_time,
            prompt_tokens: self.prompt_tokens,
            max_tokens: self.max_tokens,
            prompt_scan: &prompt_scan,
        };
        let decision = policy.decide(&request);
        CaseResult {
            got: decision.reason.as_str(),
            policies: decision.policies,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000;

    fn invalid(text: &str) -> Vec<String> {
        match parse(text, NOW) {
            Err(CasesError::Invalid(problems)) => problems,
            other => panic!("expected invalid cases, got {other:?}"),
        }
    }

    #[test]
    fn fills_in_the_defaults() {
        let cases = parse(
            "[[case]]\ndepartment = \"finance\"\naction = \"embed\"\nmodel = \"e5\"\nexpect = \"allow\"\n",
            NOW,
        )
        .expect("valid");
        let case = &cases[0];
        assert_eq!(case.name, "case 1");
        assert_eq!(case.subject, "tester");
        assert_eq!(case.source_ip, default_source_ip());
        assert_eq!(case.unix_time, NOW);
        assert_eq!(
            case.model.as_ref().map(|m| m.task.as_str()),
            Some("embedding")
        );
    }

    #[test]
    fn takes_times_as_toml_date_times_and_as_strings() {
        let text = "[[case]]\ndepartment = \"a\"\naction = \"list_models\"\nexpect = \"allow\"\n\
            time = 2024-01-01T00:00:00Z\n\
            [[case]]\ndepartment = \"a\"\naction = \"list_models\"\nexpect = \"allow\"\n\
            time = \"2024-01-01T01:00:00+01:00\"\n";
        let cases = parse(text, NOW).expect("valid");
        assert_eq!(cases[0].unix_time, 1_704_067_200);
        assert_eq!(cases[1].unix_time, 1_704_067_200);
    }

    #[test]
    fn reports_every_problem_with_its_case() {
        let problems = invalid(
            "[[case]]\nname = \"no model\"\ndepartment = \"a\"\naction = \"chat\"\nexpect = \"allow\"\n\
             [[case]]\ndepartment = \"a\"\naction = \"list_models\"\nmodel = \"m\"\n\
             expect = \"limit.requests_per_minute\"\ntime = \"yesterday\"\n",
        );
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("case 1 (no model): chat needs a model"));
        assert!(problems[1].contains("list_models takes no model"));
        assert!(problems[2].contains("RFC 3339"));
        assert!(problems[3].contains("not evaluated"));
    }

    #[test]
    fn refuses_unknown_fields_and_reason_codes() {
        let text = "[[case]]\ndepartment = \"a\"\naction = \"list_models\"\nexpect = \"allow\"\nmodle = \"m\"\n";
        assert!(matches!(parse(text, NOW), Err(CasesError::Syntax(e)) if e.contains("modle")));
        let problems = invalid(
            "[[case]]\ndepartment = \"a\"\naction = \"list_models\"\nexpect = \"deny.nopermit\"\n",
        );
        assert!(problems[0].contains("deny.no_permit"), "{problems:?}");
        assert!(matches!(parse("", NOW), Err(CasesError::Empty)));
    }
}
