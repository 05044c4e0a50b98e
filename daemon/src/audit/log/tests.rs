use super::*;
use moat_core::audit::export::source::ExportSource;
use moat_core::audit::layout;
use moat_core::audit::{GENESIS, RetainedText, Retention, verify_chain};
use std::io::Read as _;
use std::path::Path;

fn record(n: u64, unix_ms: i64, prompt: &str) -> AuditRecord {
    AuditRecord {
        kind: RecordKind::Request,
        unix_ms,
        node_id: "node-a".into(),
        request_id: format!("r{n}"),
        department: "finance".into(),
        subject: "alice".into(),
        source_address: "10.0.0.7".into(),
        model: "smollm2".into(),
        action: "chat".into(),
        decision: "allow".into(),
        reason: "allow".into(),
        classification: "internal".into(),
        findings: Vec::new(),
        prompt_tokens: 3,
        completion_tokens: 5,
        latency_ms: 12,
        status: 200,
        prompt: RetainedText::keep(Retention::Full, prompt),
        answer: None,
        detail: None,
    }
}

fn settings(dir: &Path, key: &SigningKey) -> AuditSettings {
    AuditSettings {
        store_directory: dir.join("audit"),
        node: NodeInfo {
            node_id: "node-a".into(),
            public_key: key.verifying_key().to_bytes(),
        },
        checkpoint_every_records: 1000,
        checkpoint_every: Duration::from_secs(3600),
        retention: None,
        write_timeout: Duration::from_secs(5),
    }
}

fn decrypt(identity: &age::x25519::Identity, ciphertext: &[u8]) -> AuditRecord {
    let decryptor = age::Decryptor::new(ciphertext).expect("age file");
    let mut reader = decryptor
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .expect("decrypts");
    let mut plaintext = Vec::new();
    reader.read_to_end(&mut plaintext).expect("reads");
    AuditRecord::from_bytes(&plaintext).expect("record")
}

/// Everything the store holds, verified from its start.
fn verified(dir: &Path, key: &SigningKey) -> (Vec<moat_core::audit::ChainEntry>, usize) {
    let store = Store::open(&dir.join("audit"), &settings(dir, key).node).expect("opens");
    let start = match store.prune_marker().expect("marker") {
        Some(marker) => (marker.sequence + 1, marker.head),
        None => (0, GENESIS),
    };
    let reader = store.reader();
    let entries: Vec<_> = reader
        .records(0..=u64::MAX)
        .collect::<Result<_, _>>()
        .expect("entries");
    let checkpoints: Vec<_> = reader
        .checkpoints(0..=u64::MAX)
        .collect::<Result<_, _>>()
        .expect("checkpoints");
    let chain = verify_chain(
        "node-a",
        &key.verifying_key(),
        start,
        &entries,
        &checkpoints,
    )
    .expect("the chain verifies");
    (entries, chain.unsigned_tail)
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn concurrent_records_are_encrypted_chained_in_groups_and_signed_at_close() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = SigningKey::from_bytes(&[7; 32]);
    let auditor = age::x25519::Identity::generate();
    let second = age::x25519::Identity::generate();
    let canary = "CANARY-4f1d-prompt";
    let log = AuditLog::start(
        settings(dir.path(), &key),
        vec![auditor.to_public(), second.to_public()],
        key.clone(),
    )
    .expect("starts");
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                (0..25)
                    .map(|n| {
                        log.append_blocking(record(t * 100 + n, now_unix_ms(), canary))
                            .expect("durable")
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut sequences: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    sequences.sort_unstable();
    assert_eq!(sequences, (0..200).collect::<Vec<_>>());
    log.close().expect("final checkpoint");
    assert!(matches!(
        log.append_blocking(record(0, 0, "late")),
        Err(AuditError::Closed)
    ));

    let (entries, unsigned) = verified(dir.path(), &key);
    assert_eq!((entries.len(), unsigned), (200, 0));
    // Either auditor reads every record; nothing readable is on disk.
    let first = decrypt(&second, &entries[0].ciphertext);
    assert_eq!(first.prompt, RetainedText::keep(Retention::Full, canary));
    for file in walk(dir.path()) {
        let bytes = std::fs::read(&file).expect("read");
        assert!(
            !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
            "plaintext in {}",
            file.display()
        );
        assert!(
            !bytes.windows(16).any(|w| w == b"AGE-SECRET-KEY-1"),
            "an age identity in {}",
            file.display()
        );
    }
}

#[test]
fn checkpoints_come_every_n_records_and_the_chain_goes_on_after_reopening() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = SigningKey::from_bytes(&[7; 32]);
    let auditor = age::x25519::Identity::generate();
    let mut every_ten = settings(dir.path(), &key);
    every_ten.checkpoint_every_records = 10;
    for round in 0..2 {
        let log = AuditLog::start(every_ten.clone(), vec![auditor.to_public()], key.clone())
            .expect("starts");
        for n in 0..25 {
            let sequence = log
                .append_blocking(record(n, now_unix_ms(), "p"))
                .expect("durable");
            assert_eq!(sequence, round * 25 + n);
        }
        // Dropped without close, as after a crash: the tail is unsigned.
        drop(log);
    }
    let (entries, unsigned) = verified(dir.path(), &key);
    assert_eq!(entries.len(), 50);
    assert!(unsigned < 10, "{unsigned} unsigned");
    let store = Store::open(&dir.path().join("audit"), &every_ten.node).expect("opens");
    assert!(
        store
            .reader()
            .checkpoint_sequences()
            .expect("checkpoints")
            .len()
            >= 4
    );
}

#[test]
fn a_store_of_another_node_or_key_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = SigningKey::from_bytes(&[7; 32]);
    let auditor = age::x25519::Identity::generate();
    let log = AuditLog::start(
        settings(dir.path(), &key),
        vec![auditor.to_public()],
        key.clone(),
    )
    .expect("starts");
    log.close().expect("closes");
    drop(log);
    let other_key = SigningKey::from_bytes(&[8; 32]);
    let error = AuditLog::start(
        settings(dir.path(), &other_key),
        vec![auditor.to_public()],
        other_key,
    )
    .expect_err("another key");
    assert!(matches!(error, AuditError::ForeignStore { .. }), "{error}");
    let error = AuditLog::start(settings(dir.path(), &key), Vec::new(), key.clone())
        .expect_err("no recipients");
    assert!(matches!(error, AuditError::NoRecipients));
}

