//! The ONNX Runtime backend: the only module that names `ort`.
//!
//! One [`OrtBackend`] owns one session and the KV caches of its sequences. Graphs with the
//! fused contract (GroupQueryAttention) keep each sequence's cache in one buffer allocated
//! at start for the sequence's whole capacity and bound as both the past input and the
//! present output, so a decode step writes one new position in place and nothing is
//! reallocated or copied per token. Graphs with the optimum contract concatenate inside the
//! graph; their present outputs are moved, not copied, into the next step's inputs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use moat_core::{IoContract, ModelMetadata};
use ort::environment::Environment;
use ort::ep;
use ort::memory::MemoryInfo;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{IoBinding, Session, SessionInputValue};
use ort::value::{DynValue, Tensor, ValueType};

use super::backend::{
    Backend, BackendError, BackendModel, DeviceKind, LogitsBatch, SequenceId, StepInput,
};
use super::model_dir::{ModelDirError, ModelDirectory};
use super::runtime_library::{LocatedLibrary, RuntimeLibraryError};

/// Which device the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DevicePreference {
    Cpu,
    Cuda,
    /// CUDA when it works, otherwise CPU with a warning.
    #[default]
    Auto,
}

/// Default for [`SessionOptions::prefill_chunk_tokens`].
pub const DEFAULT_PREFILL_CHUNK_TOKENS: usize = 256;

/// Session settings.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub device: DevicePreference,
    /// Threads for one operator; `None` lets ONNX Runtime use one per physical core.
    pub intra_op_threads: Option<usize>,
    /// Most prompt tokens fed to the graph in one run; bounds the logits a run returns to
    /// this many rows.
    pub prefill_chunk_tokens: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            device: DevicePreference::default(),
            intra_op_threads: None,
            prefill_chunk_tokens: DEFAULT_PREFILL_CHUNK_TOKENS,
        }
    }
}

/// ONNX Runtime, loaded once per process from a located library.
#[derive(Debug)]
pub struct OrtRuntime {
    environment: Environment,
    version: String,
    library: LocatedLibrary,
}

/// Loading the model into ONNX Runtime failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Library(#[from] RuntimeLibraryError),
    #[error(transparent)]
    Model(#[from] ModelDirError),
    #[error(
        "device = \"cuda\" was configured but CUDA is not usable: {reason}. Fix: install an NVIDIA \
         driver and the onnxruntime-gpu library with its CUDA libraries, or set device = \"auto\" \
         or \"cpu\""
    )]
    CudaUnavailable { reason: String },
    #[error("ONNX Runtime could not create a session: {0}")]
    Session(String),
}

static RUNTIME: Mutex<Option<Arc<OrtRuntime>>> = Mutex::new(None);

impl OrtRuntime {
    /// Loads ONNX Runtime from `library`, once per process; later calls return the same
    /// runtime and fail if they name a different library.
    pub fn load(library: LocatedLibrary) -> Result<Arc<Self>, RuntimeLibraryError> {
        let mut slot = RUNTIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(runtime) = slot.as_ref() {
            if runtime.library.path == library.path {
                return Ok(Arc::clone(runtime));
            }
            return Err(RuntimeLibraryError::Unusable {
                path: library.path,
                origin: library.origin,
                reason: format!(
                    "this process already loaded ONNX Runtime from {}",
                    runtime.library.path.display()
                ),
            });
        }
        let unusable = |reason: String| RuntimeLibraryError::Unusable {
            path: library.path.clone(),
            origin: library.origin,
            reason,
        };
        let environment = ort::init_from(&library.path)
            .map_err(|e| unusable(e.to_string()))?
            .with_name("moatd")
            // Data stays local: nothing about our models or requests is reported anywhere.
            .with_telemetry(false)
            .build()
            .map_err(|e| unusable(e.to_string()))?;
        let version = library_version(&library.path).map_err(unusable)?;
        let runtime = Arc::new(Self {
            environment,
            version,
            library,
        });
        *slot = Some(Arc::clone(&runtime));
        Ok(runtime)
    }

