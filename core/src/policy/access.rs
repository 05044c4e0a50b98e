//! The loaded policy: Cedar schema and policies plus the data rules, and the decision for
//! one request.
//!
//! Order of the checks, first refusal wins: the classification label must be on the scale;
//! a Cedar policy must permit and none forbid; the label must not exceed the department's or
//! the model's ceiling; no `deny` content rule may fire on the prompt. Limits are the
//! caller's next step (they hold state).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::str::FromStr as _;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

use super::ReasonCode;
use super::content::{ContentRules, ContentScan};
use super::data::PolicyData;

/// Separates department and subject in a principal's id (`Moat::Subject::"finance/alice"`);
/// never part of a department name.
pub const SUBJECT_SEPARATOR: char = '/';

/// One file of a policy directory, as text.
#[derive(Debug, Clone, Copy)]
pub struct SourceFile<'a> {
    /// How the file is named in messages (its path).
    pub name: &'a str,
    pub text: &'a str,
}

/// The files of a policy directory.
#[derive(Debug, Clone)]
pub struct PolicySource<'a> {
    pub schema: SourceFile<'a>,
    pub policies: Vec<SourceFile<'a>>,
    pub data: SourceFile<'a>,
}

/// A policy directory that cannot be used, with every problem found, each starting with
/// `file:line:column:` where the position is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} problem(s) in the policy:\n  {}", .problems.len(), .problems.join("\n  "))]
pub struct PolicyError {
    pub problems: Vec<String>,
}

/// What a request does, as Cedar's actions name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyAction {
    Chat,
    Complete,
    Embed,
    ListModels,
}

impl PolicyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyAction::Chat => "chat",
            PolicyAction::Complete => "complete",
            PolicyAction::Embed => "embed",
            PolicyAction::ListModels => "list_models",
        }
    }
}

/// The model a request is for.
#[derive(Debug, Clone, Copy)]
pub struct ModelFacts<'a> {
    pub name: &'a str,
    /// `text-generation` or `embedding`.
    pub task: &'a str,
    /// The served version (from its bundle); empty for an unversioned model, which
    /// policies then see with the version `moat-policy.toml` gives it, if any.
    pub version: &'a str,
    /// The bundle's classification ceiling, enforced on top of the policy's: a request
    /// above either is refused.
    pub ceiling: Option<&'a str>,
}

/// The facts of one request that the policy decides on.
#[derive(Debug, Clone, Copy)]
pub struct PolicyRequest<'a> {
    pub department: &'a str,
    pub subject: &'a str,
    pub action: PolicyAction,
    /// `None` for `ListModels`.
    pub model: Option<ModelFacts<'a>>,
    /// The label the request states (`X-Moat-Classification`), if any.
    pub classification: Option<&'a str>,
    pub source_ip: IpAddr,
    /// Seconds since the Unix epoch.
    pub unix_time: i64,
    pub prompt_tokens: u64,
    pub max_tokens: u64,
    /// What the content rules found in the prompt.
    pub prompt_scan: &'a ContentScan,
}

/// The outcome for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDecision {
    pub reason: ReasonCode,
    /// The label the request was judged at (stated or the department's default).
    pub classification: String,
    /// The Cedar policies that decided (permits for an allow, forbids for a forbid).
    pub policies: Vec<String>,
}

/// A validated policy, ready to decide. Immutable: reloading builds a new one.
#[derive(Debug)]
pub struct AccessPolicy {
    schema: Schema,
    policies: PolicySet,
    data: PolicyData,
    content: ContentRules,
    authorizer: Authorizer,
    types: EntityTypes,
    /// Entities shared by every request (see `base_entities`).
    base: Entities,
    /// How many policies each file contributed, in order (for `moatctl policy validate`).
    pub counts: Vec<(String, usize)>,
    /// Whether any policy mentions the request's token counts (see
    /// [`AccessPolicy::decides_on_token_counts`]).
    token_counts: bool,
}

