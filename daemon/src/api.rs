//! The OpenAI-compatible HTTP API (actix-web), served behind mutual TLS.
//!
//! Knows nothing of ONNX: it validates requests, resolves the model by name, and talks to
//! the engine through [`Engine`] and [`Embedder`](crate::engine::Embedder). Every error
//! leaves through [`ApiError`], the one place statuses are decided. What is served (the
//! models and their serving types) belongs to `models`, which knows nothing of HTTP.

mod answer;
mod audit_trail;
mod embeddings;
mod error;
mod generate;
mod guard;
mod inference;
pub(crate) mod middleware;
mod openai;
pub(crate) mod refusals;
mod response_format;
mod routes;
mod stream;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix_web::dev::Payload;
use actix_web::web::{self, Bytes, BytesMut};
use actix_web::{FromRequest, HttpMessage as _, HttpRequest};
use futures_util::StreamExt as _;
use rustls_pki_types::CertificateDer;
use serde::de::DeserializeOwned;

pub use error::ApiError;
pub use inference::{Embedding, Generator};
pub use routes::{metrics_routes, routes};

use crate::config::LimitsConfig;
use crate::metrics::Metrics;
pub use crate::models::serving::{EmbeddingService, ServedModel};
use crate::models::serving::{LoadedModel, ServingTable};
use crate::tls::{Identity, IdentityError};

impl ServedModel {
    pub fn is_healthy(&self) -> bool {
        match self {
            ServedModel::Generator(engine) => engine.is_healthy(),
            // Runs on request threads; a failed run fails only its request.
            ServedModel::Embedder(_) => true,
        }
    }
}

/// The certificate chain (leaf first) a connection presented at its handshake, kept in the
/// connection's data, with the last verdict on it. Each request names its caller from it
/// again, with the CAs and CRLs in force at that request.
#[derive(Debug)]
pub struct ConnectionCertificates {
    pub chain: Arc<[CertificateDer<'static>]>,
    pub verdict: std::cell::RefCell<Option<crate::tls::Verdict>>,
}

/// The caller of one request, as the request's first layer named it ([`middleware::context`]).
#[derive(Debug, Clone)]
pub struct RequestIdentity(pub Result<Identity, IdentityError>);

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    /// What serves each model name now; a request resolves its version once.
    pub models: Arc<ServingTable>,
    pub limits: LimitsConfig,
    pub metrics: Arc<Metrics>,
    pub policy: Arc<crate::policy::PolicyStore>,
    pub audit: Arc<crate::audit::AuditLog>,
    /// Names each request's caller from its connection's certificates.
    pub clients: crate::tls::ClientAuthority,
    /// How often each caller may be refused before it is turned away at once.
    pub refusals: Arc<refusals::RefusalBudgets>,
}

/// The model a request named, once it is known to be served (a metrics label, so names
/// clients invent never become label values). Shared between the handler that learns it
/// and the middleware that counts the request, even when the handler is dropped.
#[derive(Debug, Clone, Default)]
pub struct ServedModelName(pub Rc<RefCell<String>>);

impl AppState {
    /// The version that answers this request (the canary's share goes to the canary).
    fn find(&self, name: &str, http: &HttpRequest) -> Result<Arc<LoadedModel>, ApiError> {
        let model = self.models.pick(name).ok_or_else(|| ApiError::NotFound {
            message: format!(
                "the model {name:?} does not exist; GET /v1/models lists the models served"
            ),
            code: "model_not_found",
        })?;
        if let Some(slot) = http.extensions().get::<ServedModelName>() {
            name.clone_into(&mut slot.0.borrow_mut());
        }
        Ok(model)
    }

    /// The engine of a text-generation model, with the version it belongs to.
    pub fn generator(
        &self,
        name: &str,
        http: &HttpRequest,
        _caller: &Caller,
    ) -> Result<(Arc<LoadedModel>, Generator), ApiError> {
        let model = self.find(name, http)?;
        match &model.served {
            ServedModel::Generator(engine) => {
                let generator = Generator::new(Arc::clone(engine));
                Ok((model, generator))
            }
            ServedModel::Embedder(_) => Err(ApiError::unsupported(
                format!("the model {name} is an embedding model; use /v1/embeddings"),
                Some("model"),
                "wrong_model_task",
            )),
        }
    }

