//! `moatctl audit export --store DIR`: a stopped node's store to an export file.

use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::process::ExitCode;

use moat_core::audit::encoding::hex;
use moat_core::audit::export::select::{
    AnchorPoint, ExportItem, ExportSelection, TimeRange, in_export_order, select,
};
use moat_core::audit::export::{
    EXPORT_VERSION, ExportEnd, ExportError, ExportHeader, ExportWriter,
};
use moat_core::audit::layout::NodeInfo;
use moat_core::audit::{Checkpoint, VerifiedChain};

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

/// What was exported.
#[derive(Debug)]
struct Exported {
    node: NodeInfo,
    selection: ExportSelection,
    anchor: Option<Checkpoint>,
    end: ExportEnd,
    /// The stored times of the first and last exported record.
    stored: Option<(i64, i64)>,
}

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
    let verdict = verify_written(&staged);
    staged.commit().map_err(output_error)?;
    print_summary(out, &exported, range);
    match verdict {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(ExportError::Damaged { line, source }) => Err(Error::StoreDamaged {
            out: out.to_path_buf(),
            line,
            sequence: source.sequence,
            damage: source.damage,
        }),
        Err(source) => Err(Error::Export {
            path: out.to_path_buf(),
            source,
        }),
    }
}

/// Selects what to export of `range` and writes it to `staged`.
fn write_export(
    store: &StoppedStore,
    range: TimeRange,
    staged: &mut StagedFile,
) -> Result<Exported, Error> {
    let node = store.node()?;
    let prune = store.prune_marker()?;
    let scanning = progress_bar("scanning", "{msg} {pos} records {spinner}");
    let times = store.record_times(|| scanning.inc(1))?;
    scanning.finish_and_clear();
    let selection = select(
        range,
        times.iter().copied(),
        store.checkpoint_sequences()?,
        prune.as_ref().map(|marker| marker.sequence),
    )
    .ok_or_else(|| Error::NothingToExport {
        dir: store.dir().to_path_buf(),
        since: range.since_unix_ms,
        until: range.until_unix_ms,
    })?;
    let anchor = match selection.anchor {
        AnchorPoint::ChainStart => None,
        AnchorPoint::Checkpoint(sequence) => Some(store.checkpoint(sequence)?),
        AnchorPoint::Prune(_) => prune,
    };
    let header = ExportHeader {
        moat_audit_export: EXPORT_VERSION,
        node_id: node.node_id.clone(),
        node_key: node.public_key,
        anchor: anchor.clone(),
        created_unix_ms: now_unix_ms(),
        since_unix_ms: range.since_unix_ms,
        until_unix_ms: range.until_unix_ms,
    };
    let sequences = selection.sequences();
    let bar = progress_bar(
        "exporting",
        "{msg} [{bar:40}] {pos}/{len} records ({eta} left)",
    );
    bar.set_length(sequences.end() - sequences.start() + 1);
    let temp_path = staged.temp_path().to_path_buf();
    let write_error = |source| Error::Output {
        path: temp_path.clone(),
        source,
    };
    let mut writer =
        ExportWriter::new(BufWriter::new(staged.file()), &header).map_err(write_error)?;
    let mut stored: Option<(i64, i64)> = None;
    let items = in_export_order(
        store.records(sequences.clone()),
        store.checkpoints(sequences),
    );
    for item in items {
        match item? {
            ExportItem::Record(entry) => {
                writer.record(&entry).map_err(write_error)?;
                stored = Some(stored.map_or((entry.unix_ms, entry.unix_ms), |(first, _)| {
                    (first, entry.unix_ms)
                }));
                bar.inc(1);
            }
            ExportItem::Checkpoint(checkpoint) => {
                writer.checkpoint(&checkpoint).map_err(write_error)?
            }
        }
    }
    let (mut buffered, end) = writer.finish().map_err(write_error)?;
    buffered.flush().map_err(write_error)?;
    bar.finish_and_clear();
    Ok(Exported {
        node,
        selection,
        anchor,
        end,
        stored,
    })
}

/// Verifies the written export as an auditor will: damage in the store shows here.
fn verify_written(staged: &StagedFile) -> Result<VerifiedChain, ExportError> {
    use moat_core::audit::export::{ExportReader, read_header};
    let mut input = std::io::BufReader::new(std::fs::File::open(staged.temp_path())?);
    let header = read_header(&mut input)?;
    let key = header.verifying_key()?;
    ExportReader::new(input, header, &key)?.finish()
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
