//! What the serving plane costs: the demo model answered end to end through moatd's server
//! (mutual TLS 1.3 listener, actix-web, JSON, server-sent events, the policy gate and the
//! audit trail's durable records; `server::serve_models`, what `moatd serve` runs) against
//! the very same engine called in-process, measured in one run, in alternating rounds, on
//! this machine:
//!
//! - decode tokens/s of one streamed answer (goal: end to end >= 0.97x in-process);
//! - the latency of a request with `max_tokens` = 1, p50 over many requests on a kept-alive
//!   connection (goal: < 2 ms added), and the cost of a fresh TLS connection on top.
//!
//! Both paths drive one `Engine` (one ONNX Runtime session): two sessions in two processes
//! would disturb each other's spinning worker threads on a small machine and measure that
//! instead. The client runs on the same cores and does as little as it can per event.
//!
//! `cargo bench -p moat-daemon --bench serving` (after `bash scripts/setup.sh`).
//! `MOAT_BENCH_MODEL` picks the model directory under `local/models`
//! (default `smollm2-135m-instruct-fast`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_daemon::api::ServedModel;
use moat_daemon::config::Config;
use moat_daemon::engine::{
    ChatMessage, Engine, GenerationEvent, GenerationRequest, Prompt, SamplingParams,
};
use moat_daemon::server;

mod common;
use common::sse::stream;
use common::tls::{Pki, client, make_pki, write_permissive_policy};

const NEW_TOKENS: usize = 128;
const DECODE_ROUNDS: usize = 5;
const SHORT_REQUESTS: usize = 60;
const IDLE_BETWEEN_REQUESTS: Duration = Duration::from_millis(20);
const STORY: &str = "Write a short story about a lighthouse keeper.";
const SHORT: &str = "What is the capital of France?";

