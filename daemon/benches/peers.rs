//! moat against the engines its users could pick instead, on the same machine, model and
//! prompt, in one run:
//!
//! - single-stream decode tokens/s: moatd end to end over mutual TLS (the real binary, with
//!   its policy gate and durable audit records) against the bare ONNX Runtime greedy loop in
//!   Rust (`OrtBackend`, no engine), the Python onnxruntime loop (`python -m moat_model.ort_loop`),
//!   onnxruntime-genai running the same graph under its own loop, and llama.cpp's
//!   `llama-server` on the same SmolLM2 GGUF;
//! - aggregate tokens/s of moatd and llama-server at 1, 4, 16 and 32 concurrent streams;
//! - time to first token, p50 and p99, idle and under that load;
//! - the batching share: moatd's aggregate at 16 streams / 1 against one decode step of
//!   batch 16 / batch 1 in process through the same positions, measured side by side in
//!   rounds (median), so the machine's drift over the run cancels out;
//! - resident memory over the model's weights.
//!
//! `bash bench/install-peers.sh` (once, slow) then `cargo bench -p moat-daemon --bench
//! peers`. A peer that is not installed is left out with a message. Prints a table and the
//! ratios the goals are stated in, writes `target/bench/peers.json`, and draws
//! `target/bench/peers.png` with `bench/plot_peers.py`.
//!
//! `MOAT_BENCH_MODEL` picks the model directory under `local/models` (default
//! `smollm2-135m-instruct-fast`); `MOAT_BENCH_DEVICE=cuda` serves it on the GPU (see
//! `bench/gpu.sh`); `MOAT_BENCH_CACHE` is where install-peers.sh put the peers.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moat_daemon::engine::backend::{Backend, LogitsBatch, SequenceId, StepInput};
use moat_daemon::engine::{ChatMessage, Prompt};
use serde_json::{Value, json};

mod common;
use common::peers::{
    BareLoop, Single, exit_reason, llama_server_binary, machine, peers_cache, survive,
};
use common::sse::{Streamed, stream};
use common::tls::{Pki, client, make_pki, write_permissive_policy};

const NEW_TOKENS: usize = 128;
const ROUNDS: usize = 3;
const STREAM_COUNTS: [usize; 4] = [1, 4, 16, 32];
/// Tokens per answer and answers per stream in the concurrency runs.
const CONCURRENT_TOKENS: usize = NEW_TOKENS;
const ANSWERS_PER_STREAM: usize = 2;
/// Rounds of the batching share (kernels and served loads side by side); the median counts.
const SHARE_ROUNDS: usize = 3;
const IDLE_TTFT_SAMPLES: usize = 15;
/// Pause between the probe's requests during a load.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Tokens the probe and the idle TTFT requests ask for.
const SHORT_ANSWER: usize = 4;
const STORY: &str = "Write a short story about a lighthouse keeper.";
const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The llama.cpp peer's name in the report.
const LLAMA: &str = "llama.cpp llama-server, Q4_1 GGUF";

