//! Content rules: detectors for sensitive data in prompts and answers, and what to do when
//! they fire.
//!
//! Admins write rules as `[[content]]` tables of the policy file ([`ContentRuleConfig`]).
//! [`ContentRules::compile`] checks them all at once and builds the detectors; each prompt
//! and answer then goes through [`ContentRules::scan`] (which rules fired, how often, and
//! whether one denies) and [`ContentRules::redact`] (the text with matches replaced).
//!
//! Detectors, by the name their findings and reason codes carry:
//! - `card_number`: 13 to 19 digits, bare or grouped by single spaces or hyphens, starting
//!   with 2 to 6 and passing the Luhn check;
//! - `iban`: an IBAN of a registry country, of that country's length, compact or in groups
//!   of four, passing the mod-97 check; upper or lower case;
//! - `email`: `local@domain.tld` in ASCII, the domain holding a dot and ending in a
//!   top-level domain of two or more letters (so not `user@localhost`);
//! - `secret_marking`: the rule's `markings` (or [`DEFAULT_MARKINGS`]) as whole words,
//!   case-sensitive;
//! - a `regex` rule's `name`: its `pattern`, counted per non-overlapping, non-empty match.
//!
//! Card numbers, IBANs and markings that start or end with a letter or digit must not be
//! glued to another letter, digit or underscore there; a `regex` rule's pattern says itself
//! what may surround it. Every detector scans in time linear in the text: the built-in ones
//! are hand-written single passes that look closer only where a cheap test passes (a digit;
//! two letters and two digits; an `@`), the others run on the `regex` crate's automata.
//!
//! Findings carry a detector name, a count and the rule's action, never the matched text:
//! they go to the audit log and into the policy context.

mod card;
mod compile;
mod detector;
mod email;
mod iban;
mod marking;
mod redact;
mod stream;
mod text;

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;

pub use compile::{
    BUILT_IN_DETECTORS, ContentRuleError, InvalidRule, MAX_NAME_LEN, PATTERN_SIZE_LIMIT,
    RuleProblem,
};
use detector::Detector;
pub use marking::DEFAULT_MARKINGS;
pub use stream::{AnswerStream, Withheld};

/// The most rounds of replacement [`ContentRules::redact`] makes.
pub const MAX_REDACTION_PASSES: usize = 4;

/// Where a rule looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// What the client sends: the prompt or the input to embed.
    Prompt,
    /// What the model produces.
    Answer,
    /// Both.
    #[default]
    Both,
}

/// What a firing rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentAction {
    /// Nothing but record the finding.
    Allow,
    /// Replace the matches, in the text the model sees and in the audit log.
    Redact,
    /// Replace the matches in the audit log only; the model sees them.
    RedactInAudit,
    /// Refuse the request.
    Deny,
}

/// Who a redacted text is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The model (or the client, for answers): `redact` rules apply.
    Inference,
    /// The audit log: `redact`, `redact_in_audit` and `deny` rules apply.
    Audit,
}

/// One rule as written in the policy file (TOML, `[[content]]` tables), e.g.
///
/// ```toml
/// [[content]]
/// detector = "card_number"
/// action = "deny"
///
/// [[content]]
/// detector = "regex"
/// name = "project_codename"
/// pattern = '(?i)\bproject\s+falcon\b'
/// action = "redact"
/// applies_to = "prompt"
///
/// [[content]]
/// detector = "secret_marking"
/// markings = ["TOP SECRET", "SECRET//NOFORN"]
/// action = "deny"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentRuleConfig {
    /// `card_number`, `iban`, `email`, `secret_marking` or `regex`.
    pub detector: String,
    /// The name of a `regex` rule: 1 to [`MAX_NAME_LEN`] characters of `a-z`, `0-9`, `_`.
    /// Only `regex` rules take one; the others are named after their detector.
    pub name: Option<String>,
    /// The pattern of a `regex` rule, in the syntax of the `regex` crate.
    pub pattern: Option<String>,
    /// The markings of a `secret_marking` rule; [`DEFAULT_MARKINGS`] when absent.
    pub markings: Option<Vec<String>>,
    /// What happens when the rule fires.
    pub action: ContentAction,
    /// Where the rule looks; both directions when absent.
    #[serde(default)]
    pub applies_to: Direction,
}

/// Compiled content rules, ready to scan texts. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ContentRules {
    rules: Arc<[CompiledRule]>,
}

// Every request thread scans with the same compiled rules: this stops compiling if they
// could not be shared.
const _: () = {
    const fn shared<T: Send + Sync + Clone + std::fmt::Debug>() {}
    shared::<ContentRules>();
};

/// One compiled rule.
#[derive(Debug)]
struct CompiledRule {
    name: String,
    detector: Detector,
    action: ContentAction,
    applies_to: Direction,
}

/// One rule that fired on a text. It says how often, never what matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The detector's stable name: `card_number`, `iban`, `email`, `secret_marking`, or a
    /// `regex` rule's name.
    pub detector: String,
    /// How many matches, at least 1.
    pub count: usize,
    /// The action of the rule.
    pub action: ContentAction,
}

