//! An export of the live store, read beside the committer that keeps appending: its reader
//! (`moat_store::audit::AuditReader`, the one moatctl reads a stopped node's store with)
//! stops at the chain head the committer had made durable and signed when the export began
//! ([`ExportSnapshot`]): a record past it may not be on disk yet, and the head the export
//! signs must be one a crash cannot take back.

use std::io::Write;

use ed25519_dalek::SigningKey;
use moat_core::audit::export::select::TimeRange;
use moat_core::audit::export::source::{self, ExportProgress, Exported, WriteExportError};
use moat_store::audit::{AuditReader, ReadError};

/// One export's view of the live store, up to the chain head when it was taken, and the
/// node's key to sign the export with.
pub struct ExportSnapshot {
    reader: AuditReader,
    key: SigningKey,
}

impl std::fmt::Debug for ExportSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportSnapshot")
            .field("reader", &self.reader)
            .finish_non_exhaustive()
    }
}

impl ExportSnapshot {
    /// `reader`'s view, to be signed with `key` (the node's).
    pub(super) fn new(reader: AuditReader, key: SigningKey) -> Self {
        Self { reader, key }
    }

    /// Writes the export of `range`, created at `created_unix_ms`, to `out`, signed with
    /// the node's key (see `moat_core::audit::export::source::write_export`).
    pub fn write<W: Write>(
        &self,
        range: TimeRange,
        created_unix_ms: i64,
        out: W,
        progress: &mut dyn FnMut(ExportProgress),
    ) -> Result<(Exported, W), WriteExportError<ReadError>> {
        source::write_export(
            &self.reader,
            range,
            created_unix_ms,
            &self.key,
            out,
            progress,
        )
    }
}