#[test]
fn pruning_keeps_what_no_checkpoint_covers_and_leaves_a_verifiable_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = SigningKey::from_bytes(&[7; 32]);
    let auditor = age::x25519::Identity::generate();
    let mut config = settings(dir.path(), &key);
    config.checkpoint_every_records = 10;
    let day_ms = 86_400_000;
    let now = now_unix_ms();
    {
        let log = AuditLog::start(config.clone(), vec![auditor.to_public()], key.clone())
            .expect("starts");
        // 25 records ten days old (checkpoints after 9 and 19), then 5 new ones.
        for n in 0..25 {
            log.append_blocking(record(n, now - 10 * day_ms, "old"))
                .expect("durable");
        }
        for n in 25..30 {
            log.append_blocking(record(n, now, "new")).expect("durable");
        }
        log.close().expect("closes");
    }
    config.retention = Some(Duration::from_secs(7 * 86_400));
    let log =
        AuditLog::start(config.clone(), vec![auditor.to_public()], key.clone()).expect("prunes");
    log.close().expect("closes");
    drop(log);
    let (entries, unsigned) = verified(dir.path(), &key);
    // Old records 20..24 stay: the checkpoint covering them also covers new records.
    assert_eq!(entries.first().map(|e| e.sequence), Some(20));
    assert_eq!((entries.len(), unsigned), (10, 0));
    let store = Store::open(&dir.path().join("audit"), &config.node).expect("opens");
    let marker = store.prune_marker().expect("read").expect("a prune marker");
    assert_eq!(marker.sequence, 19);
    assert!(marker.is_signed_by(&key.verifying_key()));
    assert_eq!(store.reader().records(0..=19).count(), 0);
    drop(store);
    // The meta tree names the node.
    let db = sled::open(dir.path().join("audit")).expect("sled");
    let node = db
        .open_tree(layout::META)
        .expect("meta")
        .get(layout::NODE_KEY)
        .expect("read")
        .expect("node");
    let node: NodeInfo = serde_json::from_slice(&node).expect("json");
    assert_eq!(node.node_id, "node-a");
}