#[derive(Debug)]
struct EntityTypes {
    department: EntityTypeName,
    subject: EntityTypeName,
    model: EntityTypeName,
    appliance: EntityTypeName,
    action: EntityTypeName,
}

impl EntityTypes {
    fn new() -> Self {
        // Constants of this file, valid Cedar names.
        let name = |n: &str| EntityTypeName::from_str(n).expect("built-in Cedar type name");
        Self {
            department: name("Moat::Department"),
            subject: name("Moat::Subject"),
            model: name("Moat::Model"),
            appliance: name("Moat::Appliance"),
            action: name("Moat::Action"),
        }
    }
}

/// The principal's id: the subject scoped by its department, `"<department>/<subject>"`, so
/// that a policy about finance's alice never matches legal's alice. Department names never
/// hold `/` (the identity refuses them), so the id reads back one way only.
fn subject_uid(types: &EntityTypes, request: &PolicyRequest<'_>) -> EntityUid {
    uid(
        &types.subject,
        &format!(
            "{}{SUBJECT_SEPARATOR}{}",
            request.department, request.subject
        ),
    )
}

fn uid(kind: &EntityTypeName, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(kind.clone(), EntityId::new(id))
}

impl AccessPolicy {
    /// Parses and validates a policy directory: the schema, every policy against it
    /// (strict mode), the data rules and the content rules. Every problem is reported.
    pub fn load(source: &PolicySource<'_>) -> Result<Self, PolicyError> {
        let mut problems = Vec::new();
        let schema = match Schema::from_cedarschema_str(source.schema.text) {
            Ok((schema, _warnings)) => Some(schema),
            Err(e) => {
                problems.extend(located(source.schema, &e));
                None
            }
        };
        let (policies, counts, origins) = parse_policies(&source.policies, &mut problems);
        if let Some(schema) = &schema {
            let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
            for error in result.validation_errors() {
                let file = origins
                    .get(error.policy_id())
                    .copied()
                    .unwrap_or(source.schema);
                problems.extend(located(file, error));
            }
        }
        let data = match PolicyData::from_toml(source.data.text) {
            Ok(data) => {
                problems.extend(
                    data.problems()
                        .into_iter()
                        .map(|p| format!("{}: {p}", source.data.name)),
                );
                Some(data)
            }
            Err(e) if e.starts_with(|c: char| c.is_ascii_digit()) => {
                problems.push(format!("{}:{e}", source.data.name));
                None
            }
            Err(e) => {
                problems.push(format!("{}: {e}", source.data.name));
                None
            }
        };
        let content = match &data {
            Some(data) => match ContentRules::compile(&data.content) {
                Ok(rules) => Some(rules),
                Err(e) => {
                    problems.push(format!("{}: {e}", source.data.name));
                    None
                }
            },
            None => None,
        };
        let (Some(schema), Some(data), Some(content)) = (schema, data, content) else {
            return Err(PolicyError { problems });
        };
        if !problems.is_empty() {
            return Err(PolicyError { problems });
        }
        // Any mention, even in a comment-free string, counts: a false "yes" only means the
        // decision waits for tokenising.
        let token_counts = policies.policies().any(|p| {
            let text = p.to_string();
            text.contains("prompt_tokens") || text.contains("max_tokens")
        });
        let mut policy = Self {
            token_counts,
            schema,
            policies,
            data,
            content,
            authorizer: Authorizer::new(),
            types: EntityTypes::new(),
            base: Entities::empty(),
            counts,
        };
        match policy.base_entities() {
            Ok(base) => policy.base = base,
            Err(e) => problems.push(format!("{}: {e}", source.schema.name)),
        }
        problems.extend(
            policy
                .probe()
                .into_iter()
                .map(|p| format!("{}: {p}", source.schema.name)),
        );
        if problems.is_empty() {
            Ok(policy)
        } else {
            Err(PolicyError { problems })
        }
    }

    pub fn data(&self) -> &PolicyData {
        &self.data
    }

