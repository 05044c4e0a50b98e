//! Sentence embeddings: an encoder model turns each input text into one vector.
//!
//! [`Embedder::embed`] tokenizes the inputs (with the model's special tokens), runs them
//! through the encoder in right-padded batches of similar lengths, mean-pools each input's
//! hidden states over its own tokens and, when the model says so, scales the result to
//! unit length. Padding never changes a vector: padded positions are masked in the graph
//! and skipped by the pooling.
//!
//! Unlike text generation there is no engine thread: one call is one or a few session runs
//! that finish in milliseconds, so callers run it on a blocking-capable thread
//! (`tokio::task::spawn_blocking`) and concurrent calls take turns on the session.

use std::path::Path;
use std::sync::Mutex;

use moat_core::{EmbeddingSpec, ModelMetadata, Pooling};

use super::StartError;
use super::backend::{BackendError, DeviceKind};
use super::model_dir::{ModelDirError, ModelDirectory};
use super::ort_backend::encoder::{EncoderSession, HiddenStates, PaddedBatch};
use super::ort_backend::{OrtRuntime, SessionOptions};
use super::tokenizer::TextTokenizer;

/// Most inputs one call may embed.
pub const MAX_INPUTS: usize = 256;
/// Most inputs in one session run; a call with more runs several batches.
pub const MAX_BATCH_INPUTS: usize = 32;
/// Most positions (rows x padded width) in one session run, which bounds the attention
/// scores a run holds (`rows x heads x width^2` floats per layer).
const MAX_BATCH_POSITIONS: usize = 8192;
/// Below this length a vector is left as it is rather than scaled to unit length (the
/// epsilon of sentence-transformers' normalisation).
const NORM_EPSILON: f64 = 1e-12;

/// An embedding model loaded into ONNX Runtime.
///
/// `Send + Sync`: share it (in an `Arc`) between request threads. The session sits behind a
/// mutex because a run needs exclusive access to it; ONNX Runtime already spreads one run
/// over all the intra-op threads, so concurrent calls would gain nothing from running side
/// by side, and taking turns keeps memory bounded to one batch at a time.
#[derive(Debug)]
pub struct Embedder {
    metadata: ModelMetadata,
    spec: EmbeddingSpec,
    tokenizer: TextTokenizer,
    session: Mutex<EncoderSession>,
    device: DeviceKind,
}

// Request threads share one embedder in an `Arc`: this stops compiling if they could not.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    shareable::<Embedder>();
};

/// The vectors of one call, in input order.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens fed to the model for all inputs together, special tokens included.
    pub prompt_tokens: usize,
}

/// Why inputs could not be embedded. Each variant is a case callers handle.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EmbedError {
    #[error("the input is empty: send at least one non-empty text")]
    EmptyInput,
    #[error("{count} inputs were sent, at most {max} are allowed in one request")]
    TooManyInputs { count: usize, max: usize },
    #[error(
        "input {index} has {tokens} tokens, more than the model's limit of {max}; shorten it or \
         split it into several inputs"
    )]
    InputTooLong {
        index: usize,
        tokens: usize,
        max: usize,
    },
    #[error(
        "input {index} tokenized to id {id}, outside the model's vocabulary of {vocab_size}; the \
         tokenizer does not match the model"
    )]
    TokenOutOfVocab {
        index: usize,
        id: u32,
        vocab_size: usize,
    },
    #[error("tokenizer failed: {0}")]
    Tokenize(String),
    #[error("inference failed: {0}")]
    Inference(String),
}

impl From<BackendError> for EmbedError {
    fn from(e: BackendError) -> Self {
        EmbedError::Inference(e.to_string())
    }
}

/// Inputs an embedder checked and tokenised ([`Embedder::prepare`]).
#[derive(Debug, Clone)]
pub struct PreparedInputs(Vec<Vec<u32>>);

impl PreparedInputs {
    /// Their length in tokens, all inputs together.
    pub fn tokens(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }
}

impl Embedder {
    /// Loads an embedding model directory into ONNX Runtime on the preferred device, checks
    /// that tokenizer, graph and metadata agree, and runs one warm-up input. Refuses a
    /// text-generation model.
    pub fn load_ort(
        runtime: &OrtRuntime,
        model_dir: &Path,
        options: &SessionOptions,
    ) -> Result<Embedder, StartError> {
        Self::load_ort_directory(runtime, ModelDirectory::open(model_dir)?, options)
    }

