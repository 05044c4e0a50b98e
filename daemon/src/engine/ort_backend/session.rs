//! Loading ONNX Runtime and creating sessions on the preferred device.

use std::path::Path;
use std::sync::{Arc, Mutex};

use moat_core::{IoContract, ModelMetadata};
use ort::environment::Environment;
use ort::ep;
use ort::error::ErrorCode;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::ValueType;

use super::kv_pool::KvPlacement;
use super::runtime_library::{LocatedLibrary, RuntimeLibraryError};
use crate::engine::backend::DeviceKind;
use crate::engine::cpu_affinity;
use crate::engine::model_dir::{ModelDirError, ModelDirectory};

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

/// Default for [`SessionOptions::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 32;
/// The prefix cache's size by default (`engine.prefix_cache_mib`).
pub const DEFAULT_PREFIX_CACHE_MIB: usize = 128;

/// Session settings.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub device: DevicePreference,
    /// Threads for one operator; `None` lets ONNX Runtime use one per physical core.
    pub intra_op_threads: Option<usize>,
    /// With `intra_op_threads` set: pin each worker thread to its own processor (off by
    /// default; see `cpu_affinity`).
    pub pin_threads: bool,
    /// Most prompt tokens fed to the graph in one run; bounds the logits a run returns to
    /// this many rows.
    pub prefill_chunk_tokens: usize,
    /// Sequences one decode run batches: on the CPU the slots of the fused contract's KV
    /// pool, and the rows of the optimum contract's decode group (below 2, optimum-contract
    /// sequences decode alone). The engine runs at most this many sequences at once
    /// (`engine.max_batch`).
    pub max_batch: usize,
    /// Bytes of cached prompt prefixes the backend keeps at most (0: none); only pooled
    /// sequences use them.
    pub prefix_cache_bytes: usize,
    /// Where the KV pool's buffers come from; `None`: where the graph's attention reads
    /// them (the provider's device memory for a float16 graph on CUDA, host memory
    /// otherwise). `Some(ProviderAllocator)` on the CPU takes the path CUDA takes.
    pub kv_placement: Option<KvPlacement>,
    /// Positions each pool slot holds, below the model's context; `None`: the whole
    /// context. Longer sequences get caches of their own.
    pub kv_slot_tokens: Option<usize>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            device: DevicePreference::default(),
            intra_op_threads: None,
            pin_threads: false,
            prefill_chunk_tokens: DEFAULT_PREFILL_CHUNK_TOKENS,
            max_batch: DEFAULT_MAX_BATCH,
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE_MIB << 20,
            kv_placement: None,
            kv_slot_tokens: None,
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
    /// The process's ONNX Runtime environment, for sessions the backend makes itself.
    pub(super) fn environment(&self) -> &Environment {
        &self.environment
    }

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
        // Before the library initialises: afterwards its telemetry has already started.
        super::telemetry::check_switched_off()?;
        let environment = ort::init_from(&library.path)
            .map_err(|e| unusable(e.to_string()))?
            .with_name("moatd")
            // Also off through the API, for a library that honours only that.
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

