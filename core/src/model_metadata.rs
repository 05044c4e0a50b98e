//! `moat-model.json`: what a model directory says about its graph and tokenizer.
//!
//! The converters in `tools/model/` write it; the daemon reads it to learn what the model is
//! for (text generation or embedding), how to drive the graph (I/O contract, KV-cache shape,
//! context length) and how to talk to the model (chat template, end-of-sequence ids; pooling
//! and normalisation of embeddings). See `docs/model-directory.md`.

use std::fmt;

use serde::Deserialize;

/// The only metadata format this build understands.
pub const METADATA_FORMAT: u32 = 1;

/// What a model is for. Files without a `task` are text-generation models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelTask {
    /// A decoder that continues text, token by token, with a KV cache.
    #[default]
    TextGeneration,
    /// An encoder that turns a text into one fixed-size vector.
    Embedding,
}

impl ModelTask {
    /// The name `moat-model.json` and the policies (`resource.task`) use.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelTask::TextGeneration => "text-generation",
            ModelTask::Embedding => "embedding",
        }
    }
}

impl fmt::Display for ModelTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The I/O contract of a graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoContract {
    /// What `optimum-cli export onnx` produces: `input_ids`, `attention_mask`,
    /// `position_ids`, `past_key_values.{i}.key|value` in; `logits`, `present.{i}.key|value`
    /// out. The present cache is the past one plus the new positions.
    Optimum,
    /// The fused graph (GroupQueryAttention): no `position_ids`; positions come from
    /// `attention_mask`, and past and present may share one preallocated buffer.
    Fused,
    /// A BERT-style encoder, as optimum exports one for feature extraction: `input_ids`,
    /// `attention_mask` and optionally `token_type_ids` in, `last_hidden_state`
    /// `[batch, sequence, embedding_dim]` out. No cache; one run sees whole inputs.
    Encoder,
}

impl IoContract {
    /// The task graphs of this contract serve.
    pub fn task(self) -> ModelTask {
        match self {
            IoContract::Optimum | IoContract::Fused => ModelTask::TextGeneration,
            IoContract::Encoder => ModelTask::Embedding,
        }
    }
}

impl fmt::Display for IoContract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoContract::Optimum => "optimum",
            IoContract::Fused => "fused",
            IoContract::Encoder => "encoder",
        })
    }
}

/// How an embedding model turns per-token hidden states into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The average of the hidden states of the input's tokens (special tokens included,
    /// padding excluded), as sentence-transformers' mean pooling computes it.
    Mean,
}

/// What an embedding model's vectors are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingSpec {
    /// Width of one vector, which is the graph's hidden size.
    pub dim: usize,
    pub pooling: Pooling,
    /// Whether vectors are scaled to unit length (L2) after pooling.
    pub normalize: bool,
}

/// The element type of a decoder's KV cache (and of its activations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    Float32,
    /// The fused graph in float16, for GPUs; its logits are still float32.
    Float16,
}

impl KvDtype {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "float32" => Some(Self::Float32),
            "float16" => Some(Self::Float16),
            _ => None,
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Float32 => "float32",
            Self::Float16 => "float16",
        })
    }
}

/// The parsed and validated contents of `moat-model.json`.
///
/// The decoder fields (`num_kv_heads` through `kv_dtype`) describe text-generation models;
/// an embedding model's file must leave them out, and here they hold their empty values
/// (0, no ids, `None`, `false`, `"float32"`). `embedding` is set exactly for embedding models.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelMetadata {
    pub format: u32,
    pub name: String,
    pub variant: Option<String>,
    pub architecture: String,
    pub task: ModelTask,
    pub io_contract: IoContract,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Most positions one sequence may hold: prompt plus generated tokens for a decoder,
    /// the longest input (special tokens included) for an encoder.
    pub context_length: usize,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
    pub default_system_prompt: Option<String>,
    pub kv_dtype: KvDtype,
    pub embedding: Option<EmbeddingSpec>,
}

/// `moat-model.json` as written; every task-specific field is optional here so that
/// validation can say which one is missing or misplaced.
#[derive(Debug, Deserialize)]
struct MetadataFile {
    format: u32,
    name: String,
    #[serde(default)]
    variant: Option<String>,
    architecture: String,
    #[serde(default)]
    task: ModelTask,
    io_contract: IoContract,
    num_layers: usize,
    vocab_size: usize,
    context_length: usize,
    // Text generation.
    num_kv_heads: Option<usize>,
    head_dim: Option<usize>,
    eos_token_ids: Option<Vec<u32>>,
    bos_token_id: Option<u32>,
    add_bos_token: Option<bool>,
    chat_template: Option<String>,
    default_system_prompt: Option<String>,
    kv_dtype: Option<String>,
    // Embedding.
    embedding_dim: Option<usize>,
    pooling: Option<Pooling>,
    normalize: Option<bool>,
}

