//! The KV cache pool that lets one graph run decode many sequences.
//!
//! Every past/present pair of the fused graph gets one host buffer shaped
//! `[slots, kv_heads, capacity, head_dim]`, allocated once when the model loads. A sequence
//! holds one slot (one row of every buffer) from start to finish. A run binds a contiguous
//! range of rows as both the past input and the present output, so GroupQueryAttention
//! appends each row's new positions in place: decoding a batch reads and writes the cache
//! where it lies, with no copy and no allocation per token.
//!
//! The buffers are allocated zeroed and untouched, so the kernel maps pages only as
//! sequences write positions: resident memory follows the tokens actually cached, not
//! `slots x capacity`.
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
//! This is the one module with `unsafe` code. Binding a slice of the pool needs a tensor
//! over memory moat owns (`TensorRefMut::from_raw`) and a binding that does not copy it:
//! `IoBinding::bind_input` copies every borrowed tensor, and a copied cache is no longer
//! updated in place. The pool owns the binding together with every buffer it points into,
//! rebinds before every run and drops the binding first, so no run can see a stale pointer.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::ops::Range;

use half::f16;
use half::slice::HalfBitsSliceExt as _;
use moat_core::{KvDtype, ModelMetadata};
use ort::AsPointer;
use ort::memory::MemoryInfo;
use ort::session::{IoBinding, Session};
use ort::value::{PrimitiveTensorElementType, Shape, TensorRefMut, Value};

use super::super::backend::{BackendError, SequenceId};
use super::{copy_logits_row, output, runtime_error, written_in_place};

/// Fixed-size slots of KV cache in host memory, and the binding that runs them.
pub(super) struct KvPool {
    /// Declared first so that it drops first: it points into the buffers below.
    binding: IoBinding,
    /// One buffer per past/present pair, in the graph's pair order.
    buffers: KvBuffers,
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
    /// Who holds each slot.
    occupants: Vec<Option<SequenceId>>,
    /// For each slot, how many positions from the start runs may have written: zeroed when
    /// the slot is released.
    written: Vec<usize>,
    kv_heads: usize,
    capacity: usize,
    head_dim: usize,
    vocab: usize,
}

/// The pool's memory in the model's KV element type. float16 is kept as its bits (`u16`),
/// whose zero is allocated untouched like float32's (a `Vec<f16>` of zeros would be written
/// element by element, making the whole pool resident at once).
enum KvBuffers {
    Float32(Vec<Vec<f32>>),
    Float16(Vec<Vec<u16>>),
}

