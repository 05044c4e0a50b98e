//! moat-model's conversion of a Hugging Face checkpoint against the two standard converters
//! a user could pick instead, from the same checkpoint, on the same machine and prompt, with
//! 2 threads everywhere, in one run:
//!
//! - ours: `moat-model convert CHECKPOINT --variant int4-fast`, made afresh by this bench
//!   and decoded by the bare ONNX Runtime greedy loop in Rust (`OrtBackend`, the backend
//!   moatd serves with, without the server in front);
//! - builder: onnxruntime-genai's model builder (`-p int4 -e cpu`), decoded by
//!   onnxruntime-genai's own loop under the export's own genai_config.json
//!   (`bench/genai_peer.py --own-config`);
//! - llama.cpp: `convert_hf_to_gguf.py` then `llama-quantize ... Q4_0`, served by
//!   `llama-server` (one slot), its decode rate as the server's own timings report it.
//!
//! Two cross rows tell the graph from the loop: our graph under genai's loop and the
//! builder's graph under moat's loop. Engines take turns round by round; the medians and the
//! spread over the rounds are printed.
//!
//! Quality: `moat-model check DIR --against CHECKPOINT --new-tokens 32` for our graph and for
//! the builder's: the KL divergence of each graph's next-token distributions from the numpy
//! float32 reference of the checkpoint, teacher-forced.
//!
//! moat's loop and `moat-model check` need the moat-model.json that `moat-model describe`
//! writes into the builder's export; should describe refuse it, its words go in the report
//! and those two rows are left out.
//!
//! `bash bench/install-peers.sh --converters` (once, slow: it makes the builder's export and
//! the Q4_0 GGUF) then `cargo bench -p moat-daemon --bench conversions`. A peer that is not
//! there is left out with a message. Writes `target/bench/conversions.json`.
//! `MOAT_BENCH_CACHE` is where install-peers.sh put the peers; `MOAT_BENCH_CHECKPOINT` the
//! checkpoint (default `local/models/smollm2-135m-instruct-hf`, as install-peers.sh);
//! `MOAT_BENCH_PARTS=speed` or `=quality` runs one half.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use moat_daemon::engine::{ChatMessage, Prompt};
use serde_json::{Value, json};

mod common;
use common::peers::{BareLoop, Single, exit_reason, llama_server_binary, machine, peers_cache};

const THREADS: usize = 2;
const NEW_TOKENS: usize = 128;
const ROUNDS: usize = 9;
/// Greedy tokens per prompt in the quality check.
const CHECK_NEW_TOKENS: usize = 32;
/// Between two engines' turns: ONNX Runtime's and llama.cpp's worker threads spin for a
/// moment after a run, and would take the next engine's cores.
const SETTLE: Duration = Duration::from_millis(500);
const STORY: &str = "Write a short story about a lighthouse keeper.";
const OURS: &str = "ours: moat-model int4-fast, moat's loop (Rust, OrtBackend)";
const BUILDER: &str = "builder: genai builder int4, genai's loop (its genai_config.json)";
const LLAMA: &str = "llama.cpp: convert_hf_to_gguf + Q4_0, llama-server";
const OURS_GENAI: &str = "cross: moat-model int4-fast, genai's loop";
const BUILDER_MOAT: &str = "cross: genai builder int4, moat's loop (Rust, OrtBackend)";

/// Where the three conversions are, and which of them exist.
struct Conversions {
    checkpoint: PathBuf,
    ours: PathBuf,
    builder: Option<PathBuf>,
    gguf: Option<PathBuf>,
    /// The builder's export, once `moat-model describe` wrote its moat-model.json (moat's
    /// loop and `moat-model check` need it).
    builder_for_moat: Option<PathBuf>,
    /// What describe said of the export, for the report.
    builder_describe: Value,
}

/// An engine's turn in a round.
struct Contender<'a> {
    name: &'static str,
    run: Box<dyn FnMut() -> Single + 'a>,
    samples: Vec<Single>,
}

