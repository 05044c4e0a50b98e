//! The one small trait between the engine and the hardware.
//!
//! The engine drives generation through [`Backend`] and knows nothing of ONNX Runtime; the
//! ort backend is the only implementation that touches a device. Every call takes a batch of
//! sequences, so a scheduler can put many sequences into one step without a rewrite.

use std::fmt;
use std::sync::Arc;

use super::prefix_cache::{PrefixScope, PrefixStats};

/// Identifies one sequence (one generation) inside a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(pub u64);

impl fmt::Display for SequenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq-{}", self.0)
    }
}

/// The new tokens of one sequence for one step: the prompt, in one or more chunks
/// (prefill), then one token at a time (decode).
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    pub sequence: SequenceId,
    pub tokens: &'a [u32],
}

/// What a loaded model looks like from the engine's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendModel {
    /// Width of one logits row.
    pub vocab_size: usize,
    /// Most positions (prompt plus generated tokens) one sequence may hold.
    pub context_length: usize,
    /// Where the model runs, for logs and health reports.
    pub device: DeviceKind,
}

/// The device a backend actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

/// The last-position logits of every sequence of a step, one row per [`StepInput`], in
/// order. The buffer is reused from step to step.
#[derive(Debug, Default)]
pub struct LogitsBatch {
    data: Vec<f32>,
    width: usize,
    rows: usize,
}

impl LogitsBatch {
    /// Makes room for `rows` rows of `width` logits, reusing the allocation.
    pub fn reset(&mut self, rows: usize, width: usize) {
        self.rows = rows;
        self.width = width;
        self.data.resize(rows * width, 0.0);
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn row(&self, index: usize) -> &[f32] {
        &self.data[index * self.width..(index + 1) * self.width]
    }

    pub fn row_mut(&mut self, index: usize) -> &mut [f32] {
        &mut self.data[index * self.width..(index + 1) * self.width]
    }
}

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{sequence} is not known to the backend")]
    UnknownSequence { sequence: SequenceId },
    #[error("{sequence} already exists in the backend")]
    DuplicateSequence { sequence: SequenceId },
    #[error("{sequence} would hold {needed} positions but was started with room for {capacity}")]
    CapacityExceeded {
        sequence: SequenceId,
        needed: usize,
        capacity: usize,
    },
    #[error("a step input for {sequence} has no tokens")]
    EmptyStep { sequence: SequenceId },
    #[error("token id {token} is outside the model's vocabulary of {vocab_size}")]
    TokenOutOfVocab { token: u32, vocab_size: usize },
    #[error("the model's logits are {found} wide, but {expected} were expected: {detail}")]
    LogitsShape {
        expected: usize,
        found: usize,
        detail: &'static str,
    },
    #[error("ONNX Runtime failed during {during}: {message}")]
    Runtime {
        during: &'static str,
        message: String,
    },
}

/// A model loaded on a device, stepping batches of sequences.
///
/// Implementations own all device state (sessions, KV caches). Sequences are started with
/// a fixed capacity so their caches can be allocated once and never grown per token.
pub trait Backend: Send {
    /// The shape of the loaded model.
    fn model(&self) -> &BackendModel;

    /// Reserves state for a new sequence that will hold at most `capacity` positions.
    fn start_sequence(&mut self, sequence: SequenceId, capacity: usize)
    -> Result<(), BackendError>;

    /// Runs one forward step for every input and writes each one's last-position logits
    /// into `logits`, row `i` for `batch[i]`.
    fn step(
        &mut self,
        batch: &[StepInput<'_>],
        logits: &mut LogitsBatch,
    ) -> Result<(), BackendError>;

    /// Releases a sequence's state. Unknown ids are ignored.
    fn finish_sequence(&mut self, sequence: SequenceId);

    /// Lets a sequence just started share its prompt's prefixes within `scope`: use those
    /// cached, and cache its own. Backends without a prefix cache ignore it.
    fn share_prefixes(&mut self, _sequence: SequenceId, _scope: PrefixScope) {}

    /// The prefix cache's counters, for a backend that keeps one.
    fn prefix_stats(&self) -> Option<Arc<PrefixStats>> {
        None
    }
}
