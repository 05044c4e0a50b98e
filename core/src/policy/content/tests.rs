use proptest::prelude::*;

use super::*;

const CARD: &str = "4111 1111 1111 1111";
const IBAN: &str = "DE89 3704 0044 0532 0130 00";
const EMAIL: &str = "jane.doe@example.com";

/// A rule of `detector` that looks both ways.
pub(super) fn rule(detector: &str, action: ContentAction) -> ContentRuleConfig {
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

/// Every built-in detector with `action`.
fn built_ins(action: ContentAction) -> ContentRules {
    let configs: Vec<_> = BUILT_IN_DETECTORS
        .iter()
        .map(|detector| rule(detector, action))
        .collect();
    ContentRules::compile(&configs).expect("built-in rules compile")
}

fn finding(detector: &str, count: usize, action: ContentAction) -> Finding {
    Finding {
        detector: detector.to_owned(),
        count,
        action,
    }
}

#[test]
fn scan_reports_counts_in_rule_order_and_the_first_deny() {
    let rules = ContentRules::compile(&[
        rule("email", ContentAction::Allow),
        rule("card_number", ContentAction::Redact),
        regex_rule("falcon", r"(?i)\bproject\s+falcon\b", ContentAction::Deny),
        rule("iban", ContentAction::Deny),
        rule("secret_marking", ContentAction::Deny),
    ])
    .expect("rules compile");
    let text = format!(
        "Project Falcon: pay {IBAN} or card {CARD}; {EMAIL} and {EMAIL} know about PROJECT  falcon."
    );
    let scan = rules.scan(&text, Direction::Prompt);
    assert_eq!(
        scan.findings,
        [
            finding("email", 2, ContentAction::Allow),
            finding("card_number", 1, ContentAction::Redact),
            finding("falcon", 2, ContentAction::Deny),
            finding("iban", 1, ContentAction::Deny),
        ]
    );
    assert_eq!(scan.denied_by.as_deref(), Some("falcon"));
}

#[test]
fn scan_of_clean_text_is_empty() {
    let rules = built_ins(ContentAction::Deny);
    let scan = rules.scan("Summarise the quarterly report, please.", Direction::Prompt);
    assert_eq!(scan, ContentScan::default());
    assert_eq!(
        ContentRules::empty().scan(CARD, Direction::Prompt),
        ContentScan::default()
    );
}

#[test]
fn rules_look_only_in_their_direction() {
    let rules = ContentRules::compile(&[
        ContentRuleConfig {
            applies_to: Direction::Prompt,
            ..rule("card_number", ContentAction::Deny)
        },
        ContentRuleConfig {
            applies_to: Direction::Answer,
            ..rule("card_number", ContentAction::Redact)
        },
        rule("email", ContentAction::Redact),
    ])
    .expect("rules compile");
    let text = format!("{CARD} {EMAIL}");
    let prompt = rules.scan(&text, Direction::Prompt);
    assert_eq!(prompt.denied_by.as_deref(), Some("card_number"));
    assert_eq!(prompt.findings.len(), 2);
    let answer = rules.scan(&text, Direction::Answer);
    assert_eq!(answer.denied_by, None);
    assert_eq!(
        answer.findings,
        [
            finding("card_number", 1, ContentAction::Redact),
            finding("email", 1, ContentAction::Redact),
        ]
    );
    assert_eq!(
        rules.redact(&text, Direction::Prompt, Purpose::Inference),
        format!("{CARD} [REDACTED:email]")
    );
}

#[test]
fn findings_never_carry_the_matched_text() {
    let rules = ContentRules::compile(&[
        rule("card_number", ContentAction::Deny),
        rule("iban", ContentAction::Deny),
        rule("email", ContentAction::Deny),
        rule("secret_marking", ContentAction::Deny),
        regex_rule("codename", r"falcon\d+", ContentAction::Deny),
    ])
    .expect("rules compile");
    let text = format!("{CARD} {IBAN} {EMAIL} NOFORN falcon42");
    let scan = rules.scan(&text, Direction::Prompt);
    assert_eq!(scan.findings.len(), 5);
    let shown = format!("{scan:?} {:?}", scan.findings);
    for secret in ["1111", "3704", "jane", "example", "NOFORN", "falcon42"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
}

#[test]
fn redact_replaces_exactly_the_matches() {
    let rules = built_ins(ContentAction::Redact);
    let text = format!("Card {CARD}, IBAN {IBAN}.\nMail {EMAIL}; TOP SECRET//NOFORN. ok");
    assert_eq!(
        rules.redact(&text, Direction::Answer, Purpose::Inference),
        "Card [REDACTED:card_number], IBAN [REDACTED:iban].\nMail [REDACTED:email]; \
         [REDACTED:secret_marking]//[REDACTED:secret_marking]. ok"
    );
}

#[test]
fn redact_for_inference_keeps_what_only_the_audit_log_hides() {
    let rules = ContentRules::compile(&[
        rule("card_number", ContentAction::Redact),
        rule("email", ContentAction::RedactInAudit),
        rule("iban", ContentAction::Deny),
        rule("secret_marking", ContentAction::Allow),
    ])
    .expect("rules compile");
    let text = format!("{CARD} {EMAIL} {IBAN} NOFORN");
    assert_eq!(
        rules.redact(&text, Direction::Prompt, Purpose::Inference),
        format!("[REDACTED:card_number] {EMAIL} {IBAN} NOFORN")
    );
    assert_eq!(
        rules.redact(&text, Direction::Prompt, Purpose::Audit),
        format!("[REDACTED:card_number] [REDACTED:email] [REDACTED:iban] NOFORN")
    );
}

#[test]
fn redact_borrows_when_nothing_matches() {
    let rules = built_ins(ContentAction::Redact);
    let text = "Nothing to hide: order 12345, call 555-123-4567.";
    assert!(matches!(
        rules.redact(text, Direction::Prompt, Purpose::Audit),
        Cow::Borrowed(t) if t == text
    ));
    // What a deny rule refused is masked in the audit, never for inference (the request
    // never gets that far).
    let deny_only = built_ins(ContentAction::Deny);
    assert!(matches!(
        deny_only.redact(CARD, Direction::Prompt, Purpose::Inference),
        Cow::Borrowed(_)
    ));
    assert_eq!(
        deny_only.redact(CARD, Direction::Prompt, Purpose::Audit),
        "[REDACTED:card_number]"
    );
}

#[test]
fn overlapping_matches_are_replaced_once_under_the_first_name() {
    let rules = ContentRules::compile(&[
        rule("email", ContentAction::Redact),
        regex_rule("domain", r"example\.com/\w+", ContentAction::Redact),
        regex_rule("jane", r"jane", ContentAction::Redact),
    ])
    .expect("rules compile");
    assert_eq!(
        rules.redact(
            "to jane@example.com/inbox now",
            Direction::Prompt,
            Purpose::Inference
        ),
        "to [REDACTED:email] now"
    );
    assert_eq!(
        rules.redact("jane, jane@x.org", Direction::Prompt, Purpose::Inference),
        "[REDACTED:jane], [REDACTED:email]"
    );
}

#[test]
fn redact_searches_again_where_a_removed_match_hid_another() {
    let rules = built_ins(ContentAction::Redact);
    let text = "DE89370400440532013000.4111111111111111";
    assert_eq!(rules.scan(text, Direction::Prompt).findings.len(), 1);
    let redacted = rules.redact(text, Direction::Prompt, Purpose::Inference);
    assert_eq!(redacted, "[REDACTED:iban].[REDACTED:card_number]");
    assert_eq!(
        rules.scan(&redacted, Direction::Prompt),
        ContentScan::default()
    );
}

#[test]
fn rules_deserialize_from_the_policy_file() {
    #[derive(Deserialize)]
    struct File {
        content: Vec<ContentRuleConfig>,
    }
    let file: File = toml::from_str(
        r#"
        [[content]]
        detector = "card_number"
        action = "deny"

        [[content]]
        detector = "regex"
        name = "project_codename"
        pattern = "(?i)\\bproject\\s+falcon\\b"
        action = "redact"
        applies_to = "prompt"

        [[content]]
        detector = "secret_marking"
        markings = ["TOP SECRET", "SECRET//NOFORN"]
        action = "redact_in_audit"
        "#,
    )
    .expect("policy parses");
    assert_eq!(file.content[0].applies_to, Direction::Both);
    assert_eq!(file.content[1].applies_to, Direction::Prompt);
    assert_eq!(file.content[2].action, ContentAction::RedactInAudit);
    let rules = ContentRules::compile(&file.content).expect("rules compile");
    let scan = rules.scan("about project falcon", Direction::Prompt);
    assert_eq!(
        scan.findings,
        [finding("project_codename", 1, ContentAction::Redact)]
    );

    let unknown = toml::from_str::<File>(
        "[[content]]\ndetector = \"email\"\naction = \"deny\"\nseverity = 3\n",
    );
    assert!(unknown.is_err());
}

/// A text of fragments joined by separators that end every match, and what the built-in
/// detectors must make of it: the count per detector and the redacted text.
fn labelled_text() -> impl Strategy<Value = (String, Vec<(&'static str, usize)>, String)> {
    let sensitive = prop_oneof![
        prop::sample::select(vec![
            CARD,
            "4111-1111-1111-1111",
            "378282246310005",
            "5555555555554444"
        ])
        .prop_map(|s| ("card_number", s.to_owned())),
        prop::sample::select(vec![
            IBAN,
            "GB82WEST12345698765432",
            "NO9386011117947",
            "MT84MALT011000012345MTLCAST001S"
        ])
        .prop_map(|s| ("iban", s.to_owned())),
        "[a-z0-9][a-z0-9_+-]{0,8}@[a-z0-9]{1,8}(\\.[a-z]{2,6}){1,2}".prop_map(|s| ("email", s)),
        prop::sample::select(DEFAULT_MARKINGS.to_vec())
            .prop_map(|s| ("secret_marking", s.to_owned())),
    ];
    let plain = prop_oneof![
        "[a-zA-Z]{1,10}",
        "[0-9]{1,12}",
        "[äöüéß€中文字😀]{1,4}",
        prop::sample::select(vec![
            "4111 1111 1111 1112",
            "4111111111111110",
            "+49 30 1234567890",
            "2024-01-15T10:30:00Z",
            "123e4567-e89b-12d3-a456-426614174000",
            "DE89370400440532013001",
            "TOP SECRETARY",
            "user@localhost",
            "@handle",
            "a@b",
            "secret",
            "3.14159265358979",
        ])
        .prop_map(str::to_owned),
    ];
    let fragment = prop_oneof![sensitive, plain.prop_map(|p| ("", p))];
    let separator = prop::sample::select(vec![" ; ", ", ", " |\n", " (", ") "]);
    prop::collection::vec((fragment, separator), 0..12).prop_map(|parts| {
        let (mut text, mut redacted, mut counts) = (String::new(), String::new(), Vec::new());
        for ((kind, fragment), separator) in parts {
            text.push_str(&fragment);
            if kind.is_empty() {
                redacted.push_str(&fragment);
            } else {
                redacted.push_str(&format!("[REDACTED:{kind}]"));
                match counts.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((kind, 1)),
                }
            }
            text.push_str(separator);
            redacted.push_str(separator);
        }
        (text, counts, redacted)
    })
}

/// Text built from the pieces detectors care about, glued in every way.
fn tricky_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "4111",
            "1111",
            "4111111111111111",
            "DE89",
            "3704",
            "DE89370400440532013000",
            "@",
            "jane",
            "example.com",
            ".",
            ",",
            "-",
            " ",
            "+",
            "_",
            "é",
            "中",
            "TOP SECRET",
            "SECRET//",
            "NOFORN",
            "0",
            "9",
            "a",
            "Z",
            "\n",
        ])
        .prop_map(str::to_owned),
        "\\PC{1,4}",
    ];
    prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
}

