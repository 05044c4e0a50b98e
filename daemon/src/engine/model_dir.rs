//! A model directory on disk: `model.onnx`, `tokenizer.json` and `moat-model.json`.

use std::path::{Path, PathBuf};

use moat_core::{EmbeddingSpec, MetadataError, ModelMetadata, ModelTask};

pub const GRAPH_FILE: &str = "model.onnx";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const METADATA_FILE: &str = "moat-model.json";

/// A model directory whose files exist and whose metadata parsed.
#[derive(Debug, Clone)]
pub struct ModelDirectory {
    pub root: PathBuf,
    pub metadata: ModelMetadata,
}

/// Why a model directory could not be used. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    #[error(
        "model file {path} is missing (a model directory holds {GRAPH_FILE}, {TOKENIZER_FILE} and {METADATA_FILE})"
    )]
    Missing { path: PathBuf },
    #[error("model file {path} could not be read: {source}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model file {path} is invalid: {source}")]
    BadMetadata {
        path: PathBuf,
        #[source]
        source: MetadataError,
    },
    #[error("model file {path} is not a usable tokenizer: {reason}")]
    BadTokenizer { path: PathBuf, reason: String },
    #[error("model file {path} is not a usable ONNX graph: {reason}")]
    BadGraph { path: PathBuf, reason: String },
    #[error("model file {path} says {field} = {declared}, but model.onnx has {graph}")]
    GraphMismatch {
        path: PathBuf,
        field: &'static str,
        declared: usize,
        graph: i64,
    },
    #[error("model file {path} has a chat template that does not compile: {reason}")]
    BadChatTemplate { path: PathBuf, reason: String },
    #[error(
        "model file {path} describes a model for task `{found}`, but task `{expected}` is \
         needed here; use a model directory made for `{expected}`"
    )]
    WrongTask {
        path: PathBuf,
        expected: ModelTask,
        found: ModelTask,
    },
    #[error(
        "model file {path} has {tokenizer_vocab} tokens but moat-model.json says vocab_size = \
         {declared}; the model directory mixes files from different models"
    )]
    TokenizerVocabMismatch {
        path: PathBuf,
        tokenizer_vocab: usize,
        declared: usize,
    },
}

impl ModelDirectory {
    /// Checks that the directory holds the three files and parses the metadata.
    pub fn open(root: &Path) -> Result<Self, ModelDirError> {
        for file in [GRAPH_FILE, TOKENIZER_FILE, METADATA_FILE] {
            let path = root.join(file);
            if !path.is_file() {
                return Err(ModelDirError::Missing { path });
            }
        }
        let path = root.join(METADATA_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ModelDirError::Unreadable {
            path: path.clone(),
            source,
        })?;
        let metadata = ModelMetadata::from_json(&text)
            .map_err(|source| ModelDirError::BadMetadata { path, source })?;
        Ok(Self {
            root: root.to_path_buf(),
            metadata,
        })
    }

    /// Refuses a model made for another task (an embedding model where text generation is
    /// asked for, or the reverse).
    pub fn require_task(&self, expected: ModelTask) -> Result<(), ModelDirError> {
        let found = self.metadata.task;
        if found == expected {
            return Ok(());
        }
        Err(ModelDirError::WrongTask {
            path: self.metadata_path(),
            expected,
            found,
        })
    }

    /// What the vectors of an embedding model are; refuses any other model.
    pub fn embedding_spec(&self) -> Result<EmbeddingSpec, ModelDirError> {
        self.require_task(ModelTask::Embedding)?;
        // Validation sets `embedding` exactly for embedding models.
        self.metadata.embedding.ok_or(ModelDirError::WrongTask {
            path: self.metadata_path(),
            expected: ModelTask::Embedding,
            found: self.metadata.task,
        })
    }

    pub fn graph_path(&self) -> PathBuf {
        self.root.join(GRAPH_FILE)
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.root.join(TOKENIZER_FILE)
    }

    pub fn metadata_path(&self) -> PathBuf {
        self.root.join(METADATA_FILE)
    }
}
