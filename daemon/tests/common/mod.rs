//! Shared by the engine tests: where setup put the runtime, the models and the Python
//! reference, and small helpers to drive an engine to the end.
//!
//! Nothing here skips a test when something is missing: a missing model or library fails
//! the test with the command that provides it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use moat_daemon::engine::runtime_library;
use moat_daemon::engine::{
    DevicePreference, Embedder, Engine, EngineSettings, FinishReason, GenerationEvent,
    GenerationRequest, OrtRuntime, SessionOptions, Usage,
};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("daemon/ has a parent")
        .to_path_buf()
}

fn provisioned(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run `bash scripts/setup.sh` first (the test command does)",
        path.display()
    );
    path
}

pub fn model_dir(name: &str) -> PathBuf {
    provisioned(repo_root().join("local/models").join(name))
}

pub fn runtime() -> Arc<OrtRuntime> {
    let lib = provisioned(repo_root().join("local/onnxruntime"));
    let located = runtime_library::locate(Some(&lib), None).expect("library located");
    OrtRuntime::load(located).expect("ONNX Runtime loads")
}

pub fn cpu_options() -> SessionOptions {
    SessionOptions {
        device: DevicePreference::Cpu,
        ..SessionOptions::default()
    }
}

pub fn load(model: &str) -> Engine {
    Engine::load_ort(
        &runtime(),
        &model_dir(model),
        &cpu_options(),
        EngineSettings::default(),
    )
    .unwrap_or_else(|e| panic!("loading {model}: {e}"))
}

/// Everything one generation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub ids: Vec<u32>,
    pub chunks: Vec<String>,
    pub reason: FinishReason,
    pub usage: Usage,
}

impl Outcome {
    pub fn text(&self) -> String {
        self.chunks.concat()
    }
}

pub fn run(engine: &Engine, request: GenerationRequest) -> Outcome {
    let mut stream = engine.generate(request).expect("request accepted");
    collect(&mut stream)
}

pub fn collect(stream: &mut moat_daemon::engine::GenerationStream) -> Outcome {
    let mut ids = Vec::new();
    let mut chunks = Vec::new();
    while let Some(event) = stream.next_blocking() {
        match event {
            GenerationEvent::Token { id, text } => {
                ids.push(id);
                chunks.push(text);
            }
            GenerationEvent::Finished { reason, usage } => {
                return Outcome {
                    ids,
                    chunks,
                    reason,
                    usage,
                };
            }
            GenerationEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("stream ended without a final event");
}

/// Greedy ids from the numpy reference (`python -m moat_model.reference`), which reads the GGUF
/// directly and shares no code with the ONNX graph.
/// Greedy ids from the plain Python onnxruntime loop (`python -m moat_model.ort_loop`) over a
/// model directory's own graph, past end-of-sequence.
pub fn python_ort_greedy(model: &str, prompt: &[u32], new_tokens: usize) -> Vec<u32> {
    let root = repo_root();
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let output = Command::new(provisioned(root.join("local/venv/bin/python")))
        .args(["-m", "moat_model.ort_loop"])
        .arg("--model")
        .arg(model_dir(model))
        .args(["--prompt-ids", &ids.join(",")])
        .args(["--max-new-tokens", &new_tokens.to_string()])
        .args(["--threads", "1", "--ignore-eos", "--json"])
        .output()
        .expect("ort_loop runs");
    generated_ids(&output, "ort_loop")
}

fn generated_ids(output: &std::process::Output, what: &str) -> Vec<u32> {
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8_lossy(&output.stdout);
    let value: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    value["generated_ids"]
        .as_array()
        .expect("generated_ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

pub fn reference_greedy(gguf: &str, prompt: &[u32], new_tokens: usize) -> Vec<u32> {
    let root = repo_root();
    let python = provisioned(root.join("local/venv/bin/python"));
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let output = Command::new(python)
        .args(["-m", "moat_model.reference"])
        .arg("--gguf")
        .arg(provisioned(root.join("local/models").join(gguf)))
        .arg("--ids")
        .arg(ids.join(","))
        .arg("--max-new-tokens")
        .arg(new_tokens.to_string())
        .output()
        .expect("reference runs");
    generated_ids(&output, "reference")
}

pub fn load_embedder(model: &str) -> Embedder {
    Embedder::load_ort(&runtime(), &model_dir(model), &cpu_options())
        .unwrap_or_else(|e| panic!("loading {model}: {e}"))
}

/// What the numpy encoder reference (`python -m moat_model.reference_encoder`) makes of some texts.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceEmbeddings {
    pub token_ids: Vec<Vec<u32>>,
    pub vectors: Vec<Vec<f32>>,
}

/// Embeddings from the numpy reference, which runs each text alone (no padding) straight
/// from the checkpoint in `local/models/{source}` and shares no code with the ONNX graph.
pub fn reference_embeddings(source: &str, texts: &[&str]) -> ReferenceEmbeddings {
    let root = repo_root();
    let python = provisioned(root.join("local/venv/bin/python"));
    let mut command = Command::new(python);
    command
        .args(["-m", "moat_model.reference_encoder"])
        .arg("--source")
        .arg(provisioned(root.join("local/models").join(source)));
    for text in texts {
        command.arg(format!("--text={text}"));
    }
    let output = command.output().expect("reference runs");
    assert!(
        output.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON line");
    let rows = |key: &str| -> Vec<serde_json::Value> {
        value[key].as_array().expect("an array of rows").clone()
    };
    ReferenceEmbeddings {
        token_ids: rows("token_ids")
            .iter()
            .map(|row| {
                let ids = row.as_array().expect("ids");
                ids.iter().map(|v| v.as_u64().expect("id") as u32).collect()
            })
            .collect(),
        vectors: rows("embeddings")
            .iter()
            .map(|row| {
                let values = row.as_array().expect("values");
                values
                    .iter()
                    .map(|v| v.as_f64().expect("float") as f32)
                    .collect()
            })
            .collect(),
    }
}

/// Largest absolute difference between two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vectors of different widths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
