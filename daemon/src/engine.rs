//! Text generation: tokenizer, chat template, sampler, stop rules and the engine thread,
//! over a [`Backend`] that runs the model.
//!
//! The engine knows nothing of HTTP or of ONNX: callers hand it a [`GenerationRequest`] and
//! read [`GenerationEvent`]s from the returned [`GenerationStream`]; dropping the stream
//! cancels the generation and frees its slot at the next step.

pub mod backend;
pub mod chat_template;
pub mod constraint;
pub mod cpu_affinity;
pub mod embedder;
pub mod fair_queue;
pub mod model_dir;
pub mod ort_backend;
pub mod prefix_cache;
pub use ort_backend::runtime_library;
pub mod sampler;
pub mod sequence;
pub mod stop;
pub mod tokenizer;
mod worker;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use moat_core::{ModelMetadata, ModelTask};
use tokio::sync::mpsc;

pub use backend::{
    Backend, BackendError, BackendModel, DeviceKind, LogitsBatch, SequenceId, StepInput,
};
pub use chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
pub use constraint::{AnswerCheck, Constraint, ConstraintError, ConstraintFailure, ResponseFormat};
pub use embedder::{EmbedError, Embedder, Embeddings, PreparedInputs};
use fair_queue::{FairQueue, QueueFull};
pub use model_dir::{ModelDirError, ModelDirectory};
pub use ort_backend::{
    DevicePreference, KvPlacement, LoadError, OrtBackend, OrtRuntime, SessionOptions,
};
pub use prefix_cache::{PrefixFigures, PrefixSharing};
pub use sampler::{SamplingError, SamplingParams};
pub use sequence::{FinishReason, Usage};
use sequence::{Sequence, SequenceSpec};
use tokenizer::TextTokenizer;

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text, tokenized as is.
    Text(String),
    /// Chat messages, rendered with the model's chat template and an assistant turn opened.
    Chat(Vec<ChatMessage>),
    /// Token ids, used as they are.
    TokenIds(Vec<u32>),
}

/// One engine thread's progress as the watchdog samples it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerProgress {
    /// Rounds of its loop so far.
    pub rounds: u64,
    /// It holds sequences, or requests wait for a thread.
    pub busy: bool,
    /// The thread is alive.
    pub running: bool,
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    /// New tokens at most; `None` means the engine's default, within the context.
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Generation stops before any of these strings; they are not part of the answer.
    pub stop: Vec<String>,
    /// Extra token ids that end generation (the model's end-of-sequence ids always do,
    /// unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past end-of-sequence tokens (benchmarks and tests).
    pub ignore_eos: bool,
    /// The shape the answer must have ([`Engine::constrain`]).
    pub constraint: Option<Constraint>,
    /// Whose request it is: the engine serves departments fairly.
    pub department: String,
}

impl GenerationRequest {
    pub fn new(prompt: Prompt) -> Self {
        Self {
            prompt,
            max_tokens: None,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            constraint: None,
            department: String::new(),
        }
    }
}

/// A request the engine has checked, rendered and tokenised ([`Engine::prepare`]), ready
/// to queue ([`Engine::submit`]).
#[derive(Debug)]
pub struct Prepared {
    spec: SequenceSpec,
    department: String,
}

impl Prepared {
    /// The prompt as the model will read it.
    pub fn token_ids(&self) -> &[u32] {
        &self.spec.prompt
    }

    pub fn prompt_tokens(&self) -> usize {
        self.spec.prompt.len()
    }

    /// New tokens at most: what was asked, or the engine's default, within the context.
    pub fn max_new_tokens(&self) -> usize {
        self.spec.max_new_tokens
    }
}

/// What a generation reports, in order: tokens, then exactly one `Finished` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// A generated token and the text it released (empty while text is held back, for
    /// example inside a multi-byte character or a possible stop string).
    Token {
        id: u32,
        text: String,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Failed(EngineError),
}

