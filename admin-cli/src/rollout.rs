//! `moatctl model import|list|activate|canary|promote|rollback|remove` and `moatctl status`:
//! the running moatd's models, over its admin socket. moatd verifies and audits every
//! command; this side sends it and prints the answer.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use moat_core::admin::{
    Activated, AnswerError, CanaryStarted, CheckFigures, CheckReport, EvalScore, Evaluated,
    ImportSummary, ModelList, Promoted, Removed, Request, RequestLine, RolledBack, Status,
    read_answer,
};
use serde::de::DeserializeOwned;

use crate::audit::bytes_bar;
use crate::bundle::Source;

/// moatd's admin socket by default.
const DEFAULT_SOCKET: &str = "/run/moat/admin.sock";

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Import a signed bundle into the running moatd (verified there: signature, then every
    /// file's hash, then that its version is higher than any imported before).
    #[command(after_help = "Examples:\n  \
        moatctl model import smollm2-1.1.0.tar\n  \
        moatctl model import smollm2-1.0.3.tar --allow-downgrade")]
    Import {
        /// A bundle tar, or a directory with manifest.toml, manifest.sig and the files.
        bundle: PathBuf,
        /// Accept a version not higher than the highest imported under its name.
        #[arg(long)]
        allow_downgrade: bool,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// List imported versions: active, canary, previous, loaded.
    #[command(after_help = "Examples:\n  moatctl model list\n  moatctl model list --details")]
    List {
        #[arg(long)]
        json: bool,
        /// Also show each version's check figures (`moat-model check`, carried in the
        /// bundle as check.json): greedy agreement, top-1, logit error, KL divergence.
        #[arg(long)]
        details: bool,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Serve NAME@VERSION: it loads beside the current version, must pass its golden
    /// prompts, then takes all traffic at once; the old version stays loaded for rollback.
    #[command(after_help = "Example:\n  moatctl model activate smollm2@1.1.0")]
    Activate {
        /// NAME@VERSION
        model: String,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Send PERCENT of NAME's requests to NAME@VERSION (after its golden prompts pass).
    #[command(after_help = "Example:\n  moatctl model canary smollm2@1.1.0 --percent 10")]
    Canary {
        /// NAME@VERSION
        model: String,
        /// Share of requests, 1 to 99.
        #[arg(long)]
        percent: u8,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Make NAME's canary its active version. When the canary's bundle carries an
    /// evaluation set (eval.jsonl), the canary and the active version both answer it first,
    /// and a canary scoring below the active version is refused.
    #[command(
        after_help = "Examples:\n  moatctl model promote smollm2\n  moatctl model promote smollm2 --force"
    )]
    Promote {
        name: String,
        /// Promote even if the canary scores below the active version.
        #[arg(long)]
        force: bool,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Run NAME@VERSION's evaluation set (eval.jsonl in its bundle) on this node: accuracy,
    /// format validity, mean output tokens, latency. Loads the version if it is not loaded.
    #[command(after_help = "Example:\n  moatctl model eval smollm2@1.1.0")]
    Eval {
        /// NAME@VERSION
        model: String,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// End NAME's canary, or else return NAME to its previous version at once.
    #[command(after_help = "Example:\n  moatctl model rollback smollm2")]
    Rollback {
        name: String,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Delete an imported version (never the active one or the canary).
    #[command(after_help = "Example:\n  moatctl model remove smollm2@1.0.0")]
    Remove {
        /// NAME@VERSION
        model: String,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

/// Sends one request and returns moatd's result; moatd's refusal is the error.
fn request<T: DeserializeOwned>(
    socket: &Path,
    request: Request,
    body: Option<&Source>,
) -> anyhow::Result<T> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach moatd's admin socket {}: is moatd running, and are you root or in the moat-admin group?",
            socket.display()
        )
    })?;
    let line = serde_json::to_string(&RequestLine::new(request))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    if let Some(body) = body {
        let mut file = body.file()?;
        let bar = bytes_bar("sending");
        bar.set_length(file.metadata()?.len());
        let sent = std::io::copy(&mut file, &mut bar.wrap_write(&mut stream));
        bar.finish_and_clear();
        // moatd may have refused before reading it all: its answer says why.
        if sent.is_ok() {
            eprintln!("verifying and storing (signature, every file's hash, version)...");
        }
    }
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("moatd closed the admin connection without answering")?;
    read_answer(&line).map_err(|e| match e {
        AnswerError::Refused(refusal) => anyhow::anyhow!("moatd refused: {}", refusal.error),
        other => other.into(),
    })
}

pub fn run(command: RolloutCommand) -> anyhow::Result<()> {
    match command {
        RolloutCommand::Import {
            bundle,
            allow_downgrade,
            socket,
        } => {
            let source = Source::open(&bundle)?;
            let size = source.file()?.metadata()?.len();
            let request_line = Request::ModelImport {
                size,
                allow_downgrade,
            };
            let result: ImportSummary = request(&socket, request_line, Some(&source))?;
            println!(
                "imported {} ({} files, {} bytes, signed by {} key {}, {} golden prompt(s))",
                result.model,
                result.files,
                result.bytes,
                result.signer,
                result.signer_id,
                result.golden_prompts
            );
            println!("serve it with `moatctl model activate {}`", result.model);
        }
        RolloutCommand::List {
            json,
            details,
            socket,
        } => {
            let result: ModelList = request(&socket, Request::ModelList {}, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                print_list(&result, details);
            }
        }
        RolloutCommand::Activate { model, socket } => {
            let request_line = Request::ModelActivate {
                model: model.clone(),
            };
            let result: Activated = request(&socket, request_line, None)?;
            println!(
                "{model} is active (previous: {})",
                or_dash(result.previous.as_deref())
            );
        }
        RolloutCommand::Canary {
            model,
            percent,
            socket,
        } => {
            let request_line = Request::ModelCanary {
                model: model.clone(),
                percent,
            };
            let _: CanaryStarted = request(&socket, request_line, None)?;
            println!("{model} takes {percent}% of the requests");
        }
        RolloutCommand::Promote {
            name,
            force,
            socket,
        } => {
            let result: Promoted = request(&socket, Request::ModelPromote { name, force }, None)?;
            if let Some(evaluation) = &result.evaluation {
                println!("canary:  {}", score_line(&evaluation.canary));
                println!(
                    "active:  {}  ({})",
                    score_line(&evaluation.active),
                    evaluation.active_version
                );
                if evaluation.forced {
                    println!("promoted despite the lower score (--force)");
                }
            }
            println!("{} is active", result.model);
        }
        RolloutCommand::Eval {
            model,
            json,
            socket,
        } => {
            let result: Evaluated = request(&socket, Request::ModelEval { model }, None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                let evaluation = &result.evaluation;
                println!("{}: {}", result.model, score_line(evaluation));
                for failure in &evaluation.failures {
                    println!(
                        "  item {}: {:?} answered {:?}",
                        failure.item, failure.prompt, failure.answer
                    );
                }
            }
        }
        RolloutCommand::Rollback { name, socket } => {
            let result: RolledBack = request(&socket, Request::ModelRollback { name }, None)?;
            match result {
                RolledBack::EndedCanary { ended_canary } => {
                    println!("canary {ended_canary} ended; all requests go to the active version")
                }
                RolledBack::Returned { model, .. } => println!("{model} is active again"),
            }
        }
        RolloutCommand::Remove { model, socket } => {
            let request_line = Request::ModelRemove {
                model: model.clone(),
            };
            let _: Removed = request(&socket, request_line, None)?;
            println!("{model} removed");
        }
    }
    Ok(())
}

/// `moatctl status`.
pub fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let result: Status = request(socket, Request::Status {}, None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    println!(
        "moatd {} on node {}, up {} s",
        result.moatd, result.node_id, result.uptime_secs
    );
    println!(
        "memory: {} MiB estimated for loaded models (budget: {})",
        result.memory_estimate_mib,
        match result.memory_budget_mib {
            None => "what the host has available".to_owned(),
            Some(mib) => format!("{mib} MiB"),
        }
    );
    if result.models.is_empty() {
        println!("no model is served: moatctl model import, then moatctl model activate");
    }
    for (name, model) in &result.models {
        let version = match model.active.as_str() {
            "" => "(unsigned directory)",
            v => v,
        };
        let mut line = format!("  {name}: {version}");
        if !model.healthy {
            line.push_str(" FAILING");
        }
        if let Some(canary) = &model.canary {
            line.push_str(&format!(
                ", canary {} at {}%",
                canary.version, canary.percent
            ));
        }
        if let Some(standby) = &model.standby {
            line.push_str(&format!(", {standby} loaded for rollback"));
        }
        println!("{line}");
    }
    Ok(())
}

/// A value that may be absent, as a table shows it.
fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

/// A figure with `digits` decimals, `-` when absent.
fn figure(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".to_owned(), |x| format!("{x:.digits$}"))
}

/// One line of an evaluation's figures.
fn score_line(score: &EvalScore) -> String {
    format!(
        "accuracy {} ({}/{}); format validity {}; mean output tokens {}; latency mean {} ms, p95 {} ms",
        figure(Some(score.accuracy), 3),
        score.correct,
        score.items,
        figure(score.format_validity, 3),
        figure(Some(score.mean_output_tokens), 1),
        figure(Some(score.latency_ms.mean), 0),
        figure(Some(score.latency_ms.p95), 0),
    )
}

/// One line of `moat-model check` figures for `model list --details`.
fn check_line(check: Option<&CheckReport>) -> String {
    let figures: &CheckFigures = match check {
        None => {
            return "check: none in the bundle (moat-model check DIR --against SRC writes one)"
                .into();
        }
        Some(CheckReport::Unreadable { unreadable }) => {
            return format!("check: {unreadable} is not valid JSON");
        }
        Some(CheckReport::Figures(figures)) => figures,
    };
    let count = |n: Option<u64>| n.map_or("-".to_owned(), |n| n.to_string());
    let greedy = figures.greedy.as_ref();
    let tf = figures.teacher_forced.as_ref();
    let number = |pick: fn(&moat_core::admin::TeacherForcedFigures) -> Option<f64>| {
        figure(tf.and_then(pick), 4)
    };
    let passed = match figures.passed {
        Some(true) => "passed",
        Some(false) => "FAILED",
        None => "-",
    };
    format!(
        "check ({}, against {}): {passed}; greedy {}/{} identical; top-1 {}; logit error max {} mean {}; KL mean {} max {}",
        or_dash(figures.variant.as_deref()),
        or_dash(figures.against.as_deref()),
        count(greedy.and_then(|g| g.identical_sequences)),
        count(greedy.and_then(|g| g.of)),
        number(|t| t.top1_agreement),
        number(|t| t.max_abs_logit_error),
        number(|t| t.mean_abs_logit_error),
        number(|t| t.kl_mean),
        number(|t| t.kl_max),
    )
}

fn print_list(result: &ModelList, details: bool) {
    if result.models.is_empty() {
        println!("no bundle imported");
    }
    for model in &result.models {
        let name = &model.name;
        if model.unsigned_directory {
            println!("{name}  (unsigned model directory, from models.directory)");
            continue;
        }
        println!(
            "{name}  (highest imported: {})",
            or_dash(model.highest.as_deref())
        );
        for version in &model.versions {
            let mut marks = Vec::new();
            if version.active {
                marks.push("active".to_owned());
            }
            if let Some(percent) = version.canary_percent {
                marks.push(format!("canary {percent}%"));
            }
            if version.previous {
                marks.push("previous".to_owned());
            }
            if version.loaded {
                marks.push("loaded".to_owned());
            }
            println!(
                "  {:<14} {:<10} {:>12} bytes  signed by {} ({})  {}",
                version.version,
                version.task,
                version.bytes,
                version.signer,
                version.signer_id,
                marks.join(", ")
            );
            if details {
                println!("  {:<14} {}", "", check_line(version.check.as_ref()));
            }
        }
    }
}
