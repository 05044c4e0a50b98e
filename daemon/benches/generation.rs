//! Single-stream generation speed of the Rust engine against its peers, measured in one run
//! on this machine with the same model, prompt, token count and thread count:
//!
//! - the Rust engine on the `exact` and `fast` fused graphs;
//! - a plain Python onnxruntime loop over the same two graphs (`tools/model/ort_loop.py`);
//! - llama.cpp (llama-cpp-python) on the same GGUF, when `bench/install-llama-cpp.sh` has
//!   built it (slow, so never part of the test command).
//!
//! `cargo bench -p moat-daemon --bench generation` (after `bash scripts/setup.sh`). Prints
//! a table and the ratios; the goals are Rust >= 1.0x the Python loop on the same graph and
//! the fast graph >= 1.2x llama.cpp in decode tokens/s.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use moat_daemon::engine::runtime_library;
use moat_daemon::engine::{
    ChatMessage, DevicePreference, Engine, EngineSettings, GenerationEvent, GenerationRequest,
    OrtRuntime, Prompt, SessionOptions,
};

const NEW_TOKENS: usize = 128;
const RUNS: usize = 5;
const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Clone, Copy, PartialEq)]
struct Measurement {
    ttft_ms: f64,
    decode_tokens_per_s: f64,
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let models = root.join("local/models");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let located = runtime_library::locate(Some(&root.join("local/onnxruntime")), None)
        .expect("run scripts/setup.sh first");
    let runtime = OrtRuntime::load(located).expect("ONNX Runtime");
    let options = SessionOptions {
        device: DevicePreference::Cpu,
        intra_op_threads: Some(threads),
        ..SessionOptions::default()
    };

    let variants = ["exact", "fast"];
    let dirs: Vec<PathBuf> = variants
        .iter()
        .map(|v| models.join(format!("smollm2-135m-instruct-{v}")))
        .collect();
    let engines: Vec<Engine> = dirs
        .iter()
        .map(|dir| {
            Engine::load_ort(&runtime, dir, &options, EngineSettings::default())
                .expect("model loads")
        })
        .collect();
    let prompt_ids = engines[0]
        .tokenize_prompt(&Prompt::Chat(vec![ChatMessage::new(
            "user",
            "Write a short story about a lighthouse keeper.",
        )]))
        .expect("tokenizes");
    let llama = llama_cpp_venv();
    if llama.is_none() {
        eprintln!("llama.cpp peer skipped: run `bash bench/install-llama-cpp.sh` to build it");
    }

    // The same fast graph with ONNX Runtime's worker threads pinned (engine.pin_threads),
    // to show what pinning contributes on this machine.
    let pinned = Engine::load_ort(
        &runtime,
        &dirs[1],
        &SessionOptions {
            pin_threads: true,
            ..options.clone()
        },
        EngineSettings::default(),
    )
    .expect("model loads");
    let rows = measure_in_rounds(
        &root,
        &engines,
        &dirs,
        &prompt_ids,
        llama.as_deref(),
        threads,
        &pinned,
    );
    for engine in engines {
        engine.shutdown();
    }
    pinned.shutdown();
    print_report(&rows, threads, prompt_ids.len());
}

/// Prints the table and the ratios the goals are stated in.
fn print_report(rows: &[(String, Measurement)], threads: usize, prompt_tokens: usize) {
    println!(
        "\nSmolLM2-135M-Instruct, CPU, {threads} threads, prompt {} tokens, {NEW_TOKENS} new tokens, median of {RUNS} interleaved rounds\n",
        prompt_tokens
    );
    println!("| engine | TTFT ms | decode tok/s |");
    println!("|---|---:|---:|");
    for (name, m) in rows {
        println!(
            "| {name} | {:.1} | {:.1} |",
            m.ttft_ms, m.decode_tokens_per_s
        );
    }
    let rate = |name: &str| {
        rows.iter()
            .find(|(n, _)| n.starts_with(name))
            .map(|(_, m)| m.decode_tokens_per_s)
    };
    println!();
    for variant in ["exact", "fast"] {
        if let (Some(rust), Some(python)) = (
            rate(&format!("moat engine (Rust), {variant}")),
            rate(&format!("Python onnxruntime loop, {variant}")),
        ) {
            println!(
                "Rust / Python loop, {variant} graph: {:.2}x (goal >= 1.0x)",
                rust / python
            );
        }
    }
    if let (Some(pinned), Some(python)) = (
        rate("moat engine (Rust), fast graph, threads pinned"),
        rate("Python onnxruntime loop, fast"),
    ) {
        println!(
            "Rust with pinned threads / Python loop, fast graph: {:.2}x",
            pinned / python
        );
    }
    if let (Some(fast), Some(llama)) = (rate("moat engine (Rust), fast graph"), rate("llama.cpp")) {
        println!(
            "Rust fast graph / llama.cpp: {:.2}x (goal >= 1.2x)",
            fast / llama
        );
    }
}

