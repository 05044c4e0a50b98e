//! `POST /v1/chat/completions` and `POST /v1/completions`: validate the request, hand it to
//! the model's engine from a blocking thread, then answer whole or as a server-sent event
//! stream.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use serde::Serialize;

use super::answer::Answering;
use super::audit_trail::FinalRecordSlot;
use super::error::ApiError;
use super::guard::{self, Gate, GateRequest};
use super::inference::Generator;
use super::openai::{
    ChatCompletionRequest, ChatMessageIn, CompletionPrompt, CompletionRequest, Endpoint,
    GenerationParams, MessageContent, ResponseMeta, UsageOut,
};
use super::stream::{self, StreamFormat};
use super::{AppState, Caller, RequestContext, read_json, response_format};
use crate::config::LimitsConfig;
use crate::engine::{
    ChatMessage, GenerationEvent, GenerationRequest, GenerationStream, Prompt, ResponseFormat,
    SamplingParams,
};
use moat_core::ModelTask;
use moat_core::bundle::manifest::SamplingDefaults;
use moat_core::policy::content::ContentScan;
use moat_core::policy::{AccessPolicy, ModelFacts, PolicyAction};

use crate::models::serving::LoadedModel;

pub async fn chat_completions(
    state: web::Data<AppState>,
    caller: Caller,
    context: RequestContext,
    http: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let request: ChatCompletionRequest = read_json(&http, payload, &state.limits).await?;
    let (loaded, generator) = state.generator(&request.model, &http, &caller)?;
    let prompt = Prompt::Chat(chat_messages(request.messages, &state.limits)?);
    let asked = Asked {
        model: request.model,
        prompt,
        params: request.params,
        endpoint: Endpoint::Chat,
    };
    Exchange::new(&state, &caller, &http, &context)
        .generate(&loaded, &generator, asked)
        .await
}

pub async fn completions(
    state: web::Data<AppState>,
    caller: Caller,
    context: RequestContext,
    http: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let request: CompletionRequest = read_json(&http, payload, &state.limits).await?;
    let (loaded, generator) = state.generator(&request.model, &http, &caller)?;
    let unsupported = |message: &str, param| {
        Err(ApiError::invalid(
            message,
            Some(param),
            "unsupported_parameter",
        ))
    };
    if request.echo == Some(true) {
        return unsupported("echo is not supported", "echo");
    }
    if request.best_of.is_some_and(|n| n != 1) {
        return unsupported("best_of must be 1", "best_of");
    }
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return unsupported("suffix is not supported", "suffix");
    }
    let prompt = completion_prompt(request.prompt)?;
    let asked = Asked {
        model: request.model,
        prompt,
        params: request.params,
        endpoint: Endpoint::Completion,
    };
    Exchange::new(&state, &caller, &http, &context)
        .generate(&loaded, &generator, asked)
        .await
}

/// One request being answered: the gate it meets (who asked, the server's shared state)
/// and its id.
struct Exchange<'a> {
    gate: Gate<'a>,
    context: &'a RequestContext,
}

/// What a chat or completion request asks, once its endpoint's own fields are read.
struct Asked {
    model: String,
    prompt: Prompt,
    params: GenerationParams,
    endpoint: Endpoint,
}

impl<'a> Exchange<'a> {
    fn new(
        state: &'a AppState,
        caller: &'a Caller,
        http: &'a HttpRequest,
        context: &'a RequestContext,
    ) -> Self {
        Self {
            gate: Gate {
                state,
                caller,
                http,
            },
            context,
        }
    }

