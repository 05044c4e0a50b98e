//! moatd's signals: SIGTERM and SIGINT stop it (in-flight requests drain first), SIGHUP
//! reloads the policy directory and the TLS files. While models load at start, before the
//! async runtime listens, a stop signal is noted ([`EarlyStop`]) rather than left to its
//! default action, which would kill moatd without its final audit checkpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::serving_status;
use crate::audit::AuditLog;
use crate::audit::log::admin_record;
use crate::models::serving::ServingTable;
use crate::policy::PolicyStore;
use crate::systemd;
use crate::tls::TlsReloader;

/// Whether a stop signal has arrived: while moatd starts, before the async handlers run,
/// and after (the flag stays registered, so a reload can tell that moatd is stopping).
#[derive(Debug, Clone)]
pub(super) struct EarlyStop {
    requested: Arc<AtomicBool>,
}

impl EarlyStop {
    /// From now on SIGTERM and SIGINT set the flag, and SIGHUP is ignored until the reload
    /// handler takes over: none of them kills moatd any more.
    pub(super) fn install() -> std::io::Result<Self> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let requested = Arc::new(AtomicBool::new(false));
        for signal in [SIGTERM, SIGINT] {
            signal_hook::flag::register(signal, Arc::clone(&requested))?;
        }
        // A reload during the start has nothing to do: everything is being read for the
        // first time.
        signal_hook::flag::register(SIGHUP, Arc::new(AtomicBool::new(false)))?;
        Ok(Self { requested })
    }

    pub(super) fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// What SIGHUP reads again: the policy directory and the `[tls]` files.
pub(super) struct Reloadable {
    pub(super) policy: Arc<PolicyStore>,
    pub(super) tls: Arc<TlsReloader>,
    pub(super) audit: Arc<AuditLog>,
}

/// On SIGHUP: read and validate the policy directory and the TLS files again and put each
/// in force if it is valid; an invalid one is refused and the one in force stays. Each
/// outcome is an audit record; systemd hears `RELOADING=1`, then `READY=1`.
pub(super) async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    reloadable: Reloadable,
    table: Arc<ServingTable>,
    stopping: EarlyStop,
) {
    while hangups.recv().await.is_some() {
        if stopping.requested() {
            // Draining: systemd has heard STOPPING=1, and a reload now would say READY=1.
            tracing::info!("SIGHUP ignored: moatd is stopping");
            continue;
        }
        systemd::reloading();
        let policy = reload_policy(&reloadable).await;
        let tls = reload_tls(&reloadable).await;
        systemd::ready(&format!(
            "{}; last reload: policy {policy}, TLS {tls}",
            serving_status(&table)
        ));
    }
}

/// Reloads the policy directory; "reloaded" or "refused".
async fn reload_policy(reloadable: &Reloadable) -> &'static str {
    let store = Arc::clone(&reloadable.policy);
    let reload = move || {
        let dir = store.dir().display().to_string();
        match store.reload() {
            Ok(()) => Ok(format!(
                "policy reloaded from {dir}: {:?}",
                store.current().counts
            )),
            Err(e) => Err(format!("policy reload from {dir} refused: {e}")),
        }
    };
    let refused = "policy reload REFUSED; the previous policy stays in force";
    reload_part(reloadable, "policy.reload", refused, reload).await
}

/// Reloads the server certificate, the department CAs and the CRLs; "reloaded" or
/// "refused".
async fn reload_tls(reloadable: &Reloadable) -> &'static str {
    let tls = Arc::clone(&reloadable.tls);
    let reload = move || match tls.reload() {
        Ok(()) => Ok("certificates, CAs and CRLs reloaded; new connections use them".to_owned()),
        Err(e) => Err(format!("TLS reload refused: {e}")),
    };
    let refused = "TLS reload REFUSED; the certificates, CAs and CRLs in force stay";
    reload_part(reloadable, "tls.reload", refused, reload).await
}

/// Runs one part of a reload on the blocking pool (it reads and checks files), logs and
/// audits its outcome, and says "reloaded" or "refused".
async fn reload_part(
    reloadable: &Reloadable,
    action: &'static str,
    refused: &'static str,
    reload: impl FnOnce() -> Result<String, String> + Send + 'static,
) -> &'static str {
    let outcome = actix_web::rt::task::spawn_blocking(reload)
        .await
        .unwrap_or_else(|e| Err(format!("{action} stopped: {e}")));
    let (decision, detail) = match outcome {
        Ok(done) => {
            tracing::info!("{done}");
            ("allow", done)
        }
        Err(reason) => {
            tracing::error!(%reason, "{refused}");
            ("deny", reason)
        }
    };
    let audit = &reloadable.audit;
    let record = admin_record(audit.node(), action, "SIGHUP", decision, detail);
    if let Err(e) = audit.append(record).await {
        tracing::error!(error = %e, action, "a reload could not be audited");
    }
    match decision {
        "allow" => "reloaded",
        _ => "refused",
    }
}

/// On SIGTERM or SIGINT: stop accepting, let in-flight requests finish (up to the grace
/// period), API first, then metrics, so health probes answer while requests drain. A
/// second signal stops at once.
pub(super) async fn stop_on_signal(
    mut signals: StopSignals,
    handles: Vec<actix_web::dev::ServerHandle>,
    grace_secs: u64,
) {
    let first = signals.next().await;
    systemd::stopping(std::time::Duration::from_secs(grace_secs));
    tracing::info!(
        signal = first,
        grace_secs,
        "stopping: finishing in-flight requests"
    );
    let graceful = async {
        for handle in &handles {
            handle.stop(true).await;
        }
    };
    tokio::select! {
        () = graceful => tracing::info!("stopped"),
        second = signals.next() => {
            tracing::warn!(signal = second, "second stop signal: stopping now");
            for handle in &handles {
                handle.stop(false).await;
            }
        }
    }
}

pub(super) struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(super) fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
