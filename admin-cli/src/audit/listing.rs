//! Decrypted records as an auditor reads them: JSON lines, or CSV for a spreadsheet.
//!
//! Both carry the same fields (documented in docs/audit.md): the chain's `sequence` and
//! stored time, then the record's own fields. The CSV is RFC 4180 with CRLF line ends,
//! UTF-8 with a byte order mark (so spreadsheets detect the encoding), times in ISO 8601
//! UTC, findings as `detector:count;...`, retained text as the text or `sha256:<hex>`, and
//! every cell that a spreadsheet would take for a formula prefixed with `'`.

use std::io::{self, Write};

use moat_core::audit::AuditRecord;
use serde::Serialize;
use serde_json::{Map, Value};

use super::format_time;

/// How decrypted records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ListingFormat {
    /// One JSON object a line.
    Jsonl,
    /// A table with a header row.
    Csv,
}

/// The CSV columns, in order. `stored_time` and `time` are the JSONL fields
/// `stored_unix_ms` and `unix_ms` as ISO 8601; the others are the JSONL fields of the same
/// name. A column a record lacks (`detail`, outside admin records) is empty.
const CSV_COLUMNS: [&str; 22] = [
    "sequence",
    "stored_time",
    "time",
    "kind",
    "node_id",
    "request_id",
    "department",
    "subject",
    "source_address",
    "model",
    "action",
    "decision",
    "reason",
    "classification",
    "findings",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "status",
    "prompt",
    "answer",
    "detail",
];

const BYTE_ORDER_MARK: &[u8] = "\u{feff}".as_bytes();

/// One JSONL line: the chain's facts, then the record's fields.
#[derive(Debug, Serialize)]
struct ListedRecord<'a> {
    sequence: u64,
    stored_unix_ms: i64,
    #[serde(flatten)]
    record: &'a AuditRecord,
}

/// Writes records in a [`ListingFormat`].
#[derive(Debug)]
pub enum RecordListing<W: Write> {
    Jsonl(W),
    Csv(Box<csv::Writer<W>>),
}

impl<W: Write> RecordListing<W> {
    /// Starts a listing on `out` (for CSV: the byte order mark and the header row).
    pub fn new(format: ListingFormat, mut out: W) -> io::Result<Self> {
        match format {
            ListingFormat::Jsonl => Ok(RecordListing::Jsonl(out)),
            ListingFormat::Csv => {
                out.write_all(BYTE_ORDER_MARK)?;
                let mut csv = csv::WriterBuilder::new()
                    .terminator(csv::Terminator::CRLF)
                    .quote_style(csv::QuoteStyle::Necessary)
                    .from_writer(out);
                csv.write_record(CSV_COLUMNS).map_err(csv_io)?;
                Ok(RecordListing::Csv(Box::new(csv)))
            }
        }
    }

    /// Writes record `sequence`, stored at `stored_unix_ms`.
    pub fn write(
        &mut self,
        sequence: u64,
        stored_unix_ms: i64,
        record: &AuditRecord,
    ) -> io::Result<()> {
        let listed = ListedRecord {
            sequence,
            stored_unix_ms,
            record,
        };
        match self {
            RecordListing::Jsonl(out) => {
                serde_json::to_writer(&mut *out, &listed)?;
                out.write_all(b"\n")
            }
            RecordListing::Csv(csv) => {
                let Value::Object(fields) = serde_json::to_value(&listed)? else {
                    return Err(io::Error::other("a record is not a JSON object"));
                };
                let row = CSV_COLUMNS
                    .iter()
                    .map(|column| guard_formula(csv_cell(column, &fields)));
                csv.write_record(row).map_err(csv_io)
            }
        }
    }

    /// Flushes and hands back the output.
    pub fn finish(self) -> io::Result<W> {
        match self {
            RecordListing::Jsonl(mut out) => {
                out.flush()?;
                Ok(out)
            }
            RecordListing::Csv(csv) => csv.into_inner().map_err(|e| e.into_error()),
        }
    }
}

/// A CSV writer's error as the I/O error it is (a writer of strings fails only there).
fn csv_io(error: csv::Error) -> io::Error {
    match error.into_kind() {
        csv::ErrorKind::Io(error) => error,
        other => io::Error::other(format!("{other:?}")),
    }
}

/// The cell of `column` for a record's JSONL `fields`.
fn csv_cell(column: &str, fields: &Map<String, Value>) -> String {
    let field = |name: &str| fields.get(name).unwrap_or(&Value::Null);
    match column {
        "stored_time" => field("stored_unix_ms")
            .as_i64()
            .map(format_time)
            .unwrap_or_default(),
        "time" => field("unix_ms")
            .as_i64()
            .map(format_time)
            .unwrap_or_default(),
        "findings" => findings_cell(field("findings")),
        "prompt" | "answer" => retained_cell(field(column)),
        _ => plain_cell(field(column)),
    }
}