/// Engine-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSettings {
    /// `max_tokens` when a request names none (still capped by the context).
    pub default_max_tokens: usize,
    /// Requests waiting for the engine thread at most; more are refused as overloaded.
    pub queue_capacity: usize,
    /// Sequences stepped together at most.
    pub max_batch: usize,
    /// Most prompt tokens one sequence feeds per step; longer prompts take several steps,
    /// interleaved with the decode steps of the others.
    pub prefill_chunk_tokens: usize,
    /// Tokens fed in one step at most (0: no limit): bounds the step time that prompt
    /// chunks of new requests add to the running answers.
    pub max_batched_tokens: usize,
    /// Waiting places one department may hold at most; 0: half of `queue_capacity`.
    pub department_queue: usize,
    /// Turns per round of free slots, by department (default 1).
    pub department_weights: BTreeMap<String, u32>,
    /// Engine threads, each with its own session and batch, taking from one queue. One
    /// session's operators scale poorly past a few cores for a small model: a large
    /// machine serves more with several workers of `intra_op_threads` cores each.
    pub workers: usize,
    /// Whose requests share cached prompt prefixes (the cache's size is the backend's,
    /// `SessionOptions::prefix_cache_bytes`).
    pub prefix_cache: PrefixSharing,
}

impl EngineSettings {
    fn department_queue(&self) -> usize {
        match self.department_queue {
            0 => self.queue_capacity.div_ceil(2),
            n => n,
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            default_max_tokens: 512,
            queue_capacity: 64,
            max_batch: ort_backend::DEFAULT_MAX_BATCH,
            prefill_chunk_tokens: ort_backend::DEFAULT_PREFILL_CHUNK_TOKENS,
            max_batched_tokens: 0,
            department_queue: 0,
            department_weights: BTreeMap::new(),
            workers: 1,
            prefix_cache: PrefixSharing::default(),
        }
    }
}

/// Most stop strings one request may carry.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes (matching costs grow with it on the engine thread).
pub const MAX_STOP_STRING_BYTES: usize = 256;

/// Why a generation was refused or failed. Each variant is a case callers handle.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "message {index} contains the model's control token {token:?}; control tokens are reserved for the chat template"
    )]
    ControlTokenInMessage { index: usize, token: String },
    #[error(
        "the prompt has {prompt_tokens} tokens and {max_tokens} new tokens were asked for, but \
         the model's context holds {context_length}; shorten the prompt or lower max_tokens"
    )]
    ContextOverflow {
        prompt_tokens: usize,
        max_tokens: usize,
        context_length: usize,
    },
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("stop strings must not be empty")]
    EmptyStopString,
    #[error("at most {MAX_STOP_STRINGS} stop strings are allowed, got {0}")]
    TooManyStopStrings(usize),
    #[error("stop strings may be at most {MAX_STOP_STRING_BYTES} bytes long, got {0}")]
    StopStringTooLong(usize),
    #[error("stop token id {id} is outside the vocabulary of {vocab_size}")]
    StopTokenOutOfVocab { id: u32, vocab_size: usize },
    #[error("prompt token id {id} is outside the vocabulary of {vocab_size}")]
    PromptTokenOutOfVocab { id: u32, vocab_size: usize },
    #[error("this model has no chat template; send a plain prompt")]
    NoChatTemplate,
    #[error("{0}")]
    ChatTemplate(String),
    #[error("tokenizer failed: {0}")]
    Tokenize(String),
    #[error(transparent)]
    Constraint(#[from] ConstraintFailure),
    #[error("the engine queue is full; retry shortly")]
    Overloaded,
    #[error("this department already holds its share of the engine queue; retry shortly")]
    DepartmentOverloaded,
    #[error("the engine has stopped")]
    ShutDown,
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Whether a tokenizer of `tokenizer_vocab` ids serves a model with `logits_width` rows.
///
/// Models pad their embedding beyond the tokenizer (Qwen2: 151,936 rows for 151,665
/// tokens) so the table divides evenly on accelerators; the padded rows were never trained
/// and sampling never looks at them (`Sequence::advance` reads only the tokenizer's ids).
/// A tokenizer with ids beyond the rows, or one covering less than nine tenths of them, was
/// made for another model.
fn vocabularies_fit(tokenizer_vocab: usize, logits_width: usize) -> bool {
    tokenizer_vocab <= logits_width && tokenizer_vocab * 10 >= logits_width * 9
}

/// The engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Model(#[from] ModelDirError),
    #[error(
        "tokenizer and model disagree: {tokenizer} has {tokenizer_vocab} tokens but the model's \
         logits are {logits_width} wide (a model may pad its vocabulary by at most a tenth); \
         the model directory mixes files from different models"
    )]
    VocabMismatch {
        tokenizer: String,
        tokenizer_vocab: usize,
        logits_width: usize,
    },
    #[error("warm-up inference failed: {0}")]
    WarmUp(#[from] BackendError),
    #[error("could not start the engine thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("an engine needs at least one backend")]
    NoWorkers,
    #[error("the engine's backends loaded different models: {first} and {other}")]
    WorkersDiffer { first: String, other: String },
}

