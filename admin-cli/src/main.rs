//! moatctl: administers a moat appliance. It never links ONNX Runtime or the HTTP stack;
//! shared formats come from `moat-core`.

mod audit;
mod bundle;
mod pki;
mod policy;
mod rollout;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use moat_core::ModelMetadata;

#[derive(Debug, Parser)]
#[command(
    name = "moatctl",
    version,
    about = "Administer a moat appliance",
    after_help = "Examples:\n  \
        moatctl model inspect local/models/smollm2-135m-instruct-exact\n  \
        moatctl keys generate --out ml-team\n  \
        moatctl bundle pack local/models/smollm2-135m-instruct-exact --info packaging/bundles/smollm2-135m-instruct.toml --out smollm2.tar\n  \
        moatctl bundle sign smollm2.tar --key ml-team.key\n  \
        moatctl model import smollm2.tar && moatctl model activate smollm2-135m-instruct@1.0.0\n  \
        moatctl status\n  \
        moatctl pki init --dir pki\n  \
        moatctl pki issue-client --dir pki --department finance --name alice\n  \
        moatctl policy validate /etc/moat/policies\n  \
        moatctl audit verify node-a.moat-audit\n\n\
        Each command has its own --help with examples."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Model directories, and the running moatd's model versions (import, activate,
    /// canary, promote, rollback, remove).
    #[command(subcommand)]
    Model(ModelCommand),
    /// What the running moatd serves: versions, canaries, memory.
    #[command(after_help = "Example:\n  moatctl status")]
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/run/moat/admin.sock")]
        socket: PathBuf,
    },
    /// Run a development PKI: CA, client and server certificates, revocation and CRLs.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// Check, test and reload the access policy (Cedar policies and moat-policy.toml).
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Export the audit trail, verify an export, decrypt it for an auditor.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Bundle signing keys for the ML team.
    #[command(subcommand)]
    Keys(bundle::KeysCommand),
    /// Pack, sign and inspect model bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Print a shell completion script to stdout.
    #[command(after_help = "Example:\n  \
        moatctl completions bash > /etc/bash_completion.d/moatctl")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print moatctl's manual page (roff) to stdout, or write one page per command.
    #[command(after_help = "Examples:\n  moatctl man | man -l -\n  \
        moatctl man --dir /usr/share/man/man1")]
    Man {
        /// Write moatctl.1 and a page per subcommand (moatctl-model-import.1, ...) here.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Check a model directory's files and metadata and print what it declares.
    #[command(
        after_help = "Example:\n  moatctl model inspect local/models/smollm2-135m-instruct-fast"
    )]
    Inspect {
        /// Directory holding model.onnx, tokenizer.json and moat-model.json.
        dir: PathBuf,
        /// Print the metadata as JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Rollout(rollout::RolloutCommand),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(e) = e.downcast_ref::<audit::Error>() {
                return ExitCode::from(e.exit_code());
            }
            e.downcast_ref::<policy::Error>()
                .map_or(ExitCode::FAILURE, |e| ExitCode::from(e.exit_code()))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Model(ModelCommand::Inspect { dir, json }) => {
            inspect(&dir, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Model(ModelCommand::Rollout(command)) => {
            rollout::run(command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json, socket } => {
            rollout::status(&socket, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki(command) => {
            for path in pki::run(command)? {
                println!("{}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(command) => Ok(policy::run(command)?),
        Command::Audit(command) => Ok(audit::run(command)?),
        Command::Keys(command) => {
            bundle::keys(command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bundle(command) => bundle::run(command),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            // Into memory first: generating to a closed pipe would panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "moatctl", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            use clap::CommandFactory as _;
            match dir {
                Some(dir) => clap_mangen::generate_to(Cli::command(), &dir)
                    .with_context(|| format!("writing manual pages to {}", dir.display()))?,
                None => {
                    let mut page = Vec::new();
                    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
                    std::io::Write::write_all(&mut std::io::stdout(), &page)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn inspect(dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let mut sizes = Vec::new();
    for file in ["model.onnx", "tokenizer.json", "moat-model.json"] {
        let path = dir.join(file);
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("model file {} is missing", path.display()))?;
        sizes.push((file, meta.len()));
    }
    let path = dir.join("moat-model.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let metadata = ModelMetadata::from_json(&text)
        .with_context(|| format!("model file {} is invalid", path.display()))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(&text)?)?
        );
        return Ok(());
    }
    println!("name:           {}", metadata.name);
    println!(
        "variant:        {}",
        metadata.variant.as_deref().unwrap_or("-")
    );
    println!("architecture:   {}", metadata.architecture);
    println!("I/O contract:   {:?}", metadata.io_contract);
    println!(
        "layers:         {} (KV heads {}, head dim {})",
        metadata.num_layers, metadata.num_kv_heads, metadata.head_dim
    );
    println!("vocabulary:     {}", metadata.vocab_size);
    println!("context:        {} tokens", metadata.context_length);
    println!("EOS ids:        {:?}", metadata.eos_token_ids);
    println!(
        "chat template:  {}",
        if metadata.chat_template.is_some() {
            "yes"
        } else {
            "no"
        }
    );
    for (file, size) in sizes {
        println!("{file:<16}{size} bytes");
    }
    Ok(())
}