/// A string as it is, a number in decimal, nothing for a missing value.
fn plain_cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// `detector:count;...`
fn findings_cell(value: &Value) -> String {
    let Some(findings) = value.as_array() else {
        return String::new();
    };
    let cells: Vec<String> = findings
        .iter()
        .map(|finding| {
            format!(
                "{}:{}",
                plain_cell(&finding["detector"]),
                plain_cell(&finding["count"])
            )
        })
        .collect();
    cells.join(";")
}

/// Retained text: the text, `sha256:<hex>`, or nothing.
fn retained_cell(value: &Value) -> String {
    match value.get("kept").and_then(Value::as_str) {
        Some("full") => plain_cell(&value["text"]),
        Some("sha256") => format!("sha256:{}", plain_cell(&value["sha256"])),
        _ => String::new(),
    }
}

/// A cell that a spreadsheet would evaluate as a formula, made text with a leading `'`.
fn guard_formula(cell: String) -> String {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{cell}")
    } else {
        cell
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::audit::{Finding, RecordKind, RetainedText, Retention};

    fn record() -> AuditRecord {
        serde_json::from_value(serde_json::json!({
            "kind": "request",
            "unix_ms": 1_795_913_185_250i64,
            "node_id": "node-a",
            "request_id": "r1",
            "department": "finance",
            "subject": "=HYPERLINK(\"http://x\")",
            "source_address": "10.0.0.7",
            "model": "smollm2@1.0.0",
            "action": "chat",
            "decision": "deny",
            "reason": "content.card_number",
            "classification": "internal",
            "findings": [],
            "prompt_tokens": 40,
            "completion_tokens": 0,
            "latency_ms": 3,
            "status": 403,
            "prompt": null,
            "answer": null,
        }))
        .expect("a record")
    }

    fn listing(format: ListingFormat, records: &[AuditRecord]) -> Vec<u8> {
        let mut listing = RecordListing::new(format, Vec::new()).expect("started");
        for (sequence, record) in records.iter().enumerate() {
            listing
                .write(sequence as u64, record.unix_ms + 5, record)
                .expect("written");
        }
        listing.finish().expect("finished")
    }

    #[test]
    fn jsonl_lines_are_the_record_with_its_chain_facts() {
        let record = record();
        let text = String::from_utf8(listing(ListingFormat::Jsonl, std::slice::from_ref(&record)))
            .expect("utf-8");
        let line: Value = serde_json::from_str(text.trim_end()).expect("json");
        assert_eq!(line["sequence"], 0);
        assert_eq!(line["stored_unix_ms"], record.unix_ms + 5);
        let back: AuditRecord = serde_json::from_value(line).expect("the record's fields");
        assert_eq!(back, record);
    }

    #[test]
    fn csv_opens_cleanly_in_a_spreadsheet() {
        let mut second = record();
        second.subject = "bob, \"the\nauditor\"".into();
        second.findings = vec![
            Finding {
                detector: "card_number".into(),
                count: 2,
            },
            Finding {
                detector: "email".into(),
                count: 1,
            },
        ];
        second.kind = RecordKind::Request;
        second.prompt = RetainedText::keep(Retention::Sha256, "abc");
        second.answer = RetainedText::keep(Retention::Full, "-1+2");
        let bytes = listing(ListingFormat::Csv, &[record(), second]);
        assert!(bytes.starts_with(BYTE_ORDER_MARK));
        let text = std::str::from_utf8(&bytes[3..]).expect("utf-8");
        assert!(text.starts_with("sequence,stored_time,time,kind,"));
        assert!(text.ends_with("\r\n"));

        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("row")).collect();
        let column = |name: &str| {
            CSV_COLUMNS
                .iter()
                .position(|c| *c == name)
                .expect("a column")
        };
        assert_eq!(rows.len(), 2);
        assert_eq!(&rows[0][column("time")], "2026-11-29T00:46:25.250Z");
        assert_eq!(&rows[0][column("stored_time")], "2026-11-29T00:46:25.255Z");
        assert_eq!(&rows[0][column("subject")], "'=HYPERLINK(\"http://x\")");
        assert_eq!(&rows[0][column("findings")], "");
        assert_eq!(&rows[0][column("prompt")], "");
        assert_eq!(&rows[0][column("detail")], "");
        assert_eq!(&rows[1][column("subject")], "bob, \"the\nauditor\"");
        assert_eq!(&rows[1][column("findings")], "card_number:2;email:1");
        assert_eq!(
            &rows[1][column("prompt")],
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(&rows[1][column("answer")], "'-1+2");
        assert_eq!(&rows[1][column("status")], "403");
    }

    #[test]
    fn every_formula_lead_is_guarded() {
        for lead in ["=", "+", "-", "@", "\t", "\r"] {
            assert_eq!(guard_formula(format!("{lead}1")), format!("'{lead}1"));
        }
        assert_eq!(guard_formula("finance".into()), "finance");
        assert_eq!(guard_formula(String::new()), "");
    }
}