/// Receives one generation's events; dropping it cancels the generation.
#[derive(Debug)]
pub struct GenerationStream {
    events: mpsc::UnboundedReceiver<GenerationEvent>,
    /// Prompt length in tokens, known once the request was accepted.
    pub prompt_tokens: usize,
}

impl GenerationStream {
    /// The next event; `None` after the final one.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        self.events.recv().await
    }

    /// The next event, blocking the calling thread (never call this on an async worker).
    pub fn next_blocking(&mut self) -> Option<GenerationEvent> {
        self.events.blocking_recv()
    }
}

/// The facts every request needs, shared with callers' threads.
#[derive(Debug)]
struct EngineShared {
    metadata: ModelMetadata,
    tokenizer: Arc<TextTokenizer>,
    grammar: LazyGrammar,
    chat_template: Option<ChatTemplate>,
    model: BackendModel,
    settings: EngineSettings,
}

/// Each token's bytes, and the id that ends constrained answers.
type GrammarSource = (Vec<Vec<u8>>, u32);

/// The grammar compiler of a model, built when a request first asks for a response
/// format: its token trie and parser tables take megabytes that a model never asked for one
/// does not need to hold. What it is built from is read when the model loads, so the first
/// request depends on no file.
#[derive(Debug)]
struct LazyGrammar {
    model: String,
    /// Each token's bytes and the id that ends constrained answers, until the compiler is
    /// built; `Err`: why this model cannot constrain its answers.
    source: Mutex<Option<Result<GrammarSource, ConstraintError>>>,
    compiler: OnceLock<Result<constraint::GrammarCompiler, ConstraintError>>,
}

impl LazyGrammar {
    fn new(model: &ModelDirectory, vocab_size: usize) -> Self {
        let metadata = &model.metadata;
        let source = match metadata.eos_token_ids.first() {
            Some(&eos) => {
                constraint::token_bytes(&metadata.name, &model.tokenizer_path(), vocab_size)
                    .map(|words| (words, eos))
            }
            None => Err(ConstraintError::Unsupported(metadata.name.clone())),
        };
        if let Err(e) = &source {
            tracing::warn!(error = %e, "response formats will be refused for this model");
        }
        Self {
            model: metadata.name.clone(),
            source: Mutex::new(Some(source)),
            compiler: OnceLock::new(),
        }
    }

    fn compiler(
        &self,
        tokenizer: &Arc<TextTokenizer>,
    ) -> &Result<constraint::GrammarCompiler, ConstraintError> {
        self.compiler.get_or_init(|| {
            // Taken once: OnceLock runs this at most once.
            let source = self
                .source
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| Err(ConstraintError::Unsupported(self.model.clone())));
            source.and_then(|(words, eos)| {
                constraint::GrammarCompiler::new(&self.model, &words, Arc::clone(tokenizer), eos)
            })
        })
    }
}

