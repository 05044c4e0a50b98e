//! `response_format`: OpenAI's `json_object` and `json_schema`, and moat's extensions
//! `regex` and `grammar` (Lark); and the schema a policy may fix for a model, which a
//! client cannot replace.
//!
//! ```json
//! {"type": "json_schema", "json_schema": {"name": "invoice", "schema": {...}, "strict": true}}
//! {"type": "json_object"}
//! {"type": "regex", "regex": "(yes|no)"}
//! {"type": "grammar", "grammar": {"syntax": "lark", "definition": "start: ..."}}
//! ```

use serde_json::Value;

use super::error::ApiError;
use crate::engine::{ConstraintError, ResponseFormat};

const PARAM: Option<&'static str> = Some("response_format");

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::invalid(message, PARAM, "invalid_response_format")
}

fn text_field<'a>(value: &'a Value, field: &str, context: &str) -> Result<&'a str, ApiError> {
    value
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{context} needs a string \"{field}\"")))
}

/// The format a request's `response_format` asks for; `None` for plain text.
pub fn parse(value: Option<&Value>) -> Result<Option<ResponseFormat>, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = text_field(value, "type", "response_format")?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(ResponseFormat::JsonObject)),
        "json_schema" => {
            let spec = value
                .get("json_schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| invalid("json_schema needs an object \"json_schema\""))?;
            let name = spec
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("response")
                .to_owned();
            let schema = spec
                .get("schema")
                .cloned()
                .ok_or_else(|| invalid("json_schema needs a \"schema\""))?;
            Ok(Some(ResponseFormat::JsonSchema { name, schema }))
        }
        "regex" => Ok(Some(ResponseFormat::Regex(
            text_field(value, "regex", "a regex response_format")?.to_owned(),
        ))),
        "grammar" => {
            let grammar = value
                .get("grammar")
                .ok_or_else(|| invalid("a grammar response_format needs \"grammar\""))?;
            match text_field(grammar, "syntax", "grammar")? {
                "lark" => Ok(Some(ResponseFormat::Lark(
                    text_field(grammar, "definition", "grammar")?.to_owned(),
                ))),
                other => Err(invalid(format!(
                    "grammar syntax {other:?} is not supported; use \"lark\""
                ))),
            }
        }
        other => Err(invalid(format!(
            "response_format type {other:?} is not supported; use text, json_object, \
             json_schema, regex or grammar"
        ))),
    }
}

/// What the answer must follow: the policy's schema for the model if it fixes one (the
/// client may ask for nothing else), else what the client asked for.
pub fn effective(
    requested: Option<ResponseFormat>,
    mandated: Option<&Value>,
    model: &str,
) -> Result<Option<ResponseFormat>, ApiError> {
    let Some(schema) = mandated else {
        return Ok(requested);
    };
    match requested {
        None => Ok(Some(ResponseFormat::JsonSchema {
            name: format!("{model}-policy"),
            schema: schema.clone(),
        })),
        Some(ResponseFormat::JsonSchema {
            name,
            schema: asked,
        }) if asked == *schema => Ok(Some(ResponseFormat::JsonSchema {
            name,
            schema: asked,
        })),
        Some(_) => Err(ApiError::invalid(
            format!(
                "the answers of {model} follow a JSON schema fixed by the policy; send no \
                 response_format (or that very schema)"
            ),
            PARAM,
            "response_format_fixed",
        )),
    }
}

/// A format that cannot be enforced is refused, naming the problem.
pub fn refused(error: ConstraintError) -> ApiError {
    ApiError::invalid(error.to_string(), PARAM, "invalid_response_format")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_documented_form_parses_and_others_are_named() {
        assert_eq!(parse(None), Ok(None));
        assert_eq!(parse(Some(&json!({"type": "text"}))), Ok(None));
        assert_eq!(
            parse(Some(&json!({"type": "json_object"}))),
            Ok(Some(ResponseFormat::JsonObject))
        );
        let schema = json!({"type": "object"});
        assert_eq!(
            parse(Some(&json!({"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": true}}))),
            Ok(Some(ResponseFormat::JsonSchema {
                name: "x".into(),
                schema: schema.clone()
            }))
        );
        assert_eq!(
            parse(Some(&json!({"type": "regex", "regex": "a+"}))),
            Ok(Some(ResponseFormat::Regex("a+".into())))
        );
        assert_eq!(
            parse(Some(&json!({"type": "grammar",
                "grammar": {"syntax": "lark", "definition": "start: \"a\""}}))),
            Ok(Some(ResponseFormat::Lark("start: \"a\"".into())))
        );
        for bad in [
            json!({"type": "json_schema"}),
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            json!({"type": "yaml"}),
            json!({"type": "grammar", "grammar": {"syntax": "gbnf", "definition": "x"}}),
            json!({"no": "type"}),
        ] {
            let error = parse(Some(&bad)).expect_err("refused");
            assert_eq!(error.detail().param, Some("response_format"), "{bad}");
        }
    }

    #[test]
    fn a_schema_fixed_by_policy_applies_and_cannot_be_replaced() {
        let fixed = json!({"type": "object", "required": ["a"]});
        let applied = effective(None, Some(&fixed), "m").expect("applied");
        assert!(
            matches!(applied, Some(ResponseFormat::JsonSchema { ref schema, .. }) if *schema == fixed)
        );
        let same = ResponseFormat::JsonSchema {
            name: "mine".into(),
            schema: fixed.clone(),
        };
        assert!(effective(Some(same), Some(&fixed), "m").is_ok());
        for other in [
            ResponseFormat::JsonObject,
            ResponseFormat::Regex(".*".into()),
            ResponseFormat::JsonSchema {
                name: "x".into(),
                schema: json!({"type": "object"}),
            },
        ] {
            let error = effective(Some(other), Some(&fixed), "m").expect_err("refused");
            assert_eq!(error.detail().code, "response_format_fixed");
        }
    }
}