    /// Checks the shared fields, applies the policy (content rules, decision, limits),
    /// submits the prompt and answers whole or streamed.
    async fn generate(
        &self,
        loaded: &LoadedModel,
        generator: &Generator,
        asked: Asked,
    ) -> Result<HttpResponse, ApiError> {
        let Asked {
            model,
            prompt,
            params,
            endpoint,
        } = asked;
        let policy = self.gate.state.policy.current();
        let (prompt, prompt_text, prompt_scan) = policy_prompt(&policy, generator, prompt, &model)?;
        let version = loaded.version_text();
        let action = match endpoint {
            Endpoint::Chat => PolicyAction::Chat,
            Endpoint::Completion => PolicyAction::Complete,
        };
        let mut gate = GateRequest {
            action,
            model: Some(ModelFacts {
                name: &model,
                task: ModelTask::TextGeneration.as_str(),
                version: &version,
                ceiling: loaded.classification_ceiling.as_deref(),
            }),
            prompt_text: &prompt_text,
            prompt_scan,
            prompt_tokens: 0,
            max_tokens: 0,
        };
        // A request the policy refuses costs no rendering, tokenising or grammar compiling.
        self.gate.refuse_early(&policy, &gate)?;
        let mut request =
            generation_request(prompt, &params, &loaded.sampling, &self.gate.state.limits)?;
        // The engine serves departments in turn.
        request
            .department
            .clone_from(&self.gate.caller.identity.department);
        let format = response_format(&request, &params, &policy, loaded)?;
        let (prepared, check) = generator.prepare(request, format, &model).await?;
        gate.prompt_tokens = prepared.prompt_tokens() as u64;
        gate.max_tokens = prepared.max_new_tokens() as u64;
        let admitted = self.gate.admit(policy, gate).await?;
        let events = generator
            .submit(prepared, &admitted)
            .map_err(|e| ApiError::from_engine(e, &model))?;
        let timer = self.gate.state.metrics.generation_timer(
            &self.gate.caller.identity.department,
            &model,
            self.context.started,
        );
        let meta = response_meta(self.context, model, endpoint, &params);
        let mut response = if params.stream {
            // The stream writes the request's final record before its last event.
            let record = FinalRecordSlot::take_from(self.gate.http)?;
            let answer = Answering::streamed(admitted, timer, check);
            HttpResponse::Ok()
                .content_type("text/event-stream")
                .insert_header(("cache-control", "no-cache"))
                .streaming(stream::sse_body(
                    events,
                    StreamFormat::new(meta),
                    answer,
                    record,
                ))
        } else {
            whole_answer(events, meta, Answering::whole(admitted, timer, check)).await?
        };
        super::name_version(&mut response, loaded);
        Ok(response)
    }
}

fn response_meta(
    context: &RequestContext,
    model: String,
    endpoint: Endpoint,
    params: &GenerationParams,
) -> ResponseMeta {
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl-",
        Endpoint::Completion => "cmpl-",
    };
    ResponseMeta {
        id: format!("{prefix}{}", context.id),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model,
        endpoint,
        include_usage: params
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    }
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct WholeResponse<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [C; 1],
    usage: UsageOut,
}

async fn whole_answer(
    mut events: GenerationStream,
    meta: ResponseMeta,
    mut answer: Answering,
) -> Result<HttpResponse, ApiError> {
    while let Some(event) = events.next().await {
        match event {
            GenerationEvent::Token { text, .. } => {
                answer.token(&text)?;
            }
            GenerationEvent::Finished { reason, usage } => {
                let text = answer.finished(reason, usage)?;
                let usage = UsageOut::from(usage);
                let finish_reason = reason.as_str();
                let response = match meta.endpoint {
                    Endpoint::Chat => serde_json::to_vec(&WholeResponse {
                        id: &meta.id,
                        object: "chat.completion",
                        created: meta.created,
                        model: &meta.model,
                        choices: [ChatChoice {
                            index: 0,
                            message: AssistantMessage {
                                role: "assistant",
                                content: &text,
                            },
                            logprobs: None,
                            finish_reason,
                        }],
                        usage,
                    }),
                    Endpoint::Completion => serde_json::to_vec(&WholeResponse {
                        id: &meta.id,
                        object: "text_completion",
                        created: meta.created,
                        model: &meta.model,
                        choices: [TextChoice {
                            index: 0,
                            text: &text,
                            logprobs: None,
                            finish_reason,
                        }],
                        usage,
                    }),
                }
                .map_err(|e| ApiError::Internal(e.to_string()))?;
                return Ok(HttpResponse::Ok()
                    .content_type("application/json")
                    .body(Bytes::from(response)));
            }
            GenerationEvent::Failed(error) => {
                return Err(answer.failed(ApiError::from_engine(error, &meta.model)));
            }
        }
    }
    Err(answer.failed(ApiError::Unavailable { model: meta.model }))
}

/// The response format the answer must have: the request's, unless the policy or the
/// model's bundle fixes one (the policy's schema for the model comes before the bundle's).
fn response_format(
    request: &GenerationRequest,
    params: &GenerationParams,
    policy: &AccessPolicy,
    loaded: &LoadedModel,
) -> Result<Option<ResponseFormat>, ApiError> {
    let model = loaded.name.as_str();
    let requested = response_format::parse(params.response_format.as_ref())?;
    let mandated = policy
        .data()
        .model(model)
        .response_schema
        .as_ref()
        .or(loaded.response_schema.as_ref());
    let format = response_format::effective(requested, mandated, model)?;
    if format.is_some() && !request.stop.is_empty() {
        // A stop string could cut the answer short of its shape.
        return Err(ApiError::invalid(
            "stop cannot be combined with a response_format: the format decides where the answer ends",
            Some("stop"),
            "unsupported_parameter",
        ));
    }
    Ok(format)
}

