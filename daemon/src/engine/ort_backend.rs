//! The ONNX Runtime backend: this module and its children (`session`, `encoder`, `kv_pool`,
//! `telemetry`) are the only code that names `ort`.
//!
//! One [`OrtBackend`] owns one session and the KV caches of its sequences. Graphs with the
//! fused contract (GroupQueryAttention) keep every sequence's cache in a slot of one
//! [`KvPool`], on every device (its memory where the attention kernels read it): a step's
//! decode tokens, one per sequence, go through the graph as one batch over the pool's rows,
//! each row attending to its own length, and GroupQueryAttention writes the new positions
//! in place. Nothing is reallocated or copied per token. A fused sequence longer than a
//! slot, or beyond the pool's slots, gets a buffer of its own, bound as both past and
//! present and run alone. Graphs with the optimum contract concatenate inside
//! the graph; their present outputs are moved, not copied, into the next step's inputs. A
//! sequence with the optimum contract runs its prompt alone, then decodes in the backend's
//! [`DecodeGroup`]: one run a step for every decoding sequence, their caches side by side in
//! one set of past tensors (see `decode_group` for the layout and what it costs).

mod decode_group;
pub(super) mod encoder;
mod kv_pool;
mod logits;
mod optimum;
mod pooled;
pub mod runtime_library;
mod session;
mod telemetry;

use std::collections::HashMap;
use std::sync::Arc;

use moat_core::{IoContract, KvDtype, ModelMetadata, ModelTask};
use ort::memory::MemoryInfo;
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, DynTensorValueType, DynValue, Tensor, TensorElementType};

use super::backend::{
    Backend, BackendError, BackendModel, DeviceKind, LogitsBatch, SequenceId, StepInput,
};
use super::model_dir::ModelDirectory;
use super::prefix_cache::{PrefixCache, PrefixChain, PrefixScope, PrefixStats};
use decode_group::{DecodeGroup, GroupDecode};
pub use kv_pool::KvPlacement;
use kv_pool::{KvBlock, KvPool};
use logits::{copy_last_row, copy_logits_row};
pub use session::{
    DEFAULT_MAX_BATCH, DEFAULT_PREFILL_CHUNK_TOKENS, DEFAULT_PREFIX_CACHE_MIB, DevicePreference,
    LoadError, OrtRuntime, SessionOptions,
};
use session::{check_io, create_session, kv_names};
pub use telemetry::{TELEMETRY_SWITCH, TelemetryOn, check_switched_off, switch_off_in_environment};

/// How a sequence's KV cache lives between steps.
enum KvCache {
    /// Fused contract on the CPU: one row of the backend's [`KvPool`].
    Pooled { slot: usize },
    /// Fused contract: one buffer per past/present pair, bound as both input and output.
    Shared {
        binding: Box<IoBinding>,
        /// One host buffer per past/present pair, in `past_names` order.
        buffers: Vec<DynTensor>,
        /// Whether a run has shown that the graph writes its outputs into `buffers`; a
        /// graph that wrote elsewhere would leave the next step reading a stale cache.
        verified: bool,
    },
    /// Optimum contract: the last step's present outputs, fed back as the next past.
    Moved { past: Vec<DynValue> },
    /// Optimum contract, decoding: a row of the backend's [`DecodeGroup`].
    Grouped,
}

struct SequenceState {
    /// Positions already in the cache.
    len: usize,
    capacity: usize,
    cache: KvCache,
    /// Where its prompt stands in the prefix cache's key chain, while its prompt is fed.
    prefix: Option<PrefixChain>,
}

/// A model loaded into an ONNX Runtime session.
pub struct OrtBackend {
    pool: Option<KvPool>,
    /// Prompt prefixes computed once for the pool's sequences (see `pooled`).
    prefix_cache: Option<PrefixCache<KvBlock>>,
    /// Optimum contract: the sequences that decode together.
    group: DecodeGroup,
    session: Session,
    metadata: ModelMetadata,
    model: BackendModel,
    past_names: Vec<String>,
    present_names: Vec<String>,
    sequences: HashMap<SequenceId, SequenceState>,
    /// On CUDA, IO binding copies a host input to the device when it is bound, not when the
    /// graph runs; past buffers are then bound again before every run so that a node on
    /// the GPU never reads a stale copy. (float32 attention runs on the CPU even in a CUDA
    /// session, reading the host buffer in place.)
    rebind_past_each_run: bool,
    /// Decode-step logits, `[1, 1, vocab]`, bound as the output of every single-token step.
    decode_logits: Tensor<f32>,
    cpu_memory: MemoryInfo<'static>,
    prefill_chunk_tokens: usize,
    /// The KV cache's element type (the graph's past/present type).
    kv_element: TensorElementType,
    /// (index in the step's batch, slot) of the step's pooled decodes; reused.
    decode_plan: Vec<(usize, usize)>,
    /// (index in the step's batch, slot) of the step's pooled first prompt chunks; reused.
    prefill_plan: Vec<(usize, usize)>,
    /// The step's decodes in the group; reused.
    group_plan: Vec<GroupDecode>,
    /// Forward passes run so far.
    session_runs: u64,
}

