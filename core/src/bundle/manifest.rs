//! `manifest.toml`: what a bundle is, which files it holds (with their sizes and SHA-256),
//! how to drive its graph (the `[model]` table, the fields of `moat-model.json`), and how
//! the appliance must check it before serving it (golden prompts).

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;

use crate::audit::encoding::unhex;
use crate::model_metadata::{IoContract, MetadataError, ModelMetadata, ModelTask};

/// The only manifest format this build understands.
pub const MANIFEST_FORMAT: u32 = 1;
/// Files every bundle must hold.
pub const REQUIRED_FILES: [&str; 2] = ["model.onnx", "tokenizer.json"];
/// The longest answer a golden prompt may ask for: activation waits for all of them.
pub const MAX_GOLDEN_TOKENS: usize = 512;
/// The most golden prompts one bundle may carry.
pub const MAX_GOLDEN_PROMPTS: usize = 64;
/// The largest single file a bundle may hold (1 TiB): a corrupt size fails here, not on disk.
pub const MAX_FILE_BYTES: u64 = 1 << 40;

/// What a bundle is for. Chat and completion bundles hold text-generation models (each
/// answers both endpoints; the task says how its golden prompts are put); embedding
/// bundles hold encoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleTask {
    Chat,
    Completion,
    Embedding,
}

impl BundleTask {
    pub fn as_str(self) -> &'static str {
        match self {
            BundleTask::Chat => "chat",
            BundleTask::Completion => "completion",
            BundleTask::Embedding => "embedding",
        }
    }

    /// The model task the bundle's graph must have.
    pub fn model_task(self) -> ModelTask {
        match self {
            BundleTask::Chat | BundleTask::Completion => ModelTask::TextGeneration,
            BundleTask::Embedding => ModelTask::Embedding,
        }
    }
}

impl fmt::Display for BundleTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Sampling a request gets for the parameters it leaves out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub max_tokens: Option<usize>,
}

/// One file of the bundle as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// What a golden prompt's answer must be.
#[derive(Debug, Clone)]
pub enum GoldenExpectation {
    /// Exactly this text (greedy decoding, after the chat template for chat bundles).
    Exact(String),
    /// A regular expression the answer must contain a match of.
    Pattern(regex::Regex),
    /// Embedding bundles: a finite vector of the model's width.
    Embeds,
}

/// A prompt the bundle must answer as stated before it may serve.
#[derive(Debug, Clone)]
pub struct GoldenPrompt {
    /// The user message (chat), the text to continue (completion) or the input (embedding).
    pub prompt: String,
    pub expect: GoldenExpectation,
    pub max_tokens: usize,
}

/// A validated manifest.
#[derive(Debug, Clone)]
pub struct BundleManifest {
    pub name: String,
    pub version: semver::Version,
    pub task: BundleTask,
    pub description: Option<String>,
    /// Highest classification label the bundle may be sent (on top of the policy's ceiling).
    pub classification_ceiling: Option<String>,
    pub sampling: SamplingDefaults,
    /// A JSON schema every answer must follow, whatever the request asks.
    pub response_schema: Option<serde_json::Value>,
    pub model: ModelMetadata,
    pub files: Vec<FileEntry>,
    pub golden: Vec<GoldenPrompt>,
}

impl BundleManifest {
    /// `name@version`, as audit records and `moatctl` name a bundle.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Bytes of all the bundle's files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Why a manifest was refused. Every variant names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest.toml is not valid UTF-8 TOML: {0}")]
    Syntax(String),
    #[error("manifest format {0} is not supported (this build reads format {MANIFEST_FORMAT})")]
    UnsupportedFormat(u32),
    #[error(
        "name {0:?} must be 1-64 characters of letters, digits, '.', '_', '-', not starting with '.'"
    )]
    BadName(String),
    #[error("version {text:?} is not a semantic version (MAJOR.MINOR.PATCH): {reason}")]
    BadVersion { text: String, reason: String },
    #[error("[model]: {0}")]
    Model(#[from] MetadataError),
    #[error("task is {task}, but [model] describes a {model} model")]
    TaskMismatch { task: BundleTask, model: ModelTask },
    #[error("task is chat, but [model] has no chat_template")]
    NoChatTemplate,
    #[error("[model] declares {field} {declared:?}, but its {contract} contract has {implied:?}")]
    IoNames {
        field: &'static str,
        contract: IoContract,
        declared: Vec<String>,
        implied: Vec<String>,
    },
    #[error(
        "files: {path:?} is not a plain file name (letters, digits, '.', '_', '-'; no directories, not starting with '.')"
    )]
    BadPath { path: String },
    #[error("files: {0:?} is listed twice")]
    DuplicateFile(String),
    #[error("files: {0} is required in every bundle")]
    MissingRequiredFile(&'static str),
    #[error("files: {path}: sha256 must be 64 hex digits")]
    BadDigest { path: String },
    #[error("files: {path}: size {size} is above the most a bundle file may be ({MAX_FILE_BYTES})")]
    FileTooLarge { path: String, size: u64 },
    #[error("sampling.{field} = {value} is out of range ({range})")]
    Sampling {
        field: &'static str,
        value: f64,
        range: &'static str,
    },
    #[error("response_schema applies to text generation only")]
    SchemaNotForTask,
    #[error("golden prompts: a {task} bundle needs at least one")]
    NoGoldenPrompts { task: BundleTask },
    #[error("golden prompts: {0} are more than {MAX_GOLDEN_PROMPTS}")]
    TooManyGoldenPrompts(usize),
    #[error("golden prompt {index}: {reason}")]
    Golden { index: usize, reason: String },
}

