//! Constrained decoding: the answer always has the shape that was asked for.
//!
//! A [`GrammarCompiler`] is built once per model from its `tokenizer.json` (llguidance's
//! token trie over the bytes of every token). Each request with a response format gets a
//! [`Constraint`]: an llguidance matcher whose mask of allowed tokens is applied to the
//! logits at every step of the sequence, inside the engine's batched step, and which is
//! advanced by every sampled token. End-of-sequence is allowed only where the grammar may
//! end, so a finished answer always matches; JSON answers are also validated again after
//! generation (a second, independent check with a JSON Schema validator).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{
    InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use super::tokenizer::TextTokenizer;

/// Largest schema, regex or grammar text accepted.
pub const MAX_GRAMMAR_BYTES: usize = 32 * 1024;
/// Deepest nesting of a JSON schema accepted.
pub const MAX_SCHEMA_DEPTH: usize = 16;
/// Grammar size (symbols in productions) llguidance may build for one request.
const MAX_GRAMMAR_SYMBOLS: usize = 50_000;
/// Lexer states one request's grammar may create.
const MAX_LEXER_STATES: usize = 50_000;

/// What shape the answer must have.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against this schema.
    JsonSchema { name: String, schema: Value },
    /// Text matching this regular expression as a whole.
    Regex(String),
    /// Text in this Lark grammar (llguidance's dialect).
    Lark(String),
}

impl ResponseFormat {
    /// The short name used in errors and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ResponseFormat::JsonObject => "json_object",
            ResponseFormat::JsonSchema { .. } => "json_schema",
            ResponseFormat::Regex(_) => "regex",
            ResponseFormat::Lark(_) => "grammar",
        }
    }
}

/// Why a response format cannot be enforced: the request is refused (400), never answered
/// unconstrained.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConstraintError {
    #[error("the model {0} cannot constrain its answers: its tokenizer is not byte-level")]
    Unsupported(String),
    #[error("the {kind} is {size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted")]
    TooLarge { kind: &'static str, size: usize },
    #[error("the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")]
    TooDeep,
    #[error("the JSON schema must be an object")]
    SchemaNotObject,
    #[error("the JSON schema is not valid: {0}")]
    InvalidSchema(String),
    #[error("the {kind} cannot be enforced: {message}")]
    Rejected { kind: &'static str, message: String },
}

/// Why a constrained answer failed after generation began.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConstraintFailure {
    #[error("the output constraint failed: {0}")]
    Matcher(String),
    #[error("the answer does not validate against the schema: {0}")]
    Invalid(String),
}

/// The model's token bytes for the grammar engine, with our tokenizer for the strings a
/// grammar forces.
struct ModelTokens {
    trie: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for ModelTokens {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text, false).unwrap_or_default(),
            // Not text: the trie's greedy split is exact for byte-level vocabularies.
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles response formats into constraints for one model.
pub struct GrammarCompiler {
    factory: ParserFactory,
    model: String,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// The bytes of every token id of a model, as the grammar compiler needs them: read from
/// `tokenizer.json` when the model loads (the compiler itself is built later).
pub fn token_bytes(
    model: &str,
    tokenizer_json: &Path,
    vocab_size: usize,
) -> Result<Vec<Vec<u8>>, ConstraintError> {
    let unsupported = || ConstraintError::Unsupported(model.to_owned());
    let text = std::fs::read_to_string(tokenizer_json).map_err(|_| unsupported())?;
    let json: Value = serde_json::from_str(&text).map_err(|_| unsupported())?;
    let mut words =
        llguidance::token_bytes_from_tokenizer_json(&json).map_err(|_| unsupported())?;
    // Ids the model has but the file does not name (padding rows) are never allowed.
    words.resize(words.len().max(vocab_size), Vec::new());
    Ok(words)
}

impl GrammarCompiler {
    /// The compiler for a model whose token ids are the byte strings `words` (see
    /// [`token_bytes`]), ending answers with `eos`.
    pub fn new(
        model: &str,
        words: &[Vec<u8>],
        tokenizer: Arc<TextTokenizer>,
        eos: u32,
    ) -> Result<Self, ConstraintError> {
        let unsupported = || ConstraintError::Unsupported(model.to_owned());
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, words);
        let env: TokEnv = Arc::new(ModelTokens { trie, tokenizer });
        let mut factory = ParserFactory::new(&env, InferenceCapabilities::default(), &[])
            .map_err(|_| unsupported())?;
        factory.quiet();
        let limits = factory.limits_mut();
        limits.max_grammar_size = MAX_GRAMMAR_SYMBOLS;
        limits.max_lexer_states = MAX_LEXER_STATES;
        Ok(Self {
            factory,
            model: model.to_owned(),
        })
    }

