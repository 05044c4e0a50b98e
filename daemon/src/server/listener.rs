//! The department-facing listeners. Each connection passes, in order: the listener's
//! allowed source networks (checked on the bare TCP connection, so other addresses never
//! reach the TLS handshake), rustls with client certificates, then HTTP/1.1 and the API.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_http::{HttpService, TlsAcceptorConfig};
use actix_service::{IntoServiceFactory as _, ServiceFactoryExt as _, fn_service, map_config};
use actix_tls::accept::rustls_0_23::TlsStream;
use actix_web::dev::{AppConfig, Extensions};
use actix_web::middleware::from_fn;
use actix_web::rt::net::TcpStream;
use actix_web::{App, web};
use ipnet::IpNet;

use super::ServeError;
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
    // Listeners are bound in the order of `server.listen`; networks are named by the
    // configured address (which may say port 0).
    for (listener, configured) in listeners.into_iter().zip(&server.listen) {
        let address = listener.local_addr().map_err(ServeError::Run)?;
        let networks: Arc<[IpNet]> = server.networks_for(*configured).into();
        let logged: Vec<String> = networks.iter().map(ToString::to_string).collect();
        let state = state.clone();
        let rustls_config = rustls_config.clone();
        builder = builder
            .listen(format!("moat-api-{address}"), listener, move || {
                let app = App::new()
                    .app_data(state.clone())
                    .wrap(from_fn(api::request_context))
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
                    )
                    .map_err(|_| ());
                let networks = Arc::clone(&networks);
                fn_service(move |io: TcpStream| {
                    let admitted = source_admitted(&networks, &io, address);
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

/// Whether the connection's source address is in the listener's networks. A refused
/// connection is closed before a byte of TLS is exchanged.
fn source_admitted(networks: &[IpNet], io: &TcpStream, listener: SocketAddr) -> bool {
    let Ok(peer) = io.peer_addr() else {
        return false;
    };
    let admitted = network_allows(networks, peer.ip());
    if !admitted {
        tracing::info!(%peer, %listener, "connection closed: source address not in the listener's networks");
    }
    admitted
}

/// Keeps the client's certificate chain with the connection; each request names its
/// caller from it (`api::request_context`). A connection without one gets 401 at every
/// request.
fn capture_certificates(stream: &TlsStream<TcpStream>, data: &mut Extensions) {
    let (_, session) = stream.get_ref();
    if let Some(chain) = session
        .peer_certificates()
        .filter(|chain| !chain.is_empty())
    {
        let owned: Vec<_> = chain.iter().map(|c| c.clone().into_owned()).collect();
        data.insert(ConnectionCertificates(owned.into()));
    }
}