/// A child process, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    let mut bench = common::CpuBench::load();
    bench.threads = THREADS;
    bench.options.intra_op_threads = Some(THREADS);
    let cache = peers_cache();
    let out_dir = bench.root.join("target/bench");
    std::fs::create_dir_all(&out_dir).expect("target/bench");
    let parts = std::env::var("MOAT_BENCH_PARTS").unwrap_or_else(|_| "speed,quality".into());
    let conversions = convert(&bench.root, &cache, &out_dir.join("conversions"));

    let speed = parts
        .contains("speed")
        .then(|| measure_speed(&bench, &cache, &conversions));
    let quality = parts
        .contains("quality")
        .then(|| measure_quality(&bench.root, &conversions));

    let report = json!({
        "machine": machine(),
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "threads": THREADS,
        "checkpoint": conversions.checkpoint,
        "builder_describe": conversions.builder_describe,
        "speed": speed,
        "quality": quality,
    });
    let json_path = out_dir.join("conversions.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&report).expect("JSON"),
    )
    .expect("write conversions.json");
    println!("\nresults: {}", json_path.display());
}

/// Makes our conversion afresh under `work`, finds the peers' in the cache, and has
/// `moat-model describe` write the builder export's moat-model.json.
fn convert(root: &Path, cache: &Path, work: &Path) -> Conversions {
    let checkpoint = std::env::var_os("MOAT_BENCH_CHECKPOINT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("local/models/smollm2-135m-instruct-hf"));
    assert!(
        checkpoint.join("config.json").is_file(),
        "no checkpoint at {}: run scripts/setup.sh first",
        checkpoint.display()
    );
    let ours = work.join("moat-int4-fast");
    let _ = std::fs::remove_dir_all(&ours);
    std::fs::create_dir_all(work).expect("conversions directory");
    eprintln!("moat-model convert --variant int4-fast");
    let started = Instant::now();
    let made = moat_model(root, "convert", &checkpoint, |c| {
        c.arg("--out").arg(&ours).args([
            "--variant",
            "int4-fast",
            "--name",
            "smollm2-135m-instruct",
        ]);
    });
    assert!(made.status.success(), "moat-model convert failed");
    eprintln!("converted in {:.1} s", started.elapsed().as_secs_f64());

    let exported = cache.join("conversions");
    let builder = Some(exported.join("builder-int4")).filter(|d| d.join("model.onnx").is_file());
    let gguf = Some(exported.join("llama.cpp-q4_0.gguf")).filter(|f| f.is_file());
    if builder.is_none() || gguf.is_none() {
        eprintln!("a peer's conversion is missing: run `bash bench/install-peers.sh --converters`");
    }
    let (builder_for_moat, builder_describe) = match &builder {
        Some(dir) => describe_builder(root, dir),
        None => (None, json!("no builder export")),
    };
    Conversions {
        checkpoint,
        ours,
        builder,
        gguf,
        builder_for_moat,
        builder_describe,
    }
}

/// `moat-model describe` on the builder's export: the export, when describe accepted it, and
/// what describe said, for the report.
fn describe_builder(root: &Path, export: &Path) -> (Option<PathBuf>, Value) {
    let described = moat_model(root, "describe", export, |c| {
        c.arg("--out").arg(export);
    });
    if described.status.success() {
        return (Some(export.to_path_buf()), json!("accepted"));
    }
    let words = String::from_utf8_lossy(&described.stderr).trim().to_owned();
    eprintln!(
        "moat-model describe refused the builder's export: moat's loop and check leave it out"
    );
    (None, json!({ "refused": words }))
}

fn moat_model(root: &Path, verb: &str, dir: &Path, args: impl FnOnce(&mut Command)) -> Output {
    let mut command = Command::new(root.join("local/venv/bin/moat-model"));
    command.arg(verb).arg(dir);
    args(&mut command);
    let output = offline(&mut command)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("moat-model runs (scripts/setup.sh installs it)");
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    output
}

/// The environment every child runs with: no telemetry, no model hub.
fn offline(command: &mut Command) -> &mut Command {
    command
        .env("ORT_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
}

fn measure_speed(bench: &common::CpuBench, cache: &Path, conv: &Conversions) -> Value {
    let prompt = {
        let engine = bench.engine(&conv.ours);
        let ids = engine
            .tokenize_prompt(&Prompt::Chat(vec![ChatMessage::new("user", STORY)]))
            .expect("tokenizes");
        engine.shutdown();
        ids
    };
    let ids_arg = prompt
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let python = cache.join("peers/bin/python");
    let genai = python.exists().then_some(python);
    if genai.is_none() {
        eprintln!("onnxruntime-genai left out: run `bash bench/install-peers.sh`");
    }
    let script = bench.root.join("bench/genai_peer.py");
    let mut ours = BareLoop::load(bench, &conv.ours);
    let mut builder_bare = conv
        .builder_for_moat
        .as_ref()
        .map(|dir| BareLoop::load(bench, dir));
    let llama = conv
        .gguf
        .as_ref()
        .and_then(|g| start_llama_server(cache, g));

    let mut contenders = vec![Contender::new(OURS, || ours.run(&prompt, NEW_TOKENS))];
    if let (Some(python), Some(dir)) = (&genai, &conv.builder) {
        contenders.push(Contender::new(BUILDER, || {
            genai_run(python, &script, dir, &ids_arg, true)
        }));
    }
    if let Some(server) = &llama {
        contenders.push(Contender::new(LLAMA, || llama_run(server, &prompt)));
    }
    if let Some(python) = &genai {
        contenders.push(Contender::new(OURS_GENAI, || {
            genai_run(python, &script, &conv.ours, &ids_arg, false)
        }));
    }
    if let Some(bare) = builder_bare.as_mut() {
        contenders.push(Contender::new(BUILDER_MOAT, || {
            bare.run(&prompt, NEW_TOKENS)
        }));
    }
    let load_before = load_average();
    for round in 0..=ROUNDS {
        eprintln!(
            "round {round} of {ROUNDS} (0 warms up); load {}",
            load_average()
        );
        for contender in &mut contenders {
            std::thread::sleep(SETTLE);
            let sample = (contender.run)();
            // Round 0 warms caches and is not counted.
            if round > 0 {
                contender.samples.push(sample);
            }
        }
    }
    let load_after = load_average();
    print_speed(&contenders, prompt.len(), &load_before, &load_after);
    speed_json(&contenders, prompt.len(), &load_before, &load_after)
}

impl<'a> Contender<'a> {
    fn new(name: &'static str, run: impl FnMut() -> Single + 'a) -> Self {
        Self {
            name,
            run: Box::new(run),
            samples: Vec::new(),
        }
    }

    fn rates(&self) -> Vec<f64> {
        let mut rates: Vec<f64> = self.samples.iter().map(|s| s.decode_tokens_per_s).collect();
        rates.sort_by(f64::total_cmp);
        rates
    }

    fn median_rate(&self) -> f64 {
        median(&self.rates())
    }

    fn median_ttft(&self) -> f64 {
        let mut ttfts: Vec<f64> = self.samples.iter().map(|s| s.ttft_ms).collect();
        ttfts.sort_by(f64::total_cmp);
        median(&ttfts)
    }
}

/// `median(a) / median(b)` for the named rows, when both ran.
fn ratio(contenders: &[Contender<'_>], a: &str, b: &str) -> Option<f64> {
    let rate = |name: &str| {
        contenders
            .iter()
            .find(|c| c.name == name)
            .map(Contender::median_rate)
    };
    Some(rate(a)? / rate(b)?)
}

/// The ratios the goals are stated in (label, numerator, denominator, goal), and the same
/// comparison of graphs with the loop held fixed.
const RATIOS: [(&str, &str, &str, f64); 4] = [
    ("ours / builder", OURS, BUILDER, 1.0),
    ("ours / llama.cpp", OURS, LLAMA, 1.2),
    (
        "same loop (genai's): ours / builder",
        OURS_GENAI,
        BUILDER,
        1.0,
    ),
    (
        "same loop (moat's): ours / builder",
        OURS,
        BUILDER_MOAT,
        1.0,
    ),
];

fn print_speed(contenders: &[Contender<'_>], prompt_tokens: usize, before: &str, after: &str) {
    println!(
        "\n{}, {THREADS} threads; prompt {prompt_tokens} tokens, {NEW_TOKENS} new tokens, greedy; \
         median of {ROUNDS} interleaved rounds (min-max); load average before: {before}, after: {after}\n",
        machine()
    );
    println!("| conversion, engine | TTFT ms | decode tok/s | min-max | spread |");
    println!("|---|---:|---:|---:|---:|");
    for c in contenders {
        let rates = c.rates();
        let (lo, hi) = (rates[0], rates[rates.len() - 1]);
        let mid = c.median_rate();
        println!(
            "| {} | {:.1} | {mid:.1} | {lo:.1}-{hi:.1} | {:.1}% |",
            c.name,
            c.median_ttft(),
            (hi - lo) / mid * 100.0
        );
    }
    println!();
    for (label, a, b, goal) in RATIOS {
        if let Some(r) = ratio(contenders, a, b) {
            println!("{label}: {r:.2}x (goal >= {goal:.1}x)");
        }
    }
}

fn speed_json(
    contenders: &[Contender<'_>],
    prompt_tokens: usize,
    before: &str,
    after: &str,
) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "new_tokens": NEW_TOKENS,
        "rounds": ROUNDS,
        "load_average_before": before,
        "load_average_after": after,
        "engines": contenders.iter().map(|c| json!({
            "engine": c.name,
            "ttft_ms_median": c.median_ttft(),
            "decode_tokens_per_s_median": c.median_rate(),
            "decode_tokens_per_s": c.samples.iter().map(|s| s.decode_tokens_per_s).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "ratios": RATIOS.iter().filter_map(|(label, a, b, goal)| {
            ratio(contenders, a, b).map(|r| json!({ "ratio": label, "value": r, "goal": goal }))
        }).collect::<Vec<_>>(),
    })
}

/// One greedy run of `bench/genai_peer.py` (a fresh process: its load is not timed).
fn genai_run(python: &Path, script: &Path, dir: &Path, ids: &str, own_config: bool) -> Single {
    let mut command = Command::new(python);
    command
        .arg(script)
        .arg("--model")
        .arg(dir)
        .args(["--prompt-ids", ids])
        .args(["--max-new-tokens", &NEW_TOKENS.to_string()])
        .args(["--threads", &THREADS.to_string()]);
    if own_config {
        command.arg("--own-config");
    }
    let output = offline(&mut command)
        .stderr(Stdio::inherit())
        .output()
        .expect("the genai peer runs");
    assert!(output.status.success(), "genai_peer.py failed on {dir:?}");
    let result: Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    Single {
        ttft_ms: result["ttft_ms"].as_f64().expect("ttft_ms"),
        decode_tokens_per_s: result["decode_tokens_per_s"]
            .as_f64()
            .expect("decode_tokens_per_s"),
    }
}

/// One greedy answer from llama-server, timed by the server itself (`timings`): its
/// prompt time and decode rate, without HTTP.
fn llama_run(server: &Server, prompt: &[u32]) -> Single {
    let body = json!({
        "prompt": prompt,
        "n_predict": NEW_TOKENS,
        "temperature": 0,
        "top_k": 1,
        "ignore_eos": true,
        "cache_prompt": false,
        "stream": false,
    });
    let mut response = ureq::post(&format!("{}/completion", server.url))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("llama-server answers");
    let text = response
        .body_mut()
        .read_to_string()
        .expect("llama-server's answer");
    let answer: Value = serde_json::from_str(&text).expect("JSON answer");
    let timings = &answer["timings"];
    assert_eq!(
        timings["predicted_n"].as_u64(),
        Some(NEW_TOKENS as u64),
        "llama-server generated another count: {answer}"
    );
    Single {
        ttft_ms: timings["prompt_ms"].as_f64().expect("prompt_ms"),
        decode_tokens_per_s: timings["predicted_per_second"]
            .as_f64()
            .expect("predicted_per_second"),
    }
}

/// llama.cpp's own server with one slot, on the bench's threads; None when
/// bench/install-peers.sh has not built it.
fn start_llama_server(cache: &Path, gguf: &Path) -> Option<Server> {
    let binary = llama_server_binary(cache);
    if !binary.exists() {
        eprintln!("llama.cpp left out: run `bash bench/install-peers.sh` to build llama-server");
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = match Command::new(binary)
        .arg("--model")
        .arg(gguf)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--threads", &THREADS.to_string()])
        .args(["--threads-batch", &THREADS.to_string()])
        .args(["--parallel", "1", "--ctx-size", "1024"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!("llama.cpp left out: llama-server did not start: {e}");
            return None;
        }
    };
    let mut server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    // The port opens before the model has loaded; /health answers 200 once it has.
    let deadline = Instant::now() + Duration::from_secs(120);
    while ureq::get(&format!("{}/health", server.url)).call().is_err() {
        // A peer that fails is a line of the report, not the bench's end.
        if let Some(reason) = exit_reason(&mut server.child) {
            eprintln!("llama.cpp left out: llama-server {reason} while loading the model");
            return None;
        }
        if Instant::now() > deadline {
            eprintln!("llama.cpp left out: llama-server did not load the model within 120 s");
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(server)
}

/// `moat-model check` on our graph and on the builder's: the teacher-forced KL divergence
/// from the checkpoint's float32 reference, and greedy agreement.
fn measure_quality(root: &Path, conv: &Conversions) -> Value {
    let mut dirs = vec![("ours", conv.ours.clone())];
    match &conv.builder_for_moat {
        Some(dir) => dirs.push(("builder", dir.clone())),
        None => eprintln!("the builder's export is not checked: moat-model describe refused it"),
    }
    let mut rows = Vec::new();
    for (name, dir) in dirs {
        eprintln!("moat-model check {name}");
        let checked = moat_model(root, "check", &dir, |c| {
            c.arg("--against")
                .arg(&conv.checkpoint)
                .args(["--new-tokens", &CHECK_NEW_TOKENS.to_string()])
                .args(["--threads", &THREADS.to_string()]);
        });
        // Exit status 2 is a gate that failed; the figures are written all the same.
        let report: Value = std::fs::read(dir.join("check.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| panic!("moat-model check wrote no check.json: {checked:?}"));
        rows.push(json!({
            "conversion": name,
            "teacher_forced": report["teacher_forced"],
            "greedy": report["greedy"],
        }));
    }
    println!(
        "\nQuality against the float32 checkpoint (moat-model check, {CHECK_NEW_TOKENS} new tokens a prompt)\n"
    );
    println!(
        "| conversion | KL mean | KL max | top-1 agreement | greedy identical | tokens before divergence |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        let (tf, greedy) = (&row["teacher_forced"], &row["greedy"]);
        println!(
            "| {} | {:.4} | {:.3} | {:.4} | {}/{} | {:.1}% |",
            row["conversion"].as_str().unwrap_or("?"),
            tf["kl_mean"].as_f64().unwrap_or(f64::NAN),
            tf["kl_max"].as_f64().unwrap_or(f64::NAN),
            tf["top1_agreement"].as_f64().unwrap_or(f64::NAN),
            greedy["identical_sequences"],
            greedy["of"],
            greedy["token_agreement"].as_f64().unwrap_or(f64::NAN) * 100.0,
        );
    }
    if let [ours, builder] = rows.as_slice() {
        let kl = |r: &Value| r["teacher_forced"]["kl_mean"].as_f64().unwrap_or(f64::NAN);
        println!(
            "\nKL mean, ours / builder: {:.2}x (goal < 1)",
            kl(ours) / kl(builder)
        );
    }
    Value::Array(rows)
}

/// The 1, 5 and 15 minute load averages: the machine is shared, so the report says how
/// busy it was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

/// The middle of sorted values (the mean of the two middle ones for an even count).
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