/// Why a `moat-model.json` was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetadataError {
    #[error("not valid model metadata: {0}")]
    Syntax(String),
    #[error("metadata format {found} is not supported (this build reads format {METADATA_FORMAT})")]
    UnsupportedFormat { found: u32 },
    #[error(
        "io_contract `{io_contract}` is a {contract_task} contract, but task is `{task}`; \
         fix one of the two"
    )]
    ContractTaskMismatch {
        task: ModelTask,
        io_contract: IoContract,
        contract_task: ModelTask,
    },
    #[error("field `{field}` is required for {task} models")]
    MissingField {
        field: &'static str,
        task: ModelTask,
    },
    #[error("field `{field}` does not apply to {task} models; remove it")]
    FieldNotForTask {
        field: &'static str,
        task: ModelTask,
    },
    #[error("field `{field}` must be greater than zero")]
    Zero { field: &'static str },
    #[error("end-of-sequence id {id} is outside the vocabulary of {vocab_size} tokens")]
    EosOutOfVocab { id: u32, vocab_size: usize },
    #[error("BOS id {id} is outside the vocabulary of {vocab_size} tokens")]
    BosOutOfVocab { id: u32, vocab_size: usize },
    #[error("field `{field}` is {value}, above the most this build accepts ({max})")]
    TooLarge {
        field: &'static str,
        value: usize,
        max: usize,
    },
    #[error("KV-cache dtype `{0}` is not supported (float32, or float16 with the fused contract)")]
    UnsupportedKvDtype(String),
}

/// Upper bounds on the shape fields, far above any model moat serves, so that a corrupt or
/// hostile file fails validation instead of sizing allocations.
const LIMITS: [(&str, usize); 6] = [
    ("num_layers", 1024),
    ("num_kv_heads", 1024),
    ("head_dim", 4096),
    ("vocab_size", 1 << 22),
    ("context_length", 1 << 21),
    ("embedding_dim", 1 << 16),
];

/// Checks that a shape field is positive and within [`LIMITS`].
fn check_size(field: &'static str, value: usize) -> Result<(), MetadataError> {
    if value == 0 {
        return Err(MetadataError::Zero { field });
    }
    if let Some(&(_, max)) = LIMITS.iter().find(|(name, _)| *name == field)
        && value > max
    {
        return Err(MetadataError::TooLarge { field, value, max });
    }
    Ok(())
}

fn required<T>(value: Option<T>, field: &'static str, task: ModelTask) -> Result<T, MetadataError> {
    value.ok_or(MetadataError::MissingField { field, task })
}

