//! The audit log: requests hand records in, one committer thread chains them and makes
//! them durable in groups (one flush and fsync for every record waiting), and each request
//! waits for its own record before its answer goes out.
//!
//! Encryption (age, a few hundred microseconds per record) runs on the blocking pool, in
//! parallel, before a record reaches the committer; the committer only chains, writes and
//! syncs. A record handed in is written even if its request is abandoned meanwhile.
//!
//! After a write error sled refuses every later write, so the committer drops the store and
//! opens it again at the next record: once the disk has room (or is writable) again,
//! records are accepted without a restart. Until then every record fails at once and its
//! request gets 503.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use ed25519_dalek::SigningKey;
use moat_core::audit::layout::NodeInfo;
use moat_core::audit::{AuditRecord, Checkpoint, RecordKind};
use tokio::sync::oneshot;

use super::reader::ExportSnapshot;
use super::store::{Sealed, Store};
use super::{AuditError, encrypt, parse_recipients, signing_key};
use crate::config::AuditConfig;
/// The clock both binaries stamp records and exports with (callers import it from here).
use moat_store::time::now_unix_ms;
use retention::{ClockAnchor, PruneClock, PruneHold};

mod retention;

/// Most records committed in one group.
const MAX_GROUP: usize = 4096;

/// How often records past their retention are looked for.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

type Reply<T> = oneshot::Sender<Result<T, AuditError>>;

enum Command {
    Append {
        sealed: Sealed,
        reply: Reply<u64>,
    },
    Snapshot {
        reply: Reply<ExportSnapshot>,
    },
    Close {
        reply: Reply<()>,
    },
    /// Answered as soon as the committer gets to it: proof that it still goes round.
    Ping {
        reply: Reply<()>,
    },
}

/// What the committer needs besides the store.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub store_directory: PathBuf,
    pub node: NodeInfo,
    pub checkpoint_every_records: u64,
    pub checkpoint_every: Duration,
    /// `None`: keep everything.
    pub retention: Option<Duration>,
    pub write_timeout: Duration,
}

impl AuditSettings {
    /// Settings from `[audit]`, with the node's public key.
    pub fn new(config: &AuditConfig, node_id: String, key: &SigningKey) -> Self {
        Self {
            store_directory: config.store_directory(),
            node: NodeInfo {
                node_id,
                public_key: key.verifying_key().to_bytes(),
            },
            checkpoint_every_records: config.checkpoint_every_records,
            checkpoint_every: Duration::from_secs(config.checkpoint_every_secs),
            retention: (config.retention_days > 0)
                .then(|| Duration::from_secs(config.retention_days * 86_400)),
            write_timeout: Duration::from_millis(config.write_timeout_ms),
        }
    }
}

/// The node's audit log.
pub struct AuditLog {
    sender: Sender<Command>,
    recipients: Arc<[age::x25519::Recipient]>,
    settings: AuditSettings,
    committer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("node", &self.settings.node.node_id)
            .field("recipients", &self.recipients.len())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log `[audit]` describes: the node key (created at first start), the store,
    /// the committer thread; prunes what retention no longer keeps.
    pub fn open(config: &AuditConfig, node_id: String) -> Result<Arc<Self>, AuditError> {
        let recipients = parse_recipients(&config.recipients)?;
        let (key, source) = signing_key::load(config)?;
        match &source {
            signing_key::KeySource::Created(path) => {
                tracing::info!(path = %path.display(), "created the node's audit signing key")
            }
            signing_key::KeySource::File(path) | signing_key::KeySource::Credential(path) => {
                tracing::debug!(path = %path.display(), "audit signing key loaded")
            }
        }
        let settings = AuditSettings::new(config, node_id, &key);
        Self::start(settings, recipients, key)
    }