    /// The loaded release, such as `1.32.0`.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn library(&self) -> &LocatedLibrary {
        &self.library
    }
}

/// Asks the library for its release (`OrtGetApiBase()->GetVersionString()`), such as
/// `1.32.0`. ort's build-info string does not always carry it.
#[allow(unsafe_code)]
fn library_version(path: &Path) -> Result<String, String> {
    // SAFETY: ort has just loaded this file as ONNX Runtime and checked that it exports
    // `OrtGetApiBase`; opening it again only takes another reference to the same mapping.
    // The symbol has the C signature ort-sys declares, it returns a pointer to a static
    // struct, and `GetVersionString` returns a static NUL-terminated string, which is
    // copied before the handle is dropped.
    unsafe {
        let library = libloading::Library::new(path).map_err(|e| e.to_string())?;
        let get_api_base: libloading::Symbol<
            '_,
            unsafe extern "C" fn() -> *const ort::sys::OrtApiBase,
        > = library.get(b"OrtGetApiBase").map_err(|e| e.to_string())?;
        let base = get_api_base();
        if base.is_null() {
            return Err("OrtGetApiBase returned nothing".to_owned());
        }
        let version = ((*base).GetVersionString)();
        if version.is_null() {
            return Err("GetVersionString returned nothing".to_owned());
        }
        Ok(std::ffi::CStr::from_ptr(version)
            .to_string_lossy()
            .into_owned())
    }
}

/// How a sequence's KV cache lives between steps.
enum KvCache {
    /// Fused contract: one buffer per past/present pair, bound as both input and output.
    Shared {
        binding: Box<IoBinding>,
        /// Address of each present buffer, in `present_names` order: after every run the
        /// outputs must still live there, or the next step would read a stale cache.
        buffers: Vec<usize>,
    },
    /// Optimum contract: the last step's present outputs, fed back as the next past.
    Moved { past: Vec<DynValue> },
}

struct SequenceState {
    /// Positions already in the cache.
    len: usize,
    capacity: usize,
    cache: KvCache,
}

/// A model loaded into an ONNX Runtime session.
pub struct OrtBackend {
    session: Session,
    metadata: ModelMetadata,
    model: BackendModel,
    past_names: Vec<String>,
    present_names: Vec<String>,
    sequences: HashMap<SequenceId, SequenceState>,
    /// Decode-step logits, `[1, 1, vocab]`, bound as the output of every single-token step.
    decode_logits: Tensor<f32>,
    cpu_memory: MemoryInfo<'static>,
    attention_mask: Vec<i64>,
    prefill_chunk_tokens: usize,
}

