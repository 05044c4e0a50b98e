//! `moatd serve`: load and warm every model, then open the mTLS API listener(s) and the
//! metrics listener, and serve until SIGINT or SIGTERM (in-flight requests get
//! `server.shutdown_grace_secs` to finish).

mod listener;
mod signals;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, web};

use crate::api::refusals::RefusalBudgets;
use crate::api::{self, AppState, ServedModel};
use crate::audit::log::admin_record;
use crate::audit::{AuditError, AuditLog};
use crate::config::valid_node_id;
use crate::config::{Config, ServerConfig, TlsConfig};
use crate::engine::{ModelDirectory, OrtRuntime, StartError};
use crate::metrics::Metrics;
use crate::models::serving::{LoadedModel, Route, ServingTable};
use crate::models::{Models, RolloutError, loader};
use crate::policy::{PolicyLoadError, PolicyStore};
use crate::systemd;
use crate::systemd::activation::Inherited;
use crate::tls::{self, TlsError, TlsReloader};
use moat_core::audit::encoding::hex;
use signals::{EarlyStop, Reloadable, StopSignals};

/// Why `moatd serve` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the configuration is incomplete for serving: {0}")]
    Incomplete(&'static str),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot list the models in {dir}: {source}")]
    ListModels {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no model to serve: {dir} holds no model directory (each has a moat-model.json)")]
    NoModels { dir: PathBuf },
    #[error("the model store cannot be opened: {0}")]
    Models(#[from] RolloutError),
    #[error("cannot load the model {name} from {dir}: {source}")]
    Model {
        name: String,
        dir: PathBuf,
        #[source]
        source: StartError,
    },
    #[error(transparent)]
    Policy(#[from] PolicyLoadError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{address} is not among the listening sockets systemd passed (moat.socket), and moatd \
         opens none of its own when it is given some: add ListenStream={address} to \
         moat.socket (systemctl edit moat.socket), or listen where it does"
    )]
    NotPassed { address: SocketAddr },
    #[error(
        "systemd passed listening sockets that moat.toml does not listen on: {0:?}; make \
         [server] listen and [metrics] listen agree with moat.socket"
    )]
    UnclaimedSockets(Vec<SocketAddr>),
    #[error("the server stopped with an error: {0}")]
    Run(#[source] std::io::Error),
}

impl ServeError {
    /// Errors in what the configuration names (files, certificates) rather than in the
    /// machine: `moatd` exits with the configuration status for these.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            ServeError::Incomplete(_)
                | ServeError::Tls(_)
                | ServeError::Policy(_)
                | ServeError::NoModels { .. }
                | ServeError::NotPassed { .. }
                | ServeError::UnclaimedSockets(_)
                | ServeError::Audit(
                    AuditError::NoRecipients
                        | AuditError::BadRecipient { .. }
                        | AuditError::Key { .. }
                        | AuditError::ForeignStore { .. }
                )
        )
    }
}

/// Serves until a stop signal. `config` must have passed [`Config::validate_for_serve`].
/// `inherited`: the listening sockets systemd passed, if any ([`Inherited::from_env`]).
pub fn serve(
    config: &Config,
    runtime: Arc<OrtRuntime>,
    inherited: Inherited,
) -> Result<(), ServeError> {
    let start = Start::new(inherited)?;
    // TLS, policy and audit first: a bad certificate, policy or auditor key is reported
    // before minutes of model loading.
    let ready = Ready::prepare(config)?;
    let table = Arc::new(ServingTable::default());
    let unsigned = load_directories(config, &runtime, &|label| start.before_load(label))?;
    table.update(|routes| routes.extend(unsigned));
    let models = Models::open(
        config,
        runtime,
        Arc::clone(&ready.audit),
        Arc::clone(&ready.policy),
        Arc::clone(&table),
    )?;
    ready.run(config, table, Some(Arc::new(models)), start)
}

/// What the start carries until moatd is ready.
struct Start {
    early: EarlyStop,
    progress: systemd::StartupProgress,
    inherited: Inherited,
}

/// How long models may take to load at start, all together, with systemd kept waiting.
const STARTUP_LOAD_LIMIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

impl Start {
    /// From here on a stop signal is noted, not fatal ([`EarlyStop`]), and systemd hears
    /// about each model as it loads.
    fn new(inherited: Inherited) -> Result<Self, ServeError> {
        Ok(Self {
            early: EarlyStop::install().map_err(ServeError::Run)?,
            progress: systemd::StartupProgress::begin(STARTUP_LOAD_LIMIT),
            inherited,
        })
    }

