//! `moatctl audit`: export a stopped node's audit store, verify an export, and decrypt it
//! on an auditor's machine.
//!
//! The export format, the chain and its verification are `moat-core`'s, the same code moatd
//! runs; this module reads the store and the files and reports.

/// The exit statuses, shared by `verify` and `decrypt` (and `export`, for a damaged store),
/// as a literal for `concat!`.
macro_rules! exit_codes {
    () => {
        "\
Exit status:
   0  the export verifies
   1  another error (a file cannot be read or written, ...)
   2  usage error
   3  not a moat audit export, an unsupported format version (version 1: unsigned), or an
      invalid node key
   4  the export's node key is not the one given with --node-key
  10  unreadable: a line is not a record, checkpoint or end line, or comes after the end
  11  gap: a record is missing
  12  out_of_order: a record repeats or comes back
  13  broken_link: a record was altered, or spliced in from another chain
  14  bad_signature: a checkpoint (or the anchor) is not signed by the node key
  15  checkpoint_mismatch: a checkpoint names a chain head the records do not reach
  16  truncated: the export was cut short
  17  foreign_checkpoint: a checkpoint of another node
  18  bad_frame: the header and end line do not match the node's signature over them:
      edited (records cut off, the counts, times or range changed to hide it)
  19  older: the export's chain head is older than the one held (--after, --after-head)
  20  forked: at the held head's record the export's chain differs: history rewritten
  21  not_continuous: the export cannot show the held head (it starts after it) or is
      another node's"
    };
}

mod decrypt;
mod export;
mod keygen;
mod listing;
mod live;
mod staged;
mod status;
mod store;
mod verify;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use ed25519_dalek::VerifyingKey;
use indicatif::{ProgressBar, ProgressBarIter, ProgressStyle};
use moat_core::audit::encoding::{hex, unhex};
use moat_core::audit::export::{ContinuityError, ExportError, ExportHeader, read_header};
use moat_core::audit::{ChainPoint, Checkpoint, CheckpointKind, Damage};
use moat_store::audit::ReadError;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub use decrypt::DecryptError;
pub use listing::ListingFormat;
pub use store::StoreError;
pub use verify::Held;

use status::{continuity_code, damage_code, meaning};

/// Where moatd keeps its audit store with the default state directory.
const DEFAULT_STORE: &str = "/var/lib/moat/audit";

/// moatd's audit socket (for members of moat-audit) and admin socket (moat-admin): the
/// first that the caller may use, unless `--socket` names one.
const SOCKETS: [&str; 2] = ["/run/moat/audit.sock", "/run/moat/admin.sock"];

/// The first of [`SOCKETS`] this user may connect to (write permission on the socket file
/// is what connecting takes), or the audit socket, for the error to name.
fn default_socket() -> PathBuf {
    use nix::unistd::{AccessFlags, access};
    let usable = SOCKETS
        .iter()
        .find(|path| access(Path::new(path), AccessFlags::W_OK).is_ok());
    PathBuf::from(usable.unwrap_or(&SOCKETS[0]))
}

