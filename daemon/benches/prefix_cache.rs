//! Time to first token of requests that share a long prompt prefix (a department's
//! instructions and few-shot examples, about 1,000 tokens once rendered), with the prefix
//! cache and without, on the same machine in one run. Each request asks a different
//! question after the shared part; the first request of each engine computes the prefix
//! (and, with the cache, keeps it) and is not counted.
//!
//! `cargo bench -p moat-daemon --bench prefix_cache`; writes `target/bench/prefix_cache.json`
//! with `prefix_cache.ttft_speedup`.

use std::time::Instant;

use moat_daemon::engine::{
    ChatMessage, Engine, EngineSettings, GenerationEvent, GenerationRequest, PrefixSharing, Prompt,
};
use serde_json::json;

mod common;

/// Requests timed per engine after the one that warms it.
const REQUESTS: usize = 12;

/// The shared instructions: a rule list and worked examples, repeated to about 1,000 tokens.
fn instructions() -> String {
    let rules = "You answer questions from the legal department about the contracts the \
        organisation signs. Answer in one sentence. Cite the clause by number. Keep every \
        figure exactly as written. Say when a question falls outside contract law. ";
    let example = |n: usize| {
        format!(
            "Example {n}. Question: may the supplier raise prices during the term? Answer: \
             only as clause {n}.2 allows, by at most the published index, with 60 days' notice. "
        )
    };
    let mut text = rules.to_owned();
    for n in 1..=24 {
        text.push_str(&example(n));
    }
    text
}

/// Time to the first token of one request (a fresh sequence), in milliseconds.
fn first_token_ms(engine: &Engine, system: &str, question: &str) -> f64 {
    let mut request = GenerationRequest::new(Prompt::Chat(vec![
        ChatMessage::new("system", system),
        ChatMessage::new("user", question),
    ]));
    request.max_tokens = Some(1);
    request.department = "legal".into();
    let start = Instant::now();
    let mut stream = engine.generate(request).expect("accepted");
    let mut first = None;
    while let Some(event) = stream.next_blocking() {
        match event {
            GenerationEvent::Token { .. } => {
                first.get_or_insert_with(|| start.elapsed());
            }
            GenerationEvent::Finished { .. } => break,
            GenerationEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    first.expect("a token").as_secs_f64() * 1e3
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let bench = common::CpuBench::load();
    let (model, model_dir) = bench.model();
    let system = instructions();
    let engines = [
        ("with the prefix cache", PrefixSharing::PerDepartment),
        ("without", PrefixSharing::Off),
    ];
    let mut results = Vec::new();
    let mut prompt_tokens = 0;
    for (name, sharing) in engines {
        let engine = bench.engine_with(
            &model_dir,
            EngineSettings {
                prefix_cache: sharing,
                ..EngineSettings::default()
            },
        );
        prompt_tokens = engine
            .tokenize_prompt(&Prompt::Chat(vec![
                ChatMessage::new("system", &system),
                ChatMessage::new("user", "Question 0?"),
            ]))
            .expect("tokenizes")
            .len();
        // Computes the prefix (and, with the cache, keeps it).
        first_token_ms(&engine, &system, "Warm up: what is a contract?");
        let ttfts: Vec<f64> = (0..REQUESTS)
            .map(|n| first_token_ms(&engine, &system, &format!("Question {n}: who may end it?")))
            .collect();
        let figures = engine.prefix_cache();
        eprintln!("{name}: {figures:?}");
        results.push((name, median(ttfts), figures));
        engine.shutdown();
    }
    let (with, without) = (results[0].1, results[1].1);
    let speedup = without / with;
    println!(
        "\n{model}, {} threads; prompt {prompt_tokens} tokens, of which the system part is shared; \
         TTFT p50 of {REQUESTS} requests\n",
        bench.threads
    );
    println!("| engine | TTFT p50 ms | cached blocks copied |");
    println!("|---|---:|---:|");
    for (name, ttft, figures) in &results {
        println!("| {name} | {ttft:.1} | {} |", figures.hits);
    }
    println!("\nprefix cache: TTFT {speedup:.1}x lower (goal: at least 5x)");
    let out_dir = bench.root.join("target/bench");
    std::fs::create_dir_all(&out_dir).expect("target/bench");
    let report = json!({
        "machine": common::peers::machine(),
        "model": model,
        "threads": bench.threads,
        "prompt_tokens": prompt_tokens,
        "requests": REQUESTS,
        "prefix_cache": {
            "ttft_p50_ms_with": with,
            "ttft_p50_ms_without": without,
            "ttft_speedup": speedup,
            "blocks_copied": results[0].2.hits,
        },
    });
    let path = out_dir.join("prefix_cache.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("JSON"))
        .expect("write prefix_cache.json");
    println!("results: {}", path.display());
}
