//! The export file an auditor carries away: JSON lines, still encrypted.
//!
//! ```text
//! {"moat_audit_export":2,"node_id":"…","node_key":"<hex>","anchor":…,"created_unix_ms":…,…}
//! {"record":{"sequence":41,"unix_ms":…,"ciphertext":"<base64 age file>","hash":"<hex>"}}
//! {"checkpoint":{"kind":"checkpoint","node_id":"…","sequence":41,"head":"<hex>",…}}
//! {"end":{"records":1,"checkpoints":1,"last":{…},"head":{"sequence":44,"hash":"<hex>"},"signature":"<hex>"}}
//! ```
//!
//! The header names the node and its checkpoint key, and the anchor the records continue
//! from: nothing for a chain from its first record, else a checkpoint or prune marker signed
//! by that key whose head is the hash before the first exported record. Every record and
//! checkpoint of the range follows in chain order. The `end` line counts them, names the
//! last record and the node's chain head when the export was made, and carries the node
//! key's signature over header and end ([`frame`]): a file cut short, or edited to look
//! whole, is told from a shorter range. Bodies stay age files: only the auditors' keys open
//! them.
//!
//! Version 1 files had no signed frame; they are refused, since a cut one cannot be told
//! from a whole one.

use std::io::{BufRead, Write};

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::chain::{ChainEntry, ChainPoint, Checkpoint, GENESIS};
use super::verify::{ChainVerifier, Damage, VerifiedChain, VerifyError};

pub mod continuity;
pub mod frame;
pub mod select;
pub mod source;

pub use continuity::{ContinuityCheck, ContinuityError, HeldHead};
pub use frame::{ExportEnd, FrameProblem};

/// The format version this build writes and reads.
pub const EXPORT_VERSION: u32 = 2;

/// The last version without a signed frame.
const UNSIGNED_VERSION: u32 = 1;

/// The first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportHeader {
    /// The format version; its key marks the file as an export.
    pub moat_audit_export: u32,
    pub node_id: String,
    /// The node's ed25519 checkpoint key.
    #[serde(with = "super::encoding::hex_array")]
    pub node_key: [u8; 32],
    /// What the first record continues from; `None`: the chain's first record.
    pub anchor: Option<Checkpoint>,
    pub created_unix_ms: i64,
    /// The time range asked for (records outside it may come along: the range is widened
    /// back to the anchor, so that every record is covered by a signature).
    pub since_unix_ms: Option<i64>,
    pub until_unix_ms: Option<i64>,
}

impl ExportHeader {
    /// Where the chain of this export starts: the anchor's next sequence and its head.
    pub fn start(&self) -> (u64, [u8; 32]) {
        match &self.anchor {
            None => (0, GENESIS),
            Some(anchor) => (anchor.sequence + 1, anchor.head),
        }
    }

    pub fn verifying_key(&self) -> Result<VerifyingKey, ExportError> {
        VerifyingKey::from_bytes(&self.node_key).map_err(|_| ExportError::BadNodeKey)
    }
}

/// Every line after the header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ExportLine {
    Record(ChainEntry),
    Checkpoint(Checkpoint),
    End(ExportEnd),
}

/// Why an export cannot be read or does not verify.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("this is not a moat audit export: {0}")]
    NotAnExport(String),
    #[error("the export is format version {0}; this moatctl reads version {EXPORT_VERSION}")]
    UnsupportedVersion(u32),
    /// A version 1 export: its header and end are not signed, so a copy cut short after a
    /// checkpoint cannot be told from a whole one.
    #[error(
        "the export is format version {UNSIGNED_VERSION}, whose header and end line are not \
         signed: a copy cut short after any checkpoint, its counts edited, would verify like \
         a whole one, so it is not accepted. Ask for a new export of the same range (moatctl \
         audit export writes version {EXPORT_VERSION}, signed by the node)"
    )]
    UnsignedFrame,
    #[error("the export's node key is not a valid ed25519 public key")]
    BadNodeKey,
    #[error(
        "the export was signed by node key {found}, not the expected {expected}: it comes from another node or was re-signed"
    )]
    UntrustedKey { expected: String, found: String },
    #[error("line {line}: {source}")]
    Damaged {
        line: u64,
        #[source]
        source: VerifyError,
    },
    /// The chain verifies, the signed frame around it does not.
    #[error("line {line}: {problem}")]
    Frame { line: u64, problem: FrameProblem },
    /// The export verifies, but does not extend the chain head the auditor holds.
    #[error(transparent)]
    Discontinuous(#[from] ContinuityError),
}

