//! The KV cache pool that lets one graph run decode many sequences.
//!
//! Every past/present pair of the fused graph gets one buffer shaped
//! `[slots, kv_heads, capacity, head_dim]`, allocated once when the model loads, where the
//! graph's attention reads it: host memory for the CPU kernels, device memory from the
//! execution provider's allocator for a float16 graph on CUDA (see `memory`). A sequence
//! holds one slot (one row of every buffer) from start to finish. A run binds a contiguous
//! range of rows as both the past input and the present output, so GroupQueryAttention
//! appends each row's new positions in place: decoding a batch reads and writes the cache
//! where it lies, with no copy and no allocation per token.
//!
//! Host buffers are allocated zeroed and untouched, so the kernel maps pages only as
//! sequences write positions: resident memory follows the tokens actually cached, not
//! `slots x capacity`. Device memory is committed whole when the model loads.
//!
//! Sequences share the pool, so a slot must carry nothing from one to the next. Attention
//! reads only the positions below each row's length (taken from its attention mask), but a
//! kernel bug, a graph that reads further, or anything that later reads the memory would
//! see what a previous sequence left there. So the pool remembers how far runs may have
//! written into each slot and zeroes that range when the slot is released: the keys and
//! values of a finished conversation do not outlive it in memory (zeroing at reuse would
//! leave them in a free slot for as long as it stays free), and the cost, a write of what
//! the sequence itself wrote, is paid once per sequence, after its last token
//! (`benches/kv_zeroing.rs` measures it against a decode step).
//!
//! This module and `memory` hold the only `unsafe` code. Binding a slice of the pool needs a tensor
//! over memory moat owns (`TensorRefMut::from_raw`) and a binding that does not copy it:
//! `IoBinding::bind_input` copies every borrowed tensor, and a copied cache is no longer
//! updated in place. The pool owns the binding together with every buffer it points into,
//! never moves them, binds the rows a run covers when they differ from the last run's, and
//! drops the binding first, so no run can see a stale pointer.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::ops::Range;

use moat_core::ModelMetadata;
use ort::AsPointer;
use ort::environment::Environment;
use ort::memory::MemoryInfo;
use ort::session::{IoBinding, Session};
use ort::value::{PrimitiveTensorElementType, Shape, TensorRefMut, Value};

use super::super::backend::{BackendError, DeviceKind, SequenceId};
use super::{copy_logits_row, output, runtime_error, written_in_place};
pub(super) use memory::KvBlock;
pub use memory::KvPlacement;
use memory::{KvMemory, SHRINK_THE_POOL};

mod copier;
mod memory;

/// Fixed-size slots of KV cache, and the binding that runs them.
pub(super) struct KvPool {
    /// Declared first so that it drops first: it points into the memory below.
    binding: IoBinding,
    /// The rows whose cache views `binding` holds, once a run has shown that the graph
    /// writes them in place.
    kv_bound: Option<Range<usize>>,
    /// One buffer per past/present pair, in the graph's pair order.
    memory: KvMemory,
    past_names: Vec<CString>,
    present_names: Vec<String>,
    input_ids: CString,
    attention_mask: CString,
    /// A run's `input_ids` and `attention_mask`, rebuilt in place for every run.
    ids: Vec<i64>,
    mask: Vec<i64>,
    /// A run's last-position logits, one row of `vocab` per pool row it covered.
    logits: Vec<f32>,
    /// For a run of several new tokens a row, which position's logits each row keeps
    /// (`(row of the run, position)`): the last real token of each prompt chunk.
    kept: Vec<(usize, usize)>,
    /// Who holds each slot. A slot whose memory could not be zeroed keeps its last
    /// occupant, so it is never handed out again.
    occupants: Vec<Option<SequenceId>>,
    /// For each slot, how many positions from the start runs may have written: zeroed when
    /// the slot is released.
    written: Vec<usize>,
    kv_heads: usize,
    capacity: usize,
    head_dim: usize,
    vocab: usize,
}

/// Where positions `start..start + len` of `slot` lie in each head of a buffer, rows being
/// `[kv_heads, capacity, head_dim]`: one range per head.
fn head_ranges(
    slot: usize,
    start: usize,
    len: usize,
    [kv_heads, capacity, head_dim]: [usize; 3],
) -> impl Iterator<Item = Range<usize>> {
    (0..kv_heads).map(move |head| {
        let from = ((slot * kv_heads + head) * capacity + start) * head_dim;
        from..from + len * head_dim
    })
}