impl MetadataFile {
    /// The names of the fields specific to `task` that the file sets.
    fn fields_set_for(&self, task: ModelTask) -> Vec<&'static str> {
        let fields: Vec<(&'static str, bool)> = match task {
            ModelTask::TextGeneration => vec![
                ("num_kv_heads", self.num_kv_heads.is_some()),
                ("head_dim", self.head_dim.is_some()),
                ("eos_token_ids", self.eos_token_ids.is_some()),
                ("bos_token_id", self.bos_token_id.is_some()),
                ("add_bos_token", self.add_bos_token.is_some()),
                ("chat_template", self.chat_template.is_some()),
                (
                    "default_system_prompt",
                    self.default_system_prompt.is_some(),
                ),
                ("kv_dtype", self.kv_dtype.is_some()),
            ],
            ModelTask::Embedding => vec![
                ("embedding_dim", self.embedding_dim.is_some()),
                ("pooling", self.pooling.is_some()),
                ("normalize", self.normalize.is_some()),
            ],
        };
        fields
            .into_iter()
            .filter_map(|(name, present)| present.then_some(name))
            .collect()
    }

    fn into_metadata(self) -> Result<ModelMetadata, MetadataError> {
        if self.format != METADATA_FORMAT {
            return Err(MetadataError::UnsupportedFormat { found: self.format });
        }
        let task = self.task;
        let contract_task = self.io_contract.task();
        if contract_task != task {
            return Err(MetadataError::ContractTaskMismatch {
                task,
                io_contract: self.io_contract,
                contract_task,
            });
        }
        let other = match task {
            ModelTask::TextGeneration => ModelTask::Embedding,
            ModelTask::Embedding => ModelTask::TextGeneration,
        };
        if let Some(&field) = self.fields_set_for(other).first() {
            return Err(MetadataError::FieldNotForTask { field, task });
        }
        for (field, value) in [
            ("num_layers", self.num_layers),
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
        ] {
            check_size(field, value)?;
        }
        let mut metadata = ModelMetadata {
            format: self.format,
            name: self.name,
            variant: self.variant,
            architecture: self.architecture,
            task,
            io_contract: self.io_contract,
            num_layers: self.num_layers,
            num_kv_heads: 0,
            head_dim: 0,
            vocab_size: self.vocab_size,
            context_length: self.context_length,
            eos_token_ids: Vec::new(),
            bos_token_id: None,
            add_bos_token: false,
            chat_template: None,
            default_system_prompt: None,
            kv_dtype: KvDtype::Float32,
            embedding: None,
        };
        match task {
            ModelTask::TextGeneration => {
                metadata.num_kv_heads = required(self.num_kv_heads, "num_kv_heads", task)?;
                metadata.head_dim = required(self.head_dim, "head_dim", task)?;
                metadata.eos_token_ids = required(self.eos_token_ids, "eos_token_ids", task)?;
                metadata.bos_token_id = self.bos_token_id;
                metadata.add_bos_token = self.add_bos_token.unwrap_or(false);
                metadata.chat_template = self.chat_template;
                metadata.default_system_prompt = self.default_system_prompt;
                if let Some(text) = self.kv_dtype {
                    metadata.kv_dtype = KvDtype::parse(&text)
                        .filter(|&d| {
                            d == KvDtype::Float32 || metadata.io_contract == IoContract::Fused
                        })
                        .ok_or(MetadataError::UnsupportedKvDtype(text))?;
                }
                metadata.validate_decoder()?;
            }
            ModelTask::Embedding => {
                let dim = required(self.embedding_dim, "embedding_dim", task)?;
                check_size("embedding_dim", dim)?;
                metadata.embedding = Some(EmbeddingSpec {
                    dim,
                    pooling: required(self.pooling, "pooling", task)?,
                    normalize: self.normalize.unwrap_or(true),
                });
            }
        }
        Ok(metadata)
    }
}

impl ModelMetadata {
    /// Parses and validates the JSON text of a `moat-model.json`.
    pub fn from_json(text: &str) -> Result<Self, MetadataError> {
        let file: MetadataFile =
            serde_json::from_str(text).map_err(|e| MetadataError::Syntax(e.to_string()))?;
        file.into_metadata()
    }

    /// Parses and validates the `[model]` table of a bundle manifest: the fields of
    /// `moat-model.json`, written as TOML.
    pub fn from_toml(table: toml::Table) -> Result<Self, MetadataError> {
        let file = MetadataFile::deserialize(toml::Value::Table(table))
            .map_err(|e| MetadataError::Syntax(e.to_string()))?;
        file.into_metadata()
    }

