//! The one place where errors become HTTP statuses, in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::engine::EngineError;
use crate::tls::IdentityError;

/// Status counted for a request whose client went away before the answer was ready (the
/// handler was dropped, and with it the generation), as nginx counts it.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// Seconds a client is asked to wait after a 503 for a full queue.
pub const RETRY_AFTER_SECS: u32 = 1;

/// A request that could not be answered, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or asks for something invalid (400).
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
        code: &'static str,
    },
    /// The connection carries no usable identity (401).
    #[error("no usable client identity: {0}")]
    Unauthenticated(IdentityError),
    /// No such model or route (404).
    #[error("{message}")]
    NotFound { message: String, code: &'static str },
    /// The body is larger than `limits.max_body_bytes` (413).
    #[error("the request body is larger than the {limit}-byte limit")]
    BodyTooLarge { limit: usize },
    /// The body did not arrive within `limits.body_read_timeout_ms` (408).
    #[error("the request body did not arrive within {millis} ms; send it whole and at once")]
    BodyTimeout { millis: u64 },
    /// The body is not declared as JSON (415).
    #[error(
        "the request body must be JSON, sent with `content-type: application/json` (got {found:?})"
    )]
    UnsupportedMediaType { found: String },
    /// The caller was refused too often in this window (429, with `Retry-After`).
    #[error(
        "too many refused requests from this client; it is turned away for {retry_after} s. \
         Fix what is being refused (see the earlier errors) before retrying"
    )]
    RefusalBudgetSpent { retry_after: u64 },
    /// Well-formed, but this model cannot do it (422).
    #[error("{message}")]
    Unsupported {
        message: String,
        param: Option<&'static str>,
        code: &'static str,
    },
    /// The engine's queue is full (503 with `Retry-After`).
    #[error("the model {model} is at capacity; retry after {RETRY_AFTER_SECS} s")]
    Overloaded { model: String },
    /// The model is not running (503).
    #[error("the model {model} is not available right now; retry later")]
    Unavailable { model: String },
    /// The policy refuses the request (403); `reason` is the stable reason code.
    #[error("the policy does not allow this request ({reason})")]
    PolicyDenied { reason: String },
    /// The answer tripped a content rule and is withheld (403).
    #[error(
        "the answer was withheld: it contains content the policy does not let leave ({reason})"
    )]
    AnswerWithheld { reason: String },
    /// A department limit (429, with `Retry-After` when waiting helps).
    #[error("{message}")]
    LimitExceeded {
        reason: String,
        message: String,
        retry_after: Option<u64>,
    },
    /// The engine failed while serving a valid request (500).
    #[error("the model failed while answering: {0}")]
    Internal(String),
    /// The request's audit record could not be made durable: no audit, no answer (503).
    #[error("the audit trail cannot record this request, so it is not answered; retry later")]
    AuditUnavailable(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// The `error` object of a response body, also sent as an event in a failed stream.
#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: &'a str,
}

impl ApiError {
    pub fn invalid(
        message: impl Into<String>,
        param: Option<&'static str>,
        code: &'static str,
    ) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param,
            code,
        }
    }

    pub fn unsupported(
        message: impl Into<String>,
        param: Option<&'static str>,
        code: &'static str,
    ) -> Self {
        ApiError::Unsupported {
            message: message.into(),
            param,
            code,
        }
    }

    /// The `error` object for this error.
    pub fn detail(&self) -> ErrorDetail<'_> {
        let (kind, param, code): (&str, Option<&str>, &str) = match self {
            ApiError::InvalidRequest { param, code, .. } => {
                ("invalid_request_error", *param, *code)
            }
            ApiError::Unauthenticated(e) => ("authentication_error", None, e.code()),
            ApiError::NotFound { code, .. } => ("invalid_request_error", None, *code),
            ApiError::BodyTooLarge { .. } => ("invalid_request_error", None, "body_too_large"),
            ApiError::BodyTimeout { .. } => ("invalid_request_error", None, "body_timeout"),
            ApiError::UnsupportedMediaType { .. } => {
                ("invalid_request_error", None, "unsupported_media_type")
            }
            ApiError::RefusalBudgetSpent { .. } => {
                ("rate_limit_exceeded", None, super::refusals::BUDGET_SPENT)
            }
            ApiError::Unsupported { param, code, .. } => ("invalid_request_error", *param, *code),
            ApiError::Overloaded { .. } => ("overloaded_error", None, "queue_full"),
            ApiError::Unavailable { .. } => ("service_unavailable", None, "model_unavailable"),
            ApiError::Internal(_) => ("server_error", None, "inference_failed"),
            ApiError::AuditUnavailable(_) => ("service_unavailable", None, "audit_unavailable"),
            ApiError::PolicyDenied { reason } | ApiError::AnswerWithheld { reason } => {
                ("permission_denied", None, reason.as_str())
            }
            ApiError::LimitExceeded { reason, .. } => {
                ("rate_limit_exceeded", None, reason.as_str())
            }
        };
        ErrorDetail {
            message: self.to_string(),
            kind,
            param,
            code,
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RefusalBudgetSpent { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unsupported { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Overloaded { .. }
            | ApiError::Unavailable { .. }
            | ApiError::AuditUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::PolicyDenied { .. } | ApiError::AnswerWithheld { .. } => {
                StatusCode::FORBIDDEN
            }
            ApiError::LimitExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(
            self,
            ApiError::Overloaded { .. }
                | ApiError::Unavailable { .. }
                | ApiError::AuditUnavailable(_)
        ) {
            response.insert_header((header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS)));
        }
        if let ApiError::LimitExceeded {
            retry_after: Some(secs),
            ..
        }
        | ApiError::RefusalBudgetSpent { retry_after: secs } = self
        {
            response.insert_header((header::RETRY_AFTER, HeaderValue::from(*secs)));
        }
        response.json(ErrorBody {
            error: self.detail(),
        })
    }
}

