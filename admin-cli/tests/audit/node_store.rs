//! Audit stores written as moatd writes them: sled laid out as `moat_core::audit::layout`
//! says, bodies age-encrypted to two auditors, chained, signed at checkpoints.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use moat_core::audit::encoding::hex;
use moat_core::audit::layout::{self, NodeInfo};
use moat_core::audit::{AuditRecord, ChainEntry, Checkpoint, CheckpointKind, GENESIS};

/// 2026-11-29T10:00:00Z: record `n` is stored `n` minutes later.
pub const T0_MS: i64 = 1_795_946_400_000;
/// A checkpoint is signed after every this many records, and after the last.
pub const CHECKPOINT_EVERY: u64 = 5;

/// The stored time of record `sequence`.
pub fn stored_at(sequence: u64) -> i64 {
    T0_MS + sequence as i64 * 60_000
}

/// The two auditors every record is encrypted to.
pub struct Auditors {
    pub first: age::x25519::Identity,
    pub second: age::x25519::Identity,
}

impl Auditors {
    pub fn generate() -> Self {
        Self {
            first: age::x25519::Identity::generate(),
            second: age::x25519::Identity::generate(),
        }
    }

    /// Writes `identity` as an age identity file (with a comment, as age-keygen does).
    pub fn identity_file(dir: &Path, name: &str, identity: &age::x25519::Identity) -> PathBuf {
        use age::secrecy::ExposeSecret as _;
        let path = dir.join(name);
        let text = format!(
            "# created: 2026-11-29T09:00:00Z\n# public key: {}\n{}\n",
            identity.to_public(),
            identity.to_string().expose_secret()
        );
        std::fs::write(&path, text).expect("identity file");
        path
    }
}

/// A node's store in a directory, with what it holds in plaintext.
pub struct NodeStore {
    pub dir: PathBuf,
    pub node_id: String,
    pub key: SigningKey,
    /// Record `i` is sequence `i`.
    pub records: Vec<AuditRecord>,
    pub entries: Vec<ChainEntry>,
}

impl NodeStore {
    /// Writes `count` records of node `node_id` (signing key from `seed`) to a new store in
    /// `dir`, and the key to `audit-signing.key` beside it, as moatd keeps them in its state
    /// directory.
    pub fn write(dir: &Path, node_id: &str, seed: u8, count: u64, auditors: &Auditors) -> Self {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let key_file = signing_key_file(dir);
        std::fs::create_dir_all(key_file.parent().expect("a state directory")).expect("dir");
        std::fs::write(&key_file, format!("{}\n", hex(key.as_bytes()))).expect("key file");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let db = open(dir);
        let meta = db.open_tree(layout::META).expect("meta tree");
        let node = NodeInfo {
            node_id: node_id.into(),
            public_key: key.verifying_key().to_bytes(),
        };
        meta.insert(layout::NODE_KEY, serde_json::to_vec(&node).expect("json"))
            .expect("node identity");
        drop(meta);
        close(db, dir);
        let mut store = Self {
            dir: dir.to_path_buf(),
            node_id: node_id.into(),
            key,
            records: Vec::new(),
            entries: Vec::new(),
        };
        store.chain_from(0, count, auditors, "");
        store
    }

    pub fn key_hex(&self) -> String {
        hex(&self.key.verifying_key().to_bytes())
    }

    /// `count` more records, as the node goes on (checkpoints as [`NodeStore::write`] signs
    /// them).
    pub fn grow(&mut self, count: u64, auditors: &Auditors) {
        self.chain_from(self.entries.len() as u64, count, auditors, "");
    }

    /// Rewrites history from record `from` on, as root on the node can: the records from
    /// there replaced by `count` others, chained again and their checkpoints signed again
    /// with the node's own key.
    pub fn rewrite_from(&mut self, from: u64, count: u64, auditors: &Auditors) {
        self.chain_from(from, count, auditors, "rewritten ");
    }

    /// Replaces the records from `from` on by `count` records whose subjects start with
    /// `tag`, chained from record `from - 1`.
    fn chain_from(&mut self, from: u64, count: u64, auditors: &Auditors, tag: &str) {
        let db = open(&self.dir);
        let records = db.open_tree(layout::RECORDS).expect("records tree");
        let checkpoints = db.open_tree(layout::CHECKPOINTS).expect("checkpoints tree");
        for tree in [&records, &checkpoints] {
            for sequence in from..self.entries.len() as u64 {
                tree.remove(layout::sequence_key(sequence))
                    .expect("removed");
            }
        }
        self.entries.truncate(from as usize);
        self.records.truncate(from as usize);
        let mut previous = from
            .checked_sub(1)
            .map_or(GENESIS, |p| self.entries[p as usize].hash);
        let end = from + count;
        for sequence in from..end {
            let mut record = record(&self.node_id, sequence);
            record.subject = format!("{tag}{}", record.subject);
            let ciphertext = encrypt(&record.to_bytes(), auditors);
            let entry = ChainEntry::new(
                &self.node_id,
                &previous,
                sequence,
                stored_at(sequence),
                ciphertext,
            );
            records
                .insert(layout::sequence_key(sequence), layout::encode_entry(&entry))
                .expect("record stored");
            if sequence % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1 || sequence + 1 == end {
                let checkpoint = Checkpoint::sign(
                    &self.key,
                    &self.node_id,
                    sequence,
                    entry.hash,
                    stored_at(sequence) / 1000,
                );
                checkpoints
                    .insert(
                        layout::sequence_key(sequence),
                        serde_json::to_vec(&checkpoint).expect("json"),
                    )
                    .expect("checkpoint stored");
            }
            previous = entry.hash;
            self.records.push(record);
            self.entries.push(entry);
        }
        drop((records, checkpoints));
        close(db, &self.dir);
    }