/// Every engine runs once per round and rounds repeat: drift in the machine's speed (other
/// load, thermal state) then touches all engines alike instead of favouring one.
fn measure_in_rounds(
    root: &Path,
    engines: &[Engine],
    dirs: &[PathBuf],
    prompt_ids: &[u32],
    llama: Option<&Path>,
    threads: usize,
    pinned: &Engine,
) -> Vec<(String, Measurement)> {
    let mut names: Vec<String> = Vec::new();
    for dir in dirs {
        let variant = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit('-').next())
            .unwrap_or("?");
        names.push(format!("moat engine (Rust), {variant} graph"));
        names.push(format!("Python onnxruntime loop, {variant} graph"));
    }
    names.push("moat engine (Rust), fast graph, threads pinned".into());
    if llama.is_some() {
        names.push("llama.cpp (llama-cpp-python), Q4_1 GGUF".into());
    }
    let gguf = root.join("local/models").join(GGUF);
    let mut samples: Vec<Vec<Measurement>> = vec![Vec::new(); names.len()];
    for round in 0..=RUNS {
        let mut round_samples = Vec::with_capacity(names.len());
        for (engine, dir) in engines.iter().zip(dirs) {
            round_samples.push(rust_run(engine, prompt_ids));
            round_samples.push(python_run(root, dir, prompt_ids, threads));
        }
        round_samples.push(rust_run(pinned, prompt_ids));
        if let Some(venv) = llama {
            round_samples.push(llama_cpp_run(root, venv, &gguf, prompt_ids, threads));
        }
        // Round 0 warms caches and is not counted.
        if round > 0 {
            for (all, sample) in samples.iter_mut().zip(round_samples) {
                all.push(sample);
            }
        }
    }
    names
        .into_iter()
        .zip(samples.iter().map(|s| median(s)))
        .collect()
}

fn median(runs: &[Measurement]) -> Measurement {
    let middle = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Measurement {
        ttft_ms: middle(runs.iter().map(|m| m.ttft_ms).collect()),
        decode_tokens_per_s: middle(runs.iter().map(|m| m.decode_tokens_per_s).collect()),
    }
}

fn rust_run(engine: &Engine, prompt: &[u32]) -> Measurement {
    let mut request = GenerationRequest::new(Prompt::TokenIds(prompt.to_vec()));
    request.max_tokens = Some(NEW_TOKENS);
    request.ignore_eos = true;
    let start = Instant::now();
    let mut stream = engine.submit(request).expect("accepted");
    let mut first = None;
    let mut tokens = 0usize;
    while let Some(event) = stream.next_blocking() {
        match event {
            GenerationEvent::Token { .. } => {
                first.get_or_insert_with(Instant::now);
                tokens += 1;
            }
            GenerationEvent::Finished { .. } => break,
            GenerationEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    let end = Instant::now();
    let first = first.expect("at least one token");
    Measurement {
        ttft_ms: (first - start).as_secs_f64() * 1e3,
        decode_tokens_per_s: (tokens - 1) as f64 / (end - first).as_secs_f64(),
    }
}

fn parse(output: std::process::Output, what: &str) -> Measurement {
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(line).expect("one JSON line");
    Measurement {
        ttft_ms: value["ttft_ms"].as_f64().expect("ttft_ms"),
        decode_tokens_per_s: value["decode_tokens_per_s"].as_f64().expect("rate"),
    }
}

fn ids_arg(prompt: &[u32]) -> String {
    prompt
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn python_run(root: &Path, model: &Path, prompt: &[u32], threads: usize) -> Measurement {
    let output = Command::new(root.join("local/venv/bin/python"))
        .arg(root.join("tools/model/ort_loop.py"))
        .arg("--model")
        .arg(model)
        .args(["--prompt-ids", &ids_arg(prompt)])
        .args(["--max-new-tokens", &NEW_TOKENS.to_string()])
        .args(["--threads", &threads.to_string(), "--ignore-eos", "--json"])
        .output()
        .expect("python runs");
    parse(output, "the Python onnxruntime loop")
}

fn llama_cpp_venv() -> Option<PathBuf> {
    let cache = std::env::var_os("MOAT_BENCH_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("moat-bench")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/moat-bench")))?;
    let venv = cache.join("llama-cpp-0.3.36");
    venv.join("bin/python").is_file().then_some(venv)
}

fn llama_cpp_run(
    root: &Path,
    venv: &Path,
    gguf: &Path,
    prompt: &[u32],
    threads: usize,
) -> Measurement {
    let output = Command::new(venv.join("bin/python"))
        .arg(root.join("bench/llama_cpp_peer.py"))
        .arg("--gguf")
        .arg(gguf)
        .args(["--prompt-ids", &ids_arg(prompt)])
        .args(["--max-new-tokens", &NEW_TOKENS.to_string()])
        .args(["--threads", &threads.to_string()])
        .output()
        .expect("llama.cpp peer runs");
    parse(output, "the llama.cpp peer")
}
