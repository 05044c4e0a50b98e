//! A model directory on disk: `model.onnx`, `tokenizer.json` and `moat-model.json`.

use std::path::{Path, PathBuf};

use moat_core::bundle::graph::{
    self, ExternalData, ExternalDataProblem, GraphError, GraphInventory,
};
use moat_core::{EmbeddingSpec, MetadataError, ModelMetadata, ModelTask};

pub const GRAPH_FILE: &str = graph::GRAPH_FILE;
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
    #[error("model file {path} is refused before ONNX Runtime reads it: {source}")]
    GraphRefused {
        path: PathBuf,
        /// Boxed: the graph's names make it the largest reason, and it is rare.
        #[source]
        source: Box<GraphError>,
    },
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

    /// Reads the graph and holds it to moat's rules before ONNX Runtime sees it: operators
    /// moat serves only, and external data only from regular files inside this directory,
    /// reached without a symbolic link, read within their size.
    pub fn vet_graph(&self) -> Result<GraphInventory, ModelDirError> {
        let path = self.graph_path();
        let bytes = std::fs::read(&path).map_err(|source| ModelDirError::Unreadable {
            path: path.clone(),
            source,
        })?;
        let refused = |source| ModelDirError::GraphRefused {
            path: path.clone(),
            source: Box::new(source),
        };
        let inventory = graph::inspect(&bytes).map_err(refused)?;
        for data in &inventory.external {
            let size = self
                .external_file_size(data)?
                .map_err(|p| refused(data.refused(p)))?;
            data.check_range(size).map_err(refused)?;
        }
        Ok(inventory)
    }

    /// The size of the file `data` names, walking from the root one component at a time
    /// so that no symbolic link is followed: a link could point anywhere. (The directory is
    /// the admin's, or the bundle store's, which only moatd writes; a swap after this check
    /// would need write access there.)
    fn external_file_size(
        &self,
        data: &ExternalData,
    ) -> Result<Result<u64, ExternalDataProblem>, ModelDirError> {
        let mut path = self.root.clone();
        let mut parts = data.location.split('/').peekable();
        while let Some(part) = parts.next() {
            path.push(part);
            let metadata = match std::fs::symlink_metadata(&path) {
                Ok(metadata) => metadata,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(Err(ExternalDataProblem::Missing));
                }
                Err(source) => return Err(ModelDirError::Unreadable { path, source }),
            };
            let last = parts.peek().is_none();
            if metadata.file_type().is_symlink() {
                return Ok(Err(ExternalDataProblem::Symlink));
            }
            if last && metadata.is_file() {
                return Ok(Ok(metadata.len()));
            }
            if last || !metadata.is_dir() {
                return Ok(Err(ExternalDataProblem::NotAFile));
            }
        }
        // `inspect` accepts no empty location.
        Ok(Err(ExternalDataProblem::NotPlain))
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