    /// Before each model load: false once a stop signal has come (load nothing more).
    fn before_load(&self, label: &str) -> bool {
        if self.early.requested() {
            return false;
        }
        self.progress.loading(label);
        true
    }

    /// The socket systemd passed for `address`; without socket activation, one bound here.
    /// Given sockets, moatd binds none itself: under the packaged unit it could not (no
    /// Internet socket family, no network), and a listener the unit does not know about
    /// is a configuration error to report, not to work around.
    fn listen(&mut self, address: SocketAddr) -> Result<TcpListener, ServeError> {
        if let Some(listener) = self.inherited.take(address) {
            tracing::info!(%address, "listening on the socket systemd passed");
            return Ok(listener);
        }
        if self.inherited.passed() {
            return Err(ServeError::NotPassed { address });
        }
        TcpListener::bind(address).map_err(|source| ServeError::Bind { address, source })
    }
}

/// Opens the audit trail: no audit, no answer.
fn open_audit(config: &Config) -> Result<Arc<AuditLog>, ServeError> {
    let Some(audit) = &config.audit else {
        return Err(ServeError::Incomplete("[audit] is required"));
    };
    let node_id = match &audit.node_id {
        Some(node) => node.clone(),
        None => host_name().ok_or(ServeError::Incomplete(
            "audit.node_id is unset and the host name is not a usable node id; set audit.node_id",
        ))?,
    };
    if audit.recipients.len() < 2 {
        tracing::warn!(
            recipients = audit.recipients.len(),
            "the audit trail is encrypted to a single auditor key: if it is lost, no one can read the trail; configure at least two"
        );
    }
    let log = AuditLog::open(audit, node_id)?;
    let node = log.node();
    tracing::info!(
        node = %node.node_id,
        key = %hex(&node.public_key),
        store = %audit.store_directory().display(),
        recipients = audit.recipients.len(),
        "audit trail open"
    );
    let detail = format!(
        "moatd {} started; node key {}; {} auditor recipient(s)",
        env!("CARGO_PKG_VERSION"),
        hex(&node.public_key),
        audit.recipients.len()
    );
    log.append_blocking(admin_record(node, "node.start", "moatd", "allow", detail))?;
    Ok(log)
}

/// The host name, if it is a usable node id.
fn host_name() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    valid_node_id(name).then(|| name.to_owned())
}

fn open_policy(config: &Config) -> Result<Arc<PolicyStore>, ServeError> {
    let Some(policy) = &config.policy else {
        return Err(ServeError::Incomplete("[policy] is required"));
    };
    let store = PolicyStore::open(&policy.directory)?;
    let counts = store.current().counts.clone();
    tracing::info!(dir = %policy.directory.display(), files = ?counts, "policy loaded");
    Ok(Arc::new(store))
}

/// Serves models loaded by the caller (who may also use them directly, as the serving
/// benchmark does) until a stop signal. They serve as unsigned directories: no bundle
/// commands.
pub fn serve_models(
    config: &Config,
    models: BTreeMap<String, ServedModel>,
) -> Result<(), ServeError> {
    let table = Arc::new(ServingTable::default());
    table.update(|routes| {
        routes.extend(
            models
                .into_iter()
                .map(|(name, served)| (name.clone(), unsigned_route(name, served))),
        );
    });
    let start = Start::new(Inherited::default())?;
    Ready::prepare(config)?.run(config, table, None, start)
}

fn unsigned_route(name: String, served: ServedModel) -> Route {
    Route::new(Arc::new(LoadedModel {
        name,
        version: None,
        served,
        classification_ceiling: None,
        response_schema: None,
        sampling: Default::default(),
        memory_bytes: 0,
    }))
}

/// Everything the listeners need besides the models.
struct Ready<'c> {
    server: &'c ServerConfig,
    rustls_config: rustls::ServerConfig,
    tls_reloader: Arc<TlsReloader>,
    metrics: Arc<Metrics>,
    policy: Arc<PolicyStore>,
    audit: Arc<AuditLog>,
}