/// `moatctl audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Create an auditor's age identity (on the auditor's machine, never the appliance).
    ///
    /// Writes the identity to FILE (mode 0600; an existing file is never overwritten) and
    /// prints its public key, `age1...`, for every node's `[audit] recipients`. Keep the
    /// file offline and backed up: without it no record encrypted to it can be read.
    #[command(
        after_help = "Example:\n  moatctl audit keygen --out ~/moat-auditor.key\n  \
        # then on each node, in /etc/moat/moat.toml:\n  \
        # [audit]\n  # recipients = [\"age1...\", \"age1...(a second auditor)\"]"
    )]
    Keygen {
        /// Where to write the identity.
        #[arg(long)]
        out: PathBuf,
    },
    /// Export the node's audit trail to a file an auditor can verify and decrypt.
    ///
    /// Records stay encrypted to the auditors. A time range is widened back to the latest
    /// checkpoint before it (or the chain's start, or the prune marker of a pruned store),
    /// so that every exported record is vouched for by a signature. The header and end line
    /// are signed with the node key (by moatd, or with --store from the key file), so that
    /// a copy cut short or edited does not verify. The file is written
    /// under a temporary name and renamed into place once complete and synced; the export
    /// is then verified as an auditor would, and damage in the store is reported with the
    /// verify exit status (the file is kept: it is the evidence).
    #[command(after_help = export::HELP)]
    Export {
        /// Export a stopped node's audit store (a sled directory; without a value,
        /// /var/lib/moat/audit) instead of asking the running moatd.
        #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = DEFAULT_STORE)]
        store: Option<PathBuf>,
        /// The running moatd's audit or admin socket (used without --store; default: the
        /// first of /run/moat/audit.sock and /run/moat/admin.sock you may use).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// The export file to write.
        #[arg(long)]
        out: PathBuf,
        /// Only records stored at or after this time (RFC 3339, e.g. 2026-11-29T10:00:00Z).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        since: Option<i64>,
        /// Only records stored at or before this time (RFC 3339).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        until: Option<i64>,
        /// With --store: the node's checkpoint key, which signs the export (default:
        /// audit-signing.key beside the store directory, where moatd keeps it; with the key
        /// in a systemd credential, export through the running moatd instead).
        #[arg(long, value_name = "FILE", requires = "store")]
        signing_key: Option<PathBuf>,
    },
    /// Verify an export: chain, signatures, gaps, order, its signed header and end, and
    /// (with --after) that it extends the chain you hold.
    ///
    /// On success prints what the export covers and the node's chain head when it was
    /// made (keep it, or the file, for the next --after), and warns (without failing) when
    /// the chain went on past the export's last record. On damage names the first bad
    /// record, its line and the kind of damage, and exits with the status of that kind.
    #[command(after_help = verify::HELP)]
    Verify {
        /// The export file.
        #[arg(required_unless_present = "live")]
        file: Option<PathBuf>,
        /// Verify the running moatd's whole trail, fetched over its admin socket.
        #[arg(long, conflicts_with = "file")]
        live: bool,
        /// The running moatd's audit or admin socket (with --live; default as for export).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// The node key you trust for this node (64 hex digits, as `moatctl audit export`
        /// printed it); without it the export's own key is used, which proves only that
        /// the file is consistent.
        #[arg(long, value_name = "HEX", value_parser = parse_node_key)]
        node_key: Option<[u8; 32]>,
        /// An earlier export of this node that you hold: this one must extend its chain
        /// head (the same record there, and a head not older).
        #[arg(long, value_name = "PREVIOUS_EXPORT")]
        after: Option<PathBuf>,
        /// The chain head you hold, as verify printed it (SEQUENCE:HASH): this export must
        /// extend it.
        #[arg(long, value_name = "SEQ:HASH", conflicts_with = "after")]
        after_head: Option<ChainPoint>,
    },
    /// Decrypt a verified export with an auditor's age identity, as JSON lines or CSV.
    ///
    /// The export is verified while it is read, and nothing is presented unless all of it
    /// verifies: with --out the result is written under a temporary name and renamed into
    /// place at the end; to standard output the export is read twice, the first time to
    /// verify and decrypt everything, the second to print. Exits with the verify status on
    /// damage, and 1 if an identity cannot open a record (the record is named).
    #[command(after_help = decrypt::HELP)]
    Decrypt {
        /// The export file.
        file: PathBuf,
        /// An age identity file (AGE-SECRET-KEY-1... lines; # comments allowed).
        #[arg(long, value_name = "KEYFILE")]
        identity: PathBuf,
        /// jsonl: one record a line; csv: a table for a spreadsheet.
        #[arg(long, value_enum)]
        format: ListingFormat,
        /// Where to write the records; default: standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The node key you trust for this node (64 hex digits), as for `verify`.
        #[arg(long, value_name = "HEX", value_parser = parse_node_key)]
        node_key: Option<[u8; 32]>,
    },
}