/// One concurrency level of one server.
#[derive(Debug, Clone)]
struct Load {
    streams: usize,
    tokens_per_s: f64,
    /// Time to first token of a request arriving while the streams run.
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    /// The streams' own time to first token (their answers queue behind each other).
    stream_ttft_p50_ms: f64,
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    url: String,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn rss_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

fn main() {
    let bench = common::CpuBench::load();
    let (model, model_dir) = bench.model();
    let device = std::env::var("MOAT_BENCH_DEVICE").unwrap_or_else(|_| "cpu".to_owned());
    let threads = bench.threads;
    let cache = peers_cache();
    let out_dir = bench.root.join("target/bench");
    std::fs::create_dir_all(&out_dir).expect("target/bench");

    let prompt_ids = {
        let engine = bench.engine(&model_dir);
        let ids = engine
            .tokenize_prompt(&Prompt::Chat(vec![ChatMessage::new("user", STORY)]))
            .expect("tokenizes");
        engine.shutdown();
        ids
    };
    let ids_arg = prompt_ids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");

    let pki = make_pki();
    let moatd = start_moatd(&pki, &bench, &model, &device);
    let agent = client(&pki);
    let moatd_request = |max_tokens: usize| {
        (
            format!("{}/v1/chat/completions", moatd.url),
            json!({
                "model": "bench",
                "messages": [{"role": "user", "content": STORY}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": true,
                "stream_options": {"include_usage": true},
            })
            .to_string(),
        )
    };
    // The peers run on the CPU only: on the GPU, moatd is measured against the bare loop.
    let on_cpu = device != "cuda";
    // A peer that fails is a row of the report ("crashed, signal 11"), not the bench's end.
    let mut down: Vec<(&str, String)> = Vec::new();
    let mut llama = match on_cpu.then(|| start_llama_server(&cache, &bench.root, threads)) {
        Some(Ok(server)) => Some(server),
        Some(Err(reason)) => {
            report_down(&mut down, LLAMA, reason);
            None
        }
        None => None,
    };
    // A fresh connection per request: llama-server closes kept-alive connections that a
    // pool would then hand out again.
    let plain = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(300)))
        .max_idle_connections(0)
        .build()
        .new_agent();
    let llama_request = |url: &str, max_tokens: usize| {
        (
            format!("{url}/completion"),
            json!({
                "prompt": prompt_ids,
                "n_predict": max_tokens,
                "temperature": 0,
                "top_k": 1,
                "ignore_eos": true,
                "cache_prompt": false,
                "stream": true,
            })
            .to_string(),
        )
    };
    let genai_python = cache.join("peers/bin/python");
    let genai = (on_cpu && genai_python.exists()).then_some(genai_python);
    if genai.is_none() {
        eprintln!("onnxruntime-genai left out: run `bash bench/install-peers.sh`");
    }
    let mut bare = BareLoop::load(&bench, &model_dir);

    // Every engine runs once per round: drift in the machine's speed touches all alike.
    let mut names: Vec<&str> = vec![
        "moatd, end to end over mTLS",
        "bare ONNX Runtime loop (Rust)",
    ];
    if on_cpu {
        names.push("Python onnxruntime loop");
    }
    if genai.is_some() {
        names.push("onnxruntime-genai");
    }
    if llama.is_some() {
        names.push(LLAMA);
    }
    let mut samples: Vec<Vec<Single>> = vec![Vec::new(); names.len()];
    for round in 0..=ROUNDS {
        eprintln!("single stream, round {round} of {ROUNDS} (0 warms up)");
        let mut row = Vec::new();
        let (url, body) = moatd_request(NEW_TOKENS);
        row.push(single(&stream(&agent, &url, &body)));
        row.push(bare.run(&prompt_ids, NEW_TOKENS));
        if on_cpu {
            row.push(python_peer(
                &bench.root.join("local/venv/bin/python"),
                &[
                    "-m".as_ref(),
                    "moat_model.ort_loop".as_ref(),
                    "--ignore-eos".as_ref(),
                    "--json".as_ref(),
                ],
                &model_dir,
                &ids_arg,
                threads,
            ));
        }
        if let Some(python) = &genai {
            row.push(python_peer(
                python,
                &[bench.root.join("bench/genai_peer.py").as_os_str()],
                &model_dir,
                &ids_arg,
                threads,
            ));
        }
        if let Some(server) = &mut llama {
            let (url, body) = llama_request(&server.url, NEW_TOKENS);
            match survive(&mut server.child, || single(&stream(&plain, &url, &body))) {
                Ok(sample) => row.push(sample),
                Err(reason) => {
                    report_down(&mut down, LLAMA, reason);
                    llama = None;
                }
            }
        }
        // Round 0 warms caches and is not counted.
        if round > 0 {
            for (all, sample) in samples.iter_mut().zip(row) {
                all.push(sample);
            }
        }
    }
    let singles: Vec<(&str, Single)> = names
        .iter()
        .copied()
        .zip(&samples)
        .filter(|(_, samples)| !samples.is_empty())
        .map(|(name, samples)| (name, median_single(samples)))
        .collect();
    drop(bare);
    let mut pooled = BareLoop::load_with(&bench, &model_dir, 32);
    let steps = batched_steps(&mut pooled, &prompt_ids);