fn main() {
    let bench = common::CpuBench::load();
    let (model, model_dir) = bench.model();
    let threads = bench.threads;
    let engine = Arc::new(bench.engine(&model_dir));
    let pki = make_pki();
    let url = start_server(&pki, Arc::clone(&engine));
    let agent = client(&pki);

    // Warm both paths (first TLS connection, first allocations).
    http_decode(&agent, &url, 8);
    in_process_decode(&engine, 8);

    let mut http_rates = Vec::new();
    let mut local_rates = Vec::new();
    for _ in 0..DECODE_ROUNDS {
        http_rates.push(http_decode(&agent, &url, NEW_TOKENS));
        local_rates.push(in_process_decode(&engine, NEW_TOKENS));
    }
    let mut http_short = Vec::new();
    let mut local_short = Vec::new();
    for _ in 0..SHORT_REQUESTS {
        // Each request arrives at an idle server, as a lone request does: ONNX Runtime's
        // worker threads keep spinning for a moment after a run, and a request landing in
        // that moment would measure the contention for the two cores instead.
        std::thread::sleep(IDLE_BETWEEN_REQUESTS);
        http_short.push(http_one_token(&agent, &url));
        std::thread::sleep(IDLE_BETWEEN_REQUESTS);
        local_short.push(in_process_one_token(&engine));
    }
    let mut fresh = Vec::new();
    for _ in 0..10 {
        std::thread::sleep(IDLE_BETWEEN_REQUESTS);
        fresh.push(http_one_token(&client(&pki), &url));
    }

    let http_rate = median(http_rates);
    let local_rate = median(local_rates);
    let http_p50 = median(http_short);
    let local_p50 = median(local_short);
    let fresh_p50 = median(fresh);
    println!("model: {model} ({threads} threads, CPU), {NEW_TOKENS} new tokens, medians");
    println!("| path | decode tok/s | max_tokens=1 p50 (ms) |");
    println!("|---|---|---|");
    println!(
        "| in-process engine | {local_rate:.1} | {:.2} |",
        local_p50 * 1e3
    );
    println!(
        "| moatd over mTLS (kept-alive connection) | {http_rate:.1} | {:.2} |",
        http_p50 * 1e3
    );
    println!(
        "| moatd over mTLS (new connection each) | - | {:.2} |",
        fresh_p50 * 1e3
    );
    println!();
    println!(
        "end-to-end / in-process decode: {:.3}x (goal >= 0.97x)",
        http_rate / local_rate
    );
    println!(
        "added p50 latency of a max_tokens=1 request: {:.2} ms (goal < 2 ms); a new TLS connection adds {:.2} ms more",
        (http_p50 - local_p50) * 1e3,
        (fresh_p50 - http_p50) * 1e3
    );
    drop(pki.dir);
    // The server thread serves until the process ends.
    std::process::exit(0);
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn greedy(content: &str, max_tokens: usize) -> GenerationRequest {
    let mut request = GenerationRequest::new(Prompt::Chat(vec![ChatMessage::new("user", content)]));
    request.max_tokens = Some(max_tokens);
    request.sampling = SamplingParams::greedy();
    request
}

/// Decode tokens/s of one in-process generation (first token to last).
fn in_process_decode(engine: &Engine, max_tokens: usize) -> f64 {
    let mut stream = engine
        .generate(greedy(STORY, max_tokens))
        .expect("accepted");
    let (mut first, mut last, mut tokens) = (None, Instant::now(), 0usize);
    while let Some(event) = stream.next_blocking() {
        match event {
            GenerationEvent::Token { .. } => {
                first.get_or_insert_with(Instant::now);
                last = Instant::now();
                tokens += 1;
            }
            GenerationEvent::Finished { .. } => break,
            GenerationEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    rate(tokens, first, last)
}

fn in_process_one_token(engine: &Engine) -> f64 {
    let start = Instant::now();
    let mut stream = engine.generate(greedy(SHORT, 1)).expect("accepted");
    while let Some(event) = stream.next_blocking() {
        if matches!(event, GenerationEvent::Finished { .. }) {
            break;
        }
    }
    start.elapsed().as_secs_f64()
}

fn rate(tokens: usize, first: Option<Instant>, last: Instant) -> f64 {
    let first = first.expect("at least one token");
    tokens.saturating_sub(1) as f64 / (last - first).as_secs_f64()
}

fn body(content: &str, max_tokens: usize, stream: bool) -> String {
    serde_json::json!({
        "model": "bench",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
    .to_string()
}

/// Decode tokens/s of one streamed answer, from the first content event to the last, with
/// the token count from the usage event.
fn http_decode(agent: &ureq::Agent, url: &str, max_tokens: usize) -> f64 {
    let answer = stream(
        agent,
        &format!("{url}/v1/chat/completions"),
        &body(STORY, max_tokens, true),
    );
    answer.tokens.saturating_sub(1) as f64 / answer.first_to_last.as_secs_f64()
}

fn http_one_token(agent: &ureq::Agent, url: &str) -> f64 {
    let start = Instant::now();
    let mut response = agent
        .post(&format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(body(SHORT, 1, false))
        .expect("answered");
    let text = response.body_mut().read_to_string().expect("body");
    let elapsed = start.elapsed().as_secs_f64();
    assert!(text.contains("\"completion_tokens\":1"), "{text}");
    elapsed
}

/// Starts moatd's server around `engine` on a free loopback port and waits until it
/// accepts connections. Returns its base URL.
fn start_server(pki: &Pki, engine: Arc<Engine>) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    // The audit trail is in the path, as in production: two auditors, durable records.
    let auditors = [
        age::x25519::Identity::generate().to_public(),
        age::x25519::Identity::generate().to_public(),
    ];
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:{port}\"]\n\
         [tls]\ncertificate = \"server.crt\"\nprivate_key = \"server.key\"\nclient_ca = [{{ file = \"ca.crt\", departments = \"*\" }}]\n\
         [metrics]\nenabled = false\n[policy]\ndirectory = \"policies\"\n\
         [audit]\nstate_directory = \"state\"\nnode_id = \"bench\"\nrecipients = [\"{}\", \"{}\"]\n",
        auditors[0], auditors[1]
    );
    write_permissive_policy(&pki.dir.path().join("policies"));
    let config = Config::parse(&text, &pki.dir.path().join("moat.toml")).expect("config");
    let models = BTreeMap::from([("bench".to_owned(), ServedModel::Generator(engine))]);
    std::thread::spawn(move || server::serve_models(&config, models).expect("serves"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    format!("https://127.0.0.1:{port}")
}