impl std::fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtBackend")
            .field("model", &self.model)
            .field("sequences", &self.sequences.len())
            .finish_non_exhaustive()
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
        let graph = model_dir.graph_path();
        let (session, device) = create_session(runtime, &graph, options)?;
        let metadata = model_dir.metadata.clone();
        check_io(&session, &metadata, &graph)?;
        let (past_names, present_names) = kv_names(&metadata);
        let decode_logits =
            Tensor::<f32>::new(session.allocator(), [1usize, 1, metadata.vocab_size])
                .map_err(|e| LoadError::Session(e.to_string()))?;
        let cpu_memory = MemoryInfo::default();
        let model = BackendModel {
            vocab_size: metadata.vocab_size,
            context_length: metadata.context_length,
            device,
        };
        Ok(Self {
            session,
            metadata,
            model,
            past_names,
            present_names,
            sequences: HashMap::new(),
            decode_logits,
            cpu_memory,
            attention_mask: Vec::new(),
            prefill_chunk_tokens: options.prefill_chunk_tokens.max(1),
        })
    }

    fn new_shared_cache(&mut self, capacity: usize) -> Result<KvCache, ort::Error> {
        let m = &self.metadata;
        let shape = [1usize, m.num_kv_heads, capacity, m.head_dim];
        let mut binding = self.session.create_binding()?;
        let mut buffers = Vec::with_capacity(self.present_names.len());
        for (past, present) in self.past_names.iter().zip(&self.present_names) {
            let mut buffer = Tensor::<f32>::new(self.session.allocator(), shape)?;
            // Positions past a sequence's length are never read, but start from zeros so
            // the buffer never exposes another sequence's leftovers.
            buffer.extract_tensor_mut().1.fill(0.0);
            buffers.push(buffer.data_ptr() as usize);
            binding.bind_input(past.as_str(), &buffer)?;
            binding.bind_output(present.as_str(), buffer)?;
        }
        Ok(KvCache::Shared {
            binding: Box::new(binding),
            buffers,
        })
    }

    fn new_moved_cache(&self) -> Result<KvCache, ort::Error> {
        let m = &self.metadata;
        let past = (0..self.past_names.len())
            .map(|_| {
                Tensor::<f32>::from_array(([1usize, m.num_kv_heads, 0, m.head_dim], Vec::new()))
                    .map(Tensor::into_dyn)
            })
            .collect::<Result<_, _>>()?;
        Ok(KvCache::Moved { past })
    }

    /// Runs one sequence's step and copies its last-position logits into `row`.
    fn step_one(&mut self, input: StepInput<'_>, row: &mut [f32]) -> Result<(), BackendError> {
        let sequence = input.sequence;
        let state = self
            .sequences
            .get_mut(&sequence)
            .ok_or(BackendError::UnknownSequence { sequence })?;
        let new = input.tokens.len();
        if new == 0 {
            return Err(BackendError::EmptyStep { sequence });
        }
        if state.len + new > state.capacity {
            return Err(BackendError::CapacityExceeded {
                sequence,
                needed: state.len + new,
                capacity: state.capacity,
            });
        }
        let vocab_size = self.model.vocab_size;
        if let Some(&token) = input.tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(BackendError::TokenOutOfVocab { token, vocab_size });
        }
        // A long prompt runs in chunks: the graph returns logits for every position it is
        // given, and a whole prompt's worth (prompt x vocabulary floats) would be a large,
        // pointless allocation when only the last row is used.
        for chunk in input.tokens.chunks(self.prefill_chunk_tokens) {
            self.run_chunk(sequence, chunk, row)?;
        }
        Ok(())
    }

    /// Feeds one chunk of tokens to a validated sequence.
    fn run_chunk(
        &mut self,
        sequence: SequenceId,
        tokens: &[u32],
        row: &mut [f32],
    ) -> Result<(), BackendError> {
        let state = self
            .sequences
            .get_mut(&sequence)
            .ok_or(BackendError::UnknownSequence { sequence })?;
        let new = tokens.len();
        let total = state.len + new;
        let runtime = |during| {
            move |e: ort::Error| BackendError::Runtime {
                during,
                message: e.to_string(),
            }
        };
        let ids = Tensor::from_array((
            [1usize, new],
            tokens.iter().map(|&t| i64::from(t)).collect::<Vec<_>>(),
        ))
        .map_err(runtime("building input_ids"))?;
        self.attention_mask.resize(total, 1);
        let mask = Tensor::from_array(([1usize, total], self.attention_mask.clone()))
            .map_err(runtime("building attention_mask"))?;

        match &mut state.cache {
            KvCache::Shared { binding, buffers } => {
                binding
                    .bind_input("input_ids", &ids)
                    .map_err(runtime("binding input_ids"))?;
                binding
                    .bind_input("attention_mask", &mask)
                    .map_err(runtime("binding attention_mask"))?;
                if new == 1 {
                    binding
                        .bind_output("logits", &mut self.decode_logits)
                        .map_err(runtime("binding logits"))?;
                } else {
                    binding
                        .bind_output_to_device("logits", &self.cpu_memory)
                        .map_err(runtime("binding logits"))?;
                }
                let outputs = self
                    .session
                    .run_binding(binding)
                    .map_err(runtime("the forward pass"))?;
                for (name, &buffer) in self.present_names.iter().zip(buffers.iter()) {
                    let written = outputs[name.as_str()]
                        .try_extract_tensor::<f32>()
                        .map(|(_, data)| data.as_ptr() as usize);
                    if written.ok() != Some(buffer) {
                        return Err(BackendError::Runtime {
                            during: "updating the KV cache in place",
                            message: format!(
                                "{name} was written to a new buffer; the graph does not share \
                                 past and present (use the optimum contract for it)"
                            ),
                        });
                    }
                }
                copy_last_row(&outputs["logits"], row)?;
            }
            KvCache::Moved { past } => {
                let positions = Tensor::from_array((
                    [1usize, new],
                    (state.len..total).map(|p| p as i64).collect::<Vec<_>>(),
                ))
                .map_err(runtime("building position_ids"))?;
                let mut inputs: Vec<(String, SessionInputValue<'_>)> =
                    Vec::with_capacity(3 + past.len());
                inputs.push(("input_ids".into(), ids.into()));
                inputs.push(("attention_mask".into(), mask.into()));
                inputs.push(("position_ids".into(), positions.into()));
                for (name, value) in self.past_names.iter().zip(past.drain(..)) {
                    inputs.push((name.clone(), value.into()));
                }
                let mut outputs = self
                    .session
                    .run(inputs)
                    .map_err(runtime("the forward pass"))?;
                copy_last_row(&outputs["logits"], row)?;
                for name in &self.present_names {
                    let value = outputs.remove(name).ok_or(BackendError::Runtime {
                        during: "reading the present KV cache",
                        message: format!("output {name} is missing"),
                    })?;
                    past.push(value);
                }
            }
        }
        state.len = total;
        Ok(())
    }
}

