//! Golden prompts: before a version may serve, it must answer each prompt its bundle
//! carries as the bundle says (greedy decoding, so the answer is the model's, not luck's).

use std::sync::Arc;

use moat_core::bundle::{BundleManifest, BundleTask, GoldenExpectation};

use super::serving::ServedModel;
use crate::engine::{
    ChatMessage, Engine, GenerationEvent, GenerationRequest, Prompt, ResponseFormat, SamplingParams,
};

/// A golden prompt the model did not answer as its bundle says.
#[derive(Debug, thiserror::Error)]
#[error("golden prompt {index} ({prompt:?}) failed: {reason}")]
pub struct GoldenFailure {
    pub index: usize,
    pub prompt: String,
    pub reason: String,
}

/// Runs every golden prompt of `manifest` against the loaded `model`.
pub async fn check(manifest: &BundleManifest, model: &ServedModel) -> Result<usize, GoldenFailure> {
    for (index, golden) in manifest.golden.iter().enumerate() {
        let fail = |reason: String| GoldenFailure {
            index,
            prompt: golden.prompt.clone(),
            reason,
        };
        match model {
            ServedModel::Generator(engine) => {
                let (answer, _) = generate(engine, manifest, &golden.prompt, golden.max_tokens)
                    .await
                    .map_err(fail)?;
                match &golden.expect {
                    GoldenExpectation::Exact(text) if answer != *text => {
                        return Err(fail(format!("answered {answer:?}, expected {text:?}")));
                    }
                    GoldenExpectation::Pattern(pattern) if !pattern.is_match(&answer) => {
                        return Err(fail(format!(
                            "answered {answer:?}, which does not match /{pattern}/"
                        )));
                    }
                    _ => {}
                }
            }
            ServedModel::Embedder(service) => {
                let service = Arc::clone(service);
                let input = vec![golden.prompt.clone()];
                let embedded =
                    actix_web::rt::task::spawn_blocking(move || service.embedder.embed(&input))
                        .await
                        .map_err(|e| fail(e.to_string()))?
                        .map_err(|e| fail(e.to_string()))?;
                let width = manifest.model.embedding.map_or(0, |e| e.dim);
                let good = embedded
                    .vectors
                    .first()
                    .is_some_and(|v| v.len() == width && v.iter().all(|x| x.is_finite()));
                if !good {
                    return Err(fail(format!(
                        "did not embed into a finite vector of {width} values"
                    )));
                }
            }
        }
    }
    Ok(manifest.golden.len())
}

/// The greedy answer to one prompt, under the bundle's schema if it has one, and the
/// number of tokens it took.
pub(super) async fn generate(
    engine: &Arc<Engine>,
    manifest: &BundleManifest,
    prompt: &str,
    max_tokens: usize,
) -> Result<(String, usize), String> {
    let prompt = match manifest.task {
        BundleTask::Chat => Prompt::Chat(vec![ChatMessage::new("user", prompt)]),
        _ => Prompt::Text(prompt.to_owned()),
    };
    let mut request = GenerationRequest::new(prompt);
    request.max_tokens = Some(max_tokens);
    request.sampling = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: None,
    };
    if let Some(schema) = &manifest.response_schema {
        let format = ResponseFormat::JsonSchema {
            name: format!("{}-bundle", manifest.name),
            schema: schema.clone(),
        };
        let compiling = Arc::clone(engine);
        let constraint = actix_web::rt::task::spawn_blocking(move || compiling.constrain(&format))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("the bundle's response schema does not compile: {e}"))?;
        request.constraint = Some(constraint);
    }
    let mut events = engine.generate(request).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    while let Some(event) = events.next().await {
        match event {
            GenerationEvent::Token { text, .. } => answer.push_str(&text),
            GenerationEvent::Finished { usage, .. } => {
                return Ok((answer, usage.completion_tokens));
            }
            GenerationEvent::Failed(e) => return Err(e.to_string()),
        }
    }
    Err("the engine stopped before answering".into())
}
