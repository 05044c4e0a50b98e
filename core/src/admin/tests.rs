use super::*;

#[test]
fn a_request_line_reads_as_today_with_its_protocol() {
    let line = r#"{"protocol": 1, "command": "model.canary", "model": "m@1.0.0", "percent": 5}"#;
    let read: RequestLine = serde_json::from_str(line).expect("reads");
    assert_eq!(
        read,
        RequestLine::new(Request::ModelCanary {
            model: "m@1.0.0".into(),
            percent: 5
        })
    );
    assert_eq!(read.request.action(), "model.canary");
    let written = serde_json::to_string(&read).expect("writes");
    assert_eq!(
        serde_json::from_str::<RequestLine>(&written).expect("reads"),
        read
    );
    let export = serde_json::to_value(RequestLine::new(Request::AuditExport {
        since_unix_ms: None,
        until_unix_ms: Some(5),
    }))
    .expect("writes");
    assert_eq!(
        export,
        serde_json::json!({"protocol": PROTOCOL_VERSION, "command": "audit.export",
            "since_unix_ms": null, "until_unix_ms": 5})
    );
}

#[test]
fn unknown_fields_and_commands_are_refused() {
    for line in [
        r#"{"protocol": 1, "command": "model.list", "extra": 1}"#,
        r#"{"protocol": 1, "command": "model.delete-everything"}"#,
        r#"{"protocol": 1, "command": "model.activate"}"#,
    ] {
        assert!(serde_json::from_str::<RequestLine>(line).is_err(), "{line}");
    }
}

#[test]
fn the_protocol_of_a_line_is_read_whatever_its_command() {
    assert_eq!(
        Hello::protocol_of(r#"{"protocol": 7, "command": "x"}"#),
        Some(7)
    );
    assert_eq!(
        Hello::protocol_of(r#"{"command": "status"}"#),
        Some(UNVERSIONED)
    );
    assert_eq!(Hello::protocol_of("not json"), None);
}

#[test]
fn a_protocol_mismatch_names_both_versions() {
    let line = answer_line(&Err::<(), _>(Refusal::protocol_mismatch(
        PROTOCOL_VERSION + 1,
    )));
    let moatd_side: Refusal = serde_json::from_str(&line).expect("reads");
    assert_eq!(
        moatd_side.error,
        format!(
            "moatctl speaks admin protocol {}, moatd speaks {PROTOCOL_VERSION}: install matching versions",
            PROTOCOL_VERSION + 1
        )
    );
    // moatctl reads it with its own version and moatd's.
    let read =
        read_answer::<Status>(r#"{"error": "x", "code": "protocol_mismatch", "protocol": 9}"#);
    let error = read.expect_err("refused");
    assert_eq!(
        error,
        AnswerError::ProtocolMismatch {
            moatctl: PROTOCOL_VERSION,
            moatd: 9
        }
    );
    assert_eq!(
        error.to_string(),
        format!(
            "moatctl speaks admin protocol {PROTOCOL_VERSION}, moatd speaks 9: install matching versions"
        )
    );
    assert!(matches!(
        read_acceptance(&line),
        Err(AnswerError::ProtocolMismatch { .. })
    ));
}

#[test]
fn answers_round_trip_and_keep_their_keys() {
    let removed = Removed {
        removed: "m@1.0.0".into(),
    };
    let line = answer_line(&Ok::<_, Refusal>(&removed));
    assert_eq!(line, r#"{"ok":true,"result":{"removed":"m@1.0.0"}}"#);
    assert_eq!(read_answer::<Removed>(&line), Ok(removed));
    assert_eq!(accepted_line(), r#"{"ok":true}"#);
    assert_eq!(read_acceptance(&accepted_line()), Ok(()));
    let refusal = Refusal::with_code("m@1.0.0 is active", "in_use");
    let line = answer_line(&Err::<(), _>(refusal.clone()));
    assert_eq!(line, r#"{"error":"m@1.0.0 is active","code":"in_use"}"#);
    assert_eq!(
        read_answer::<Removed>(&line),
        Err(AnswerError::Refused(refusal))
    );
    assert_eq!(
        answer_line(&Err::<(), _>(Refusal::new("no"))),
        r#"{"error":"no"}"#
    );
}

#[test]
fn an_answer_of_another_shape_is_an_error_not_a_blank() {
    let line = r#"{"ok": true, "result": {"moatd": "0.1.0", "node_id": "a"}}"#;
    let error = read_answer::<Status>(line).expect_err("fields missing");
    assert!(
        matches!(&error, AnswerError::Malformed { reason, .. } if reason.contains("uptime_secs")),
        "{error}"
    );
    assert!(matches!(
        read_answer::<Status>(r#"{"ok": true}"#),
        Err(AnswerError::Malformed { .. })
    ));
}

#[test]
fn results_keep_the_wire_shape_clients_read() {
    let ended = RolloutResult::RolledBack(RolledBack::EndedCanary {
        ended_canary: "m@2.0.0".into(),
    });
    assert_eq!(
        serde_json::to_value(&ended).expect("writes"),
        serde_json::json!({"ended_canary": "m@2.0.0"})
    );
    assert_eq!(ended.model(), None);
    let returned: RolledBack =
        serde_json::from_str(r#"{"model": "m@1.0.0", "previous": "2.0.0"}"#).expect("reads");
    assert_eq!(RolloutResult::RolledBack(returned).model(), Some("m@1.0.0"));
    let unsigned = ListedModel {
        name: "dir".into(),
        unsigned_directory: true,
        highest: None,
        versions: Vec::new(),
    };
    assert_eq!(
        serde_json::to_value(&unsigned).expect("writes"),
        serde_json::json!({"name": "dir", "unsigned_directory": true, "versions": []})
    );
    let check: CheckReport = serde_json::from_str(
        r#"{"variant": "fast", "against": "src", "passed": true,
            "greedy": {"identical_sequences": 3, "of": 4, "token_agreement": 0.9},
            "teacher_forced": {"kl_mean": 0.1, "positions": 10}}"#,
    )
    .expect("reads");
    let CheckReport::Figures(figures) = &check else {
        panic!("figures expected: {check:?}");
    };
    let greedy = figures.greedy.as_ref().expect("greedy");
    assert_eq!((greedy.identical_sequences, greedy.of), (Some(3), Some(4)));
    let written = serde_json::to_value(&check).expect("writes");
    assert_eq!(written["greedy"]["token_agreement"], 0.9);
    assert_eq!(written["teacher_forced"]["positions"], 10);
    let unreadable: CheckReport =
        serde_json::from_str(r#"{"unreadable": "check.json"}"#).expect("reads");
    assert_eq!(
        unreadable,
        CheckReport::Unreadable {
            unreadable: "check.json".into()
        }
    );
}
