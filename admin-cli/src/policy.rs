//! `moatctl policy`: check a policy directory before moatd loads it, test it against
//! requests with known answers, and ask a running moatd to reload it.
//!
//! The evaluation is `moat-core`'s, the same code moatd runs; this module reads the files
//! and reports.

mod cases;
mod reload;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use moat_core::policy::AccessPolicy;
use moat_core::policy::content::ContentAction;
use moat_core::policy::data::PolicyData;
use time::OffsetDateTime;

use cases::CasesError;
use moat_store::policy::{PolicyFiles, ReadError};
use reload::ReloadError;

const TEST_HELP: &str = "\
The cases file holds [[case]] tables; unknown fields are refused:
  name           label printed for the case (default: \"case N\")
  department     the client certificate's department (required)
  subject        the client certificate's subject (default: \"tester\")
  action         chat | complete | embed | list_models (required)
  model          the model asked (required, except for list_models)
  task           text-generation | embedding (default: embedding for embed, else
                 text-generation)
  classification the X-Moat-Classification header (default: none stated)
  source_ip      the client's address (default: 127.0.0.1)
  time           RFC 3339 date-time, for context.hour and context.weekday (default: now)
  prompt         text scanned by the content rules (default: \"\")
  prompt_tokens  (default: 0)
  max_tokens     (default: 0)
  expect         the reason code: allow, deny.no_permit, deny.forbidden, deny.classification,
                 deny.unknown_classification, or content.<detector> (required)

Per-department limits (limit.*) hold state across requests and are not evaluated here.

Exit status: 0 if every case passes, 1 if one fails or the policy is invalid, 2 if the
cases file cannot be read or is invalid.

Example:
  cat > cases.toml <<'EOF'
  [[case]]
  name = \"finance chats with its model\"
  department = \"finance\"
  action = \"chat\"
  model = \"finance-model\"
  classification = \"confidential\"
  expect = \"allow\"

  [[case]]
  name = \"card numbers are refused\"
  department = \"finance\"
  action = \"chat\"
  model = \"finance-model\"
  prompt = \"refund card 4111 1111 1111 1111\"
  expect = \"content.card_number\"
  EOF
  moatctl policy test /etc/moat/policies --cases cases.toml";

const RELOAD_HELP: &str = "\
Exit status: 0 once moatd is signalled; 1 if it is not running or the pid file does not lead
to it (no pid file, a file nobody holds, a file others could write, a process that is not
moatd or not its owner's), and nothing is signalled.

Example:
  moatctl policy validate /etc/moat/policies && moatctl policy reload
  moatctl policy reload --pid-file /run/moat-test/moatd.pid";

/// `moatctl policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy directory as moatd would load it, and summarise it.
    ///
    /// Reads schema.cedarschema, every *.cedar file (in name order) and moat-policy.toml,
    /// validates the policies against the schema and checks the data and content rules.
    /// Every problem is printed, as FILE:LINE:COLUMN: MESSAGE where the position is known;
    /// the exit status is 1 if there is any.
    #[command(after_help = "Example:\n  moatctl policy validate /etc/moat/policies")]
    Validate {
        /// The policy directory.
        dir: PathBuf,
    },
    /// Decide test requests with a policy directory and compare with the expected reasons.
    ///
    /// Each case's prompt is scanned by the content rules, then the request is decided as
    /// moatd decides it. One line per case: PASS or FAIL, its name, the expected and the
    /// decided reason code and the Cedar policies that decided.
    #[command(after_help = TEST_HELP)]
    Test {
        /// The policy directory.
        dir: PathBuf,
        /// TOML file of [[case]] tables.
        #[arg(long)]
        cases: PathBuf,
    },
    /// Ask the running moatd to reload its policy directory (sends it SIGHUP).
    ///
    /// moatd reads and validates the directory again and puts it in force only if it is
    /// valid; an invalid policy is refused and logged, and the old one stays in force. Run
    /// `moatctl policy validate DIR` first, then check moatd's log for "policy reloaded" or
    /// "policy reload REFUSED".
    ///
    /// moatd is found by its pid file, never by process name: the signal goes only to the
    /// process that holds the file's lock, if the file names it, it is moatd and it runs as
    /// the file's owner. Under systemd, `systemctl reload moat` does the same.
    #[command(after_help = RELOAD_HELP)]
    Reload {
        /// moatd's pid file: [admin] pid_file in moat.toml, or moatd.pid beside
        /// [admin] socket where that is unset.
        #[arg(long, env = "MOAT_PID_FILE", default_value = reload::DEFAULT_PID_FILE)]
        pid_file: PathBuf,
    },
}

/// Why a `policy` command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The policy directory cannot be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The policy was read but cannot be loaded; every problem.
    #[error("the policy in {} is invalid, {} problem(s):\n{}", .dir.display(), .problems.len(), .problems.join("\n"))]
    Invalid { dir: PathBuf, problems: Vec<String> },
    /// The cases file cannot be read.
    #[error("cannot read the cases file {}", .path.display())]
    CasesRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The cases file does not describe test cases.
    #[error("the cases file {} is invalid", .path.display())]
    Cases {
        path: PathBuf,
        #[source]
        source: CasesError,
    },
    /// moatd could not be signalled.
    #[error(transparent)]
    Reload(#[from] ReloadError),
}

impl Error {
    /// The exit status: 2 for a cases file that cannot be used, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::CasesRead { .. } | Error::Cases { .. } => 2,
            _ => 1,
        }
    }
}

