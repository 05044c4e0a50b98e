//! Server-sent events for `stream: true`, in OpenAI's chunk format, ending with
//! `data: [DONE]`.
//!
//! The body owns the [`GenerationStream`]: when the client goes away actix drops the body,
//! which drops the stream, which cancels the generation and frees its slot at the engine's
//! next step.

use actix_web::web::Bytes;
use futures_util::Stream;
use serde::Serialize;

use super::error::ApiError;
use super::generate::{Endpoint, ResponseMeta};
use super::openai::UsageOut;
use crate::engine::{GenerationEvent, GenerationStream};
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
    opened: bool,
    done: bool,
}

/// The response body: one chunk per event that releases text, then the final chunks.
pub fn sse_body(
    events: GenerationStream,
    format: StreamFormat,
    timer: GenerationTimer,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let state = StreamState {
        events,
        format,
        timer,
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
            match state.events.next().await {
                Some(GenerationEvent::Token { text, .. }) => {
                    state.timer.token();
                    if text.is_empty() {
                        continue; // held back (partial character or possible stop string)
                    }
                    state.format.text(&text, &mut out);
                }
                Some(GenerationEvent::Finished { reason, usage }) => {
                    state.timer.finished(usage);
                    state.format.finish(reason.as_str(), usage.into(), &mut out);
                    state.done = true;
                }
                Some(GenerationEvent::Failed(error)) => {
                    let model = state.format.meta.model.clone();
                    state
                        .format
                        .failure(ApiError::from_engine(error, &model), &mut out);
                    state.done = true;
                }
                None => {
                    let model = state.format.meta.model.clone();
                    state
                        .format
                        .failure(ApiError::Unavailable { model }, &mut out);
                    state.done = true;
                }
            }
            return Some((Ok(Bytes::from(out)), state));
        }
    })
}