fn copy_last_row(logits: &DynValue, row: &mut [f32]) -> Result<(), BackendError> {
    let (shape, data) = logits
        .try_extract_tensor::<f32>()
        .map_err(|e| BackendError::Runtime {
            during: "reading logits",
            message: e.to_string(),
        })?;
    let width = shape.last().copied().unwrap_or(0) as usize;
    if width != row.len() || data.len() < width {
        return Err(BackendError::LogitsShape {
            expected: row.len(),
            found: width,
            detail: "the graph's logits width differs from vocab_size in moat-model.json",
        });
    }
    row.copy_from_slice(&data[data.len() - width..]);
    Ok(())
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
        let cache = match self.metadata.io_contract {
            IoContract::Fused => self.new_shared_cache(capacity),
            IoContract::Optimum => self.new_moved_cache(),
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
        // One session run per sequence for now; the batch shape of the API lets a batched
        // run replace this loop without touching callers.
        for (i, input) in batch.iter().enumerate() {
            self.step_one(*input, logits.row_mut(i))?;
        }
        Ok(())
    }

    fn finish_sequence(&mut self, sequence: SequenceId) {
        self.sequences.remove(&sequence);
    }
}

fn kv_names(metadata: &ModelMetadata) -> (Vec<String>, Vec<String>) {
    let mut past = Vec::with_capacity(metadata.num_layers * 2);
    for (k, v) in metadata.past_names() {
        past.push(k);
        past.push(v);
    }
    let mut present = Vec::with_capacity(metadata.num_layers * 2);
    for (k, v) in metadata.present_names() {
        present.push(k);
        present.push(v);
    }
    (past, present)
}