    let idle_ttft = {
        let mut ttfts = Vec::new();
        for _ in 0..IDLE_TTFT_SAMPLES {
            std::thread::sleep(Duration::from_millis(50));
            let (url, body) = moatd_request(SHORT_ANSWER);
            ttfts.push(stream(&agent, &url, &body).ttft.as_secs_f64() * 1e3);
        }
        percentile(&mut ttfts, 0.5)
    };
    let moatd_rss_idle = moatd.rss_kib("VmRSS:");
    let moatd_load: Vec<Load> = STREAM_COUNTS
        .iter()
        .map(|&n| {
            load(
                n,
                || {
                    let (url, body) = moatd_request(CONCURRENT_TOKENS);
                    stream(&agent, &url, &body)
                },
                || {
                    let (url, body) = moatd_request(SHORT_ANSWER);
                    stream(&agent, &url, &body)
                },
            )
        })
        .collect();
    let moatd_rss_peak = moatd.rss_kib("VmHWM:");
    eprintln!("batching share: {SHARE_ROUNDS} rounds of kernels and served loads at 1 and 16");
    let ask = || {
        let (url, body) = moatd_request(CONCURRENT_TOKENS);
        stream(&agent, &url, &body)
    };
    let mut share_rounds: Vec<ShareRound> = (0..SHARE_ROUNDS)
        .map(|_| share_round(&mut pooled, &prompt_ids, &ask))
        .collect();
    drop(pooled);
    share_rounds.sort_by(|a, b| a.share().total_cmp(&b.share()));
    let share = share_rounds[share_rounds.len() / 2];
    let mut llama_load: Vec<Load> = Vec::new();
    for &n in &STREAM_COUNTS {
        let Some(server) = &mut llama else {
            break;
        };
        let url = server.url.clone();
        let measured = survive(&mut server.child, || {
            load(
                n,
                || {
                    let (url, body) = llama_request(&url, CONCURRENT_TOKENS);
                    stream(&plain, &url, &body)
                },
                || {
                    let (url, body) = llama_request(&url, SHORT_ANSWER);
                    stream(&plain, &url, &body)
                },
            )
        });
        match measured {
            Ok(measured) => llama_load.push(measured),
            Err(reason) => {
                report_down(&mut down, LLAMA, reason);
                llama = None;
            }
        }
    }
    let llama_rss_peak = llama.as_ref().and_then(|s| s.rss_kib("VmHWM:"));