impl ApiError {
    /// Maps an engine refusal to the status a client should see. `model` names the model in
    /// capacity errors.
    pub fn from_engine(error: EngineError, model: &str) -> Self {
        use EngineError as E;
        let invalid = |param, code| ApiError::invalid(error.to_string(), param, code);
        match &error {
            E::EmptyPrompt => invalid(None, "empty_prompt"),
            E::ContextOverflow {
                prompt_tokens,
                max_tokens,
                context_length,
            } => ApiError::invalid(
                format!(
                    "this model's maximum context length is {context_length} tokens, but {} were requested ({prompt_tokens} in the prompt, {max_tokens} for the completion); shorten the prompt or lower max_tokens",
                    prompt_tokens + max_tokens
                ),
                Some("max_tokens"),
                "context_length_exceeded",
            ),
            E::ZeroMaxTokens => invalid(Some("max_tokens"), "invalid_value"),
            E::Sampling(crate::engine::SamplingError::Temperature(_)) => {
                invalid(Some("temperature"), "invalid_value")
            }
            E::Sampling(_) => invalid(Some("top_p"), "invalid_value"),
            E::EmptyStopString | E::TooManyStopStrings(_) | E::StopStringTooLong(_) => {
                invalid(Some("stop"), "invalid_value")
            }
            E::StopTokenOutOfVocab { .. } | E::PromptTokenOutOfVocab { .. } => {
                invalid(Some("prompt"), "invalid_value")
            }
            E::NoChatTemplate => ApiError::unsupported(
                format!("the model {model} has no chat template; use /v1/completions"),
                Some("model"),
                "chat_not_supported",
            ),
            E::ChatTemplate(_) => invalid(Some("messages"), "invalid_messages"),
            E::ControlTokenInMessage { .. } => {
                invalid(Some("messages"), "control_token_in_message")
            }
            E::Tokenize(_) => invalid(None, "invalid_text"),
            // A department over its share of the queue waits like everyone at a full one.
            E::Overloaded | E::DepartmentOverloaded => ApiError::Overloaded {
                model: model.to_owned(),
            },
            E::ShutDown => ApiError::Unavailable {
                model: model.to_owned(),
            },
            E::Inference(reason) => ApiError::Internal(reason.clone()),
            // The constraint reached a state it cannot leave: a fault, never an answer.
            E::Constraint(failure) => ApiError::Internal(failure.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_errors_ask_the_client_to_retry() {
        let response = ApiError::Overloaded { model: "m".into() }.error_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from(RETRY_AFTER_SECS))
        );
    }

    #[test]
    fn context_overflow_names_every_count() {
        let error = ApiError::from_engine(
            EngineError::ContextOverflow {
                prompt_tokens: 9000,
                max_tokens: 16,
                context_length: 8192,
            },
            "m",
        );
        assert_eq!(error.status_code(), StatusCode::BAD_REQUEST);
        let message = error.to_string();
        for count in ["8192", "9016", "9000", "16"] {
            assert!(message.contains(count), "{message}");
        }
        assert_eq!(error.detail().code, "context_length_exceeded");
    }

    #[test]
    fn engine_faults_are_the_only_server_errors() {
        let internal = ApiError::from_engine(EngineError::Inference("x".into()), "m");
        assert_eq!(internal.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
        for client_error in [
            EngineError::EmptyPrompt,
            EngineError::ZeroMaxTokens,
            EngineError::EmptyStopString,
            EngineError::TooManyStopStrings(99),
            EngineError::ChatTemplate("roles must alternate".into()),
        ] {
            let status = ApiError::from_engine(client_error, "m").status_code();
            assert_eq!(status, StatusCode::BAD_REQUEST);
        }
    }
}
