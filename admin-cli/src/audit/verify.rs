//! `moatctl audit verify`: an export's chain, signatures and end, and what it covers.

use std::path::Path;
use std::process::ExitCode;

use moat_core::audit::VerifiedChain;
use moat_core::audit::encoding::hex;
use moat_core::audit::export::{ExportHeader, ExportReader};

use super::{Error, OpenedExport, bytes_bar, describe_anchor, format_time, open_export};

pub const HELP: &str = concat!(
    "Examples:
  moatctl audit verify node-a.moat-audit
  moatctl audit verify node-a.moat-audit \\
      --node-key 3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29

Without --node-key the file is checked against the key in its own header, which proves it is
consistent, not that it comes from the node: compare the printed node key with the one the
node's operator gave you, or pin it with --node-key.

",
    exit_codes!()
);

/// How much older than the export its last checkpoint may be before a warning.
const STALE_CHECKPOINT_MS: i64 = 60_000;

/// What an export holds besides the verdict: its header and its stored times.
#[derive(Debug)]
struct Covered {
    header: ExportHeader,
    /// The stored times of the first and the last record.
    stored: Option<(i64, i64)>,
}

/// Verifies the export `file`, against the node key `trusted` if given.
pub fn run(file: &Path, trusted: Option<[u8; 32]>) -> Result<ExitCode, Error> {
    let bar = bytes_bar("verifying");
    let OpenedExport { header, key, input } = open_export(file, trusted, &bar)?;
    let failed = |source| Error::reading(file, source);
    let mut reader = ExportReader::new(input, header.clone(), &key).map_err(failed)?;
    let mut stored: Option<(i64, i64)> = None;
    while let Some(entry) = reader.next_record().map_err(failed)? {
        stored = Some(stored.map_or((entry.unix_ms, entry.unix_ms), |(first, _)| {
            (first, entry.unix_ms)
        }));
    }
    let verified = reader.finish().map_err(failed)?;
    bar.finish_and_clear();
    let covered = Covered { header, stored };
    print!("{}", summary(file, &covered, &verified, trusted.is_some()));
    for warning in warnings(&covered, &verified) {
        eprintln!("warning: {warning}");
    }
    Ok(ExitCode::SUCCESS)
}

/// What a verified export covers, one item a line.
fn summary(file: &Path, covered: &Covered, verified: &VerifiedChain, pinned: bool) -> String {
    let header = &covered.header;
    let mut out = format!("the export {} verifies\n", file.display());
    out.push_str(&format!("  node id:          {}\n", header.node_id));
    out.push_str(&format!(
        "  node key:         {}{}\n",
        hex(&header.node_key),
        if pinned {
            " (the key given)"
        } else {
            " (from the file: compare it with the node's)"
        }
    ));
    out.push_str(&format!(
        "  continues from:   {}\n",
        describe_anchor(header.anchor.as_ref())
    ));
    match (verified.first, verified.last) {
        (Some(first), Some(last)) => out.push_str(&format!(
            "  records:          {}, sequence {first} to {last}\n",
            verified.records
        )),
        _ => out.push_str("  records:          none\n"),
    }
    if let Some((first, last)) = covered.stored {
        out.push_str(&format!(
            "  stored:           {} to {}\n",
            format_time(first),
            format_time(last)
        ));
    }
    out.push_str(&format!("  checkpoints:      {}\n", verified.checkpoints));
    match verified.last_checkpoint {
        Some((sequence, unix_time)) => out.push_str(&format!(
            "  last checkpoint:  record {sequence}, signed {}\n",
            format_time(unix_time.saturating_mul(1000))
        )),
        None => out.push_str("  last checkpoint:  none\n"),
    }
    out.push_str(&format!(
        "  unsigned tail:    {} record(s)\n",
        verified.unsigned_tail
    ));
    out.push_str(&format!(
        "  created:          {}\n",
        format_time(header.created_unix_ms)
    ));
    out
}

/// What verifies but deserves the auditor's attention.
fn warnings(covered: &Covered, verified: &VerifiedChain) -> Vec<String> {
    let header = &covered.header;
    let mut warnings = Vec::new();
    let ranged = if header.until_unix_ms.is_some() {
        " The export was asked to end at a time, so records after it are not expected in it."
    } else {
        ""
    };
    if verified.unsigned_tail > 0 {
        warnings.push(format!(
            "the last {} record(s) follow the last checkpoint: the chain shows them intact, but \
             no signature vouches for them, so records after them could have been cut off \
             unnoticed.{ranged}",
            verified.unsigned_tail
        ));
    }
    if let Some((sequence, unix_time)) = verified.last_checkpoint
        && unix_time.saturating_mul(1000) < header.created_unix_ms - STALE_CHECKPOINT_MS
    {
        warnings.push(format!(
            "the last checkpoint (record {sequence}) was signed at {}, more than a minute before \
             the export was created ({}): moatd signs one at every export and when it stops, so \
             records after it may be missing, unless the node stopped then.{ranged}",
            format_time(unix_time.saturating_mul(1000)),
            format_time(header.created_unix_ms)
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(created_unix_ms: i64, until: Option<i64>) -> Covered {
        Covered {
            header: ExportHeader {
                moat_audit_export: 1,
                node_id: "node-a".into(),
                node_key: [7; 32],
                anchor: None,
                created_unix_ms,
                since_unix_ms: None,
                until_unix_ms: until,
            },
            stored: Some((1_000, 2_000)),
        }
    }

    fn verified(unsigned_tail: usize, last_checkpoint: Option<(u64, i64)>) -> VerifiedChain {
        VerifiedChain {
            first: Some(0),
            last: Some(9),
            records: 10,
            checkpoints: 2,
            unsigned_tail,
            last_checkpoint,
        }
    }

    #[test]
    fn a_fresh_fully_signed_export_has_no_warning() {
        let warnings = warnings(&covered(100_000, None), &verified(0, Some((9, 90))));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn an_unsigned_tail_and_a_stale_checkpoint_are_warned_about() {
        let warnings = warnings(&covered(200_000, None), &verified(3, Some((6, 100))));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].starts_with("the last 3 record(s) follow the last checkpoint"));
        assert!(warnings[1].contains("more than a minute before"));
        let ranged = super::warnings(&covered(200_000, Some(5)), &verified(3, Some((6, 100))));
        assert!(ranged[0].contains("asked to end at a time"));
    }

    #[test]
    fn the_summary_names_node_key_range_and_last_checkpoint() {
        let text = summary(
            Path::new("x.moat-audit"),
            &covered(100_000, None),
            &verified(0, Some((9, 90))),
            false,
        );
        assert!(text.contains(&format!("node key:         {}", "07".repeat(32))));
        assert!(text.contains("records:          10, sequence 0 to 9"));
        assert!(text.contains("last checkpoint:  record 9, signed 1970-01-01T00:01:30.000Z"));
        assert!(text.contains("unsigned tail:    0 record(s)"));
    }
}