    let weights = weights_bytes(&model_dir);
    let gguf_bytes =
        std::fs::metadata(bench.root.join("local/models").join(GGUF)).map_or(0, |m| m.len());
    // What the KV cache holds at the peak (every stream of the largest load and a probe,
    // each with its prompt and whole answer cached), against what the pool reserves: the
    // pool's host memory is mapped only as positions are written.
    let metadata = moat_daemon::engine::ModelDirectory::open(&model_dir)
        .expect("model directory")
        .metadata;
    let kv_position_bytes = metadata.num_layers
        * 2
        * metadata.num_kv_heads
        * metadata.head_dim
        * match metadata.kv_dtype {
            moat_core::KvDtype::Float32 => 4,
            moat_core::KvDtype::Float16 => 2,
        };
    let peak_streams = STREAM_COUNTS.iter().max().copied().unwrap_or(1) + 1;
    let kv_peak_bytes = peak_streams * (prompt_ids.len() + CONCURRENT_TOKENS) * kv_position_bytes;
    let kv_reserved_bytes = moat_daemon::engine::EngineSettings::default().max_batch
        * metadata.context_length
        * kv_position_bytes;
    let report = json!({
        "machine": machine(),
        "device": device,
        "threads": threads,
        "model": model,
        "prompt_tokens": prompt_ids.len(),
        "new_tokens": NEW_TOKENS,
        "single_stream": singles.iter().map(|(name, s)| json!({
            "engine": name, "ttft_ms": s.ttft_ms, "decode_tokens_per_s": s.decode_tokens_per_s,
        })).collect::<Vec<_>>(),
        "concurrency": {
            "tokens_per_answer": CONCURRENT_TOKENS,
            "moatd": loads_json(&moatd_load),
            "llama-server": loads_json(&llama_load),
        },
        "ttft_idle_ms": idle_ttft,
        // The median round by share: how much of what the kernels gain from batching 16
        // sequences moatd's 16 streams get.
        "kernel_ratio": {
            "in_process_batch_16_over_1": share.kernel_ratio,
            "moatd_streams_16_over_1": share.served_ratio,
            "share": share.share(),
            "rounds": share_rounds.iter().map(|r| json!({
                "in_process_batch_16_over_1": r.kernel_ratio,
                "moatd_streams_16_over_1": r.served_ratio,
                "share": r.share(),
            })).collect::<Vec<_>>(),
        },
        "batched_decode_step": steps.iter().map(|&(batch, ms)| json!({
            "batch": batch, "step_ms": ms, "tokens_per_s": batch as f64 * 1e3 / ms,
        })).collect::<Vec<_>>(),
        "memory": {
            "weights_bytes": weights,
            "moatd_rss_idle_kib": moatd_rss_idle,
            "moatd_rss_peak_kib": moatd_rss_peak,
            "gguf_bytes": gguf_bytes,
            "llama_server_rss_peak_kib": llama_rss_peak,
            "kv_bytes_per_position": kv_position_bytes,
            "kv_cached_at_peak_bytes": kv_peak_bytes,
            "kv_pool_reserved_bytes": kv_reserved_bytes,
        },
        "peers_down": down.iter().map(|(engine, reason)| json!({
            "engine": engine, "reason": reason,
        })).collect::<Vec<_>>(),
    });
    print_report(&report, &singles, &moatd_load, &llama_load, idle_ttft);
    for (engine, reason) in &down {
        println!("\n{engine}: {reason}; its figures are left out");
    }
    println!("\nOne batched decode step in process (the backend alone), by batch size\n");
    println!("| batch | step ms | tokens/s | x batch 1 |");
    println!("|---:|---:|---:|---:|");
    let one = steps.first().map_or(f64::NAN, |&(b, ms)| b as f64 / ms);
    for &(batch, ms) in &steps {
        let rate = batch as f64 / ms;
        println!(
            "| {batch} | {ms:.1} | {:.0} | {:.2}x |",
            rate * 1e3,
            rate / one
        );
    }
    let json_path = out_dir.join("peers.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&report).expect("JSON"),
    )
    .expect("write peers.json");
    println!("\nresults: {}", json_path.display());
    match &genai {
        Some(python) => {
            let png = out_dir.join("peers.png");
            let plotted = Command::new(python)
                .arg(bench.root.join("bench/plot_peers.py"))
                .arg(&json_path)
                .arg(&png)
                .status();
            match plotted {
                Ok(s) if s.success() => println!("chart: {}", png.display()),
                other => eprintln!("the chart was not drawn: {other:?}"),
            }
        }
        None => eprintln!("no chart: matplotlib comes with `bash bench/install-peers.sh`"),
    }
}

/// Notes a peer that failed: said at once, and a row of the report at the end.
fn report_down<'a>(down: &mut Vec<(&'a str, String)>, engine: &'a str, reason: String) {
    eprintln!("{engine}: {reason}; left out of the rest of the run");
    down.push((engine, reason));
}

fn loads_json(loads: &[Load]) -> Value {
    loads
        .iter()
        .map(|l| {
            json!({
                "streams": l.streams, "tokens_per_s": l.tokens_per_s,
                "ttft_p50_ms": l.ttft_p50_ms, "ttft_p99_ms": l.ttft_p99_ms,
                "stream_ttft_p50_ms": l.stream_ttft_p50_ms,
            })
        })
        .collect()
}

