//! `moatctl model import|list|activate|canary|promote|rollback|remove` and `moatctl status`:
//! the running moatd's models, over its admin socket. moatd verifies and audits every
//! command; this side sends it and prints the answer.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::{Value, json};

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

/// Sends one request and returns moatd's `result`; moatd's refusal is the error.
fn request(socket: &Path, request: &Value, body: Option<&Source>) -> anyhow::Result<Value> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach moatd's admin socket {}: is moatd running, and are you root or in the moat-admin group?",
            socket.display()
        )
    })?;
    stream.write_all(format!("{request}\n").as_bytes())?;
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
    let answer: Value = serde_json::from_str(&line)
        .with_context(|| format!("moatd's answer is not JSON: {line:?}"))?;
    if let Some(message) = answer.get("error").and_then(Value::as_str) {
        bail!("moatd refused: {message}");
    }
    Ok(answer.get("result").cloned().unwrap_or(Value::Null))
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
            let result = request(
                &socket,
                &json!({"command": "model.import", "size": size, "allow_downgrade": allow_downgrade}),
                Some(&source),
            )?;
            println!(
                "imported {} ({} files, {} bytes, signed by {} key {}, {} golden prompt(s))",
                text(&result["model"]),
                result["files"],
                result["bytes"],
                text(&result["signer"]),
                text(&result["signer_id"]),
                result["golden_prompts"]
            );
            println!(
                "serve it with `moatctl model activate {}`",
                text(&result["model"])
            );
        }
        RolloutCommand::List {
            json,
            details,
            socket,
        } => {
            let result = request(&socket, &json!({"command": "model.list"}), None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                print_list(&result, details);
            }
        }
        RolloutCommand::Activate { model, socket } => {
            let result = request(
                &socket,
                &json!({"command": "model.activate", "model": model}),
                None,
            )?;
            println!(
                "{model} is active (previous: {})",
                text(&result["previous"])
            );
        }
        RolloutCommand::Canary {
            model,
            percent,
            socket,
        } => {
            request(
                &socket,
                &json!({"command": "model.canary", "model": model, "percent": percent}),
                None,
            )?;
            println!("{model} takes {percent}% of the requests");
        }
        RolloutCommand::Promote {
            name,
            force,
            socket,
        } => {
            let result = request(
                &socket,
                &json!({"command": "model.promote", "name": name, "force": force}),
                None,
            )?;
            let evaluation = &result["evaluation"];
            if !evaluation.is_null() {
                println!("canary:  {}", score_line(&evaluation["canary"]));
                println!(
                    "active:  {}  ({})",
                    score_line(&evaluation["active"]),
                    text(&evaluation["active_version"])
                );
                if evaluation["forced"] == Value::Bool(true) {
                    println!("promoted despite the lower score (--force)");
                }
            }
            println!("{} is active", text(&result["model"]));
        }
        RolloutCommand::Eval {
            model,
            json,
            socket,
        } => {
            let result = request(
                &socket,
                &json!({"command": "model.eval", "model": model}),
                None,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                let evaluation = &result["evaluation"];
                println!("{}: {}", text(&result["model"]), score_line(evaluation));
                for failure in evaluation["failures"].as_array().into_iter().flatten() {
                    println!(
                        "  item {}: {:?} answered {:?}",
                        failure["item"],
                        text(&failure["prompt"]),
                        text(&failure["answer"])
                    );
                }
            }
        }
        RolloutCommand::Rollback { name, socket } => {
            let result = request(
                &socket,
                &json!({"command": "model.rollback", "name": name}),
                None,
            )?;
            match result.get("ended_canary") {
                Some(canary) => println!(
                    "canary {} ended; all requests go to the active version",
                    text(canary)
                ),
                None => println!("{} is active again", text(&result["model"])),
            }
        }
        RolloutCommand::Remove { model, socket } => {
            request(
                &socket,
                &json!({"command": "model.remove", "model": model}),
                None,
            )?;
            println!("{model} removed");
        }
    }
    Ok(())
}