impl std::fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtBackend")
            .field("model", &self.model)
            .field("sequences", &self.sequences.len())
            .finish_non_exhaustive()
    }
}

fn runtime_error(during: &'static str) -> impl Fn(ort::Error) -> BackendError {
    move |e| BackendError::Runtime {
        during,
        message: e.to_string(),
    }
}

impl OrtBackend {
    /// Creates the session on the preferred device and checks the graph's I/O against the
    /// model's metadata.
    pub fn load(
        runtime: &OrtRuntime,
        model_dir: &ModelDirectory,
        options: &SessionOptions,
    ) -> Result<Self, LoadError> {
        model_dir.require_task(ModelTask::TextGeneration)?;
        let graph = model_dir.graph_path();
        let (session, device) = create_session(runtime, model_dir, options)?;
        let metadata = model_dir.metadata.clone();
        check_io(&session, &metadata, &graph)?;
        let (past_names, present_names) = kv_names(&metadata);
        let decode_logits =
            Tensor::<f32>::new(session.allocator(), [1usize, 1, metadata.vocab_size])
                .map_err(|e| LoadError::Session(e.to_string()))?;
        let model = BackendModel {
            vocab_size: metadata.vocab_size,
            context_length: metadata.context_length,
            device,
        };
        // Every fused graph batches through the pool, on every device; its memory is where
        // the graph's attention reads it. On CUDA, GroupQueryAttention runs on the device
        // for float16 and bfloat16 only: a float32 graph's attention runs on the CPU kernels
        // even in a CUDA session, reading a host pool in place.
        let pool_slots = match metadata.io_contract {
            IoContract::Fused => options.max_batch,
            _ => 0,
        };
        let placement = options
            .kv_placement
            .unwrap_or(match (device, metadata.kv_dtype) {
                (DeviceKind::Cuda, KvDtype::Float16) => KvPlacement::ProviderAllocator,
                _ => KvPlacement::Host,
            });
        let kv_element = match metadata.kv_dtype {
            KvDtype::Float32 => TensorElementType::Float32,
            KvDtype::Float16 => TensorElementType::Float16,
        };
        let pool = match pool_slots {
            0 => None,
            slots => Some(
                KvPool::new(
                    &session,
                    &metadata,
                    (&past_names, &present_names),
                    (
                        slots,
                        options.kv_slot_tokens.unwrap_or(metadata.context_length),
                    ),
                    (placement, device),
                    runtime.environment(),
                )
                .map_err(LoadError::Session)?,
            ),
        };
        // Where sequences cannot be stepped together, say so once, at load.
        match (metadata.io_contract, pool_slots) {
            (IoContract::Fused, 0) => tracing::warn!(
                model = %metadata.name,
                %device,
                "each sequence of this model runs alone: engine.max_batch is 0, so the KV pool \
                 has no slots"
            ),
            (IoContract::Optimum, _) if options.max_batch < 2 => tracing::info!(
                model = %metadata.name,
                "each sequence of this model decodes alone: engine.max_batch is below 2"
            ),
            _ => {}
        }
        let prefix_cache = match (&pool, options.prefix_cache_bytes) {
            (Some(_), bytes) if bytes > 0 => Some(PrefixCache::new(bytes)),
            _ => None,
        };
        Ok(Self {
            pool,
            prefix_cache,
            group: DecodeGroup::new(&metadata, options.max_batch),
            session,
            metadata,
            model,
            past_names,
            present_names,
            sequences: HashMap::new(),
            rebind_past_each_run: device == DeviceKind::Cuda,
            decode_logits,
            cpu_memory: MemoryInfo::default(),
            prefill_chunk_tokens: options.prefill_chunk_tokens.max(1),
            kv_element,
            decode_plan: Vec::with_capacity(pool_slots),
            prefill_plan: Vec::with_capacity(pool_slots),
            group_plan: Vec::new(),
            session_runs: 0,
        })
    }

