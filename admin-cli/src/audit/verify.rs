//! `moatctl audit verify`: an export's chain, signatures and signed frame, what it covers,
//! and, with `--after`, that it extends the chain head the auditor already holds.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use moat_core::audit::ChainPoint;
use moat_core::audit::encoding::hex;
use moat_core::audit::export::{ExportHeader, ExportReader, HeldHead, VerifiedExport};

use super::{Error, OpenedExport, bytes_bar, describe_anchor, format_time, open_export};

pub const HELP: &str = concat!(
    "Examples:
  moatctl audit verify node-a.moat-audit
  moatctl audit verify node-a.moat-audit \\
      --node-key 3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29
  # the node's next export must extend the one you hold:
  moatctl audit verify node-a-december.moat-audit --node-key 3b6a...da29 \\
      --after node-a-november.moat-audit
  moatctl audit verify node-a-december.moat-audit --node-key 3b6a...da29 \\
      --after-head 1841:5f0c...9e2a

Without --node-key the file is checked against the key in its own header, which proves it is
consistent, not that it comes from the node: compare the printed node key with the one the
node's operator gave you, or pin it with --node-key.

Whoever holds the node key (root on the node) can rewrite history no auditor holds yet and
sign it again; such an export verifies on its own. Keep each export (or its printed chain
head) and verify the next one --after it: a rewrite of what you hold, or an older export
handed over as the newer, fails with status 20 or 19.

",
    exit_codes!()
);

/// What the auditor holds of the node's chain, for `--after` / `--after-head`.
#[derive(Debug, Clone)]
pub enum Held {
    /// An earlier export: its signed head, once it verifies.
    Export(PathBuf),
    /// A head noted down from an earlier verification.
    Head(ChainPoint),
}

/// What an export holds besides the verdict: its header and its stored times.
#[derive(Debug)]
struct Covered {
    header: ExportHeader,
    /// The stored times of the first and the last record.
    stored: Option<(i64, i64)>,
}

/// Verifies the export `file`, against the node key `trusted` if given, and as extending
/// `held` if given.
pub fn run(file: &Path, trusted: Option<[u8; 32]>, held: Option<&Held>) -> Result<ExitCode, Error> {
    let bar = bytes_bar("verifying");
    let OpenedExport { header, key, input } = open_export(file, trusted, &bar)?;
    let held = match held {
        // The earlier export is checked against the same key as this one.
        Some(held) => Some(held_head(held, trusted.unwrap_or(header.node_key))?),
        None => None,
    };
    let failed = |source| Error::reading(file, source);
    let mut reader = ExportReader::new(input, header.clone(), &key).map_err(failed)?;
    if let Some(held) = &held {
        reader = reader.after(held.clone());
    }
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
    if let Some(held) = &held {
        println!(
            "  extends:          the head held, record {} ({})",
            held.head.sequence,
            hex(&held.head.hash)
        );
    }
    for warning in warnings(&covered, &verified) {
        eprintln!("warning: {warning}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The head `held` stands for: a noted head as it is, an earlier export's signed head once
/// that export verifies with the node key `key`.
fn held_head(held: &Held, key: [u8; 32]) -> Result<HeldHead, Error> {
    let path = match held {
        Held::Head(head) => {
            return Ok(HeldHead {
                node_id: None,
                head: *head,
            });
        }
        Held::Export(path) => path,
    };
    let bar = bytes_bar("verifying the earlier export");
    let OpenedExport { header, key, input } = open_export(path, Some(key), &bar)?;
    let failed = |source| Error::reading(path, source);
    let verified = ExportReader::new(input, header.clone(), &key)
        .map_err(failed)?
        .finish()
        .map_err(failed)?;
    bar.finish_and_clear();
    Ok(HeldHead {
        node_id: Some(header.node_id),
        head: verified.end.head,
    })
}

/// What a verified export covers, one item a line.
fn summary(file: &Path, covered: &Covered, verified: &VerifiedExport, pinned: bool) -> String {
    let header = &covered.header;
    let (end, verified) = (&verified.end, &verified.chain);
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
    out.push_str(&format!(
        "  chain head:       {} (the node's last record then; keep it for --after-head)\n",
        end.head
    ));
    out
}

/// What verifies but deserves the auditor's attention: records of the node's chain that
/// the export does not hold. The signed frame proves that nothing was cut from what it
/// holds; it does not make a range cover what it was not asked to.
fn warnings(covered: &Covered, verified: &VerifiedExport) -> Vec<String> {
    let header = &covered.header;
    let head = verified.end.head;
    let last = verified.chain.last;
    let mut warnings = Vec::new();
    if last.is_none_or(|last| last < head.sequence) {
        let stops = last.map_or("holds no record".into(), |l| format!("stops at record {l}"));
        let why = match header.until_unix_ms {
            Some(until) => format!("it was asked to end at {}", format_time(until)),
            None => "it was not asked to end early".into(),
        };
        warnings.push(format!(
            "the node's chain had reached record {} when this export was made, and the export \
             {stops} ({why}): the records after it are not in this export",
            head.sequence
        ));
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::audit::VerifiedChain;
    use moat_core::audit::export::ExportEnd;

    fn covered(until: Option<i64>) -> Covered {
        Covered {
            header: ExportHeader {
                moat_audit_export: moat_core::audit::export::EXPORT_VERSION,
                node_id: "node-a".into(),
                node_key: [7; 32],
                anchor: None,
                created_unix_ms: 100_000,
                since_unix_ms: None,
                until_unix_ms: until,
            },
            stored: Some((1_000, 2_000)),
        }
    }

    /// Records 0 to 9 verified, the node's chain at `head` when they were exported.
    fn verified(head: u64) -> VerifiedExport {
        let point = |sequence| ChainPoint {
            sequence,
            hash: [sequence as u8; 32],
        };
        VerifiedExport {
            chain: VerifiedChain {
                first: Some(0),
                last: Some(9),
                records: 10,
                checkpoints: 2,
                unsigned_tail: 0,
                last_checkpoint: Some((9, 90)),
            },
            end: ExportEnd {
                records: 10,
                checkpoints: 2,
                last: Some(point(9)),
                head: point(head),
                signature: [0; 64],
            },
        }
    }

    #[test]
    fn an_export_up_to_the_chain_head_has_no_warning() {
        let warnings = warnings(&covered(None), &verified(9));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn records_of_the_chain_left_out_of_the_export_are_warned_about() {
        let ranged = warnings(&covered(Some(5_000)), &verified(14));
        assert_eq!(ranged.len(), 1, "{ranged:?}");
        assert!(ranged[0].contains("had reached record 14"), "{ranged:?}");
        assert!(ranged[0].contains("stops at record 9"), "{ranged:?}");
        assert!(ranged[0].contains("asked to end at 1970-01-01T00:00:05.000Z"));
        let whole = warnings(&covered(None), &verified(14));
        assert!(whole[0].contains("not asked to end early"), "{whole:?}");
    }

    #[test]
    fn the_summary_names_node_key_range_last_checkpoint_and_head() {
        let text = summary(
            Path::new("x.moat-audit"),
            &covered(None),
            &verified(9),
            false,
        );
        assert!(text.contains(&format!("node key:         {}", "07".repeat(32))));
        assert!(text.contains("records:          10, sequence 0 to 9"));
        assert!(text.contains("last checkpoint:  record 9, signed 1970-01-01T00:01:30.000Z"));
        assert!(text.contains("unsigned tail:    0 record(s)"));
        assert!(text.contains(&format!("chain head:       9:{} ", "09".repeat(32))));
    }
}