/// `manifest.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    format: u32,
    name: String,
    version: String,
    task: BundleTask,
    description: Option<String>,
    classification_ceiling: Option<String>,
    #[serde(default)]
    sampling: SamplingDefaults,
    response_schema: Option<toml::Table>,
    model: toml::Table,
    files: Vec<FileLine>,
    #[serde(default)]
    golden: Vec<GoldenLine>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLine {
    path: String,
    size: u64,
    sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GoldenLine {
    prompt: String,
    expect: Option<String>,
    pattern: Option<String>,
    #[serde(default = "default_golden_tokens")]
    max_tokens: usize,
}

fn default_golden_tokens() -> usize {
    32
}

/// A name a bundle file may have inside the bundle: one plain path component.
pub fn valid_file_name(name: &str) -> bool {
    plain_name(name, 128) && name != super::MANIFEST_FILE && name != super::SIGNATURE_FILE
}

/// A name a served model may have: it appears in URLs, metrics labels, logs and as a
/// directory of the bundle store (so never `.`, `..` or hidden).
pub fn valid_model_name(name: &str) -> bool {
    plain_name(name, 64)
}

/// 1 to `max` letters, digits, `.`, `_` and `-`, not starting with `.`: safe as one path
/// component, a URL segment and a label.
fn plain_name(name: &str, max: usize) -> bool {
    (1..=max).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl BundleManifest {
    /// Parses and validates the bytes of a `manifest.toml`.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let text = std::str::from_utf8(bytes).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        let file: ManifestFile =
            toml::from_str(text).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        file.validate()
    }
}

impl ManifestFile {
    fn validate(self) -> Result<BundleManifest, ManifestError> {
        if self.format != MANIFEST_FORMAT {
            return Err(ManifestError::UnsupportedFormat(self.format));
        }
        if !valid_model_name(&self.name) {
            return Err(ManifestError::BadName(self.name));
        }
        let version =
            semver::Version::parse(&self.version).map_err(|e| ManifestError::BadVersion {
                text: self.version.clone(),
                reason: e.to_string(),
            })?;
        let declared_io = io_names(&self.model);
        let model = ModelMetadata::from_toml(self.model)?;
        if model.task != self.task.model_task() {
            return Err(ManifestError::TaskMismatch {
                task: self.task,
                model: model.task,
            });
        }
        if self.task == BundleTask::Chat && model.chat_template.is_none() {
            return Err(ManifestError::NoChatTemplate);
        }
        check_io_names(&model, declared_io)?;
        let files = check_files(self.files)?;
        check_sampling(&self.sampling)?;
        let response_schema = match self.response_schema {
            Some(_) if self.task == BundleTask::Embedding => {
                return Err(ManifestError::SchemaNotForTask);
            }
            Some(table) => Some(
                serde_json::to_value(table).map_err(|e| ManifestError::Syntax(e.to_string()))?,
            ),
            None => None,
        };
        let golden = check_golden(self.task, self.golden)?;
        Ok(BundleManifest {
            name: self.name,
            version,
            task: self.task,
            description: self.description,
            classification_ceiling: self.classification_ceiling,
            sampling: self.sampling,
            response_schema,
            model,
            files,
            golden,
        })
    }
}

/// The `inputs` and `outputs` lists of the `[model]` table, if it declares them.
fn io_names(model: &toml::Table) -> [Option<Vec<String>>; 2] {
    ["inputs", "outputs"].map(|key| {
        model.get(key).and_then(|v| v.as_array()).map(|items| {
            items
                .iter()
                .map(|i| i.as_str().unwrap_or_default().to_owned())
                .collect()
        })
    })
}

/// Declared graph I/O names must be those the contract implies (the graph itself is held to
/// the contract when it loads).
fn check_io_names(
    model: &ModelMetadata,
    [inputs, outputs]: [Option<Vec<String>>; 2],
) -> Result<(), ManifestError> {
    let (mut implied_inputs, implied_outputs) = match model.io_contract {
        IoContract::Encoder => (
            vec!["input_ids".to_owned(), "attention_mask".to_owned()],
            vec!["last_hidden_state".to_owned()],
        ),
        contract => {
            let mut inputs = vec!["input_ids".to_owned(), "attention_mask".to_owned()];
            if contract == IoContract::Optimum {
                inputs.push("position_ids".to_owned());
            }
            inputs.extend(model.past_names().flat_map(|(k, v)| [k, v]));
            let mut outputs = vec!["logits".to_owned()];
            outputs.extend(model.present_names().flat_map(|(k, v)| [k, v]));
            (inputs, outputs)
        }
    };
    // An encoder may or may not take token type ids.
    if model.io_contract == IoContract::Encoder
        && inputs
            .as_ref()
            .is_some_and(|names| names.iter().any(|n| n == "token_type_ids"))
    {
        implied_inputs.push("token_type_ids".to_owned());
    }
    for (field, declared, implied) in [
        ("inputs", inputs, implied_inputs),
        ("outputs", outputs, implied_outputs),
    ] {
        let Some(declared) = declared else { continue };
        let wanted: BTreeSet<&str> = implied.iter().map(String::as_str).collect();
        let given: BTreeSet<&str> = declared.iter().map(String::as_str).collect();
        if given != wanted || given.len() != declared.len() {
            return Err(ManifestError::IoNames {
                field,
                contract: model.io_contract,
                declared,
                implied,
            });
        }
    }
    Ok(())
}

fn check_files(lines: Vec<FileLine>) -> Result<Vec<FileEntry>, ManifestError> {
    let mut seen = BTreeSet::new();
    let mut files = Vec::with_capacity(lines.len());
    for line in lines {
        if !valid_file_name(&line.path) {
            return Err(ManifestError::BadPath { path: line.path });
        }
        if !seen.insert(line.path.clone()) {
            return Err(ManifestError::DuplicateFile(line.path));
        }
        if line.size > MAX_FILE_BYTES {
            return Err(ManifestError::FileTooLarge {
                path: line.path,
                size: line.size,
            });
        }
        let Some(sha256) = unhex::<32>(&line.sha256) else {
            return Err(ManifestError::BadDigest { path: line.path });
        };
        files.push(FileEntry {
            path: line.path,
            size: line.size,
            sha256,
        });
    }
    if let Some(missing) = REQUIRED_FILES.iter().find(|f| !seen.contains(**f)) {
        return Err(ManifestError::MissingRequiredFile(missing));
    }
    Ok(files)
}

fn check_sampling(sampling: &SamplingDefaults) -> Result<(), ManifestError> {
    if let Some(t) = sampling.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ManifestError::Sampling {
            field: "temperature",
            value: f64::from(t),
            range: "0 to 2",
        });
    }
    if let Some(p) = sampling.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ManifestError::Sampling {
            field: "top_p",
            value: f64::from(p),
            range: "above 0, at most 1",
        });
    }
    if sampling.max_tokens == Some(0) {
        return Err(ManifestError::Sampling {
            field: "max_tokens",
            value: 0.0,
            range: "at least 1",
        });
    }
    Ok(())
}