fn print_report(
    report: &Value,
    singles: &[(&str, Single)],
    moatd: &[Load],
    llama: &[Load],
    idle_ttft: f64,
) {
    println!(
        "\n{} on {}, {}, {} threads; prompt {} tokens; single stream: {NEW_TOKENS} new tokens, median of {ROUNDS} interleaved rounds\n",
        report["model"].as_str().unwrap_or("?"),
        report["machine"].as_str().unwrap_or("?"),
        report["device"].as_str().unwrap_or("?"),
        report["threads"],
        report["prompt_tokens"],
    );
    println!("| engine | TTFT ms | decode tok/s |");
    println!("|---|---:|---:|");
    for (name, s) in singles {
        println!(
            "| {name} | {:.1} | {:.1} |",
            s.ttft_ms, s.decode_tokens_per_s
        );
    }
    println!(
        "\nConcurrent streams, {CONCURRENT_TOKENS} tokens per answer, {ANSWERS_PER_STREAM} answers per stream\n"
    );
    println!(
        "TTFT ms: of a new request arriving while the streams run, p50 / p99 (in brackets the \
         streams' own p50: their answers start together and queue for the prompt runs)\n"
    );
    println!("| streams | moatd tok/s | moatd TTFT | llama-server tok/s | llama-server TTFT |");
    println!("|---:|---:|---:|---:|---:|");
    let ms = |v: f64| {
        if v.is_nan() {
            "-".to_owned()
        } else {
            format!("{v:.0}")
        }
    };
    let ttft = |l: &Load| {
        format!(
            "{} / {} ({})",
            ms(l.ttft_p50_ms),
            ms(l.ttft_p99_ms),
            ms(l.stream_ttft_p50_ms)
        )
    };
    for (i, m) in moatd.iter().enumerate() {
        let peer = llama.get(i).map_or("- | -".to_owned(), |l| {
            format!("{:.1} | {}", l.tokens_per_s, ttft(l))
        });
        println!(
            "| {} | {:.1} | {} | {peer} |",
            m.streams,
            m.tokens_per_s,
            ttft(m)
        );
    }
    let memory = &report["memory"];
    let weights_mib = memory["weights_bytes"].as_f64().unwrap_or(0.0) / 1048576.0;
    let over = |kib: &Value| kib.as_f64().map(|k| k / 1024.0 - weights_mib);
    println!();
    let rate = |name: &str| {
        singles
            .iter()
            .find(|(n, _)| n.starts_with(name))
            .map(|(_, s)| s.decode_tokens_per_s)
    };
    if let Some(moat) = rate("moatd") {
        for (peer, goal) in [
            ("bare ONNX Runtime loop", Some("0.97")),
            ("onnxruntime-genai", Some("1.0")),
            ("llama.cpp", Some("1.2")),
            ("Python onnxruntime", None),
        ] {
            if let Some(other) = rate(peer) {
                let goal = goal.map_or(String::new(), |g| format!(" (goal >= {g}x)"));
                println!("single stream, moatd / {peer}: {:.2}x{goal}", moat / other);
            }
        }
    }
    let at = |loads: &[Load], n: usize| {
        loads
            .iter()
            .find(|l| l.streams == n)
            .map(|l| l.tokens_per_s)
    };
    let ratios = &report["kernel_ratio"];
    if let (Some(served), Some(kernels), Some(share)) = (
        ratios["moatd_streams_16_over_1"].as_f64(),
        ratios["in_process_batch_16_over_1"].as_f64(),
        ratios["share"].as_f64(),
    ) {
        let rounds: Vec<String> = ratios["rounds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["share"].as_f64())
            .map(|s| format!("{:.0}%", s * 100.0))
            .collect();
        println!(
            "moatd aggregate, 16 streams / 1: {served:.2}x, of the kernels' batch 16 / 1 in \
             process {kernels:.2}x: {:.0}% (goal >= 90%; median of rounds {})",
            share * 100.0,
            rounds.join(", ")
        );
    }
    if let (Some(ours), Some(theirs)) = (at(moatd, 16), at(llama, 16)) {
        println!(
            "aggregate at 16 streams, moatd / llama-server: {:.2}x",
            ours / theirs
        );
    }
    if let Some(loaded) = moatd.iter().find(|l| l.streams == 16) {
        println!(
            "moatd TTFT p50 under 16 streams / idle ({idle_ttft:.0} ms): {:.2}x (goal <= 3x)",
            loaded.ttft_p50_ms / idle_ttft
        );
    }
    if let (Some(idle), Some(peak)) = (
        over(&memory["moatd_rss_idle_kib"]),
        over(&memory["moatd_rss_peak_kib"]),
    ) {
        println!(
            "moatd RSS over the weights ({weights_mib:.0} MiB): {idle:.0} MiB idle, {peak:.0} MiB peak under load (goal < 150 MB)"
        );
        let mib = |key: &str| memory[key].as_f64().unwrap_or(0.0) / 1048576.0;
        println!(
            "  of which the KV cache at the peak: {:.0} MiB of positions cached; the pool \
             reserves {:.0} MiB of address space, mapped only as positions are written",
            mib("kv_cached_at_peak_bytes"),
            mib("kv_pool_reserved_bytes")
        );
    }
    if let Some(kib) = memory["llama_server_rss_peak_kib"].as_f64() {
        let gguf_mib = memory["gguf_bytes"].as_f64().unwrap_or(0.0) / 1048576.0;
        println!(
            "llama-server RSS over its GGUF ({gguf_mib:.0} MiB): {:.0} MiB peak",
            kib / 1024.0 - gguf_mib
        );
    }
}

/// Runs `streams` clients at once, each asking `ANSWERS_PER_STREAM` answers in turn, for
/// the aggregate rate; then the same load again with a probe that asks a short answer now
/// and then: the time to first token of a request that arrives while the load runs, as an
/// analyst's does while a batch job runs. (The probe's own work would lower the rate of the
/// first pass, so it runs only in the second.)
fn load(
    streams: usize,
    ask: impl Fn() -> Streamed + Sync,
    probe: impl Fn() -> Streamed + Sync,
) -> Load {
    eprintln!("{streams} concurrent streams");
    let (answers, tokens_per_s) = aggregate(streams, &ask);
    let mut ttfts: Vec<f64> = answers.iter().map(|a| a.ttft.as_secs_f64() * 1e3).collect();

    let done = AtomicBool::new(false);
    let mut probe_ttfts = Vec::new();
    std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let mut ttfts = Vec::new();
            // Let the streams' own prompts go in first: the probe measures the steady load.
            std::thread::sleep(PROBE_INTERVAL);
            while !done.load(Ordering::Relaxed) {
                ttfts.push(probe().ttft.as_secs_f64() * 1e3);
                std::thread::sleep(PROBE_INTERVAL);
            }
            ttfts
        });
        run_streams(streams, 1, &ask, || done.store(true, Ordering::Relaxed));
        probe_ttfts = prober.join().expect("probe thread");
    });
    Load {
        streams,
        tokens_per_s,
        ttft_p50_ms: percentile(&mut probe_ttfts, 0.5),
        ttft_p99_ms: percentile(&mut probe_ttfts, 0.99),
        stream_ttft_p50_ms: percentile(&mut ttfts, 0.5),
    }
}

