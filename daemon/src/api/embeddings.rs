//! `POST /v1/embeddings`: mean-pooled sentence vectors from an embedding model.

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;

use super::error::ApiError;
use super::guard::{self, Gate, GateRequest};
use super::openai::{
    EmbeddingData, EmbeddingInput, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage,
    EmbeddingVector,
};
use super::{AppState, Caller, RequestContext, read_json};
use crate::engine::Usage;
use moat_core::ModelTask;
use moat_core::policy::{ModelFacts, PolicyAction};

pub async fn embeddings(
    state: web::Data<AppState>,
    caller: Caller,
    context: RequestContext,
    http: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let request: EmbeddingRequest = read_json(&http, payload, &state.limits).await?;
    let (loaded, embedding) = state.embedder(&request.model, &http, &caller)?;
    let version = loaded.version_text();
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("encoding_format {other:?} is not supported; use float or base64"),
                Some("encoding_format"),
                "invalid_value",
            ));
        }
    };
    if let Some(asked) = request.dimensions
        && asked != embedding.dimensions() as u64
    {
        return Err(ApiError::invalid(
            format!(
                "dimensions is {asked}, but the model {} gives {}-wide vectors and cannot shorten them",
                request.model,
                embedding.dimensions()
            ),
            Some("dimensions"),
            "invalid_value",
        ));
    }
    let policy = state.policy.current();
    let sent: Vec<String> = match request.input {
        EmbeddingInput::One(text) => vec![text],
        EmbeddingInput::Many(texts) => texts,
    };
    let prompt_scan = guard::scan_prompt(&policy, &sent.join("\n"));
    let inputs: Vec<String> = sent
        .iter()
        .map(|text| guard::redact_for_inference(&policy, text))
        .collect();
    drop(sent);
    let prompt_text = inputs.join("\n");
    let mut gate = GateRequest {
        action: PolicyAction::Embed,
        model: Some(ModelFacts {
            name: &request.model,
            task: ModelTask::Embedding.as_str(),
            version: &version,
            ceiling: loaded.classification_ceiling.as_deref(),
        }),
        prompt_text: &prompt_text,
        prompt_scan,
        prompt_tokens: 0,
        max_tokens: 0,
    };
    // A request the policy refuses costs no tokenising.
    let guard = Gate {
        state: &state,
        caller: &caller,
        http: &http,
    };
    guard.refuse_early(&policy, &gate)?;
    let Some(place) = embedding.try_admit() else {
        return Err(ApiError::Overloaded {
            model: request.model,
        });
    };
    // Tokens are counted before the policy decides: limits charge them.
    let inputs = embedding.prepare(inputs).await?;
    gate.prompt_tokens = inputs.tokens() as u64;
    let mut admitted = guard.admit(policy, gate).await?;
    let embedded = embedding.embed(inputs, place, &admitted).await?;
    admitted.settle(0);
    state
        .metrics
        .generation_timer(&caller.identity.department, &request.model, context.started)
        .finished(Usage {
            prompt_tokens: embedded.prompt_tokens,
            completion_tokens: 0,
        });
    let data = embedded
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| EmbeddingData {
            object: "embedding",
            index,
            embedding: if base64 {
                EmbeddingVector::Base64(encode_base64(&vector))
            } else {
                EmbeddingVector::Float(vector)
            },
        })
        .collect();
    let mut response = HttpResponse::Ok().json(EmbeddingResponse {
        object: "list",
        data,
        model: &request.model,
        usage: EmbeddingUsage {
            prompt_tokens: embedded.prompt_tokens,
            total_tokens: embedded.prompt_tokens,
        },
    });
    super::name_version(&mut response, &loaded);
    Ok(response)
}

/// OpenAI's base64 form: the vector's float32 values, little-endian, base64-encoded.
fn encode_base64(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_vectors_are_little_endian_float32() {
        let encoded = encode_base64(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("valid base64");
        assert_eq!(
            bytes,
            [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
    }
}
