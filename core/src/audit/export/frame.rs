//! The signed frame of an export: the node's signature over its header and its `end` line.
//!
//! Checkpoints vouch for the records up to them, but not for where an export starts and
//! stops: a copy cut after any checkpoint, its counts and creation time edited, would still
//! be a chain that verifies. So the node signs, when it writes the export, what the export
//! claims to be: whose it is, what it continues from, when and for which range it was made,
//! how many records and checkpoints it holds, its last record, and the node's chain head at
//! that moment. A cut, or a header edited to hide one, no longer matches that signature,
//! and making a new one takes the node's key.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::ExportHeader;
use crate::audit::chain::{ChainPoint, checkpoint_message};

/// Domain separation: this signature means nothing anywhere else, not even as a checkpoint.
const FRAME_DOMAIN: &[u8] = b"moat-audit-export-frame-v2\0";

/// The last line of an export: what it holds and where the node's chain stood, signed
/// together with the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportEnd {
    pub records: u64,
    pub checkpoints: u64,
    /// The last exported record; `None` only for an export of no record.
    pub last: Option<ChainPoint>,
    /// The node's chain head when the export was made: its last stored record, which lies
    /// beyond `last` when the export is of an earlier time range. An auditor keeps it to
    /// check that the node's next export extends the same chain (`verify --after`).
    pub head: ChainPoint,
    /// The node key's ed25519 signature over [`frame_message`].
    #[serde(with = "crate::audit::encoding::hex_array")]
    pub signature: [u8; 64],
}

/// Why a frame does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameProblem {
    /// The signature over header and end is not the node key's: either was altered after
    /// the node signed them (to hide a cut, or change the range or times), or they were
    /// never signed by this node.
    #[error(
        "the node key's signature over the export's header and end line does not match them: \
         the header or the end line was altered after the node signed it (records cut off and \
         the counts or times edited to hide it), or the export is not this node's"
    )]
    BadSignature,
    /// The signed head is behind the last exported record: the node signed a frame that
    /// contradicts its own records.
    #[error(
        "the signed chain head, record {}, is not at or after the last exported record, \
         record {}", .head.sequence, .last.sequence
    )]
    HeadBehindLast { head: ChainPoint, last: ChainPoint },
}

/// The exact bytes an export's frame signature covers: every field of `header` and of
/// `end` except the signature, in a fixed order, strings and the anchor's signed message
/// prefixed with their length, absent values with a marker byte.
pub fn frame_message(header: &ExportHeader, end: &ExportEnd) -> Vec<u8> {
    let mut message = Vec::with_capacity(FRAME_DOMAIN.len() + header.node_id.len() + 400);
    message.extend_from_slice(FRAME_DOMAIN);
    message.extend_from_slice(&header.moat_audit_export.to_be_bytes());
    put_bytes(&mut message, header.node_id.as_bytes());
    message.extend_from_slice(&header.node_key);
    match &header.anchor {
        None => message.push(0),
        Some(anchor) => {
            message.push(1);
            let signed = checkpoint_message(
                anchor.kind,
                &anchor.node_id,
                anchor.sequence,
                &anchor.head,
                anchor.unix_time,
            );
            put_bytes(&mut message, &signed);
            message.extend_from_slice(&anchor.signature);
        }
    }
    message.extend_from_slice(&header.created_unix_ms.to_be_bytes());
    for bound in [header.since_unix_ms, header.until_unix_ms] {
        match bound {
            None => message.push(0),
            Some(unix_ms) => {
                message.push(1);
                message.extend_from_slice(&unix_ms.to_be_bytes());
            }
        }
    }
    message.extend_from_slice(&end.records.to_be_bytes());
    message.extend_from_slice(&end.checkpoints.to_be_bytes());
    match &end.last {
        None => message.push(0),
        Some(last) => {
            message.push(1);
            put_point(&mut message, last);
        }
    }
    put_point(&mut message, &end.head);
    message
}

fn put_bytes(message: &mut Vec<u8>, bytes: &[u8]) {
    message.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    message.extend_from_slice(bytes);
}

fn put_point(message: &mut Vec<u8>, point: &ChainPoint) {
    message.extend_from_slice(&point.sequence.to_be_bytes());
    message.extend_from_slice(&point.hash);
}

impl ExportEnd {
    /// The end of an export with `header`, holding `records` records and `checkpoints`
    /// checkpoints up to `last`, made when the node's chain stood at `head`, signed with
    /// the node's `key`.
    pub fn sign(
        header: &ExportHeader,
        records: u64,
        checkpoints: u64,
        last: Option<ChainPoint>,
        head: ChainPoint,
        key: &SigningKey,
    ) -> Self {
        let mut end = Self {
            records,
            checkpoints,
            last,
            head,
            signature: [0; 64],
        };
        end.signature = key.sign(&frame_message(header, &end)).to_bytes();
        end
    }

