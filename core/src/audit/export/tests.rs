use super::*;
use crate::audit::chain::CheckpointKind;
use ed25519_dalek::SigningKey;

const NODE: &str = "node-a";

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// Records `0..n` of `node`, with a checkpoint after every fourth and after the last.
fn chain(n: u64, node: &str, signer: &SigningKey) -> (Vec<ChainEntry>, Vec<Checkpoint>) {
    let mut previous = GENESIS;
    let mut entries = Vec::new();
    let mut checkpoints = Vec::new();
    for sequence in 0..n {
        let body = format!("age body {sequence} of {node}").into_bytes();
        let entry = ChainEntry::new(node, &previous, sequence, 1_000 + sequence as i64, body);
        previous = entry.hash;
        if sequence % 4 == 3 || sequence + 1 == n {
            checkpoints.push(Checkpoint::sign(signer, node, sequence, entry.hash, 50));
        }
        entries.push(entry);
    }
    (entries, checkpoints)
}

/// The export of `entries[from..]` (anchored at the checkpoint before `from`, if any),
/// made when the chain's head was its last entry.
fn export(entries: &[ChainEntry], checkpoints: &[Checkpoint], from: usize) -> String {
    let anchor = from
        .checked_sub(1)
        .map(|before| Checkpoint::sign(&key(1), NODE, before as u64, entries[before].hash, 60));
    export_anchored(entries, checkpoints, from, anchor)
}

/// The export of `entries[from..]` continuing from `anchor`.
fn export_anchored(
    entries: &[ChainEntry],
    checkpoints: &[Checkpoint],
    from: usize,
    anchor: Option<Checkpoint>,
) -> String {
    let signer = key(1);
    let header = ExportHeader {
        moat_audit_export: EXPORT_VERSION,
        node_id: NODE.into(),
        node_key: signer.verifying_key().to_bytes(),
        anchor,
        created_unix_ms: 99,
        since_unix_ms: None,
        until_unix_ms: None,
    };
    let mut writer = ExportWriter::new(Vec::new(), &header).expect("header");
    for entry in &entries[from..] {
        writer.record(entry).expect("record");
        for checkpoint in checkpoints.iter().filter(|c| c.sequence == entry.sequence) {
            writer.checkpoint(checkpoint).expect("checkpoint");
        }
    }
    let head = ChainPoint::of(entries.last().expect("a record"));
    let (bytes, _) = writer.finish(head, &signer).expect("end");
    String::from_utf8(bytes).expect("text")
}

fn verify(text: &str) -> Result<(VerifiedChain, usize), ExportError> {
    verify_after(text, None).map(|(verified, read)| (verified.chain, read))
}

/// Verifies `text`, requiring it to extend `held` if given.
fn verify_after(
    text: &str,
    held: Option<ChainPoint>,
) -> Result<(VerifiedExport, usize), ExportError> {
    let mut input = text.as_bytes();
    let header = read_header(&mut input)?;
    let key = header.verifying_key()?;
    let mut reader = ExportReader::new(input, header, &key)?;
    if let Some(head) = held {
        reader = reader.after(HeldHead {
            node_id: Some(NODE.into()),
            head,
        });
    }
    let mut read = 0;
    while reader.next_record()?.is_some() {
        read += 1;
    }
    Ok((reader.finish()?, read))
}

fn damage(text: &str) -> (u64, Damage) {
    match verify(text) {
        Err(ExportError::Damaged { source, .. }) => (source.sequence, source.damage),
        other => panic!("expected located damage, got {other:?}"),
    }
}

fn frame_problem(text: &str) -> FrameProblem {
    match verify(text) {
        Err(ExportError::Frame { problem, .. }) => problem,
        other => panic!("expected a frame that does not verify, got {other:?}"),
    }
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_owned).collect()
}

