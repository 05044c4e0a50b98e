//! Graphs from the attacker's side, as a model directory loads them: external data that
//! reaches outside the directory (a `..` path, an absolute path, a symbolic link) and
//! operators moat does not serve are refused by moat's own check, before ONNX Runtime
//! reads the graph; the same graph with its weights in a plain file beside it loads and
//! computes what the original does. Every graph setup provides passes the check.

mod common;

use std::path::{Path, PathBuf};

use common::{cpu_options, model_dir, repo_root, runtime};
use moat_core::bundle::{ExternalDataProblem, GraphError};
use moat_daemon::engine::backend::{Backend, LogitsBatch, SequenceId, StepInput};
use moat_daemon::engine::{LoadError, ModelDirError, ModelDirectory, OrtBackend};

/// Protobuf, just enough to move one initializer's bytes out of an ONNX model.
mod pb {
    pub fn varint(mut value: u64, out: &mut Vec<u8>) {
        while value >= 0x80 {
            out.push((value as u8) | 0x80);
            value >>= 7;
        }
        out.push(value as u8);
    }

    fn read_varint(bytes: &[u8], pos: &mut usize) -> u64 {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = bytes[*pos];
            *pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        value
    }

    /// A message's fields: number, the whole field's bytes, and a length-delimited
    /// field's payload (empty for the others).
    pub fn fields(message: &[u8]) -> Vec<(u64, &[u8], &[u8])> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < message.len() {
            let start = pos;
            let key = read_varint(message, &mut pos);
            let payload = match key & 7 {
                0 => {
                    read_varint(message, &mut pos);
                    &message[pos..pos]
                }
                1 => {
                    pos += 8;
                    &message[pos..pos]
                }
                2 => {
                    let len = read_varint(message, &mut pos) as usize;
                    pos += len;
                    &message[pos - len..pos]
                }
                5 => {
                    pos += 4;
                    &message[pos..pos]
                }
                wire => panic!("wire type {wire} in an ONNX model"),
            };
            out.push((key >> 3, &message[start..pos], payload));
        }
        out
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

/// The model with its largest raw initializer's bytes moved out: the tensor now reads them
/// from `location`. Returns the new model and the bytes.
fn externalize(model: &[u8], location: &str) -> (Vec<u8>, Vec<u8>) {
    let (graph_field, graph) = pb::fields(model)
        .into_iter()
        .find(|(number, _, _)| *number == 7)
        .map(|(_, whole, payload)| (whole, payload))
        .expect("a graph");
    let raw = |tensor: &[u8]| -> Option<Vec<u8>> {
        pb::fields(tensor)
            .into_iter()
            .find(|(number, _, _)| *number == 9)
            .map(|(_, _, payload)| payload.to_vec())
    };
    let largest = pb::fields(graph)
        .into_iter()
        .filter(|(number, _, _)| *number == 5)
        .max_by_key(|(_, _, tensor)| raw(tensor).map_or(0, |r| r.len()))
        .map(|(_, whole, _)| whole)
        .expect("an initializer");
    let mut new_graph = Vec::new();
    let mut data = Vec::new();
    for (number, whole, payload) in pb::fields(graph) {
        if whole.as_ptr() != largest.as_ptr() || number != 5 {
            new_graph.extend_from_slice(whole);
            continue;
        }
        data = raw(payload).expect("raw data");
        let mut tensor = Vec::new();
        for (number, field, _) in pb::fields(payload) {
            if number != 9 {
                tensor.extend_from_slice(field);
            }
        }
        for (key, value) in [
            ("location", location.to_owned()),
            ("offset", "0".to_owned()),
            ("length", data.len().to_string()),
        ] {
            let mut entry = pb::bytes(1, key.as_bytes());
            entry.extend(pb::bytes(2, value.as_bytes()));
            tensor.extend(pb::bytes(13, &entry));
        }
        tensor.extend(pb::number(14, 1));
        new_graph.extend(pb::bytes(5, &tensor));
    }
    let mut out = Vec::new();
    for (_, whole, _) in pb::fields(model) {
        if whole.as_ptr() == graph_field.as_ptr() {
            out.extend(pb::bytes(7, &new_graph));
        } else {
            out.extend_from_slice(whole);
        }
    }
    (out, data)
}

/// A copy of the fixture model in `<tmp>/models/fixture` whose graph is `graph`.
fn fixture_copy(tmp: &Path, graph: &[u8]) -> PathBuf {
    let dir = tmp.join("models/fixture");
    std::fs::create_dir_all(&dir).expect("creates");
    for file in ["tokenizer.json", "moat-model.json"] {
        std::fs::copy(model_dir("fixture-fused").join(file), dir.join(file)).expect("copies");
    }
    std::fs::write(dir.join("model.onnx"), graph).expect("writes");
    dir
}

fn fixture_graph() -> Vec<u8> {
    std::fs::read(model_dir("fixture-fused").join("model.onnx")).expect("fixture graph")
}

fn load(dir: &Path) -> Result<OrtBackend, LoadError> {
    let directory = ModelDirectory::open(dir).expect("a model directory");
    OrtBackend::load(&runtime(), &directory, &cpu_options())
}

/// The graph check's refusal; any other outcome (ONNX Runtime's own error included) fails.
fn refusal(dir: &Path) -> GraphError {
    match load(dir) {
        Err(LoadError::Model(ModelDirError::GraphRefused { source, .. })) => *source,
        Err(other) => panic!("refused by something else than moat's graph check: {other}"),
        Ok(_) => panic!("the graph loaded"),
    }
}

fn logits(backend: &mut OrtBackend) -> Vec<f32> {
    backend.start_sequence(SequenceId(1), 64).expect("starts");
    let mut out = LogitsBatch::default();
    let tokens = [5, 6, 7, 8];
    backend
        .step(
            &[StepInput {
                sequence: SequenceId(1),
                tokens: &tokens,
            }],
            &mut out,
        )
        .expect("runs");
    out.row(0).to_vec()
}

#[test]
fn every_graph_setup_provides_passes_the_graph_check() {
    let models = repo_root().join("local/models");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&models).expect("local/models") {
        let dir = entry.expect("entry").path();
        if !dir.join("model.onnx").is_file() {
            continue;
        }
        let directory = ModelDirectory::open(&dir).expect("a model directory");
        if let Err(e) = directory.vet_graph() {
            panic!("{}: {e}", dir.display());
        }
        checked.push(dir.file_name().unwrap_or_default().to_owned());
    }
    checked.sort();
    assert!(
        checked.len() >= 6,
        "setup provides the fixtures and demo models: {checked:?}"
    );
}

