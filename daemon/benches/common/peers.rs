//! What the peer benchmarks (`peers`, `conversions`) share: one single-stream figure, the
//! bare ONNX Runtime greedy loop they time moat's graphs with, where install-peers.sh put
//! the peers, and the machine a report names.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use moat_daemon::engine::backend::{Backend, LogitsBatch, SequenceId, StepInput};
use moat_daemon::engine::sampler;
use moat_daemon::engine::{ModelDirectory, OrtBackend, SessionOptions};

use super::CpuBench;

/// The llama.cpp version install-peers.sh builds (llama-cpp-python's sdist).
const LLAMA_CPP_VERSION: &str = "0.3.36";

/// Where install-peers.sh put llama-server, built without AMX (see the script).
pub fn llama_server_binary(cache: &Path) -> PathBuf {
    cache.join(format!(
        "llama-server-{LLAMA_CPP_VERSION}-portable/bin/llama-server"
    ))
}

/// One single-stream measurement.
#[derive(Debug, Clone, Copy)]
pub struct Single {
    pub ttft_ms: f64,
    pub decode_tokens_per_s: f64,
}

/// ONNX Runtime and nothing else: prefill, then one greedy step per token.
pub struct BareLoop {
    backend: OrtBackend,
    logits: LogitsBatch,
}

impl BareLoop {
    pub fn load(bench: &CpuBench, model_dir: &Path) -> Self {
        Self::load_with(bench, model_dir, 1)
    }

    pub fn load_with(bench: &CpuBench, model_dir: &Path, max_batch: usize) -> Self {
        let dir = ModelDirectory::open(model_dir).expect("model directory");
        let options = SessionOptions {
            max_batch,
            ..bench.options.clone()
        };
        Self {
            backend: OrtBackend::load(&bench.runtime, &dir, &options).expect("model loads"),
            logits: LogitsBatch::default(),
        }
    }

    /// The backend, for benches that drive it themselves (batched steps).
    pub fn backend(&mut self) -> &mut OrtBackend {
        &mut self.backend
    }

    pub fn run(&mut self, prompt: &[u32], new_tokens: usize) -> Single {
        let sequence = SequenceId(1);
        self.backend
            .start_sequence(sequence, prompt.len() + new_tokens)
            .expect("sequence starts");
        let start = Instant::now();
        let mut token = [0u32];
        let feed = |backend: &mut OrtBackend, logits: &mut LogitsBatch, tokens: &[u32]| {
            backend
                .step(&[StepInput { sequence, tokens }], logits)
                .expect("step runs");
            sampler::argmax(logits.row(0))
        };
        token[0] = feed(&mut self.backend, &mut self.logits, prompt);
        let first = Instant::now();
        for _ in 1..new_tokens {
            token[0] = feed(&mut self.backend, &mut self.logits, &token);
        }
        let end = Instant::now();
        self.backend.finish_sequence(sequence);
        Single {
            ttft_ms: (first - start).as_secs_f64() * 1e3,
            decode_tokens_per_s: (new_tokens - 1) as f64 / (end - first).as_secs_f64(),
        }
    }
}

/// Where `bash bench/install-peers.sh` put the peers.
pub fn peers_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("MOAT_BENCH_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("moat-bench")
}

/// The CPU and its core count, as a report names the machine.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// Runs a measurement of a peer process; when it fails (a request errors, the peer dies),
/// the reason, from how the peer ended if it did.
pub fn survive<T>(peer: &mut Child, measure: impl FnOnce() -> T) -> Result<T, String> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(measure));
    result.map_err(|_| {
        // A request in flight fails just before the exit is visible.
        std::thread::sleep(Duration::from_millis(500));
        exit_reason(peer).unwrap_or_else(|| "its requests failed".to_owned())
    })
}

/// How a child process ended, if it has.
pub fn exit_reason(child: &mut Child) -> Option<String> {
    let status = child.try_wait().ok()??;
    Some(match status.signal() {
        Some(signal) => format!("crashed, signal {signal}"),
        None => format!("exited, {status}"),
    })
}
