//! moatd's command line.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use moat_daemon::config::{Config, ConfigError, EXIT_CONFIG};
use moat_daemon::engine::ort_backend::{TelemetryOn, switch_off_in_environment};
use moat_daemon::engine::runtime_library::{self, LIBRARY_ENV};
use moat_daemon::engine::{
    ChatMessage, DevicePreference, Engine, GenerationEvent, GenerationRequest, GenerationStream,
    OrtRuntime, Prompt, SamplingParams,
};
use moat_daemon::systemd::activation::Inherited;

/// The configuration `moatd serve` reads when `--config` names none.
const DEFAULT_CONFIG: &str = "/etc/moat/moat.toml";

#[derive(Debug, Parser)]
#[command(name = "moatd", version, about = "The moat inference daemon")]
struct Cli {
    /// Configuration file (TOML). Without it: /etc/moat/moat.toml for serve, built-in
    /// defaults for generate.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text with a model directory and stream it to stdout.
    #[command(after_help = "Examples:\n  \
        moatd generate --model local/models/smollm2-135m-instruct-exact --chat 'What is the capital of France?'\n  \
        moatd generate --model DIR --prompt 'Once upon a time' --max-tokens 64 --temperature 0.8 --seed 7")]
    Generate(Box<GenerateArgs>),
    /// Serve the configured models over mutual TLS (OpenAI-compatible API) until SIGTERM.
    #[command(after_help = "Examples:\n  \
        moatd serve                       (reads /etc/moat/moat.toml)\n  \
        moatd serve --config .moat-dev/moat.toml\n\n\
        Configuration problems (every one is listed) exit with status 64.")]
    Serve,
    /// Print a shell completion script to stdout.
    #[command(after_help = "Example:\n  moatd completions bash > /etc/bash_completion.d/moatd")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print moatd's manual page (roff, section 8) to stdout, or write one page per command.
    #[command(after_help = "Examples:\n  moatd man | man -l -\n  \
        moatd man --dir /usr/share/man/man8")]
    Man {
        /// Write moatd.8 and a page per subcommand (moatd-serve.8, ...) here.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct GenerateArgs {
    /// Model directory (model.onnx, tokenizer.json, moat-model.json).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Plain text prompt, continued as is.
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    prompt: Option<String>,
    /// A user message, answered through the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    /// System message placed before --chat (otherwise the template's default, if any).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// New tokens at most (default: engine.default_max_tokens, within the context).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// 0 is greedy (the default); up to 2.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (0 < p <= 1).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Random seed: the same seed gives the same answer.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Overrides engine.device: cpu, cuda or auto.
    #[arg(long, value_parser = parse_device)]
    device: Option<DevicePreference>,
    /// Overrides engine.onnxruntime_library.
    #[arg(long, value_name = "PATH")]
    onnxruntime_library: Option<PathBuf>,
    /// Overrides engine.intra_op_threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Print generated token ids and timings to stderr as one JSON line at the end.
    #[arg(long)]
    stats_json: bool,
}

fn parse_device(text: &str) -> Result<DevicePreference, String> {
    match text {
        "cpu" => Ok(DevicePreference::Cpu),
        "cuda" => Ok(DevicePreference::Cuda),
        "auto" => Ok(DevicePreference::Auto),
        other => Err(format!("unknown device {other:?}; use cpu, cuda or auto")),
    }
}

fn main() -> ExitCode {
    if let Err(e) = switch_off_runtime_telemetry() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // Before any thread starts: taking the sockets systemd passed removes LISTEN_FDS and
    // LISTEN_PID from the environment.
    let inherited = Inherited::from_env();
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        // Documentation needs no configuration.
        Command::Completions { shell } => print_completions(shell),
        Command::Man { dir } => print_manual(dir.as_deref()),
        Command::Generate(args) => {
            let config = match load_config(cli.config.as_deref())
                .and_then(|config| apply_overrides(config, &args, cli.config.as_deref()))
            {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match generate(&config, *args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve => {
            let file = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            let config = match Config::load(&file) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("error: {e}");
                    if file == Path::new(DEFAULT_CONFIG) {
                        eprintln!(
                            "(moatd serve reads {DEFAULT_CONFIG} unless --config FILE names another)"
                        );
                    }
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match inherited {
                Ok(inherited) => serve(&config, &file, inherited),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}

/// First of all, while this is the only thread: ONNX Runtime reads the switch when it
/// initialises, and moatd never runs with its telemetry on.
#[allow(unsafe_code)]
fn switch_off_runtime_telemetry() -> Result<(), TelemetryOn> {
    // SAFETY: called first in `main`, before any thread is started.
    unsafe { switch_off_in_environment() }
}

fn serve(config: &Config, file: &Path, inherited: Inherited) -> ExitCode {
    if let Err(e) = config.validate_for_serve(file) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match load_runtime(config) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match moat_daemon::server::serve(config, runtime, inherited) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let status = if e.is_config_error() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            };
            // Each message already names its cause.
            eprintln!("error: {e}");
            status
        }
    }
}

fn print_completions(shell: clap_complete::Shell) -> ExitCode {
    use clap::CommandFactory as _;
    // Into memory first: generating to a closed pipe would panic.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "moatd", &mut script);
    write_stdout(&script)
}

/// The manual page on stdout, or with `dir` one page per command written there.
fn print_manual(dir: Option<&Path>) -> ExitCode {
    use clap::CommandFactory as _;
    let mut page = Vec::new();
    let written = match dir {
        Some(dir) => {
            let mut command = Cli::command().disable_help_subcommand(true);
            command.build();
            write_manual_pages(command, dir)
        }
        None => clap_mangen::Man::new(Cli::command())
            .section("8")
            .render(&mut page),
    };
    match written {
        Ok(()) => write_stdout(&page),
        Err(e) => {
            match dir {
                Some(dir) => eprintln!("error: writing manual pages to {}: {e}", dir.display()),
                None => eprintln!("error: rendering the manual page: {e}"),
            }
            ExitCode::FAILURE
        }
    }
}

fn write_stdout(bytes: &[u8]) -> ExitCode {
    match std::io::stdout().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `command`'s page and one per subcommand, in section 8 (a daemon's section).
fn write_manual_pages(command: clap::Command, dir: &Path) -> std::io::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_manual_pages(sub.clone(), dir)?;
    }
    clap_mangen::Man::new(command)
        .section("8")
        .generate_to(dir)?;
    Ok(())
}

/// Where log lines go, from `MOAT_LOG_FORMAT`: `journald` (structured fields, one entry per
/// event), `json` (one object per line on stderr) or `text`; `auto`, the default, is
/// journald when stderr is systemd's journal stream and text otherwise.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = tracing_subscriber::EnvFilter::try_from_env("MOAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    let text = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    };
    let requested = std::env::var("MOAT_LOG_FORMAT").unwrap_or_default();
    let format = match requested.as_str() {
        "" | "auto" if stderr_is_the_journal() => "journald",
        "" | "auto" => "text",
        other => other,
    };
    match format {
        "json" => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
        "journald" => match tracing_journald::layer() {
            // Fields arrive as MOAT_REQUEST_ID, MOAT_DEPARTMENT, ...: `journalctl
            // MOAT_DEPARTMENT=finance` selects them.
            Ok(journald) => {
                use tracing_journald::{Priority, PriorityMappings};
                // syslog's usual reading: info is 6 (the crate's default says 5, notice).
                let priorities = PriorityMappings {
                    info: Priority::Informational,
                    debug: Priority::Debug,
                    ..PriorityMappings::new()
                };
                registry
                    .with(
                        journald
                            .with_field_prefix(Some("MOAT".to_owned()))
                            .with_priority_mappings(priorities),
                    )
                    .init()
            }
            Err(e) => {
                registry.with(text()).init();
                tracing::warn!(error = %e, "the journal is unreachable; logging text to stderr");
            }
        },
        "text" => registry.with(text()).init(),
        other => {
            registry.with(text()).init();
            tracing::warn!(
                format = other,
                "MOAT_LOG_FORMAT is not auto, journald, json or text; logging text"
            );
        }
    }
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM` names its
/// device and inode).
fn stderr_is_the_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2")
        .is_ok_and(|stderr| device.parse() == Ok(stderr.dev()) && inode.parse() == Ok(stderr.ino()))
}

fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    match path {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    }
}

/// Command-line overrides win over the file; the result is validated as a whole.
fn apply_overrides(
    mut config: Config,
    args: &GenerateArgs,
    file: Option<&Path>,
) -> Result<Config, ConfigError> {
    if let Some(device) = args.device {
        config.engine.device = device;
    }
    if let Some(lib) = &args.onnxruntime_library {
        config.engine.onnxruntime_library = Some(std::path::absolute(lib).unwrap_or(lib.clone()));
    }
    if args.threads.is_some() {
        config.engine.intra_op_threads = args.threads;
    }
    let origin = match file {
        Some(file) => format!("{} with the command-line options", file.display()),
        None => "the command-line options".to_owned(),
    };
    config.validate(Path::new(&origin))?;
    Ok(config)
}

fn generate(config: &Config, args: GenerateArgs) -> anyhow::Result<()> {
    let runtime = load_runtime(config)?;
    let engine = Engine::load_ort(
        &runtime,
        &args.model,
        &config.session_options(),
        config.engine_settings(),
    )
    .with_context(|| format!("loading model {}", args.model.display()))?;
    tracing::info!(
        model = %engine.metadata().name,
        variant = engine.metadata().variant.as_deref().unwrap_or("-"),
        device = %engine.model().device,
        "model loaded"
    );
    let stats_json = args.stats_json;
    let request = build_request(args)?;
    let started = Instant::now();
    let mut stream = engine.generate(request)?;
    let result = stream_to_stdout(&mut stream, started, stats_json);
    drop(stream);
    engine.shutdown();
    result
}

fn build_request(args: GenerateArgs) -> anyhow::Result<GenerationRequest> {
    let prompt = match (args.prompt, args.chat) {
        (Some(text), _) => Prompt::Text(text),
        (None, Some(user)) => {
            let mut messages = Vec::new();
            if let Some(system) = args.system {
                messages.push(ChatMessage::new("system", system));
            }
            messages.push(ChatMessage::new("user", user));
            Prompt::Chat(messages)
        }
        (None, None) => anyhow::bail!("give --prompt or --chat"),
    };
    let mut request = GenerationRequest::new(prompt);
    request.max_tokens = args.max_tokens;
    request.sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
    };
    request.stop = args.stop;
    request.ignore_eos = args.ignore_eos;
    Ok(request)
}

/// Writes the answer as it arrives, then reports the finish and timings on stderr.
fn stream_to_stdout(
    stream: &mut GenerationStream,
    started: Instant,
    stats_json: bool,
) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    let mut ids = Vec::new();
    let mut first_token_at = None;
    while let Some(event) = stream.next_blocking() {
        match event {
            GenerationEvent::Token { id, text } => {
                first_token_at.get_or_insert_with(|| started.elapsed());
                ids.push(id);
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            GenerationEvent::Finished { reason, usage } => {
                writeln!(stdout)?;
                let total = started.elapsed();
                let ttft = first_token_at.unwrap_or(total);
                let decode_secs = (total - ttft).as_secs_f64();
                let rate = if decode_secs > 0.0 {
                    usage.completion_tokens.saturating_sub(1) as f64 / decode_secs
                } else {
                    0.0
                };
                let ttft_ms = ttft.as_secs_f64() * 1e3;
                if stats_json {
                    eprintln!(
                        "{}",
                        serde_json::json!({
                            "generated_ids": ids,
                            "finish_reason": reason.as_str(),
                            "prompt_tokens": usage.prompt_tokens,
                            "completion_tokens": usage.completion_tokens,
                            "ttft_ms": ttft_ms,
                            "decode_tokens_per_s": rate,
                        })
                    );
                } else {
                    tracing::info!(
                        finish_reason = reason.as_str(),
                        prompt_tokens = usage.prompt_tokens,
                        completion_tokens = usage.completion_tokens,
                        ttft_ms = format!("{ttft_ms:.1}"),
                        decode_tokens_per_s = format!("{rate:.1}"),
                        "done"
                    );
                }
                return Ok(());
            }
            GenerationEvent::Failed(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("the engine stopped before the generation finished")
}

fn load_runtime(config: &Config) -> anyhow::Result<std::sync::Arc<OrtRuntime>> {
    let env_value = std::env::var_os(LIBRARY_ENV);
    let located = runtime_library::locate(
        config.engine.onnxruntime_library.as_deref(),
        env_value.as_deref(),
    )?;
    let runtime = OrtRuntime::load(located)?;
    tracing::info!(
        version = runtime.version(),
        library = %runtime.library().path.display(),
        source = %runtime.library().origin,
        "ONNX Runtime loaded"
    );
    if runtime.version() != runtime_library::PINNED_VERSION {
        tracing::warn!(
            version = runtime.version(),
            pinned = runtime_library::PINNED_VERSION,
            "this ONNX Runtime is not the pinned release"
        );
    }
    Ok(runtime)
}