fn check_golden(
    task: BundleTask,
    lines: Vec<GoldenLine>,
) -> Result<Vec<GoldenPrompt>, ManifestError> {
    if lines.is_empty() && task != BundleTask::Embedding {
        return Err(ManifestError::NoGoldenPrompts { task });
    }
    if lines.len() > MAX_GOLDEN_PROMPTS {
        return Err(ManifestError::TooManyGoldenPrompts(lines.len()));
    }
    let mut golden = Vec::with_capacity(lines.len());
    for (index, line) in lines.into_iter().enumerate() {
        let fail = |reason: String| ManifestError::Golden { index, reason };
        if line.prompt.is_empty() {
            return Err(fail("prompt is empty".into()));
        }
        if !(1..=MAX_GOLDEN_TOKENS).contains(&line.max_tokens) {
            return Err(fail(format!(
                "max_tokens must be between 1 and {MAX_GOLDEN_TOKENS}"
            )));
        }
        let expect = match (task, line.expect, line.pattern) {
            (BundleTask::Embedding, None, None) => GoldenExpectation::Embeds,
            (BundleTask::Embedding, _, _) => {
                return Err(fail(
                    "an embedding bundle's golden prompt has no expect or pattern; it must embed"
                        .into(),
                ));
            }
            (_, Some(text), None) => GoldenExpectation::Exact(text),
            (_, None, Some(pattern)) => GoldenExpectation::Pattern(
                regex::Regex::new(&pattern).map_err(|e| fail(format!("pattern: {e}")))?,
            ),
            _ => return Err(fail("set exactly one of expect and pattern".into())),
        };
        golden.push(GoldenPrompt {
            prompt: line.prompt,
            expect,
            max_tokens: line.max_tokens,
        });
    }
    Ok(golden)
}
