use moat_core::audit::GENESIS;

use super::*;

/// A store of `count` chained records from node `a`, as moatd lays it out.
fn store(dir: &Path, count: u64) -> sled::Db {
    let db = sled::Config::new().path(dir).open().expect("opens");
    let node = NodeInfo {
        node_id: "a".into(),
        public_key: [7; 32],
    };
    let meta = db.open_tree(layout::META).expect("meta");
    let value = serde_json::to_vec(&node).expect("node");
    meta.insert(layout::NODE_KEY, value).expect("node");
    let records = db.open_tree(layout::RECORDS).expect("records");
    let mut previous = GENESIS;
    for sequence in 0..count {
        let entry = ChainEntry::new("a", &previous, sequence, 1_000 + sequence as i64, vec![1]);
        records
            .insert(layout::sequence_key(sequence), layout::encode_entry(&entry))
            .expect("record");
        previous = entry.hash;
    }
    db
}

#[test]
fn a_view_cut_at_the_head_shows_nothing_after_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = store(dir.path(), 5);
    let all = AuditReader::open(dir.path(), &db).expect("reader");
    assert_eq!(all.node().expect("node").node_id, "a");
    assert_eq!(all.head().expect("head").map(|h| h.sequence), Some(4));
    let cut = all.clone().before(3);
    assert_eq!(cut.head().expect("head").map(|h| h.sequence), Some(2));
    let times = cut.record_times(&mut || {}).expect("times");
    assert_eq!(times, [(0, 1_000), (1, 1_001), (2, 1_002)]);
    assert_eq!(cut.records(1..=9).count(), 2);
    assert_eq!(all.records(1..=9).count(), 4);
    assert_eq!(all.clone().before(0).head().expect("head"), None);
}

#[test]
fn a_record_too_short_for_its_time_is_named_as_damage() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = store(dir.path(), 5);
    let records = db.open_tree(layout::RECORDS).expect("records");
    records
        .insert(layout::sequence_key(3), vec![0; 4])
        .expect("cut");
    let reader = AuditReader::open(dir.path(), &db).expect("reader");
    let error = reader.record_times(&mut || {}).expect_err("damaged");
    assert!(
        matches!(
            error,
            ReadError::Unreadable {
                what: StoredItem::Record(3),
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("record 3 cannot be read"),
        "{error}"
    );
}

#[test]
fn a_store_without_a_node_identity_says_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = sled::Config::new().path(dir.path()).open().expect("opens");
    let reader = AuditReader::open(dir.path(), &db).expect("reader");
    assert!(matches!(reader.node(), Err(ReadError::NoNode { .. })));
}

#[test]
fn only_unfinished_snapshots_are_removed() {
    let dir = tempfile::tempdir().expect("temp dir");
    for name in ["snap.00000001.generating", "snap.00000002", "db"] {
        std::fs::write(dir.path().join(name), b"x").expect("write");
    }
    let mut reported = Vec::new();
    remove_unfinished_snapshots(dir.path(), &mut |file| reported.push(file.to_path_buf()))
        .expect("removes");
    assert_eq!(reported, [dir.path().join("snap.00000001.generating")]);
    assert!(!reported[0].exists());
    assert!(dir.path().join("snap.00000002").exists());
}