fn create_session(
    runtime: &OrtRuntime,
    graph: &Path,
    options: &SessionOptions,
) -> Result<(Session, DeviceKind), LoadError> {
    match options.device {
        DevicePreference::Cpu => Ok((
            build_session(runtime, graph, options, false)?,
            DeviceKind::Cpu,
        )),
        DevicePreference::Cuda => match build_session(runtime, graph, options, true) {
            Ok(session) => Ok((session, DeviceKind::Cuda)),
            Err(LoadError::Session(reason)) => Err(LoadError::CudaUnavailable { reason }),
            Err(other) => Err(other),
        },
        DevicePreference::Auto => match build_session(runtime, graph, options, true) {
            Ok(session) => Ok((session, DeviceKind::Cuda)),
            Err(LoadError::Session(reason)) => {
                tracing::warn!(%reason, "CUDA is not usable; running on CPU (device = \"auto\")");
                Ok((
                    build_session(runtime, graph, options, false)?,
                    DeviceKind::Cpu,
                ))
            }
            Err(other) => Err(other),
        },
    }
}

fn build_session(
    runtime: &OrtRuntime,
    graph: &Path,
    options: &SessionOptions,
    cuda: bool,
) -> Result<Session, LoadError> {
    let err = |e: ort::Error| LoadError::Session(e.to_string());
    let mut builder = Session::builder(&runtime.environment)
        .map_err(err)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| LoadError::Session(e.to_string()))?;
    if let Some(threads) = options.intra_op_threads {
        builder = builder
            .with_intra_threads(threads)
            .map_err(|e| LoadError::Session(e.to_string()))?;
    }
    if cuda {
        // A CPU-only library or missing CUDA libraries make registration fail; a driver
        // without a usable GPU makes session creation fail. Both end up as an error here,
        // never as a silent fallback.
        builder = builder
            .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
            .map_err(|e| LoadError::Session(e.to_string()))?;
    }
    builder.commit_from_file(graph).map_err(|e| {
        if cuda {
            LoadError::Session(e.to_string())
        } else {
            LoadError::Model(ModelDirError::BadGraph {
                path: graph.to_path_buf(),
                reason: e.to_string(),
            })
        }
    })
}

/// Checks that the graph has the inputs and outputs its declared contract needs.
fn check_io(session: &Session, metadata: &ModelMetadata, graph: &Path) -> Result<(), LoadError> {
    let bad = |reason: String| {
        LoadError::Model(ModelDirError::BadGraph {
            path: graph.to_path_buf(),
            reason,
        })
    };
    let inputs: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
    let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    let (past, present) = kv_names(metadata);
    let mut wanted_inputs: Vec<&str> = vec!["input_ids", "attention_mask"];
    if metadata.io_contract == IoContract::Optimum {
        wanted_inputs.push("position_ids");
    }
    wanted_inputs.extend(past.iter().map(String::as_str));
    let mut wanted_outputs: Vec<&str> = vec!["logits"];
    wanted_outputs.extend(present.iter().map(String::as_str));
    let missing: Vec<&str> = wanted_inputs
        .iter()
        .filter(|n| !inputs.contains(n))
        .chain(wanted_outputs.iter().filter(|n| !outputs.contains(n)))
        .copied()
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "the {:?} I/O contract needs {} which the graph lacks (graph inputs: {})",
            metadata.io_contract,
            missing.join(", "),
            inputs.join(", ")
        )));
    }
    let unexpected: Vec<&str> = inputs
        .iter()
        .filter(|n| !wanted_inputs.contains(n))
        .copied()
        .collect();
    if !unexpected.is_empty() {
        return Err(bad(format!(
            "the graph has inputs the {:?} contract does not provide: {}",
            metadata.io_contract,
            unexpected.join(", ")
        )));
    }
    if let Some(logits) = session.outputs().iter().find(|o| o.name() == "logits")
        && let ValueType::Tensor { shape, .. } = logits.dtype()
        && let Some(&width) = shape.last()
        && width > 0
        && width as usize != metadata.vocab_size
    {
        return Err(bad(format!(
            "its logits are {width} wide but moat-model.json says vocab_size {}",
            metadata.vocab_size
        )));
    }
    Ok(())
}
