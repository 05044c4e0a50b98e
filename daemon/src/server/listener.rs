//! The department-facing listeners. Each connection passes, in order: the listener's
//! allowed source networks (checked on the bare TCP connection, so other addresses never
//! reach the TLS handshake), rustls with client certificates, then HTTP/1.1 and the API.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_http::{HttpService, TlsAcceptorConfig};
use actix_service::{
    IntoServiceFactory as _, Service as _, ServiceFactoryExt as _, apply_fn_factory, fn_service,
    map_config,
};
use actix_tls::accept::TlsError;
use actix_tls::accept::rustls_0_23::TlsStream;
use actix_web::dev::{AppConfig, Extensions};
use actix_web::middleware::from_fn;
use actix_web::rt::net::TcpStream;
use actix_web::{App, web};
use ipnet::IpNet;

use super::ServeError;
use crate::api::refusals::{RefusalBudgets, RefusalKey};
use crate::api::{self, AppState, ConnectionCertificates};
use crate::config::{ServerConfig, network_allows};

/// Builds the API server over `listeners`; it starts when awaited or spawned.
pub fn api_server(
    state: web::Data<AppState>,
    listeners: Vec<TcpListener>,
    rustls_config: rustls::ServerConfig,
    server: &ServerConfig,
) -> Result<actix_server::Server, ServeError> {
    let mut builder = actix_server::Server::build()
        // moatd handles the stop signals itself (see `stop_on_signal`).
        .disable_signals()
        .shutdown_timeout(server.shutdown_grace_secs);
    if let Some(workers) = server.workers {
        builder = builder.workers(workers);
    }
    let handshake = Duration::from_millis(server.tls_handshake_timeout_ms);
    // Failed handshakes per source address: once its budget is spent, the address's
    // connections are closed before any TLS work for the rest of the window.
    let failed_handshakes = Arc::new(RefusalBudgets::new(
        state.limits.failed_handshakes_per_window,
        Duration::from_secs(state.limits.refusal_window_secs),
    ));
    // Listeners are bound in the order of `server.listen`; networks are named by the
    // configured address (which may say port 0).
    for (listener, configured) in listeners.into_iter().zip(&server.listen) {
        let address = listener.local_addr().map_err(ServeError::Run)?;
        let networks: Arc<[IpNet]> = server.networks_for(*configured).into();
        let logged: Vec<String> = networks.iter().map(ToString::to_string).collect();
        let state = state.clone();
        let rustls_config = rustls_config.clone();
        let failed_handshakes = Arc::clone(&failed_handshakes);
        builder = builder
            .listen(format!("moat-api-{address}"), listener, move || {
                let app = App::new()
                    .app_data(state.clone())
                    // The request layers, innermost first (the last wrapped runs first);
                    // see `api::middleware`.
                    .wrap(from_fn(api::middleware::audit))
                    .wrap(from_fn(api::middleware::metrics))
                    .wrap(from_fn(api::middleware::refusals))
                    .wrap(from_fn(api::middleware::context))
                    .configure(api::routes)
                    .into_factory()
                    .map_err(|err: actix_web::Error| err.error_response());
                let http = HttpService::build()
                    .on_connect_ext(|io: &TlsStream<TcpStream>, data: &mut Extensions| {
                        capture_certificates(io, data);
                    })
                    // Host and scheme come from each request; the API uses neither.
                    .finish(map_config(app, |_| AppConfig::default()))
                    .rustls_0_23_with_config(
                        rustls_config.clone(),
                        TlsAcceptorConfig::default().handshake_timeout(handshake),
                    );
                let charged = Arc::clone(&failed_handshakes);
                let http = apply_fn_factory(http, move |io: TcpStream, service: &_| {
                    let peer = io.peer_addr().ok();
                    let connection = service.call(io);
                    let charged = Arc::clone(&charged);
                    async move {
                        let outcome = connection.await;
                        if let (Err(TlsError::Timeout | TlsError::Tls(_)), Some(peer)) =
                            (&outcome, peer)
                        {
                            charged.charge(
                                RefusalKey::Address(peer.ip()),
                                "failed_handshake",
                                false,
                                std::time::Instant::now(),
                            );
                        }
                        outcome
                    }
                })
                .map_err(|_| ());
                let networks = Arc::clone(&networks);
                let failed_handshakes = Arc::clone(&failed_handshakes);
                fn_service(move |io: TcpStream| {
                    let admitted = source_admitted(&networks, &failed_handshakes, &io, address);
                    async move { if admitted { Ok(io) } else { Err(()) } }
                })
                .and_then(http)
            })
            .map_err(|source| ServeError::Bind { address, source })?;
        tracing::info!(
            url = %format!("https://{address}"),
            networks = ?logged,
            "API listening"
        );
    }
    Ok(builder.run())
}

/// Whether the connection's source address is in the listener's networks and has not
/// spent its budget of failed handshakes. A refused connection is closed before a byte of
/// TLS is exchanged.
fn source_admitted(
    networks: &[IpNet],
    failed_handshakes: &RefusalBudgets,
    io: &TcpStream,
    listener: SocketAddr,
) -> bool {
    let Ok(peer) = io.peer_addr() else {
        return false;
    };
    if !network_allows(networks, peer.ip()) {
        tracing::info!(%peer, %listener, "connection closed: source address not in the listener's networks");
        return false;
    }
    let key = RefusalKey::Address(peer.ip());
    if failed_handshakes
        .spent(&key, std::time::Instant::now())
        .is_some()
    {
        // Debug only: a flood of connections must not fill the journal.
        tracing::debug!(%peer, "connection closed: too many failed handshakes from this address");
        return false;
    }
    true
}

/// Keeps the client's certificate chain with the connection; each request names its
/// caller from it (`api::middleware::context`). A connection without one gets 401 at every
/// request.
fn capture_certificates(stream: &TlsStream<TcpStream>, data: &mut Extensions) {
    let (_, session) = stream.get_ref();
    if let Some(chain) = session
        .peer_certificates()
        .filter(|chain| !chain.is_empty())
    {
        let owned: Vec<_> = chain.iter().map(|c| c.clone().into_owned()).collect();
        data.insert(ConnectionCertificates {
            chain: owned.into(),
            verdict: std::cell::RefCell::new(None),
        });
    }
}