fn join(lines: &[String]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// The index of the line holding record `sequence`.
fn line_of(lines: &[String], sequence: u64) -> usize {
    let needle = format!("{{\"record\":{{\"sequence\":{sequence},");
    lines
        .iter()
        .position(|l| l.starts_with(&needle))
        .expect("record line")
}

#[test]
fn an_intact_export_verifies_whole_or_from_an_anchor() {
    let (entries, checkpoints) = chain(10, NODE, &key(1));
    let (verified, read) = verify(&export(&entries, &checkpoints, 0)).expect("intact");
    assert_eq!(
        (verified.first, verified.last, read),
        (Some(0), Some(9), 10)
    );
    assert_eq!(verified.unsigned_tail, 0);
    let (verified, read) = verify(&export(&entries, &checkpoints, 4)).expect("intact range");
    assert_eq!((verified.first, read), (Some(4), 6));
}

#[test]
fn tampering_with_an_export_is_found_and_located() {
    let (entries, checkpoints) = chain(10, NODE, &key(1));
    let original = lines(&export(&entries, &checkpoints, 0));

    // A byte of a body changed (still valid base64 and JSON).
    let mut flipped = original.clone();
    let at = line_of(&flipped, 5);
    let body = flipped[at].find("\"ciphertext\":\"").expect("body") + 15;
    let mut bytes = flipped[at].clone().into_bytes();
    bytes[body] = if bytes[body] == b'A' { b'B' } else { b'A' };
    flipped[at] = String::from_utf8(bytes).expect("text");
    assert_eq!(damage(&join(&flipped)), (5, Damage::BrokenLink));

    // A byte flipped anywhere so that the line no longer parses.
    let mut garbled = original.clone();
    let at = line_of(&garbled, 6);
    garbled[at].replace_range(0..1, "[");
    assert_eq!(damage(&join(&garbled)), (6, Damage::Unreadable));

    let mut deleted = original.clone();
    deleted.remove(line_of(&deleted, 2));
    assert_eq!(damage(&join(&deleted)), (2, Damage::Gap));

    let mut reordered = original.clone();
    let (a, b) = (line_of(&reordered, 1), line_of(&reordered, 2));
    reordered.swap(a, b);
    assert_eq!(damage(&join(&reordered)), (1, Damage::Gap));

    let mut repeated = original.clone();
    let again = repeated[line_of(&repeated, 1)].clone();
    repeated.insert(line_of(&repeated, 2), again);
    assert_eq!(damage(&join(&repeated)), (1, Damage::OutOfOrder));

    // Cut short: the end line and the last records are gone.
    let cut = &original[..line_of(&original, 8)];
    assert_eq!(damage(&join(cut)), (8, Damage::Truncated));
    // Cut short, the signed end line kept: it does not match what is left.
    let mut kept_end = original[..line_of(&original, 8)].to_vec();
    kept_end.push(original.last().expect("end").clone());
    assert_eq!(damage(&join(&kept_end)), (8, Damage::Truncated));
    // Records spliced in from another node (whose key signed its own checkpoints).
    let (other, _) = chain(10, "node-b", &key(2));
    let mut spliced = original.clone();
    let at = line_of(&spliced, 3);
    spliced[at] = serde_json::to_string(&ExportLine::Record(other[3].clone())).expect("json");
    assert_eq!(damage(&join(&spliced)), (3, Damage::BrokenLink));

    // A checkpoint re-signed by another key.
    let mut resigned = original.clone();
    let forged = Checkpoint::sign(&key(2), NODE, 7, entries[7].hash, 50);
    let at = line_of(&resigned, 7) + 1;
    resigned[at] = serde_json::to_string(&ExportLine::Checkpoint(forged)).expect("json");
    assert_eq!(damage(&join(&resigned)), (7, Damage::BadSignature));

    // Lines after the end.
    let mut trailing = original.clone();
    trailing.push(original[1].clone());
    assert_eq!(damage(&join(&trailing)), (10, Damage::Unreadable));
}

/// The end line of `lines`, as JSON.
fn end_of(lines: &[String]) -> serde_json::Value {
    serde_json::from_str(lines.last().expect("end line")).expect("json")
}

/// The records and checkpoints of `lines` (after the header, up to an end line).
fn counts(lines: &[String]) -> (usize, usize) {
    let count = |prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
    (count("{\"record\":"), count("{\"checkpoint\":"))
}

/// `kept` (a header and the lines after it) closed by `end` with only its counts edited to
/// match them.
fn close_counted(kept: &[String], end: &serde_json::Value) -> Vec<String> {
    let (records, checkpoints) = counts(kept);
    let mut end = end.clone();
    end["end"]["records"] = records.into();
    end["end"]["checkpoints"] = checkpoints.into();
    let mut closed = kept.to_vec();
    closed.push(end.to_string());
    closed
}

/// `lines` cut after the checkpoint at record `sequence`, with an end line edited to match
/// what is left (counts, last record, head) and a creation time to match its stored times.
fn cut_and_refit(original: &[String], sequence: u64) -> Vec<String> {
    let at = line_of(original, sequence) + 1;
    assert!(original[at].starts_with("{\"checkpoint\":"));
    let mut cut = refit(&original[..=at], &end_of(original));
    let mut header: serde_json::Value = serde_json::from_str(&cut[0]).expect("json");
    header["created_unix_ms"] = (1_000 + sequence as i64 + 1).into();
    cut[0] = header.to_string();
    cut
}

#[test]
fn an_export_cut_after_a_checkpoint_and_refitted_fails_on_its_frame() {
    let (entries, checkpoints) = chain(12, NODE, &key(1));
    let original = lines(&export(&entries, &checkpoints, 0));
    for sequence in [3, 7] {
        let cut = cut_and_refit(&original, sequence);
        assert_eq!(frame_problem(&join(&cut)), FrameProblem::BadSignature);
    }
    // Also with the original creation time, or with only the counts fitted.
    let counted = close_counted(&original[..=line_of(&original, 7) + 1], &end_of(&original));
    assert_eq!(frame_problem(&join(&counted)), FrameProblem::BadSignature);
}

#[test]
fn a_header_edited_to_hide_a_cut_or_shift_the_range_fails_on_its_frame() {
    let (entries, checkpoints) = chain(12, NODE, &key(1));
    let original = lines(&export(&entries, &checkpoints, 4));
    let changes: [(&str, serde_json::Value); 4] = [
        ("since_unix_ms", 1_005.into()),
        ("until_unix_ms", 1_009.into()),
        ("created_unix_ms", 5_000.into()),
        ("anchor", serde_json::Value::Null),
    ];
    for (field, value) in changes {
        let mut header: serde_json::Value = serde_json::from_str(&original[0]).expect("json");
        header[field] = value;
        let mut edited = original.clone();
        edited[0] = header.to_string();
        // Without an anchor the chain no longer starts where it did: that shows first.
        if field == "anchor" {
            assert_eq!(damage(&join(&edited)), (0, Damage::Gap));
        } else {
            assert_eq!(frame_problem(&join(&edited)), FrameProblem::BadSignature);
        }
    }

    // The first records cut off and the anchor moved to the checkpoint before what is
    // left (a genuine, signed one): the chain verifies from it; the frame does not.
    let from = line_of(&original, 8);
    let mut header: serde_json::Value = serde_json::from_str(&original[0]).expect("json");
    header["anchor"] = serde_json::to_value(&checkpoints[1]).expect("json");
    assert_eq!(checkpoints[1].sequence, 7);
    let mut kept = vec![header.to_string()];
    kept.extend_from_slice(&original[from..original.len() - 1]);
    let moved = close_counted(&kept, &end_of(&original));
    assert_eq!(frame_problem(&join(&moved)), FrameProblem::BadSignature);
}

#[test]
fn a_frame_signed_by_another_key_fails_even_with_the_chain_intact() {
    let (entries, checkpoints) = chain(8, NODE, &key(1));
    let original = lines(&export(&entries, &checkpoints, 0));
    let header: ExportHeader = serde_json::from_str(&original[0]).expect("header");
    let head = ChainPoint::of(&entries[7]);
    let forged = ExportEnd::sign(&header, 8, 2, Some(head), head, &key(2));
    let mut resigned = original.clone();
    let last = resigned.len() - 1;
    resigned[last] = serde_json::to_string(&ExportLine::End(forged)).expect("json");
    assert_eq!(frame_problem(&join(&resigned)), FrameProblem::BadSignature);
}

/// `n` records of the node, their bodies changed from `fork_at` on, re-chained and signed
/// again with the node's own key: what root on the node can make of unexported history.
fn rewritten(n: u64, fork_at: u64) -> (Vec<ChainEntry>, Vec<Checkpoint>) {
    let (mut entries, _) = chain(n, NODE, &key(1));
    let mut previous = GENESIS;
    let mut checkpoints = Vec::new();
    for entry in &mut entries {
        let mut body = entry.ciphertext.clone();
        if entry.sequence >= fork_at {
            body.extend_from_slice(b" (rewritten)");
        }
        *entry = ChainEntry::new(NODE, &previous, entry.sequence, entry.unix_ms, body);
        previous = entry.hash;
        if entry.sequence % 4 == 3 || entry.sequence + 1 == n {
            checkpoints.push(Checkpoint::sign(
                &key(1),
                NODE,
                entry.sequence,
                entry.hash,
                50,
            ));
        }
    }
    (entries, checkpoints)
}

#[test]
fn a_later_export_must_extend_the_head_held_from_an_earlier_one() {
    let (entries, checkpoints) = chain(10, NODE, &key(1));
    let (held, _) = verify_after(&export(&entries, &checkpoints, 0), None).expect("intact");
    let held = held.end.head;
    assert_eq!(held, ChainPoint::of(&entries[9]));

    // The node went on: the same chain, longer; whole or from a checkpoint before the head.
    let (longer, longer_checkpoints) = chain(16, NODE, &key(1));
    for from in [0, 8] {
        let next = export(&longer, &longer_checkpoints, from);
        assert!(verify_after(&next, Some(held)).is_ok());
    }

    // An older export handed over as the newer one.
    let (older, older_checkpoints) = chain(6, NODE, &key(1));
    let older = export(&older, &older_checkpoints, 0);
    assert!(verify(&older).is_ok(), "it verifies on its own");
    assert!(matches!(
        verify_after(&older, Some(held)),
        Err(ExportError::Discontinuous(ContinuityError::Older { .. }))
    ));

    // History from record 5 rewritten, re-chained and re-signed with the node key, then
    // grown past the held head: it verifies on its own, not as the held chain's sequel.
    let (fork, fork_checkpoints) = rewritten(14, 5);
    let forked = export(&fork, &fork_checkpoints, 0);
    assert!(verify(&forked).is_ok(), "it verifies on its own");
    match verify_after(&forked, Some(held)) {
        Err(ExportError::Discontinuous(found)) => assert_eq!(
            found,
            ContinuityError::Forked {
                sequence: 9,
                held: entries[9].hash,
                found: fork[9].hash
            }
        ),
        other => panic!("expected a fork, got {other:?}"),
    }
}

#[test]
fn a_forged_anchor_or_foreign_key_is_refused() {
    let (entries, checkpoints) = chain(10, NODE, &key(1));
    let original = export(&entries, &checkpoints, 4);
    let mut header: ExportHeader =
        serde_json::from_str(original.lines().next().expect("header")).expect("header");
    header.anchor = Some(Checkpoint::sign(&key(2), NODE, 3, entries[3].hash, 60));
    let rest: String = original.lines().skip(1).map(|l| format!("{l}\n")).collect();
    let forged = format!("{}\n{rest}", serde_json::to_string(&header).expect("json"));
    assert_eq!(damage(&forged), (3, Damage::BadSignature));

    // A prune marker anchors as well as a checkpoint does.
    let marker =
        Checkpoint::sign_kind(CheckpointKind::Prune, &key(1), NODE, 3, entries[3].hash, 60);
    let pruned = export_anchored(&entries, &checkpoints, 4, Some(marker));
    assert!(verify(&pruned).is_ok());
}

#[test]
fn other_files_are_not_taken_for_exports() {
    assert!(matches!(
        verify("hello\n"),
        Err(ExportError::NotAnExport(_))
    ));
    assert!(matches!(
        verify("{\"moat_audit_export\": 9}\n"),
        Err(ExportError::UnsupportedVersion(9))
    ));
    assert!(matches!(verify(""), Err(ExportError::NotAnExport(_))));
    // Version 1 had no signed frame: refused, whatever else it holds.
    assert!(matches!(
        verify("{\"moat_audit_export\": 1, \"node_id\": \"node-a\"}\n"),
        Err(ExportError::UnsignedFrame)
    ));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// However an export is cut short, an end line refitted to what is left (counts, last
    /// record, head) does not make it verify.
    #[test]
    fn no_cut_of_an_export_verifies_whatever_its_end_says(n in 1u64..24, at in 0usize..1000) {
        let (entries, checkpoints) = chain(n, NODE, &key(1));
        let original = lines(&export(&entries, &checkpoints, 0));
        // Keep the header and the body lines before `cut`: at least one body line goes.
        let cut = 1 + at % (original.len() - 2);
        let refitted = refit(&original[..cut], &end_of(&original));
        proptest::prop_assert!(verify(&join(&refitted)).is_err());
    }
}

/// `kept` (a header and the lines after it) closed by `end` with its counts, last record
/// and head edited to match them, as someone without the node key would.
fn refit(kept: &[String], end: &serde_json::Value) -> Vec<String> {
    let last = kept
        .iter()
        .rev()
        .find_map(|l| match serde_json::from_str(l) {
            Ok(ExportLine::Record(entry)) => Some(ChainPoint::of(&entry)),
            _ => None,
        });
    let mut end = end.clone();
    end["end"]["last"] = serde_json::to_value(last).expect("json");
    if let Some(last) = last {
        end["end"]["head"] = serde_json::to_value(last).expect("json");
    }
    close_counted(kept, &end)
}
