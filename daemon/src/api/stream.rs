//! Server-sent events for `stream: true`, in OpenAI's chunk format, ending with
//! `data: [DONE]`.
//!
//! The body owns the [`GenerationStream`]: when the client goes away actix drops the body,
//! which drops the stream, which cancels the generation and frees its slot at the engine's
//! next step.

use actix_web::web::Bytes;
use futures_util::Stream;
use serde::Serialize;

use super::answer::Answering;
use super::audit_trail::FinalRecord;
use super::error::ApiError;
use super::openai::{Endpoint, ResponseMeta, UsageOut};
use crate::engine::{GenerationEvent, GenerationStream};

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
    answer: Answering,
    /// The request's final record, written before the last event; dropped with the stream
    /// (the client went away) it is recorded as abandoned.
    record: Option<FinalRecord>,
    /// How the stream ended (status and error code), until its record is stored.
    ending: Option<(u16, String)>,
    opened: bool,
    done: bool,
}

/// The response body: one chunk per event that releases text, then the final chunks.
pub fn sse_body(
    events: GenerationStream,
    format: StreamFormat,
    answer: Answering,
    record: FinalRecord,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let state = StreamState {
        events,
        format,
        answer,
        record: Some(record),
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
            if let Some((status, code)) = state.ending.take()
                && let Some(record) = state.record.take()
            {
                // The last events go out only once the request's record is durable.
                if let Err(refusal) = record.write(status, &code).await {
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
            Some(GenerationEvent::Token { text, .. }) => match self.answer.token(&text) {
                Ok(released) if released.is_empty() => return false,
                Ok(released) => self.format.text(&released, out),
                Err(refusal) => self.end(refusal, out),
            },
            Some(GenerationEvent::Finished { reason, usage }) => {
                match self.answer.finished(reason, usage) {
                    Ok(rest) => {
                        if !rest.is_empty() {
                            self.format.text(&rest, out);
                        }
                        self.format.finish(reason.as_str(), usage.into(), out);
                        self.ending = Some((200, String::new()));
                        self.done = true;
                    }
                    Err(refusal) => self.end(refusal, out),
                }
            }
            Some(GenerationEvent::Failed(error)) => {
                let error = ApiError::from_engine(error, &self.format.meta.model);
                let error = self.answer.failed(error);
                self.end(error, out);
            }
            None => {
                let model = self.format.meta.model.clone();
                let error = self.answer.failed(ApiError::Unavailable { model });
                self.end(error, out);
            }
        }
        true
    }

    /// Ends the stream with `error` (already noted by the answer).
    fn end(&mut self, error: ApiError, out: &mut Vec<u8>) {
        use actix_web::ResponseError as _;
        let status = error.status_code().as_u16();
        self.ending = Some((status, error.detail().code.to_owned()));
        self.format.failure(error, out);
        self.done = true;
    }
}