/// Why an `audit` command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--since` is after `--until`.
    #[error("--since {since} is after --until {until}: the time range holds nothing")]
    EmptyTimeRange { since: String, until: String },
    /// The socket cannot be reached.
    #[error(
        "cannot reach moatd's socket {}: is moatd running, and are you root or in the \
         moat-audit group (audit.sock) or the moat-admin group (admin.sock)? (for a stopped \
         node: --store {DEFAULT_STORE})", .path.display()
    )]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// moatd refused the request.
    #[error("moatd on {} refused: {message}", .path.display())]
    Refused { path: PathBuf, message: String },
    /// The store cannot be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store holds no record in the time range.
    #[error("the audit store in {} holds no record {}", .dir.display(), describe_range(*.since, *.until))]
    NothingToExport {
        dir: PathBuf,
        since: Option<i64>,
        until: Option<i64>,
    },
    /// The node's signing key cannot be read, or is not one.
    #[error(
        "cannot sign the export with the node key {}: {reason}. An export is signed with the \
         key that signs the node's checkpoints; moatd keeps it as audit-signing.key in its state \
         directory (give it with --signing-key), or in a systemd credential: then export \
         through the running moatd (without --store)",
        .path.display()
    )]
    SigningKey { path: PathBuf, reason: String },
    /// An output file cannot be written.
    #[error("cannot write {}", .path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An export cannot be read, or is not one, or is not signed by the trusted key.
    #[error("cannot use {}", .path.display())]
    Export {
        path: PathBuf,
        #[source]
        source: ExportError,
    },
    /// An export is damaged.
    #[error(
        "the export {} is damaged at record {sequence} (line {line}): {}: {}",
        .path.display(), .damage.as_str(), meaning(*.damage)
    )]
    Damaged {
        path: PathBuf,
        line: u64,
        sequence: u64,
        damage: Damage,
    },
    /// An export's chain verifies, its signed header and end do not.
    #[error("the export {} does not verify: line {line}: bad_frame: {problem}", .path.display())]
    Frame {
        path: PathBuf,
        line: u64,
        problem: moat_core::audit::export::FrameProblem,
    },
    /// An export verifies but does not extend the chain head the auditor holds.
    #[error(
        "the export {} verifies, but does not extend the chain held: {}: {source}",
        .path.display(), status::continuity_name(.source)
    )]
    Discontinuous {
        path: PathBuf,
        #[source]
        source: ContinuityError,
    },
    /// An export was written from a damaged store.
    #[error(
        "the export {} was written, but the store it was read from is damaged at record \
         {sequence} (export line {line}): {}: {}; `moatctl audit verify {}` shows the same",
        .out.display(), .damage.as_str(), meaning(*.damage), .out.display()
    )]
    StoreDamaged {
        out: PathBuf,
        line: u64,
        sequence: u64,
        damage: Damage,
    },
    /// A record cannot be decrypted.
    #[error(transparent)]
    Decrypt(#[from] DecryptError),
}

impl Error {
    /// The exit status; see `exit_codes!`.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::EmptyTimeRange { .. } => 2,
            Error::Export { source, .. } => match source {
                ExportError::NotAnExport(_)
                | ExportError::UnsupportedVersion(_)
                | ExportError::UnsignedFrame
                | ExportError::BadNodeKey => 3,
                ExportError::UntrustedKey { .. } => 4,
                ExportError::Damaged { source, .. } => damage_code(source.damage),
                ExportError::Frame { .. } => status::BAD_FRAME,
                ExportError::Discontinuous(source) => continuity_code(source),
                ExportError::Io(_) => 1,
            },
            Error::Damaged { damage, .. } | Error::StoreDamaged { damage, .. } => {
                damage_code(*damage)
            }
            Error::Frame { .. } => status::BAD_FRAME,
            Error::Discontinuous { source, .. } => continuity_code(source),
            Error::Store(StoreError::Read(ReadError::Unreadable { .. })) => {
                damage_code(Damage::Unreadable)
            }
            _ => 1,
        }
    }

    /// `source` met reading the export `path`, located if it is damage.
    fn reading(path: &Path, source: ExportError) -> Self {
        match source {
            ExportError::Damaged { line, source } => Error::Damaged {
                path: path.to_path_buf(),
                line,
                sequence: source.sequence,
                damage: source.damage,
            },
            ExportError::Frame { line, problem } => Error::Frame {
                path: path.to_path_buf(),
                line,
                problem,
            },
            ExportError::Discontinuous(source) => Error::Discontinuous {
                path: path.to_path_buf(),
                source,
            },
            source => Error::Export {
                path: path.to_path_buf(),
                source,
            },
        }
    }
}

