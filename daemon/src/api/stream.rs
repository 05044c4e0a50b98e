//! Server-sent events for `stream: true`, in OpenAI's chunk format, ending with
//! `data: [DONE]`.
//!
//! The body owns the [`GenerationStream`]: when the client goes away actix drops the body,
//! which drops the stream, which cancels the generation and frees its slot at the engine's
//! next step.

use actix_web::web::Bytes;
use futures_util::Stream;
use serde::Serialize;

use std::sync::Arc;

use moat_core::policy::content::{AnswerStream, Withheld};
use moat_core::policy::{AccessPolicy, ReasonCode};

use super::audit_trail::AuditNotes;
use super::error::ApiError;
use super::error::CLIENT_CLOSED_REQUEST;
use super::guard::Admitted;
use super::openai::{Endpoint, ResponseMeta, UsageOut};
use crate::engine::{AnswerCheck, FinishReason, GenerationEvent, GenerationStream};
use crate::metrics::GenerationTimer;

/// Writes the chunks of one response.
#[derive(Debug)]
pub struct StreamFormat {
    meta: ResponseMeta,
}

#[derive(Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: C,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageOut>,
}

#[derive(Serialize)]
struct ChatDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct ChatChunkChoice<'a> {
    index: u32,
    delta: ChatDelta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct TextChunkChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

impl StreamFormat {
    pub fn new(meta: ResponseMeta) -> Self {
        Self { meta }
    }

    fn event<C: Serialize>(&self, choices: C, usage: Option<UsageOut>, out: &mut Vec<u8>) {
        let object = match self.meta.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let chunk = Chunk {
            id: &self.meta.id,
            object,
            created: self.meta.created,
            model: &self.meta.model,
            choices,
            usage,
        };
        out.extend_from_slice(b"data: ");
        // Serializing plain structs of strings and numbers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &chunk);
        out.extend_from_slice(b"\n\n");
    }

    /// The chat stream opens with the assistant's role, as OpenAI's does.
    fn opening(&self, out: &mut Vec<u8>) {
        if self.meta.endpoint == Endpoint::Chat {
            let delta = ChatDelta {
                role: Some("assistant"),
                content: Some(""),
            };
            self.event([chat_choice(delta, None)], None, out);
        }
    }

    fn text(&self, text: &str, out: &mut Vec<u8>) {
        self.choice(Some(text), None, out);
    }

    fn choice(&self, text: Option<&str>, finish: Option<&'static str>, out: &mut Vec<u8>) {
        match self.meta.endpoint {
            Endpoint::Chat => {
                let delta = ChatDelta {
                    role: None,
                    content: text,
                };
                self.event([chat_choice(delta, finish)], None, out);
            }
            Endpoint::Completion => {
                let choice = TextChunkChoice {
                    index: 0,
                    text: text.unwrap_or(""),
                    logprobs: None,
                    finish_reason: finish,
                };
                self.event([choice], None, out);
            }
        }
    }

    fn finish(&self, reason: &'static str, usage: UsageOut, out: &mut Vec<u8>) {
        self.choice(None, Some(reason), out);
        if self.meta.include_usage {
            self.event::<[(); 0]>([], Some(usage), out);
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }

    fn failure(&self, error: ApiError, out: &mut Vec<u8>) {
        #[derive(Serialize)]
        struct ErrorEvent<'a> {
            error: super::error::ErrorDetail<'a>,
        }
        out.extend_from_slice(b"data: ");
        let _ = serde_json::to_writer(
            &mut *out,
            &ErrorEvent {
                error: error.detail(),
            },
        );
        out.extend_from_slice(b"\n\n");
    }
}

fn chat_choice<'a>(delta: ChatDelta<'a>, finish: Option<&'static str>) -> ChatChunkChoice<'a> {
    ChatChunkChoice {
        index: 0,
        delta,
        logprobs: None,
        finish_reason: finish,
    }
}

struct StreamState {
    events: GenerationStream,
    format: StreamFormat,
    timer: GenerationTimer,
    filter: AnswerFilter,
    admitted: Option<Admitted>,
    notes: AuditNotes,
    /// Tokens generated so far.
    tokens: u64,
    check: AnswerCheck,
    /// How the stream ended (status and error code), until its record is stored.
    ending: Option<(u16, String)>,
    opened: bool,
    done: bool,
}

impl Drop for StreamState {
    /// A stream dropped before its end: the client went away.
    fn drop(&mut self) {
        self.notes.finish_abandoned(CLIENT_CLOSED_REQUEST);
    }
}

