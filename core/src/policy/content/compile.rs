//! Checking content rules as written and building their detectors.

use std::fmt;

use regex::RegexBuilder;
use thiserror::Error;

use super::detector::{Detector, RegexDetector};
use super::marking::{DEFAULT_MARKINGS, marking_pattern};
use super::{CompiledRule, ContentRuleConfig, Direction};

/// The detectors built into moat, by the name their rules and findings carry.
pub const BUILT_IN_DETECTORS: [&str; 4] = ["card_number", "iban", "email", "secret_marking"];

/// The detector whose rules bring their own pattern.
const REGEX_DETECTOR: &str = "regex";

/// The most memory, in bytes, one compiled pattern (a `regex` rule's, or a
/// `secret_marking` rule's list) may take. Patterns past it tend to be slow to search too.
pub const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// The longest name a `regex` rule may have.
pub const MAX_NAME_LEN: usize = 48;

/// Everything wrong with a list of content rules, rule by rule.
#[derive(Debug, Clone, PartialEq, Error)]
pub struct ContentRuleError {
    /// Every problem found, in rule order; never empty.
    pub problems: Vec<InvalidRule>,
}

/// One problem with one content rule.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("content rule {index}: {problem}")]
pub struct InvalidRule {
    /// The rule's position in the list (the `[[content]]` tables), counting from 0.
    pub index: usize,
    /// What is wrong with it.
    pub problem: RuleProblem,
}

/// What can be wrong with a content rule.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RuleProblem {
    /// `detector` names no detector.
    #[error("unknown detector `{0}`; expected card_number, iban, email, secret_marking or regex")]
    UnknownDetector(String),
    /// A field was given that the rule's detector does not use.
    #[error("`{field}` has no meaning for the {detector} detector; remove it")]
    FieldNotUsed {
        /// The field: `name`, `pattern` or `markings`.
        field: &'static str,
        /// The rule's detector.
        detector: &'static str,
    },
    /// A `regex` rule without `name`.
    #[error("a regex rule needs a `name`, which its findings and reason codes carry")]
    MissingName,
    /// A `regex` rule without `pattern`.
    #[error("a regex rule needs a `pattern`")]
    MissingPattern,
    /// The name is not 1 to [`MAX_NAME_LEN`] characters of `a-z`, `0-9` and `_`.
    #[error("name `{0}` must be 1 to 48 characters of a-z, 0-9 and _")]
    InvalidName(String),
    /// The name is a built-in detector's.
    #[error("name `{0}` is the name of a built-in detector; choose another")]
    ReservedName(String),
    /// Another rule for an overlapping direction has the same name, so their findings could
    /// not be told apart. Two rules of one built-in detector are fine when one applies to
    /// prompts and the other to answers.
    #[error(
        "`{name}` is also the name of content rule {first}, which applies to the same direction"
    )]
    DuplicateName {
        /// The shared name.
        name: String,
        /// The index of the earlier rule with that name.
        first: usize,
    },
    /// The pattern does not parse.
    #[error("invalid pattern: {0}")]
    InvalidPattern(regex::Error),
    /// The pattern (or list of markings) compiles to more than [`PATTERN_SIZE_LIMIT`] bytes.
    #[error("the pattern compiles to more than {limit} bytes; make it smaller")]
    PatternTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The pattern matches the empty text, so it says nothing about a text.
    #[error("the pattern matches the empty text; it must require at least one character")]
    PatternMatchesEmpty,
    /// `markings` is an empty list.
    #[error("`markings` is empty; leave it out to use the default markings")]
    EmptyMarkings,
    /// One of `markings` is empty or only whitespace.
    #[error("marking {position} is blank")]
    BlankMarking {
        /// Its position in `markings`, counting from 0.
        position: usize,
    },
}

impl fmt::Display for ContentRuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Checks every rule, and builds them all when none has a problem.
pub(super) fn compile_rules(
    configs: &[ContentRuleConfig],
) -> Result<Vec<CompiledRule>, ContentRuleError> {
    let mut problems = Vec::new();
    let mut rules = Vec::with_capacity(configs.len());
    let mut names: Vec<(usize, &str, Direction)> = Vec::new();
    for (index, config) in configs.iter().enumerate() {
        let mut report = |problem| problems.push(InvalidRule { index, problem });
        let name = rule_name(config, &mut report);
        let detector = rule_detector(config, &mut report);
        let Some(name) = name else { continue };
        let earlier = names
            .iter()
            .find(|(_, other, applies_to)| *other == name && applies_to.covers(config.applies_to));
        if let Some(&(first, _, _)) = earlier {
            report(RuleProblem::DuplicateName {
                name: name.to_owned(),
                first,
            });
        }
        names.push((index, name, config.applies_to));
        if let Some(detector) = detector {
            rules.push(CompiledRule {
                name: name.to_owned(),
                detector,
                action: config.action,
                applies_to: config.applies_to,
            });
        }
    }
    if problems.is_empty() {
        Ok(rules)
    } else {
        Err(ContentRuleError { problems })
    }
}

