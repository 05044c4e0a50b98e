//! What constrained decoding costs on the demo model, on CPU, in one run:
//!
//! - the mask's cost per token as a share of the decode step (goal < 10%): the engine
//!   generates a constrained answer; its tokens are then replayed through a fresh
//!   constraint, timing the mask and the advance of each token alone, against the decode
//!   time per token of that same generation; and, end to end, constrained decode tok/s
//!   against unconstrained decode of the same prompt;
//! - the time to compile a typical schema (an invoice with nested line items).
//!
//! `cargo bench -p moat-daemon --bench structured` (after `bash scripts/setup.sh`).

use std::time::{Duration, Instant};

use moat_daemon::engine::{
    ChatMessage, Engine, GenerationEvent, GenerationRequest, Prompt, ResponseFormat, SamplingParams,
};

mod common;

const ROUNDS: usize = 5;
const COMPILES: usize = 50;

fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "number": {"type": "integer", "minimum": 0, "maximum": 999999},
            "vendor": {"type": "string", "maxLength": 40},
            "currency": {"enum": ["EUR", "USD", "GBP"]},
            "lines": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "item": {"type": "string", "maxLength": 30},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "price": {"type": "number", "minimum": 0}
                    },
                    "required": ["item", "quantity", "price"],
                    "additionalProperties": false
                },
                "minItems": 1,
                "maxItems": 5
            },
            "total": {"type": "number", "minimum": 0}
        },
        "required": ["number", "vendor", "currency", "lines", "total"],
        "additionalProperties": false
    })
}

fn format() -> ResponseFormat {
    ResponseFormat::JsonSchema {
        name: "invoice".into(),
        schema: schema(),
    }
}

/// One greedy generation: its token ids and the wall time per generated token after the
/// first (decode only).
fn generate(engine: &Engine, constrained: bool, max_tokens: usize) -> (Vec<u32>, Duration) {
    let mut request = GenerationRequest::new(Prompt::Chat(vec![ChatMessage::new(
        "user",
        "Extract the invoice as JSON: Invoice 1042 from Northwind Ltd; 3 chairs at 120.00 \
         EUR and 1 table at 890.00 EUR; total 1250.00 EUR.",
    )]));
    request.max_tokens = Some(max_tokens);
    request.sampling = SamplingParams::greedy();
    if constrained {
        request.constraint = Some(engine.constrain(&format()).expect("compiles"));
    }
    let mut stream = engine.generate(request).expect("submits");
    let mut ids = Vec::new();
    let mut first = None;
    while let Some(event) = stream.next_blocking() {
        match event {
            GenerationEvent::Token { id, .. } => {
                ids.push(id);
                first.get_or_insert_with(Instant::now);
            }
            GenerationEvent::Finished { .. } => break,
            GenerationEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    let decode = first.map_or(Duration::ZERO, |t| t.elapsed());
    let per_token = decode / (ids.len().max(2) as u32 - 1);
    (ids, per_token)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

fn main() {
    let bench = common::CpuBench::load();
    let (model, model_dir) = bench.model();
    let threads = bench.threads;
    let engine = bench.engine(&model_dir);

    let compile = median(
        (0..COMPILES)
            .map(|_| {
                let started = Instant::now();
                engine.constrain(&format()).expect("compiles");
                started.elapsed()
            })
            .collect(),
    );

    let mut constrained_steps = Vec::new();
    let mut free_steps = Vec::new();
    let mut mask_shares = Vec::new();
    let mut masks = Vec::new();
    let mut answer_tokens = 0;
    for _ in 0..ROUNDS {
        let (ids, step) = generate(&engine, true, 200);
        constrained_steps.push(step);
        let (_, free) = generate(&engine, false, ids.len().max(2));
        free_steps.push(free);
        // The mask's own cost, token by token, replayed without the model.
        let mut constraint = engine.constrain(&format()).expect("compiles");
        let started = Instant::now();
        for &id in &ids {
            if constraint.is_stopped() {
                break;
            }
            let mask = constraint.mask().expect("mask");
            assert!(mask.is_allowed(id), "the replayed answer left the grammar");
            constraint.consume(id).expect("advances");
        }
        let per_token = started.elapsed() / ids.len().max(1) as u32;
        masks.push(per_token);
        mask_shares.push(per_token.as_secs_f64() / step.as_secs_f64());
        answer_tokens = ids.len();
    }
    mask_shares.sort_by(f64::total_cmp);
    let share = mask_shares[mask_shares.len() / 2];
    let constrained = median(constrained_steps);
    let free = median(free_steps);
    println!(
        "model: {model} ({threads} threads, CPU), invoice schema, {answer_tokens}-token answer, medians of {ROUNDS}"
    );
    println!(
        "| measure | value |\n|---|---:|\n\
         | schema compile | {:.2} ms |\n\
         | mask + advance per token | {:.3} ms |\n\
         | decode step, constrained | {:.2} ms |\n\
         | decode step, unconstrained | {:.2} ms |",
        compile.as_secs_f64() * 1e3,
        median(masks).as_secs_f64() * 1e3,
        constrained.as_secs_f64() * 1e3,
        free.as_secs_f64() * 1e3,
    );
    println!(
        "mask cost per token / decode step: {:.1}% (goal < 10%: {}); constrained / unconstrained step: {:.3}x",
        share * 100.0,
        if share < 0.10 { "met" } else { "NOT met" },
        constrained.as_secs_f64() / free.as_secs_f64()
    );
}