/// Runs one `policy` subcommand; returns the exit status of a run that completed.
pub fn run(command: PolicyCommand) -> Result<ExitCode, Error> {
    match command {
        PolicyCommand::Validate { dir } => {
            let policy = load(&dir)?;
            println!("policy in {} is valid", dir.display());
            print!("{}", summary(&policy));
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Test { dir, cases } => test(&dir, &cases),
        PolicyCommand::Reload { pid_file } => {
            signal_daemon(&pid_file)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Reads and loads a policy directory.
fn load(dir: &Path) -> Result<AccessPolicy, Error> {
    let files = PolicyFiles::read(dir)?;
    AccessPolicy::load(&files.source()).map_err(|e| Error::Invalid {
        dir: dir.to_path_buf(),
        problems: e.problems,
    })
}

/// What a loaded policy holds, one item a line.
fn summary(policy: &AccessPolicy) -> String {
    let data = policy.data();
    let mut out = String::from("  policies:\n");
    for (file, count) in &policy.counts {
        out.push_str(&format!("    {file}: {count}\n"));
    }
    out.push_str(&format!(
        "  classification: {} (lowest first)\n",
        data.classification.join(" < ")
    ));
    let rules: Vec<String> = data
        .content
        .iter()
        .map(|rule| {
            let name = rule.name.as_deref().unwrap_or(&rule.detector);
            format!("{name}: {}", action_name(rule.action))
        })
        .collect();
    out.push_str(&format!(
        "  content rules: {}{}\n",
        rules.len(),
        listed(&rules)
    ));
    let departments = ceilings(data, data.departments.iter().map(|(n, d)| (n, &d.ceiling)));
    let models = ceilings(data, data.models.iter().map(|(n, m)| (n, &m.ceiling)));
    out.push_str(&format!(
        "  departments with their own rules: {departments}\n"
    ));
    out.push_str(&format!("  models with their own rules: {models}\n"));
    out
}

/// An action as `moat-policy.toml` spells it.
fn action_name(action: ContentAction) -> &'static str {
    match action {
        ContentAction::Allow => "allow",
        ContentAction::Redact => "redact",
        ContentAction::RedactInAudit => "redact_in_audit",
        ContentAction::Deny => "deny",
    }
}

/// `" (a, b)"`, or nothing for no items.
fn listed(items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(" ({})", items.join(", "))
    }
}

/// `name (ceiling LABEL), …` or `none`.
fn ceilings<'a>(
    data: &PolicyData,
    named: impl Iterator<Item = (&'a String, &'a Option<String>)>,
) -> String {
    let items: Vec<String> = named
        .map(|(name, ceiling)| {
            let ceiling = ceiling.as_deref().unwrap_or(data.lowest());
            format!("{name} (ceiling {ceiling})")
        })
        .collect();
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// `policy test`: every case, one line each, then the count.
fn test(dir: &Path, cases_path: &Path) -> Result<ExitCode, Error> {
    let text = std::fs::read_to_string(cases_path).map_err(|source| Error::CasesRead {
        path: cases_path.to_path_buf(),
        source,
    })?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let cases = cases::parse(&text, now).map_err(|source| Error::Cases {
        path: cases_path.to_path_buf(),
        source,
    })?;
    let policy = load(dir)?;
    let mut failed = 0;
    for case in &cases {
        let result = case.evaluate(&policy);
        let passed = result.got == case.expect;
        if !passed {
            failed += 1;
        }
        println!(
            "{} {}: expected {}, got {}{}",
            if passed { "PASS" } else { "FAIL" },
            case.name,
            case.expect,
            result.got,
            listed(&result.policies)
        );
    }
    println!(
        "{} case(s): {} passed, {failed} failed",
        cases.len(),
        cases.len() - failed
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `policy reload`: SIGHUP to the moatd holding `pid_file`.
fn signal_daemon(pid_file: &Path) -> Result<(), Error> {
    let pid = reload::reload(pid_file, Path::new("/proc"))?;
    println!(
        "sent SIGHUP to {} (pid {}, from {}): it re-reads its policy directory and puts it \
         in force only if it is valid.",
        reload::DAEMON_NAME,
        pid,
        pid_file.display()
    );
    println!(
        "Check moatd's log for \"policy reloaded\" (in force) or \"policy reload REFUSED\" \
         (the old policy stays; `moatctl policy validate DIR` shows why)."
    );
    Ok(())
}
