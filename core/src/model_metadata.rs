//! `moat-model.json`: what a model directory says about its graph and tokenizer.
//!
//! The converter in `tools/model/` writes it; the engine reads it to learn how to drive the
//! graph (I/O contract, KV-cache shape, context length) and how to talk to the model (chat
//! template, end-of-sequence ids). See `docs/model-directory.md`.

use serde::Deserialize;

/// The only metadata format this build understands.
pub const METADATA_FORMAT: u32 = 1;

/// The I/O contract of a decoder graph.
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
}

/// The parsed and validated contents of `moat-model.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ModelMetadata {
    pub format: u32,
    pub name: String,
    #[serde(default)]
    pub variant: Option<String>,
    pub architecture: String,
    pub io_contract: IoContract,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub eos_token_ids: Vec<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub add_bos_token: bool,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub default_system_prompt: Option<String>,
    #[serde(default = "default_kv_dtype")]
    pub kv_dtype: String,
}

/// Why a `moat-model.json` was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetadataError {
    #[error("not valid JSON for moat-model.json: {0}")]
    Syntax(String),
    #[error("metadata format {found} is not supported (this build reads format {METADATA_FORMAT})")]
    UnsupportedFormat { found: u32 },
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
    #[error("KV-cache dtype `{0}` is not supported (only float32)")]
    UnsupportedKvDtype(String),
}

/// Upper bounds on the shape fields, far above any model moat serves, so that a corrupt or
/// hostile file fails validation instead of sizing allocations.
const LIMITS: [(&str, usize); 5] = [
    ("num_layers", 1024),
    ("num_kv_heads", 1024),
    ("head_dim", 4096),
    ("vocab_size", 1 << 22),
    ("context_length", 1 << 21),
];

fn default_kv_dtype() -> String {
    "float32".to_owned()
}

impl ModelMetadata {
    /// Parses and validates the JSON text of a `moat-model.json`.
    pub fn from_json(text: &str) -> Result<Self, MetadataError> {
        let metadata: Self =
            serde_json::from_str(text).map_err(|e| MetadataError::Syntax(e.to_string()))?;
        metadata.validate()?;
        Ok(metadata)
    }

    fn validate(&self) -> Result<(), MetadataError> {
        if self.format != METADATA_FORMAT {
            return Err(MetadataError::UnsupportedFormat { found: self.format });
        }
        for (field, value) in [
            ("num_layers", self.num_layers),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("context_length", self.context_length),
        ] {
            if value == 0 {
                return Err(MetadataError::Zero { field });
            }
            if let Some(&(_, max)) = LIMITS.iter().find(|(name, _)| *name == field)
                && value > max
            {
                return Err(MetadataError::TooLarge { field, value, max });
            }
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
        if self.kv_dtype != "float32" {
            return Err(MetadataError::UnsupportedKvDtype(self.kv_dtype.clone()));
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
    fn parses_and_ignores_unknown_fields() {
        let m = ModelMetadata::from_json(&sample().to_string()).expect("valid");
        assert_eq!(m.io_contract, IoContract::Fused);
        assert_eq!(m.kv_dtype, "float32");
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
    }
}
