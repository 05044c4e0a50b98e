//! Graphs from the attacker's side: custom operators, hidden subgraphs and external data
//! that reaches outside the bundle are refused, and no bytes make the reader panic.

use proptest::prelude::*;

use super::*;

/// Protobuf written by hand: just the fields these tests need.
mod pb {
    pub fn varint(mut value: u64, out: &mut Vec<u8>) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    pub fn bytes(number: u64, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(number << 3 | 2, &mut out);
        varint(data.len() as u64, &mut out);
        out.extend_from_slice(data);
        out
    }

    pub fn number(number: u64, value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint(number << 3, &mut out);
        varint(value, &mut out);
        out
    }
}

fn node(op_type: &str, domain: &str, attributes: &[Vec<u8>]) -> Vec<u8> {
    let mut out = pb::bytes(3, format!("/{op_type}").as_bytes());
    out.extend(pb::bytes(4, op_type.as_bytes()));
    out.extend(pb::bytes(7, domain.as_bytes()));
    for attribute in attributes {
        out.extend(pb::bytes(5, attribute));
    }
    out
}

fn graph(nodes: &[Vec<u8>], initializers: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for n in nodes {
        out.extend(pb::bytes(1, n));
    }
    for t in initializers {
        out.extend(pb::bytes(5, t));
    }
    out
}

fn model_with(graph: &[u8], domains: &[&str]) -> Vec<u8> {
    let mut out = pb::number(1, 8);
    for domain in domains {
        let mut opset = pb::bytes(1, domain.as_bytes());
        opset.extend(pb::number(2, 17));
        out.extend(pb::bytes(8, &opset));
    }
    out.extend(pb::bytes(7, graph));
    out
}

fn model(graph: &[u8]) -> Vec<u8> {
    model_with(graph, &["", "com.microsoft"])
}

/// A tensor with raw data, or with `external` entries (and marked external when any).
fn tensor(name: &str, external: &[(&str, &str)]) -> Vec<u8> {
    let mut out = pb::bytes(8, name.as_bytes());
    if external.is_empty() {
        out.extend(pb::bytes(9, &[0; 16]));
    }
    for (key, value) in external {
        let mut entry = pb::bytes(1, key.as_bytes());
        entry.extend(pb::bytes(2, value.as_bytes()));
        out.extend(pb::bytes(13, &entry));
    }
    if !external.is_empty() {
        out.extend(pb::number(14, 1));
    }
    out
}

fn graph_attribute(name: &str, number: u64, g: &[u8]) -> Vec<u8> {
    let mut out = pb::bytes(1, name.as_bytes());
    out.extend(pb::bytes(number, g));
    out
}

/// The shape of the fused graphs: standard and com.microsoft operators, raw weights.
fn fused() -> Vec<u8> {
    graph(
        &[
            node("Gather", "", &[]),
            node("SimplifiedLayerNormalization", "", &[]),
            node("MatMulNBits", "com.microsoft", &[]),
            node("GroupQueryAttention", "com.microsoft", &[]),
            node("SkipSimplifiedLayerNormalization", "com.microsoft", &[]),
            node("MatMul", "ai.onnx", &[]),
        ],
        &[tensor("model.embed_tokens.weight", &[])],
    )
}

fn weights(location: &str) -> Vec<u8> {
    tensor(
        "lm_head.weight",
        &[("location", location), ("offset", "0"), ("length", "16")],
    )
}

fn refusal(model: &[u8]) -> GraphError {
    inspect(model).expect_err("refused")
}

fn external_problem(model: &[u8]) -> (String, ExternalDataProblem) {
    match refusal(model) {
        GraphError::ExternalData {
            location, problem, ..
        } => (location, problem),
        other => panic!("refused for another reason: {other}"),
    }
}

fn listed(path: &str, size: u64) -> FileEntry {
    FileEntry {
        path: path.to_owned(),
        size,
        sha256: [0; 32],
    }
}

#[test]
fn a_graph_of_served_operators_passes_and_lists_its_external_data() {
    assert_eq!(inspect(&model(&fused())), Ok(GraphInventory::default()));
    let mut g = fused();
    g.extend(pb::bytes(5, &weights("model.onnx.data")));
    let inventory = inspect(&model(&g)).expect("served");
    assert_eq!(
        inventory.external,
        vec![ExternalData {
            tensor: "lm_head.weight".into(),
            location: "model.onnx.data".into(),
            offset: 0,
            length: Some(16),
        }]
    );
    assert_eq!(
        inventory.check_listed(&[listed("model.onnx.data", 16)]),
        Ok(())
    );
}

#[test]
fn operators_outside_the_allow_list_are_refused_by_name() {
    for (op_type, domain) in [
        ("ReadFile", "evil.custom"),
        ("ImageDecoder", ""),
        ("RegexFullMatch", "ai.onnx"),
        ("GroupQueryAttention", ""),
        ("LabelEncoder", "ai.onnx.ml"),
    ] {
        let g = graph(&[node("Add", "", &[]), node(op_type, domain, &[])], &[]);
        assert_eq!(
            refusal(&model(&g)),
            GraphError::OperatorNotServed {
                node: format!("/{op_type}"),
                domain: domain.into(),
                op_type: op_type.into(),
            }
        );
    }
}

