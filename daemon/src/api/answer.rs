//! Finishing an answer, one way for whole and streamed answers: the generation timer, the
//! audit notes, the settlement with the department's limits, the check that a constrained
//! answer has its shape, and the content rules on the answer.
//!
//! The two forms differ only in when text may leave: a whole answer is judged once it is
//! complete, a streamed one as it grows ([`AnswerStream`] holds back what a rule could
//! still match), so that nothing of a match leaves before it is judged.

use moat_core::policy::ReasonCode;
use moat_core::policy::content::{AnswerStream, Withheld};

use super::error::ApiError;
use super::guard::{self, Admitted};
use crate::engine::{AnswerCheck, FinishReason, Usage};
use crate::metrics::GenerationTimer;

/// An admitted request's answer as it is generated.
#[derive(Debug)]
pub struct Answering {
    admitted: Admitted,
    timer: GenerationTimer,
    check: AnswerCheck,
    text: AnswerText,
    /// Tokens generated so far.
    tokens: u64,
}

/// The answer's text so far, and how it may leave.
#[derive(Debug)]
enum AnswerText {
    Whole(String),
    Streamed(AnswerStream),
}

impl Answering {
    /// An answer sent whole once it is complete.
    pub fn whole(admitted: Admitted, timer: GenerationTimer, check: AnswerCheck) -> Self {
        Self::new(admitted, timer, check, AnswerText::Whole(String::new()))
    }

    /// An answer sent as it grows.
    pub fn streamed(admitted: Admitted, timer: GenerationTimer, check: AnswerCheck) -> Self {
        let stream = admitted.policy().content().answer_stream();
        Self::new(admitted, timer, check, AnswerText::Streamed(stream))
    }

    fn new(
        admitted: Admitted,
        timer: GenerationTimer,
        check: AnswerCheck,
        text: AnswerText,
    ) -> Self {
        Self {
            admitted,
            timer,
            check,
            text,
            tokens: 0,
        }
    }

    /// A generated token's text; returns what may be sent now (nothing, for a whole
    /// answer), or the refusal when a rule withholds the answer.
    pub fn token(&mut self, piece: &str) -> Result<String, ApiError> {
        self.timer.token();
        self.tokens += 1;
        match &mut self.text {
            AnswerText::Whole(text) => {
                text.push_str(piece);
                Ok(String::new())
            }
            AnswerText::Streamed(stream) => match stream.push(piece) {
                Ok(released) => Ok(released),
                Err(refusal) => {
                    // Refused before the end: the answer so far is the evidence.
                    self.admitted.notes().answered(
                        self.admitted.policy(),
                        stream.answer(),
                        self.tokens,
                    );
                    Err(self.failed(withheld(refusal)))
                }
            },
        }
    }

    /// Generation finished: notes the answer, settles the limits, proves a constrained
    /// answer's shape and applies the answer rules. Returns the text still to send (the
    /// whole answer, or a stream's held-back rest), `redact` rules masked, or the refusal.
    pub fn finished(&mut self, reason: FinishReason, usage: Usage) -> Result<String, ApiError> {
        self.timer.finished(usage);
        let tokens = usage.completion_tokens as u64;
        self.admitted
            .notes()
            .answered(self.admitted.policy(), self.answer(), tokens);
        self.admitted.settle(tokens);
        if reason == FinishReason::Stop
            && let Err(e) = self.check.validate(self.answer())
        {
            // The constraint made it so; this proves it before anyone relies on it.
            return Err(self.failed(ApiError::Internal(e.to_string())));
        }
        let rest = match &mut self.text {
            AnswerText::Whole(text) => guard::check_answer(self.admitted.policy(), text),
            AnswerText::Streamed(stream) => stream.finish().map_err(withheld),
        };
        rest.map_err(|refusal| self.failed(refusal))
    }

    /// The answer ends with `error` instead: a withheld answer's reason goes into the
    /// record (whose noted answer is the evidence of what was withheld).
    pub fn failed(&self, error: ApiError) -> ApiError {
        if let ApiError::AnswerWithheld { reason } = &error {
            self.admitted.notes().withheld(reason);
        }
        error
    }

    /// The whole answer as generated so far.
    fn answer(&self) -> &str {
        match &self.text {
            AnswerText::Whole(text) => text,
            AnswerText::Streamed(stream) => stream.answer(),
        }
    }
}

fn withheld(refusal: Withheld) -> ApiError {
    ApiError::AnswerWithheld {
        reason: ReasonCode::Content(refusal.detector).as_str(),
    }
}
