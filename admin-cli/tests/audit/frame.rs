//! `moatctl audit verify` against someone who edits exports or the node's history: the
//! signed header and end of an export, and `--after`, which checks that an export extends
//! the chain head the auditor already holds.

use std::fs;
use std::path::{Path, PathBuf};

use super::node_store::signing_key_file;
use super::{
    Fixture, checkpoint_line, decrypt, expect_status, export, has, lines_of, path, verify,
};

fn write_lines(file: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    fs::write(file, text).expect("write");
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).expect("a JSON line")
}

/// `verify FILE --node-key KEY EXTRA...` with `fixture`'s node key, expecting `code`.
fn verify_pinned(fixture: &Fixture, file: &Path, extra: &[&str], code: i32) -> (String, String) {
    let key = fixture.store.key_hex();
    let mut args = vec!["--node-key", key.as_str()];
    args.extend_from_slice(extra);
    verify(file, &args, code)
}

/// `original`'s end line with its counts edited to match the records and checkpoints of
/// `kept` (a header and the lines after it).
fn end_counting(original: &[String], kept: &[String]) -> serde_json::Value {
    let count = |prefix: &str| kept[1..].iter().filter(|l| l.starts_with(prefix)).count();
    let mut end = json(original.last().expect("end line"));
    end["end"]["records"] = count("{\"record\":").into();
    end["end"]["checkpoints"] = count("{\"checkpoint\":").into();
    end
}

/// The attack: everything after the checkpoint at `sequence` dropped, and the end line and
/// the creation time made to match what is left, as someone without the node key would do
/// to hide the records after it.
fn cut_after_checkpoint(original: &[String], sequence: u64) -> Vec<String> {
    let at = checkpoint_line(original, sequence);
    let mut kept = original[..=at].to_vec();
    let mut end = end_counting(original, &kept);
    // Whatever else the end says of the last record, made to match too.
    let last = json(&kept[at - 1]);
    if let Some(fields) = end["end"].as_object_mut() {
        for name in ["last", "head"] {
            if fields.contains_key(name) {
                let point = serde_json::json!({
                    "sequence": last["record"]["sequence"],
                    "hash": last["record"]["hash"],
                });
                fields.insert(name.into(), point);
            }
        }
    }
    let mut header = json(&kept[0]);
    let stored = last["record"]["unix_ms"].as_i64().expect("stored time");
    header["created_unix_ms"] = (stored + 1_000).into();
    kept[0] = header.to_string();
    kept.push(end.to_string());
    kept
}

#[test]
fn an_export_cut_after_a_checkpoint_with_its_end_and_time_fixed_does_not_verify() {
    let fixture = Fixture::new();
    let (file, _) = fixture.export("whole.moat-audit", &[]);
    let original = lines_of(&file);
    for sequence in [4, 9, 14, 19] {
        let cut = fixture.file(&format!("cut-{sequence}.moat-audit"));
        write_lines(&cut, &cut_after_checkpoint(&original, sequence));
        let (stdout, stderr) = verify_pinned(&fixture, &cut, &[], 18);
        assert!(!stdout.contains("verifies"), "{stdout}");
        has(&stderr, "does not verify: line");
        has(&stderr, "bad_frame: ");
        has(&stderr, "the header or the end line was altered");
        // Nothing of it is presented by decrypt either.
        let (stdout, _) = decrypt(&fixture.first, &cut, "jsonl", None, 18);
        assert!(stdout.is_empty(), "{stdout}");
    }
    // Cut with the signed end line left as it was: the end shows the cut.
    let mut kept = original[..=checkpoint_line(&original, 14)].to_vec();
    kept.push(original.last().expect("end").clone());
    let cut = fixture.file("cut-kept-end.moat-audit");
    write_lines(&cut, &kept);
    let (_, stderr) = verify_pinned(&fixture, &cut, &[], 16);
    has(&stderr, "truncated");
}

#[test]
fn a_header_edited_to_shift_the_range_times_or_anchor_does_not_verify() {
    let fixture = Fixture::new();
    let range = ["--since", "2026-11-29T10:06:30Z"];
    let (file, _) = fixture.export("range.moat-audit", &range);
    let original = lines_of(&file);
    assert_eq!(json(&original[0])["anchor"]["sequence"], 4);
    let edits: [(&str, serde_json::Value); 4] = [
        ("since_unix_ms", super::stored_at(9).into()),
        ("until_unix_ms", super::stored_at(19).into()),
        ("created_unix_ms", super::stored_at(30).into()),
        ("node_id", "node-z".into()),
    ];
    for (field, value) in edits {
        let mut header = json(&original[0]);
        header[field] = value;
        let mut edited = original.clone();
        edited[0] = header.to_string();
        let file = fixture.file(&format!("edited-{field}"));
        write_lines(&file, &edited);
        let expected = if field == "node_id" { 17 } else { 18 };
        verify_pinned(&fixture, &file, &[], expected);
    }

    // The first records cut off, the anchor moved to the (genuine) checkpoint before what
    // is left and the counts fixed: the chain verifies from there, the frame does not.
    let from = checkpoint_line(&original, 9);
    let mut header = json(&original[0]);
    header["anchor"] = json(&original[from])["checkpoint"].clone();
    let mut moved = vec![header.to_string()];
    moved.extend_from_slice(&original[from + 1..original.len() - 1]);
    let end = end_counting(&original, &moved);
    moved.push(end.to_string());
    let file = fixture.file("moved-anchor");
    write_lines(&file, &moved);
    let (_, stderr) = verify_pinned(&fixture, &file, &[], 18);
    has(&stderr, "bad_frame: the node key's signature");
}

