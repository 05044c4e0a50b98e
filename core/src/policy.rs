//! Policy: who may ask which model what, with which data.
//!
//! Pure evaluation, no I/O: callers read the policy files and hand in their text, and hand
//! in the facts of each request (identity, model, action, classification, content, counts,
//! time). Pieces:
//!
//! - [`content`]: detectors for sensitive content (card numbers, IBANs, e-mail addresses,
//!   secret markings, configured patterns) and what to do when they fire;
//! - [`limits`]: per-department request and token rates, concurrency and sizes;
//! - [`data`]: `moat-policy.toml`, the classification scale and what departments and models
//!   may carry;
//! - [`access`]: the Cedar schema and policies with the data rules, deciding a request;
//! - [`decision`]: the outcome's stable reason code.

pub mod access;
pub mod content;
pub mod data;
pub mod decision;
pub mod limits;

pub use access::{
    AccessPolicy, ModelFacts, PolicyAction, PolicyDecision, PolicyError, PolicyRequest,
    PolicySource, SUBJECT_SEPARATOR, SourceFile,
};
pub use data::PolicyData;
pub use decision::ReasonCode;
