//! Time of one policy decision as moatd makes it per request: the content rules scan a
//! realistic 2 KB prompt, then `AccessPolicy::decide` puts the request to Cedar and the data
//! rules. The policy set is the shipped one with its examples switched on, over a few
//! departments and models of their own.
//!
//! Prints p50, p99 and max in µs over 20,000 runs, after a warm-up, for the scan alone,
//! the decision alone and both, on a prompt without findings and on one with a card number.
//! The goal is p99 < 50 µs for scan + decision.
//!
//! Run with `cargo bench -p moat-core --bench policy`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use moat_core::policy::content::{ContentScan, Direction};
use moat_core::policy::{
    AccessPolicy, ModelFacts, PolicyAction, PolicyRequest, PolicySource, SourceFile,
};

const ITERATIONS: usize = 20_000;
const WARM_UP: usize = 2_000;
const PROMPT_BYTES: usize = 2_048;

const SCHEMA: &str = include_str!("../../policies/schema.cedarschema");
const SHIPPED: &str = include_str!("../../policies/policies.cedar");

/// The shipped examples, switched on.
const EXAMPLES: &str = r#"
@id("finance-uses-its-models")
permit (
  principal in Moat::Department::"finance",
  action in [Moat::Action::"chat", Moat::Action::"complete"],
  resource
)
when { resource.tags.contains("finance") };

@id("enclave-uses-enclave-model")
permit (
  principal in Moat::Department::"enclave",
  action in [Moat::Action::"chat", Moat::Action::"complete", Moat::Action::"embed"],
  resource == Moat::Model::"enclave-model"
);

@id("only-the-enclave-reaches-enclave-model")
forbid (principal, action, resource == Moat::Model::"enclave-model")
unless { principal in Moat::Department::"enclave" };

@id("office-hours")
forbid (
  principal,
  action in [Moat::Action::"chat", Moat::Action::"complete", Moat::Action::"embed"],
  resource
)
when { context.weekday > 5 || context.hour < 7 || context.hour >= 19 }
unless { principal in Moat::Department::"operations" };

@id("embeddings-from-the-lan")
permit (principal, action == Moat::Action::"embed", resource)
when { context.source_ip.isInRange(ip("10.0.0.0/8")) };
"#;

const DATA: &str = r#"
classification = ["public", "internal", "confidential", "secret"]
utc_offset_minutes = 60

[default_department]
classification = "internal"
ceiling = "internal"

[departments.finance]
ceiling = "confidential"
[departments.finance.limits]
requests_per_minute = 600
tokens_per_minute = 400000

[departments.legal]
ceiling = "confidential"

[departments.enclave]
classification = "confidential"
ceiling = "secret"

[departments.operations]
ceiling = "internal"

[default_model]
ceiling = "internal"

[models.finance-model]
ceiling = "confidential"
tags = ["finance"]

[models.enclave-model]
ceiling = "secret"
tags = ["enclave"]

[models.e5-small]
tags = ["embedding"]

[[content]]
detector = "card_number"
action = "deny"

[[content]]
detector = "iban"
action = "redact"

[[content]]
detector = "email"
action = "redact_in_audit"

[[content]]
detector = "secret_marking"
action = "deny"

[[content]]
detector = "regex"
name = "project_codename"
pattern = '(?i)\bproject\s+(kestrel|heron)\b'
action = "redact"
"#;

const PARAGRAPHS: [&str; 3] = [
    "We are preparing the board pack for the second quarter and need a short narrative \
     on the movement in operating costs. Energy prices fell by roughly eight percent \
     against the plan, while freight rose after the carrier renegotiated its surcharges \
     in April. Staff costs are flat; the two open positions in the control team were \
     filled late in the quarter. ",
    "Please write three paragraphs in plain language for non-specialists, avoid jargon, \
     and keep each paragraph under one hundred words. Mention that the figures are \
     unaudited and that the full reconciliation follows with the July close. Where you \
     compare with last year, use the restated numbers from the March pack. ",
    "Finally, suggest two questions the audit committee is likely to ask about the \
     freight contract, with a one-line answer to each, and flag anything in the text \
     above that reads as a forecast rather than a fact, so that we can soften it. ",
];