/// The logits of a batched decode, by slot.
pub(super) struct DecodeLogits<'a> {
    first: usize,
    vocab: usize,
    data: &'a [f32],
}

impl DecodeLogits<'_> {
    pub fn row(&self, slot: usize) -> &[f32] {
        let start = (slot - self.first) * self.vocab;
        &self.data[start..start + self.vocab]
    }
}

impl KvPool {
    /// Reserves `slots` rows of `positions` (at most the model's context) for every
    /// past/present pair, in `placement` on `device` (untouched until written, in host
    /// memory).
    pub fn new(
        session: &Session,
        metadata: &ModelMetadata,
        (past_names, present_names): (&[String], &[String]),
        (slots, positions): (usize, usize),
        placement: (KvPlacement, DeviceKind),
        environment: &Environment,
    ) -> Result<Self, String> {
        let c_name = |name: &str| CString::new(name).map_err(|e| e.to_string());
        let capacity = positions.clamp(1, metadata.context_length.max(1));
        let len = [metadata.num_kv_heads, capacity, metadata.head_dim]
            .iter()
            .try_fold(slots, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("the KV pool's size overflows; {SHRINK_THE_POOL}"))?;
        Ok(Self {
            binding: session.create_binding().map_err(|e| e.to_string())?,
            kv_bound: None,
            memory: KvMemory::zeroed(
                session,
                metadata.kv_dtype,
                (past_names.len(), len),
                placement,
                environment,
            )?,
            past_names: past_names
                .iter()
                .map(|n| c_name(n))
                .collect::<Result<_, _>>()?,
            present_names: present_names.to_vec(),
            input_ids: c_name("input_ids")?,
            attention_mask: c_name("attention_mask")?,
            ids: Vec::new(),
            mask: Vec::new(),
            logits: vec![0.0; slots * metadata.vocab_size],
            kept: Vec::with_capacity(slots),
            occupants: vec![None; slots],
            written: vec![0; slots],
            kv_heads: metadata.num_kv_heads,
            capacity,
            head_dim: metadata.head_dim,
            vocab: metadata.vocab_size,
        })
    }

    /// Positions one slot can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The lowest free slot, now held by `sequence`; lowest first keeps running batches
    /// dense at the front, so batched runs cover few idle rows. The slot is all zeroes.
    pub fn acquire(&mut self, sequence: SequenceId) -> Option<usize> {
        let slot = self.occupants.iter().position(Option::is_none)?;
        self.occupants[slot] = Some(sequence);
        // A free slot between busy ones is fed a placeholder at its first position by
        // batched decodes (see `decode`): that position holds no sequence's data, but the
        // new occupant starts from zeroes all the same. A slot that cannot be zeroed stays
        // taken (by this sequence, which is refused it).
        self.zero(slot).then_some(slot)
    }

    /// The sequence that holds `slot`, if any.
    pub fn occupant(&self, slot: usize) -> Option<SequenceId> {
        self.occupants.get(slot).copied().flatten()
    }

    /// A copy of positions `start..start + len` of `slot` (all pairs and heads), or `None`
    /// where they do not lie within a slot.
    pub fn read_block(&mut self, slot: usize, start: usize, len: usize) -> Option<KvBlock> {
        if slot >= self.occupants.len() || start + len > self.capacity {
            return None;
        }
        let shape = [self.kv_heads, self.capacity, self.head_dim];
        let pairs = self.memory.pairs();
        let mut block = KvBlock::with_capacity(
            self.memory.element(),
            pairs * self.kv_heads * len * self.head_dim,
        );
        for pair in 0..pairs {
            for range in head_ranges(slot, start, len, shape) {
                if let Err(e) = self.memory.read(pair, range, &mut block) {
                    tracing::warn!(error = %e, "could not copy KV positions out of the pool");
                    return None;
                }
            }
        }
        Some(block)
    }