/// Runs one `audit` subcommand.
pub fn run(command: AuditCommand) -> Result<ExitCode, Error> {
    match command {
        AuditCommand::Keygen { out } => {
            let recipient = keygen::run(&out)?;
            eprintln!("wrote the identity to {}; its public key:", out.display());
            println!("{recipient}");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export {
            store,
            socket,
            out,
            since,
            until,
            signing_key,
        } => {
            if let (Some(since), Some(until)) = (since, until)
                && since > until
            {
                return Err(Error::EmptyTimeRange {
                    since: format_time(since),
                    until: format_time(until),
                });
            }
            let range = moat_core::audit::export::select::TimeRange {
                since_unix_ms: since,
                until_unix_ms: until,
            };
            match store {
                Some(store) => export::run(&store, signing_key.as_deref(), &out, range),
                None => live::export(&socket.unwrap_or_else(default_socket), &out, range),
            }
        }
        AuditCommand::Verify {
            file,
            live,
            socket,
            node_key,
            after,
            after_head,
        } => {
            let held = after.map(Held::Export).or(after_head.map(Held::Head));
            match file {
                Some(file) if !live => verify::run(&file, node_key, held.as_ref()),
                _ => live::verify(
                    &socket.unwrap_or_else(default_socket),
                    node_key,
                    held.as_ref(),
                ),
            }
        }
        AuditCommand::Decrypt {
            file,
            identity,
            format,
            out,
            node_key,
        } => decrypt::run(&file, &identity, format, out.as_deref(), node_key),
    }
}

/// An export opened for reading: its header, the key to verify it with, and the rest.
#[derive(Debug)]
struct OpenedExport {
    header: ExportHeader,
    key: VerifyingKey,
    input: BufReader<ProgressBarIter<File>>,
}

/// Opens the export `path` and reads its header; checks its node key against `trusted`.
/// The reading advances `bar` by bytes.
fn open_export(
    path: &Path,
    trusted: Option<[u8; 32]>,
    bar: &ProgressBar,
) -> Result<OpenedExport, Error> {
    let failed = |source: ExportError| Error::reading(path, source);
    let file = File::open(path).map_err(|e| failed(ExportError::Io(e)))?;
    if let Ok(meta) = file.metadata() {
        bar.set_length(meta.len());
    }
    let mut input = BufReader::new(bar.wrap_read(file));
    let header = read_header(&mut input).map_err(failed)?;
    if let Some(trusted) = trusted.filter(|t| *t != header.node_key) {
        return Err(failed(ExportError::UntrustedKey {
            expected: hex(&trusted),
            found: hex(&header.node_key),
        }));
    }
    let key = header.verifying_key().map_err(failed)?;
    Ok(OpenedExport { header, key, input })
}

/// A progress bar on standard error (hidden when it is not a terminal).
pub(crate) fn progress_bar(message: &'static str, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(0).with_message(message);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// A progress bar over the bytes of a file.
pub(crate) fn bytes_bar(message: &'static str) -> ProgressBar {
    progress_bar(
        message,
        "{msg} [{bar:40}] {bytes}/{total_bytes} ({eta} left)",
    )
}

/// An RFC 3339 date-time as milliseconds since the Unix epoch.
fn parse_time(text: &str) -> Result<i64, String> {
    let time = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("not an RFC 3339 date-time such as 2026-11-29T10:00:00Z ({e})"))?;
    i64::try_from(time.unix_timestamp_nanos() / 1_000_000).map_err(|e| e.to_string())
}

/// A node key: 64 hex digits.
fn parse_node_key(text: &str) -> Result<[u8; 32], String> {
    unhex::<32>(text.trim())
        .ok_or_else(|| "a node key is 64 hex digits, as `moatctl audit export` prints it".into())
}

/// Milliseconds since the Unix epoch as ISO 8601 UTC with milliseconds
/// (`2026-11-29T10:00:00.000Z`), or the number where no date fits.
fn format_time(unix_ms: i64) -> String {
    const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|time| time.format(FORMAT).ok())
        .unwrap_or_else(|| unix_ms.to_string())
}

/// `in the time range A to B` for messages.
fn describe_range(since: Option<i64>, until: Option<i64>) -> String {
    match (since, until) {
        (None, None) => "at all".into(),
        (Some(since), None) => format!("stored at or after {}", format_time(since)),
        (None, Some(until)) => format!("stored at or before {}", format_time(until)),
        (Some(since), Some(until)) => format!(
            "stored from {} to {}",
            format_time(since),
            format_time(until)
        ),
    }
}

/// What an export continues from, in words.
fn describe_anchor(anchor: Option<&Checkpoint>) -> String {
    let Some(anchor) = anchor else {
        return "the chain's first record".into();
    };
    let signed = format_time(anchor.unix_time.saturating_mul(1000));
    match anchor.kind {
        CheckpointKind::Checkpoint => {
            format!(
                "the checkpoint at record {}, signed {signed}",
                anchor.sequence
            )
        }
        CheckpointKind::Prune => format!(
            "the prune marker at record {}, signed {signed} (records up to it were pruned)",
            anchor.sequence
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_from_rfc_3339_and_print_as_utc_with_milliseconds() {
        let ms = parse_time("2026-11-29T11:00:00.25+01:00").expect("parses");
        assert_eq!(format_time(ms), "2026-11-29T10:00:00.250Z");
        assert!(parse_time("2026-11-29 10:00").is_err());
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn node_keys_are_64_hex_digits() {
        assert_eq!(parse_node_key(&"ab".repeat(32)), Ok([0xab; 32]));
        assert!(parse_node_key("abcd").is_err());
    }
}