/// The prompt as inference will see it (`redact` rules masked), its masked text for the
/// audit, and what the content rules found in it as the client sent it: a `redact` rule's
/// findings reach the policy and the audit like any other. Token-id prompts are decoded,
/// so ids cannot carry what text may not.
fn policy_prompt(
    policy: &AccessPolicy,
    generator: &Generator,
    prompt: Prompt,
    model: &str,
) -> Result<(Prompt, String, ContentScan), ApiError> {
    match prompt {
        Prompt::Chat(messages) => {
            let sent = messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            let scan = guard::scan_prompt(policy, &sent);
            let messages: Vec<ChatMessage> = messages
                .into_iter()
                .map(|m| {
                    let content = guard::redact_for_inference(policy, &m.content);
                    ChatMessage::new(m.role, content)
                })
                .collect();
            let text = messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            Ok((Prompt::Chat(messages), text, scan))
        }
        Prompt::Text(text) => {
            let scan = guard::scan_prompt(policy, &text);
            let redacted = guard::redact_for_inference(policy, &text);
            Ok((Prompt::Text(redacted.clone()), redacted, scan))
        }
        Prompt::TokenIds(ids) => {
            let text = generator.decode(&ids, model)?;
            let scan = guard::scan_prompt(policy, &text);
            let redacted = guard::redact_for_inference(policy, &text);
            if redacted == text {
                Ok((Prompt::TokenIds(ids), text, scan))
            } else {
                Ok((Prompt::Text(redacted.clone()), redacted, scan))
            }
        }
    }
}

/// Checks the fields shared by chat and completions and builds the engine request.
pub fn generation_request(
    prompt: Prompt,
    params: &GenerationParams,
    defaults: &SamplingDefaults,
    limits: &LimitsConfig,
) -> Result<GenerationRequest, ApiError> {
    refuse_unsupported(params)?;
    let max_tokens = match (params.max_completion_tokens, params.max_tokens) {
        (Some(n), _) => Some((n, "max_completion_tokens")),
        (None, Some(n)) => Some((n, "max_tokens")),
        (None, None) => None,
    };
    if let Some((n, field)) = max_tokens
        && n > limits.max_tokens as u64
    {
        return Err(ApiError::invalid(
            format!(
                "{field} is {n}; this server allows at most {}",
                limits.max_tokens
            ),
            Some(field),
            "invalid_value",
        ));
    }
    let mut request = GenerationRequest::new(prompt);
    request.max_tokens = max_tokens
        .map(|(n, _)| n as usize)
        .or(defaults.max_tokens.map(|n| n.min(limits.max_tokens)));
    request.sampling = SamplingParams {
        // The bundle's defaults, else OpenAI's: temperature 1, top_p 1.
        temperature: params
            .temperature
            .unwrap_or(defaults.temperature.unwrap_or(1.0)),
        top_p: params.top_p.unwrap_or(defaults.top_p.unwrap_or(1.0)),
        top_k: defaults.top_k.unwrap_or(0),
        seed: params.seed.map(|s| s as u64),
    };
    request.stop = params
        .stop
        .clone()
        .map(|s| s.into_vec())
        .unwrap_or_default();
    Ok(request)
}

/// Refuses fields whose meaning moat does not implement, rather than answering as if they
/// were absent.
fn refuse_unsupported(params: &GenerationParams) -> Result<(), ApiError> {
    let unsupported = |param: &'static str, message: &str| {
        Err(ApiError::invalid(
            message,
            Some(param),
            "unsupported_parameter",
        ))
    };
    if params.n.is_some_and(|n| n != 1) {
        return unsupported("n", "n must be 1: one choice per request");
    }
    if params.logprobs.as_ref().is_some_and(is_set)
        || params.top_logprobs.as_ref().is_some_and(is_set)
    {
        return unsupported("logprobs", "logprobs are not supported");
    }
    if params.tools.as_ref().is_some_and(is_set) || params.functions.as_ref().is_some_and(is_set) {
        return unsupported("tools", "tools and functions are not supported");
    }
    if params.logit_bias.as_ref().is_some_and(is_set) {
        return unsupported("logit_bias", "logit_bias is not supported");
    }
    if params.presence_penalty.is_some_and(|p| p != 0.0) {
        return unsupported("presence_penalty", "presence_penalty is not supported");
    }
    if params.frequency_penalty.is_some_and(|p| p != 0.0) {
        return unsupported("frequency_penalty", "frequency_penalty is not supported");
    }
    Ok(())
}

/// Whether an optional JSON field asks for something (not null, false, 0, empty).
fn is_set(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Null => false,
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::Number(n) => n.as_f64() != Some(0.0),
        serde_json::Value::String(s) => !s.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
    }
}