pub(super) fn kv_names(metadata: &ModelMetadata) -> (Vec<String>, Vec<String>) {
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
/// Creates the session on the preferred device, once the graph passed moat's own checks
/// ([`ModelDirectory::vet_graph`]): ONNX Runtime never reads a graph with an operator moat
/// does not serve or external data from outside the model. Only a CUDA failure falls back
/// (for `auto`); a broken graph is reported as such on every device.
pub(super) fn create_session(
    runtime: &OrtRuntime,
    model_dir: &ModelDirectory,
    options: &SessionOptions,
) -> Result<(Session, DeviceKind), LoadError> {
    model_dir.vet_graph()?;
    let graph = &model_dir.graph_path();
    match options.device {
        DevicePreference::Cpu => Ok((
            build_session(runtime, graph, options, false)?,
            DeviceKind::Cpu,
        )),
        DevicePreference::Cuda => Ok((
            build_session(runtime, graph, options, true)?,
            DeviceKind::Cuda,
        )),
        DevicePreference::Auto => match build_session(runtime, graph, options, true) {
            Ok(session) => Ok((session, DeviceKind::Cuda)),
            Err(LoadError::CudaUnavailable { reason }) => {
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
    let session_error = |e: ort::Error| LoadError::Session(e.to_string());
    let mut builder = Session::builder(&runtime.environment)
        .map_err(session_error)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| LoadError::Session(e.to_string()))?;
    if let Some(threads) = options.intra_op_threads {
        builder = builder
            .with_intra_threads(threads)
            .map_err(|e| LoadError::Session(e.to_string()))?;
        // Only with an explicit thread count: ONNX Runtime's own default counts physical
        // cores, and pinning must not change how many threads run.
        let allowed = options
            .pin_threads
            .then(cpu_affinity::allowed_cpus)
            .flatten()
            .unwrap_or_default();
        if let Some(affinities) = cpu_affinity::intra_op_affinities(threads, &allowed) {
            builder = builder
                .with_config_entry("session.intra_op_thread_affinities", &affinities)
                .map_err(|e| LoadError::Session(e.to_string()))?;
        }
    }
    if cuda {
        // A CPU-only library or missing CUDA libraries make registration fail here; never
        // a silent CPU session behind the caller's back.
        builder = builder
            .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
            .map_err(|e| LoadError::CudaUnavailable {
                reason: e.to_string(),
            })?;
    }
    builder.commit_from_file(graph).map_err(|e| {
        let graph_at_fault = matches!(
            e.code(),
            ErrorCode::InvalidProtobuf
                | ErrorCode::InvalidGraph
                | ErrorCode::NoSuchFile
                | ErrorCode::NoModel
                | ErrorCode::NotImplemented
        );
        if cuda && !graph_at_fault {
            // A driver without a usable GPU fails only here, at session creation.
            LoadError::CudaUnavailable {
                reason: e.to_string(),
            }
        } else {
            LoadError::Model(ModelDirError::BadGraph {
                path: graph.to_path_buf(),
                reason: e.to_string(),
            })
        }
    })
}

/// Checks that the graph has the inputs and outputs its declared contract needs.
pub(super) fn check_io(
    session: &Session,
    metadata: &ModelMetadata,
    graph: &Path,
) -> Result<(), LoadError> {
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
    check_shapes(session, metadata, graph)
}

/// Checks the graph's static dimensions against the metadata the engine sizes buffers from.
fn check_shapes(
    session: &Session,
    metadata: &ModelMetadata,
    graph: &Path,
) -> Result<(), LoadError> {
    if let Some(logits) = session.outputs().iter().find(|o| o.name() == "logits")
        && let ValueType::Tensor { shape, .. } = logits.dtype()
        && let Some(&width) = shape.last()
        && width > 0
        && width as usize != metadata.vocab_size
    {
        return Err(LoadError::Model(ModelDirError::GraphMismatch {
            path: graph.with_file_name(crate::engine::model_dir::METADATA_FILE),
            field: "vocab_size",
            declared: metadata.vocab_size,
            graph: width,
        }));
    }
    // The cache is allocated from the metadata's shape; a graph that disagrees would fail
    // at the first step with an opaque shape error, so say so now.
    if let Some(past) = session
        .inputs()
        .iter()
        .find(|o| o.name() == "past_key_values.0.key")
        && let ValueType::Tensor { shape, .. } = past.dtype()
        && shape.len() == 4
    {
        for (axis, field, declared) in [
            (1, "num_kv_heads", metadata.num_kv_heads),
            (3, "head_dim", metadata.head_dim),
        ] {
            let dim = shape[axis];
            if dim > 0 && dim as usize != declared {
                return Err(LoadError::Model(ModelDirError::GraphMismatch {
                    path: graph.with_file_name(crate::engine::model_dir::METADATA_FILE),
                    field,
                    declared,
                    graph: dim,
                }));
            }
        }
    }
    Ok(())
}
