//! The GPU proof that `bench/gpu.sh` runs: how a float16 graph on the device agrees with the
//! float32 graph on the CPU, and how fast the batched engine is there.
//!
//! Two steps, so that the device needs neither network nor the float32 graph:
//!
//! - `gpu_proof reference OUT.json`, on the CPU with the float32 demo graph
//!   (`MOAT_BENCH_MODEL_DIR`): the greedy continuation of each FACTS prompt, as token ids.
//! - `gpu_proof measure REFERENCE.json`, on `MOAT_BENCH_DEVICE` (`cuda`, or `cpu` for a dry
//!   run) with the graph in `MOAT_BENCH_MODEL_DIR` and the library in
//!   `MOAT_ONNXRUNTIME_LIB`: top-1 agreement over the reference's teacher-forced positions,
//!   decode tokens/s of one stream (with the bandwidth bound when `MOAT_GPU_BANDWIDTH_GBPS`
//!   is given), aggregate tokens/s at 1, 8, 32 and 64 streams through the engine, and time
//!   to first token. Prints a JSON report on stdout.
//!
//! With neither (`cargo bench -p moat-daemon --bench gpu_proof`), both run here on the CPU.

use std::path::{Path, PathBuf};
use std::time::Instant;

use moat_daemon::engine::backend::{Backend, LogitsBatch, SequenceId, StepInput};
use moat_daemon::engine::sampler::argmax;
use moat_daemon::engine::tokenizer::TextTokenizer;
use moat_daemon::engine::{
    Engine, EngineSettings, GenerationEvent, GenerationRequest, ModelDirectory, OrtBackend, Prompt,
    SessionOptions,
};
use serde_json::{Value, json};

mod common;

/// The prompts FACTS.md records answers for, in the demo model's chat format where chat.
const PROMPTS: [&str; 3] = [
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
     Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
     <|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, there was a little",
];
/// Greedy tokens kept per prompt as the reference.
const CONTINUATION: usize = 48;
const STREAMS: [usize; 4] = [1, 8, 32, 64];
/// Tokens each stream generates in the aggregate runs.
const STREAM_TOKENS: usize = 64;

fn main() {
    let bench = common::CpuBench::load();
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; the steps are named after it.
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let model_dir = std::env::var_os("MOAT_BENCH_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| bench.model().1);
    match args.as_slice() {
        ["reference", out] => reference(&bench, &model_dir, Path::new(out)),
        ["measure", reference] => measure(&bench, &model_dir, Path::new(reference)),
        // `cargo bench` alone: both steps on this machine, the reference from the exact
        // float32 graph and the measurement of `MOAT_BENCH_MODEL_DIR` (default: the fast
        // graph), so the proof's code runs wherever the benches do.
        [] => {
            let out = bench.root.join("target/bench");
            std::fs::create_dir_all(&out).expect("target/bench");
            let reference_file = out.join("gpu-proof-reference.json");
            let exact = bench.root.join("local/models/smollm2-135m-instruct-exact");
            reference(&bench, &exact, &reference_file);
            measure(&bench, &model_dir, &reference_file);
        }
        _ => {
            eprintln!("usage: gpu_proof [reference OUT.json | measure REFERENCE.json]");
            std::process::exit(2);
        }
    }
}

fn backend(bench: &common::CpuBench, model_dir: &Path, max_batch: usize) -> OrtBackend {
    let dir = ModelDirectory::open(model_dir).expect("model directory");
    let options = SessionOptions {
        max_batch,
        // Device memory is committed whole: slots of what these runs need.
        kv_slot_tokens: Some(512),
        ..bench.options.clone()
    };
    OrtBackend::load(&bench.runtime, &dir, &options).expect("model loads")
}

fn prompt_ids(model_dir: &Path) -> Vec<Vec<u32>> {
    let tokenizer =
        TextTokenizer::load(&model_dir.join("tokenizer.json"), None).expect("tokenizer");
    PROMPTS
        .iter()
        .map(|p| tokenizer.encode_with_special_tokens(p).expect("encodes"))
        .collect()
}

/// Feeds `tokens` to sequence `id` alone and returns the logits of its last position.
fn feed(backend: &mut OrtBackend, id: u64, tokens: &[u32], logits: &mut LogitsBatch) -> u32 {
    let input = [StepInput {
        sequence: SequenceId(id),
        tokens,
    }];
    backend.step(&input, logits).expect("step runs");
    argmax(logits.row(0))
}

fn reference(bench: &common::CpuBench, model_dir: &Path, out: &Path) {
    let mut backend = backend(bench, model_dir, 1);
    let mut logits = LogitsBatch::default();
    let mut cases = Vec::new();
    for (id, prompt) in prompt_ids(model_dir).into_iter().enumerate() {
        let id = id as u64;
        backend
            .start_sequence(SequenceId(id), prompt.len() + CONTINUATION + 1)
            .expect("starts");
        let mut next = feed(&mut backend, id, &prompt, &mut logits);
        let mut continuation = Vec::with_capacity(CONTINUATION);
        for _ in 0..CONTINUATION {
            continuation.push(next);
            next = feed(&mut backend, id, &[next], &mut logits);
        }
        backend.finish_sequence(SequenceId(id));
        cases.push(json!({ "prompt": prompt, "continuation": continuation }));
    }
    let report = json!({ "model_dir": model_dir, "cases": cases });
    std::fs::write(out, serde_json::to_vec_pretty(&report).expect("json")).expect("written");
    eprintln!(
        "reference: {} prompts x {CONTINUATION} tokens -> {}",
        PROMPTS.len(),
        out.display()
    );
}

/// Top-1 agreement with the reference, each position fed the reference's own tokens.
fn agreement(bench: &common::CpuBench, model_dir: &Path, reference: &Value) -> (usize, usize) {
    let mut backend = backend(bench, model_dir, 1);
    let mut logits = LogitsBatch::default();
    let (mut agree, mut total) = (0, 0);
    let cases = reference["cases"].as_array().expect("cases");
    for (id, case) in cases.iter().enumerate() {
        let ids = |key: &str| -> Vec<u32> {
            case[key]
                .as_array()
                .expect("token ids")
                .iter()
                .map(|t| {
                    t.as_u64()
                        .and_then(|t| u32::try_from(t).ok())
                        .expect("token id")
                })
                .collect()
        };
        let (prompt, continuation) = (ids("prompt"), ids("continuation"));
        let id = id as u64;
        backend
            .start_sequence(SequenceId(id), prompt.len() + continuation.len() + 1)
            .expect("starts");
        let mut predicted = feed(&mut backend, id, &prompt, &mut logits);
        for &expected in &continuation {
            agree += usize::from(predicted == expected);
            total += 1;
            predicted = feed(&mut backend, id, &[expected], &mut logits);
        }
        backend.finish_sequence(SequenceId(id));
    }
    (agree, total)
}

/// Runs `streams` requests at once through the engine; returns (aggregate tokens/s, median
/// time to first token in ms).
fn streams(engine: &Engine, streams: usize) -> (f64, f64) {
    let start = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|i| {
            let mut request = GenerationRequest::new(Prompt::Text(format!(
                "Report {i}: the committee met on Tuesday and agreed that"
            )));
            request.max_tokens = Some(STREAM_TOKENS);
            request.ignore_eos = true;
            engine.generate(request).expect("accepted")
        })
        .collect();
    // One reader per stream, so each first token is seen when it comes.
    let readers: Vec<_> = handles
        .into_iter()
        .map(|mut stream| {
            std::thread::spawn(move || {
                let (mut tokens, mut first) = (0, None);
                while let Some(event) = stream.next_blocking() {
                    match event {
                        GenerationEvent::Token { .. } => {
                            tokens += 1;
                            first.get_or_insert_with(|| start.elapsed().as_secs_f64() * 1e3);
                        }
                        GenerationEvent::Finished { .. } => break,
                        GenerationEvent::Failed(e) => panic!("generation failed: {e}"),
                    }
                }
                (tokens, first.unwrap_or(f64::NAN))
            })
        })
        .collect();
    let results: Vec<(usize, f64)> = readers
        .into_iter()
        .map(|reader| reader.join().expect("reader"))
        .collect();
    let seconds = start.elapsed().as_secs_f64();
    let tokens: usize = results.iter().map(|r| r.0).sum();
    let mut ttfts: Vec<f64> = results.iter().map(|r| r.1).collect();
    ttfts.sort_by(f64::total_cmp);
    (tokens as f64 / seconds, ttfts[ttfts.len() / 2])
}

