//! One generation in flight: from logits rows to tokens, text and a finish reason.

use std::collections::HashSet;

use super::backend::SequenceId;
use super::sampler::Sampler;
use super::stop::{StopMatcher, StopOutcome};
use super::tokenizer::{IncrementalDecoder, TextTokenizer, TokenizeError};

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

impl FinishReason {
    /// The name OpenAI's API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// Token counts of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What one step produced for a sequence.
#[derive(Debug, PartialEq, Eq)]
pub enum Advance {
    /// A token was generated; `text` is what it released (may be empty while held back).
    Token { id: u32, text: String },
    /// A token was generated and it ended the generation.
    Finished {
        id: u32,
        text: String,
        reason: FinishReason,
    },
}

/// A sequence's generation state, owned by the engine worker.
#[derive(Debug)]
pub struct Sequence {
    pub id: SequenceId,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    max_new_tokens: usize,
    stop_token_ids: HashSet<u32>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
}

/// Everything a sequence needs, checked before it reaches the worker.
#[derive(Debug)]
pub struct SequenceSpec {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub stop_token_ids: HashSet<u32>,
    pub sampler: Sampler,
    pub stop_strings: Vec<String>,
}

impl Sequence {
    pub fn new(id: SequenceId, spec: SequenceSpec) -> Self {
        let decoder = IncrementalDecoder::after_prompt(&spec.prompt);
        Self {
            id,
            generated: Vec::with_capacity(spec.max_new_tokens.min(1024)),
            prompt: spec.prompt,
            max_new_tokens: spec.max_new_tokens,
            stop_token_ids: spec.stop_token_ids,
            sampler: spec.sampler,
            decoder,
            stops: StopMatcher::new(spec.stop_strings),
        }
    }

    /// Positions the backend must hold for this sequence at most.
    pub fn capacity(&self) -> usize {
        self.prompt.len() + self.max_new_tokens
    }

    /// The tokens to feed on the next step: the prompt first, then the last token.
    pub fn next_input(&self) -> &[u32] {
        match self.generated.last() {
            None => &self.prompt,
            Some(last) => std::slice::from_ref(last),
        }
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.generated.len(),
        }
    }

    /// Samples the next token from this sequence's logits row and turns it into text.
    pub fn advance(
        &mut self,
        logits: &[f32],
        tokenizer: &TextTokenizer,
    ) -> Result<Advance, TokenizeError> {
        let id = self.sampler.sample(logits);
        self.generated.push(id);
        if self.stop_token_ids.contains(&id) {
            let (text, _) = self.flush(tokenizer)?;
            return Ok(Advance::Finished {
                id,
                text,
                reason: FinishReason::Stop,
            });
        }
        let mut text = String::new();
        if let Some(delta) = self.decoder.push(tokenizer, id)? {
            match self.stops.push(&delta) {
                StopOutcome::Continue(released) => text = released,
                StopOutcome::Stopped(released) => {
                    return Ok(Advance::Finished {
                        id,
                        text: released,
                        reason: FinishReason::Stop,
                    });
                }
            }
        }
        if self.generated.len() >= self.max_new_tokens {
            let (tail, stopped) = self.flush(tokenizer)?;
            text.push_str(&tail);
            return Ok(Advance::Finished {
                id,
                text,
                reason: if stopped {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                },
            });
        }
        Ok(Advance::Token { id, text })
    }

    /// Releases held-back text at the end, still honouring stop strings; says whether a
    /// stop string ended it.
    fn flush(&mut self, tokenizer: &TextTokenizer) -> Result<(String, bool), TokenizeError> {
        let mut text = String::new();
        if let Some(tail) = self.decoder.flush(tokenizer)? {
            match self.stops.push(&tail) {
                StopOutcome::Continue(released) => text.push_str(&released),
                StopOutcome::Stopped(released) => return Ok((released, true)),
            }
        }
        text.push_str(&self.stops.finish());
        Ok((text, false))
    }
}