/// A running engine: a model on a device behind its own thread.
#[derive(Debug)]
pub struct Engine {
    shared: Arc<EngineShared>,
    queue: Arc<Mutex<FairQueue<worker::Admission>>>,
    /// Wakes the engine thread when it idles; dropped with the engine, which tells the
    /// thread to finish.
    wake: crossbeam_channel::Sender<()>,
    next_sequence: AtomicU64,
    workers: Vec<(JoinHandle<()>, Arc<worker::WorkerHealth>)>,
    /// The prefix caches' counters, one per engine thread that keeps a cache.
    prefix_stats: Vec<Arc<prefix_cache::PrefixStats>>,
}

impl Engine {
    /// Loads `model_dir` into ONNX Runtime and starts the engine.
    pub fn load_ort(
        runtime: &OrtRuntime,
        model_dir: &Path,
        options: &SessionOptions,
        settings: EngineSettings,
    ) -> Result<Self, StartError> {
        Self::load_ort_directory(
            runtime,
            &ModelDirectory::open(model_dir)?,
            options,
            settings,
        )
    }

    /// [`Engine::load_ort`] for a model directory already opened.
    pub fn load_ort_directory(
        runtime: &OrtRuntime,
        model: &ModelDirectory,
        options: &SessionOptions,
        settings: EngineSettings,
    ) -> Result<Self, StartError> {
        let backends = (0..settings.workers.max(1))
            .map(|_| Ok(Box::new(OrtBackend::load(runtime, model, options)?) as Box<dyn Backend>))
            .collect::<Result<Vec<_>, StartError>>()?;
        Self::start_workers(backends, model, settings)
    }

    /// Starts the engine thread over a loaded backend, after checking that tokenizer and
    /// model agree and that one warm-up step runs.
    pub fn start(
        backend: Box<dyn Backend>,
        model: &ModelDirectory,
        settings: EngineSettings,
    ) -> Result<Self, StartError> {
        Self::start_workers(vec![backend], model, settings)
    }

    /// [`Engine::start`] with one engine thread per backend, all taking from one queue.
    pub fn start_workers(
        mut backends: Vec<Box<dyn Backend>>,
        model: &ModelDirectory,
        settings: EngineSettings,
    ) -> Result<Self, StartError> {
        let Some(backend) = backends.first() else {
            return Err(StartError::NoWorkers);
        };
        model.require_task(ModelTask::TextGeneration)?;
        let metadata = model.metadata.clone();
        let bos = metadata.bos_token_id.filter(|_| metadata.add_bos_token);
        let tokenizer = Arc::new(TextTokenizer::load(&model.tokenizer_path(), bos)?);
        let backend_model = backend.model().clone();
        if let Some(other) = backends.iter().find(|b| *b.model() != backend_model) {
            return Err(StartError::WorkersDiffer {
                first: format!("{backend_model:?}"),
                other: format!("{:?}", other.model()),
            });
        }
        if !vocabularies_fit(tokenizer.vocab_size(), backend_model.vocab_size) {
            return Err(StartError::VocabMismatch {
                tokenizer: model.tokenizer_path().display().to_string(),
                tokenizer_vocab: tokenizer.vocab_size(),
                logits_width: backend_model.vocab_size,
            });
        }
        let chat_template = compile_chat_template(model, &tokenizer)?;
        let grammar = LazyGrammar::new(model, tokenizer.vocab_size());
        for backend in &mut backends {
            warm_up(backend.as_mut())?;
        }
        let queue = Arc::new(Mutex::new(FairQueue::new(
            settings.queue_capacity,
            settings.department_queue(),
            settings.department_weights.clone(),
        )));
        // One wake-up token per worker: a burst of submissions wakes every idle worker,
        // and each takes what its free slots hold.
        let (wake, woken) = crossbeam_channel::bounded(backends.len());
        let max_batch = settings.max_batch.max(1);
        let limits = worker::StepLimits {
            max_batch,
            // Room for every other sequence's decode and one whole prompt chunk, so a new
            // request's prompt always advances.
            max_batched_tokens: match settings.max_batched_tokens {
                0 => 0,
                n => n.max(settings.prefill_chunk_tokens + max_batch),
            },
        };
        let mut workers = Vec::with_capacity(backends.len());
        let prefix_stats = backends.iter().filter_map(|b| b.prefix_stats()).collect();
        let serving = Arc::new(AtomicUsize::new(backends.len()));
        for (index, backend) in backends.into_iter().enumerate() {
            let health = Arc::new(worker::WorkerHealth::default());
            let waiting = worker::Waiting {
                queue: Arc::clone(&queue),
                woken: woken.clone(),
                serving: Arc::clone(&serving),
            };
            let (tokenizer, thread_health) = (Arc::clone(&tokenizer), Arc::clone(&health));
            let thread = std::thread::Builder::new()
                .name(format!("moat-engine-{index}"))
                .spawn(move || worker::run(backend, tokenizer, waiting, limits, thread_health))?;
            workers.push((thread, health));
        }
        Ok(Self {
            shared: Arc::new(EngineShared {
                metadata,
                tokenizer,
                grammar,
                chat_template,
                model: backend_model,
                settings,
            }),
            queue,
            wake,
            next_sequence: AtomicU64::new(0),
            workers,
            prefix_stats,
        })
    }