    /// Opens the store and starts the committer.
    pub fn start(
        settings: AuditSettings,
        recipients: Vec<age::x25519::Recipient>,
        key: SigningKey,
    ) -> Result<Arc<Self>, AuditError> {
        if recipients.is_empty() {
            return Err(AuditError::NoRecipients);
        }
        let store = Store::open(&settings.store_directory, &settings.node)?;
        let (sender, receiver) = crossbeam_channel::unbounded();
        let mut committer = Committer::new(settings.clone(), key, store, now_unix_ms());
        committer.prune();
        let thread = std::thread::Builder::new()
            .name("moat-audit".into())
            .spawn(move || committer.run(&receiver))
            .map_err(|e| AuditError::Write(format!("cannot start the audit thread: {e}")))?;
        Ok(Arc::new(Self {
            sender,
            recipients: recipients.into(),
            settings,
            committer: Mutex::new(Some(thread)),
        }))
    }

    pub fn node(&self) -> &NodeInfo {
        &self.settings.node
    }

    /// Stores `record` and returns its sequence number once it is durable. Fails (and the
    /// request must get 503) when it cannot be, or not within the write timeout.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let receiver = self.hand_in(record)?;
        answer_within(receiver, self.settings.write_timeout).await
    }

    /// Stores `record` without waiting (for a request whose client already left).
    pub fn submit(&self, record: AuditRecord) {
        if let Err(e) = self.hand_in(record) {
            tracing::error!(error = %e, "an audit record could not be handed in");
        }
    }

    /// [`AuditLog::append`] for threads outside the async runtime.
    pub fn append_blocking(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let ciphertext = encrypt(&self.recipients, &record.to_bytes())?;
        let (reply, receiver) = oneshot::channel();
        let sealed = Sealed {
            unix_ms: record.unix_ms,
            ciphertext,
        };
        self.sender
            .send(Command::Append { sealed, reply })
            .map_err(|_| AuditError::Closed)?;
        receiver.blocking_recv().map_err(|_| AuditError::Closed)?
    }

    /// Encrypts on the blocking pool and passes the record on to the committer from
    /// there: dropping the receiver (an abandoned request) does not stop the write.
    fn hand_in(
        &self,
        record: AuditRecord,
    ) -> Result<oneshot::Receiver<Result<u64, AuditError>>, AuditError> {
        let (reply, receiver) = oneshot::channel();
        let recipients = Arc::clone(&self.recipients);
        let sender = self.sender.clone();
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| AuditError::Write("no async runtime to encrypt on".into()))?;
        handle.spawn_blocking(move || {
            let sealed = match encrypt(&recipients, &record.to_bytes()) {
                Ok(ciphertext) => Sealed {
                    unix_ms: record.unix_ms,
                    ciphertext,
                },
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            };
            if let Err(crossbeam_channel::SendError(Command::Append { reply, .. })) =
                sender.send(Command::Append { sealed, reply })
            {
                let _ = reply.send(Err(AuditError::Closed));
            }
        });
        Ok(receiver)
    }

    /// The store's view for an export, after a checkpoint over everything stored so far
    /// (so that the export ends signed), with the key to sign the export with.
    pub async fn snapshot(&self) -> Result<ExportSnapshot, AuditError> {
        let (reply, receiver) = oneshot::channel();
        self.sender
            .send(Command::Snapshot { reply })
            .map_err(|_| AuditError::Closed)?;
        receiver.await.map_err(|_| AuditError::Closed)?
    }

    /// Whether the committer thread answers within `limit` (it answers between commits, so
    /// a write that hangs keeps it from answering).
    pub async fn ping(&self, limit: Duration) -> Result<(), AuditError> {
        let (reply, receiver) = oneshot::channel();
        self.sender
            .send(Command::Ping { reply })
            .map_err(|_| AuditError::Closed)?;
        answer_within(receiver, limit).await
    }

    /// Writes the final checkpoint and stops the committer; later records fail with
    /// [`AuditError::Closed`].
    pub fn close(&self) -> Result<(), AuditError> {
        let (reply, receiver) = oneshot::channel();
        let sent = self.sender.send(Command::Close { reply }).is_ok();
        let result = if sent {
            receiver.blocking_recv().unwrap_or(Err(AuditError::Closed))
        } else {
            Ok(())
        };
        let thread = self.committer.lock().ok().and_then(|mut slot| slot.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        result
    }
}