/// `streams` clients asking `ANSWERS_PER_STREAM` answers each, and the tokens per second
/// all of them received together.
fn aggregate(streams: usize, ask: &(impl Fn() -> Streamed + Sync)) -> (Vec<Streamed>, f64) {
    let start = Instant::now();
    let answers = run_streams(streams, ANSWERS_PER_STREAM, ask, || ());
    let tokens: usize = answers.iter().map(|a| a.tokens).sum();
    (answers, tokens as f64 / start.elapsed().as_secs_f64())
}

/// `streams` client threads asking `answers` answers each; `finished` runs when the
/// last one is done.
fn run_streams(
    streams: usize,
    answers: usize,
    ask: &(impl Fn() -> Streamed + Sync),
    finished: impl FnOnce(),
) -> Vec<Streamed> {
    let all = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..streams)
            .map(|_| scope.spawn(|| (0..answers).map(|_| ask()).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("client thread"))
            .collect()
    });
    finished();
    all
}

fn single(answer: &Streamed) -> Single {
    Single {
        ttft_ms: answer.ttft.as_secs_f64() * 1e3,
        decode_tokens_per_s: answer.tokens.saturating_sub(1) as f64
            / answer.first_to_last.as_secs_f64(),
    }
}

/// The mean time of one decode step over the KV pool with `batch` sequences, for batch
/// sizes 1 to 32: how the graph's kernels scale with the batch, apart from serving.
fn batched_steps(pooled: &mut BareLoop, prompt: &[u32]) -> Vec<(usize, f64)> {
    [1usize, 2, 4, 8, 16, 32]
        .iter()
        .map(|&batch| (batch, kernel_step_ms(pooled, prompt, batch)))
        .collect()
}

