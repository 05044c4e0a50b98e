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

/// The export of `entries[from..]` (anchored at the checkpoint before `from`, if any).
fn export(entries: &[ChainEntry], checkpoints: &[Checkpoint], from: usize) -> String {
    let signer = key(1);
    let anchor = from
        .checked_sub(1)
        .map(|before| Checkpoint::sign(&signer, NODE, before as u64, entries[before].hash, 60));
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
    let (bytes, _) = writer.finish().expect("end");
    String::from_utf8(bytes).expect("text")
}

fn verify(text: &str) -> Result<(VerifiedChain, usize), ExportError> {
    let mut input = text.as_bytes();
    let header = read_header(&mut input)?;
    let key = header.verifying_key()?;
    let mut reader = ExportReader::new(input, header, &key)?;
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
    // Cut short after a checkpoint, end line forged to match: the chain is intact, but the
    // latest signature shown is not the export's last one.
    let mut forged_end = original[..line_of(&original, 8)].to_vec();
    forged_end.push(r#"{"end":{"records":8,"checkpoints":2}}"#.into());
    let (verified, _) = verify(&join(&forged_end)).expect("intact prefix");
    assert_eq!(verified.last_checkpoint, Some((7, 50)));
    let (whole, _) = verify(&join(&original)).expect("intact");
    assert_eq!(whole.last_checkpoint, Some((9, 50)));
    // A count that does not match what is there.
    let mut miscounted = original[..line_of(&original, 8)].to_vec();
    miscounted.push(r#"{"end":{"records":10,"checkpoints":3}}"#.into());
    assert_eq!(damage(&join(&miscounted)), (8, Damage::Truncated));

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
    header.anchor = Some(Checkpoint::sign_kind(
        CheckpointKind::Prune,
        &key(1),
        NODE,
        3,
        entries[3].hash,
        60,
    ));
    let pruned = format!("{}\n{rest}", serde_json::to_string(&header).expect("json"));
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
}
