//! `moatctl audit export --store DIR`: a stopped node's store to an export file.

use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::process::ExitCode;

use moat_core::audit::VerifiedChain;
use moat_core::audit::encoding::hex;
use moat_core::audit::export::select::TimeRange;
use moat_core::audit::export::source::{self, ExportProgress, Exported, WriteExportError};
use moat_core::audit::export::{ExportError, ExportHeader};

use super::staged::StagedFile;
use super::store::StoppedStore;
use super::{Error, describe_anchor, describe_range, format_time, now_unix_ms, progress_bar};

pub const HELP: &str = concat!(
    "Examples:
  # moatd stopped; its state directory is /var/lib/moat
  moatctl audit export --store /var/lib/moat/audit --out node-a.moat-audit
  moatctl audit export --store /var/lib/moat/audit --out november.moat-audit \\
      --since 2026-11-01T00:00:00Z --until 2026-11-30T23:59:59Z

The summary names the node key (hex): give it to the auditor through another channel, who
checks the file with `moatctl audit verify FILE --node-key HEX`.

",
    exit_codes!(),
    "

Export exits 10 if a value in the store cannot be read at all, and with the status of the
damage if the written export does not verify."
);

/// Exports the store in `dir` to `out`.
pub fn run(
    dir: &Path,
    out: &Path,
    since: Option<i64>,
    until: Option<i64>,
) -> Result<ExitCode, Error> {
    let store = StoppedStore::open(dir)?;
    let range = TimeRange {
        since_unix_ms: since,
        until_unix_ms: until,
    };
    let output_error = |source| Error::Output {
        path: out.to_path_buf(),
        source,
    };
    let mut staged = StagedFile::create(out).map_err(output_error)?;
    let exported = write_export(&store, range, &mut staged)?;
    let verdict = verify_written(&staged, out);
    staged.commit().map_err(output_error)?;
    print_summary(out, &exported, range);
    verdict.map(|_| ExitCode::SUCCESS)
}

/// Selects what to export of `range` and writes it to `staged`, with progress bars.
fn write_export(
    store: &StoppedStore,
    range: TimeRange,
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
        Err(WriteExportError::Source(e)) => return Err(e.into()),
        Err(WriteExportError::Empty) => {
            return Err(Error::NothingToExport {
                dir: store.dir().to_path_buf(),
                since: range.since_unix_ms,
                until: range.until_unix_ms,
            });
        }
        Err(WriteExportError::Write(e)) => return Err(write_error(e)),
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
) -> Result<(ExportHeader, VerifiedChain), Error> {
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