impl Drop for AuditLog {
    /// Stops the committer (final checkpoint) and waits for it, so that the store is
    /// closed, and can be opened again, once the log is gone.
    fn drop(&mut self) {
        let thread = self.committer.get_mut().ok().and_then(Option::take);
        if let Some(thread) = thread {
            let (reply, _) = oneshot::channel();
            if self.sender.send(Command::Close { reply }).is_ok() {
                let _ = thread.join();
            }
        }
    }
}

/// The committer's answer, if it comes within `limit`.
async fn answer_within<T>(
    receiver: oneshot::Receiver<Result<T, AuditError>>,
    limit: Duration,
) -> Result<T, AuditError> {
    match tokio::time::timeout(limit, receiver).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err(AuditError::Closed),
        Err(_) => Err(AuditError::Timeout(limit.as_millis() as u64)),
    }
}

/// The committer thread's state.
struct Committer {
    settings: AuditSettings,
    key: SigningKey,
    /// `None` after a write error, until it opens again.
    store: Option<Store>,
    unsigned: u64,
    unsigned_since: Option<Instant>,
    next_prune: Instant,
    /// The wall clock when the committer started: pruning stops if it is moved forward.
    started: ClockAnchor,
    /// Why the last prune was held back, so that a hold is warned about when it begins,
    /// not every hour it lasts.
    held: Option<PruneHold>,
}

impl Committer {
    /// A committer over `store`, started when the wall clock said `now_ms`.
    fn new(settings: AuditSettings, key: SigningKey, store: Store, now_ms: i64) -> Self {
        Self {
            settings,
            key,
            store: Some(store),
            unsigned: 0,
            unsigned_since: None,
            next_prune: Instant::now(),
            started: ClockAnchor::new(now_ms),
            held: None,
        }
    }

