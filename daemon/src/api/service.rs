//! Routes, the per-request middleware (request id, tracing span, request metrics), the
//! connection identity captured at handshake, and the small read-only endpoints.

use actix_web::ResponseError as _;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use std::sync::Arc;
use std::time::Instant;

use actix_web::{HttpMessage as _, HttpResponse, web};
use serde_json::json;
use tracing::Instrument as _;

use super::audit_trail::{AuditNotes, RequestOrigin};
use super::error::CLIENT_CLOSED_REQUEST;
use super::openai::{ModelCard, ModelList};
use super::refusals::{BUDGET_SPENT, RefusalKey};
use super::{
    ApiError, AppState, Caller, RequestContext, ServedModelName, embeddings, generate, guard,
};
use crate::metrics::{Metrics, RequestLabels};
use crate::tls::{Identity, IdentityError};
use actix_web::HttpRequest;
use moat_core::policy::PolicyAction;
use rustls_pki_types::CertificateDer;

/// The certificate chain (leaf first) a connection presented at its handshake, kept in the
/// connection's data, with the last verdict on it. Each request names its caller from it
/// again, with the CAs and CRLs in force at that request.
#[derive(Debug)]
pub struct ConnectionCertificates {
    pub chain: Arc<[CertificateDer<'static>]>,
    pub verdict: std::cell::RefCell<Option<crate::tls::Verdict>>,
}

/// The caller of one request, as `request_context` named it.
#[derive(Debug, Clone)]
pub struct RequestIdentity(pub Result<Identity, IdentityError>);

const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The department-facing routes.
pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route(
            "/v1/chat/completions",
            web::post().to(generate::chat_completions),
        )
        .route("/v1/completions", web::post().to(generate::completions))
        .route("/v1/embeddings", web::post().to(embeddings::embeddings))
        .route("/v1/models", web::get().to(list_models))
        .route("/v1/models/{model}", web::get().to(get_model))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .default_service(web::to(unknown_route));
}

/// The metrics listener's routes (plain HTTP, loopback by default).
pub fn metrics_routes(config: &mut web::ServiceConfig) {
    config
        .route("/metrics", web::get().to(metrics))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .default_service(web::to(unknown_route));
}

/// Who a refusal of this request is charged to: its caller, or its source address.
fn refusal_key(identity: Option<&Identity>, req: &ServiceRequest) -> Option<RefusalKey> {
    match identity {
        Some(identity) => Some(RefusalKey::Caller {
            department: identity.department.clone(),
            subject: identity.subject.clone(),
        }),
        None => req.peer_addr().map(|peer| RefusalKey::Address(peer.ip())),
    }
}

/// The 429 of a caller whose refusal budget is spent: no handler runs and no body is read;
/// the refusal is counted into the caller's summary record, not recorded on its own.
fn turn_away(
    state: &AppState,
    key: &RefusalKey,
    endpoint: &'static str,
    department: &str,
) -> Option<actix_web::HttpResponse> {
    let now = Instant::now();
    let wait = state.refusals.spent(key, now)?;
    if let Some(summary) = state.refusals.charge(key.clone(), BUDGET_SPENT, true, now) {
        state
            .audit
            .submit(summary.record(&state.audit.node().node_id));
    }
    state.metrics.request(RequestLabels {
        endpoint: endpoint.to_owned(),
        status: 429,
        department: department.to_owned(),
        model: String::new(),
    });
    // Logged at debug only: a flood must not fill the journal either.
    tracing::debug!(?key, "turned away: refusal budget spent");
    let refusal = ApiError::RefusalBudgetSpent {
        retry_after: wait.as_secs().max(1),
    };
    Some(refusal.error_response())
}

/// Names the caller of a request from its connection's chain; a connection without one
/// (or a listener without client certificates) names nobody.
fn name_caller(
    req: &ServiceRequest,
    state: Option<&web::Data<AppState>>,
) -> Result<Identity, IdentityError> {
    match (req.conn_data::<ConnectionCertificates>(), state) {
        (Some(connection), Some(state)) => state
            .clients
            .identify_connection(&connection.chain, &connection.verdict),
        _ => Err(IdentityError::NoCertificate),
    }
}

