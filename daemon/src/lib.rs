//! moatd: the moat inference daemon.
//!
//! Today it owns the generation engine ([`engine`]) and the configuration it reads
//! ([`config`]). It depends on `moat-core` for shared formats; nothing depends on it.
//! Everything that touches ONNX Runtime stays inside [`engine::ort_backend`].

pub mod config;
pub mod engine;