    fn run(mut self, receiver: &Receiver<Command>) {
        loop {
            let wait = self
                .next_deadline()
                .saturating_duration_since(Instant::now());
            let first = match receiver.recv_timeout(wait) {
                Ok(command) => command,
                Err(RecvTimeoutError::Timeout) => {
                    self.tick();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Every handle is gone without a close: sign what is there anyway.
                    if let Err(e) = self.finish() {
                        tracing::error!(error = %e, "the final audit checkpoint failed");
                    }
                    return;
                }
            };
            let mut group = Vec::new();
            let mut others = Vec::new();
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Append { sealed, reply } => group.push((sealed, reply)),
                    other => others.push(other),
                }
                if group.len() < MAX_GROUP {
                    next = receiver.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.commit(group);
            }
            for command in others {
                match command {
                    Command::Append { .. } => {}
                    Command::Snapshot { reply } => {
                        // Everything stored so far is signed before it is read.
                        let key = self.key.clone();
                        let snapshot = self
                            .checkpoint()
                            .and_then(|_| self.store())
                            .map(|store| store.snapshot(&key));
                        let _ = reply.send(snapshot);
                    }
                    Command::Close { reply } => {
                        let _ = reply.send(self.finish());
                        return;
                    }
                    Command::Ping { reply } => {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            self.tick();
        }
    }

    /// The store, opened again if a write error closed it.
    fn store(&mut self) -> Result<&mut Store, AuditError> {
        if self.store.is_none() {
            let store = Store::open(&self.settings.store_directory, &self.settings.node)?;
            tracing::warn!(
                next = store.head().next,
                "the audit store accepts records again"
            );
            self.store = Some(store);
        }
        self.store.as_mut().ok_or(AuditError::Closed)
    }

    fn commit(&mut self, group: Vec<(Sealed, Reply<u64>)>) {
        let count = group.len() as u64;
        let (sealed, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        let result = self.store().and_then(|store| store.append(sealed));
        match result {
            Ok(first) => {
                for (sequence, reply) in (first..).zip(replies) {
                    let _ = reply.send(Ok(sequence));
                }
                self.unsigned += count;
                self.unsigned_since.get_or_insert_with(Instant::now);
            }
            Err(e) => {
                tracing::error!(error = %e, records = count, "audit records could not be made durable; their requests get 503");
                // sled fails every later write after an I/O error: start afresh.
                self.store = None;
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let checkpoint = self
            .unsigned_since
            .map(|since| since + self.settings.checkpoint_every);
        match checkpoint {
            Some(checkpoint) => checkpoint.min(self.next_prune),
            None => self.next_prune,
        }
    }

    /// Checkpoints and prunes when they are due.
    fn tick(&mut self) {
        let due = self.unsigned >= self.settings.checkpoint_every_records
            || self
                .unsigned_since
                .is_some_and(|since| since.elapsed() >= self.settings.checkpoint_every);
        if due && let Err(e) = self.checkpoint() {
            tracing::error!(error = %e, "cannot write an audit checkpoint; will try again");
        }
        if Instant::now() >= self.next_prune {
            self.prune();
        }
    }

    fn checkpoint(&mut self) -> Result<Option<Checkpoint>, AuditError> {
        let unix_time = now_unix_ms() / 1000;
        let key = self.key.clone();
        let result = self
            .store()
            .and_then(|store| store.checkpoint(&key, unix_time));
        match &result {
            Ok(_) => {
                self.unsigned = 0;
                self.unsigned_since = None;
            }
            Err(_) => self.store = None,
        }
        result
    }

    /// Removes records past retention that a checkpoint covers, judged by the chain's own
    /// signed time as well as the clock ([`retention`]), and logs what it did or why not.
    fn prune(&mut self) {
        self.next_prune = Instant::now() + PRUNE_INTERVAL;
        self.prune_at(now_unix_ms(), self.started.expected_ms());
    }

    /// [`Committer::prune`] with the wall clock at `now_ms`, where the monotonic clock
    /// expects it at `expected_ms`.
    fn prune_at(&mut self, now_ms: i64, expected_ms: i64) {
        let Some(retention) = self.settings.retention else {
            return;
        };
        let key = self.key.clone();
        let pruned = self.store().and_then(|store| {
            let clock = PruneClock {
                now_ms,
                signed_ms: store.newest_signed_ms()?,
                expected_ms,
            };
            match clock.cutoff(retention) {
                Ok(cutoff) => store.prune(&key, cutoff, now_ms / 1000).map(Ok),
                Err(hold) => Ok(Err(hold)),
            }
        });
        match pruned {
            Ok(Ok(done)) => {
                self.held = None;
                if let Some(done) = done {
                    tracing::info!(
                        through = done.through,
                        records = done.records,
                        "pruned audit records past their retention"
                    );
                }
            }
            Ok(Err(PruneHold::NothingSigned)) => {}
            Ok(Err(hold)) => {
                let began = self.held.is_none_or(|held| {
                    std::mem::discriminant(&held) != std::mem::discriminant(&hold)
                });
                if began {
                    tracing::warn!(reason = %hold, "audit records are not pruned");
                } else {
                    tracing::debug!(reason = %hold, "audit records are still not pruned");
                }
                self.held = Some(hold);
            }
            Err(e) => {
                self.store = None;
                tracing::error!(error = %e, "cannot prune the audit store; will try again");
            }
        }
    }

    /// The final checkpoint, at shutdown.
    fn finish(&mut self) -> Result<(), AuditError> {
        if self.unsigned > 0 || self.store.is_none() {
            self.checkpoint()?;
        }
        self.store = None;
        Ok(())
    }
}

/// An admin record of this node: `action` (`node.start`, `policy.reload`, ...) by
/// `subject`, with `detail`.
pub fn admin_record(
    node: &NodeInfo,
    action: &str,
    subject: &str,
    decision: &str,
    detail: String,
) -> AuditRecord {
    AuditRecord {
        kind: RecordKind::Admin,
        unix_ms: now_unix_ms(),
        node_id: node.node_id.clone(),
        request_id: format!("{:032x}", rand::random::<u128>()),
        department: String::new(),
        subject: subject.to_owned(),
        source_address: String::new(),
        model: String::new(),
        action: action.to_owned(),
        decision: decision.to_owned(),
        reason: String::new(),
        classification: String::new(),
        findings: Vec::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        latency_ms: 0,
        status: 0,
        prompt: None,
        answer: None,
        detail: Some(detail),
    }
}

#[cfg(test)]
mod tests;
