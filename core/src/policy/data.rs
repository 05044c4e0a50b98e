//! `moat-policy.toml`: the data rules beside the Cedar policies — the classification scale,
//! what each department and model may carry, content rules and per-department limits.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::content::ContentRuleConfig;
use super::limits::LimitsConfig;
use crate::audit::Retention;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyData {
    /// Classification labels, lowest first.
    #[serde(default = "default_scale")]
    pub classification: Vec<String>,
    /// Offset of the appliance's local time from UTC, for `context.hour` and `weekday`.
    #[serde(default)]
    pub utc_offset_minutes: i32,
    /// Departments without a table of their own.
    #[serde(default)]
    pub default_department: DepartmentRules,
    #[serde(default)]
    pub departments: BTreeMap<String, DepartmentRules>,
    /// Models without a table of their own.
    #[serde(default)]
    pub default_model: ModelRules,
    #[serde(default)]
    pub models: BTreeMap<String, ModelRules>,
    /// Limits of departments without limits of their own.
    #[serde(default)]
    pub default_limits: LimitsConfig,
    #[serde(default)]
    pub content: Vec<ContentRuleConfig>,
}

/// What a department sends by default and at most.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepartmentRules {
    /// Label of requests that state none (default: the lowest label).
    pub classification: Option<String>,
    /// Highest label it may send (default: the lowest label).
    pub ceiling: Option<String>,
    /// Its own limits instead of `default_limits`.
    pub limits: Option<LimitsConfig>,
    /// What the audit keeps of its prompts and answers: `none`, `sha256` (the default) or
    /// `full` (always encrypted to the auditors).
    pub retention: Option<Retention>,
}

/// What a model may be sent, and how policies see it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRules {
    /// Highest label it may be sent (default: the lowest label).
    pub ceiling: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Shown to policies as `resource.version` (bundles will supply it).
    pub version: Option<String>,
    /// A JSON schema every answer of the model must follow (written as a TOML table);
    /// requests are constrained to it whatever they ask.
    pub response_schema: Option<serde_json::Value>,
}

fn default_scale() -> Vec<String> {
    ["public", "internal", "confidential", "secret"]
        .map(str::to_owned)
        .to_vec()
}

impl PolicyData {
    /// Parses the TOML text. A department or model table inherits the fields it leaves out
    /// from `[default_department]` or `[default_model]`. Errors read `LINE:COLUMN: message`
    /// where the position is known.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let mut data: Self = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_owned();
            match e.span() {
                Some(span) => {
                    let before = text.get(..span.start).unwrap_or(text);
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                    format!("{line}:{column}: {message}")
                }
                None => message,
            }
        })?;
        data.inherit_defaults();
        Ok(data)
    }

    fn inherit_defaults(&mut self) {
        let department = self.default_department.clone();
        for rules in self.departments.values_mut() {
            if rules.classification.is_none() {
                rules.classification.clone_from(&department.classification);
            }
            if rules.ceiling.is_none() {
                rules.ceiling.clone_from(&department.ceiling);
            }
            if rules.retention.is_none() {
                rules.retention = department.retention;
            }
        }
        let model = self.default_model.clone();
        for rules in self.models.values_mut() {
            if rules.ceiling.is_none() {
                rules.ceiling.clone_from(&model.ceiling);
            }
            if rules.response_schema.is_none() {
                rules.response_schema.clone_from(&model.response_schema);
            }
        }
    }

    /// Everything wrong with the rules, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let scale = &self.classification;
        if scale.is_empty() {
            problems.push("classification must list at least one label".to_owned());
        }
        let mut seen = HashMap::new();
        for (i, label) in scale.iter().enumerate() {
            if !valid_label(label) {
                problems.push(format!(
                    "classification label {label:?} must be 1-32 characters of a-z, 0-9, '_', '-'"
                ));
            }
            if seen.insert(label.as_str(), i).is_some() {
                problems.push(format!("classification label {label:?} appears twice"));
            }
        }
        if !(-14 * 60..=14 * 60).contains(&self.utc_offset_minutes) {
            problems.push("utc_offset_minutes must be between -840 and 840".to_owned());
        }
        let mut check_label = |field: String, label: &Option<String>| {
            if let Some(label) = label
                && !scale.contains(label)
            {
                problems.push(format!(
                    "{field} is {label:?}, which is not on the classification scale {scale:?}"
                ));
            }
        };
        let departments =
            std::iter::once(("default_department".to_owned(), &self.default_department)).chain(
                self.departments
                    .iter()
                    .map(|(n, d)| (format!("departments.{n}"), d)),
            );
        let mut limit_problems = self.default_limits.problems("default_limits");
        let mut above_ceiling = Vec::new();
        for (field, rules) in departments {
            check_label(format!("{field}.classification"), &rules.classification);
            check_label(format!("{field}.ceiling"), &rules.ceiling);
            let rank = |label: &Option<String>| {
                scale
                    .iter()
                    .position(|l| Some(l) == label.as_ref())
                    .unwrap_or(0)
            };
            if rank(&rules.classification) > rank(&rules.ceiling) {
                // Every request stating no label would be refused.
                above_ceiling.push(format!(
                    "{field}.classification is above its ceiling: requests without a label would all be refused"
                ));
            }
            if let Some(limits) = &rules.limits {
                limit_problems.extend(limits.problems(&format!("{field}.limits")));
            }
        }
        let models = std::iter::once(("default_model".to_owned(), &self.default_model))
            .chain(self.models.iter().map(|(n, m)| (format!("models.{n}"), m)));
        for (field, rules) in models {
            check_label(format!("{field}.ceiling"), &rules.ceiling);
        }
        problems.extend(above_ceiling);
        problems.extend(limit_problems);
        problems
    }

    /// Rank of a label on the scale (0 = lowest).
    pub fn rank(&self, label: &str) -> Option<usize> {
        self.classification.iter().position(|l| l == label)
    }

    /// The rules of a department: its own table, or the default.
    /// What the audit keeps of a department's prompts and answers.
    pub fn retention(&self, department: &str) -> Retention {
        self.department(department).retention.unwrap_or_default()
    }

    pub fn department(&self, name: &str) -> &DepartmentRules {
        self.departments
            .get(name)
            .unwrap_or(&self.default_department)
    }

    /// The rules of a model: its own table, or the default.
    pub fn model(&self, name: &str) -> &ModelRules {
        self.models.get(name).unwrap_or(&self.default_model)
    }

    /// Limits per department that has its own.
    pub fn department_limits(&self) -> HashMap<String, LimitsConfig> {
        self.departments
            .iter()
            .filter_map(|(name, rules)| rules.limits.map(|l| (name.clone(), l)))
            .collect()
    }

    /// The lowest label (the default for everything unset).
    pub fn lowest(&self) -> &str {
        self.classification.first().map_or("", String::as_str)
    }
}

fn valid_label(label: &str) -> bool {
    (1..=32).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