    /// [`Embedder::load_ort`] for a model directory already opened.
    pub fn load_ort_directory(
        runtime: &OrtRuntime,
        model: ModelDirectory,
        options: &SessionOptions,
    ) -> Result<Embedder, StartError> {
        let spec = model.embedding_spec()?;
        let tokenizer = TextTokenizer::load(&model.tokenizer_path(), None)?;
        if tokenizer.vocab_size() != model.metadata.vocab_size {
            return Err(ModelDirError::TokenizerVocabMismatch {
                path: model.tokenizer_path(),
                tokenizer_vocab: tokenizer.vocab_size(),
                declared: model.metadata.vocab_size,
            }
            .into());
        }
        let session = EncoderSession::load(runtime, &model, options)?;
        let embedder = Embedder {
            metadata: model.metadata,
            spec,
            tokenizer,
            device: session.device(),
            session: Mutex::new(session),
        };
        embedder.warm_up()?;
        Ok(embedder)
    }

    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// Longest input in tokens, special tokens included (`context_length`).
    pub fn max_input_tokens(&self) -> usize {
        self.metadata.context_length
    }

    /// Width of every vector.
    pub fn dimensions(&self) -> usize {
        self.spec.dim
    }

    /// Where the model runs.
    pub fn device(&self) -> DeviceKind {
        self.device
    }

    /// Token ids of each input as the model sees them (special tokens included), after the
    /// checks `embed` makes: at least one and at most [`MAX_INPUTS`] inputs, none empty, none
    /// longer than [`Embedder::max_input_tokens`] (inputs are never truncated).
    pub fn tokenize(&self, inputs: &[String]) -> Result<Vec<Vec<u32>>, EmbedError> {
        if inputs.is_empty() {
            return Err(EmbedError::EmptyInput);
        }
        if inputs.len() > MAX_INPUTS {
            return Err(EmbedError::TooManyInputs {
                count: inputs.len(),
                max: MAX_INPUTS,
            });
        }
        let max = self.max_input_tokens();
        let vocab_size = self.metadata.vocab_size;
        inputs
            .iter()
            .enumerate()
            .map(|(index, text)| {
                if text.is_empty() {
                    return Err(EmbedError::EmptyInput);
                }
                let ids = self
                    .tokenizer
                    .encode_with_special_tokens(text)
                    .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
                if ids.is_empty() {
                    // Only a tokenizer without special tokens can get here (whitespace only);
                    // there is nothing to average.
                    return Err(EmbedError::EmptyInput);
                }
                if ids.len() > max {
                    return Err(EmbedError::InputTooLong {
                        index,
                        tokens: ids.len(),
                        max,
                    });
                }
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
                    return Err(EmbedError::TokenOutOfVocab {
                        index,
                        id,
                        vocab_size,
                    });
                }
                Ok(ids)
            })
            .collect()
    }

    /// The inputs checked and tokenised once ([`Embedder::tokenize`]), ready for
    /// [`Embedder::embed_prepared`] on this embedder.
    pub fn prepare(&self, inputs: &[String]) -> Result<PreparedInputs, EmbedError> {
        self.tokenize(inputs).map(PreparedInputs)
    }

    /// One vector per input, in input order. Blocks for the duration of the session runs:
    /// call it from a thread that may block, never from an async worker.
    pub fn embed(&self, inputs: &[String]) -> Result<Embeddings, EmbedError> {
        self.embed_prepared(&self.prepare(inputs)?)
    }

    /// [`Embedder::embed`] of inputs this embedder prepared.
    pub fn embed_prepared(&self, inputs: &PreparedInputs) -> Result<Embeddings, EmbedError> {
        let ids = &inputs.0;
        let prompt_tokens = inputs.tokens();
        let mut vectors = vec![Vec::new(); ids.len()];
        for batch in batches(ids) {
            let rows: Vec<&[u32]> = batch.iter().map(|&i| ids[i].as_slice()).collect();
            let pooled = self.run_batch(&PaddedBatch::new(&rows))?;
            for (&index, vector) in batch.iter().zip(pooled) {
                vectors[index] = vector;
            }
        }
        Ok(Embeddings {
            vectors,
            prompt_tokens,
        })
    }

    /// Runs one padded batch and returns each row's pooled (and normalised) vector.
    fn run_batch(&self, batch: &PaddedBatch) -> Result<Vec<Vec<f32>>, EmbedError> {
        let spec = self.spec;
        // A panic elsewhere while the lock was held leaves nothing half-done in the session
        // (a run either completes or fails as a whole), so a poisoned lock is still usable.
        let mut session = self
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let vectors = session.run(batch, |states| {
            (0..batch.rows)
                .map(|row| pool(&states, row, batch.tokens_in_row(row), spec))
                .collect::<Vec<_>>()
        })?;
        drop(session);
        if vectors.iter().flatten().any(|v| !v.is_finite()) {
            return Err(EmbedError::Inference(
                "the model produced a non-finite value".to_owned(),
            ));
        }
        Ok(vectors)
    }

    /// Embeds one short input: proves the graph runs on this device and returns vectors of
    /// the declared width before any request depends on it.
    fn warm_up(&self) -> Result<(), StartError> {
        let failed = |message: String| {
            StartError::WarmUp(BackendError::Runtime {
                during: "the warm-up embedding",
                message,
            })
        };
        let embeddings = self
            .embed(&["warm-up".to_owned()])
            .map_err(|e| failed(e.to_string()))?;
        match embeddings.vectors.first() {
            Some(vector) if vector.len() == self.spec.dim => Ok(()),
            other => Err(failed(format!(
                "expected one vector of {} values, got {:?} values",
                self.spec.dim,
                other.map(Vec::len)
            ))),
        }
    }
}