/// The name the rule's findings carry, if it has a valid one.
fn rule_name<'c>(
    config: &'c ContentRuleConfig,
    report: &mut impl FnMut(RuleProblem),
) -> Option<&'c str> {
    if config.detector != REGEX_DETECTOR {
        let built_in = BUILT_IN_DETECTORS.iter().find(|d| **d == config.detector)?;
        if config.name.is_some() {
            report(RuleProblem::FieldNotUsed {
                field: "name",
                detector: built_in,
            });
        }
        return Some(built_in);
    }
    let Some(name) = config.name.as_deref() else {
        report(RuleProblem::MissingName);
        return None;
    };
    if !is_valid_name(name) {
        report(RuleProblem::InvalidName(name.to_owned()));
        None
    } else if BUILT_IN_DETECTORS.contains(&name) {
        report(RuleProblem::ReservedName(name.to_owned()));
        None
    } else {
        Some(name)
    }
}

fn is_valid_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The rule's detector, if the fields for it are all there and sound.
fn rule_detector(
    config: &ContentRuleConfig,
    report: &mut impl FnMut(RuleProblem),
) -> Option<Detector> {
    let Some(detector) = BUILT_IN_DETECTORS
        .into_iter()
        .chain([REGEX_DETECTOR])
        .find(|d| *d == config.detector)
    else {
        report(RuleProblem::UnknownDetector(config.detector.clone()));
        return None;
    };
    if config.pattern.is_some() && detector != REGEX_DETECTOR {
        report(RuleProblem::FieldNotUsed {
            field: "pattern",
            detector,
        });
    }
    if config.markings.is_some() && detector != "secret_marking" {
        report(RuleProblem::FieldNotUsed {
            field: "markings",
            detector,
        });
    }
    match detector {
        "card_number" => Some(Detector::CardNumber),
        "iban" => Some(Detector::Iban),
        "email" => Some(Detector::Email),
        "secret_marking" => markings_detector(config.markings.as_deref(), report),
        _ => pattern_detector(config.pattern.as_deref(), report),
    }
}

fn markings_detector(
    markings: Option<&[String]>,
    report: &mut impl FnMut(RuleProblem),
) -> Option<Detector> {
    let pattern = match markings {
        None => marking_pattern(&DEFAULT_MARKINGS),
        Some([]) => {
            report(RuleProblem::EmptyMarkings);
            return None;
        }
        Some(markings) => {
            let blank: Vec<usize> = (0..markings.len())
                .filter(|&i| markings[i].trim().is_empty())
                .collect();
            for &position in &blank {
                report(RuleProblem::BlankMarking { position });
            }
            if !blank.is_empty() {
                return None;
            }
            marking_pattern(markings)
        }
    };
    build_regex(&pattern)
        .map_err(report)
        .ok()
        .map(Detector::SecretMarking)
}

fn pattern_detector(
    pattern: Option<&str>,
    report: &mut impl FnMut(RuleProblem),
) -> Option<Detector> {
    let Some(pattern) = pattern else {
        report(RuleProblem::MissingPattern);
        return None;
    };
    let detector = build_regex(pattern).map_err(&mut *report).ok()?;
    if detector.matches_empty_text() {
        report(RuleProblem::PatternMatchesEmpty);
        return None;
    }
    Some(Detector::Pattern(detector))
}

/// The pattern built for scanning (from any place in a text, with the text before it as
/// context) and for streamed answers. It is parsed by the `regex` crate first: its errors
/// are the ones admins are shown.
fn build_regex(pattern: &str) -> Result<RegexDetector, RuleProblem> {
    RegexBuilder::new(pattern)
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|error| match error {
            regex::Error::CompiledTooBig(limit) => RuleProblem::PatternTooLarge { limit },
            other => RuleProblem::InvalidPattern(other),
        })?;
    RegexDetector::new(pattern, PATTERN_SIZE_LIMIT).ok_or(RuleProblem::PatternTooLarge {
        limit: PATTERN_SIZE_LIMIT,
    })
}

#[cfg(test)]
mod tests {
    use super::super::ContentAction;
    use super::*;

    fn rule(detector: &str) -> ContentRuleConfig {
        ContentRuleConfig {
            detector: detector.to_owned(),
            name: None,
            pattern: None,
            markings: None,
            action: ContentAction::Deny,
            applies_to: Direction::Both,
        }
    }

    fn regex_rule(name: &str, pattern: &str) -> ContentRuleConfig {
        ContentRuleConfig {
            name: Some(name.to_owned()),
            pattern: Some(pattern.to_owned()),
            ..rule("regex")
        }
    }

    fn problems(configs: &[ContentRuleConfig]) -> Vec<(usize, RuleProblem)> {
        let error = compile_rules(configs).expect_err("rules are rejected");
        error
            .problems
            .into_iter()
            .map(|p| (p.index, p.problem))
            .collect()
    }

