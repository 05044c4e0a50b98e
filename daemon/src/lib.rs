//! moatd: the moat inference daemon.
//!
//! # How the daemon is built
//!
//! moatd is a stack of rooms, each importing only from the rooms below it. A room never
//! imports from a room above it or beside it, so each can be read, tested and changed
//! with only what is under it in mind:
//!
//! | module | what it is | may import |
//! |---|---|---|
//! | `engine` | runs models: tokenizer, chat template, scheduler, sampler; ONNX Runtime only inside `engine::ort_backend` | — |
//! | `policy` | the access policy in force, reloaded whole or not at all | — |
//! | `config` | reads and validates `moat.toml`, whole | `engine` |
//! | `metrics` | the Prometheus metrics | `engine` |
//! | `audit` | the encrypted, chained audit trail and its group commit | `config` |
//! | `tls` | mutual TLS: names each caller from its certificate | `config` |
//! | `models` | what is served: the registry, rollout, golden checks, evaluations | `audit`, `config`, `engine`, `policy` |
//! | `api` | the OpenAI-compatible HTTP API | `audit`, `config`, `engine`, `metrics`, `models`, `policy`, `tls` |
//! | `admin` | the admin socket `moatctl` talks to | `audit`, `config`, `models` |
//! | `systemd` | readiness, the watchdog, socket activation | `audit`, `engine`, `models` |
//! | `server` | puts them together for `moatd serve` | everything |
//!
//! Inside a room, sub-modules import each other without cycles. `tests/layers.rs` checks
//! both rules against the code and prints the graph
//! (`cargo test -p moat-daemon --test layers -- --nocapture`).
//!
//! A department's request crosses the rooms in one direction: `server` accepts it over
//! mutual TLS (`tls` names the caller); `api`'s request layers give it an id, count it and
//! start its audit notes; the handler reads it, asks `policy` through the gate, has the
//! `engine` prepare it, makes the admission record durable in `audit`, and only then
//! submits it; the answer is finished in one place and its final record written by its
//! one owner.
//!
//! Under all the rooms lie two crates it shares with `moatctl`: `moat-core` (formats and
//! rules, no I/O, including the admin socket's protocol) and `moat-store` (reading the
//! stores both binaries open: the audit store, the policy directory, the clock). Nothing
//! depends on moatd. Modules are public only where `moatd`'s own binary, the tests or the
//! benchmarks use them.

pub mod api;
pub mod audit;
pub mod config;
pub mod engine;
pub mod server;
pub mod systemd;

pub(crate) mod admin;
pub(crate) mod metrics;
pub(crate) mod models;
pub(crate) mod policy;
pub(crate) mod tls;