    /// The prefix cache's counters, over every engine thread.
    pub fn prefix_cache(&self) -> PrefixFigures {
        self.prefix_stats
            .iter()
            .map(|stats| stats.snapshot())
            .fold(PrefixFigures::default(), |sum, figures| sum + figures)
    }

    pub fn metadata(&self) -> &ModelMetadata {
        &self.shared.metadata
    }

    pub fn model(&self) -> &BackendModel {
        &self.shared.model
    }

    /// Whether an engine thread is running and its last step succeeded (after a failed
    /// step, false until a step succeeds again).
    pub fn is_healthy(&self) -> bool {
        self.workers.iter().any(|(thread, health)| {
            !thread.is_finished() && !health.failing.load(Ordering::Relaxed)
        })
    }

    /// Each engine thread's progress, for the watchdog to tell a stuck thread from an idle
    /// one. A thread counts as having work while it holds sequences or requests wait.
    pub fn progress(&self) -> Vec<WorkerProgress> {
        let waiting = self.queued_requests() > 0;
        self.workers
            .iter()
            .map(|(thread, health)| WorkerProgress {
                rounds: health.rounds.load(Ordering::Relaxed),
                busy: waiting || health.live.load(Ordering::Relaxed) > 0,
                running: !thread.is_finished(),
            })
            .collect()
    }