proptest! {
    #[test]
    fn built_ins_count_and_redact_exactly_their_fragments(
        (text, counts, expected) in labelled_text()
    ) {
        let rules = built_ins(ContentAction::Redact);
        let scan = rules.scan(&text, Direction::Prompt);
        let mut found: Vec<(&str, usize)> =
            scan.findings.iter().map(|f| (f.detector.as_str(), f.count)).collect();
        let mut counts = counts;
        found.sort();
        counts.sort();
        prop_assert_eq!(found, counts);
        prop_assert_eq!(rules.redact(&text, Direction::Prompt, Purpose::Inference), expected);
    }

    #[test]
    fn redacted_text_holds_nothing_a_detector_would_flag(text in tricky_text()) {
        let rules = built_ins(ContentAction::Redact);
        let scan = rules.scan(&text, Direction::Answer);
        let redacted = rules.redact(&text, Direction::Answer, Purpose::Audit);
        prop_assert_eq!(matches!(redacted, Cow::Borrowed(_)), scan.findings.is_empty());
        prop_assert_eq!(rules.scan(&redacted, Direction::Answer), ContentScan::default());
        if scan.findings.is_empty() {
            prop_assert_eq!(redacted.as_ref(), text.as_str());
        }
    }

    #[test]
    fn scan_and_redact_take_any_text(text in any::<String>()) {
        let rules = ContentRules::compile(&[
            rule("card_number", ContentAction::Redact),
            rule("iban", ContentAction::Deny),
            rule("email", ContentAction::RedactInAudit),
            rule("secret_marking", ContentAction::Redact),
            regex_rule("word", r"(?i)\bfalcon\w*", ContentAction::Redact),
        ]).expect("rules compile");
        let scan = rules.scan(&text, Direction::Both);
        prop_assert!(scan.findings.iter().all(|f| f.count > 0));
        let redacted = rules.redact(&text, Direction::Both, Purpose::Audit);
        let left = rules.scan(&redacted, Direction::Both);
        prop_assert!(left.findings.iter().all(|f| f.action == ContentAction::Deny));
    }
}