#[test]
fn an_export_shows_the_chain_up_to_its_snapshot_and_signs_that_head() {
    use moat_core::audit::ChainPoint;
    use moat_core::audit::export::select::TimeRange;
    use moat_core::audit::export::{ExportReader, read_header};

    let dir = tempfile::tempdir().expect("temp dir");
    let key = SigningKey::from_bytes(&[7; 32]);
    let config = settings(dir.path(), &key);
    let mut store = Store::open(&config.store_directory, &config.node).expect("opens");
    let sealed = |n: i64| Sealed {
        unix_ms: 1_000 + n,
        ciphertext: format!("body {n}").into_bytes(),
    };
    store.append((0..6).map(sealed).collect()).expect("durable");
    store.checkpoint(&key, 50).expect("signed");
    let snapshot = store.snapshot(&key);
    // Records the committer adds while the export runs are not part of it.
    store.append((6..9).map(sealed).collect()).expect("durable");
    store.checkpoint(&key, 60).expect("signed");

    let (exported, bytes) = snapshot
        .write(TimeRange::default(), 2_000, Vec::new(), &mut |_| {})
        .expect("written");
    assert_eq!(exported.selection.sequences(), 0..=5);
    let mut input = bytes.as_slice();
    let header = read_header(&mut input).expect("header");
    let verifying = key.verifying_key();
    let verified = ExportReader::new(input, header, &verifying)
        .expect("reader")
        .finish()
        .expect("the export verifies, frame and all");
    let fifth = store.reader().records(5..=5).next().expect("record 5");
    let head = ChainPoint::of(&fifth.expect("readable"));
    assert_eq!(verified.end.head, head);
    assert_eq!((verified.end.records, verified.end.checkpoints), (6, 1));

    // A key other than the node's signs nothing.
    let other = SigningKey::from_bytes(&[8; 32]);
    let refused =
        store
            .snapshot(&other)
            .write(TimeRange::default(), 2_000, Vec::new(), &mut |_| {});
    assert!(matches!(
        refused,
        Err(moat_core::audit::export::source::WriteExportError::WrongKey { .. })
    ));
}

/// Someone sets the clock forward (an admin, a wrong NTP server) to have records deleted
/// early: records inside their retention survive it, whether moatd restarts with the new
/// time or it changes while moatd runs and a checkpoint is signed with it.
#[test]
fn a_clock_set_forward_prunes_no_record_inside_its_retention() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = SigningKey::from_bytes(&[7; 32]);
    let mut config = settings(dir.path(), &key);
    config.retention = Some(Duration::from_secs(30 * 86_400));
    let day_ms = 86_400_000;
    let now = now_unix_ms();
    let mut store = Store::open(&config.store_directory, &config.node).expect("opens");
    // One record a day for the last ten days, each signed at its end.
    for age in (1..=10).rev() {
        let made = now - age * day_ms;
        let sealed = Sealed {
            unix_ms: made,
            ciphertext: format!("day -{age}").into_bytes(),
        };
        store.append(vec![sealed]).expect("durable");
        store.checkpoint(&key, made / 1000 + 60).expect("signed");
    }
    let stored = |committer: &mut Committer| {
        let store = committer.store().expect("store");
        store.reader().records(0..=u64::MAX).count()
    };

    // moatd starts with the clock 400 days on.
    let forward = now + 400 * day_ms;
    let mut committer = Committer::new(config.clone(), key.clone(), store, forward);
    committer.prune_at(forward, forward);
    assert_eq!(stored(&mut committer), 10);
    assert!(matches!(
        committer.held,
        Some(PruneHold::AheadOfChain { .. })
    ));

    // moatd started with the clock right; an hour on the clock jumps 400 days and a record
    // is signed at that time before the next prune.
    let store = committer.store.take().expect("store");
    let mut committer = Committer::new(config, key.clone(), store, now);
    let store = committer.store().expect("store");
    let sealed = Sealed {
        unix_ms: forward,
        ciphertext: b"after the jump".to_vec(),
    };
    store.append(vec![sealed]).expect("durable");
    store.checkpoint(&key, forward / 1000).expect("signed");
    committer.prune_at(forward + 3_600_000, now + 3_600_000);
    assert_eq!(stored(&mut committer), 11);
    assert!(matches!(committer.held, Some(PruneHold::SetForward { .. })));
    assert!(
        committer
            .store()
            .expect("store")
            .prune_marker()
            .expect("read")
            .is_none()
    );
}
