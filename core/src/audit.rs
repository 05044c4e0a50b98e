//! The audit trail's format and its proofs: what a record says, how records are chained,
//! what a signed checkpoint covers, and how an export is verified.
//!
//! Pure logic: moatd encrypts record bodies (age, to the auditors' keys), stores them and
//! signs checkpoints with the node's key; moatctl verifies exports. Both use this module so
//! that writer and verifier agree byte for byte on what is hashed and signed.

pub mod chain;
pub mod encoding;
pub mod export;
pub mod layout;
pub mod record;
pub mod verify;

pub use chain::{
    ChainEntry, ChainPoint, Checkpoint, CheckpointKind, GENESIS, checkpoint_message, link_hash,
};
pub use record::{AuditRecord, Finding, RecordKind, RetainedText, Retention};
pub use verify::{Damage, VerifiedChain, VerifyError, verify_chain};