#[test]
fn an_older_export_handed_over_as_the_newer_is_refused_with_after() {
    let mut fixture = Fixture::new();
    let (older, _) = fixture.export("older.moat-audit", &[]);
    let (summary, _) = verify_pinned(&fixture, &older, &[], 0);
    let held = format!("22:{}", hex(&fixture.store.entries[22].hash));
    has(&summary, &format!("chain head:       {held} "));
    fixture.store.grow(7, &fixture.auditors);
    let (newer, _) = fixture.export("newer.moat-audit", &[]);

    let (summary, _) = verify_pinned(&fixture, &newer, &["--after", path(&older)], 0);
    has(&summary, "extends:          the head held, record 22");
    verify_pinned(&fixture, &newer, &["--after-head", &held], 0);

    let (stdout, stderr) = verify_pinned(&fixture, &older, &["--after", path(&newer)], 19);
    assert!(!stdout.contains("verifies"), "{stdout}");
    has(
        &stderr,
        "older: the export's chain head is record 22, older than the head held, record 29",
    );
    let newer_head = format!("29:{}", hex(&fixture.store.entries[29].hash));
    verify_pinned(&fixture, &older, &["--after-head", &newer_head], 19);
    // A held head that is not SEQ:HASH is a usage error.
    verify_pinned(&fixture, &newer, &["--after-head", "22"], 2);
}

#[test]
fn a_history_rewritten_and_resigned_with_the_node_key_is_caught_with_after() {
    let mut fixture = Fixture::new();
    let (held, _) = fixture.export("held.moat-audit", &[]);
    // Root rewrites records 10 on, re-chains them, signs checkpoints again with the node
    // key, and lets the chain grow past the head the auditor holds.
    fixture.store.rewrite_from(10, 18, &fixture.auditors);
    let (forked, _) = fixture.export("forked.moat-audit", &[]);
    // On its own it verifies: the node key signed it.
    verify_pinned(&fixture, &forked, &[], 0);
    let (stdout, stderr) = verify_pinned(&fixture, &forked, &["--after", path(&held)], 20);
    assert!(!stdout.contains("verifies"), "{stdout}");
    has(&stderr, "forked: at record 22 the export's chain has hash");
    has(&stderr, "rewritten");

    // An export that starts after the held head cannot show it.
    let since = ["--since", "2026-11-29T10:26:00Z"];
    let (late, _) = fixture.export("late.moat-audit", &since);
    let (_, stderr) = verify_pinned(&fixture, &late, &["--after", path(&held)], 21);
    has(&stderr, "not_continuous: ");
    has(&stderr, "cannot show record 22");

    // Rewritten and cut back below the held head: older than what is held.
    fixture.store.rewrite_from(10, 5, &fixture.auditors);
    let (shorter, _) = fixture.export("shorter.moat-audit", &[]);
    let (_, stderr) = verify_pinned(&fixture, &shorter, &["--after", path(&held)], 19);
    has(&stderr, "cut back");
}

#[test]
fn an_unsigned_version_1_export_is_refused() {
    let fixture = Fixture::new();
    let (file, _) = fixture.export("v2.moat-audit", &[]);
    let mut lines = lines_of(&file);
    let mut header = json(&lines[0]);
    header["moat_audit_export"] = 1.into();
    lines[0] = header.to_string();
    let end = json(lines.last().expect("end"));
    let last = lines.len() - 1;
    lines[last] = serde_json::json!({"end": {
        "records": end["end"]["records"], "checkpoints": end["end"]["checkpoints"]
    }})
    .to_string();
    let old = fixture.file("v1.moat-audit");
    write_lines(&old, &lines);
    let (_, stderr) = verify_pinned(&fixture, &old, &[], 3);
    has(&stderr, "format version 1");
    has(&stderr, "not signed");
}

#[test]
fn an_offline_export_is_signed_with_the_node_key_or_not_made() {
    let fixture = Fixture::new();
    let key_file = signing_key_file(&fixture.store.dir);
    let out = fixture.file("out.moat-audit");

    // Elsewhere, named with --signing-key.
    let moved: PathBuf = fixture.file("node.key");
    fs::rename(&key_file, &moved).expect("move the key");
    let (_, stderr) = export(&fixture.store.dir, &out, &[], 1);
    has(&stderr, "cannot sign the export with the node key");
    has(&stderr, "audit-signing.key");
    assert!(!out.exists());
    export(
        &fixture.store.dir,
        &out,
        &["--signing-key", path(&moved)],
        0,
    );
    verify_pinned(&fixture, &out, &[], 0);
    fs::remove_file(&out).expect("rm");

    // Another node's key signs nothing of this store.
    let other = fixture.file("other.key");
    fs::write(&other, format!("{}\n", "11".repeat(32))).expect("key");
    let (_, stderr) = export(
        &fixture.store.dir,
        &out,
        &["--signing-key", path(&other)],
        1,
    );
    has(&stderr, "is not this node's");
    assert!(!out.exists());
    // --signing-key is for --store only.
    expect_status(
        &[
            "audit",
            "export",
            "--out",
            path(&out),
            "--signing-key",
            path(&other),
        ],
        2,
    );
}

fn hex(bytes: &[u8]) -> String {
    moat_core::audit::encoding::hex(bytes)
}