    /// The embedder of an embedding model, with the version it belongs to.
    pub fn embedder(
        &self,
        name: &str,
        http: &HttpRequest,
        _caller: &Caller,
    ) -> Result<(Arc<LoadedModel>, Embedding), ApiError> {
        let model = self.find(name, http)?;
        match &model.served {
            ServedModel::Embedder(service) => {
                let embedding = Embedding::new(Arc::clone(service));
                Ok((model, embedding))
            }
            ServedModel::Generator(_) => Err(ApiError::unsupported(
                format!(
                    "the model {name} generates text; use /v1/chat/completions or /v1/completions"
                ),
                Some("model"),
                "wrong_model_task",
            )),
        }
    }
}

/// Names the version that answered (`x-moat-model-version: name@version`), so a client
/// or a canary check can tell versions apart.
fn name_version(response: &mut actix_web::HttpResponse, model: &LoadedModel) {
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&model.label()) {
        response.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("x-moat-model-version"),
            value,
        );
    }
}

/// The authenticated caller. Extracting it fails closed: a connection without a usable
/// identity gets 401 before its body is read.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let result = match req.extensions().get::<RequestIdentity>() {
            Some(RequestIdentity(Ok(identity))) => Ok(Caller {
                identity: identity.clone(),
            }),
            Some(RequestIdentity(Err(e))) => Err(ApiError::Unauthenticated(e.clone())),
            // No identity named for the request: never serve it.
            None => Err(ApiError::Unauthenticated(IdentityError::NoCertificate)),
        };
        std::future::ready(result)
    }
}

/// The request's id (also in the `x-request-id` response header) and arrival time.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub id: String,
    pub started: Instant,
}

impl RequestContext {
    pub fn new() -> Self {
        Self {
            id: format!("{:032x}", rand::random::<u128>()),
            started: Instant::now(),
        }
    }
}

impl Default for RequestContext {
    fn default() -> Self {
        Self::new()
    }
}

impl FromRequest for RequestContext {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let context = req.extensions().get::<RequestContext>().cloned();
        std::future::ready(Ok(context.unwrap_or_default()))
    }
}

/// Reads the whole body, refusing it with 413 as soon as it passes `limit` bytes.
pub async fn read_body(mut payload: web::Payload, limit: usize) -> Result<Bytes, ApiError> {
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| match e {
            actix_web::error::PayloadError::Overflow => ApiError::BodyTooLarge { limit },
            other => ApiError::invalid(
                format!("the request body could not be read: {other}"),
                None,
                "invalid_body",
            ),
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::BodyTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Reads the body within `limits.max_body_bytes` and `limits.body_read_timeout_ms` and
/// parses it as JSON; the request must say its body is JSON (415 otherwise), so that a
/// browser form or a stray upload is never read as a request.
pub async fn read_json<T: DeserializeOwned>(
    http: &HttpRequest,
    payload: web::Payload,
    limits: &LimitsConfig,
) -> Result<T, ApiError> {
    check_json_content_type(http)?;
    let timeout = std::time::Duration::from_millis(limits.body_read_timeout_ms);
    let body = actix_web::rt::time::timeout(timeout, read_body(payload, limits.max_body_bytes))
        .await
        .map_err(|_| ApiError::BodyTimeout {
            millis: limits.body_read_timeout_ms,
        })??;
    parse_json(&body)
}

/// `content-type: application/json` (parameters such as `charset=utf-8` allowed).
fn check_json_content_type(http: &HttpRequest) -> Result<(), ApiError> {
    let found = http
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .map(|value| value.to_str().unwrap_or("(not text)"));
    let essence = found
        .and_then(|value| value.split(';').next())
        .map(str::trim);
    match essence {
        Some(essence) if essence.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType {
            found: found.unwrap_or("(none)").chars().take(64).collect(),
        }),
    }
}

/// Parses a JSON body, with errors that say where and what.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid(
            format!(
                "the request body is not valid UTF-8 (at byte {})",
                e.valid_up_to()
            ),
            None,
            "invalid_utf8",
        )
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid(
            "the request body is empty; send a JSON object",
            None,
            "invalid_json",
        ));
    }
    serde_json::from_str(text).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "does not match the expected fields",
            _ => "is not valid JSON",
        };
        ApiError::invalid(
            format!("the request body {what}: {e}"),
            None,
            "invalid_json",
        )
    })
}
