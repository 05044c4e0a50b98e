//! The audit store: records encrypted to the auditors, chained, signed at checkpoints, and
//! durable on disk before an answer leaves.
//!
//! Storage is sled (0.34) under the state directory: tree `records` maps the big-endian
//! sequence number to a stored [`ChainEntry`], tree `checkpoints` maps it to a signed
//! [`Checkpoint`]. Bodies are age-encrypted to the configured X25519 recipients; moatd holds
//! no identity and cannot read what it stored. `sled::Db::flush` does not reach the disk's
//! cache on Linux, so every append also syncs sled's files (fsync) before it returns.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::Mutex;

use ed25519_dalek::SigningKey;
use moat_core::audit::{AuditRecord, ChainEntry, Checkpoint, GENESIS};

/// Why the audit store failed. A request whose record fails is answered 503.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("no auditor recipient is configured: moatd must encrypt every record to at least one")]
    NoRecipients,
    #[error("auditor recipient {index} is not an age X25519 recipient (age1...): {reason}")]
    BadRecipient { index: usize, reason: String },
    #[error("cannot open the audit store in {dir}: {reason}")]
    Open { dir: PathBuf, reason: String },
    #[error("the audit store holds a damaged entry at record {sequence}")]
    Damaged { sequence: u64 },
    #[error("cannot encrypt an audit record: {0}")]
    Encrypt(String),
    #[error("cannot write the audit record durably: {0}")]
    Write(String),
}

/// Where the chain stands: the next sequence number and the hash it continues from.
#[derive(Debug, Clone, Copy)]
struct ChainHead {
    next: u64,
    previous: [u8; 32],
}

/// The node's audit store.
pub struct AuditStore {
    dir: PathBuf,
    node_id: String,
    db: sled::Db,
    records: sled::Tree,
    checkpoints: sled::Tree,
    recipients: Vec<age::x25519::Recipient>,
    head: Mutex<ChainHead>,
}

impl std::fmt::Debug for AuditStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditStore")
            .field("dir", &self.dir)
            .field("node_id", &self.node_id)
            .field("recipients", &self.recipients.len())
            .finish_non_exhaustive()
    }
}

/// Parses auditor recipients (`age1...`); at least one is required.
pub fn parse_recipients(texts: &[String]) -> Result<Vec<age::x25519::Recipient>, AuditError> {
    if texts.is_empty() {
        return Err(AuditError::NoRecipients);
    }
    texts
        .iter()
        .enumerate()
        .map(|(index, text)| {
            age::x25519::Recipient::from_str(text.trim()).map_err(|reason| {
                AuditError::BadRecipient {
                    index,
                    reason: reason.to_string(),
                }
            })
        })
        .collect()
}

impl AuditStore {
    /// Opens (or creates) the store in `dir` and finds where the chain stands.
    pub fn open(
        dir: &Path,
        node_id: &str,
        recipients: Vec<age::x25519::Recipient>,
    ) -> Result<Self, AuditError> {
        if recipients.is_empty() {
            return Err(AuditError::NoRecipients);
        }
        let open_error = |reason: String| AuditError::Open {
            dir: dir.to_path_buf(),
            reason,
        };
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| open_error(e.to_string()))?;
        let records = db
            .open_tree("records")
            .map_err(|e| open_error(e.to_string()))?;
        let checkpoints = db
            .open_tree("checkpoints")
            .map_err(|e| open_error(e.to_string()))?;
        let head = match records.last().map_err(|e| open_error(e.to_string()))? {
            None => ChainHead {
                next: 0,
                previous: GENESIS,
            },
            Some((_, value)) => {
                let entry = decode_entry(&value)?;
                ChainHead {
                    next: entry.sequence + 1,
                    previous: entry.hash,
                }
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            node_id: node_id.to_owned(),
            db,
            records,
            checkpoints,
            recipients,
            head: Mutex::new(head),
        })
    }

    /// Encrypts, chains and stores one record, and returns once it is on disk.
    pub fn append(&self, record: &AuditRecord) -> Result<u64, AuditError> {
        let ciphertext = self.encrypt(&record.to_bytes())?;
        let mut head = self
            .head
            .lock()
            .map_err(|_| AuditError::Write("the chain lock is poisoned".into()))?;
        let entry = ChainEntry::new(&self.node_id, &head.previous, head.next, ciphertext);
        let value = serde_json::to_vec(&entry).map_err(|e| AuditError::Write(e.to_string()))?;
        self.records
            .insert(entry.sequence.to_be_bytes(), value)
            .map_err(|e| AuditError::Write(e.to_string()))?;
        self.make_durable()?;
        *head = ChainHead {
            next: entry.sequence + 1,
            previous: entry.hash,
        };
        Ok(entry.sequence)
    }

    /// Signs a checkpoint over the chain head (if any record exists) and stores it durably.
    pub fn checkpoint(
        &self,
        key: &SigningKey,
        unix_time: i64,
    ) -> Result<Option<Checkpoint>, AuditError> {
        let head = *self
            .head
            .lock()
            .map_err(|_| AuditError::Write("the chain lock is poisoned".into()))?;
        let Some(sequence) = head.next.checked_sub(1) else {
            return Ok(None);
        };
        let checkpoint = Checkpoint::sign(key, &self.node_id, sequence, head.previous, unix_time);
        let value =
            serde_json::to_vec(&checkpoint).map_err(|e| AuditError::Write(e.to_string()))?;
        self.checkpoints
            .insert(sequence.to_be_bytes(), value)
            .map_err(|e| AuditError::Write(e.to_string()))?;
        self.make_durable()?;
        Ok(Some(checkpoint))
    }

    /// Every stored entry, in order.
    pub fn entries(&self) -> Result<Vec<ChainEntry>, AuditError> {
        self.records
            .iter()
            .map(|item| {
                let (_, value) = item.map_err(|e| AuditError::Write(e.to_string()))?;
                decode_entry(&value)
            })
            .collect()
    }

    /// Every stored checkpoint, in order.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, AuditError> {
        self.checkpoints
            .iter()
            .map(|item| {
                let (key, value) = item.map_err(|e| AuditError::Write(e.to_string()))?;
                serde_json::from_slice(&value).map_err(|_| AuditError::Damaged {
                    sequence: sequence_of(&key),
                })
            })
            .collect()
    }

    fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, AuditError> {
        let encryptor = age::Encryptor::with_recipients(
            self.recipients.iter().map(|r| r as &dyn age::Recipient),
        )
        .map_err(|e| AuditError::Encrypt(e.to_string()))?;
        let mut ciphertext = Vec::with_capacity(plaintext.len() + 256);
        let mut writer = encryptor
            .wrap_output(&mut ciphertext)
            .map_err(|e| AuditError::Encrypt(e.to_string()))?;
        writer
            .write_all(plaintext)
            .map_err(|e| AuditError::Encrypt(e.to_string()))?;
        // An unfinished age stream does not decrypt.
        writer
            .finish()
            .map_err(|e| AuditError::Encrypt(e.to_string()))?;
        Ok(ciphertext)
    }

    /// sled's flush, then fsync of its files and directory: the record survives a crash or
    /// a power cut once this returns.
    fn make_durable(&self) -> Result<(), AuditError> {
        self.db
            .flush()
            .map_err(|e| AuditError::Write(e.to_string()))?;
        let sync = |path: &Path| -> std::io::Result<()> {
            if path.exists() {
                File::open(path)?.sync_all()?;
            }
            Ok(())
        };
        for file in ["db", "conf"] {
            sync(&self.dir.join(file)).map_err(|e| AuditError::Write(e.to_string()))?;
        }
        sync(&self.dir).map_err(|e| AuditError::Write(e.to_string()))
    }
}