    #[test]
    fn accepts_every_detector() {
        let rules = compile_rules(&[
            rule("card_number"),
            rule("iban"),
            rule("email"),
            ContentRuleConfig {
                applies_to: Direction::Answer,
                ..rule("secret_marking")
            },
            ContentRuleConfig {
                markings: Some(vec!["EYES ONLY".to_owned()]),
                applies_to: Direction::Prompt,
                ..rule("secret_marking")
            },
            regex_rule("project_codename_2", r"(?i)\bproject\s+falcon\b"),
        ])
        .expect("rules compile");
        let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "card_number",
                "iban",
                "email",
                "secret_marking",
                "secret_marking",
                "project_codename_2"
            ]
        );
    }

    #[test]
    fn reports_every_bad_rule_at_once() {
        let found = problems(&[
            rule("card_number"),
            rule("phone_number"),
            rule("regex"),
            regex_rule("Bad-Name", "x"),
            regex_rule("email", "x"),
            regex_rule("unclosed", "(abc"),
            regex_rule("anything", "a*"),
            ContentRuleConfig {
                markings: Some(vec![]),
                applies_to: Direction::Prompt,
                ..rule("secret_marking")
            },
            ContentRuleConfig {
                markings: Some(vec!["OK".to_owned(), "  ".to_owned()]),
                applies_to: Direction::Answer,
                ..rule("secret_marking")
            },
            ContentRuleConfig {
                name: Some("cards".to_owned()),
                pattern: Some("x".to_owned()),
                markings: Some(vec!["X".to_owned()]),
                ..rule("iban")
            },
            regex_rule("huge", r"\w{1000}\w{1000}\w{1000}"),
            regex_rule("unclosed", "abc"),
        ]);
        let kinds: Vec<(usize, &str)> = found
            .iter()
            .map(|(index, problem)| (*index, variant(problem)))
            .collect();
        assert_eq!(
            kinds,
            [
                (1, "UnknownDetector"),
                (2, "MissingName"),
                (2, "MissingPattern"),
                (3, "InvalidName"),
                (4, "ReservedName"),
                (5, "InvalidPattern"),
                (6, "PatternMatchesEmpty"),
                (7, "EmptyMarkings"),
                (8, "BlankMarking"),
                (9, "FieldNotUsed"),
                (9, "FieldNotUsed"),
                (9, "FieldNotUsed"),
                (10, "PatternTooLarge"),
                (11, "DuplicateName"),
            ]
        );
        assert_eq!(found[8].1, RuleProblem::BlankMarking { position: 1 });
        assert_eq!(
            found[13].1,
            RuleProblem::DuplicateName {
                name: "unclosed".to_owned(),
                first: 5
            }
        );
    }

    fn variant(problem: &RuleProblem) -> &'static str {
        match problem {
            RuleProblem::UnknownDetector(_) => "UnknownDetector",
            RuleProblem::FieldNotUsed { .. } => "FieldNotUsed",
            RuleProblem::MissingName => "MissingName",
            RuleProblem::MissingPattern => "MissingPattern",
            RuleProblem::InvalidName(_) => "InvalidName",
            RuleProblem::ReservedName(_) => "ReservedName",
            RuleProblem::DuplicateName { .. } => "DuplicateName",
            RuleProblem::InvalidPattern(_) => "InvalidPattern",
            RuleProblem::PatternTooLarge { .. } => "PatternTooLarge",
            RuleProblem::PatternMatchesEmpty => "PatternMatchesEmpty",
            RuleProblem::EmptyMarkings => "EmptyMarkings",
            RuleProblem::BlankMarking { .. } => "BlankMarking",
        }
    }

    #[test]
    fn names_are_short_lowercase_words() {
        assert!(is_valid_name("a"));
        assert!(is_valid_name("project_falcon_2"));
        assert!(is_valid_name(&"x".repeat(MAX_NAME_LEN)));
        for name in [
            "",
            "Falcon",
            "pro-ject",
            "pro ject",
            "prôject",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(!is_valid_name(name), "{name:?}");
        }
    }

    #[test]
    fn one_name_may_serve_prompts_and_answers_separately() {
        let split = [
            ContentRuleConfig {
                applies_to: Direction::Prompt,
                ..rule("email")
            },
            ContentRuleConfig {
                applies_to: Direction::Answer,
                ..rule("email")
            },
        ];
        assert!(compile_rules(&split).is_ok());
        let overlapping = [
            ContentRuleConfig {
                applies_to: Direction::Prompt,
                ..rule("email")
            },
            rule("email"),
        ];
        assert_eq!(
            problems(&overlapping),
            [(
                1,
                RuleProblem::DuplicateName {
                    name: "email".to_owned(),
                    first: 0
                }
            )]
        );
    }

    #[test]
    fn the_message_names_each_rule_and_what_to_do() {
        let error = compile_rules(&[rule("card_number"), rule("phone"), rule("regex")])
            .expect_err("rules are rejected");
        let message = error.to_string();
        assert!(
            message.starts_with("content rule 1: unknown detector `phone`"),
            "{message}"
        );
        assert!(
            message.contains("; content rule 2: a regex rule needs a `name`"),
            "{message}"
        );
        assert!(
            message.contains("content rule 2: a regex rule needs a `pattern`"),
            "{message}"
        );
        let invalid = compile_rules(&[regex_rule("bad", "(abc")]).expect_err("rejected");
        assert!(invalid.to_string().contains("unclosed group"), "{invalid}");
    }
}