const CARD_SENTENCE: &str = "The supplier asked us to settle the overdue invoice with the \
     corporate card 5555 5555 5555 4444 before Friday. ";

/// 2 KB of prose; with `card`, one sentence in the middle names a card number.
fn prompt(card: bool) -> String {
    let mut text = String::new();
    let mut next = PARAGRAPHS.iter().cycle();
    while text.len() < PROMPT_BYTES / 2 {
        text.push_str(next.next().unwrap_or(&PARAGRAPHS[0]));
    }
    if card {
        text.push_str(CARD_SENTENCE);
    }
    for paragraph in next {
        // The paragraphs are ASCII: any byte count is a character boundary.
        let room = PROMPT_BYTES - text.len();
        text.push_str(&paragraph[..room.min(paragraph.len())]);
        if text.len() == PROMPT_BYTES {
            break;
        }
    }
    text
}

fn policy() -> AccessPolicy {
    let file = |name, text| SourceFile { name, text };
    let source = PolicySource {
        schema: file("schema.cedarschema", SCHEMA),
        policies: vec![
            file("00-shipped.cedar", SHIPPED),
            file("10-examples.cedar", EXAMPLES),
        ],
        data: file("moat-policy.toml", DATA),
    };
    match AccessPolicy::load(&source) {
        Ok(policy) => policy,
        Err(e) => panic!("the benchmark's policy does not load: {e}"),
    }
}

/// A finance chat at "confidential" on a Wednesday at 10:00 appliance time.
fn request<'a>(scan: &'a ContentScan) -> PolicyRequest<'a> {
    PolicyRequest {
        department: "finance",
        subject: "alice",
        action: PolicyAction::Chat,
        model: Some(ModelFacts {
            name: "finance-model",
            task: "text-generation",
            version: "",
            ceiling: None,
        }),
        classification: Some("confidential"),
        source_ip: IpAddr::V4(Ipv4Addr::new(10, 20, 30, 40)),
        // 2025-01-08 09:00 UTC.
        unix_time: 1_736_326_800,
        prompt_tokens: 450,
        max_tokens: 512,
        prompt_scan: scan,
    }
}

/// Runs `f` [`WARM_UP`] times, then times [`ITERATIONS`] runs and prints the percentiles.
fn measure(label: &str, mut f: impl FnMut()) {
    for _ in 0..WARM_UP {
        f();
    }
    let mut times: Vec<Duration> = (0..ITERATIONS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort_unstable();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "{label:<40} p50 {:>8.2} µs   p99 {:>8.2} µs   max {:>9.2} µs",
        micros(at(0.50)),
        micros(at(0.99)),
        micros(times[times.len() - 1]),
    );
}

fn main() {
    let policy = policy();
    println!(
        "{ITERATIONS} runs after {WARM_UP} warm-up, {} Cedar policies, {} content rules\n",
        policy.counts.iter().map(|(_, n)| n).sum::<usize>(),
        policy.data().content.len()
    );
    for (variant, text) in [
        ("no findings", prompt(false)),
        ("card number", prompt(true)),
    ] {
        let scan = policy.content().scan(&text, Direction::Prompt);
        let expected = policy.decide(&request(&scan)).reason;
        println!("prompt: {} bytes, {variant}: {expected}", text.len());
        measure("(a) content scan", || {
            black_box(policy.content().scan(black_box(&text), Direction::Prompt));
        });
        measure("(b) decide", || {
            black_box(policy.decide(black_box(&request(&scan))));
        });
        measure("(c) content scan + decide", || {
            let scan = policy.content().scan(black_box(&text), Direction::Prompt);
            black_box(policy.decide(&request(&scan)));
        });
        println!();
    }
}
