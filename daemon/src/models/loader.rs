//! Loading a model directory as what its metadata says it is, and the memory it is
//! expected to take.

use std::path::Path;
use std::sync::Arc;

use moat_core::{KvDtype, ModelMetadata, ModelTask};

use super::serving::{EmbeddingService, ServedModel};
use crate::config::Config;
use crate::engine::{Embedder, Engine, ModelDirectory, OrtRuntime, StartError};

/// Loads one model directory and warms it up.
pub fn load(
    config: &Config,
    runtime: &OrtRuntime,
    directory: ModelDirectory,
) -> Result<ServedModel, StartError> {
    let task = directory.metadata.task;
    let root = directory.root.clone();
    let options = config.session_options();
    let (model, device) = match task {
        ModelTask::TextGeneration => {
            let engine = Engine::load_ort_directory(
                runtime,
                &directory,
                &options,
                config.engine_settings(),
            )?;
            let device = engine.model().device;
            (ServedModel::Generator(Arc::new(engine)), device)
        }
        ModelTask::Embedding => {
            let embedder = Embedder::load_ort_directory(runtime, directory, &options)?;
            let device = embedder.device();
            let service = EmbeddingService::new(embedder, config.engine.queue_capacity);
            (ServedModel::Embedder(Arc::new(service)), device)
        }
    };
    tracing::info!(dir = %root.display(), %task, %device, "model loaded and warmed");
    Ok(model)
}

/// What loading a model is expected to take: its files twice over (the session's copy of
/// the weights and ONNX Runtime's prepacked kernels) and, for a decoder, the KV cache of
/// one sequence at full context. The KV pool's slots are reserved address space that
/// becomes resident only as tokens are cached, so they are not counted in full.
pub fn memory_estimate(metadata: &ModelMetadata, file_bytes: u64) -> u64 {
    let element = match metadata.kv_dtype {
        KvDtype::Float32 => 4,
        KvDtype::Float16 => 2,
    };
    let kv = (metadata.num_layers * 2 * metadata.num_kv_heads * metadata.head_dim) as u64
        * metadata.context_length as u64
        * element;
    file_bytes.saturating_mul(2).saturating_add(kv)
}

/// Memory the host has available now (`MemAvailable`), if it says.
pub fn host_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string(Path::new("/proc/meminfo")).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