    /// Prunes records and checkpoints up to `through` (a checkpoint's sequence) as moatd
    /// does: the signed prune marker first, then the removal.
    pub fn prune(&self, through: u64) {
        let db = open(&self.dir);
        let marker = Checkpoint::sign_kind(
            CheckpointKind::Prune,
            &self.key,
            &self.node_id,
            through,
            self.entries[through as usize].hash,
            stored_at(through) / 1000 + 3600,
        );
        db.open_tree(layout::META)
            .expect("meta")
            .insert(
                layout::PRUNE_KEY,
                serde_json::to_vec(&marker).expect("json"),
            )
            .expect("marker");
        for name in [layout::RECORDS, layout::CHECKPOINTS] {
            let tree = db.open_tree(name).expect("tree");
            for sequence in 0..=through {
                tree.remove(layout::sequence_key(sequence))
                    .expect("removed");
            }
        }
        db.flush().expect("flushed");
    }

    /// Runs `change` on the store's records tree.
    pub fn tamper(&self, change: impl FnOnce(&sled::Tree)) {
        let db = open(&self.dir);
        change(&db.open_tree(layout::RECORDS).expect("records"));
        close(db, &self.dir);
    }

    /// The stored value of record `sequence`.
    pub fn stored_value(&self, sequence: u64) -> Vec<u8> {
        layout::encode_entry(&self.entries[sequence as usize])
    }
}

/// Where moatd keeps the node key of the store in `dir`: beside it.
pub fn signing_key_file(dir: &Path) -> PathBuf {
    dir.parent()
        .expect("a store inside a state directory")
        .join(layout::SIGNING_KEY_FILE)
}

/// Opens the store in `dir` as moatd does.
pub fn open(dir: &Path) -> sled::Db {
    sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .open()
        .expect("sled opens")
}

/// Closes the store in `dir` (no tree of it may be open) and waits until its lock is
/// released, so that moatctl finds it as a stopped moatd leaves it.
pub fn close(db: sled::Db, dir: &Path) {
    db.flush().expect("flushed");
    drop(db);
    let file = std::fs::File::open(dir.join("db")).expect("the store's db file");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Err(std::fs::TryLockError::WouldBlock) = file.try_lock() {
        assert!(
            std::time::Instant::now() < deadline,
            "sled never released {}",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// `plaintext` as an age file to both auditors.
fn encrypt(plaintext: &[u8], auditors: &Auditors) -> Vec<u8> {
    let recipients = [auditors.first.to_public(), auditors.second.to_public()];
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .expect("recipients");
    let mut ciphertext = Vec::new();
    let mut writer = encryptor.wrap_output(&mut ciphertext).expect("age header");
    writer.write_all(plaintext).expect("encrypted");
    writer.finish().expect("finished");
    ciphertext
}

/// Record `sequence` of `node_id`: requests of several departments, an admin action, text
/// kept in full and as a hash, findings, and a subject a spreadsheet would run as a
/// formula.
pub fn record(node_id: &str, sequence: u64) -> AuditRecord {
    let admin = sequence % 7 == 6;
    let department = ["finance", "legal", "hr"][sequence as usize % 3];
    let value = serde_json::json!({
        "kind": if admin { "admin" } else { "request" },
        "unix_ms": stored_at(sequence) - 40,
        "node_id": node_id,
        "request_id": format!("req-{sequence}"),
        "department": department,
        "subject": if sequence == 2 { "=HYPERLINK(\"http://evil\",\"x\")".to_owned() } else { format!("user{sequence}") },
        "source_address": "10.0.0.7",
        "model": if admin { "" } else { "smollm2@1.0.0" },
        "action": if admin { "policy_reload" } else { "chat" },
        "decision": if sequence % 4 == 3 { "deny" } else { "allow" },
        "reason": if sequence % 4 == 3 { "content.card_number" } else { "allow" },
        "classification": "internal",
        "findings": if sequence % 4 == 3 {
            serde_json::json!([{"detector": "card_number", "count": 1}, {"detector": "email", "count": 2}])
        } else {
            serde_json::json!([])
        },
        "prompt_tokens": 10 + sequence,
        "completion_tokens": if admin { 0 } else { 5 },
        "latency_ms": 12,
        "status": if admin { 0 } else if sequence % 4 == 3 { 403 } else { 200 },
        "prompt": if sequence.is_multiple_of(2) {
            serde_json::json!({"kept": "full", "text": format!("question {sequence}, with \"quotes\"\nand a line")})
        } else {
            serde_json::json!({"kept": "sha256", "sha256": "ab".repeat(32)})
        },
        "answer": if admin { serde_json::Value::Null } else { serde_json::json!({"kept": "full", "text": "-1 is the answer"}) },
    });
    serde_json::from_value(value).expect("an audit record")
}