impl<'c> Ready<'c> {
    fn prepare(config: &'c Config) -> Result<Self, ServeError> {
        let (Some(server), Some(tls_config)) = (&config.server, &config.tls) else {
            return Err(ServeError::Incomplete("[server] and [tls] are required"));
        };
        let metrics = Arc::new(Metrics::new(config.metrics.per_department));
        let (rustls_config, tls_reloader) = listener_tls(tls_config, &metrics)?;
        Ok(Self {
            server,
            rustls_config,
            tls_reloader: Arc::new(tls_reloader),
            metrics,
            policy: open_policy(config)?,
            audit: open_audit(config)?,
        })
    }

    fn run(
        self,
        config: &Config,
        table: Arc<ServingTable>,
        models: Option<Arc<Models>>,
        start: Start,
    ) -> Result<(), ServeError> {
        let state = web::Data::new(AppState {
            models: table,
            limits: config.limits,
            metrics: self.metrics,
            policy: self.policy,
            audit: Arc::clone(&self.audit),
            clients: self.tls_reloader.client_authority(config.identity),
            refusals: Arc::new(RefusalBudgets::new(
                config.limits.refusals_per_window,
                Duration::from_secs(config.limits.refusal_window_secs),
            )),
        });
        let reloadable = Reloadable {
            policy: Arc::clone(&state.policy),
            tls: self.tls_reloader,
            audit: Arc::clone(&state.audit),
        };
        run(
            config,
            self.server,
            self.rustls_config,
            state,
            models,
            reloadable,
            start,
        )
    }
}

fn listener_tls(
    tls_config: &TlsConfig,
    metrics: &Arc<Metrics>,
) -> Result<(rustls::ServerConfig, TlsReloader), TlsError> {
    let refusals = Arc::clone(metrics);
    tls::server_config(
        tls_config,
        Arc::new(move |reason| refusals.client_refused(reason)),
    )
}

fn run(
    config: &Config,
    server: &ServerConfig,
    rustls_config: rustls::ServerConfig,
    state: web::Data<AppState>,
    models: Option<Arc<Models>>,
    reloadable: Reloadable,
    mut start: Start,
) -> Result<(), ServeError> {
    let audit = Arc::clone(&state.audit);
    let bound = Bound {
        api: server
            .listen
            .iter()
            .map(|&address| start.listen(address))
            .collect::<Result<Vec<_>, _>>()?,
        metrics: match config.metrics.enabled {
            true => Some(start.listen(config.metrics.listen)?),
            false => None,
        },
    };
    // A passed socket nobody listens on would take connections that are never answered.
    let unclaimed = start.inherited.unclaimed();
    if !unclaimed.is_empty() {
        return Err(ServeError::UnclaimedSockets(unclaimed));
    }
    let system = actix_web::rt::System::new();
    let served = system.block_on(run_servers(
        state,
        models,
        bound,
        rustls_config,
        config,
        reloadable,
        start,
    ));
    // Every request has finished (or was cut off at the grace period): the last record,
    // then the final checkpoint.
    let stopped = admin_record(
        audit.node(),
        "node.stop",
        "moatd",
        "allow",
        "moatd stopped".into(),
    );
    let closed = audit.append_blocking(stopped).and_then(|_| audit.close());
    match &closed {
        Ok(()) => tracing::info!("audit trail closed with a final checkpoint"),
        Err(e) => tracing::error!(error = %e, "the final audit checkpoint failed"),
    }
    served?;
    closed.map_err(ServeError::Audit)
}

/// The listening sockets, bound or passed.
struct Bound {
    api: Vec<TcpListener>,
    metrics: Option<TcpListener>,
}

