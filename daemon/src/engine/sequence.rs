//! One generation in flight: from logits rows to tokens, text and a finish reason.

use std::collections::HashSet;

use super::backend::SequenceId;
use super::constraint::{Constraint, ConstraintFailure};
use super::prefix_cache::PrefixScope;
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
    /// Prompt tokens already fed to the backend.
    prefilled: usize,
    /// Most prompt tokens fed in one step, so a long prompt shares steps with the decodes
    /// of other sequences instead of stalling them.
    prefill_chunk: usize,
    generated: Vec<u32>,
    max_new_tokens: usize,
    stop_token_ids: HashSet<u32>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    constraint: Option<Constraint>,
    /// Where its prompt's prefixes may be shared (`None`: not at all).
    pub prefix_scope: Option<PrefixScope>,
}

/// Why a sequence could not advance.
#[derive(Debug, thiserror::Error)]
pub enum AdvanceError {
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    #[error(transparent)]
    Constraint(#[from] ConstraintFailure),
}

/// Everything a sequence needs, checked before it reaches the worker.
#[derive(Debug)]
pub struct SequenceSpec {
    pub prompt: Vec<u32>,
    pub max_new_tokens: usize,
    pub stop_token_ids: HashSet<u32>,
    pub sampler: Sampler,
    pub stop_strings: Vec<String>,
    pub prefill_chunk: usize,
    /// The shape the answer must have, enforced token by token.
    pub constraint: Option<Constraint>,
    /// Where its prompt's prefixes may be shared (`None`: not at all).
    pub prefix_scope: Option<PrefixScope>,
}

impl Sequence {
    pub fn new(id: SequenceId, spec: SequenceSpec) -> Self {
        let decoder = IncrementalDecoder::after_prompt(&spec.prompt);
        Self {
            id,
            generated: Vec::with_capacity(spec.max_new_tokens.min(1024)),
            prompt: spec.prompt,
            prefilled: 0,
            prefill_chunk: spec.prefill_chunk.max(1),
            max_new_tokens: spec.max_new_tokens,
            stop_token_ids: spec.stop_token_ids,
            sampler: spec.sampler,
            decoder,
            stops: StopMatcher::new(spec.stop_strings),
            constraint: spec.constraint,
            prefix_scope: spec.prefix_scope,
        }
    }

    /// Positions the backend must hold for this sequence at most.
    pub fn capacity(&self) -> usize {
        self.prompt.len() + self.max_new_tokens
    }

    /// The tokens to feed on the next step: the prompt chunk by chunk, then the last token.
    pub fn next_input(&self) -> &[u32] {
        if self.prefilled < self.prompt.len() {
            let end = (self.prefilled + self.prefill_chunk).min(self.prompt.len());
            return &self.prompt[self.prefilled..end];
        }
        match self.generated.last() {
            Some(last) => std::slice::from_ref(last),
            None => &[],
        }
    }

    /// Records that the step fed [`Self::next_input`]; true when its logits are for the
    /// last prompt position or a generated token, i.e. when a token should be sampled.
    pub fn record_step(&mut self) -> bool {
        if self.prefilled < self.prompt.len() {
            self.prefilled = (self.prefilled + self.prefill_chunk).min(self.prompt.len());
            return self.prefilled == self.prompt.len();
        }
        true
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
    ) -> Result<Advance, AdvanceError> {
        // Rows past the tokenizer's ids pad the model's vocabulary: never trained, never
        // chosen (the engine admits at most a tenth of padding at load).
        let logits = &logits[..tokenizer.vocab_size().min(logits.len())];
        let id = match &mut self.constraint {
            None => self.sampler.sample(logits),
            Some(constraint) => {
                let mask = constraint.mask()?;
                let id = self
                    .sampler
                    .sample_allowed(logits, |i| mask.is_allowed(i as u32))
                    .ok_or_else(|| {
                        ConstraintFailure::Matcher("the grammar allows no token".into())
                    })?;
                constraint.consume(id)?;
                id
            }
        };
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
        // A grammar that is complete and allows nothing more ends the answer with this
        // token, as an end-of-sequence token would.
        let complete = self.constraint.as_ref().is_some_and(Constraint::is_stopped);
        if complete || self.generated.len() >= self.max_new_tokens {
            let (tail, stopped) = self.flush(tokenizer)?;
            text.push_str(&tail);
            return Ok(Advance::Finished {
                id,
                text,
                reason: if complete || stopped {
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