    /// Generations the engine thread holds right now (admitted and not yet finished).
    pub fn live_sequences(&self) -> usize {
        self.workers
            .iter()
            .map(|(_, health)| health.live.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests accepted and waiting for the engine thread to take them.
    pub fn queued_requests(&self) -> usize {
        self.lock_queue().len()
    }

    /// Renders and tokenizes a prompt.
    pub fn tokenize_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let shared = &self.shared;
        let ids = match prompt {
            Prompt::Text(text) => shared
                .tokenizer
                .encode(text, true)
                .map_err(|e| EngineError::Tokenize(e.to_string()))?,
            Prompt::Chat(messages) => {
                let template = shared
                    .chat_template
                    .as_ref()
                    .ok_or(EngineError::NoChatTemplate)?;
                if messages.is_empty() {
                    return Err(EngineError::EmptyPrompt);
                }
                if let Some((index, token)) = messages.iter().enumerate().find_map(|(i, m)| {
                    shared
                        .tokenizer
                        .find_control_token(&m.content)
                        .map(|t| (i, t))
                }) {
                    return Err(EngineError::ControlTokenInMessage {
                        index,
                        token: token.to_owned(),
                    });
                }
                let text = template
                    .render(messages, true)
                    .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
                shared
                    .tokenizer
                    .encode(&text, false)
                    .map_err(|e| EngineError::Tokenize(e.to_string()))?
            }
            Prompt::TokenIds(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        // Also for tokenizer output: a tokenizer with gaps in its ids, or a BOS id, could
        // name a row the model does not have.
        let vocab_size = shared.model.vocab_size;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(EngineError::PromptTokenOutOfVocab { id, vocab_size });
        }
        Ok(ids)
    }

    /// The new tokens a request may generate: `asked`, or the engine's default, within the
    /// room the prompt leaves in the context.
    pub fn max_new_tokens(
        &self,
        prompt_tokens: usize,
        asked: Option<usize>,
    ) -> Result<usize, EngineError> {
        let shared = &self.shared;
        let context_length = shared.model.context_length;
        let room = context_length.saturating_sub(prompt_tokens);
        match asked {
            Some(0) => Err(EngineError::ZeroMaxTokens),
            Some(asked) if asked > room => Err(EngineError::ContextOverflow {
                prompt_tokens,
                max_tokens: asked,
                context_length,
            }),
            Some(asked) => Ok(asked),
            None if room == 0 => Err(EngineError::ContextOverflow {
                prompt_tokens,
                max_tokens: 1,
                context_length,
            }),
            None => Ok(shared.settings.default_max_tokens.min(room)),
        }
    }

    /// Decodes token ids to text (special tokens left out), as a whole.
    pub fn decode(&self, ids: &[u32]) -> Result<String, EngineError> {
        self.shared
            .tokenizer
            .decode(ids)
            .map_err(|e| EngineError::Tokenize(e.to_string()))
    }

    /// Checks a request, renders and tokenises its prompt once, and fixes its token budget:
    /// everything a request costs before it runs, and everything the policy needs to know
    /// of it ([`Prepared::prompt_tokens`], [`Prepared::max_new_tokens`]).
    ///
    /// Rendering a chat template and tokenising a long prompt take milliseconds and run a
    /// bundle author's template: call this off the async workers (the API does so on the
    /// blocking pool).
    pub fn prepare(&self, request: GenerationRequest) -> Result<Prepared, EngineError> {
        let shared = &self.shared;
        let vocab_size = shared.model.vocab_size;
        request.sampling.validate()?;
        if request.stop.len() > MAX_STOP_STRINGS {
            return Err(EngineError::TooManyStopStrings(request.stop.len()));
        }
        if request.stop.iter().any(String::is_empty) {
            return Err(EngineError::EmptyStopString);
        }
        if let Some(long) = request
            .stop
            .iter()
            .find(|s| s.len() > MAX_STOP_STRING_BYTES)
        {
            return Err(EngineError::StopStringTooLong(long.len()));
        }
        if let Some(&id) = request
            .stop_token_ids
            .iter()
            .find(|&&id| id as usize >= vocab_size)
        {
            return Err(EngineError::StopTokenOutOfVocab { id, vocab_size });
        }
        if request.max_tokens == Some(0) {
            return Err(EngineError::ZeroMaxTokens);
        }
        let prompt = self.tokenize_prompt(&request.prompt)?;
        let max_new_tokens = self.max_new_tokens(prompt.len(), request.max_tokens)?;
        let mut stop_token_ids: HashSet<u32> = request.stop_token_ids.iter().copied().collect();
        if !request.ignore_eos {
            stop_token_ids.extend(shared.metadata.eos_token_ids.iter().copied());
        }
        Ok(Prepared {
            spec: SequenceSpec {
                prompt,
                max_new_tokens,
                stop_token_ids,
                sampler: sampler::Sampler::new(request.sampling),
                stop_strings: request.stop,
                prefill_chunk: shared.settings.prefill_chunk_tokens,
                constraint: request.constraint,
                prefix_scope: shared.settings.prefix_cache.scope(&request.department),
            },
            department: request.department,
        })
    }

    /// Queues a prepared request; events arrive on the returned stream. Does no work of
    /// the request's own, so it is safe on an async worker.
    pub fn submit(&self, prepared: Prepared) -> Result<GenerationStream, EngineError> {
        let Prepared { spec, department } = prepared;
        let prompt_tokens = spec.prompt.len();
        let id = SequenceId(self.next_sequence.fetch_add(1, Ordering::Relaxed));
        let (events, receiver) = mpsc::unbounded_channel();
        let admission = worker::Admission {
            sequence: Sequence::new(id, spec),
            events,
        };
        if self.workers.iter().all(|(thread, _)| thread.is_finished()) {
            return Err(EngineError::ShutDown);
        }
        self.lock_queue()
            .push(&department, admission)
            .map_err(|(full, _)| match full {
                QueueFull::Engine => EngineError::Overloaded,
                QueueFull::Department => EngineError::DepartmentOverloaded,
            })?;
        // A full channel means every worker already has a token to wake with.
        let _ = self.wake.try_send(());
        Ok(GenerationStream {
            events: receiver,
            prompt_tokens,
        })
    }

    /// [`Engine::prepare`] then [`Engine::submit`], for callers already off the async
    /// workers that answer no department (golden checks, evaluations, the command line).
    pub fn generate(&self, request: GenerationRequest) -> Result<GenerationStream, EngineError> {
        self.submit(self.prepare(request)?)
    }

    /// The constraint that enforces `format` on an answer of this model (compiling may
    /// take milliseconds for a large schema: call it off the async workers).
    pub fn constrain(&self, format: &ResponseFormat) -> Result<Constraint, ConstraintError> {
        match self.shared.grammar.compiler(&self.shared.tokenizer) {
            Ok(compiler) => compiler.compile(format),
            Err(e) => Err(e.clone()),
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, FairQueue<worker::Admission>> {
        // The queue holds no invariant a panicking holder could break half-way.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops taking requests, lets running generations finish, and waits for the thread.
    pub fn shutdown(mut self) {
        let workers = std::mem::take(&mut self.workers);
        drop(self);
        for (thread, _) in workers {
            let _ = thread.join();
        }
    }
}

/// Compiles the model's chat template, if it has one, with the texts of its BOS and EOS.
fn compile_chat_template(
    model: &ModelDirectory,
    tokenizer: &TextTokenizer,
) -> Result<Option<ChatTemplate>, ModelDirError> {
    let metadata = &model.metadata;
    let Some(source) = &metadata.chat_template else {
        return Ok(None);
    };
    let text = |id: Option<u32>| {
        id.and_then(|id| tokenizer.token_text(id))
            .unwrap_or_default()
    };
    ChatTemplate::compile(
        source,
        &text(metadata.bos_token_id),
        &text(metadata.eos_token_ids.first().copied()),
    )
    .map(Some)
    .map_err(|e| ModelDirError::BadChatTemplate {
        path: model.metadata_path(),
        reason: e.to_string(),
    })
}

/// Runs one token through a scratch sequence: proves the graph runs on this device and
/// that its logits have the declared width, before any request depends on it.
fn warm_up(backend: &mut dyn Backend) -> Result<(), BackendError> {
    let scratch = SequenceId(u64::MAX);
    backend.start_sequence(scratch, 1)?;
    let mut logits = backend::LogitsBatch::default();
    let result = backend.step(
        &[backend::StepInput {
            sequence: scratch,
            tokens: &[0],
        }],
        &mut logits,
    );
    backend.finish_sequence(scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::vocabularies_fit;

    #[test]
    fn a_padded_vocabulary_fits_and_a_foreign_tokenizer_does_not() {
        assert!(vocabularies_fit(49_152, 49_152));
        assert!(vocabularies_fit(151_665, 151_936)); // Qwen2's padding
        assert!(vocabularies_fit(359, 384));
        assert!(!vocabularies_fit(49_152, 359)); // ids beyond the rows
        assert!(!vocabularies_fit(32_000, 49_152)); // another model's tokenizer
    }
}