    /// How many forward passes the backend has run: one per batched decode, prompt chunk or
    /// lone step. Batching shows as fewer runs than sequences stepped.
    pub fn session_runs(&self) -> u64 {
        self.session_runs
    }

    /// Positions the input's sequence holds (0 for one the backend does not know).
    fn len(&self, input: &StepInput<'_>) -> usize {
        self.sequences
            .get(&input.sequence)
            .map_or(0, |state| state.len)
    }

    /// The pool slot of a sequence whose cache lives in the pool.
    fn pooled_slot(&self, sequence: SequenceId) -> Option<usize> {
        match self.sequences.get(&sequence)?.cache {
            KvCache::Pooled { slot } => Some(slot),
            _ => None,
        }
    }

    fn new_shared_cache(&mut self, capacity: usize) -> Result<KvCache, ort::Error> {
        let m = &self.metadata;
        let shape = [1usize, m.num_kv_heads, capacity, m.head_dim];
        let mut binding = self.session.create_binding()?;
        let mut buffers = Vec::with_capacity(self.past_names.len());
        for (past, present) in self.past_names.iter().zip(&self.present_names) {
            // Host memory, zeroed by ort, so a buffer never exposes another sequence's
            // leftovers.
            let mut buffer = DynTensor::new(self.session.allocator(), self.kv_element, shape)?;
            binding.bind_input(past.as_str(), &buffer)?;
            binding.bind_output(present.as_str(), &mut buffer)?;
            buffers.push(buffer);
        }
        Ok(KvCache::Shared {
            binding: Box::new(binding),
            buffers,
            verified: false,
        })
    }

    /// Checks a step input before anything runs, so a bad input fails the step before any
    /// cache has moved.
    fn check_input(&self, input: &StepInput<'_>) -> Result<(), BackendError> {
        let sequence = input.sequence;
        let state = self
            .sequences
            .get(&sequence)
            .ok_or(BackendError::UnknownSequence { sequence })?;
        if input.tokens.is_empty() {
            return Err(BackendError::EmptyStep { sequence });
        }
        let needed = state.len.saturating_add(input.tokens.len());
        if needed > state.capacity {
            return Err(BackendError::CapacityExceeded {
                sequence,
                needed,
                capacity: state.capacity,
            });
        }
        let vocab_size = self.model.vocab_size;
        if let Some(&token) = input.tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(BackendError::TokenOutOfVocab { token, vocab_size });
        }
        Ok(())
    }

    /// Runs one checked sequence's step and copies its last-position logits into `row`.
    fn step_one(&mut self, input: StepInput<'_>, row: &mut [f32]) -> Result<(), BackendError> {
        self.ungroup(input.sequence)?;
        // A long prompt runs in chunks: the graph returns logits for every position it is
        // given, and a whole prompt's worth (prompt x vocabulary floats) would be a large,
        // pointless allocation when only the last row is used.
        for chunk in input.tokens.chunks(self.prefill_chunk_tokens) {
            self.run_chunk(input.sequence, chunk, row)?;
        }
        Ok(())
    }

    /// Feeds one chunk of tokens to a checked sequence.
    fn run_chunk(
        &mut self,
        sequence: SequenceId,
        tokens: &[u32],
        row: &mut [f32],
    ) -> Result<(), BackendError> {
        // Taken out of the map while it runs (the run borrows the backend mutably) and put
        // back whatever happens.
        let mut state = self
            .sequences
            .remove(&sequence)
            .ok_or(BackendError::UnknownSequence { sequence })?;
        let result = self.run_state(&mut state, tokens, row);
        self.sequences.insert(sequence, state);
        result
    }

    /// Runs one chunk for a sequence's state; its length moves only if the run succeeded.
    fn run_state(
        &mut self,
        state: &mut SequenceState,
        tokens: &[u32],
        row: &mut [f32],
    ) -> Result<(), BackendError> {
        let total = state.len + tokens.len();
        match &mut state.cache {
            KvCache::Pooled { slot } => {
                let pool = self.pool.as_mut().ok_or_else(no_pool)?;
                self.session_runs += 1;
                row.copy_from_slice(pool.prefill(&mut self.session, *slot, state.len, tokens)?);
            }
            KvCache::Shared {
                binding,
                buffers,
                verified,
            } => {
                let (ids, mask) = single_row_inputs(tokens, total)?;
                self.run_shared(binding, buffers, verified, ids, mask, row)?
            }
            KvCache::Moved { past } => {
                let (ids, mask) = single_row_inputs(tokens, total)?;
                self.run_moved(past, ids, mask, state.len..total, row)?
            }
            // `step_one` takes a sequence out of the group before it runs alone.
            KvCache::Grouped => {
                return Err(BackendError::Runtime {
                    during: "planning a step",
                    message: "a sequence of the decode group was run alone".to_owned(),
                });
            }
        };
        state.len = total;
        Ok(())
    }

    fn run_shared(
        &mut self,
        binding: &mut IoBinding,
        buffers: &[DynTensor],
        verified: &mut bool,
        ids: Tensor<i64>,
        mask: Tensor<i64>,
        row: &mut [f32],
    ) -> Result<(), BackendError> {
        binding
            .bind_input("input_ids", &ids)
            .map_err(runtime_error("binding input_ids"))?;
        binding
            .bind_input("attention_mask", &mask)
            .map_err(runtime_error("binding attention_mask"))?;
        if self.rebind_past_each_run {
            for (name, buffer) in self.past_names.iter().zip(buffers) {
                binding
                    .bind_input(name.as_str(), buffer)
                    .map_err(runtime_error("binding the KV cache"))?;
            }
        }
        if ids.shape()[1] == 1 {
            binding.bind_output("logits", &mut self.decode_logits)
        } else {
            binding.bind_output_to_device("logits", &self.cpu_memory)
        }
        .map_err(runtime_error("binding logits"))?;
        self.session_runs += 1;
        let outputs = self
            .session
            .run_binding(binding)
            .map_err(runtime_error("the forward pass"))?;
        if !*verified {
            for (name, buffer) in self.present_names.iter().zip(buffers) {
                written_in_place(&outputs, name, buffer.data_ptr())?;
            }
            *verified = true;
        }
        copy_last_row(output(&outputs, "logits")?, row)
    }
}