    /// Whether this end, with `header`, is signed by `key` and consistent in itself.
    pub fn check(&self, header: &ExportHeader, key: &VerifyingKey) -> Result<(), FrameProblem> {
        let message = frame_message(header, self);
        key.verify_strict(&message, &Signature::from_bytes(&self.signature))
            .map_err(|_| FrameProblem::BadSignature)?;
        match self.last {
            Some(last)
                if self.head.sequence < last.sequence
                    || (self.head.sequence == last.sequence && self.head.hash != last.hash) =>
            {
                Err(FrameProblem::HeadBehindLast {
                    head: self.head,
                    last,
                })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::{Checkpoint, CheckpointKind};

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn point(sequence: u64, fill: u8) -> ChainPoint {
        ChainPoint {
            sequence,
            hash: [fill; 32],
        }
    }

    fn header() -> ExportHeader {
        ExportHeader {
            moat_audit_export: super::super::EXPORT_VERSION,
            node_id: "node-a".into(),
            node_key: key(1).verifying_key().to_bytes(),
            anchor: Some(Checkpoint::sign(&key(1), "node-a", 3, [3; 32], 60)),
            created_unix_ms: 1_000,
            since_unix_ms: Some(10),
            until_unix_ms: None,
        }
    }

    fn signed() -> ExportEnd {
        ExportEnd::sign(&header(), 6, 2, Some(point(9, 9)), point(12, 12), &key(1))
    }

    #[test]
    fn a_signed_frame_checks_and_any_field_changed_does_not() {
        let verifying = key(1).verifying_key();
        let end = signed();
        assert_eq!(end.check(&header(), &verifying), Ok(()));
        let bad = Err(FrameProblem::BadSignature);

        let header_edits: [fn(&mut ExportHeader); 9] = [
            |h| h.moat_audit_export += 1,
            |h| h.node_id.push('x'),
            |h| h.node_key[0] ^= 1,
            |h| h.anchor = None,
            |h| {
                h.anchor = Some(Checkpoint::sign_kind(
                    CheckpointKind::Prune,
                    &key(1),
                    "node-a",
                    3,
                    [3; 32],
                    60,
                ))
            },
            |h| h.created_unix_ms += 1,
            |h| h.since_unix_ms = None,
            |h| h.since_unix_ms = Some(11),
            |h| h.until_unix_ms = Some(10),
        ];
        for edit in header_edits {
            let mut edited = header();
            edit(&mut edited);
            assert_eq!(end.check(&edited, &verifying), bad, "{edited:?}");
        }
        let end_edits: [fn(&mut ExportEnd); 6] = [
            |e| e.records -= 1,
            |e| e.checkpoints += 1,
            |e| e.last = Some(point(8, 8)),
            |e| e.last = None,
            |e| e.head = point(13, 12),
            |e| e.signature[5] ^= 1,
        ];
        for edit in end_edits {
            let mut edited = end;
            edit(&mut edited);
            assert_eq!(edited.check(&header(), &verifying), bad, "{edited:?}");
        }
        // Another key's signature, even over the same frame.
        let foreign = ExportEnd::sign(&header(), 6, 2, Some(point(9, 9)), point(12, 12), &key(2));
        assert_eq!(foreign.check(&header(), &verifying), bad);
    }

    #[test]
    fn the_frame_is_not_taken_for_a_checkpoint_and_absent_differs_from_zero() {
        // A checkpoint signature never passes as a frame signature.
        let checkpoint = Checkpoint::sign(&key(1), "node-a", 9, [9; 32], 60);
        let mut end = signed();
        end.signature = checkpoint.signature;
        assert_eq!(
            end.check(&header(), &key(1).verifying_key()),
            Err(FrameProblem::BadSignature)
        );
        // An open bound and a bound at 0 sign differently.
        let mut open = header();
        open.since_unix_ms = None;
        let mut zero = header();
        zero.since_unix_ms = Some(0);
        assert_ne!(
            frame_message(&open, &signed()),
            frame_message(&zero, &signed())
        );
    }

    #[test]
    fn a_signed_head_behind_the_last_record_is_refused() {
        let end = ExportEnd::sign(&header(), 6, 2, Some(point(9, 9)), point(8, 8), &key(1));
        assert_eq!(
            end.check(&header(), &key(1).verifying_key()),
            Err(FrameProblem::HeadBehindLast {
                head: point(8, 8),
                last: point(9, 9)
            })
        );
        let other = ExportEnd::sign(&header(), 6, 2, Some(point(9, 9)), point(9, 1), &key(1));
        assert!(other.check(&header(), &key(1).verifying_key()).is_err());
    }
}
