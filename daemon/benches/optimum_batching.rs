//! Decode throughput of concurrent greedy streams on a graph with the optimum contract, with
//! the streams' decodes batched in one run a step (the backend's decode group) against the
//! same streams run one at a time (a backend with `max_batch` 1, where each sequence feeds
//! its own cache through its own run, as every optimum-contract sequence did before the
//! group), measured in one run on this machine.
//!
//! Each round starts the streams, prefills their prompts (of different lengths, so the
//! group carries padding), then times the decode steps: every step feeds every stream one
//! greedy token. Printed per model and stream count: decode tokens/s alone and batched, and
//! their ratio; then each mode's 16-stream throughput against its 1-stream throughput. The
//! batched streams must produce exactly the tokens the lone ones do, or the bench fails.
//!
//! `cargo bench -p moat-daemon --bench optimum_batching` (after `bash scripts/setup.sh`).
//! `MOAT_BENCH_MODELS` is a comma-separated list of model directories, by name under
//! `local/models` or by path (default: `fixture-optimum`; a missing one is skipped). The
//! demo model's optimum graph is made with `moat-model convert
//! local/models/smollm2-135m-instruct-hf --out /tmp/smollm2-optimum --graph optimum`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use moat_daemon::engine::backend::{Backend, LogitsBatch, SequenceId, StepInput};
use moat_daemon::engine::sampler::argmax;
use moat_daemon::engine::{
    DevicePreference, ModelDirectory, OrtBackend, OrtRuntime, SessionOptions, runtime_library,
};

const ROUNDS: usize = 3;
const STREAMS: [usize; 2] = [1, 16];
const NEW_TOKENS: usize = 48;

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
    let models =
        std::env::var("MOAT_BENCH_MODELS").unwrap_or_else(|_| "fixture-optimum".to_owned());
    for model in models.split(',') {
        let dir = root.join("local/models").join(model);
        if !dir.is_dir() {
            println!("optimum_batching: {model} is not provisioned; skipped");
            continue;
        }
        let directory = ModelDirectory::open(&dir).expect("a model directory");
        let load = |max_batch| {
            let options = SessionOptions {
                device: DevicePreference::Cpu,
                intra_op_threads: Some(threads),
                max_batch,
                ..SessionOptions::default()
            };
            OrtBackend::load(&runtime, &directory, &options).expect("loads")
        };
        let (mut alone, mut batched) = (load(1), load(STREAMS[1]));
        let vocab = directory.metadata.vocab_size as u32;
        println!(
            "optimum_batching: {model}, {threads} threads, {NEW_TOKENS} greedy tokens a \
             stream, medians of {ROUNDS} rounds"
        );
        println!("  streams   alone tok/s   batched tok/s   batched/alone   runs/step batched");
        let mut rates = Vec::new();
        for streams in STREAMS {
            let prompts = prompts(streams, vocab);
            let a = measure(&mut alone, &prompts);
            let b = measure(&mut batched, &prompts);
            assert_eq!(
                a.tokens, b.tokens,
                "{model}: batched streams produced other tokens than lone ones"
            );
            println!(
                "  {streams:>7}   {:>11.1}   {:>13.1}   {:>12.2}x   {:>17.2}",
                a.rate,
                b.rate,
                b.rate / a.rate,
                b.runs_per_step
            );
            rates.push((a.rate, b.rate));
        }
        let (one, many) = (rates[0], rates[1]);
        println!(
            "  {} streams / 1 stream: alone {:.2}x, batched {:.2}x (same tokens: yes)",
            STREAMS[1],
            many.0 / one.0,
            many.1 / one.1
        );
    }
}

/// Prompts of different lengths, of ordinary token ids away from the special ones.
fn prompts(streams: usize, vocab: u32) -> Vec<Vec<u32>> {
    (0..streams as u32)
        .map(|s| {
            let len = 24 + 8 * (s % 4);
            (0..len)
                .map(|i| 100 + (s * 131 + i * 17) % (vocab - 100))
                .collect()
        })
        .collect()
}

struct Measured {
    /// Decode tokens per second over all streams, median of the rounds.
    rate: f64,
    /// Forward passes per decode step.
    runs_per_step: f64,
    /// Each stream's greedy tokens (the same every round).
    tokens: Vec<Vec<u32>>,
}

fn measure(backend: &mut OrtBackend, prompts: &[Vec<u32>]) -> Measured {
    let mut times = Vec::new();
    let mut tokens = Vec::new();
    let mut runs = 0;
    // Round 0 warms the session up and is not counted.
    for round in 0..=ROUNDS {
        let before = backend.session_runs();
        let (time, produced) = generate(backend, prompts, round);
        if round > 0 {
            times.push(time);
            runs = backend.session_runs() - before;
        }
        tokens = produced;
    }
    times.sort();
    let decoded = prompts.len() * (NEW_TOKENS - 1);
    // Each round's runs: one per prompt, then the decode steps'.
    let decode_runs = runs - prompts.len() as u64;
    Measured {
        rate: decoded as f64 / times[times.len() / 2].as_secs_f64(),
        runs_per_step: decode_runs as f64 / (NEW_TOKENS - 1) as f64,
        tokens,
    }
}

/// Prefills every prompt in one step, then decodes every stream each step; returns the
/// decode steps' time and each stream's tokens.
fn generate(
    backend: &mut OrtBackend,
    prompts: &[Vec<u32>],
    round: usize,
) -> (Duration, Vec<Vec<u32>>) {
    let ids: Vec<SequenceId> = (0..prompts.len())
        .map(|i| SequenceId((round * 1000 + i) as u64))
        .collect();
    for (&id, prompt) in ids.iter().zip(prompts) {
        backend
            .start_sequence(id, prompt.len() + NEW_TOKENS)
            .expect("starts");
    }
    let mut logits = LogitsBatch::default();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::with_capacity(NEW_TOKENS); prompts.len()];
    let prefill: Vec<StepInput<'_>> = ids
        .iter()
        .zip(prompts)
        .map(|(&sequence, prompt)| StepInput {
            sequence,
            tokens: prompt,
        })
        .collect();
    backend.step(&prefill, &mut logits).expect("prefill runs");
    take_tokens(&logits, &mut tokens);
    let started = Instant::now();
    for _ in 1..NEW_TOKENS {
        let last: Vec<u32> = tokens.iter().map(|t| t[t.len() - 1]).collect();
        let batch: Vec<StepInput<'_>> = ids
            .iter()
            .zip(&last)
            .map(|(&sequence, token)| StepInput {
                sequence,
                tokens: std::slice::from_ref(token),
            })
            .collect();
        backend.step(&batch, &mut logits).expect("decode runs");
        take_tokens(&logits, &mut tokens);
    }
    let time = started.elapsed();
    for &id in &ids {
        backend.finish_sequence(id);
    }
    (time, tokens)
}

fn take_tokens(logits: &LogitsBatch, tokens: &mut [Vec<u32>]) {
    for (row, stream) in tokens.iter_mut().enumerate() {
        stream.push(argmax(logits.row(row)) as u32);
    }
}
