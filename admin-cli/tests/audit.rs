//! `moatctl audit` as operators and auditors run it: the real binary on sled stores written
//! as moatd writes them, with real age identities and ed25519 node keys.

#[path = "audit/frame.rs"]
mod frame;
#[path = "audit/node_store.rs"]
mod node_store;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use moat_core::audit::AuditRecord;
use moat_core::audit::layout;
use node_store::{Auditors, NodeStore, stored_at};

/// Records in a test store: checkpoints after 4, 9, 14, 19 and 22.
const RECORDS: u64 = 23;

fn moatctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moatctl"))
        .args(args)
        .output()
        .expect("moatctl runs")
}

/// Runs moatctl; asserts its exit status; returns stdout and stderr.
fn expect_status(args: &[&str], code: i32) -> (String, String) {
    let out = moatctl(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

fn path(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Asserts that `text` contains `needle`.
fn has(text: &str, needle: &str) {
    assert!(text.contains(needle), "expected {needle:?} in:\n{text}");
}

/// `moatctl audit export --store STORE --out OUT EXTRA...`, expecting exit `code`.
fn export(store: &Path, out: &Path, extra: &[&str], code: i32) -> (String, String) {
    let mut args = vec![
        "audit",
        "export",
        "--store",
        path(store),
        "--out",
        path(out),
    ];
    args.extend_from_slice(extra);
    expect_status(&args, code)
}

/// `moatctl audit verify FILE EXTRA...`, expecting exit `code`.
fn verify(file: &Path, extra: &[&str], code: i32) -> (String, String) {
    let mut args = vec!["audit", "verify", path(file)];
    args.extend_from_slice(extra);
    expect_status(&args, code)
}

/// `moatctl audit decrypt --identity KEY FILE --format FORMAT [--out OUT]`, expecting exit
/// `code`.
fn decrypt(
    key: &Path,
    file: &Path,
    format: &str,
    out: Option<&Path>,
    code: i32,
) -> (String, String) {
    let mut args = vec![
        "audit",
        "decrypt",
        "--identity",
        path(key),
        path(file),
        "--format",
        format,
    ];
    if let Some(out) = out {
        args.extend(["--out", path(out)]);
    }
    expect_status(&args, code)
}

/// A node's store and its auditors' identity files in a temporary directory.
struct Fixture {
    tmp: tempfile::TempDir,
    auditors: Auditors,
    store: NodeStore,
    /// Identity files of the first and the second auditor.
    first: PathBuf,
    second: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let auditors = Auditors::generate();
        let store = NodeStore::write(&tmp.path().join("audit"), "node-a", 1, RECORDS, &auditors);
        let first = Auditors::identity_file(tmp.path(), "first.key", &auditors.first);
        let second = Auditors::identity_file(tmp.path(), "second.key", &auditors.second);
        Self {
            tmp,
            auditors,
            store,
            first,
            second,
        }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Exports the store with `extra` arguments to `name`; asserts exit 0.
    fn export(&self, name: &str, extra: &[&str]) -> (PathBuf, String) {
        let out = self.file(name);
        let (stdout, _) = export(&self.store.dir, &out, extra, 0);
        (out, stdout)
    }
}

/// Decrypted JSONL lines: (sequence, stored_unix_ms, record).
fn parse_jsonl(text: &str) -> Vec<(u64, i64, AuditRecord)> {
    text.lines()
        .map(|line| {
            let mut value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            let fields = value.as_object_mut().expect("an object");
            let sequence = fields.remove("sequence").and_then(|s| s.as_u64());
            let stored = fields.remove("stored_unix_ms").and_then(|s| s.as_i64());
            let record = serde_json::from_value(value).expect("the record's fields");
            (
                sequence.expect("sequence"),
                stored.expect("stored_unix_ms"),
                record,
            )
        })
        .collect()
}

/// Asserts that `listed` are exactly the store's records `sequences`, in order.
fn assert_records(
    listed: &[(u64, i64, AuditRecord)],
    store: &NodeStore,
    sequences: std::ops::RangeInclusive<u64>,
) {
    let expected: Vec<(u64, i64, AuditRecord)> = sequences
        .map(|s| (s, stored_at(s), store.records[s as usize].clone()))
        .collect();
    assert_eq!(listed, expected.as_slice());
}

#[test]
fn a_whole_store_exports_verifies_and_decrypts_to_its_records() {
    let fixture = Fixture::new();
    let key = fixture.store.key_hex();
    let (file, summary) = fixture.export("node-a.moat-audit", &[]);
    has(&summary, "exported 23 record(s) and 5 checkpoint(s)");
    has(&summary, "node id:         node-a");
    has(&summary, &format!("node key:        {key}"));
    has(&summary, "sequence 0 to 22");

    let (verified, _) = verify(&file, &["--node-key", &key], 0);
    has(&verified, "records:          23, sequence 0 to 22");
    has(&verified, "checkpoints:      5");
    has(
        &verified,
        "last checkpoint:  record 22, signed 2026-11-29T10:22:00.000Z",
    );
    has(&verified, "unsigned tail:    0 record(s)");
    has(
        &verified,
        "stored:           2026-11-29T10:00:00.000Z to 2026-11-29T10:22:00.000Z",
    );
    has(&verified, "continues from:   the chain's first record");

    // Either auditor reads every record.
    let (jsonl, _) = decrypt(&fixture.first, &file, "jsonl", None, 0);
    assert_records(&parse_jsonl(&jsonl), &fixture.store, 0..=22);

    let csv_path = fixture.file("node-a.csv");
    decrypt(&fixture.second, &file, "csv", Some(&csv_path), 0);
    let bytes = fs::read(&csv_path).expect("csv written");
    assert!(bytes.starts_with(b"\xEF\xBB\xBF"), "UTF-8 byte order mark");
    assert!(bytes.ends_with(b"\r\n"));
    let mut reader = csv::Reader::from_reader(&bytes[3..]);
    let headers = reader.headers().expect("header row").clone();
    let column = |name: &str| headers.iter().position(|h| h == name).expect(name);
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("a row")).collect();
    assert_eq!(rows.len(), 23);
    for (sequence, row) in rows.iter().enumerate() {
        let record = &fixture.store.records[sequence];
        assert_eq!(row[column("sequence")], sequence.to_string());
        assert_eq!(row[column("request_id")], record.request_id);
        assert_eq!(row[column("department")], record.department);
    }
    assert_eq!(&rows[0][column("stored_time")], "2026-11-29T10:00:00.000Z");
    assert_eq!(&rows[0][column("time")], "2026-11-29T09:59:59.960Z");
    assert_eq!(
        &rows[2][column("subject")],
        "'=HYPERLINK(\"http://evil\",\"x\")"
    );
    assert_eq!(&rows[3][column("findings")], "card_number:1;email:2");
    assert_eq!(
        &rows[2][column("prompt")],
        "question 2, with \"quotes\"\nand a line"
    );
    assert_eq!(
        &rows[3][column("prompt")],
        format!("sha256:{}", "ab".repeat(32))
    );
    assert_eq!(&rows[3][column("answer")], "'-1 is the answer");
    assert_eq!(&rows[6][column("kind")], "admin");
    assert_eq!(&rows[6][column("answer")], "");
}

#[test]
fn a_time_range_is_widened_back_to_the_checkpoint_before_it() {
    let fixture = Fixture::new();
    // Records 7 to 16 were stored in the range; checkpoint 4 is the latest before 7.
    let range = [
        "--since",
        "2026-11-29T10:06:30Z",
        "--until",
        "2026-11-29T10:16:00Z",
    ];
    let (file, summary) = fixture.export("range.moat-audit", &range);
    has(&summary, "sequence 5 to 16");
    has(&summary, "continues from:  the checkpoint at record 4");
    let text = fs::read_to_string(&file).expect("export");
    let header: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("header")).expect("json");
    assert_eq!(header["anchor"]["sequence"], 4);
    assert_eq!(header["since_unix_ms"], stored_at(6) + 30_000);

    let (verified, warnings) = verify(&file, &[], 0);
    has(&verified, "records:          12, sequence 5 to 16");
    // Checkpoint 19 is outside the range: records 15 and 16 are not under a checkpoint;
    // the export's own signature covers them.
    has(&verified, "unsigned tail:    2 record(s)");
    has(&verified, "chain head:       22:");
    has(
        &warnings,
        "warning: the node's chain had reached record 22 when this export was made, and the \
         export stops at record 16 (it was asked to end at 2026-11-29T10:16:00.000Z)",
    );

    let (jsonl, _) = decrypt(&fixture.first, &file, "jsonl", None, 0);
    assert_records(&parse_jsonl(&jsonl), &fixture.store, 5..=16);

    let none = fixture.file("none");
    let (_, stderr) = export(
        &fixture.store.dir,
        &none,
        &["--since", "2027-01-01T00:00:00Z"],
        1,
    );
    has(
        &stderr,
        "holds no record stored at or after 2027-01-01T00:00:00.000Z",
    );
    assert!(!none.exists());
    let backwards = [
        "--since",
        "2026-11-29T11:00:00Z",
        "--until",
        "2026-11-29T10:00:00Z",
    ];
    export(&fixture.store.dir, &none, &backwards, 2);
    export(&fixture.store.dir, &none, &["--since", "yesterday"], 2);
}

#[test]
fn a_wrong_identity_is_refused_naming_the_record_it_cannot_open() {
    let fixture = Fixture::new();
    let (file, _) = fixture.export("node-a.moat-audit", &[]);
    let stranger = Auditors::identity_file(
        fixture.tmp.path(),
        "stranger.key",
        &age::x25519::Identity::generate(),
    );
    let out = fixture.file("out.jsonl");
    let (stdout, stderr) = decrypt(&stranger, &file, "jsonl", Some(&out), 1);
    has(&stderr, "opens record 0");
    has(&stderr, "wrong key");
    assert!(stdout.is_empty());
    assert!(!out.exists(), "nothing is presented");
    // To standard output as well: nothing is printed.
    let (stdout, _) = decrypt(&stranger, &file, "csv", None, 1);
    assert!(stdout.is_empty());

    let not_a_key = fixture.file("not-a-key");
    fs::write(&not_a_key, "# comment\nhello\n").expect("write");
    let (_, stderr) = decrypt(&not_a_key, &file, "csv", None, 1);
    has(&stderr, "line 2");
}

#[test]
fn a_pruned_store_exports_from_its_prune_marker() {
    let fixture = Fixture::new();
    fixture.store.prune(9);
    let (file, summary) = fixture.export("pruned.moat-audit", &[]);
    has(&summary, "sequence 10 to 22");
    let (verified, _) = verify(&file, &["--node-key", &fixture.store.key_hex()], 0);
    has(&verified, "the prune marker at record 9");
    has(&verified, "records:          13, sequence 10 to 22");

    // A range reaching back before the prune starts at the first record kept.
    let until = ["--until", "2026-11-29T10:12:00Z"];
    let (file, _) = fixture.export("pruned-range.moat-audit", &until);
    let (verified, _) = verify(&file, &[], 0);
    has(&verified, "records:          3, sequence 10 to 12");
    let (jsonl, _) = decrypt(&fixture.second, &file, "jsonl", None, 0);
    assert_records(&parse_jsonl(&jsonl), &fixture.store, 10..=12);
}

/// The lines of an export.
fn lines_of(file: &Path) -> Vec<String> {
    fs::read_to_string(file)
        .expect("export")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The index of the line of record `sequence`.
fn record_line(lines: &[String], sequence: u64) -> usize {
    let needle = format!("{{\"record\":{{\"sequence\":{sequence},");
    lines
        .iter()
        .position(|l| l.starts_with(&needle))
        .expect("record line")
}

/// The index of the line of the checkpoint at record `sequence`.
fn checkpoint_line(lines: &[String], sequence: u64) -> usize {
    let needle = format!("\"sequence\":{sequence},");
    lines
        .iter()
        .position(|l| l.starts_with("{\"checkpoint\":") && l.contains(&needle))
        .expect("checkpoint line")
}

/// What verify and decrypt must report: the exit status, the record, the (1-based) line
/// and the kind of damage.
struct Expected {
    code: i32,
    sequence: u64,
    line: usize,
    kind: &'static str,
}

/// Writes `lines` as the export `name` and checks it as [`assert_damaged_file`] does.
fn assert_damage(fixture: &Fixture, name: &str, lines: &[String], expected: Expected) {
    let file = fixture.file(name);
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    fs::write(&file, text).expect("write");
    assert_damaged_file(fixture, &file, expected);
}

/// Verify and decrypt (to a file and to standard output) fail with the expected status and
/// location, and decrypt presents nothing.
fn assert_damaged_file(fixture: &Fixture, file: &Path, expected: Expected) {
    let Expected {
        code,
        sequence,
        line,
        kind,
    } = expected;
    let located = format!("damaged at record {sequence} (line {line}): {kind}:");
    let (_, stderr) = verify(file, &[], code);
    has(&stderr, &located);
    let out = fixture.file("decrypted.csv");
    let (_, stderr) = decrypt(&fixture.first, file, "csv", Some(&out), code);
    has(&stderr, &located);
    assert!(!out.exists(), "a damaged export is not presented");
    let (stdout, _) = decrypt(&fixture.first, file, "jsonl", None, code);
    assert!(
        stdout.is_empty(),
        "a damaged export is not presented: {stdout}"
    );
}

#[test]
fn tampering_with_an_export_is_located_and_has_its_exit_status() {
    let fixture = Fixture::new();
    let (file, _) = fixture.export("node-a.moat-audit", &[]);
    let original = lines_of(&file);
    let expect = |code, sequence, line, kind| Expected {
        code,
        sequence,
        line,
        kind,
    };

    // A byte of a body changed, still valid base64.
    let mut flipped = original.clone();
    let at = record_line(&flipped, 7);
    let body = flipped[at].find("\"ciphertext\":\"").expect("body") + 40;
    let mut bytes = flipped[at].clone().into_bytes();
    bytes[body] = if bytes[body] == b'A' { b'B' } else { b'A' };
    flipped[at] = String::from_utf8(bytes).expect("text");
    assert_damage(
        &fixture,
        "flipped",
        &flipped,
        expect(13, 7, at + 1, "broken_link"),
    );

    let mut deleted = original.clone();
    let at = record_line(&deleted, 8);
    deleted.remove(at);
    assert_damage(&fixture, "deleted", &deleted, expect(11, 8, at + 1, "gap"));

    let mut swapped = original.clone();
    let (a, b) = (record_line(&swapped, 11), record_line(&swapped, 12));
    swapped.swap(a, b);
    assert_damage(&fixture, "swapped", &swapped, expect(11, 11, a + 1, "gap"));

    let mut repeated = original.clone();
    let at = record_line(&repeated, 12);
    repeated.insert(at + 1, original[at].clone());
    assert_damage(
        &fixture,
        "repeated",
        &repeated,
        expect(12, 12, at + 2, "out_of_order"),
    );

    // Cut at a line: the end line is missing.
    let cut = &original[..record_line(&original, 16)];
    assert_damage(&fixture, "cut", cut, expect(16, 16, cut.len(), "truncated"));
    // Cut in the middle of a line.
    let at = record_line(&original, 16);
    let kept: usize = original[..at].iter().map(|l| l.len() + 1).sum();
    let truncated = fixture.file("truncated");
    fs::write(&truncated, &fs::read(&file).expect("export")[..kept + 50]).expect("write");
    assert_damaged_file(&fixture, &truncated, expect(10, 16, at + 1, "unreadable"));

    // A record and a checkpoint from another node's store.
    let other = NodeStore::write(
        &fixture.file("other").join("audit"),
        "node-b",
        2,
        RECORDS,
        &fixture.auditors,
    );
    let other_file = fixture.file("node-b.moat-audit");
    export(&other.dir, &other_file, &[], 0);
    let other_lines = lines_of(&other_file);
    let mut spliced = original.clone();
    let at = record_line(&spliced, 5);
    spliced[at] = other_lines[record_line(&other_lines, 5)].clone();
    assert_damage(
        &fixture,
        "spliced",
        &spliced,
        expect(13, 5, at + 1, "broken_link"),
    );

    let mut foreign = original.clone();
    let at = checkpoint_line(&foreign, 9);
    foreign[at] = other_lines[checkpoint_line(&other_lines, 9)].clone();
    assert_damage(
        &fixture,
        "foreign",
        &foreign,
        expect(17, 9, at + 1, "foreign_checkpoint"),
    );

    // A checkpoint whose signature was altered.
    let mut resigned = original.clone();
    let at = checkpoint_line(&resigned, 14);
    let mut checkpoint: serde_json::Value = serde_json::from_str(&resigned[at]).expect("json");
    checkpoint["checkpoint"]["signature"] = serde_json::Value::String("00".repeat(64));
    resigned[at] = checkpoint.to_string();
    assert_damage(
        &fixture,
        "resigned",
        &resigned,
        expect(14, 14, at + 1, "bad_signature"),
    );

    // Not an export; another node's key; a key that is not one.
    let (_, stderr) = verify(&fixture.store.dir.join("conf"), &[], 3);
    has(&stderr, "not a moat audit export");
    let (_, stderr) = verify(&file, &["--node-key", &other.key_hex()], 4);
    has(&stderr, &format!("not the expected {}", other.key_hex()));
    verify(&file, &["--node-key", "abcd"], 2);
}

/// Exports the tampered store and verifies the export: both locate the damage.
fn assert_store_damage(fixture: &Fixture, code: i32, sequence: u64, kind: &str) {
    let out = fixture.file(&format!("tampered-{kind}.moat-audit"));
    let (_, stderr) = export(&fixture.store.dir, &out, &[], code);
    has(
        &stderr,
        "was written, but the store it was read from is damaged",
    );
    has(&stderr, &format!("at record {sequence} (export line"));
    assert!(out.exists(), "the evidence is kept");
    let (_, stderr) = verify(&out, &[], code);
    has(&stderr, &format!("damaged at record {sequence} "));
    has(&stderr, &format!("{kind}:"));
}

#[test]
fn tampering_with_the_store_is_located_by_export_and_verify() {
    let flipped = Fixture::new();
    flipped.store.tamper(|records| {
        let mut value = flipped.store.stored_value(8);
        let last = value.len() - 1;
        value[last] ^= 0x01;
        records
            .insert(layout::sequence_key(8), value)
            .expect("altered");
    });
    assert_store_damage(&flipped, 13, 8, "broken_link");

    let deleted = Fixture::new();
    deleted.store.tamper(|records| {
        records.remove(layout::sequence_key(8)).expect("removed");
    });
    assert_store_damage(&deleted, 11, 8, "gap");

    let copied = Fixture::new();
    let other = NodeStore::write(
        &copied.file("other").join("audit"),
        "node-b",
        2,
        RECORDS,
        &copied.auditors,
    );
    copied.store.tamper(|records| {
        records
            .insert(layout::sequence_key(8), other.stored_value(8))
            .expect("copied");
    });
    assert_store_damage(&copied, 13, 8, "broken_link");

    // A value too short to hold a record: nothing to put in an export.
    let cut = Fixture::new();
    cut.store.tamper(|records| {
        records
            .insert(layout::sequence_key(8), vec![0; 12])
            .expect("cut");
    });
    let out = cut.file("cut.moat-audit");
    let (_, stderr) = export(&cut.store.dir, &out, &[], 10);
    has(&stderr, "is damaged: record 8 cannot be read");
    assert!(!out.exists());
    // Around it, the store still exports.
    cut.export("after.moat-audit", &["--since", "2026-11-29T10:10:00Z"]);
}

#[test]
fn a_store_that_moatd_holds_is_refused_with_a_clear_message() {
    let fixture = Fixture::new();
    let held = node_store::open(&fixture.store.dir);
    let out = fixture.file("out.moat-audit");
    let (_, stderr) = export(&fixture.store.dir, &out, &[], 1);
    has(&stderr, "is locked by another process: moatd is running");
    has(&stderr, "through moatd");
    assert!(!out.exists());
    node_store::close(held, &fixture.store.dir);
    fixture.export("out.moat-audit", &[]);

    let (_, stderr) = expect_status(&["audit", "export", "--out", path(&out)], 1);
    has(&stderr, "cannot reach moatd's socket /run/moat/");
    let nothing = fixture.file("nothing");
    let (_, stderr) = export(&nothing, &out, &[], 1);
    has(&stderr, "there is no audit store in");
    assert!(!nothing.exists(), "no store is created");
}

#[test]
fn verify_help_documents_every_exit_status() {
    let (help, _) = expect_status(&["audit", "verify", "--help"], 0);
    for line in [
        "   3  not a moat audit export",
        "   4  the export's node key",
        "  10  unreadable",
        "  11  gap",
        "  12  out_of_order",
        "  13  broken_link",
        "  14  bad_signature",
        "  15  checkpoint_mismatch",
        "  16  truncated",
        "  17  foreign_checkpoint",
        "  18  bad_frame",
        "  19  older",
        "  20  forked",
        "  21  not_continuous",
    ] {
        has(&help, line);
    }
}