async fn run_servers(
    state: web::Data<AppState>,
    models: Option<Arc<Models>>,
    bound: Bound,
    rustls_config: rustls::ServerConfig,
    config: &Config,
    reloadable: Reloadable,
    start: Start,
) -> Result<(), ServeError> {
    let Some(server) = &config.server else {
        return Err(ServeError::Incomplete("[server] is required"));
    };
    let audit = Arc::clone(&state.audit);
    let table = Arc::clone(&state.models);
    let refusals = Arc::clone(&state.refusals);
    // The async handlers take over from `EarlyStop` before the models load: a signal from
    // now on is acted on by them (after READY=1) or ends the start (before it).
    let stop_signals = StopSignals::new().map_err(ServeError::Run)?;
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(ServeError::Run)?;
    if let Some(models) = &models {
        // What was active before the restart serves again before the listeners open.
        models.restore(&|label| start.before_load(label)).await;
    }
    let Start {
        early, progress, ..
    } = start;
    drop(progress);
    if early.requested() {
        // Stopped while starting: nothing was served; the caller signs the final checkpoint.
        systemd::stopping(std::time::Duration::ZERO);
        tracing::info!("stopping: a stop signal came while the models loaded");
        return Ok(());
    }
    if state.models.snapshot().is_empty() {
        tracing::warn!("no model is active: import and activate a bundle with moatctl");
    }
    let api = listener::api_server(state.clone(), bound.api, rustls_config, server)?;
    for socket in crate::admin::bind(&config.admin)? {
        tracing::info!(socket = %socket.path().display(), scope = ?socket.scope(), "admin socket listening");
        actix_web::rt::spawn(socket.serve(Arc::clone(&audit), models.clone()));
    }
    let mut handles = vec![api.handle()];
    let mut servers = vec![actix_web::rt::spawn(api)];
    if let Some(listener) = bound.metrics {
        let address = listener.local_addr().map_err(ServeError::Run)?;
        let metrics = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .configure(api::metrics_routes)
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(server.shutdown_grace_secs)
        .listen(listener)
        .map_err(|source| ServeError::Bind { address, source })?
        .run();
        handles.push(metrics.handle());
        servers.push(actix_web::rt::spawn(metrics));
        tracing::info!(url = %format!("http://{address}"), "metrics listening");
    }
    tracing::info!("moatd is ready");
    systemd::ready(&serving_status(&table));
    if let Some(timeout) = systemd::watchdog_timeout() {
        actix_web::rt::spawn(systemd::watchdog::run(
            timeout,
            Arc::clone(&audit),
            Arc::clone(&table),
        ));
    }
    actix_web::rt::spawn(signals::stop_on_signal(
        stop_signals,
        handles,
        server.shutdown_grace_secs,
    ));
    actix_web::rt::spawn(signals::reload_on_hangup(hangups, reloadable, table, early));
    let window = Duration::from_secs(config.limits.refusal_window_secs);
    actix_web::rt::spawn(record_refusal_summaries(
        Arc::clone(&refusals),
        Arc::clone(&audit),
        window,
    ));
    let mut result = Ok(());
    for server in servers {
        let outcome = server
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r);
        result = result.and(outcome);
    }
    // What the last windows turned away is recorded before the final checkpoint.
    for summary in refusals.drain(std::time::Instant::now(), true) {
        let record = summary.record(&audit.node().node_id);
        if let Err(e) = audit.append(record).await {
            tracing::error!(error = %e, "a summary of refused requests could not be recorded");
        }
    }
    result.map_err(ServeError::Run)
}

/// Records, once a window has ended, a summary of each caller turned away in it.
async fn record_refusal_summaries(
    refusals: Arc<RefusalBudgets>,
    audit: Arc<AuditLog>,
    window: Duration,
) {
    let mut ticks = actix_web::rt::time::interval(window.div_f32(2.0).max(Duration::from_secs(1)));
    loop {
        ticks.tick().await;
        for summary in refusals.drain(std::time::Instant::now(), false) {
            audit.submit(summary.record(&audit.node().node_id));
        }
    }
}

/// systemd's status line while serving.
pub(super) fn serving_status(table: &ServingTable) -> String {
    let routes = table.snapshot();
    let names: Vec<String> = routes.values().map(|route| route.active.label()).collect();
    match names.is_empty() {
        true => "serving; no model is active".to_owned(),
        false => format!("serving {}", names.join(", ")),
    }
}

/// Loads and warms every unsigned model directory the configuration names; any failure
/// stops the start.
fn load_directories(
    config: &Config,
    runtime: &OrtRuntime,
    before_load: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, Route)>, ServeError> {
    let models = &config.models;
    let Some(directory) = &models.directory else {
        return Ok(Vec::new());
    };
    let selected = models.selected().map_err(|source| ServeError::ListModels {
        dir: directory.clone(),
        source,
    })?;
    if selected.is_empty() {
        return Err(ServeError::NoModels {
            dir: directory.clone(),
        });
    }
    let mut routes = Vec::new();
    for (name, dir) in selected {
        if !before_load(&name) {
            break;
        }
        tracing::warn!(model = %name, dir = %dir.display(), "serving an unsigned model directory (models.directory)");
        let loaded = ModelDirectory::open(&dir)
            .map_err(StartError::from)
            .and_then(|directory| loader::load(config, runtime, directory))
            .map_err(|source| ServeError::Model {
                name: name.clone(),
                dir: dir.clone(),
                source,
            })?;
        routes.push((name.clone(), unsigned_route(name, loaded)));
    }
    Ok(routes)
}
