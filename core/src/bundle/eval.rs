//! A bundle's evaluation set, `eval.jsonl`: prompts with the answer a good version gives,
//! and the rule that scores an answer.
//!
//! Golden prompts gate whether a version may serve at all; an evaluation set measures how
//! well it serves, so that `moatctl model promote` can refuse a canary that scores below the
//! version it would replace, on the same prompts, on the node (no prompt or answer leaves
//! it). One JSON object per line:
//!
//! ```json
//! {"prompt": "What is the capital of France?", "expect": "The capital of France is Paris."}
//! {"prompt": "Name a French city.", "expect": "Paris", "rule": "contains", "max_tokens": 16}
//! {"prompt": "Invoice total?", "pattern": "^[0-9]+\\.[0-9]{2} EUR$"}
//! {"prompt": "As JSON: ...", "schema": {"type": "object", "required": ["total"]}, "expect_json": {"total": 12}}
//! ```
//!
//! Scoring: `expect` compares the answer with surrounding whitespace trimmed, exactly (`rule`
//! `exact`, the default) or as a substring (`contains`); `pattern` is a regular expression
//! the whole trimmed answer must match; `schema` is a JSON Schema the answer, parsed as JSON,
//! must satisfy, and with `expect_json` it must also equal that value. `pattern` and `schema`
//! items also count towards format validity, whether or not their content is right.

use serde::Deserialize;

/// The file in a bundle (and in a model directory before packing).
pub const EVAL_FILE: &str = "eval.jsonl";
/// Most items one set may hold: promotion runs it twice.
pub const MAX_EVAL_ITEMS: usize = 1000;
/// Largest `eval.jsonl` read.
pub const MAX_EVAL_BYTES: u64 = 4 << 20;
/// Longest answer one item may ask for.
pub const MAX_EVAL_TOKENS: usize = 1024;
/// Answer length when an item does not say.
pub const DEFAULT_EVAL_TOKENS: usize = 64;
/// Compiled size bound for a pattern (the `regex` crate's default is 10 MiB).
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// How an answer is scored.
#[derive(Debug, Clone)]
pub enum Scoring {
    /// The trimmed answer equals this text.
    Exact(String),
    /// The trimmed answer contains this text.
    Contains(String),
    /// The whole trimmed answer matches (anchored at both ends).
    Pattern(regex::Regex),
    /// The answer parses as JSON and satisfies the schema (compiled by whoever runs the
    /// set); with `expect`, it also equals that value.
    Schema {
        schema: serde_json::Value,
        expect: Option<serde_json::Value>,
    },
}

impl Scoring {
    /// Whether this item says something about the answer's format.
    pub fn checks_format(&self) -> bool {
        matches!(self, Scoring::Pattern(_) | Scoring::Schema { .. })
    }
}

/// One item of an evaluation set.
#[derive(Debug, Clone)]
pub struct EvalItem {
    /// The user message (chat bundles) or the text to continue (completion bundles).
    pub prompt: String,
    pub max_tokens: usize,
    pub scoring: Scoring,
}