#[test]
fn a_custom_operator_domain_is_refused_even_unused() {
    let refused = refusal(&model_with(&fused(), &["", "com.microsoft", "my.ops"]));
    assert_eq!(
        refused,
        GraphError::DomainNotServed {
            domain: "my.ops".into()
        }
    );
    assert!(refused.to_string().contains("custom operator library"));
}

#[test]
fn model_local_functions_are_refused() {
    let mut m = model(&fused());
    let mut function = pb::bytes(1, b"MyAttention");
    function.extend(pb::bytes(7, &node("Add", "", &[])));
    m.extend(pb::bytes(25, &function));
    assert_eq!(
        refusal(&m),
        GraphError::LocalFunction {
            name: "MyAttention".into()
        }
    );
}

#[test]
fn subgraphs_are_held_to_the_same_rules() {
    let hidden = graph(&[node("Exec", "evil.custom", &[])], &[]);
    // If's branch (g), Loop's body among graphs, and two levels down.
    let nested = graph(
        &[node(
            "If",
            "",
            &[graph_attribute("then_branch", 6, &hidden)],
        )],
        &[],
    );
    for attribute in [
        graph_attribute("then_branch", 6, &hidden),
        graph_attribute("body", 11, &hidden),
        graph_attribute("else_branch", 6, &nested),
    ] {
        let g = graph(&[node("If", "", &[attribute])], &[]);
        assert!(matches!(
            refusal(&model(&g)),
            GraphError::OperatorNotServed { ref op_type, .. } if op_type == "Exec"
        ));
    }
    // External data inside a subgraph's initializer.
    let inner = graph(&[node("Add", "", &[])], &[weights("../../etc/shadow")]);
    let g = graph(
        &[node("Loop", "", &[graph_attribute("body", 6, &inner)])],
        &[],
    );
    assert_eq!(
        external_problem(&model(&g)),
        (
            "../../etc/shadow".to_owned(),
            ExternalDataProblem::ParentDirectory
        )
    );
}

#[test]
fn deeply_nested_subgraphs_are_refused_without_exhausting_the_stack() {
    let mut g = graph(&[node("Add", "", &[])], &[]);
    for _ in 0..1_000 {
        g = graph(
            &[node("If", "", &[graph_attribute("then_branch", 6, &g)])],
            &[],
        );
    }
    assert_eq!(refusal(&model(&g)), GraphError::TooDeep);
    let mut g = graph(&[node("Add", "", &[])], &[]);
    for _ in 0..MAX_GRAPH_DEPTH {
        g = graph(
            &[node("If", "", &[graph_attribute("then_branch", 6, &g)])],
            &[],
        );
    }
    assert_eq!(inspect(&model(&g)), Ok(GraphInventory::default()));
}

#[test]
fn external_data_outside_the_model_is_refused_naming_its_location() {
    for (location, problem) in [
        (
            "../../audit-signing.key",
            ExternalDataProblem::ParentDirectory,
        ),
        ("weights/../../key", ExternalDataProblem::ParentDirectory),
        ("/etc/moat/audit-signing.key", ExternalDataProblem::Absolute),
        ("*/_ORT_MEM_ADDR_/*", ExternalDataProblem::MemoryAddress),
        ("", ExternalDataProblem::NotPlain),
        ("./model.onnx.data", ExternalDataProblem::NotPlain),
        ("data//weights", ExternalDataProblem::NotPlain),
        ("weights\0.bin", ExternalDataProblem::NotPlain),
    ] {
        let mut g = fused();
        g.extend(pb::bytes(5, &weights(location)));
        let refused = refusal(&model(&g));
        assert_eq!(
            refused,
            GraphError::ExternalData {
                tensor: "lm_head.weight".into(),
                location: location.into(),
                problem,
            },
            "{location:?}"
        );
        assert!(
            refused.to_string().contains(&format!("{location:?}")),
            "{refused}"
        );
    }
}

#[test]
fn every_tensor_that_can_hold_external_data_is_checked() {
    let bad = weights("/proc/self/mem");
    let absolute = || ("/proc/self/mem".to_owned(), ExternalDataProblem::Absolute);
    // A Constant node's value, a sparse initializer's values and indices, a training graph.
    let constant = graph(
        &[node(
            "Constant",
            "",
            &[{
                let mut a = pb::bytes(1, b"value");
                a.extend(pb::bytes(5, &bad));
                a
            }],
        )],
        &[],
    );
    assert_eq!(external_problem(&model(&constant)), absolute());
    for part in [1, 2] {
        let mut g = fused();
        g.extend(pb::bytes(15, &pb::bytes(part, &bad)));
        assert_eq!(external_problem(&model(&g)), absolute());
    }
    let mut m = model(&fused());
    m.extend(pb::bytes(
        20,
        &pb::bytes(1, &graph(&[], std::slice::from_ref(&bad))),
    ));
    assert_eq!(external_problem(&m), absolute());
    // Entries without the external marker are checked all the same, and so is every
    // location a tensor names.
    let mut unmarked = pb::bytes(8, b"w");
    let mut entry = pb::bytes(1, b"location");
    entry.extend(pb::bytes(2, b"/etc/passwd"));
    unmarked.extend(pb::bytes(13, &entry));
    let g = graph(&[], &[unmarked]);
    assert_eq!(
        external_problem(&model(&g)).1,
        ExternalDataProblem::Absolute
    );
    let two = tensor(
        "w",
        &[("location", "model.onnx.data"), ("location", "../key")],
    );
    assert_eq!(
        external_problem(&model(&graph(&[], &[two]))).1,
        ExternalDataProblem::ParentDirectory
    );
}

