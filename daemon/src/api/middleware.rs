//! The request layers, one concern each, outermost first:
//!
//! 1. [`context`]: the request's id (returned in `x-request-id`), its tracing span and its
//!    caller, named from the connection's certificates;
//! 2. [`refusals`]: a caller whose refusal budget is spent is turned away before anything
//!    else runs, and each refusal is charged to its caller;
//! 3. [`metrics`]: counts the request by endpoint, status, department and model, and logs
//!    one line for it;
//! 4. [`audit`]: starts the request's audit notes and owns its final record until a
//!    handler takes it; writes it before the response leaves, and answers 503 instead
//!    when it cannot be made durable.
//!
//! Each sees the response of the layers inside it: metrics count the 503 of a failed audit
//! record, and refusals are charged by the status the client finally gets.

use std::sync::Arc;
use std::time::Instant;

use actix_web::ResponseError as _;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpMessage as _, web};
use tracing::Instrument as _;

use super::audit_trail::{AuditNotes, FinalRecord, FinalRecordSlot, RequestOrigin};
use super::error::CLIENT_CLOSED_REQUEST;
use super::refusals::{BUDGET_SPENT, RefusalKey};
use super::routes::RouteKind;
use super::{
    ApiError, AppState, ConnectionCertificates, RequestContext, RequestIdentity, ServedModelName,
};
use crate::metrics::{Metrics, RequestLabels};
use crate::tls::{Identity, IdentityError};

const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The first layer: gives the request an id and a tracing span, names its caller, and
/// returns the id in `x-request-id`.
pub async fn context<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<B>, actix_web::Error> {
    let context = RequestContext::new();
    let span = tracing::info_span!("request", id = %context.id, method = %req.method(), path = %req.path());
    let id = HeaderValue::from_str(&context.id).ok();
    let named = name_caller(&req);
    req.extensions_mut().insert(RequestIdentity(named));
    req.extensions_mut().insert(context);
    req.extensions_mut().insert(ServedModelName::default());
    let mut response = next.call(req).instrument(span).await?;
    if let Some(id) = id {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    Ok(response)
}

/// Names the caller of a request from its connection's chain; a connection without one
/// (or a listener without client certificates) names nobody.
fn name_caller(req: &ServiceRequest) -> Result<Identity, IdentityError> {
    let state = req.app_data::<web::Data<AppState>>();
    match (req.conn_data::<ConnectionCertificates>(), state) {
        (Some(connection), Some(state)) => state
            .clients
            .identify_connection(&connection.chain, &connection.verdict),
        _ => Err(IdentityError::NoCertificate),
    }
}

/// The caller [`context`] named, if it named one.
fn identity(req: &ServiceRequest) -> Option<Identity> {
    match req.extensions().get::<RequestIdentity>() {
        Some(RequestIdentity(Ok(identity))) => Some(identity.clone()),
        _ => None,
    }
}

/// The second layer: turns away a caller whose refusal budget is spent (429, no handler
/// runs, no body is read), and charges each refusal (a 4xx the client gets) to its caller.
pub async fn refusals<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let kind = RouteKind::of(req.path());
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let key = match &state {
        Some(_) if kind.is_request() => refusal_key(identity(&req).as_ref(), &req),
        _ => None,
    };
    let (Some(state), Some(key)) = (state, key) else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    if let Some(turned_away) = turn_away(&state, &key, kind, &req) {
        return Ok(req.into_response(turned_away).map_into_right_body());
    }
    let response = next.call(req).await?;
    let status = response.status().as_u16();
    if (400..CLIENT_CLOSED_REQUEST).contains(&status) {
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
    Ok(response.map_into_left_body())
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

/// The 429 of a caller whose refusal budget is spent; the refusal is counted into the
/// caller's summary record, not recorded on its own.
fn turn_away(
    state: &AppState,
    key: &RefusalKey,
    kind: RouteKind,
    req: &ServiceRequest,
) -> Option<actix_web::HttpResponse> {
    let now = Instant::now();
    let wait = state.refusals.spent(key, now)?;
    if let Some(summary) = state.refusals.charge(key.clone(), BUDGET_SPENT, true, now) {
        state
            .audit
            .submit(summary.record(&state.audit.node().node_id));
    }
    // Counted here, and not by the metrics layer: that layer also logs each request, and
    // a flood must not fill the journal.
    state.metrics.request(RequestLabels {
        endpoint: kind.label().to_owned(),
        status: 429,
        department: identity(req).map(|i| i.department).unwrap_or_default(),
        model: String::new(),
    });
    tracing::debug!(?key, "turned away: refusal budget spent");
    let refusal = ApiError::RefusalBudgetSpent {
        retry_after: wait.as_secs().max(1),
    };
    Some(refusal.error_response())
}

/// The third layer: counts the request by endpoint, status, department and model, and
/// logs one line for it; a request dropped before its answer (the client went away) is
/// counted as 499.
pub async fn metrics<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<B>, actix_web::Error> {
    let identity = identity(&req);
    let record = RequestCount {
        metrics: req
            .app_data::<web::Data<AppState>>()
            .map(|state| Arc::clone(&state.metrics)),
        endpoint: RouteKind::of(req.path()).label(),
        department: identity.as_ref().map(|i| i.department.clone()),
        subject: identity.map(|i| i.subject),
        model: served_model_name(&req),
        span: tracing::Span::current(),
        started: Instant::now(),
    };
    let mut counting = CountOnDrop(Some(record));
    let response = next.call(req).await?;
    if let Some(record) = counting.0.take() {
        record.count(response.status().as_u16());
    }
    Ok(response)
}

/// The served model the request named, as the handler fills it in.
fn served_model_name(req: &ServiceRequest) -> ServedModelName {
    req.extensions()
        .get::<ServedModelName>()
        .cloned()
        .unwrap_or_default()
}

/// Everything needed to count and log a request, gathered before its handler runs.
struct RequestCount {
    metrics: Option<Arc<Metrics>>,
    endpoint: &'static str,
    department: Option<String>,
    subject: Option<String>,
    model: ServedModelName,
    span: tracing::Span,
    started: Instant,
}

/// Counts the request as abandoned when dropped still holding it.
struct CountOnDrop(Option<RequestCount>);

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        if let Some(record) = self.0.take() {
            record.count(CLIENT_CLOSED_REQUEST);
        }
    }
}