/// Why an evaluation set was refused; line numbers count from 1.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EvalError {
    #[error("{EVAL_FILE} is larger than {MAX_EVAL_BYTES} bytes")]
    TooLarge,
    #[error("{EVAL_FILE} is not UTF-8")]
    NotUtf8,
    #[error("{EVAL_FILE} has no items")]
    Empty,
    #[error("{EVAL_FILE} has more than {MAX_EVAL_ITEMS} items")]
    TooMany,
    #[error("{EVAL_FILE} line {line}: {reason}")]
    Line { line: usize, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalLine {
    prompt: String,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    expect: Option<String>,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    schema: Option<serde_json::Value>,
    #[serde(default)]
    expect_json: Option<serde_json::Value>,
}

fn scoring(line: EvalLine) -> Result<Scoring, String> {
    let rule = line.rule.as_deref();
    match (line.expect, line.pattern, line.schema) {
        (Some(text), None, None) => match rule {
            None | Some("exact") => Ok(Scoring::Exact(text.trim().to_owned())),
            Some("contains") => Ok(Scoring::Contains(text)),
            Some(other) => Err(format!(
                "rule {other:?} is not one of \"exact\" and \"contains\""
            )),
        },
        (None, Some(pattern), None) if rule.is_none() => {
            regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
                .size_limit(PATTERN_SIZE_LIMIT)
                .build()
                .map(Scoring::Pattern)
                .map_err(|e| format!("pattern: {e}"))
        }
        (None, None, Some(schema)) if rule.is_none() => {
            if !schema.is_object() && !schema.is_boolean() {
                return Err("schema must be a JSON Schema (an object or a boolean)".into());
            }
            Ok(Scoring::Schema {
                schema,
                expect: line.expect_json,
            })
        }
        (None, None, None) => Err("set one of expect, pattern and schema".into()),
        (_, _, _) if rule.is_some() => Err("rule goes with expect only".into()),
        _ => Err("set only one of expect, pattern and schema".into()),
    }
}

/// Parses and validates the bytes of an `eval.jsonl`. Blank lines are skipped.
pub fn parse(bytes: &[u8]) -> Result<Vec<EvalItem>, EvalError> {
    if bytes.len() as u64 > MAX_EVAL_BYTES {
        return Err(EvalError::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| EvalError::NotUtf8)?;
    let mut items = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let fail = |reason: String| EvalError::Line {
            line: index + 1,
            reason,
        };
        let line: EvalLine = serde_json::from_str(raw).map_err(|e| fail(e.to_string()))?;
        if line.expect_json.is_some() && line.schema.is_none() {
            return Err(fail("expect_json goes with schema only".into()));
        }
        if line.prompt.trim().is_empty() {
            return Err(fail("prompt is empty".into()));
        }
        let max_tokens = line.max_tokens.unwrap_or(DEFAULT_EVAL_TOKENS);
        if !(1..=MAX_EVAL_TOKENS).contains(&max_tokens) {
            return Err(fail(format!(
                "max_tokens must be between 1 and {MAX_EVAL_TOKENS}"
            )));
        }
        let prompt = line.prompt.clone();
        let scoring = scoring(line).map_err(fail)?;
        if items.len() == MAX_EVAL_ITEMS {
            return Err(EvalError::TooMany);
        }
        items.push(EvalItem {
            prompt,
            max_tokens,
            scoring,
        });
    }
    if items.is_empty() {
        return Err(EvalError::Empty);
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_parses() {
        let items = parse(
            br#"{"prompt": "a", "expect": " Paris. "}

{"prompt": "b", "expect": "Paris", "rule": "contains", "max_tokens": 8}
{"prompt": "c", "pattern": "[0-9]+ EUR"}
{"prompt": "d", "schema": {"type": "object"}, "expect_json": {"total": 1}}
"#,
        )
        .expect("parses");
        assert_eq!(items.len(), 4);
        assert!(matches!(&items[0].scoring, Scoring::Exact(t) if t == "Paris."));
        assert_eq!(items[0].max_tokens, DEFAULT_EVAL_TOKENS);
        assert_eq!(items[1].max_tokens, 8);
        let Scoring::Pattern(pattern) = &items[2].scoring else {
            panic!("a pattern");
        };
        // Anchored: the whole answer must match, not a part of it.
        assert!(pattern.is_match("12 EUR") && !pattern.is_match("about 12 EUR"));
        assert!(items[3].scoring.checks_format() && !items[1].scoring.checks_format());
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        for (text, reason) in [
            (r#"{"prompt": "a"}"#, "set one of"),
            (
                r#"{"prompt": "a", "expect": "x", "pattern": "y"}"#,
                "only one",
            ),
            (
                r#"{"prompt": "a", "expect": "x", "rule": "fuzzy"}"#,
                "fuzzy",
            ),
            (
                r#"{"prompt": "a", "pattern": "(", "rule": "exact"}"#,
                "rule goes",
            ),
            (r#"{"prompt": "a", "pattern": "("}"#, "pattern"),
            (r#"{"prompt": "a", "schema": 3}"#, "JSON Schema"),
            (
                r#"{"prompt": "a", "expect": "x", "expect_json": 1}"#,
                "schema only",
            ),
            (r#"{"prompt": " ", "expect": "x"}"#, "empty"),
            (
                r#"{"prompt": "a", "expect": "x", "max_tokens": 0}"#,
                "max_tokens",
            ),
            (
                r#"{"prompt": "a", "expect": "x", "extra": 1}"#,
                "unknown field",
            ),
            ("not json", "expected"),
        ] {
            let input = format!("{{\"prompt\": \"ok\", \"expect\": \"x\"}}\n{text}\n");
            match parse(input.as_bytes()) {
                Err(EvalError::Line { line: 2, reason: r }) => {
                    assert!(r.contains(reason), "{text}: {r}")
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn size_and_count_are_bounded() {
        assert_eq!(parse(b"\n \n").expect_err("refused"), EvalError::Empty);
        assert_eq!(
            parse(&[0xff, 0xfe]).expect_err("refused"),
            EvalError::NotUtf8
        );
        let line = "{\"prompt\": \"a\", \"expect\": \"b\"}\n";
        let many = line.repeat(MAX_EVAL_ITEMS + 1);
        assert_eq!(
            parse(many.as_bytes()).expect_err("refused"),
            EvalError::TooMany
        );
        let big = vec![b' '; MAX_EVAL_BYTES as usize + 1];
        assert_eq!(parse(&big).expect_err("refused"), EvalError::TooLarge);
    }
}