/// Splits inputs into session runs: indices ordered by length, so each run pads little,
/// with at most [`MAX_BATCH_INPUTS`] inputs and [`MAX_BATCH_POSITIONS`] padded positions
/// per run (always at least one input).
fn batches(ids: &[Vec<u32>]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for index in order {
        // Ascending lengths: this input sets the batch's width.
        let width = ids[index].len();
        let fits = current.len() < MAX_BATCH_INPUTS
            && (current.len() + 1).saturating_mul(width) <= MAX_BATCH_POSITIONS;
        if !fits && !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
        current.push(index);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Pools one row's hidden states over its `tokens` real positions.
fn pool(states: &HiddenStates<'_>, row: usize, tokens: usize, spec: EmbeddingSpec) -> Vec<f32> {
    let mut sum = vec![0f64; spec.dim];
    let mut count = 0usize;
    match spec.pooling {
        Pooling::Mean => {
            for position in states.row_tokens(row, tokens) {
                for (acc, &value) in sum.iter_mut().zip(position) {
                    *acc += f64::from(value);
                }
                count += 1;
            }
        }
    }
    let count = count.max(1) as f64;
    let mut vector: Vec<f64> = sum.into_iter().map(|v| v / count).collect();
    if spec.normalize {
        let norm = vector.iter().map(|v| v * v).sum::<f64>().sqrt();
        let scale = 1.0 / norm.max(NORM_EPSILON);
        vector.iter_mut().for_each(|v| *v *= scale);
    }
    vector.into_iter().map(|v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(lens: &[usize]) -> Vec<Vec<u32>> {
        lens.iter().map(|&n| vec![1; n]).collect()
    }

    #[test]
    fn batches_group_similar_lengths_and_cover_every_input_once() {
        let ids = lengths(&[5, 200, 3, 5, 64]);
        let runs = batches(&ids);
        let mut seen: Vec<usize> = runs.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert_eq!(runs[0][0], 2, "shortest first");
        assert!(runs.iter().all(|run| run.len() <= MAX_BATCH_INPUTS));
    }

    #[test]
    fn batches_bound_rows_and_padded_positions() {
        let runs = batches(&lengths(&[1; 100]));
        assert_eq!(
            runs.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![32, 32, 32, 4]
        );
        let runs = batches(&lengths(&[512; 40]));
        assert!(
            runs.iter()
                .all(|run| run.len() * 512 <= MAX_BATCH_POSITIONS)
        );
        // An input wider than the position budget still runs, alone.
        let runs = batches(&lengths(&[3, MAX_BATCH_POSITIONS + 1]));
        assert_eq!(runs, vec![vec![0], vec![1]]);
    }

    #[test]
    fn mean_pooling_skips_padding_and_normalises() {
        // Two rows, width 3, hidden 2; row 1 has one token, then padding full of junk.
        let data = [
            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 3.0, 4.0, 99.0, 99.0, -99.0, 7.0,
        ];
        let states = HiddenStates {
            data: &data,
            width: 3,
            hidden: 2,
        };
        let raw = EmbeddingSpec {
            dim: 2,
            pooling: Pooling::Mean,
            normalize: false,
        };
        assert_eq!(pool(&states, 0, 3, raw), vec![3.0, 4.0]);
        assert_eq!(pool(&states, 1, 1, raw), vec![3.0, 4.0]);
        let unit = EmbeddingSpec {
            normalize: true,
            ..raw
        };
        assert_eq!(pool(&states, 1, 1, unit), vec![0.6, 0.8]);
    }

    #[test]
    fn a_zero_vector_stays_zero_when_normalised() {
        let data = [0.0f32; 4];
        let states = HiddenStates {
            data: &data,
            width: 2,
            hidden: 2,
        };
        let spec = EmbeddingSpec {
            dim: 2,
            pooling: Pooling::Mean,
            normalize: true,
        };
        assert_eq!(pool(&states, 0, 2, spec), vec![0.0, 0.0]);
    }
}
