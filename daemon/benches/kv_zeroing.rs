//! What zeroing a KV pool slot on release costs, against the decode steps that filled it,
//! measured in one run on this machine.
//!
//! A pooled sequence's slot is zeroed over every position its runs wrote when the sequence
//! finishes (`engine/ort_backend/kv_pool.rs`), so that the next sequence in the slot finds
//! nothing of it. Each round starts a sequence, prefills a prompt, decodes a few tokens one
//! step at a time, and times `finish_sequence`, which is the zeroing (a release of a slot
//! no run wrote, which zeroes nothing, is timed too). Printed per model:
//!
//! - the zeroing against one decode step: the one-off pause a release puts between two
//!   steps of the other sequences;
//! - the zeroing against the engine time of the sequence it ends (its prefill and its
//!   decode steps): what zeroing adds to serving it (goal: under 1%);
//! - the zeroing per cached position against a decode step, which produces one position:
//!   what zeroing adds to each generated token (goal: under 1%).
//!
//! `cargo bench -p moat-daemon --bench kv_zeroing` (after `bash scripts/setup.sh`).
//! `MOAT_BENCH_MODELS` is a comma-separated list of model directories under `local/models`
//! (default: the fixture and the demo model's fast graph; a missing one is skipped).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use moat_daemon::engine::backend::{Backend, LogitsBatch, SequenceId, StepInput};
use moat_daemon::engine::{
    DevicePreference, ModelDirectory, OrtBackend, OrtRuntime, SessionOptions, runtime_library,
};

const ROUNDS: usize = 7;
const DECODE_STEPS: usize = 32;
/// Positions each round caches, at most (the fixture's context is shorter).
const POSITIONS: usize = 512;

fn main() {
    common::isolate();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let library = runtime_library::locate(Some(&root.join("local/onnxruntime")), None)
        .expect("run scripts/setup.sh first");
    let runtime = OrtRuntime::load(library).expect("ONNX Runtime");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let options = SessionOptions {
        device: DevicePreference::Cpu,
        intra_op_threads: Some(threads),
        ..SessionOptions::default()
    };
    let models = std::env::var("MOAT_BENCH_MODELS")
        .unwrap_or_else(|_| "fixture-fused,smollm2-135m-instruct-fast".to_owned());
    for model in models.split(',') {
        let dir = root.join("local/models").join(model);
        if !dir.is_dir() {
            println!("kv_zeroing: {model} is not provisioned; skipped");
            continue;
        }
        let directory = ModelDirectory::open(&dir).expect("a model directory");
        let mut backend = OrtBackend::load(&runtime, &directory, &options).expect("loads");
        let context = directory.metadata.context_length;
        let vocab = directory.metadata.vocab_size as u32;
        report(model, threads, &measure(&mut backend, context, vocab));
    }
}

/// Medians over the rounds.
struct Measured {
    prompt: usize,
    prefill: Duration,
    step: Duration,
    zeroing: Duration,
    release_only: Duration,
}

fn run(backend: &mut OrtBackend, sequence: SequenceId, tokens: &[u32]) -> Duration {
    let started = Instant::now();
    backend
        .step(
            &[StepInput { sequence, tokens }],
            &mut LogitsBatch::default(),
        )
        .expect("step runs");
    started.elapsed()
}

fn measure(backend: &mut OrtBackend, context: usize, vocab: u32) -> Measured {
    let positions = POSITIONS.min(context - 1);
    let prompt_len = positions - DECODE_STEPS;
    // Ordinary token ids, away from the special ones at the start of the vocabulary.
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| 100 + i % (vocab - 100))
        .collect();
    let (mut prefills, mut steps, mut zeroings, mut releases) = (vec![], vec![], vec![], vec![]);
    // Round 0 warms the session up and is not counted.
    for round in 0..=ROUNDS {
        let sequence = SequenceId(round as u64);
        backend.start_sequence(sequence, positions).expect("starts");
        let prefill = run(backend, sequence, &prompt);
        let decode: Vec<Duration> = (0..DECODE_STEPS as u32)
            .map(|i| run(backend, sequence, &[200 + i]))
            .collect();
        let started = Instant::now();
        backend.finish_sequence(sequence);
        let zeroing = started.elapsed();

        let idle = SequenceId(1000 + round as u64);
        backend.start_sequence(idle, positions).expect("starts");
        let started = Instant::now();
        backend.finish_sequence(idle);
        let release_only = started.elapsed();
        if round > 0 {
            prefills.push(prefill);
            steps.extend(decode);
            zeroings.push(zeroing);
            releases.push(release_only);
        }
    }
    Measured {
        prompt: prompt_len,
        prefill: median(&mut prefills),
        step: median(&mut steps),
        zeroing: median(&mut zeroings),
        release_only: median(&mut releases),
    }
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn report(model: &str, threads: usize, m: &Measured) {
    let positions = m.prompt + DECODE_STEPS;
    let sequence_time = m.prefill + m.step * DECODE_STEPS as u32;
    let per_position = m.zeroing.as_secs_f64() / positions as f64;
    let percent = |part: f64, whole: Duration| 100.0 * part / whole.as_secs_f64();
    println!(
        "kv_zeroing: {model}, {threads} threads, {positions} positions cached \
         ({} prompt + {DECODE_STEPS} generated), medians of {ROUNDS} rounds",
        m.prompt
    );
    println!(
        "  decode step                     {:>10.1} us",
        micros(m.step)
    );
    println!(
        "  prefill of the prompt           {:>10.1} us",
        micros(m.prefill)
    );
    println!(
        "  zeroing the slot on release     {:>10.1} us  ({:.1} ns a position; a release \
         with nothing to zero: {:.1} us)",
        micros(m.zeroing),
        per_position * 1e9,
        micros(m.release_only)
    );
    println!(
        "  zeroing / one decode step                  {:>8.3} %",
        percent(m.zeroing.as_secs_f64(), m.step)
    );
    println!(
        "  zeroing / the sequence's engine time       {:>8.3} %  (goal < 1 %)",
        percent(m.zeroing.as_secs_f64(), sequence_time)
    );
    println!(
        "  zeroing a position / one decode step       {:>8.3} %  (goal < 1 %)",
        percent(per_position, m.step)
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