/// Gives each request an id and a tracing span, returns the id in `x-request-id`, counts
/// the request by endpoint, status, department and model, and stores its final audit
/// record before the response leaves: if that record cannot be made durable, the client
/// gets 503 instead of the response.
pub async fn request_context<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let context = RequestContext::new();
    let span = tracing::info_span!("request", id = %context.id, method = %req.method(), path = %req.path());
    let id = HeaderValue::from_str(&context.id).ok();
    let model = ServedModelName::default();
    // Held apart from the request, which the handler takes.
    let shared = req.app_data::<web::Data<AppState>>().cloned();
    let state = shared.as_ref();
    let named = name_caller(&req, state);
    let identity = named.as_ref().ok();
    let endpoint = endpoint_of(req.path());
    let department = identity.map(|i| i.department.clone()).unwrap_or_default();
    let subject = identity.map(|i| i.subject.clone()).unwrap_or_default();
    // Probes and metrics are not requests: neither audited nor refused for the budget.
    let request_state = state.filter(|_| !matches!(endpoint, "health" | "metrics"));
    let refusal_key = request_state.and_then(|_| refusal_key(identity, &req));
    if let (Some(state), Some(key)) = (state, &refusal_key)
        && let Some(turned_away) = turn_away(state, key, endpoint, &department)
    {
        let mut response = req.into_response(turned_away).map_into_right_body();
        if let Some(id) = id {
            response.headers_mut().insert(REQUEST_ID_HEADER, id);
        }
        return Ok(response);
    }
    // Every department request is audited.
    let audit = request_state.map(|state| {
        let origin = RequestOrigin {
            request_id: context.id.clone(),
            department: department.clone(),
            subject: subject.clone(),
            source_address: req
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default(),
            action: audit_action(endpoint),
        };
        AuditNotes::new(Arc::clone(&state.audit), origin, context.started)
    });
    let record = RequestRecord {
        metrics: state.map(|state| Arc::clone(&state.metrics)),
        endpoint,
        department,
        subject,
        model: model.clone(),
        audit: audit.clone(),
        span: span.clone(),
        started: Instant::now(),
    };
    req.extensions_mut().insert(RequestIdentity(named.clone()));
    req.extensions_mut().insert(context);
    req.extensions_mut().insert(model.clone());
    if let Some(audit) = &audit {
        req.extensions_mut().insert(audit.clone());
    }
    // Counts (and audits) the request as abandoned if this future is dropped before the
    // answer is ready.
    let mut guard = AbandonOnDrop(Some(record));
    let result = next.call(req).instrument(span.clone()).await;
    let mut response = result?.map_into_left_body();
    if let Some(audit) = audit.filter(|a| !a.is_streams_to_write()) {
        // A request refused before the policy saw it still names the served model it asked.
        audit.named_model(&model.0.borrow());
        let code = response
            .response()
            .error()
            .and_then(|e| e.as_error::<ApiError>())
            .map(|e| e.detail().code.to_owned())
            .unwrap_or_default();
        let status = response.status().as_u16();
        if let Err(refusal) = audit.finish(status, &code).instrument(span).await {
            tracing::error!(status, "the request's audit record failed; answering 503");
            let (request, _) = response.into_parts();
            response =
                ServiceResponse::new(request, refusal.error_response()).map_into_right_body();
        }
    }
    let record = guard.0.take();
    let status = response.status().as_u16();
    if let (Some(state), Some(key)) = (state, refusal_key)
        && (400..CLIENT_CLOSED_REQUEST).contains(&status)
    {
        let reason = response
            .response()
            .error()
            .and_then(|e| e.as_error::<ApiError>())
            .map_or("refused", |e| e.detail().code);
        if let Some(summary) = state.refusals.charge(key, reason, false, Instant::now()) {
            state
                .audit
                .submit(summary.record(&state.audit.node().node_id));
        }
    }
    if let Some(id) = id {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    if let Some(record) = record {
        record.count(response.status().as_u16());
    }
    Ok(response)
}

/// Everything needed to count and log a request, gathered before its handler runs.
struct RequestRecord {
    metrics: Option<Arc<Metrics>>,
    endpoint: &'static str,
    department: String,
    subject: String,
    model: ServedModelName,
    audit: Option<AuditNotes>,
    span: tracing::Span,
    started: Instant,
}

/// Counts the record as abandoned when dropped still holding it.
struct AbandonOnDrop(Option<RequestRecord>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some(record) = self.0.take() {
            if let Some(audit) = &record.audit {
                audit.finish_abandoned(CLIENT_CLOSED_REQUEST);
            }
            record.count(CLIENT_CLOSED_REQUEST);
        }
    }
}

/// The action an endpoint's audit records name: the policy's action names.
fn audit_action(endpoint: &'static str) -> &'static str {
    match endpoint {
        "chat" => PolicyAction::Chat.as_str(),
        "completions" => PolicyAction::Complete.as_str(),
        "embeddings" => PolicyAction::Embed.as_str(),
        "models" => PolicyAction::ListModels.as_str(),
        other => other,
    }
}

fn endpoint_of(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "completions",
        "/v1/embeddings" => "embeddings",
        "/v1/models" => "models",
        "/healthz" | "/readyz" => "health",
        "/metrics" => "metrics",
        other if other.starts_with("/v1/models/") => "models",
        _ => "other",
    }
}