    /// Whether a policy may look at `context.prompt_tokens` or `context.max_tokens`. When
    /// none does, the decision made before the prompt is tokenised (with counts of 0) is the
    /// decision, and a refused request costs no tokenising, rendering or grammar compiling.
    pub fn decides_on_token_counts(&self) -> bool {
        self.token_counts
    }

    pub fn content(&self) -> &ContentRules {
        &self.content
    }

    /// Decides one request.
    pub fn decide(&self, request: &PolicyRequest<'_>) -> PolicyDecision {
        let department = self.data.department(request.department);
        let label = request
            .classification
            .or(department.classification.as_deref())
            .unwrap_or(self.data.lowest())
            .to_owned();
        let decision = |reason, policies| PolicyDecision {
            reason,
            classification: label.clone(),
            policies,
        };
        let Some(rank) = self.data.rank(&label) else {
            return decision(ReasonCode::UnknownClassification, Vec::new());
        };
        // A request that cannot be put to Cedar (facts the schema refuses) is not
        // permitted: the default outcome is "not allowed, no deciding policy".
        let (allowed, policies) = self
            .authorize(request, &label, rank, false)
            .unwrap_or_default();
        if !allowed {
            let reason = if policies.is_empty() {
                ReasonCode::NoPermit
            } else {
                ReasonCode::Forbidden
            };
            return decision(reason, policies);
        }
        let over = |ceiling: &Option<String>| {
            let ceiling = ceiling.as_deref().unwrap_or(self.data.lowest());
            self.data.rank(ceiling).is_none_or(|max| rank > max)
        };
        let model_over = request.model.is_some_and(|m| {
            over(&self.data.model(m.name).ceiling)
                || m.ceiling.is_some_and(|c| over(&Some(c.to_owned())))
        });
        if over(&department.ceiling) || model_over {
            return decision(ReasonCode::Classification, policies);
        }
        if let Some(detector) = &request.prompt_scan.denied_by {
            return decision(ReasonCode::Content(detector.clone()), policies);
        }
        decision(ReasonCode::Allow, policies)
    }

    /// Puts the request to Cedar: whether it is allowed, and the deciding policies.
    ///
    /// With `strict`, the entities and the request are checked against the schema (done once
    /// at load, on probe requests); per request they are built from the same code without
    /// the check, on top of the entities prepared at load.
    fn authorize(
        &self,
        request: &PolicyRequest<'_>,
        label: &str,
        rank: usize,
        strict: bool,
    ) -> Result<(bool, Vec<String>), String> {
        if request.department.contains(SUBJECT_SEPARATOR) {
            // Its principal's id would read as another department's subject.
            return Err(format!(
                "the department name {:?} holds {SUBJECT_SEPARATOR:?}",
                request.department
            ));
        }
        let entities = self.entities(request, strict).map_err(|e| e.to_string())?;
        let t = &self.types;
        let principal = subject_uid(t, request);
        let action = uid(&t.action, request.action.as_str());
        let resource = match request.model {
            Some(model) => uid(&t.model, model.name),
            None => uid(&t.appliance, "moat"),
        };
        let context = self
            .context(request, label, rank)
            .map_err(|e| e.to_string())?;
        let schema = strict.then_some(&self.schema);
        let cedar_request = Request::new(principal, action, resource, context, schema)
            .map_err(|e| e.to_string())?;
        let response = self
            .authorizer
            .is_authorized(&cedar_request, &self.policies, &entities);
        let policies = response
            .diagnostics()
            .reason()
            .map(PolicyId::to_string)
            .collect();
        Ok((response.decision() == Decision::Allow, policies))
    }

    fn entities(
        &self,
        request: &PolicyRequest<'_>,
        strict: bool,
    ) -> Result<Entities, Box<dyn std::error::Error>> {
        let t = &self.types;
        let department_uid = uid(&t.department, request.department);
        let mut entities = vec![Entity::new_no_attrs(
            subject_uid(t, request),
            HashSet::from([department_uid]),
        )];
        let tabled = self.data.departments.contains_key(request.department);
        if strict || !tabled {
            entities.push(self.department_entity(request.department)?);
        }
        match request.model {
            Some(model) => entities.push(self.model_entity(model)?),
            None if strict => entities.push(self.appliance_entity()),
            None => {}
        }
        if strict {
            return Entities::from_entities(entities, Some(&self.schema))
                .map_err(|e| diagnostic_text(&e).into());
        }
        Ok(self.base.clone().add_entities(entities, None)?)
    }

