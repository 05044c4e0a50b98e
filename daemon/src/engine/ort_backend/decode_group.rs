//! Batched decoding for graphs with the optimum contract.
//!
//! An optimum graph takes the past as an input and returns `present = concat(past, new)`: it
//! never writes a cache in place, so the fused contract's pool does not apply. Instead the
//! sequences that decode (one token a step) share one [`DecodeGroup`]: one tensor per
//! past/present pair, `[rows, kv_heads, columns, head_dim]`, with every member's cache in its
//! own row, and one attention-mask row per member marking the columns that hold its real
//! positions. A step is one run over every row: each row's token, the row's mask plus a 1 for
//! the new column, and the row's own count of real positions as `position_ids`. The contract
//! makes positions explicit, so a row's padding never shifts its rotary angles, and the mask
//! is causal AND `attention_mask`, so a masked column may sit anywhere in a row. The graph's
//! presents, one column longer, become the group's past: moved, not copied.
//!
//! Rows are left-padded: a row's real positions end at the last column, so the distance from
//! the new token to each of its keys is what it is when the sequence runs alone. A graph
//! with a sliding window (Mistral's, counted in columns) then sees the keys it would see
//! alone, as long as the row has no holes (below).
//!
//! A member that has no token in a step (a backend caller may step any subset) is fed a
//! placeholder whose column is masked: a hole in its row, never attended to. Holes are
//! bounded: when the columns outgrow the longest member's positions by more than that
//! member's length (and [`MIN_SLACK`]), or would pass the model's context, the group is
//! compacted. For architectures whose graphs may carry a column-counted window (any but
//! the window-free ones in [`WINDOW_FREE`]), a row with holes is compacted before it runs
//! again. The engine's scheduler steps every decoding sequence every step, so in serving
//! there are no holes.
//!
//! What the group costs beyond running sequences alone: the graph copies every cache into
//! its present at every step (its Concat) however it is batched, so one row or many, each
//! step already copies the cache once. The group adds one gather of every member's cache
//! when its membership changes (a sequence joins after its prompt, finishes, or leaves to
//! take a multi-token step), one copy per change and not per token, several changes in one
//! step costing one gather; and attention over padding: a short row in a group with a long
//! one attends over the long one's columns, masked.

use moat_core::ModelMetadata;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

use super::super::backend::{BackendError, LogitsBatch, SequenceId};
use super::{output, runtime_error};

/// Columns of padding a group always tolerates beyond its longest member before compacting.
const MIN_SLACK: usize = 16;

/// Architectures whose graphs attend over every unmasked column: holes cost only compute.
const WINDOW_FREE: [&str; 3] = ["llama", "qwen2", "qwen3"];

/// The decoding sequences of an optimum-contract backend and their caches, side by side.
pub(super) struct DecodeGroup {
    rows: Vec<Row>,
    /// One tensor per past/present pair, `[rows, kv_heads, columns, head_dim]`; empty when
    /// the group has no rows.
    past: Vec<DynValue>,
    columns: usize,
    kv_heads: usize,
    head_dim: usize,
    context_length: usize,
    holes_allowed: bool,
    /// Most live rows, from `max_batch`; below 2 the group takes no one.
    max_rows: usize,
}

struct Row {
    sequence: SequenceId,
    /// 1 where the column holds one of the sequence's positions, `columns` long.
    mask: Vec<i64>,
    /// The sequence's real positions: the ones in `mask`, and its next `position_ids`.
    positions: usize,
    /// Whether a masked column follows one of its positions.
    holes: bool,
    /// Finished or left; dropped at the next rebuild.
    departed: bool,
}

/// A sequence joining the group with the cache of its own runs, `[1, kv_heads, positions,
/// head_dim]` per pair.
pub(super) struct Joining<'a> {
    pub sequence: SequenceId,
    pub positions: usize,
    pub past: &'a [DynValue],
}

/// Where one row of a gathered cache comes from.
struct Source<'a> {
    past: &'a [DynValue],
    row: usize,
    /// Which of the source's columns are real; `None`: all of them.
    mask: Option<&'a [i64]>,
    positions: usize,
}

/// One decode of a step: (row in the step's `LogitsBatch`, sequence, token).
pub(super) type GroupDecode = (usize, SequenceId, u32);

impl DecodeGroup {
    pub fn new(metadata: &ModelMetadata, max_rows: usize) -> Self {
        Self {
            rows: Vec::new(),
            past: Vec::new(),
            columns: 0,
            kv_heads: metadata.num_kv_heads,
            head_dim: metadata.head_dim,
            context_length: metadata.context_length,
            holes_allowed: WINDOW_FREE.contains(&metadata.architecture.as_str()),
            max_rows,
        }
    }

    /// Whether `joining` more sequences fit beside the live rows.
    pub fn has_room(&self, joining: usize) -> bool {
        self.max_rows >= 2 && self.live_rows() + joining < self.max_rows
    }

    fn live_rows(&self) -> usize {
        self.rows.iter().filter(|r| !r.departed).count()
    }