    /// Writes positions `part` of `block`, a copy of `len` positions that belongs at
    /// `start`, into the same positions of `slot` (`start + part.start..start + part.end`);
    /// false (and nothing written) where they do not fit or the block is of another type
    /// or size.
    pub fn write_block(
        &mut self,
        slot: usize,
        start: usize,
        (len, part): (usize, Range<usize>),
        block: &KvBlock,
    ) -> bool {
        let shape = [self.kv_heads, self.capacity, self.head_dim];
        let head_dim = self.head_dim;
        let expected = self.memory.pairs() * self.kv_heads * len * head_dim;
        let end = start + part.end;
        if slot >= self.occupants.len()
            || part.end > len
            || end > self.capacity
            || block.len() != expected
        {
            return false;
        }
        // Noted first: a copy that fails halfway has still written some positions.
        note_written(&mut self.written, slot, end, self.capacity);
        // The block holds each head's `len` positions in turn; `part` of them are written.
        let heads = (0..self.memory.pairs()).flat_map(|pair| {
            head_ranges(slot, start + part.start, part.len(), shape).map(move |r| (pair, r))
        });
        for (index, (pair, to)) in heads.enumerate() {
            let from = index * len * head_dim;
            let values = from + part.start * head_dim..from + part.end * head_dim;
            if let Err(e) = self.memory.write(pair, to.start, block, values) {
                tracing::warn!(error = %e, "could not copy KV positions into the pool");
                return false;
            }
        }
        true
    }

    /// Frees `slot` and zeroes every position its sequence's runs may have written.
    pub fn release(&mut self, slot: usize) {
        if self.occupants.get(slot).is_some_and(Option::is_some) && self.zero(slot) {
            self.occupants[slot] = None;
        }
    }

    /// Zeroes the positions of `slot` that runs may have written; false if the memory
    /// could not be zeroed (the slot must then never be handed out again).
    fn zero(&mut self, slot: usize) -> bool {
        let Some(&positions) = self.written.get(slot) else {
            return false;
        };
        let positions = positions.min(self.capacity);
        let shape = [self.kv_heads, self.capacity, self.head_dim];
        for pair in 0..self.memory.pairs() {
            // Only the front of each head's block: the pages past it were never written,
            // and writing them would make them resident.
            for range in head_ranges(slot, 0, positions, shape) {
                if let Err(e) = self.memory.zero(pair, range) {
                    tracing::error!(
                        slot,
                        error = %e,
                        "could not zero a KV pool slot; it is taken out of service"
                    );
                    return false;
                }
            }
        }
        self.written[slot] = 0;
        true
    }

    /// Feeds `tokens` to the sequence in `slot`, which has `cached` positions, alone, and
    /// returns the last position's logits.
    pub fn prefill(
        &mut self,
        session: &mut Session,
        slot: usize,
        cached: usize,
        tokens: &[u32],
    ) -> Result<&[f32], BackendError> {
        self.ids.clear();
        self.ids.extend(tokens.iter().map(|&t| i64::from(t)));
        self.mask.clear();
        self.mask.resize(cached + tokens.len(), 1);
        self.kept.clear();
        self.kept.push((0, tokens.len() - 1));
        note_written(
            &mut self.written,
            slot,
            cached + tokens.len(),
            self.capacity,
        );
        self.run(session, slot..slot + 1, tokens.len(), cached + tokens.len())?;
        Ok(&self.logits[..self.vocab])
    }