#[test]
fn a_marked_tensor_without_a_location_or_with_a_bad_range_is_refused() {
    let mut no_location = pb::bytes(8, b"w");
    no_location.extend(pb::number(14, 1));
    assert_eq!(
        external_problem(&model(&graph(&[], &[no_location]))).1,
        ExternalDataProblem::NoLocation
    );
    for (key, value) in [("offset", "-1"), ("length", "12abc"), ("offset", " 4")] {
        let t = tensor("w", &[("location", "model.onnx.data"), (key, value)]);
        assert!(matches!(
            external_problem(&model(&graph(&[], &[t]))).1,
            ExternalDataProblem::BadNumber { .. }
        ));
    }
}

#[test]
fn a_bundle_graph_reads_only_listed_files_within_their_size() {
    let mut g = fused();
    g.extend(pb::bytes(5, &weights("model.onnx.data")));
    let inventory = inspect(&model(&g)).expect("served");
    let problem = |files: &[FileEntry]| match inventory.check_listed(files) {
        Err(GraphError::ExternalData { problem, .. }) => problem,
        other => panic!("not refused for its external data: {other:?}"),
    };
    assert_eq!(
        problem(&[listed("model.onnx", 100)]),
        ExternalDataProblem::NotListed
    );
    assert_eq!(
        problem(&[listed("model.onnx.data", 15)]),
        ExternalDataProblem::BeyondFile {
            offset: 0,
            end: 16,
            size: 15
        }
    );
    let far = ExternalData {
        tensor: "w".into(),
        location: "d".into(),
        offset: u64::MAX,
        length: Some(2),
    };
    assert!(far.check_range(u64::MAX).is_err());
}

#[test]
fn a_later_field_replaces_an_earlier_one_as_onnx_runtime_reads_it() {
    let mut sneaky = node("Add", "", &[]);
    sneaky.extend(pb::bytes(7, b"evil.custom"));
    assert!(matches!(
        refusal(&model(&graph(&[sneaky], &[]))),
        GraphError::OperatorNotServed { ref domain, .. } if domain == "evil.custom"
    ));
    let mut fixed = node("Exec", "evil.custom", &[]);
    fixed.extend(pb::bytes(4, b"Add"));
    fixed.extend(pb::bytes(7, b""));
    assert_eq!(
        inspect(&model(&graph(&[fixed], &[]))),
        Ok(GraphInventory::default())
    );
}

#[test]
fn names_from_the_graph_are_shortened_in_errors() {
    let long = "x".repeat(10_000);
    let g = graph(&[node(&long, "", &[])], &[]);
    let GraphError::OperatorNotServed { op_type, .. } = refusal(&model(&g)) else {
        panic!("refused for its operator");
    };
    assert_eq!(op_type.len(), SHOWN_CHARS + 3);
}

#[test]
fn what_is_not_a_model_is_refused() {
    assert_eq!(refusal(b""), GraphError::NoGraph);
    assert_eq!(refusal(&pb::number(1, 8)), GraphError::NoGraph);
    let m = model(&fused());
    assert!(matches!(
        refusal(&m[..m.len() - 1]),
        GraphError::Malformed { .. }
    ));
    // A graph field that is a number, not a message.
    assert!(matches!(
        refusal(&pb::number(7, 1)),
        GraphError::Malformed { offset: 0, .. }
    ));
    let mut t = pb::bytes(8, b"w");
    t.extend(pb::bytes(14, b"1"));
    assert!(matches!(
        refusal(&model(&graph(&[], &[t]))),
        GraphError::Malformed { .. }
    ));
}

proptest! {
    #[test]
    fn no_bytes_make_the_check_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = inspect(&bytes);
    }

    #[test]
    fn no_damage_to_a_real_model_makes_the_check_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut g = fused();
        g.extend(pb::bytes(5, &weights("model.onnx.data")));
        let inner = graph(&[node("Add", "", &[])], &[weights("x")]);
        g.extend(pb::bytes(1, &node("If", "", &[graph_attribute("then_branch", 6, &inner)])));
        let mut m = model(&g);
        for (index, byte) in edits {
            let at = index.index(m.len());
            m[at] = byte;
        }
        let keep = cut.index(m.len() + 1);
        let _ = inspect(&m[..keep]);
    }
}
