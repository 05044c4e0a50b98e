//! `moatctl audit export --store DIR`: a stopped node's store to an export file, signed
//! with the node's key read from where moatd keeps it (or `--signing-key`).
//!
//! The export's frame must be signed by the node key, so an offline export needs it: root
//! (or moatd's user) can read `audit-signing.key` in the state directory. A node whose key
//! is a systemd credential exports through the running moatd, which holds it.

use std::io::{BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ed25519_dalek::SigningKey;
use moat_core::audit::encoding::{decode_signing_key, hex};
use moat_core::audit::export::select::TimeRange;
use moat_core::audit::export::source::{self, ExportProgress, Exported, WriteExportError};
use moat_core::audit::export::{ExportError, ExportHeader, VerifiedExport};
use moat_core::audit::layout::SIGNING_KEY_FILE;
use moat_store::audit::AuditReader;
use moat_store::time::now_unix_ms;

use super::staged::StagedFile;
use super::store::{StoreError, open_stopped};
use super::{Error, describe_anchor, describe_range, format_time, progress_bar};

pub const HELP: &str = concat!(
    "Examples:
  # moatd stopped; its state directory is /var/lib/moat
  moatctl audit export --store /var/lib/moat/audit --out node-a.moat-audit
  moatctl audit export --store /var/lib/moat/audit --out november.moat-audit \\
      --since 2026-11-01T00:00:00Z --until 2026-11-30T23:59:59Z
  # the node key in a systemd credential rather than /var/lib/moat/audit-signing.key:
  systemd-creds decrypt /etc/credstore.encrypted/moat-audit-signing-key - | \\
      moatctl audit export --store /var/lib/moat/audit --signing-key /dev/stdin --out a.moat-audit

The export is signed with the node's checkpoint key (its header and end line), so that a
copy cut short or edited does not verify; reading the key takes root or moatd's user.

The summary names the node key (hex): give it to the auditor through another channel, who
checks the file with `moatctl audit verify FILE --node-key HEX`.

",
    exit_codes!(),
    "

Export exits 10 if a value in the store cannot be read at all, and with the status of the
damage if the written export does not verify."
);

/// Exports `range` of the store in `dir` to `out`, signed with the key in `signing_key`
/// (default: [`SIGNING_KEY_FILE`] beside the store).
pub fn run(
    dir: &Path,
    signing_key: Option<&Path>,
    out: &Path,
    range: TimeRange,
) -> Result<ExitCode, Error> {
    let store = open_stopped(dir)?;
    let key_path = signing_key.map_or_else(|| default_signing_key(dir), Path::to_path_buf);
    let key = read_signing_key(&key_path)?;
    let output_error = |source| Error::Output {
        path: out.to_path_buf(),
        source,
    };
    let mut staged = StagedFile::create(out).map_err(output_error)?;
    let exported = write_export(&store, range, (&key_path, &key), &mut staged)?;
    let verdict = verify_written(&staged, out);
    staged.commit().map_err(output_error)?;
    print_summary(out, &exported, range);
    verdict.map(|_| ExitCode::SUCCESS)
}

/// Where moatd keeps the node key of the store in `dir`: beside it, in the state directory.
fn default_signing_key(dir: &Path) -> PathBuf {
    let state = dir.parent().filter(|p| !p.as_os_str().is_empty());
    state.unwrap_or(Path::new(".")).join(SIGNING_KEY_FILE)
}

/// The node's signing key in `path`, as moatd writes it (64 hex digits) or 32 raw bytes.
fn read_signing_key(path: &Path) -> Result<SigningKey, Error> {
    let failed = |reason: String| Error::SigningKey {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
    decode_signing_key(&bytes)
        .ok_or_else(|| failed("it is not an ed25519 key (64 hex digits or 32 bytes)".into()))
}

/// Selects what to export of `range` and writes it to `staged`, signed with `key` (read
/// from the file named with it), with progress bars.
fn write_export(
    store: &AuditReader,
    range: TimeRange,
    (key_path, key): (&Path, &SigningKey),
    staged: &mut StagedFile,
) -> Result<Exported, Error> {
    let scanning = progress_bar("scanning", "{msg} {pos} records {spinner}");
    let writing = progress_bar(
        "exporting",
        "{msg} [{bar:40}] {pos}/{len} records ({eta} left)",
    );
    let temp_path = staged.temp_path().to_path_buf();
    let written = source::write_export(
        store,
        range,
        now_unix_ms(),
        key,
        BufWriter::new(staged.file()),
        &mut |progress| match progress {
            ExportProgress::Scanned => scanning.inc(1),
            ExportProgress::Selected(records) => {
                scanning.finish_and_clear();
                writing.set_length(records);
            }
            ExportProgress::Written => writing.inc(1),
        },
    );
    let write_error = |source| Error::Output {
        path: temp_path.clone(),
        source,
    };
    let (exported, mut buffered) = match written {
        Ok(written) => written,
        Err(WriteExportError::Source(e)) => return Err(StoreError::Read(e).into()),
        Err(WriteExportError::Empty) => {
            return Err(Error::NothingToExport {
                dir: store.dir().to_path_buf(),
                since: range.since_unix_ms,
                until: range.until_unix_ms,
            });
        }
        Err(WriteExportError::Write(e)) => return Err(write_error(e)),
        Err(e @ WriteExportError::WrongKey { .. }) => {
            return Err(Error::SigningKey {
                path: key_path.to_path_buf(),
                reason: e.to_string(),
            });
        }
    };
    buffered.flush().map_err(write_error)?;
    writing.finish_and_clear();
    Ok(exported)
}

/// Verifies the written export (for `out`) as an auditor will: damage in the store shows
/// here, reported with the verify exit status. Returns the header and the verdict.
pub(super) fn verify_written(
    staged: &StagedFile,
    out: &Path,
) -> Result<(ExportHeader, VerifiedExport), Error> {
    use moat_core::audit::export::{ExportReader, read_header};
    let verified = (|| {
        let mut input = std::io::BufReader::new(std::fs::File::open(staged.temp_path())?);
        let header = read_header(&mut input)?;
        let key = header.verifying_key()?;
        let verified = ExportReader::new(input, header.clone(), &key)?.finish()?;
        Ok((header, verified))
    })();
    verified.map_err(|source| match source {
        ExportError::Damaged { line, source } => Error::StoreDamaged {
            out: out.to_path_buf(),
            line,
            sequence: source.sequence,
            damage: source.damage,
        },
        source => Error::Export {
            path: out.to_path_buf(),
            source,
        },
    })
}

fn print_summary(out: &Path, exported: &Exported, range: TimeRange) {
    let sequences = exported.selection.sequences();
    println!(
        "exported {} record(s) and {} checkpoint(s) to {}",
        exported.end.records,
        exported.end.checkpoints,
        out.display()
    );
    println!("  node id:         {}", exported.node.node_id);
    println!("  node key:        {}", hex(&exported.node.public_key));
    println!(
        "  records:         sequence {} to {}",
        sequences.start(),
        sequences.end()
    );
    if let Some((first, last)) = exported.stored {
        println!(
            "  stored:          {} to {}",
            format_time(first),
            format_time(last)
        );
    }
    if range != TimeRange::default() {
        println!(
            "  asked:           records {}",
            describe_range(range.since_unix_ms, range.until_unix_ms)
        );
    }
    println!(
        "  continues from:  {}",
        describe_anchor(exported.anchor.as_ref())
    );
    println!(
        "Give the auditor the node key through another channel than the file: \
         `moatctl audit verify {} --node-key {}`",
        out.display(),
        hex(&exported.node.public_key)
    );
}
