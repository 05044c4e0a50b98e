//! A model directory on disk: `model.onnx`, `tokenizer.json` and `moat-model.json`.

use std::path::{Path, PathBuf};

use moat_core::{MetadataError, ModelMetadata};

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