impl RequestRecord {
    /// Counts the request and logs one line for it. For a stream, the status and duration
    /// are those of the response head; its tokens are counted when it ends.
    fn count(self, status: u16) {
        let _entered = self.span.enter();
        let model = self.model.0.borrow().clone();
        let millis = self.started.elapsed().as_millis() as u64;
        let department = self.department;
        if status == CLIENT_CLOSED_REQUEST {
            tracing::info!(department = %department, subject = %self.subject, model = %model, millis, "client went away before the answer; cancelled");
        } else {
            tracing::info!(status, department = %department, subject = %self.subject, model = %model, millis, "answered");
        }
        if let Some(metrics) = &self.metrics {
            metrics.request(RequestLabels {
                endpoint: self.endpoint.to_owned(),
                status,
                department,
                model,
            });
        }
    }
}

/// The policy's word on listing models (action `list_models`).
fn admit_listing(state: &AppState, caller: &Caller, http: &HttpRequest) -> Result<(), ApiError> {
    guard::admit(state, state.policy.current(), caller, http, listing())?.settle(0);
    Ok(())
}

/// What listing models asks of the gate.
fn listing() -> guard::GateRequest<'static> {
    guard::GateRequest {
        action: PolicyAction::ListModels,
        model: None,
        prompt_text: "",
        prompt_scan: Default::default(),
        prompt_tokens: 0,
        max_tokens: 0,
    }
}

async fn list_models(
    state: web::Data<AppState>,
    caller: Caller,
    http: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    admit_listing(&state, &caller, &http)?;
    let routes = state.models.snapshot();
    let data = routes.keys().map(|name| model_card(name)).collect();
    Ok(HttpResponse::Ok().json(ModelList {
        object: "list",
        data,
    }))
}

async fn get_model(
    state: web::Data<AppState>,
    caller: Caller,
    http: HttpRequest,
    name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    admit_listing(&state, &caller, &http)?;
    let routes = state.models.snapshot();
    match routes.get_key_value(name.as_str()) {
        Some((name, _)) => Ok(HttpResponse::Ok().json(model_card(name))),
        None => Err(ApiError::NotFound {
            message: format!("the model {:?} does not exist", name.as_str()),
            code: "model_not_found",
        }),
    }
}

fn model_card(name: &str) -> ModelCard<'_> {
    ModelCard {
        id: name,
        object: "model",
        created: 0,
        owned_by: "moat",
    }
}

/// Live: the process answers HTTP.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready: every model is loaded, warmed (done before the listener opens) and its engine
/// is healthy. Each model's status is shown only to callers the policy lets list models:
/// the metrics listener (any local user) and other callers learn only whether the node is
/// ready, not what it serves.
async fn readyz(state: web::Data<AppState>, http: HttpRequest) -> HttpResponse {
    let routes = state.models.snapshot();
    let models: serde_json::Map<_, _> = routes
        .iter()
        .map(|(name, route)| {
            let status = if route.loaded().all(|m| m.served.is_healthy()) {
                "ready"
            } else {
                "failing"
            };
            (name.clone(), json!(status))
        })
        .collect();
    // Without a model there is nothing to answer with: not ready.
    let ready = !routes.is_empty()
        && routes
            .values()
            .all(|route| route.loaded().all(|m| m.served.is_healthy()));
    let mut body = json!({"status": if ready { "ready" } else { "not_ready" }});
    if may_list_models(&state, &http) {
        body["models"] = serde_json::Value::Object(models);
    }
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Whether the request's caller is an identity the policy lets list models (decided
/// without an audit record: readiness probes are not requests).
fn may_list_models(state: &AppState, http: &HttpRequest) -> bool {
    let caller = match http.extensions().get::<RequestIdentity>() {
        Some(RequestIdentity(Ok(identity))) => Caller {
            identity: identity.clone(),
        },
        _ => return false,
    };
    guard::decide(&state.policy.current(), &caller, http, &listing())
        .reason
        .is_allow()
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    for (name, route) in state.models.snapshot().iter() {
        match &route.active.served {
            super::ServedModel::Generator(engine) => {
                state
                    .metrics
                    .engine_state(name, engine.queued_requests(), engine.live_sequences());
            }
            super::ServedModel::Embedder(service) => {
                state.metrics.engine_state(name, 0, service.in_flight());
            }
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.encode())
}

async fn unknown_route() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound {
        message: "no such route; the API serves /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models".into(),
        code: "unknown_route",
    })
}
