//! The API's only way to run a model. Handlers get a [`Generator`] or an [`Embedding`]
//! from [`AppState`](super::AppState), never the engine itself, and both run inference
//! only for an [`Admitted`] request: one whose admission record is durable. Work that
//! costs time (rendering, tokenising, compiling a grammar, embedding) runs on the blocking
//! pool, never on an async worker.

use std::sync::Arc;

use actix_web::web;
use tokio::sync::OwnedSemaphorePermit;

use super::error::ApiError;
use super::guard::Admitted;
use super::response_format;
use crate::engine::{
    AnswerCheck, EmbedError, Embeddings, Engine, EngineError, GenerationRequest, GenerationStream,
    Prepared, PreparedInputs, ResponseFormat,
};
use crate::models::serving::EmbeddingService;

/// A text-generation model as the API may use it.
#[derive(Debug, Clone)]
pub struct Generator {
    engine: Arc<Engine>,
}

impl Generator {
    pub(super) fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    /// Token ids as text, so that a prompt sent as ids meets the content rules as text.
    pub fn decode(&self, ids: &[u32], model: &str) -> Result<String, ApiError> {
        self.engine
            .decode(ids)
            .map_err(|e| ApiError::from_engine(e, model))
    }

    /// Compiles `format` into the request's constraint (if one applies) and prepares the
    /// request (checked, rendered and tokenised once), on the blocking pool: a chat
    /// template is a bundle author's code and a schema may take milliseconds to compile,
    /// and neither may hold up the other connections of this worker. Returns the request
    /// ready to queue and the check its finished answer must pass.
    pub async fn prepare(
        &self,
        mut request: GenerationRequest,
        format: Option<ResponseFormat>,
        model: &str,
    ) -> Result<(Prepared, AnswerCheck), ApiError> {
        let engine = Arc::clone(&self.engine);
        let prepared = web::block(move || {
            let check = match format {
                Some(format) => {
                    let constraint = engine.constrain(&format).map_err(Refusal::Format)?;
                    let check = constraint.answer_check();
                    request.constraint = Some(constraint);
                    check
                }
                None => AnswerCheck::default(),
            };
            let prepared = engine.prepare(request).map_err(Refusal::Engine)?;
            Ok::<_, Refusal>((prepared, check))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        prepared.map_err(|refusal| match refusal {
            Refusal::Format(e) => response_format::refused(e),
            Refusal::Engine(e) => ApiError::from_engine(e, model),
        })
    }

    /// Queues an admitted request for generation.
    pub fn submit(
        &self,
        prepared: Prepared,
        _admitted: &Admitted,
    ) -> Result<GenerationStream, EngineError> {
        self.engine.submit(prepared)
    }
}

/// Why a request could not be prepared.
enum Refusal {
    Format(crate::engine::ConstraintError),
    Engine(EngineError),
}

/// An embedding model as the API may use it.
#[derive(Debug, Clone)]
pub struct Embedding {
    service: Arc<EmbeddingService>,
}

impl Embedding {
    pub(super) fn new(service: Arc<EmbeddingService>) -> Self {
        Self { service }
    }

    /// The width of the vectors it gives.
    pub fn dimensions(&self) -> usize {
        self.service.embedder.dimensions()
    }

    /// A place for one request, or `None` when the model already holds all it may.
    pub fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        self.service.try_admit()
    }

    /// Checks and tokenises the inputs once, on the blocking pool (limits charge their
    /// tokens before the policy's decision is final).
    pub async fn prepare(&self, inputs: Vec<String>) -> Result<PreparedInputs, ApiError> {
        let service = Arc::clone(&self.service);
        web::block(move || service.embedder.prepare(&inputs))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(embed_error)
    }

    /// Embeds an admitted request's inputs on the blocking pool, holding its place until
    /// the vectors are ready.
    pub async fn embed(
        &self,
        inputs: PreparedInputs,
        place: OwnedSemaphorePermit,
        _admitted: &Admitted,
    ) -> Result<Embeddings, ApiError> {
        let service = Arc::clone(&self.service);
        web::block(move || {
            let _place = place;
            service.embedder.embed_prepared(&inputs)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(embed_error)
    }
}

fn embed_error(error: EmbedError) -> ApiError {
    match error {
        EmbedError::Inference(reason) => ApiError::Internal(reason),
        other => ApiError::invalid(other.to_string(), Some("input"), "invalid_input"),
    }
}