    /// One run that feeds the first prompt chunk of several sequences, each `(slot,
    /// tokens)`, over the rows from the lowest to the highest of those slots, and returns
    /// each one's last-position logits by slot.
    ///
    /// Every row in that range must hold nothing yet (a free slot, or a sequence with no
    /// position cached): the run is the graph's first prompt, every row starting at
    /// position 0, shorter chunks padded on the right (their padding is masked out). A row
    /// without a chunk is fed token 0 at position 0, which its sequence's own first run
    /// overwrites before anything reads it.
    pub fn prefill_together(
        &mut self,
        session: &mut Session,
        chunks: &[(usize, &[u32])],
    ) -> Result<DecodeLogits<'_>, BackendError> {
        let slots = chunks.iter().map(|&(slot, _)| slot);
        let (Some(first), Some(last)) = (slots.clone().min(), slots.max()) else {
            return Ok(DecodeLogits {
                first: 0,
                vocab: self.vocab,
                data: &[],
            });
        };
        let rows = first..last + 1;
        let width = chunks
            .iter()
            .map(|(_, t)| t.len())
            .max()
            .unwrap_or(1)
            .max(1);
        self.ids.clear();
        self.ids.resize(rows.len() * width, 0);
        self.mask.clear();
        self.mask.resize(rows.len() * width, 0);
        for mask_row in self.mask.chunks_mut(width) {
            mask_row[0] = 1;
        }
        self.kept.clear();
        for &(slot, tokens) in chunks {
            let row = slot - first;
            let ids = &mut self.ids[row * width..(row + 1) * width];
            for (id, &token) in ids.iter_mut().zip(tokens) {
                *id = i64::from(token);
            }
            self.mask[row * width..row * width + tokens.len()].fill(1);
            self.kept.push((row, tokens.len().max(1) - 1));
        }
        for slot in rows.clone() {
            note_written(&mut self.written, slot, width, self.capacity);
        }
        let batch = rows.len();
        self.run(session, rows, width, width)?;
        Ok(DecodeLogits {
            first,
            vocab: self.vocab,
            data: &self.logits[..batch * self.vocab],
        })
    }

    /// One run that decodes one token for each `(slot, token)`, over the rows from the
    /// lowest to the highest of those slots. `cached(sequence)` is the number of positions
    /// a sequence in the pool holds.
    ///
    /// A row in that range without a token (a free slot, or a sequence still in its
    /// prompt) is fed token 0 at its own next position, which that sequence's next real
    /// step overwrites before anything reads it, so it changes nothing.
    pub fn decode(
        &mut self,
        session: &mut Session,
        decodes: impl Iterator<Item = (usize, u32)> + Clone,
        cached: impl Fn(SequenceId) -> usize,
    ) -> Result<DecodeLogits<'_>, BackendError> {
        let (Some(first), Some(last)) = (
            decodes.clone().map(|(slot, _)| slot).min(),
            decodes.clone().map(|(slot, _)| slot).max(),
        ) else {
            return Ok(DecodeLogits {
                first: 0,
                vocab: self.vocab,
                data: &[],
            });
        };
        let rows = first..last + 1;
        // Kept below the slot size so a row never writes outside its slot (a full
        // sequence cannot step again, so its last position is dead).
        let capacity = self.capacity;
        let occupants = &self.occupants;
        let cached = |slot: usize| {
            occupants[slot]
                .map_or(0, &cached)
                .min(capacity.saturating_sub(1))
        };
        let width = rows.clone().map(cached).max().unwrap_or(0) + 1;
        self.ids.clear();
        self.ids.resize(rows.len(), 0);
        self.mask.clear();
        self.mask.resize(rows.len() * width, 0);
        for (slot, mask_row) in rows.clone().zip(self.mask.chunks_mut(width)) {
            mask_row[..=cached(slot)].fill(1);
        }
        for slot in rows.clone() {
            note_written(&mut self.written, slot, cached(slot) + 1, capacity);
        }
        for (slot, token) in decodes {
            self.ids[slot - first] = i64::from(token);
        }
        let batch = rows.len();
        self.run(session, rows, 1, width)?;
        Ok(DecodeLogits {
            first,
            vocab: self.vocab,
            data: &self.logits[..batch * self.vocab],
        })
    }

    /// Runs `rows` with `self.ids` (`[rows, new_tokens]`) and `self.mask`
    /// (`[rows, mask_width]`); leaves each row's last-position logits in `self.logits`.
    fn run(
        &mut self,
        session: &mut Session,
        rows: Range<usize>,
        new_tokens: usize,
        mask_width: usize,
    ) -> Result<(), BackendError> {
        let batch = rows.len();
        // Several rows of several new tokens only as a first prompt (nothing cached).
        if rows.end > self.occupants.len()
            || (new_tokens > 1 && batch != 1 && mask_width != new_tokens)
            || mask_width > self.capacity
        {
            return Err(BackendError::Runtime {
                during: "binding a pooled run",
                message: format!(
                    "rows {rows:?} with {new_tokens} new tokens each and {mask_width} positions \
                     do not fit the pool's {} slots of {} positions",
                    self.occupants.len(),
                    self.capacity
                ),
            });
        }
        let bind = runtime_error("binding a pooled run");
        let ids = host_view(&mut self.ids, &[batch, new_tokens]).map_err(&bind)?;
        let mask = host_view(&mut self.mask, &[batch, mask_width]).map_err(&bind)?;
        bind_input_in_place(&mut self.binding, &self.input_ids, &ids).map_err(&bind)?;
        bind_input_in_place(&mut self.binding, &self.attention_mask, &mask).map_err(&bind)?;
        let row_len = self.kv_heads * self.capacity * self.head_dim;
        // The pool's memory never moves, so the cache views bound for these rows by an
        // earlier run still hold: a steady batch binds its cache once, not every token.
        let fresh = self.kv_bound.as_ref() != Some(&rows);
        if fresh {
            self.kv_bound = None;
            let kv_shape = [batch, self.kv_heads, self.capacity, self.head_dim];
            let names = self.past_names.iter().zip(&self.present_names);
            self.memory
                .bind_rows(&mut self.binding, names, &rows, row_len, &kv_shape)
                .map_err(&bind)?;
        }
        if new_tokens == 1 {
            let logits = host_view(&mut self.logits, &[batch, 1, self.vocab]).map_err(&bind)?;
            self.binding.bind_output("logits", logits)
        } else {
            // A prompt chunk's logits cover every position; ONNX Runtime allocates them.
            self.binding
                .bind_output_to_device("logits", &MemoryInfo::default())
        }
        .map_err(&bind)?;
        let outputs = session
            .run_binding(&self.binding)
            .map_err(runtime_error("the forward pass"))?;
        if fresh {
            // Checked once per binding: the same binding of the same graph writes where it
            // wrote before.
            for (pair, name) in self.present_names.iter().enumerate() {
                let expected = self.memory.address(pair, rows.start * row_len);
                written_in_place(&outputs, name, expected.unwrap_or(std::ptr::null()))?;
            }
            self.kv_bound = Some(rows);
        }
        if new_tokens > 1 {
            let logits = output(&outputs, "logits")?;
            for &(row, position) in &self.kept {
                let at = row * new_tokens + position;
                let into = &mut self.logits[row * self.vocab..(row + 1) * self.vocab];
                copy_logits_row(logits, at, into)?;
            }
        }
        Ok(())
    }
}