/// The mean time of one decode step of `batch` sequences in process (the backend alone).
/// Each sequence runs the bench's prompt, then decodes through the same positions as a
/// served answer of the concurrency runs (`CONCURRENT_TOKENS`, the first from the prompt),
/// so the attention reads as much cache here as it does there.
fn kernel_step_ms(pooled: &mut BareLoop, prompt: &[u32], batch: usize) -> f64 {
    const STEPS: usize = CONCURRENT_TOKENS - 1;
    let mut logits = LogitsBatch::default();
    let ids: Vec<SequenceId> = (0..batch as u64).map(SequenceId).collect();
    for &id in &ids {
        pooled
            .backend()
            .start_sequence(id, prompt.len() + STEPS + 1)
            .expect("sequence starts");
        pooled
            .backend()
            .step(
                &[StepInput {
                    sequence: id,
                    tokens: prompt,
                }],
                &mut logits,
            )
            .expect("prompt runs");
    }
    let token = [42u32];
    let inputs: Vec<StepInput<'_>> = ids
        .iter()
        .map(|&sequence| StepInput {
            sequence,
            tokens: &token,
        })
        .collect();
    let start = Instant::now();
    for _ in 0..STEPS {
        pooled
            .backend()
            .step(&inputs, &mut logits)
            .expect("step runs");
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / STEPS as f64;
    for &id in &ids {
        pooled.backend().finish_sequence(id);
    }
    ms
}

/// One round of the batching share: the kernels' batch 16 / batch 1 in process and
/// moatd's aggregate at 16 streams / 1, each served load measured right after its kernel
/// figure, so that this machine's drift over a run cancels out of the ratio.
fn share_round(
    pooled: &mut BareLoop,
    prompt: &[u32],
    ask: &(impl Fn() -> Streamed + Sync),
) -> ShareRound {
    let served = |streams: usize| aggregate(streams, ask).1;
    let kernel_1 = 1e3 / kernel_step_ms(pooled, prompt, 1);
    let served_1 = served(1);
    let kernel_16 = 16e3 / kernel_step_ms(pooled, prompt, 16);
    let served_16 = served(16);
    ShareRound {
        kernel_ratio: kernel_16 / kernel_1,
        served_ratio: served_16 / served_1,
    }
}

/// One round of [`share_round`].
#[derive(Debug, Clone, Copy)]
struct ShareRound {
    kernel_ratio: f64,
    served_ratio: f64,
}

impl ShareRound {
    fn share(&self) -> f64 {
        self.served_ratio / self.kernel_ratio
    }
}

/// A Python peer that prints one JSON line with `ttft_ms` and `decode_tokens_per_s`.
fn python_peer(
    python: &Path,
    script: &[&std::ffi::OsStr],
    model_dir: &Path,
    ids: &str,
    threads: usize,
) -> Single {
    let output = Command::new(python)
        .args(script)
        .arg("--model")
        .arg(model_dir)
        .args(["--prompt-ids", ids])
        .args(["--max-new-tokens", &NEW_TOKENS.to_string()])
        .args(["--threads", &threads.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .expect("the Python peer runs");
    assert!(output.status.success(), "{script:?} failed");
    let result: Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    Single {
        ttft_ms: result["ttft_ms"].as_f64().expect("ttft_ms"),
        decode_tokens_per_s: result["decode_tokens_per_s"]
            .as_f64()
            .expect("decode_tokens_per_s"),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited during start: {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The real moatd binary, serving the model as `bench` with its defaults: the policy gate
/// and the audit trail (two auditors, durable records) in the path, as in production.
fn start_moatd(pki: &Pki, bench: &common::CpuBench, model: &str, device: &str) -> Server {
    let (root, threads) = (&bench.root, bench.threads);
    let port = free_port();
    let auditors = [
        age::x25519::Identity::generate().to_public(),
        age::x25519::Identity::generate().to_public(),
    ];
    let config = format!(
        "[engine]\nonnxruntime_library = \"{lib}\"\ndevice = \"{device}\"\nintra_op_threads = {threads}\n\
         [server]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [tls]\ncertificate = \"server.crt\"\nprivate_key = \"server.key\"\nclient_ca = [{{ file = \"ca.crt\", departments = \"*\" }}]\n\
         [models]\ndirectory = \"{models}\"\nstore = \"state/models\"\ntrusted_keys = \"trusted-keys\"\n[models.serve]\nbench = \"{model}\"\n\
         [metrics]\nenabled = false\n[policy]\ndirectory = \"policies\"\n\
         [audit]\nstate_directory = \"state\"\nnode_id = \"bench\"\nrecipients = [\"{}\", \"{}\"]\n\
         [admin]\nsocket = \"state/admin.sock\"\n",
        auditors[0],
        auditors[1],
        lib = bench.library.display(),
        models = root.join("local/models").display(),
    );
    let policies = pki.dir.path().join("policies");
    write_permissive_policy(&policies);
    // The shipped limits hold a department to 16 requests at once; the bench's 32 streams
    // come from one department.
    let mut data = std::fs::read_to_string(policies.join("moat-policy.toml")).expect("policy");
    data.push_str(
        "\n[departments.bench]\nclassification = \"internal\"\nceiling = \"internal\"\n\
         retention = \"sha256\"\n[departments.bench.limits]\nrequests_per_minute = 1000000\n\
         tokens_per_minute = 1000000000\nconcurrent_requests = 256\n",
    );
    std::fs::write(policies.join("moat-policy.toml"), data).expect("policy");
    let log = std::fs::File::create(pki.dir.path().join("moatd.log")).expect("log file");
    let config_path = pki.dir.path().join("moat.toml");
    std::fs::write(&config_path, config).expect("write moat.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_moatd"))
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("moatd starts");
    wait_for_port(port, &mut child, "moatd");
    Server {
        child,
        url: format!("https://127.0.0.1:{port}"),
        _dir: None,
    }
}

/// llama.cpp's own server with one slot per stream of the largest load and continuous
/// batching, on the same threads; why not, when it does not start or load the model.
fn start_llama_server(cache: &Path, root: &Path, threads: usize) -> Result<Server, String> {
    let binary = llama_server_binary(cache);
    if !binary.exists() {
        return Err(
            "not installed (run `bash bench/install-peers.sh` to build llama-server)".into(),
        );
    }
    let slots = STREAM_COUNTS.iter().max().copied().unwrap_or(1);
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = std::fs::File::create(dir.path().join("llama-server.log")).expect("log file");
    let mut child = Command::new(binary)
        .arg("--model")
        .arg(root.join("local/models").join(GGUF))
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--threads-batch", &threads.to_string()])
        .args(["--parallel", &slots.to_string()])
        // An HTTP thread per stream (its default is one per core, which drops the rest).
        .args(["--threads-http", &(slots + 4).to_string()])
        // Room in every slot for the prompt and the longest answer.
        .args(["--ctx-size", &(slots * 512).to_string()])
        .arg("--cont-batching")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("did not start: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(reason) = exit_reason(&mut child) {
            return Err(reason);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("did not open its port within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("http://127.0.0.1:{port}");
    // The port opens before the model has loaded; /health says when it has.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = ureq::get(&format!("{url}/health"))
            .call()
            .map(|mut r| {
                let mut text = String::new();
                let _ = r.body_mut().as_reader().read_to_string(&mut text);
                text.contains("ok")
            })
            .unwrap_or(false);
        if ready {
            break;
        }
        if let Some(reason) = exit_reason(&mut child) {
            return Err(reason);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("did not load the model within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(Server {
        child,
        url,
        _dir: Some(dir),
    })
}

/// The graph and any external weight files of a model directory.
fn weights_bytes(model_dir: &Path) -> u64 {
    std::fs::read_dir(model_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.ends_with(".onnx")
                        || name.ends_with(".onnx.data")
                        || name.ends_with(".data")
                })
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn median_single(samples: &[Single]) -> Single {
    let mid = |mut v: Vec<f64>| percentile(&mut v, 0.5);
    Single {
        ttft_ms: mid(samples.iter().map(|s| s.ttft_ms).collect()),
        decode_tokens_per_s: mid(samples.iter().map(|s| s.decode_tokens_per_s).collect()),
    }
}

/// The nearest-rank percentile; sorts `values`.
fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}
