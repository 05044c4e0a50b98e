//! moat-store: the I/O that moatd and moatctl share, so that both read the same files the
//! same way.
//!
//! - [`audit`]: the sled audit store read as an export source (moatd's live store and a
//!   stopped node's, read by moatctl), and the clean-up of unfinished sled snapshots;
//! - [`policy`]: a policy directory's files, in the order moatd loads them;
//! - [`time`]: the wall clock, as audit records and exports count it.
//!
//! It depends on `moat-core` for the formats and rules; it must not depend on the daemon's
//! stack (tokio, actix, ONNX Runtime) or the CLI's, so that either binary can use it.

pub mod audit;
pub mod policy;
pub mod time;