impl KvBuffers {
    /// `pairs` buffers of `len` zeroes, or an error where the address space is refused (a
    /// huge context times many slots, or a host with strict overcommit).
    fn zeroed(dtype: KvDtype, pairs: usize, len: usize) -> Result<Self, String> {
        Ok(match dtype {
            KvDtype::Float32 => Self::Float32(
                (0..pairs)
                    .map(|_| zeroed_vec(len))
                    .collect::<Result<_, _>>()?,
            ),
            KvDtype::Float16 => Self::Float16(
                (0..pairs)
                    .map(|_| zeroed_vec(len))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// Zeroes the first `positions` positions of every head of row `slot` in every buffer,
    /// rows being `[kv_heads, capacity, head_dim]`.
    fn zero_positions(&mut self, slot: usize, positions: usize, shape: [usize; 3]) {
        match self {
            Self::Float32(buffers) => zero_positions(buffers, slot, positions, shape),
            Self::Float16(buffers) => zero_positions(buffers, slot, positions, shape),
        }
    }

    /// Where element `offset` of pair `pair` lies.
    fn address(&self, pair: usize, offset: usize) -> Option<*const std::ffi::c_void> {
        match self {
            Self::Float32(b) => b.get(pair).map(|v| v[offset..].as_ptr().cast()),
            Self::Float16(b) => b.get(pair).map(|v| v[offset..].as_ptr().cast()),
        }
    }
}

/// The keys and values of a run of positions of one slot, copied out of the pool: for each
/// past/present pair, for each KV head, the positions' rows (`[pairs, kv_heads, positions,
/// head_dim]`), in the pool's element type.
#[derive(Debug)]
pub(super) enum KvBlock {
    Float32(Box<[f32]>),
    Float16(Box<[u16]>),
}

impl KvBlock {
    pub fn bytes(&self) -> usize {
        match self {
            Self::Float32(values) => std::mem::size_of_val(&**values),
            Self::Float16(values) => std::mem::size_of_val(&**values),
        }
    }
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

fn read_positions<T: Copy>(
    buffers: &[Vec<T>],
    slot: usize,
    start: usize,
    len: usize,
    shape: [usize; 3],
) -> Box<[T]> {
    let mut out = Vec::with_capacity(buffers.len() * shape[0] * len * shape[2]);
    for buffer in buffers {
        for range in head_ranges(slot, start, len, shape) {
            out.extend_from_slice(&buffer[range]);
        }
    }
    out.into_boxed_slice()
}

/// Writes positions `part` of each head's `len` positions in `values` (laid out as
/// [`read_positions`] reads them) to the same positions after `start` in `slot`.
fn write_positions<T: Copy>(
    buffers: &mut [Vec<T>],
    slot: usize,
    start: usize,
    (len, part): (usize, Range<usize>),
    shape: [usize; 3],
    values: &[T],
) {
    let head_dim = shape[2];
    let mut values = values.chunks_exact(len * head_dim);
    for buffer in buffers {
        for range in head_ranges(slot, start + part.start, part.len(), shape) {
            if let Some(rows) = values.next() {
                buffer[range].copy_from_slice(&rows[part.start * head_dim..part.end * head_dim]);
            }
        }
    }
}

/// Numbers whose all-zero bit pattern is the value zero.
trait ZeroBits: Copy + Default {}
impl ZeroBits for f32 {}
impl ZeroBits for u16 {}

fn zero_positions<T: ZeroBits>(
    buffers: &mut [Vec<T>],
    slot: usize,
    positions: usize,
    [kv_heads, capacity, head_dim]: [usize; 3],
) {
    let head_len = capacity * head_dim;
    let row_len = kv_heads * head_len;
    let used = positions.min(capacity) * head_dim;
    if used == 0 {
        return;
    }
    for buffer in buffers {
        let Some(row) = buffer.get_mut(slot * row_len..(slot + 1) * row_len) else {
            continue;
        };
        // Only the front of each head's block: the pages past it were never written, and
        // writing them would make them resident.
        for head in row.chunks_exact_mut(head_len) {
            head[..used].fill(T::default());
        }
    }
}

/// `len` zeroes from the allocator's zeroed memory: for buffers this large, fresh anonymous
/// mappings, so nothing is resident until written. Unlike `vec![0; len]`, a refused
/// allocation is an error, not an abort.
fn zeroed_vec<T: ZeroBits>(len: usize) -> Result<Vec<T>, String> {
    let refused = || {
        format!(
            "the KV pool needs {} MiB of address space per buffer, which this host refuses; \
             lower engine.max_batch",
            len.saturating_mul(std::mem::size_of::<T>()) >> 20
        )
    };
    if len == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| refused())?;
    // SAFETY: `layout` has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(refused());
    }
    // SAFETY: `ptr` was allocated by the global allocator with `layout` (`len` elements of
    // `T`), and all of them are initialised: zero bits are zero for every `ZeroBits` type.
    Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// Binds `rows` of each buffer (`row_len` elements a row) as that pair's past and present.
fn bind_rows<'a, T: PrimitiveTensorElementType + std::fmt::Debug + 'a>(
    binding: &mut IoBinding,
    buffers: impl Iterator<Item = &'a mut [T]>,
    names: impl Iterator<Item = (&'a CString, &'a String)>,
    rows: &Range<usize>,
    row_len: usize,
    shape: &[usize],
) -> Result<(), ort::Error> {
    for (buffer, (past, present)) in buffers.zip(names) {
        let region = &mut buffer[rows.start * row_len..rows.end * row_len];
        let view = host_view(region, shape)?;
        bind_input_in_place(binding, past, &view)?;
        binding.bind_output(present.as_str(), view)?;
    }
    Ok(())
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
    /// Reserves (but does not touch) `slots` rows of the model's whole context for every
    /// past/present pair.
    pub fn new(
        session: &Session,
        metadata: &ModelMetadata,
        past_names: &[String],
        present_names: &[String],
        slots: usize,
    ) -> Result<Self, String> {
        let c_name = |name: &str| CString::new(name).map_err(|e| e.to_string());
        let len = [
            metadata.num_kv_heads,
            metadata.context_length,
            metadata.head_dim,
        ]
        .iter()
        .try_fold(slots, |n, &d| n.checked_mul(d))
        .ok_or_else(|| "the KV pool's size overflows; lower engine.max_batch".to_owned())?;
        Ok(Self {
            binding: session.create_binding().map_err(|e| e.to_string())?,
            buffers: KvBuffers::zeroed(metadata.kv_dtype, past_names.len(), len)?,
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
            capacity: metadata.context_length,
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
        // A free slot between busy ones is fed a placeholder at its first position by
        // batched decodes (see `decode`): that position holds no sequence's data, but the
        // new occupant starts from zeroes all the same.
        self.zero(slot);
        self.occupants[slot] = Some(sequence);
        Some(slot)
    }

    /// The sequence that holds `slot`, if any.
    pub fn occupant(&self, slot: usize) -> Option<SequenceId> {
        self.occupants.get(slot).copied().flatten()
    }

    /// A copy of positions `start..start + len` of `slot` (all pairs and heads), or `None`
    /// where they do not lie within a slot.
    pub fn read_block(&self, slot: usize, start: usize, len: usize) -> Option<KvBlock> {
        if slot >= self.occupants.len() || start + len > self.capacity {
            return None;
        }
        let shape = [self.kv_heads, self.capacity, self.head_dim];
        Some(match &self.buffers {
            KvBuffers::Float32(b) => KvBlock::Float32(read_positions(b, slot, start, len, shape)),
            KvBuffers::Float16(b) => KvBlock::Float16(read_positions(b, slot, start, len, shape)),
        })
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
        let expected = self.buffers_len() * self.kv_heads * len * self.head_dim;
        let end = start + part.end;
        if slot >= self.occupants.len() || part.end > len || end > self.capacity {
            return false;
        }
        match (&mut self.buffers, block) {
            (KvBuffers::Float32(b), KvBlock::Float32(v)) if v.len() == expected => {
                write_positions(b, slot, start, (len, part), shape, v);
            }
            (KvBuffers::Float16(b), KvBlock::Float16(v)) if v.len() == expected => {
                write_positions(b, slot, start, (len, part), shape, v);
            }
            _ => return false,
        }
        note_written(&mut self.written, slot, end, self.capacity);
        true
    }

    fn buffers_len(&self) -> usize {
        match &self.buffers {
            KvBuffers::Float32(b) => b.len(),
            KvBuffers::Float16(b) => b.len(),
        }
    }

    /// Frees `slot` and zeroes every position its sequence's runs may have written.
    pub fn release(&mut self, slot: usize) {
        if let Some(occupant) = self.occupants.get_mut(slot) {
            *occupant = None;
            self.zero(slot);
        }
    }

    fn zero(&mut self, slot: usize) {
        let Some(written) = self.written.get_mut(slot) else {
            return;
        };
        let positions = std::mem::take(written);
        let shape = [self.kv_heads, self.capacity, self.head_dim];
        self.buffers.zero_positions(slot, positions, shape);
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
        let kv_shape = [batch, self.kv_heads, self.capacity, self.head_dim];
        let names = self.past_names.iter().zip(&self.present_names);
        match &mut self.buffers {
            KvBuffers::Float32(buffers) => bind_rows(
                &mut self.binding,
                buffers.iter_mut().map(Vec::as_mut_slice),
                names,
                &rows,
                row_len,
                &kv_shape,
            ),
            KvBuffers::Float16(buffers) => bind_rows(
                &mut self.binding,
                buffers.iter_mut().map(|b| b.reinterpret_cast_mut::<f16>()),
                names,
                &rows,
                row_len,
                &kv_shape,
            ),
        }
        .map_err(&bind)?;
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
        for (pair, name) in self.present_names.iter().enumerate() {
            let expected = self.buffers.address(pair, rows.start * row_len);
            written_in_place(&outputs, name, expected.unwrap_or(std::ptr::null()))?;
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
/// [`KvPool`], which owns both and rebinds before every run, calls this.
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