/// Notes in `written` that a run may write `slot`'s positions below `end`. Noted before the
/// run: a run that fails may still have written some of them.
fn note_written(written: &mut [usize], slot: usize, end: usize, capacity: usize) {
    if let Some(written) = written.get_mut(slot) {
        *written = (*written).max(end.min(capacity));
    }
}

/// A tensor over the first elements of a host buffer, in `shape`.
///
/// A binding that receives the tensor keeps pointing at `data` after the borrow ends; only
/// [`KvPool`], which owns both and binds such a tensor again before every run, calls this.
fn host_view<'a, T: PrimitiveTensorElementType + std::fmt::Debug>(
    data: &'a mut [T],
    shape: &[usize],
) -> Result<TensorRefMut<'a, T>, ort::Error> {
    let elements: usize = shape.iter().product();
    if elements > data.len() {
        return Err(ort::Error::new(format!(
            "a {shape:?} tensor needs {elements} elements, the buffer has {}",
            data.len()
        )));
    }
    // SAFETY: `data` holds at least `shape`'s elements of `T` in host memory, and the
    // view borrows it for its whole lifetime.
    unsafe {
        TensorRefMut::from_raw(
            MemoryInfo::default(),
            data.as_mut_ptr().cast(),
            Shape::new(shape.iter().map(|&d| d as i64)),
        )
    }
}

/// Binds a tensor over pool memory as a run input, without `IoBinding::bind_input`'s copy.
fn bind_input_in_place<T: ort::value::ValueTypeMarker + ?Sized>(
    binding: &mut IoBinding,
    name: &CString,
    value: &Value<T>,
) -> Result<(), ort::Error> {
    // SAFETY: both pointers are live ONNX Runtime objects and `name` is NUL-terminated.
    // ONNX Runtime keeps its own handle to the OrtValue, which refers to (does not own) the
    // pool's memory; the pool keeps that memory in place while the binding lives.
    let status = unsafe { (ort::api().BindInput)(binding.ptr_mut(), name.as_ptr(), value.ptr()) };
    // SAFETY: `status` was just returned by the ONNX Runtime API.
    unsafe { ort::Error::result_from_status(status) }
}

#[cfg(test)]
mod tests;