    fn department_entity(&self, name: &str) -> Result<Entity, Box<dyn std::error::Error>> {
        let data = &self.data;
        let ceiling = data
            .department(name)
            .ceiling
            .as_deref()
            .unwrap_or(data.lowest());
        Ok(Entity::new(
            uid(&self.types.department, name),
            ceiling_attrs(ceiling, data.rank(ceiling).unwrap_or(0)),
            HashSet::new(),
        )?)
    }

    fn appliance_entity(&self) -> Entity {
        Entity::new_no_attrs(uid(&self.types.appliance, "moat"), HashSet::new())
    }

    fn model_entity(&self, model: ModelFacts<'_>) -> Result<Entity, Box<dyn std::error::Error>> {
        let data = &self.data;
        let rules = data.model(model.name);
        let ceiling = rules.ceiling.as_deref().unwrap_or(data.lowest());
        let mut attrs = ceiling_attrs(ceiling, data.rank(ceiling).unwrap_or(0));
        let string = |s: &str| RestrictedExpression::new_string(s.to_owned());
        attrs.insert("name".into(), string(model.name));
        attrs.insert("task".into(), string(model.task));
        let version = match model.version {
            "" => rules.version.as_deref().unwrap_or_default(),
            served => served,
        };
        attrs.insert("version".into(), string(version));
        attrs.insert(
            "tags".into(),
            RestrictedExpression::new_set(rules.tags.iter().map(|t| string(t))),
        );
        Ok(Entity::new(
            uid(&self.types.model, model.name),
            attrs,
            HashSet::new(),
        )?)
    }

    /// The entities every request shares, built and checked against the schema once:
    /// departments with a table of their own, the appliance, and the schema's actions.
    fn base_entities(&self) -> Result<Entities, String> {
        let mut entities = vec![self.appliance_entity()];
        for name in self.data.departments.keys() {
            entities.push(self.department_entity(name).map_err(|e| e.to_string())?);
        }
        Entities::from_entities(entities, Some(&self.schema)).map_err(|e| e.to_string())
    }

    /// Puts one request of every action through the schema-checked path, so that a schema
    /// the requests do not fit is refused at load instead of denying everything later.
    fn probe(&self) -> Vec<String> {
        let scan = ContentScan::default();
        let department = self
            .data
            .departments
            .keys()
            .next()
            .map_or("probe-department", String::as_str);
        let lowest = self.data.lowest().to_owned();
        [
            PolicyAction::Chat,
            PolicyAction::Complete,
            PolicyAction::Embed,
            PolicyAction::ListModels,
        ]
        .into_iter()
        .filter_map(|action| {
            let request = PolicyRequest {
                department,
                subject: "probe-subject",
                action,
                model: (action != PolicyAction::ListModels).then_some(ModelFacts {
                    name: "probe-model",
                    task: "text-generation",
                    version: "",
                    ceiling: None,
                }),
                classification: None,
                source_ip: IpAddr::from([127, 0, 0, 1]),
                unix_time: 0,
                prompt_tokens: 0,
                max_tokens: 0,
                prompt_scan: &scan,
            };
            self.authorize(&request, &lowest, 0, true).err().map(|e| {
                format!(
                    "the schema does not fit the {} requests moatd builds: {e}",
                    action.as_str()
                )
            })
        })
        .collect()
    }