    fn row_of(&self, sequence: SequenceId) -> Option<usize> {
        self.rows
            .iter()
            .position(|r| r.sequence == sequence && !r.departed)
    }

    /// Marks a member finished; its row goes at the next rebuild, and the group's tensors at
    /// once when no one is left.
    pub fn leave(&mut self, sequence: SequenceId) {
        if let Some(row) = self.row_of(sequence) {
            self.rows[row].departed = true;
        }
        if self.live_rows() == 0 {
            self.clear();
        }
    }

    fn clear(&mut self) {
        self.rows.clear();
        self.past.clear();
        self.columns = 0;
    }

    /// Takes a member out of the group with a cache of its own, `[1, kv_heads, positions,
    /// head_dim]` per pair, for a run alone.
    pub fn detach(&mut self, sequence: SequenceId) -> Result<Vec<DynValue>, BackendError> {
        let row = self
            .row_of(sequence)
            .ok_or(BackendError::UnknownSequence { sequence })?;
        let r = &self.rows[row];
        let source = Source {
            past: &self.past,
            row,
            mask: Some(&r.mask),
            positions: r.positions,
        };
        let past = self.gather(&[source], r.positions)?;
        self.leave(sequence);
        Ok(past)
    }

    /// Rebuilds the group, when `joining` is not empty, members departed, or holes call for
    /// compaction: one gather of every live row's real positions and every joiner's cache
    /// into new, left-padded tensors as wide as the longest. Nothing changes on an error.
    pub fn admit(&mut self, joining: &[Joining<'_>]) -> Result<(), BackendError> {
        if joining.is_empty() && !self.rows.iter().any(|r| r.departed) && !self.needs_compaction() {
            return Ok(());
        }
        let live = self.rows.iter().enumerate().filter(|(_, r)| !r.departed);
        let sources: Vec<Source<'_>> = live
            .map(|(row, r)| Source {
                past: &self.past,
                row,
                mask: Some(&r.mask),
                positions: r.positions,
            })
            .chain(joining.iter().map(|j| Source {
                past: j.past,
                row: 0,
                mask: None,
                positions: j.positions,
            }))
            .collect();
        let columns = sources.iter().map(|s| s.positions).max().unwrap_or(0);
        let past = match sources.len() {
            0 => Vec::new(),
            _ => self.gather(&sources, columns)?,
        };
        let members = self.rows.iter().filter(|r| !r.departed);
        let rows = members
            .map(|r| (r.sequence, r.positions))
            .chain(joining.iter().map(|j| (j.sequence, j.positions)))
            .map(|(sequence, positions)| {
                let mut mask = vec![0; columns - positions];
                mask.resize(columns, 1);
                Row {
                    sequence,
                    mask,
                    positions,
                    holes: false,
                    departed: false,
                }
            })
            .collect();
        self.rows = rows;
        self.past = past;
        self.columns = columns;
        Ok(())
    }

    fn needs_compaction(&self) -> bool {
        let live = || self.rows.iter().filter(|r| !r.departed);
        let longest = live().map(|r| r.positions).max().unwrap_or(0);
        let slack = self.columns - longest;
        // Past the context, the graph's next run would be wider than any it was made for.
        slack > longest.max(MIN_SLACK)
            || (self.columns >= self.context_length && slack > 0)
            || (!self.holes_allowed && live().any(|r| r.holes))
    }

    /// One run over every row: each of `decodes` feeds its token and gets its logits in
    /// its row of `logits`; members without a decode are fed a masked placeholder. Call
    /// [`admit`](Self::admit) first: every decode's sequence must be a member.
    pub fn decode(
        &mut self,
        session: &mut Session,
        (past_names, present_names): (&[String], &[String]),
        decodes: &[GroupDecode],
        logits: &mut LogitsBatch,
    ) -> Result<(), BackendError> {
        let batch = self.rows.len();
        let width = self.columns + 1;
        // Each row's decode, by row.
        let mut fed: Vec<Option<u32>> = vec![None; batch];
        let mut members = Vec::with_capacity(decodes.len());
        for &(_, sequence, token) in decodes {
            let row = self
                .row_of(sequence)
                .ok_or(BackendError::UnknownSequence { sequence })?;
            fed[row] = Some(token);
            members.push(row);
        }
        let mut ids = Vec::with_capacity(batch);
        let mut positions = Vec::with_capacity(batch);
        let mut mask = Vec::with_capacity(batch * width);
        for (row, token) in self.rows.iter().zip(&fed) {
            ids.push(token.map_or(0, i64::from));
            // A placeholder's position is never attended to, but must stay inside the
            // graph's position tables (a full sequence may sit out).
            let position = match token {
                Some(_) => row.positions,
                None => row.positions.min(self.context_length.saturating_sub(1)),
            };
            positions.push(position as i64);
            mask.extend_from_slice(&row.mask);
            mask.push(i64::from(token.is_some()));
        }
        let tensor = |shape: [usize; 2], data: Vec<i64>, during| {
            Tensor::from_array((shape, data)).map_err(runtime_error(during))
        };
        let mut inputs: Vec<(&str, SessionInputValue<'_>)> =
            Vec::with_capacity(3 + self.past.len());
        inputs.push((
            "input_ids",
            tensor([batch, 1], ids, "building input_ids")?.into(),
        ));
        let mask = tensor([batch, width], mask, "building attention_mask")?;
        inputs.push(("attention_mask", mask.into()));
        let positions = tensor([batch, 1], positions, "building position_ids")?;
        inputs.push(("position_ids", positions.into()));
        for (name, value) in past_names.iter().zip(&self.past) {
            inputs.push((name.as_str(), value.view().into()));
        }
        let mut outputs = session
            .run(inputs)
            .map_err(runtime_error("the forward pass"))?;
        let (_, data) = output(&outputs, "logits")?
            .try_extract_tensor::<f32>()
            .map_err(runtime_error("reading logits"))?;
        let vocab = data.len() / batch.max(1);
        for (&(index, _, _), member) in decodes.iter().zip(members) {
            let row = logits.row_mut(index);
            if vocab != row.len() {
                return Err(BackendError::LogitsShape {
                    expected: row.len(),
                    found: vocab,
                    detail: "the graph's logits width differs from vocab_size in moat-model.json",
                });
            }
            row.copy_from_slice(&data[member * vocab..(member + 1) * vocab]);
        }
        let mut present = Vec::with_capacity(present_names.len());
        for name in present_names {
            present.push(outputs.remove(name).ok_or(BackendError::Runtime {
                during: "reading the present KV cache",
                message: format!("output {name} is missing"),
            })?);
        }
        // Changed only after a successful run, so a failed step keeps the old group.
        self.past = present;
        self.columns = width;
        for (row, token) in self.rows.iter_mut().zip(fed) {
            row.mask.push(i64::from(token.is_some()));
            match token {
                Some(_) => row.positions += 1,
                None => row.holes |= row.positions > 0,
            }
        }
        Ok(())
    }

    /// Copies each source row's real positions into new tensors of `columns` columns, one
    /// row per source, each row's positions packed at its end (left padding, zeroes).
    fn gather(
        &self,
        sources: &[Source<'_>],
        columns: usize,
    ) -> Result<Vec<DynValue>, BackendError> {
        let (heads, dim) = (self.kv_heads, self.head_dim);
        let bad = |message: String| BackendError::Runtime {
            during: "gathering the decode group's caches",
            message,
        };
        let runs: Vec<Vec<std::ops::Range<usize>>> = sources
            .iter()
            .map(|s| real_runs(s.mask, s.past.first()))
            .collect();
        let pairs = sources.first().map_or(0, |s| s.past.len());
        let mut gathered = Vec::with_capacity(pairs);
        for pair in 0..pairs {
            let mut out = vec![0f32; sources.len() * heads * columns * dim];
            for (row, (source, runs)) in sources.iter().zip(&runs).enumerate() {
                let tensor = source
                    .past
                    .get(pair)
                    .ok_or_else(|| bad(format!("a source has no cache for pair {pair}")))?;
                let (shape, data) = tensor
                    .try_extract_tensor::<f32>()
                    .map_err(runtime_error("reading a KV cache"))?;
                let real: usize = runs.iter().map(|r| r.len()).sum();
                let fits = shape.len() == 4
                    && source.row < shape[0] as usize
                    && shape[1] as usize == heads
                    && shape[3] as usize == dim
                    && real == source.positions
                    && real <= columns;
                if !fits {
                    return Err(bad(format!(
                        "a cache shaped {shape:?} does not hold row {} with {} positions of \
                         {heads} heads of {dim}",
                        source.row, source.positions
                    )));
                }
                let source_columns = shape[2] as usize;
                for head in 0..heads {
                    let from = (source.row * heads + head) * source_columns * dim;
                    let mut to = ((row * heads + head) * columns + columns - real) * dim;
                    for run in runs {
                        let len = run.len() * dim;
                        let start = from + run.start * dim;
                        out[to..to + len].copy_from_slice(&data[start..start + len]);
                        to += len;
                    }
                }
            }
            let shape = [sources.len(), heads, columns, dim];
            let tensor = Tensor::from_array((shape, out))
                .map_err(runtime_error("building the decode group's cache"))?;
            gathered.push(tensor.into_dyn());
        }
        Ok(gathered)
    }
}

/// The ranges of columns that hold real positions: the runs of ones in `mask`, or every
/// column of `tensor` without one.
fn real_runs(mask: Option<&[i64]>, tensor: Option<&DynValue>) -> Vec<std::ops::Range<usize>> {
    let Some(mask) = mask else {
        let columns = tensor
            .and_then(|t| t.try_extract_tensor::<f32>().ok())
            .and_then(|(shape, _)| shape.get(2).copied())
            .unwrap_or(0);
        return std::iter::once(0..usize::try_from(columns).unwrap_or(0)).collect();
    };
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (column, &bit) in mask.iter().enumerate() {
        match runs.last_mut() {
            _ if bit == 0 => {}
            Some(run) if run.end == column => run.end += 1,
            _ => runs.push(column..column + 1),
        }
    }
    runs
}
