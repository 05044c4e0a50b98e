//! An encoder graph (the `encoder` I/O contract) in an ONNX Runtime session: right-padded
//! batches of token ids in, per-token hidden states out. Pooling is the caller's business
//! ([`crate::engine::embedder`]); this file only drives the session.

use std::path::Path;

use ort::session::{Session, SessionInputValue};
use ort::value::{Tensor, TensorElementType, ValueType};

use super::session::{LoadError, OrtRuntime, SessionOptions, create_session};
use crate::engine::backend::{BackendError, DeviceKind};
use crate::engine::model_dir::{METADATA_FILE, ModelDirError, ModelDirectory};

const INPUT_IDS: &str = "input_ids";
const ATTENTION_MASK: &str = "attention_mask";
/// Optional in the contract: BERT exports have it, others (DistilBERT) do not. Fed as zeros.
const TOKEN_TYPE_IDS: &str = "token_type_ids";
const LAST_HIDDEN_STATE: &str = "last_hidden_state";

/// Token ids of several inputs, right-padded to one width, ready for one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    /// `[rows, width]`, row-major; padding positions hold 0.
    pub input_ids: Vec<i64>,
    /// `[rows, width]`: 1 for each input's tokens, 0 for padding.
    pub attention_mask: Vec<i64>,
    pub rows: usize,
    pub width: usize,
}

impl PaddedBatch {
    /// Pads `inputs` (each non-empty) on the right to the longest one.
    pub fn new(inputs: &[&[u32]]) -> Self {
        let rows = inputs.len();
        let width = inputs.iter().map(|ids| ids.len()).max().unwrap_or(0);
        let mut input_ids = vec![0i64; rows * width];
        let mut attention_mask = vec![0i64; rows * width];
        for (row, ids) in inputs.iter().enumerate() {
            let start = row * width;
            for (slot, &id) in input_ids[start..start + ids.len()].iter_mut().zip(*ids) {
                *slot = i64::from(id);
            }
            attention_mask[start..start + ids.len()].fill(1);
        }
        Self {
            input_ids,
            attention_mask,
            rows,
            width,
        }
    }

    /// Tokens (mask ones) in `row`.
    pub fn tokens_in_row(&self, row: usize) -> usize {
        self.attention_mask
            .get(row * self.width..(row + 1) * self.width)
            .map_or(0, |mask| mask.iter().filter(|&&m| m != 0).count())
    }
}

/// One run's `last_hidden_state`: `[rows, width, hidden]`, row-major, padding included.
#[derive(Debug, Clone, Copy)]
pub struct HiddenStates<'a> {
    pub data: &'a [f32],
    pub width: usize,
    pub hidden: usize,
}

impl HiddenStates<'_> {
    /// The hidden states of `row`'s first `tokens` positions, one `hidden`-wide slice each.
    pub fn row_tokens(&self, row: usize, tokens: usize) -> impl Iterator<Item = &[f32]> {
        let start = row * self.width * self.hidden;
        self.data
            .get(start..start + tokens.min(self.width) * self.hidden)
            .unwrap_or_default()
            .chunks_exact(self.hidden.max(1))
    }
}

/// An encoder graph loaded into a session.
pub struct EncoderSession {
    session: Session,
    device: DeviceKind,
    feeds_token_types: bool,
    hidden: usize,
}

impl std::fmt::Debug for EncoderSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncoderSession")
            .field("device", &self.device)
            .field("feeds_token_types", &self.feeds_token_types)
            .field("hidden", &self.hidden)
            .finish_non_exhaustive()
    }
}

fn runtime_error(during: &'static str) -> impl Fn(ort::Error) -> BackendError {
    move |e| BackendError::Runtime {
        during,
        message: e.to_string(),
    }
}

impl EncoderSession {
    /// Creates the session on the preferred device (the same device selection as text
    /// generation) and checks the graph against the `encoder` contract and the metadata's
    /// `embedding_dim`. Refuses a text-generation model.
    pub fn load(
        runtime: &OrtRuntime,
        model_dir: &ModelDirectory,
        options: &SessionOptions,
    ) -> Result<Self, LoadError> {
        let spec = model_dir.embedding_spec()?;
        let graph = model_dir.graph_path();
        let (session, device) = create_session(runtime, model_dir, options)?;
        let feeds_token_types = check_inputs(&session, &graph)?;
        check_output(&session, spec.dim, &graph)?;
        Ok(Self {
            session,
            device,
            feeds_token_types,
            hidden: spec.dim,
        })
    }

    pub fn device(&self) -> DeviceKind {
        self.device
    }