    fn context(
        &self,
        request: &PolicyRequest<'_>,
        label: &str,
        rank: usize,
    ) -> Result<Context, Box<dyn std::error::Error>> {
        let local = request.unix_time + i64::from(self.data.utc_offset_minutes) * 60;
        let days = local.div_euclid(86_400);
        let hour = local.rem_euclid(86_400) / 3_600;
        // 1970-01-01 was a Thursday (weekday 4).
        let weekday = (days + 3).rem_euclid(7) + 1;
        let long = |v: u64| RestrictedExpression::new_long(i64::try_from(v).unwrap_or(i64::MAX));
        let findings = request
            .prompt_scan
            .findings
            .iter()
            .map(|f| RestrictedExpression::new_string(f.detector.clone()));
        Ok(Context::from_pairs([
            (
                "classification".to_owned(),
                RestrictedExpression::new_string(label.to_owned()),
            ),
            ("classification_rank".to_owned(), long(rank as u64)),
            (
                "source_ip".to_owned(),
                RestrictedExpression::new_ip(request.source_ip.to_string()),
            ),
            ("hour".to_owned(), RestrictedExpression::new_long(hour)),
            (
                "weekday".to_owned(),
                RestrictedExpression::new_long(weekday),
            ),
            ("prompt_tokens".to_owned(), long(request.prompt_tokens)),
            ("max_tokens".to_owned(), long(request.max_tokens)),
            (
                "findings".to_owned(),
                RestrictedExpression::new_set(findings),
            ),
        ])?)
    }
}

/// A Cedar diagnostic's message with its help and related diagnostics.
fn diagnostic_text(error: &dyn miette::Diagnostic) -> String {
    let mut message = error.to_string();
    if let Some(help) = error.help() {
        message.push_str(&format!(" ({help})"));
    }
    if let Some(related) = error.related() {
        for inner in related {
            message.push_str(": ");
            message.push_str(&diagnostic_text(inner));
        }
    }
    message
}

fn ceiling_attrs(label: &str, rank: usize) -> HashMap<String, RestrictedExpression> {
    HashMap::from([
        (
            "ceiling".to_owned(),
            RestrictedExpression::new_long(rank as i64),
        ),
        (
            "ceiling_label".to_owned(),
            RestrictedExpression::new_string(label.to_owned()),
        ),
    ])
}

/// Parses every policy file, naming each policy by its `@id` annotation (or
/// `FILE#N`), and remembers which file each came from.
fn parse_policies<'a>(
    files: &[SourceFile<'a>],
    problems: &mut Vec<String>,
) -> (
    PolicySet,
    Vec<(String, usize)>,
    HashMap<PolicyId, SourceFile<'a>>,
) {
    let mut all = PolicySet::new();
    let mut counts = Vec::new();
    let mut origins = HashMap::new();
    for file in files {
        let parsed = match PolicySet::from_str(file.text) {
            Ok(parsed) => parsed,
            Err(e) => {
                problems.extend(located(*file, &e));
                continue;
            }
        };
        let mut count = 0;
        for (n, policy) in parsed.policies().enumerate() {
            let id = policy
                .annotation("id")
                .map_or_else(|| format!("{}#{n}", file.name), str::to_owned);
            let renamed = policy.new_id(PolicyId::new(&id));
            if let Err(e) = all.add(renamed) {
                problems.push(format!("{}: policy {id:?}: {e}", file.name));
                continue;
            }
            origins.insert(PolicyId::new(&id), *file);
            count += 1;
        }
        counts.push((file.name.to_owned(), count));
    }
    (all, counts, origins)
}

/// Messages for a Cedar diagnostic, each with `file:line:column` of its first label.
fn located(file: SourceFile<'_>, error: &dyn miette::Diagnostic) -> Vec<String> {
    let position = error
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| line_column(file.text, label.offset()));
    let mut message = error.to_string();
    if let Some(help) = error.help() {
        message.push_str(&format!(" ({help})"));
    }
    let related: Vec<String> = error
        .related()
        .map(|r| r.flat_map(|d| located(file, d)).collect())
        .unwrap_or_default();
    let head = match position {
        Some((line, column)) => format!("{}:{line}:{column}: {message}", file.name),
        None => format!("{}: {message}", file.name),
    };
    std::iter::once(head).chain(related).collect()
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}