/// Converts chat messages, refusing roles and content moat cannot render.
fn chat_messages(
    messages: Vec<ChatMessageIn>,
    limits: &LimitsConfig,
) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
            "empty_messages",
        ));
    }
    if messages.len() > limits.max_messages {
        return Err(ApiError::invalid(
            format!(
                "{} messages; at most {} are allowed",
                messages.len(),
                limits.max_messages
            ),
            Some("messages"),
            "too_many_messages",
        ));
    }
    messages
        .into_iter()
        .map(|message| {
            let role = match message.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        format!("role {other:?} is not supported; use system, user or assistant"),
                        Some("messages"),
                        "invalid_role",
                    ));
                }
            };
            Ok(ChatMessage::new(role, message_text(message.content)?))
        })
        .collect()
}

fn message_text(content: Option<MessageContent>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(MessageContent::Text(text)) => Ok(text),
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.kind.as_str(), part.text) {
                    ("text", Some(piece)) => text.push_str(&piece),
                    (kind, _) => {
                        return Err(ApiError::invalid(
                            format!("content parts of type {kind:?} are not supported; only text"),
                            Some("messages"),
                            "invalid_content",
                        ));
                    }
                }
            }
            Ok(text)
        }
    }
}

fn completion_prompt(prompt: CompletionPrompt) -> Result<Prompt, ApiError> {
    let one_only = || {
        ApiError::invalid(
            "prompt must be one string or one list of token ids (batches are not supported)",
            Some("prompt"),
            "unsupported_parameter",
        )
    };
    match prompt {
        CompletionPrompt::Text(text) => Ok(Prompt::Text(text)),
        CompletionPrompt::Texts(mut texts) if texts.len() == 1 => Ok(Prompt::Text(texts.remove(0))),
        CompletionPrompt::Tokens(ids) => Ok(Prompt::TokenIds(ids)),
        CompletionPrompt::TokenLists(mut lists) if lists.len() == 1 => {
            Ok(Prompt::TokenIds(lists.remove(0)))
        }
        _ => Err(one_only()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::parse_json;
    use proptest::prelude::*;

    /// Runs a body through everything a chat request meets before the engine.
    fn check_chat(body: &[u8]) -> Result<GenerationRequest, ApiError> {
        let request: ChatCompletionRequest = parse_json(body)?;
        let limits = LimitsConfig::default();
        let messages = chat_messages(request.messages, &limits)?;
        generation_request(
            Prompt::Chat(messages),
            &request.params,
            &SamplingDefaults::default(),
            &limits,
        )
    }

    #[test]
    fn openai_fields_map_onto_the_engine_request() {
        let body = br#"{"model": "m", "messages": [{"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
            "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_p": 0.5,
            "seed": -1, "stop": "\n", "n": 1, "unknown_field": {"ignored": true},
            "response_format": {"type": "text"}, "logprobs": false, "presence_penalty": 0}"#;
        let request = check_chat(body).expect("valid");
        assert_eq!(request.max_tokens, Some(7));
        assert_eq!(request.sampling.temperature, 0.0);
        assert_eq!(request.sampling.top_p, 0.5);
        assert_eq!(request.sampling.seed, Some(u64::MAX));
        assert_eq!(request.stop, vec!["\n".to_owned()]);
        let Prompt::Chat(messages) = request.prompt else {
            panic!("not a chat prompt");
        };
        assert_eq!(messages[0].role, "system");
        assert_eq!(messages[1].content, "hi there");
    }

    #[test]
    fn requests_relying_on_unimplemented_fields_are_refused() {
        for (field, value) in [
            ("n", "2"),
            ("logprobs", "true"),
            ("tools", r#"[{"type": "function"}]"#),
            ("logit_bias", r#"{"50256": -100}"#),
            ("frequency_penalty", "0.5"),
        ] {
            let body = format!(
                r#"{{"model": "m", "messages": [{{"role": "user", "content": "x"}}], "{field}": {value}}}"#
            );
            let error = check_chat(body.as_bytes()).expect_err(field);
            assert_eq!(error.detail().code, "unsupported_parameter", "{field}");
        }
    }

    proptest! {
        /// Whatever bytes arrive, the request is refused or accepted, never a panic.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = check_chat(&body);
        }

        /// Well-formed JSON of the right overall shape with arbitrary values.
        #[test]
        fn arbitrary_field_values_never_panic(
            role in "[a-z]{0,10}",
            content in ".{0,40}",
            max_tokens in proptest::option::of(any::<i64>()),
            temperature in proptest::option::of(any::<f32>()),
            n in proptest::option::of(any::<i64>()),
        ) {
            let body = serde_json::json!({
                "model": "m",
                "messages": [{"role": role, "content": content}],
                "max_tokens": max_tokens,
                "temperature": temperature.filter(|t| t.is_finite()),
                "n": n,
            });
            let _ = check_chat(body.to_string().as_bytes());
        }
    }
}
