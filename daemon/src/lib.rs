//! moatd: the moat inference daemon.
//!
//! [`config`] reads and validates `moat.toml`; [`engine`] runs models (everything that
//! touches ONNX Runtime stays inside [`engine::ort_backend`]); [`tls`] accepts departments
//! over mutual TLS and names the caller; [`api`] is the OpenAI-compatible HTTP API;
//! [`metrics`] the Prometheus metrics; [`server`] puts them together for `moatd serve`.
//! It depends on `moat-core` for shared formats; nothing depends on it.

pub mod admin;
pub mod api;
pub mod audit;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod models;
pub mod policy;
pub mod server;
pub mod systemd;
pub mod tls;