impl ExportError {
    /// The located damage, if this is one.
    pub fn damage(&self) -> Option<&VerifyError> {
        match self {
            ExportError::Damaged { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Writes an export line by line.
#[derive(Debug)]
pub struct ExportWriter<W: Write> {
    out: W,
    header: ExportHeader,
    records: u64,
    checkpoints: u64,
    last: Option<ChainPoint>,
}

impl<W: Write> ExportWriter<W> {
    pub fn new(mut out: W, header: &ExportHeader) -> std::io::Result<Self> {
        write_line(&mut out, header)?;
        Ok(Self {
            out,
            header: header.clone(),
            records: 0,
            checkpoints: 0,
            last: None,
        })
    }

    pub fn record(&mut self, entry: &ChainEntry) -> std::io::Result<()> {
        self.records += 1;
        self.last = Some(ChainPoint::of(entry));
        write_line(&mut self.out, &ExportLine::Record(entry.clone()))
    }

    pub fn checkpoint(&mut self, checkpoint: &Checkpoint) -> std::io::Result<()> {
        self.checkpoints += 1;
        write_line(&mut self.out, &ExportLine::Checkpoint(checkpoint.clone()))
    }

    /// Writes the `end` line, signed with the node's `key` (the one the header names),
    /// `head` being the node's chain head as the export was made; hands back the output (to
    /// be flushed and synced).
    pub fn finish(mut self, head: ChainPoint, key: &SigningKey) -> std::io::Result<(W, ExportEnd)> {
        let end = ExportEnd::sign(
            &self.header,
            self.records,
            self.checkpoints,
            self.last,
            head,
            key,
        );
        write_line(&mut self.out, &ExportLine::End(end))?;
        Ok((self.out, end))
    }
}

fn write_line<T: Serialize>(out: &mut impl Write, value: &T) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

/// Reads an export: the header, then its items, each checked against the chain as it
/// comes. Iterate it for the records (to decrypt them), then call [`ExportReader::finish`]
/// for the verdict.
#[derive(Debug)]
pub struct ExportReader<'k, R> {
    input: R,
    header: ExportHeader,
    key: &'k VerifyingKey,
    verifier: ChainVerifier<'k>,
    line: u64,
    buffer: String,
    end: Option<ExportEnd>,
    /// Records and checkpoints read, and the last record.
    records: u64,
    checkpoints: u64,
    last: Option<ChainPoint>,
    continuity: Option<ContinuityCheck>,
    failed: bool,
}

/// A verified export: what its chain covers, and its signed end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedExport {
    pub chain: VerifiedChain,
    pub end: ExportEnd,
}

/// Reads the header line of `input`.
pub fn read_header(input: &mut impl BufRead) -> Result<ExportHeader, ExportError> {
    let mut line = String::new();
    input.read_line(&mut line)?;
    let value: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| ExportError::NotAnExport(format!("the first line is not JSON ({e})")))?;
    let version = value
        .get("moat_audit_export")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| {
            ExportError::NotAnExport("the first line has no \"moat_audit_export\" version".into())
        })?;
    if version == u64::from(UNSIGNED_VERSION) {
        return Err(ExportError::UnsignedFrame);
    }
    if version != u64::from(EXPORT_VERSION) {
        return Err(ExportError::UnsupportedVersion(
            u32::try_from(version).unwrap_or(u32::MAX),
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| ExportError::NotAnExport(format!("the header is malformed: {e}")))
}

impl<'k, R: BufRead> ExportReader<'k, R> {
    /// Starts reading after `header` (see [`read_header`]), verifying with `key`: the
    /// header's own key, or the one the auditor trusts for this node.
    pub fn new(input: R, header: ExportHeader, key: &'k VerifyingKey) -> Result<Self, ExportError> {
        if let Some(anchor) = &header.anchor {
            let damage = if anchor.node_id != header.node_id {
                Some(Damage::ForeignCheckpoint)
            } else if !anchor.is_signed_by(key) {
                Some(Damage::BadSignature)
            } else {
                None
            };
            if let Some(damage) = damage {
                return Err(ExportError::Damaged {
                    line: 1,
                    source: VerifyError {
                        sequence: anchor.sequence,
                        damage,
                    },
                });
            }
        }
        let verifier = ChainVerifier::new(&header.node_id, key, header.start());
        Ok(Self {
            input,
            header,
            key,
            verifier,
            line: 1,
            buffer: String::new(),
            end: None,
            records: 0,
            checkpoints: 0,
            last: None,
            continuity: None,
            failed: false,
        })
    }

    /// Also requires the export to extend `held` (see [`continuity`]), judged by
    /// [`ExportReader::finish`] once the rest verifies.
    pub fn after(mut self, held: HeldHead) -> Self {
        self.continuity = Some(ContinuityCheck::new(held));
        self
    }

    pub fn header(&self) -> &ExportHeader {
        &self.header
    }

    fn damaged(&mut self, source: VerifyError) -> ExportError {
        self.failed = true;
        ExportError::Damaged {
            line: self.line,
            source,
        }
    }

    /// The next verified record, `None` after the `end` line (or at the end of input).
    pub fn next_record(&mut self) -> Result<Option<ChainEntry>, ExportError> {
        loop {
            if self.failed || self.end.is_some() {
                return Ok(None);
            }
            self.buffer.clear();
            if self.input.read_line(&mut self.buffer)? == 0 {
                return Ok(None);
            }
            self.line += 1;
            let unreadable = VerifyError {
                sequence: self.verifier.expected(),
                damage: Damage::Unreadable,
            };
            let item: ExportLine = match serde_json::from_str(&self.buffer) {
                Ok(item) => item,
                Err(_) => return Err(self.damaged(unreadable)),
            };
            match item {
                ExportLine::Record(entry) => {
                    self.records += 1;
                    if let Err(damage) = self.verifier.entry(&entry) {
                        return Err(self.damaged(damage));
                    }
                    self.last = Some(ChainPoint::of(&entry));
                    if let Some(continuity) = &mut self.continuity {
                        continuity.record(&entry);
                    }
                    return Ok(Some(entry));
                }
                ExportLine::Checkpoint(checkpoint) => {
                    self.checkpoints += 1;
                    if let Err(damage) = self.verifier.checkpoint(&checkpoint) {
                        return Err(self.damaged(damage));
                    }
                }
                ExportLine::End(end) => self.end = Some(end),
            }
        }
    }

    /// Reads what is left and gives the verdict: the chain verifies, every checkpoint is
    /// met, the `end` line is there, is signed by the node key together with the header,
    /// matches what was read and is the last line; and, if asked, the export extends the
    /// held head.
    pub fn finish(mut self) -> Result<VerifiedExport, ExportError> {
        while self.next_record()?.is_some() {}
        let truncated = VerifyError {
            sequence: self.verifier.expected(),
            damage: Damage::Truncated,
        };
        let Some(end) = self.end else {
            return Err(self.damaged(truncated));
        };
        // The signature first: an end line edited to match a cut is an altered frame; an
        // intact one that does not match what was read means lines were cut.
        if let Err(problem) = end.check(&self.header, self.key) {
            return Err(ExportError::Frame {
                line: self.line,
                problem,
            });
        }
        if (end.records, end.checkpoints, end.last) != (self.records, self.checkpoints, self.last) {
            return Err(self.damaged(truncated));
        }
        self.buffer.clear();
        if self.input.read_line(&mut self.buffer)? != 0 && !self.buffer.trim().is_empty() {
            self.line += 1;
            let unreadable = VerifyError {
                sequence: self.verifier.expected(),
                damage: Damage::Unreadable,
            };
            return Err(self.damaged(unreadable));
        }
        let line = self.line;
        let chain = self
            .verifier
            .finish()
            .map_err(|source| ExportError::Damaged { line, source })?;
        if let Some(continuity) = &self.continuity {
            continuity.verdict(&self.header, &end)?;
        }
        Ok(VerifiedExport { chain, end })
    }
}

#[cfg(test)]
mod tests;