impl RequestCount {
    /// Counts the request and logs one line for it. For a stream, the status and duration
    /// are those of the response head; its tokens are counted when it ends.
    fn count(self, status: u16) {
        let _entered = self.span.enter();
        let model = self.model.0.borrow().clone();
        let millis = self.started.elapsed().as_millis() as u64;
        let department = self.department.unwrap_or_default();
        let subject = self.subject.unwrap_or_default();
        if status == CLIENT_CLOSED_REQUEST {
            tracing::info!(department = %department, subject = %subject, model = %model, millis, "client went away before the answer; cancelled");
        } else {
            tracing::info!(status, department = %department, subject = %subject, model = %model, millis, "answered");
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

/// The fourth layer: every department request is audited. Starts the request's audit
/// notes and its [`FinalRecord`], which this layer owns until a handler takes it (a
/// stream does); writes it with the response's status before the response leaves, and
/// answers 503 instead if it cannot be made durable. Dropped before the answer, the layer
/// hands the record in as abandoned.
pub async fn audit<B: MessageBody>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let kind = RouteKind::of(req.path());
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let Some(state) = state.filter(|_| kind.is_request()) else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let identity = identity(&req);
    let context = req.extensions().get::<RequestContext>().cloned();
    let context = context.unwrap_or_default();
    let origin = RequestOrigin {
        request_id: context.id,
        department: identity
            .as_ref()
            .map(|i| i.department.clone())
            .unwrap_or_default(),
        subject: identity.map(|i| i.subject).unwrap_or_default(),
        source_address: req
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default(),
        action: kind.audit_action(),
    };
    let notes = AuditNotes::new(Arc::clone(&state.audit), origin, context.started);
    let slot = FinalRecordSlot::new(FinalRecord::new(notes.clone()));
    let model = served_model_name(&req);
    req.extensions_mut().insert(notes.clone());
    req.extensions_mut().insert(slot.clone());
    let abandon = AbandonOnDrop(slot);
    let mut response = next.call(req).await?.map_into_left_body();
    let Some(record) = abandon.0.take() else {
        // A handler took the record and writes it itself.
        return Ok(response);
    };
    // A request refused before the policy saw it still names the served model it asked.
    notes.named_model(&model.0.borrow());
    let code = response
        .response()
        .error()
        .and_then(|e| e.as_error::<ApiError>())
        .map(|e| e.detail().code.to_owned())
        .unwrap_or_default();
    let status = response.status().as_u16();
    if let Err(refusal) = record.write(status, &code).await {
        tracing::error!(status, "the request's audit record failed; answering 503");
        let (request, _) = response.into_parts();
        response = ServiceResponse::new(request, refusal.error_response()).map_into_right_body();
    }
    Ok(response)
}

/// Hands the final record in as abandoned if this layer is dropped while it still owns it.
struct AbandonOnDrop(FinalRecordSlot);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}