fn decode_entry(value: &[u8]) -> Result<ChainEntry, AuditError> {
    serde_json::from_slice(value).map_err(|_| AuditError::Damaged { sequence: u64::MAX })
}

fn sequence_of(key: &[u8]) -> u64 {
    key.try_into().map(u64::from_be_bytes).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::audit::{RecordKind, RetainedText, Retention, verify_chain};
    use std::io::Read as _;

    fn record(n: u64, prompt: &str) -> AuditRecord {
        AuditRecord {
            kind: RecordKind::Request,
            unix_ms: 1_795_913_185_000 + n as i64,
            node_id: "node-a".into(),
            request_id: format!("r{n}"),
            department: "finance".into(),
            subject: "alice".into(),
            source_address: "10.0.0.7".into(),
            model: "smollm2@1".into(),
            action: "chat".into(),
            decision: "allow".into(),
            reason: "allow".into(),
            classification: "internal".into(),
            findings: Vec::new(),
            prompt_tokens: 3,
            completion_tokens: 5,
            latency_ms: 12,
            prompt: RetainedText::keep(Retention::Full, prompt),
            answer: None,
        }
    }

    fn decrypt(identity: &age::x25519::Identity, ciphertext: &[u8]) -> Vec<u8> {
        let decryptor = age::Decryptor::new(ciphertext).expect("age file");
        let mut reader = decryptor
            .decrypt(std::iter::once(identity as &dyn age::Identity))
            .expect("decrypts");
        let mut plaintext = Vec::new();
        reader.read_to_end(&mut plaintext).expect("reads");
        plaintext
    }

    #[test]
    fn records_are_encrypted_chained_signed_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("temp dir");
        let auditor = age::x25519::Identity::generate();
        let second = age::x25519::Identity::generate();
        let key = SigningKey::from_bytes(&[7; 32]);
        let canary = "CANARY-4f1d-prompt";
        {
            let store = AuditStore::open(
                dir.path(),
                "node-a",
                vec![auditor.to_public(), second.to_public()],
            )
            .expect("opens");
            for n in 0..5 {
                assert_eq!(store.append(&record(n, canary)).expect("appends"), n);
            }
            store.checkpoint(&key, 100).expect("checkpoint");
        }
        let store =
            AuditStore::open(dir.path(), "node-a", vec![auditor.to_public()]).expect("reopens");
        assert_eq!(store.append(&record(5, canary)).expect("appends"), 5);
        let entries = store.entries().expect("entries");
        let checkpoints = store.checkpoints().expect("checkpoints");
        let verified = verify_chain(
            "node-a",
            &key.verifying_key(),
            (0, GENESIS),
            &entries,
            &checkpoints,
        )
        .expect("the chain verifies");
        assert_eq!((verified.records, verified.unsigned_tail), (6, 1));
        // Either auditor can read; the store holds only ciphertext.
        let first =
            AuditRecord::from_bytes(&decrypt(&second, &entries[0].ciphertext)).expect("record");
        assert_eq!(first.request_id, "r0");
        drop(store);
        for file in walk(dir.path()) {
            let bytes = std::fs::read(&file).expect("read");
            assert!(
                !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
                "plaintext in {}",
                file.display()
            );
        }
    }

    #[test]
    fn a_store_without_recipients_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(matches!(
            AuditStore::open(dir.path(), "node-a", Vec::new()),
            Err(AuditError::NoRecipients)
        ));
        assert!(matches!(
            parse_recipients(&[]),
            Err(AuditError::NoRecipients)
        ));
        assert!(matches!(
            parse_recipients(&["age1notarecipient".into()]),
            Err(AuditError::BadRecipient { index: 0, .. })
        ));
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
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
}