    /// The constraint enforcing `format`, or why it cannot be enforced.
    pub fn compile(&self, format: &ResponseFormat) -> Result<Constraint, ConstraintError> {
        let kind = format.kind();
        let (grammar, validator) = match format {
            ResponseFormat::JsonObject => {
                let schema = serde_json::json!({"type": "object"});
                (json_grammar(schema.clone())?, Some(validator(&schema)?))
            }
            ResponseFormat::JsonSchema { schema, .. } => {
                check_schema(schema)?;
                let validator = validator(schema)?;
                (json_grammar(schema.clone())?, Some(validator))
            }
            ResponseFormat::Regex(regex) => {
                check_size(kind, regex.len())?;
                (TopLevelGrammar::from_regex(regex), None)
            }
            ResponseFormat::Lark(grammar) => {
                check_size(kind, grammar.len())?;
                (TopLevelGrammar::from_lark(grammar.clone()), None)
            }
        };
        let rejected = |message: String| ConstraintError::Rejected { kind, message };
        // llguidance reports errors as values; a panic inside it must not take the
        // request's worker down either.
        let parser = catch_unwind(AssertUnwindSafe(|| self.factory.create_parser(grammar)))
            .map_err(|_| rejected("the grammar compiler failed".into()))?
            .map_err(|e| rejected(first_line(&e.to_string())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(rejected(first_line(&error)));
        }
        Ok(Constraint {
            matcher,
            check: AnswerCheck {
                validator: validator.map(Arc::new),
            },
        })
    }
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).to_owned()
}

fn check_size(kind: &'static str, size: usize) -> Result<(), ConstraintError> {
    if size > MAX_GRAMMAR_BYTES {
        return Err(ConstraintError::TooLarge { kind, size });
    }
    Ok(())
}

/// Size, depth and shape limits of a client's schema.
fn check_schema(schema: &Value) -> Result<(), ConstraintError> {
    if !schema.is_object() {
        return Err(ConstraintError::SchemaNotObject);
    }
    let size = serde_json::to_string(schema).map_or(usize::MAX, |s| s.len());
    check_size("json_schema", size)?;
    fn depth(value: &Value) -> usize {
        match value {
            Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    if depth(schema) > MAX_SCHEMA_DEPTH * 2 {
        return Err(ConstraintError::TooDeep);
    }
    Ok(())
}

/// The independent validator of finished answers; building it also checks the schema.
fn validator(schema: &Value) -> Result<jsonschema::Validator, ConstraintError> {
    jsonschema::validator_for(schema).map_err(|e| ConstraintError::InvalidSchema(e.to_string()))
}

/// The grammar of JSON valid against `schema`, compact: a fixed separator between items
/// and keys and no other whitespace, so a model cannot pad its answer without end.
fn json_grammar(mut schema: Value) -> Result<TopLevelGrammar, ConstraintError> {
    let Some(object) = schema.as_object_mut() else {
        return Err(ConstraintError::SchemaNotObject);
    };
    object.insert(
        "x-guidance".into(),
        serde_json::json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
        }),
    );
    Ok(TopLevelGrammar::from_json_schema(schema))
}

/// One sequence's constraint.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    check: AnswerCheck,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// The tokens allowed next.
    pub fn mask(&mut self) -> Result<SimpleVob, ConstraintFailure> {
        self.matcher
            .compute_mask()
            .map_err(|e| ConstraintFailure::Matcher(first_line(&e.to_string())))
    }

    /// Advances past the sampled token.
    pub fn consume(&mut self, token: u32) -> Result<(), ConstraintFailure> {
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintFailure::Matcher(first_line(&e.to_string())))
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_stopped(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// The check of the finished answer, kept by whoever presents it.
    pub fn answer_check(&self) -> AnswerCheck {
        self.check.clone()
    }
}

/// The second, independent check of a finished constrained answer.
#[derive(Clone, Default)]
pub struct AnswerCheck {
    validator: Option<Arc<jsonschema::Validator>>,
}

impl std::fmt::Debug for AnswerCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCheck")
            .field("json", &self.validator.is_some())
            .finish()
    }
}

impl AnswerCheck {
    /// A JSON answer must parse and validate against its schema.
    pub fn validate(&self, answer: &str) -> Result<(), ConstraintFailure> {
        let Some(validator) = &self.validator else {
            return Ok(());
        };
        let value: Value = serde_json::from_str(answer)
            .map_err(|e| ConstraintFailure::Invalid(format!("not JSON: {e}")))?;
        match validator.iter_errors(&value).next() {
            None => Ok(()),
            Some(error) => Err(ConstraintFailure::Invalid(format!(
                "{} at {}",
                error,
                error.instance_path()
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
