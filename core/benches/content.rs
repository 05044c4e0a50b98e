//! Time to scan a realistic 2 KB prompt with the usual content rules: every built-in
//! detector and two `regex` rules. Prints p50 and p99 over 10,000 runs, for the whole rule
//! set and for each rule alone, then for redaction.
//!
//! Run with `cargo bench -p moat-core --bench content`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use moat_core::policy::content::{
    ContentAction, ContentRuleConfig, ContentRules, Direction, Purpose,
};

const ITERATIONS: usize = 10_000;
const WARM_UP: usize = 1_000;

const PROSE: &str = "\
Hello, I need help drafting a reply to a supplier about the delayed shipment of the \
replacement pumps for the north plant. The original order was placed on 2024-03-14 under \
purchase order 4500123987 and confirmed by phone (+49 30 1234567) the following week. \
The supplier now says the parts will arrive in eight to ten weeks, which is far too late \
for the maintenance window we agreed with operations. Please keep the tone firm but \
polite, remind them of the penalty clause in section 7.2 of the framework agreement, and \
ask for a written commitment to a delivery date before the end of the month. ";

const SENSITIVE: &str = "\
For the refund of the deposit, they should use our account DE89 3704 0044 0532 0130 00 \
and not the old one. The deposit was paid with the corporate card 4111 1111 1111 1111, \
so if they prefer to refund the card instead, that is fine too. Copies of the \
correspondence should go to procurement.north@example-industries.com and to me. ";

const BACKGROUND: &str = "\
Some background for the letter: we have worked with this supplier for six years and the \
relationship has generally been good, but this is the third delay in twelve months, and \
the last one cost us two days of downtime on line 3. Their account manager changed in \
January, and I suspect the new one is not aware of our history. ";

const DETAILS: &str = "\
For reference, the pumps are model KSB Etanorm 080-065-250, quantity 4, unit price EUR \
12,480.00, total EUR 49,920.00 excluding VAT. The delivery address is gate B of the north \
plant, Industriestrasse 14, 68169 Mannheim, goods receiving open 06:00 to 14:00 on working \
days. Our internal ticket for the maintenance window is MW-2024-0117; the window itself runs \
from 2024-06-03 to 2024-06-14 and cannot move, because the turbine overhaul is scheduled \
right after it and the contractors for that are booked a year in advance. ";

const CLOSING: &str = "\
Also mention that Project Falcon depends on these pumps, without going into detail, and \
that we expect an answer within five working days. Please keep it under 300 words and \
sign it with my name and title as usual. Thank you! ";

/// About 2 KB of prose with one card number, one IBAN and one e-mail address.
fn prompt() -> String {
    let text = format!("{PROSE}{SENSITIVE}{BACKGROUND}{DETAILS}{CLOSING}");
    assert!(
        (1900..=2200).contains(&text.len()),
        "prompt is {} bytes",
        text.len()
    );
    text
}

fn rule(detector: &str, action: ContentAction) -> ContentRuleConfig {
    ContentRuleConfig {
        detector: detector.to_owned(),
        name: None,
        pattern: None,
        markings: None,
        action,
        applies_to: Direction::Both,
    }
}

fn regex_rule(name: &str, pattern: &str, action: ContentAction) -> ContentRuleConfig {
    ContentRuleConfig {
        name: Some(name.to_owned()),
        pattern: Some(pattern.to_owned()),
        ..rule("regex", action)
    }
}

fn rule_set() -> Vec<ContentRuleConfig> {
    vec![
        rule("card_number", ContentAction::Deny),
        rule("iban", ContentAction::Redact),
        rule("email", ContentAction::RedactInAudit),
        rule("secret_marking", ContentAction::Deny),
        regex_rule(
            "project_codename",
            r"(?i)\bproject\s+(falcon|osprey)\b",
            ContentAction::Redact,
        ),
        regex_rule(
            "employee_id",
            r"\bEMP-[0-9]{6}\b",
            ContentAction::RedactInAudit,
        ),
    ]
}

/// p50 and p99 of `run`, in microseconds.
fn measure(mut run: impl FnMut()) -> (f64, f64) {
    for _ in 0..WARM_UP {
        run();
    }
    let mut times: Vec<Duration> = (0..ITERATIONS)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed()
        })
        .collect();
    times.sort_unstable();
    let micros = |q: usize| times[(ITERATIONS * q / 100).min(ITERATIONS - 1)].as_secs_f64() * 1e6;
    (micros(50), micros(99))
}

fn report(label: &str, (p50, p99): (f64, f64)) {
    println!("{label:<28} p50 {p50:>7.2} µs   p99 {p99:>7.2} µs");
}

fn main() {
    let text = prompt();
    let configs = rule_set();
    let rules = ContentRules::compile(&configs).expect("bench rules compile");
    let scan = rules.scan(&text, Direction::Prompt);
    println!("prompt: {} bytes; {ITERATIONS} runs each", text.len());
    println!("findings: {:?}", scan.findings);

    report(
        "scan, all rules",
        measure(|| {
            black_box(rules.scan(black_box(&text), Direction::Prompt));
        }),
    );
    for config in &configs {
        let alone = ContentRules::compile(std::slice::from_ref(config)).expect("rule compiles");
        let label = format!(
            "scan, {}",
            config.name.as_deref().unwrap_or(&config.detector)
        );
        report(
            &label,
            measure(|| {
                black_box(alone.scan(black_box(&text), Direction::Prompt));
            }),
        );
    }
    report(
        "redact, audit",
        measure(|| {
            black_box(rules.redact(black_box(&text), Direction::Prompt, Purpose::Audit));
        }),
    );
}