    /// Runs one batch and hands its hidden states to `read`, which sees them in place
    /// (no copy of the `[rows, width, hidden]` output).
    pub fn run<R>(
        &mut self,
        batch: &PaddedBatch,
        read: impl FnOnce(HiddenStates<'_>) -> R,
    ) -> Result<R, BackendError> {
        let shape = [batch.rows, batch.width];
        let ids = Tensor::from_array((shape, batch.input_ids.clone()))
            .map_err(runtime_error("building input_ids"))?;
        let mask = Tensor::from_array((shape, batch.attention_mask.clone()))
            .map_err(runtime_error("building attention_mask"))?;
        let mut inputs: Vec<(&str, SessionInputValue<'_>)> =
            vec![(INPUT_IDS, ids.into()), (ATTENTION_MASK, mask.into())];
        if self.feeds_token_types {
            let types = Tensor::from_array((shape, vec![0i64; batch.rows * batch.width]))
                .map_err(runtime_error("building token_type_ids"))?;
            inputs.push((TOKEN_TYPE_IDS, types.into()));
        }
        let outputs = self
            .session
            .run(inputs)
            .map_err(runtime_error("the encoder forward pass"))?;
        let value = outputs
            .get(LAST_HIDDEN_STATE)
            .ok_or_else(|| BackendError::Runtime {
                during: "reading outputs",
                message: format!("the graph produced no {LAST_HIDDEN_STATE}"),
            })?;
        let (out_shape, data) = value
            .try_extract_tensor::<f32>()
            .map_err(runtime_error("reading last_hidden_state"))?;
        let expected = [batch.rows as i64, batch.width as i64, self.hidden as i64];
        if out_shape[..] != expected[..] || data.len() != batch.rows * batch.width * self.hidden {
            return Err(BackendError::Runtime {
                during: "reading last_hidden_state",
                message: format!(
                    "the graph returned shape {:?}, expected {expected:?} (embedding_dim in \
                     {METADATA_FILE})",
                    &out_shape[..]
                ),
            });
        }
        Ok(read(HiddenStates {
            data,
            width: batch.width,
            hidden: self.hidden,
        }))
    }
}

fn bad_graph(graph: &Path, reason: String) -> LoadError {
    LoadError::Model(ModelDirError::BadGraph {
        path: graph.to_path_buf(),
        reason,
    })
}

/// Checks the graph's inputs against the `encoder` contract; returns whether it takes
/// `token_type_ids`.
fn check_inputs(session: &Session, graph: &Path) -> Result<bool, LoadError> {
    let mut feeds_token_types = false;
    let mut missing = vec![INPUT_IDS, ATTENTION_MASK];
    for input in session.inputs() {
        let name = input.name();
        if ![INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS].contains(&name) {
            return Err(bad_graph(
                graph,
                format!(
                    "the graph has an input the encoder contract does not provide: {name} (it \
                     provides {INPUT_IDS}, {ATTENTION_MASK} and {TOKEN_TYPE_IDS})"
                ),
            ));
        }
        let int64_matrix = matches!(
            input.dtype(),
            ValueType::Tensor { ty: TensorElementType::Int64, shape, .. } if shape.len() == 2
        );
        if !int64_matrix {
            return Err(bad_graph(
                graph,
                format!(
                    "input {name} must be an int64 tensor [batch, sequence], the graph has {:?}",
                    input.dtype()
                ),
            ));
        }
        missing.retain(|&m| m != name);
        feeds_token_types |= name == TOKEN_TYPE_IDS;
    }
    if !missing.is_empty() {
        return Err(bad_graph(
            graph,
            format!(
                "the encoder contract needs input {} which the graph lacks",
                missing.join(", ")
            ),
        ));
    }
    Ok(feeds_token_types)
}

/// Checks that the graph returns float32 `last_hidden_state` [batch, sequence, hidden] with
/// the hidden size the metadata declares as `embedding_dim`.
fn check_output(session: &Session, embedding_dim: usize, graph: &Path) -> Result<(), LoadError> {
    let output = session
        .outputs()
        .iter()
        .find(|o| o.name() == LAST_HIDDEN_STATE)
        .ok_or_else(|| {
            bad_graph(
                graph,
                format!(
                    "the encoder contract needs output {LAST_HIDDEN_STATE} which the graph lacks"
                ),
            )
        })?;
    let shape = match output.dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape,
            ..
        } if shape.len() == 3 => shape,
        other => {
            return Err(bad_graph(
                graph,
                format!(
                    "output {LAST_HIDDEN_STATE} must be a float32 tensor [batch, sequence, \
                     hidden], the graph has {other:?}"
                ),
            ));
        }
    };
    // -1: a dynamic width, checked on the warm-up run instead.
    let width = shape[2];
    if width >= 0 && width as usize != embedding_dim {
        return Err(LoadError::Model(ModelDirError::GraphMismatch {
            path: graph.with_file_name(METADATA_FILE),
            field: "embedding_dim",
            declared: embedding_dim,
            graph: width,
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_goes_on_the_right_with_a_zero_mask() {
        let batch = PaddedBatch::new(&[&[5, 6, 7], &[8]]);
        assert_eq!((batch.rows, batch.width), (2, 3));
        assert_eq!(batch.input_ids, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.tokens_in_row(1), 1);
        assert_eq!(batch.tokens_in_row(2), 0);
    }

    #[test]
    fn row_tokens_skip_padding_and_never_read_past_the_data() {
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let states = HiddenStates {
            data: &data,
            width: 3,
            hidden: 2,
        };
        let row: Vec<&[f32]> = states.row_tokens(1, 2).collect();
        assert_eq!(row, vec![&[6.0, 7.0][..], &[8.0, 9.0][..]]);
        assert_eq!(states.row_tokens(1, 10).count(), 3);
        assert_eq!(states.row_tokens(5, 1).count(), 0);
    }
}