/// What the rules found in one text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContentScan {
    /// One entry per rule that fired, in rule order.
    pub findings: Vec<Finding>,
    /// The detector name of the first rule, in rule order, with action `deny` that fired.
    pub denied_by: Option<String>,
}

impl Direction {
    /// Whether a rule that applies to `self` looks at a text of `direction`; a text of
    /// direction `Both` is looked at by every rule.
    fn covers(self, direction: Direction) -> bool {
        self == Direction::Both || direction == Direction::Both || self == direction
    }
}

impl Purpose {
    fn redacts(self, action: ContentAction) -> bool {
        match self {
            Purpose::Inference => action == ContentAction::Redact,
            // What a deny rule refused is not kept either, even encrypted: the finding and
            // the reason code say what happened.
            Purpose::Audit => matches!(
                action,
                ContentAction::Redact | ContentAction::RedactInAudit | ContentAction::Deny
            ),
        }
    }
}

impl ContentRules {
    /// Checks and builds `rules`. On error, every problem of every rule is reported, each
    /// with the rule's index.
    pub fn compile(rules: &[ContentRuleConfig]) -> Result<ContentRules, ContentRuleError> {
        let rules = compile::compile_rules(rules)?;
        Ok(ContentRules {
            rules: rules.into(),
        })
    }

    /// No rules: nothing is ever found.
    pub fn empty() -> ContentRules {
        ContentRules {
            rules: Vec::new().into(),
        }
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The findings of every rule that applies to `direction` (`Prompt` or `Answer`; `Both`
    /// runs every rule), in rule order, and the first `deny` rule that fired.
    pub fn scan(&self, text: &str, direction: Direction) -> ContentScan {
        let mut scan = ContentScan::default();
        for rule in self.rules_for(direction) {
            let count = rule.detector.find_iter(text).count();
            if count == 0 {
                continue;
            }
            if rule.action == ContentAction::Deny && scan.denied_by.is_none() {
                scan.denied_by = Some(rule.name.clone());
            }
            scan.findings.push(Finding {
                detector: rule.name.clone(),
                count,
                action: rule.action,
            });
        }
        scan
    }

    /// `text` with the matches of the rules that apply to `direction` and whose action
    /// `purpose` asks for replaced by `[REDACTED:<detector name>]`: for
    /// [`Purpose::Inference`] the `redact` rules, for [`Purpose::Audit`] the `redact`,
    /// `redact_in_audit` and `deny` rules. Overlapping matches are replaced together, named after the
    /// one that starts first (the longer, then the earlier rule, where two start together).
    /// Everything between matches is kept as it was.
    ///
    /// Removing a match can bring another to light (a card number that follows an IBAN
    /// with a dot between them reads as a fraction until the IBAN is gone), so the result
    /// is searched again, at most [`MAX_REDACTION_PASSES`] times in all, until no rule finds
    /// anything outside the replacements. Matches overlapping a replacement are left alone:
    /// a rule whose pattern matches (part of) its own replacement would otherwise nest them.
    /// With the built-in detectors, the result holds nothing any of them would find.
    ///
    /// Returns `Cow::Borrowed(text)` when nothing matched.
    pub fn redact<'t>(
        &self,
        text: &'t str,
        direction: Direction,
        purpose: Purpose,
    ) -> Cow<'t, str> {
        let whole = redact::Window {
            from: 0,
            upto: text.len(),
        };
        match self.redact_window(text, direction, purpose, whole) {
            Ok(None) => Cow::Borrowed(text),
            Ok(Some(redacted)) => Cow::Owned(redacted.text),
            // No match ends past the end of the text; were one ever to, nothing unchecked
            // leaves.
            Err(redact::Crossed) => Cow::Owned(String::new()),
        }
    }

    /// [`ContentRules::redact`] of the matches that start in `window` (from `window.from`;
    /// the text before it is context), with where `window.upto` lands in the result.
    /// `Err` when a match, in any round, crosses `window.upto`.
    fn redact_window(
        &self,
        text: &str,
        direction: Direction,
        purpose: Purpose,
        window: redact::Window,
    ) -> Result<Option<redact::Redacted>, redact::Crossed> {
        let rules = || {
            self.rules_for(direction)
                .filter(|rule| purpose.redacts(rule.action))
        };
        let Some(mut redacted) = redact::redact_pass(rules(), text, &[], window)? else {
            return Ok(None);
        };
        for _ in 1..MAX_REDACTION_PASSES {
            let window = redact::Window {
                from: window.from,
                upto: redacted.upto,
            };
            match redact::redact_pass(rules(), &redacted.text, &redacted.tokens, window)? {
                Some(again) => redacted = again,
                None => break,
            }
        }
        Ok(Some(redacted))
    }

    fn rules_for(&self, direction: Direction) -> impl Iterator<Item = &CompiledRule> {
        self.rules
            .iter()
            .filter(move |rule| rule.applies_to.covers(direction))
    }
}

#[cfg(test)]
mod tests;