/// `input_ids` and an all-ones `attention_mask` for one sequence's run.
fn single_row_inputs(
    tokens: &[u32],
    total: usize,
) -> Result<(Tensor<i64>, Tensor<i64>), BackendError> {
    let ids = Tensor::from_array((
        [1usize, tokens.len()],
        tokens.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(),
    ))
    .map_err(runtime_error("building input_ids"))?;
    let mask = Tensor::from_array(([1usize, total], vec![1i64; total]))
        .map_err(runtime_error("building attention_mask"))?;
    Ok((ids, mask))
}

fn no_pool() -> BackendError {
    BackendError::Runtime {
        during: "a pooled run",
        message: "the backend has no KV pool".to_owned(),
    }
}

/// Fails unless the graph wrote the present output `name` at `expected`, the past buffer it
/// was bound with: a graph that wrote elsewhere would leave the next step reading a stale
/// cache.
fn written_in_place(
    outputs: &ort::session::SessionOutputs<'_>,
    name: &str,
    expected: *const std::ffi::c_void,
) -> Result<(), BackendError> {
    let written = outputs
        .get(name)
        .and_then(|value| value.view().downcast::<DynTensorValueType>().ok())
        .map(|tensor| tensor.data_ptr());
    if written == Some(expected) {
        return Ok(());
    }
    Err(BackendError::Runtime {
        during: "updating the KV cache in place",
        message: format!(
            "{name} was written to a new buffer; the graph does not share past and present \
             (declare it with the optimum contract)"
        ),
    })
}

fn output<'a>(
    outputs: &'a ort::session::SessionOutputs<'_>,
    name: &str,
) -> Result<&'a DynValue, BackendError> {
    outputs.get(name).ok_or_else(|| BackendError::Runtime {
        during: "reading outputs",
        message: format!("the graph produced no {name}"),
    })
}

impl Backend for OrtBackend {
    fn model(&self) -> &BackendModel {
        &self.model
    }

