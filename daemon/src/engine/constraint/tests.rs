//! With the demo model's real tokenizer (provisioned by scripts/setup.sh).

use super::*;
use serde_json::json;
use std::path::PathBuf;

fn tokenizer_json() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../local/models/smollm2-135m-instruct-exact/tokenizer.json")
}

fn compiler() -> (GrammarCompiler, Arc<TextTokenizer>) {
    let path = tokenizer_json();
    let tokenizer = Arc::new(TextTokenizer::load(&path, None).expect("run scripts/setup.sh"));
    let words = token_bytes("smollm2", &path, tokenizer.vocab_size()).expect("byte-level");
    let compiler =
        GrammarCompiler::new("smollm2", &words, Arc::clone(&tokenizer), 2).expect("byte-level");
    (compiler, tokenizer)
}

fn schema(value: Value) -> ResponseFormat {
    ResponseFormat::JsonSchema {
        name: "t".into(),
        schema: value,
    }
}

/// Feeds `text`'s tokens to a fresh constraint, each checked against the mask first;
/// returns how many were allowed before the first refusal.
fn allowed_prefix(constraint: &mut Constraint, tokenizer: &TextTokenizer, text: &str) -> usize {
    let ids = tokenizer.encode(text, false).expect("encodes");
    for (n, &id) in ids.iter().enumerate() {
        let mask = constraint.mask().expect("mask");
        if !mask.is_allowed(id) {
            return n;
        }
        constraint.consume(id).expect("consumes");
    }
    ids.len()
}

#[test]
fn a_valid_answer_is_allowed_token_by_token_and_ends_the_grammar() {
    let (compiler, tokenizer) = compiler();
    let format = schema(json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    }));
    let mut constraint = compiler.compile(&format).expect("compiles");
    let answer = r#"{"name": "Ada", "age": 36, "tags": ["a", "b"]}"#;
    let ids = tokenizer.encode(answer, false).expect("encodes");
    assert_eq!(
        allowed_prefix(&mut constraint, &tokenizer, answer),
        ids.len()
    );
    // The closed object completes the grammar: nothing more may follow.
    assert!(constraint.is_stopped());
    assert!(constraint.answer_check().validate(answer).is_ok());
}

#[test]
fn what_breaks_the_schema_or_pads_whitespace_is_masked() {
    let (compiler, tokenizer) = compiler();
    let format = schema(json!({
        "type": "object",
        "properties": {"age": {"type": "integer", "maximum": 150}},
        "required": ["age"],
        "additionalProperties": false
    }));
    for (bad, at) in [
        (r#"{"name": 1}"#, 1),   // a key the schema does not have
        (r#"{"age": "36"}"#, 3), // a string for an integer
        ("{  \"age\": 36}", 1),  // whitespace beyond the fixed separators
        ("[1]", 0),              // not an object
    ] {
        let mut constraint = compiler.compile(&format).expect("compiles");
        let allowed = allowed_prefix(&mut constraint, &tokenizer, bad);
        let total = tokenizer.encode(bad, false).expect("encodes").len();
        assert!(allowed < total, "{bad:?} was allowed whole");
        assert!(
            allowed <= at + 1,
            "{bad:?}: refused only after {allowed} tokens"
        );
    }
}

#[test]
fn formats_that_cannot_be_enforced_are_refused_with_the_problem_named() {
    let (compiler, _) = compiler();
    let refused = |format: ResponseFormat| compiler.compile(&format).expect_err("refused");
    assert_eq!(
        refused(schema(json!(true))),
        ConstraintError::SchemaNotObject
    );
    assert!(matches!(
        refused(schema(json!({"type": 7}))),
        ConstraintError::InvalidSchema(_)
    ));
    let huge = json!({"type": "object", "description": "x".repeat(MAX_GRAMMAR_BYTES)});
    assert!(matches!(
        refused(schema(huge)),
        ConstraintError::TooLarge { .. }
    ));
    let mut deep = json!({"type": "object"});
    for _ in 0..40 {
        deep = json!({"type": "object", "properties": {"x": deep}});
    }
    assert_eq!(refused(schema(deep)), ConstraintError::TooDeep);
    assert!(matches!(
        refused(ResponseFormat::Regex("(unclosed".into())),
        ConstraintError::Rejected { kind: "regex", .. }
    ));
    assert!(matches!(
        refused(ResponseFormat::Lark("start: undefined_rule".into())),
        ConstraintError::Rejected {
            kind: "grammar",
            ..
        }
    ));
}

#[test]
fn a_regex_and_a_lark_grammar_constrain_plain_text() {
    let (compiler, tokenizer) = compiler();
    let regex = ResponseFormat::Regex("(yes|no)".into());
    let lark = ResponseFormat::Lark("start: \"ID-\" DIGITS\nDIGITS: /[0-9]{4}/".into());
    for (format, good, bad) in [(regex, "no", "nope"), (lark, "ID-2024", "ID-20x4")] {
        let mut constraint = compiler.compile(&format).expect("compiles");
        let tokens = tokenizer.encode(good, false).expect("encodes").len();
        assert_eq!(
            allowed_prefix(&mut constraint, &tokenizer, good),
            tokens,
            "{good}"
        );
        assert!(constraint.is_stopped(), "{good} completes the grammar");
        let mut constraint = compiler.compile(&format).expect("compiles");
        let tokens = tokenizer.encode(bad, false).expect("encodes").len();
        assert!(
            allowed_prefix(&mut constraint, &tokenizer, bad) < tokens,
            "{bad}"
        );
    }
}

#[test]
fn the_answer_check_refuses_invalid_json_independently() {
    let (compiler, _) = compiler();
    let constraint = compiler
        .compile(&schema(json!({"type": "object", "required": ["a"]})))
        .expect("compiles");
    let check = constraint.answer_check();
    assert!(check.validate(r#"{"a": 1}"#).is_ok());
    assert!(check.validate(r#"{"b": 1}"#).is_err());
    assert!(check.validate(r#"{"a": 1"#).is_err());
    assert!(AnswerCheck::default().validate("anything").is_ok());
}
