//! `coffre serve`: load the config, open the vault, serve until a signal.

use super::*;

pub(super) fn disable_core_dumps() -> Result<(), CliError> {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| err(format!("disable core dumps: {e}")))?;
    // Also keeps other processes of the same user from ptrace-reading keys.
    nix::sys::prctl::set_dumpable(false).map_err(|e| err(format!("set non-dumpable: {e}")))
}

pub(super) async fn serve(config_path: Option<&Path>) -> Result<(), CliError> {
    let config = Config::load(config_path).map_err(err)?;
    init_tracing(&config);
    disable_core_dumps()?;
    // A generated password goes to the operator's terminal only, never to
    // a log or a file: without a terminal, the operator must give one.
    let bootstrap = match std::env::var(BOOTSTRAP_PASSWORD_ENV) {
        Ok(p) => Bootstrap::Password(p),
        Err(_) if std::io::stderr().is_terminal() => Bootstrap::Random,
        Err(_) => Bootstrap::Refuse,
    };
    let (vault, report) = Vault::open(&config, bootstrap).await.map_err(err)?;
    // Notices for the operator: plain lines on stderr, or log events when
    // the log is JSON (so that every line of it stays one JSON object).
    let notice = |msg: String| {
        if config.log_format == "json" {
            tracing::warn!("{msg}");
        } else {
            eprintln!("coffre: {msg}");
        }
    };
    for w in config.warnings() {
        notice(w);
    }
    if let Some(p) = &report.generated_key {
        notice(format!(
            "dev mode: generated a new master key at {} (keep it; without it the data is unreadable)",
            p.display()
        ));
    }
    if let Some(pw) = &report.bootstrap_password {
        // Printed once, to the operator's terminal, never to the log.
        eprintln!(
            "coffre: created administrator system/admin with password: {}\ncoffre: change it with `coffre login` then `coffre passwd`; it is not shown again.",
            &**pw
        );
    } else if report.bootstrapped {
        notice(format!(
            "created administrator system/admin with the password from {BOOTSTRAP_PASSWORD_ENV}"
        ));
    }
    let tls = crate::tls::Tls::load(&config).map_err(err)?;
    let listener = tokio::net::TcpListener::bind(config.listen_addr())
        .await
        .map_err(|e| err(format!("listen on {}: {e}", config.listen)))?;
    let probes = crate::metrics::bind(config.metrics.listen.as_deref())
        .await
        .map_err(|e| {
            err(format!(
                "metrics.listen {}: {e}",
                config.metrics.listen.as_deref().unwrap_or("")
            ))
        })?;
    let local = listener.local_addr().map_err(err)?;
    let scheme = if config.dev { "http" } else { "https" };
    println!("coffre: listening on {scheme}://{local}");
    if let Some(p) = &probes {
        let at = p.local_addr().map_err(err)?;
        println!("coffre: metrics and health on http://{at}/metrics");
    }
    let _ = std::io::stdout().flush();
    tracing::info!(addr = %local, dev = config.dev, "serving");
    // As a service (no terminal), SIGHUP reloads; on a terminal it is the
    // terminal going away, and stops the server like SIGTERM.
    let on_terminal = std::io::stderr().is_terminal();
    let hangup = (!on_terminal).then(|| tokio::spawn(reload_on_hangup(tls.clone(), vault.clone())));
    // SIGTERM stops accepting and drains; a client that keeps its
    // connection open must not hold the exit past the 10 s operators expect.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown_signal(on_terminal).await;
        let _ = stop_tx.send(true);
    };
    let store = vault.store.clone();
    let drain_deadline = async move {
        let mut rx = stop_rx;
        while !*rx.borrow() {
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        r = crate::server::run(vault, crate::server::Options {
            retention_days: config.audit.retention_days,
            tls,
            metrics: probes,
            tenant_labels: config.metrics.tenant_labels,
        }, listener, shutdown) => r.map_err(err)?,
        _ = drain_deadline => {
            tracing::warn!("drain timed out; closing remaining connections");
            store.flush_blocking().map_err(err)?;
        }
    }
    if let Some(h) = hangup {
        h.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: reload the TLS files (certificate, key, client CA, deny list)
/// and reopen the audit mirror and alert files (after logrotate moved
/// them). Open connections and calls are not touched.
async fn reload_on_hangup(
    tls: Option<std::sync::Arc<crate::tls::Tls>>,
    vault: std::sync::Arc<Vault>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(l) => tracing::info!(denied = l.denied, mtls = l.mtls, "SIGHUP: TLS reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: TLS not reloaded, the old files stay")
                }
            }
        }
        match vault.audit.reopen_files() {
            Ok(()) => tracing::info!("SIGHUP: mirror and alert files reopened"),
            Err(e) => tracing::error!(error = %e, "SIGHUP: a line file did not reopen"),
        }
    }
}

/// How long SIGTERM waits for in-flight calls before closing connections.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(7);

/// SIGTERM or SIGINT; and SIGHUP when `hup_stops` (a server on a terminal
/// stops when its terminal goes away, as a foreground program should).
pub(super) async fn shutdown_signal(hup_stops: bool) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        // Without signal handlers, run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
        _ = async {
            if hup_stops {
                hup.recv().await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {},
    }
    tracing::info!("shutting down: draining calls");
}

pub(super) fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COFFRE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sled=warn,h2=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if config.log_format == "json" {
        // One flat JSON object per line (a log shipper's unit), the
        // event's fields beside level, time and target.
        let _ = b
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init();
    } else {
        let _ = b.try_init();
    }
}