#[test]
fn weights_beside_the_graph_load_and_compute_what_the_original_does() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (graph, data) = externalize(&fixture_graph(), "model.onnx.data");
    let dir = fixture_copy(tmp.path(), &graph);
    std::fs::write(dir.join("model.onnx.data"), &data).expect("writes");
    let inventory = ModelDirectory::open(&dir)
        .expect("opens")
        .vet_graph()
        .expect("passes");
    assert_eq!(inventory.external.len(), 1);
    assert_eq!(inventory.external[0].length, Some(data.len() as u64));

    let mut external = load(&dir).expect("loads");
    let mut original = load(&model_dir("fixture-fused")).expect("loads");
    assert_eq!(logits(&mut external), logits(&mut original));
}

#[test]
fn weights_outside_the_model_directory_are_refused_before_onnx_runtime_reads_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // What a graph would like to read: a key beside the model store, where `../../` from
    // the model directory leads.
    let (_, data) = externalize(&fixture_graph(), "x");
    let key = tmp.path().join("audit-signing.key");
    std::fs::write(&key, &data).expect("writes");
    let absolute = key.to_str().expect("UTF-8 path").to_owned();
    for (location, problem) in [
        (
            "../../audit-signing.key",
            ExternalDataProblem::ParentDirectory,
        ),
        (absolute.as_str(), ExternalDataProblem::Absolute),
        ("missing.data", ExternalDataProblem::Missing),
    ] {
        let (graph, _) = externalize(&fixture_graph(), location);
        let dir = fixture_copy(tmp.path(), &graph);
        let refused = refusal(&dir);
        assert!(
            refused.to_string().contains(&format!("{location:?}")),
            "the error names the location: {refused}"
        );
        assert!(
            matches!(&refused, GraphError::ExternalData { problem: p, .. } if *p == problem),
            "{location}: {refused}"
        );
    }

    // A link inside the directory to the file outside it, and a link on the way there.
    let (graph, _) = externalize(&fixture_graph(), "weights/model.onnx.data");
    let dir = fixture_copy(tmp.path(), &graph);
    std::os::unix::fs::symlink(tmp.path(), dir.join("weights")).expect("links");
    std::fs::copy(&key, tmp.path().join("model.onnx.data")).expect("copies");
    assert!(matches!(
        refusal(&dir),
        GraphError::ExternalData {
            problem: ExternalDataProblem::Symlink,
            ..
        }
    ));
    let (graph, _) = externalize(&fixture_graph(), "model.onnx.data");
    let dir = fixture_copy(tmp.path(), &graph);
    std::fs::remove_file(dir.join("weights")).expect("removes");
    std::os::unix::fs::symlink(&key, dir.join("model.onnx.data")).expect("links");
    assert!(matches!(
        refusal(&dir),
        GraphError::ExternalData {
            problem: ExternalDataProblem::Symlink,
            ..
        }
    ));
}

#[test]
fn custom_operators_are_refused_before_onnx_runtime_reads_the_graph() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // An operator set of a custom domain, as a graph that needs a custom op library has.
    let mut graph = fixture_graph();
    let mut opset = pb::bytes(1, b"ai.custom.ops");
    opset.extend(pb::number(2, 1));
    graph.extend(pb::bytes(8, &opset));
    let dir = fixture_copy(tmp.path(), &graph);
    assert_eq!(
        refusal(&dir),
        GraphError::DomainNotServed {
            domain: "ai.custom.ops".into()
        }
    );

    // A second graph field merges into the first as protobuf reads it: its node counts.
    let mut node = pb::bytes(3, b"exfiltrate");
    node.extend(pb::bytes(4, b"ReadFile"));
    node.extend(pb::bytes(7, b"com.microsoft"));
    let mut graph = fixture_graph();
    graph.extend(pb::bytes(7, &pb::bytes(1, &node)));
    let dir = fixture_copy(tmp.path(), &graph);
    assert!(matches!(
        refusal(&dir),
        GraphError::OperatorNotServed { ref op_type, .. } if op_type == "ReadFile"
    ));
}
