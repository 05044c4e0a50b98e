//! Every route moat serves, declared once: the path, what it is (its metrics label and the
//! action its audit records name), and the handler. The listeners register routes from
//! these tables and the middleware names a request's endpoint from them, so a new route
//! cannot be served without a label. Also the small read-only endpoints.

use actix_web::{HttpMessage as _, HttpRequest, HttpResponse, web};
use moat_core::policy::PolicyAction;
use serde_json::json;

use super::openai::{ModelCard, ModelList};
use super::{
    ApiError, AppState, Caller, RequestIdentity, ServedModel, embeddings, generate, guard,
};

/// What a route serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Chat,
    Completions,
    Embeddings,
    ListModels,
    GetModel,
    Live,
    Ready,
    Metrics,
    /// No route: answered 404.
    Unknown,
}

/// One route: a path (a trailing `{name}` segment matches any rest) and what it serves.
#[derive(Debug)]
struct Route {
    path: &'static str,
    kind: RouteKind,
}

/// The department-facing routes, behind mutual TLS.
const DEPARTMENT_ROUTES: &[Route] = &[
    Route {
        path: "/v1/chat/completions",
        kind: RouteKind::Chat,
    },
    Route {
        path: "/v1/completions",
        kind: RouteKind::Completions,
    },
    Route {
        path: "/v1/embeddings",
        kind: RouteKind::Embeddings,
    },
    Route {
        path: "/v1/models",
        kind: RouteKind::ListModels,
    },
    Route {
        path: "/v1/models/{model}",
        kind: RouteKind::GetModel,
    },
];

/// The metrics listener's own routes (plain HTTP, loopback by default).
const METRICS_ROUTES: &[Route] = &[Route {
    path: "/metrics",
    kind: RouteKind::Metrics,
}];

/// The probes, on both listeners.
const PROBE_ROUTES: &[Route] = &[
    Route {
        path: "/healthz",
        kind: RouteKind::Live,
    },
    Route {
        path: "/readyz",
        kind: RouteKind::Ready,
    },
];

impl RouteKind {
    /// The route a path asks for, on either listener.
    pub fn of(path: &str) -> Self {
        DEPARTMENT_ROUTES
            .iter()
            .chain(METRICS_ROUTES)
            .chain(PROBE_ROUTES)
            .find(|route| route.matches(path))
            .map_or(RouteKind::Unknown, |route| route.kind)
    }

    /// The `endpoint` label of the request metrics.
    pub fn label(self) -> &'static str {
        match self {
            RouteKind::Chat => "chat",
            RouteKind::Completions => "completions",
            RouteKind::Embeddings => "embeddings",
            RouteKind::ListModels | RouteKind::GetModel => "models",
            RouteKind::Live | RouteKind::Ready => "health",
            RouteKind::Metrics => "metrics",
            RouteKind::Unknown => "other",
        }
    }

    /// Whether a request to it is a department's request: audited, and charged to the
    /// caller's refusal budget. Probes and metrics are neither.
    pub fn is_request(self) -> bool {
        !matches!(
            self,
            RouteKind::Live | RouteKind::Ready | RouteKind::Metrics
        )
    }

    /// The action its audit records name: the policy's action names.
    pub fn audit_action(self) -> &'static str {
        match self {
            RouteKind::Chat => PolicyAction::Chat.as_str(),
            RouteKind::Completions => PolicyAction::Complete.as_str(),
            RouteKind::Embeddings => PolicyAction::Embed.as_str(),
            RouteKind::ListModels | RouteKind::GetModel => PolicyAction::ListModels.as_str(),
            other => other.label(),
        }
    }

    fn route(self) -> actix_web::Route {
        match self {
            RouteKind::Chat => web::post().to(generate::chat_completions),
            RouteKind::Completions => web::post().to(generate::completions),
            RouteKind::Embeddings => web::post().to(embeddings::embeddings),
            RouteKind::ListModels => web::get().to(list_models),
            RouteKind::GetModel => web::get().to(get_model),
            RouteKind::Live => web::get().to(healthz),
            RouteKind::Ready => web::get().to(readyz),
            RouteKind::Metrics => web::get().to(metrics),
            RouteKind::Unknown => web::to(unknown_route),
        }
    }
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        match self.path.split_once('{') {
            Some((prefix, _)) => path.starts_with(prefix),
            None => path == self.path,
        }
    }
}

/// Registers the department-facing routes.
pub fn routes(config: &mut web::ServiceConfig) {
    register(config, &[DEPARTMENT_ROUTES, PROBE_ROUTES]);
}

/// Registers the metrics listener's routes.
pub fn metrics_routes(config: &mut web::ServiceConfig) {
    register(config, &[METRICS_ROUTES, PROBE_ROUTES]);
}

fn register(config: &mut web::ServiceConfig, tables: &[&[Route]]) {
    for route in tables.iter().copied().flatten() {
        config.route(route.path, route.kind.route());
    }
    config.default_service(RouteKind::Unknown.route());
}

/// The policy's word on listing models (action `list_models`).
fn permit_listing(state: &AppState, caller: &Caller, http: &HttpRequest) -> Result<(), ApiError> {
    let gate = guard::Gate {
        state,
        caller,
        http,
    };
    gate.permit(state.policy.current(), listing())
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
    permit_listing(&state, &caller, &http)?;
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
    permit_listing(&state, &caller, &http)?;
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
            ServedModel::Generator(engine) => {
                state
                    .metrics
                    .engine_state(name, engine.queued_requests(), engine.live_sequences());
                state.metrics.prefix_cache(name, engine.prefix_cache());
            }
            ServedModel::Embedder(service) => {
                state.metrics.engine_state(name, 0, service.in_flight());
            }
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.encode())
}

/// Every other path: 404, naming the API's routes.
async fn unknown_route() -> Result<HttpResponse, ApiError> {
    let served: Vec<&str> = DEPARTMENT_ROUTES
        .iter()
        .map(|route| route.path)
        .filter(|path| path.starts_with("/v1/") && !path.contains('{'))
        .collect();
    let listed = match served.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(ApiError::NotFound {
        message: format!("no such route; the API serves {listed}"),
        code: "unknown_route",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_their_route_on_either_listener() {
        for (path, label) in [
            ("/v1/chat/completions", "chat"),
            ("/v1/completions", "completions"),
            ("/v1/embeddings", "embeddings"),
            ("/v1/models", "models"),
            ("/v1/models/smollm2", "models"),
            ("/healthz", "health"),
            ("/readyz", "health"),
            ("/metrics", "metrics"),
            ("/v1/chat", "other"),
            ("/", "other"),
        ] {
            assert_eq!(RouteKind::of(path).label(), label, "{path}");
        }
        assert!(!RouteKind::of("/readyz").is_request());
        assert!(RouteKind::of("/nope").is_request());
    }
}