/// `moatctl status`.
pub fn status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let result = request(socket, &json!({"command": "status"}), None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    println!(
        "moatd {} on node {}, up {} s",
        text(&result["moatd"]),
        text(&result["node_id"]),
        result["uptime_secs"]
    );
    println!(
        "memory: {} MiB estimated for loaded models (budget: {})",
        result["memory_estimate_mib"],
        match &result["memory_budget_mib"] {
            Value::Null => "what the host has available".to_owned(),
            mib => format!("{mib} MiB"),
        }
    );
    if let Some(models) = result["models"].as_object() {
        if models.is_empty() {
            println!("no model is served: moatctl model import, then moatctl model activate");
        }
        for (name, model) in models {
            let version = match text(&model["active"]).as_str() {
                "" => "(unsigned directory)".to_owned(),
                v => v.to_owned(),
            };
            let mut line = format!("  {name}: {version}");
            if model["healthy"] == Value::Bool(false) {
                line.push_str(" FAILING");
            }
            if let Some(canary) = model["canary"].as_object() {
                line.push_str(&format!(
                    ", canary {} at {}%",
                    text(&canary["version"]),
                    canary["percent"]
                ));
            }
            if let Some(standby) = model["standby"].as_str() {
                line.push_str(&format!(", {standby} loaded for rollback"));
            }
            println!("{line}");
        }
    }
    Ok(())
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// One line of an evaluation's figures.
fn score_line(score: &Value) -> String {
    let number = |v: &Value, digits: usize| {
        v.as_f64()
            .map_or("-".to_owned(), |x| format!("{x:.digits$}"))
    };
    format!(
        "accuracy {} ({}/{}); format validity {}; mean output tokens {}; latency mean {} ms, p95 {} ms",
        number(&score["accuracy"], 3),
        score["correct"],
        score["items"],
        number(&score["format_validity"], 3),
        number(&score["mean_output_tokens"], 1),
        number(&score["latency_ms"]["mean"], 0),
        number(&score["latency_ms"]["p95"], 0),
    )
}

/// One line of `moat-model check` figures for `model list --details`.
fn check_line(check: &Value) -> String {
    if check.is_null() {
        return "check: none in the bundle (moat-model check DIR --against SRC writes one)".into();
    }
    if let Some(file) = check["unreadable"].as_str() {
        return format!("check: {file} is not valid JSON");
    }
    let greedy = &check["greedy"];
    let tf = &check["teacher_forced"];
    let number = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.4}"));
    let passed = match check["passed"].as_bool() {
        Some(true) => "passed",
        Some(false) => "FAILED",
        None => "-",
    };
    format!(
        "check ({}, against {}): {passed}; greedy {}/{} identical; top-1 {}; logit error max {} mean {}; KL mean {} max {}",
        text(&check["variant"]),
        text(&check["against"]),
        text(&greedy["identical_sequences"]),
        text(&greedy["of"]),
        number(&tf["top1_agreement"]),
        number(&tf["max_abs_logit_error"]),
        number(&tf["mean_abs_logit_error"]),
        number(&tf["kl_mean"]),
        number(&tf["kl_max"]),
    )
}

fn print_list(result: &Value, details: bool) {
    let Some(models) = result["models"].as_array() else {
        return;
    };
    if models.is_empty() {
        println!("no bundle imported");
    }
    for model in models {
        let name = text(&model["name"]);
        if model["unsigned_directory"] == Value::Bool(true) {
            println!("{name}  (unsigned model directory, from models.directory)");
            continue;
        }
        println!("{name}  (highest imported: {})", text(&model["highest"]));
        for version in model["versions"].as_array().into_iter().flatten() {
            let mut marks = Vec::new();
            if version["active"] == Value::Bool(true) {
                marks.push("active".to_owned());
            }
            if let Some(percent) = version["canary_percent"].as_u64() {
                marks.push(format!("canary {percent}%"));
            }
            if version["previous"] == Value::Bool(true) {
                marks.push("previous".to_owned());
            }
            if version["loaded"] == Value::Bool(true) {
                marks.push("loaded".to_owned());
            }
            println!(
                "  {:<14} {:<10} {:>12} bytes  signed by {} ({})  {}",
                text(&version["version"]),
                text(&version["task"]),
                version["bytes"],
                text(&version["signer"]),
                text(&version["signer_id"]),
                marks.join(", ")
            );
            if details {
                println!("  {:<14} {}", "", check_line(&version["check"]));
            }
        }
    }
}