/// The response body: one chunk per event that releases text, then the final chunks.
pub fn sse_body(
    events: GenerationStream,
    format: StreamFormat,
    timer: GenerationTimer,
    admitted: Admitted,
    check: AnswerCheck,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let state = StreamState {
        events,
        format,
        timer,
        filter: AnswerFilter::new(Arc::clone(&admitted.policy)),
        notes: admitted.notes.clone(),
        admitted: Some(admitted),
        check,
        tokens: 0,
        ending: None,
        opened: false,
        done: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let mut out = Vec::with_capacity(256);
        if !state.opened {
            state.opened = true;
            state.format.opening(&mut out);
        }
        loop {
            let event = state.events.next().await;
            if !state.step(event, &mut out) {
                continue;
            }
            if let Some((status, code)) = state.ending.take() {
                // The last events go out only once the request's record is durable.
                if let Err(refusal) = state.notes.finish(status, &code).await {
                    out.clear();
                    state.format.failure(refusal, &mut out);
                }
            }
            return Some((Ok(Bytes::from(out)), state));
        }
    })
}

impl StreamState {
    /// Handles one event; false when it released nothing to send yet.
    fn step(&mut self, event: Option<GenerationEvent>, out: &mut Vec<u8>) -> bool {
        match event {
            Some(GenerationEvent::Token { text, .. }) => {
                self.timer.token();
                self.tokens += 1;
                match self.filter.push(&text) {
                    Ok(released) if released.is_empty() => return false,
                    Ok(released) => self.format.text(&released, out),
                    Err(withheld) => {
                        // Refused before `Finished`: the answer so far is the evidence.
                        self.notes
                            .answered(&self.filter.policy, self.filter.answer(), self.tokens);
                        self.fail(withheld, out);
                    }
                }
            }
            Some(GenerationEvent::Finished { reason, usage }) => {
                self.timer.finished(usage);
                let tokens = usage.completion_tokens as u64;
                self.notes
                    .answered(&self.filter.policy, self.filter.answer(), tokens);
                if let Some(admitted) = self.admitted.take() {
                    admitted.settle(tokens);
                }
                if reason == FinishReason::Stop
                    && let Err(e) = self.check.validate(self.filter.answer())
                {
                    self.fail(ApiError::Internal(e.to_string()), out);
                    return true;
                }
                match self.filter.finish() {
                    Ok(rest) => {
                        if !rest.is_empty() {
                            self.format.text(&rest, out);
                        }
                        self.format.finish(reason.as_str(), usage.into(), out);
                        self.ending = Some((200, String::new()));
                        self.done = true;
                    }
                    Err(withheld) => self.fail(withheld, out),
                }
            }
            Some(GenerationEvent::Failed(error)) => {
                let model = self.format.meta.model.clone();
                self.fail(ApiError::from_engine(error, &model), out);
            }
            None => {
                let model = self.format.meta.model.clone();
                self.fail(ApiError::Unavailable { model }, out);
            }
        }
        true
    }

    fn fail(&mut self, error: ApiError, out: &mut Vec<u8>) {
        use actix_web::ResponseError as _;
        if let ApiError::AnswerWithheld { reason } = &error {
            // The answer noted so far is the evidence of what was withheld.
            self.notes.withheld(reason);
        }
        let status = error.status_code().as_u16();
        self.ending = Some((status, error.detail().code.to_owned()));
        self.format.failure(error, out);
        self.done = true;
    }
}

/// The answer rules on a streamed answer: what may be sent as it grows, checked by the
/// policy's content rules in `moat-core` (`AnswerStream`), so that nothing of a match leaves
/// before it is judged. The whole answer is kept there for the audit.
struct AnswerFilter {
    policy: Arc<AccessPolicy>,
    stream: AnswerStream,
}

impl AnswerFilter {
    fn new(policy: Arc<AccessPolicy>) -> Self {
        let stream = policy.content().answer_stream();
        Self { policy, stream }
    }

    /// Adds generated text; returns what may be sent now, or the refusal.
    fn push(&mut self, text: &str) -> Result<String, ApiError> {
        self.stream.push(text).map_err(withheld)
    }

    /// The answer is complete: the rest, or the refusal.
    fn finish(&mut self) -> Result<String, ApiError> {
        self.stream.finish().map_err(withheld)
    }

    /// The whole answer as generated so far.
    fn answer(&self) -> &str {
        self.stream.answer()
    }
}

fn withheld(refusal: Withheld) -> ApiError {
    ApiError::AnswerWithheld {
        reason: ReasonCode::Content(refusal.detector).as_str(),
    }
}