    fn start_sequence(
        &mut self,
        sequence: SequenceId,
        capacity: usize,
    ) -> Result<(), BackendError> {
        if self.sequences.contains_key(&sequence) {
            return Err(BackendError::DuplicateSequence { sequence });
        }
        let slot = match (self.metadata.io_contract, self.pool.as_mut()) {
            (IoContract::Fused, Some(pool)) if capacity <= pool.capacity() => {
                pool.acquire(sequence)
            }
            _ => None,
        };
        let cache = match (self.metadata.io_contract, slot) {
            (_, Some(slot)) => Ok(KvCache::Pooled { slot }),
            (IoContract::Fused, None) => self.new_shared_cache(capacity),
            (IoContract::Optimum, None) => self.new_moved_cache(),
            // `load` refuses encoder graphs; they have no cache to allocate.
            (IoContract::Encoder, None) => {
                return Err(BackendError::Runtime {
                    during: "allocating the KV cache",
                    message: "an encoder graph has no KV cache".to_owned(),
                });
            }
        }
        .map_err(|e| BackendError::Runtime {
            during: "allocating the KV cache",
            message: e.to_string(),
        })?;
        self.sequences.insert(
            sequence,
            SequenceState {
                len: 0,
                capacity,
                cache,
                prefix: None,
            },
        );
        Ok(())
    }

    fn step(
        &mut self,
        batch: &[StepInput<'_>],
        logits: &mut LogitsBatch,
    ) -> Result<(), BackendError> {
        logits.reset(batch.len(), self.model.vocab_size);
        for (index, input) in batch.iter().enumerate() {
            self.check_input(input)?;
            // Each input is checked against its sequence's length before the step; a second
            // input for the same sequence would be checked against a stale one.
            if batch[..index].iter().any(|b| b.sequence == input.sequence) {
                return Err(BackendError::Runtime {
                    during: "planning a step",
                    message: format!("{} appears twice in one step", input.sequence),
                });
            }
        }
        // Pooled decodes and the decode group's wait for one batched run each, and the
        // first prompt chunks of pooled sequences go through batched runs of their own;
        // everything else (later prompt chunks, and sequences with caches of their own)
        // runs alone, first.
        let mut plan = std::mem::take(&mut self.decode_plan);
        plan.clear();
        let mut prefills = std::mem::take(&mut self.prefill_plan);
        prefills.clear();
        self.group_plan.clear();
        let mut joining = 0;
        let mut result = Ok(());
        for (index, input) in batch.iter().enumerate() {
            let slot = self.pooled_slot(input.sequence);
            // Prompt positions found in the prefix cache are copied, not computed.
            let restored = match slot {
                Some(slot) if input.tokens.len() > 1 => self.restore_prefix(input, slot),
                _ => 0,
            };
            let rest = StepInput {
                sequence: input.sequence,
                tokens: &input.tokens[restored..],
            };
            match (rest.tokens.len(), slot) {
                (1, Some(slot)) => plan.push((index, slot)),
                (n, Some(slot)) if n <= self.prefill_chunk_tokens && self.len(input) == 0 => {
                    prefills.push((index, slot));
                }
                (1, None) if self.plan_grouped(index, input, &mut joining) => {
                    // Decodes in the group's run, below.
                }
                _ => {
                    if let Err(e) = self.step_one(rest, logits.row_mut(index)) {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        self.decode_plan = plan;
        if result.is_ok() {
            result = self.prefill_pooled(batch, logits, &mut prefills);
        }
        self.prefill_plan = prefills;
        result?;
        self.decode_pooled(batch, logits)?;
        self.decode_grouped(logits)?;
        self.remember_prefixes(batch);
        Ok(())
    }

    fn share_prefixes(&mut self, sequence: SequenceId, scope: PrefixScope) {
        if self.prefix_cache.is_none() {
            return;
        }
        if let Some(state) = self.sequences.get_mut(&sequence)
            && state.len == 0
            && matches!(state.cache, KvCache::Pooled { .. })
        {
            state.prefix = Some(PrefixChain::new(scope));
        }
    }

    fn prefix_stats(&self) -> Option<Arc<PrefixStats>> {
        self.prefix_cache.as_ref().map(PrefixCache::stats)
    }

    fn finish_sequence(&mut self, sequence: SequenceId) {
        let removed = self.sequences.remove(&sequence);
        if let Some(SequenceState {
            cache: KvCache::Grouped,
            ..
        }) = removed
        {
            self.group.leave(sequence);
        }
        if let (
            Some(SequenceState {
                cache: KvCache::Pooled { slot },
                ..
            }),
            Some(pool),
        ) = (removed, self.pool.as_mut())
        {
            pool.release(slot);
        }
    }
}