    fn validate_decoder(&self) -> Result<(), MetadataError> {
        for (field, value) in [
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            check_size(field, value)?;
        }
        if let Some(id) = self.bos_token_id
            && id as usize >= self.vocab_size
        {
            return Err(MetadataError::BosOutOfVocab {
                id,
                vocab_size: self.vocab_size,
            });
        }
        if let Some(&id) = self
            .eos_token_ids
            .iter()
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return Err(MetadataError::EosOutOfVocab {
                id,
                vocab_size: self.vocab_size,
            });
        }
        Ok(())
    }

    /// The names of the past-KV inputs, layer by layer: `(key, value)`.
    pub fn past_names(&self) -> impl Iterator<Item = (String, String)> {
        (0..self.num_layers).map(|i| {
            (
                format!("past_key_values.{i}.key"),
                format!("past_key_values.{i}.value"),
            )
        })
    }

    /// The names of the present-KV outputs, layer by layer: `(key, value)`.
    pub fn present_names(&self) -> impl Iterator<Item = (String, String)> {
        (0..self.num_layers).map(|i| (format!("present.{i}.key"), format!("present.{i}.value")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "format": 1, "name": "m", "architecture": "llama", "io_contract": "fused",
            "num_layers": 2, "num_kv_heads": 2, "head_dim": 16, "vocab_size": 300,
            "context_length": 256, "eos_token_ids": [2], "unknown_field": true
        })
    }

    #[test]
    fn float16_caches_are_for_the_fused_contract_only() {
        let mut v = sample();
        v["kv_dtype"] = "float16".into();
        let m = ModelMetadata::from_json(&v.to_string()).expect("valid");
        assert_eq!(m.kv_dtype, KvDtype::Float16);
        v["io_contract"] = "optimum".into();
        assert!(matches!(
            ModelMetadata::from_json(&v.to_string()),
            Err(MetadataError::UnsupportedKvDtype(d)) if d == "float16"
        ));
        let mut v = sample();
        v["kv_dtype"] = "bfloat16".into();
        assert!(matches!(
            ModelMetadata::from_json(&v.to_string()),
            Err(MetadataError::UnsupportedKvDtype(d)) if d == "bfloat16"
        ));
    }

    #[test]
    fn parses_and_ignores_unknown_fields() {
        let m = ModelMetadata::from_json(&sample().to_string()).expect("valid");
        assert_eq!(m.io_contract, IoContract::Fused);
        assert_eq!(m.kv_dtype, KvDtype::Float32);
        assert_eq!(
            m.past_names().nth(1),
            Some((
                "past_key_values.1.key".to_owned(),
                "past_key_values.1.value".to_owned()
            ))
        );
    }

    #[test]
    fn refuses_bad_values() {
        let mut v = sample();
        v["format"] = 2.into();
        assert_eq!(
            ModelMetadata::from_json(&v.to_string()),
            Err(MetadataError::UnsupportedFormat { found: 2 })
        );
        let mut v = sample();
        v["eos_token_ids"] = serde_json::json!([300]);
        assert!(matches!(
            ModelMetadata::from_json(&v.to_string()),
            Err(MetadataError::EosOutOfVocab { id: 300, .. })
        ));
        let mut v = sample();
        v["bos_token_id"] = 300.into();
        assert!(matches!(
            ModelMetadata::from_json(&v.to_string()),
            Err(MetadataError::BosOutOfVocab { id: 300, .. })
        ));
        let mut v = sample();
        v["num_layers"] = 1_000_000_000u64.into();
        assert!(matches!(
            ModelMetadata::from_json(&v.to_string()),
            Err(MetadataError::TooLarge {
                field: "num_layers",
                ..
            })
        ));
        let mut v = sample();
        v["head_dim"] = 0.into();
        assert_eq!(
            ModelMetadata::from_json(&v.to_string()),
            Err(MetadataError::Zero { field: "head_dim" })
        );
        assert!(matches!(
            ModelMetadata::from_json("{"),
            Err(MetadataError::Syntax(_))
        ));
    }

    fn embedding_sample() -> serde_json::Value {
        serde_json::json!({
            "format": 1, "name": "e", "architecture": "bert", "task": "embedding",
            "io_contract": "encoder", "num_layers": 2, "vocab_size": 300, "context_length": 64,
            "embedding_dim": 32, "pooling": "mean", "hidden_size": 32
        })
    }

    fn parse(v: &serde_json::Value) -> Result<ModelMetadata, MetadataError> {
        ModelMetadata::from_json(&v.to_string())
    }

    #[test]
    fn files_without_a_task_are_text_generation() {
        let m = parse(&sample()).expect("valid");
        assert_eq!(m.task, ModelTask::TextGeneration);
        assert_eq!(m.embedding, None);
        assert_eq!(m.eos_token_ids, vec![2]);
        let mut v = sample();
        v["task"] = "text-generation".into();
        assert_eq!(parse(&v), Ok(m));
    }

    #[test]
    fn parses_an_embedding_model() {
        let m = parse(&embedding_sample()).expect("valid");
        assert_eq!(m.task, ModelTask::Embedding);
        assert_eq!(m.io_contract, IoContract::Encoder);
        assert_eq!(
            m.embedding,
            Some(EmbeddingSpec {
                dim: 32,
                pooling: Pooling::Mean,
                normalize: true,
            })
        );
        assert_eq!((m.num_kv_heads, m.head_dim), (0, 0));
        assert!(m.eos_token_ids.is_empty());
        let mut v = embedding_sample();
        v["normalize"] = false.into();
        assert_eq!(
            parse(&v).expect("valid").embedding.map(|e| e.normalize),
            Some(false)
        );
    }

    #[test]
    fn task_and_contract_must_agree() {
        let mut v = embedding_sample();
        v["io_contract"] = "fused".into();
        assert_eq!(
            parse(&v),
            Err(MetadataError::ContractTaskMismatch {
                task: ModelTask::Embedding,
                io_contract: IoContract::Fused,
                contract_task: ModelTask::TextGeneration,
            })
        );
        let mut v = sample();
        v["io_contract"] = "encoder".into();
        assert_eq!(
            parse(&v),
            Err(MetadataError::ContractTaskMismatch {
                task: ModelTask::TextGeneration,
                io_contract: IoContract::Encoder,
                contract_task: ModelTask::Embedding,
            })
        );
        let mut v = sample();
        v["task"] = "summarisation".into();
        assert!(matches!(parse(&v), Err(MetadataError::Syntax(_))));
    }

    #[test]
    fn each_task_requires_its_own_fields() {
        for field in ["num_kv_heads", "head_dim", "eos_token_ids"] {
            let mut v = sample();
            v.as_object_mut().expect("object").remove(field);
            assert_eq!(
                parse(&v),
                Err(MetadataError::MissingField {
                    field,
                    task: ModelTask::TextGeneration
                })
            );
        }
        for field in ["embedding_dim", "pooling"] {
            let mut v = embedding_sample();
            v.as_object_mut().expect("object").remove(field);
            assert_eq!(
                parse(&v),
                Err(MetadataError::MissingField {
                    field,
                    task: ModelTask::Embedding
                })
            );
        }
        let mut v = embedding_sample();
        v["pooling"] = "cls".into();
        assert!(matches!(parse(&v), Err(MetadataError::Syntax(_))));
        let mut v = embedding_sample();
        v["embedding_dim"] = 0.into();
        assert_eq!(
            parse(&v),
            Err(MetadataError::Zero {
                field: "embedding_dim"
            })
        );
    }

    #[test]
    fn fields_of_the_other_task_are_refused() {
        for (field, value) in [
            ("eos_token_ids", serde_json::json!([2])),
            ("num_kv_heads", 2.into()),
            ("chat_template", "{{ x }}".into()),
            ("kv_dtype", "float32".into()),
        ] {
            let mut v = embedding_sample();
            v[field] = value;
            assert_eq!(
                parse(&v),
                Err(MetadataError::FieldNotForTask {
                    field,
                    task: ModelTask::Embedding
                })
            );
        }
        for (field, value) in [
            ("embedding_dim", 32.into()),
            ("pooling", "mean".into()),
            ("normalize", true.into()),
        ] {
            let mut v = sample();
            v[field] = value;
            assert_eq!(
                parse(&v),
                Err(MetadataError::FieldNotForTask {
                    field,
                    task: ModelTask::TextGeneration
                })
            );
        }
        // `null` is what the converter writes for an absent BOS; it is not a decoder field
        // being set.
        let mut v = embedding_sample();
        v["bos_token_id"] = serde_json::Value::Null;
        assert!(parse(&v).is_ok());
    }

    #[test]
    fn error_messages_name_the_task_and_field() {
        let mut v = embedding_sample();
        v["eos_token_ids"] = serde_json::json!([2]);
        let message = parse(&v).expect_err("refused").to_string();
        assert_eq!(
            message,
            "field `eos_token_ids` does not apply to embedding models; remove it"
        );
        let mut v = embedding_sample();
        v["io_contract"] = "optimum".into();
        assert_eq!(
            parse(&v).expect_err("refused").to_string(),
            "io_contract `optimum` is a text-generation contract, but task is `embedding`; fix \
             one of the two"
        );
    }

    proptest::proptest! {
        /// Whatever a model file holds, parsing returns a value or an error, never a panic.
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = ModelMetadata::from_json(&text);
        }

        #[test]
        fn arbitrary_values_never_panic(
            layers in proptest::num::u64::ANY,
            vocab in proptest::num::u64::ANY,
            eos in proptest::num::u32::ANY,
        ) {
            let mut v = sample();
            v["num_layers"] = layers.into();
            v["vocab_size"] = vocab.into();
            v["eos_token_ids"] = serde_json::json!([eos]);
            let _ = ModelMetadata::from_json(&v.to_string());
        }

        #[test]
        fn arbitrary_embedding_values_never_panic(
            dim in proptest::num::u64::ANY,
            context in proptest::num::u64::ANY,
            normalize in proptest::bool::ANY,
        ) {
            let mut v = embedding_sample();
            v["embedding_dim"] = dim.into();
            v["context_length"] = context.into();
            v["normalize"] = normalize.into();
            let _ = ModelMetadata::from_json(&v.to_string());
        }
    }
}