fn measure(bench: &common::CpuBench, model_dir: &Path, reference: &Path) {
    let reference: Value =
        serde_json::from_slice(&std::fs::read(reference).expect("reference file"))
            .expect("reference json");
    let (agree, total) = agreement(bench, model_dir, &reference);
    let share = agree as f64 / total.max(1) as f64;
    eprintln!(
        "top-1 agreement with the CPU float32 reference: {agree}/{total} = {:.2}% (goal >= 99%)",
        100.0 * share
    );

    let most = *STREAMS.iter().max().expect("stream counts");
    let options = SessionOptions {
        max_batch: most,
        kv_slot_tokens: Some(512),
        ..bench.options.clone()
    };
    let settings = EngineSettings {
        max_batch: most,
        queue_capacity: most * 2,
        department_queue: most * 2,
        ..EngineSettings::default()
    };
    let engine = Engine::load_ort(&bench.runtime, model_dir, &options, settings).expect("loads");
    // One warm-up request: the first run on a device builds its kernels.
    streams(&engine, 1);
    let mut rows = Vec::new();
    for &n in &STREAMS {
        let (rate, ttft) = streams(&engine, n);
        eprintln!("{n:>3} streams: {rate:>8.1} tok/s aggregate, TTFT p50 {ttft:.1} ms");
        rows.push(json!({ "streams": n, "tokens_per_s": rate, "ttft_p50_ms": ttft }));
    }
    let single = rows[0]["tokens_per_s"].as_f64().unwrap_or(0.0);
    let weights: u64 = std::fs::read_dir(model_dir)
        .expect("model directory")
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.ends_with(".onnx") || name.ends_with(".onnx.data") || name.ends_with(".data")
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let bound = std::env::var("MOAT_GPU_BANDWIDTH_GBPS")
        .ok()
        .and_then(|b| b.parse::<f64>().ok())
        .map(|gbps| gbps * 1e9 / weights.max(1) as f64);
    if let Some(bound) = bound {
        eprintln!(
            "one stream: {single:.1} tok/s = {:.1}% of the bandwidth bound {bound:.0} tok/s \
             ({:.0} MB of weights read per token; goal >= 50%)",
            100.0 * single / bound,
            weights as f64 / 1e6
        );
    }
    let at_most = rows
        .last()
        .and_then(|r| r["tokens_per_s"].as_f64())
        .unwrap_or(0.0);
    eprintln!(
        "{most} streams / one stream: {:.1}x (goal >= 20x on a GPU)",
        at_most / single.max(f64::MIN_POSITIVE)
    );
    let report = json!({
        "device": std::env::var("MOAT_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into()),
        "model_dir": model_dir,
        "agreement": { "agree": agree, "positions": total, "share": share },
        "weights_bytes": weights,
        "bandwidth_bound_tokens_per_s": bound,
        "streams": rows,
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
}
