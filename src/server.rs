//! The gRPC server: Coffre's services plus `grpc.health.v1` and reflection,
//! over TLS (rustls, optionally mTLS, reloadable: `tls`) or, in dev mode,
//! plaintext loopback; and the probe listener (`metrics`).
//!
//! [`run`] takes a bound listener and a shutdown future, so tests start the
//! server on port 0 and stop it when they like.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::Server;

use crate::{
    api::{AdminService, AuditService, AuthService, FrontLayer, Gate, RecordsService},
    audit::Severity,
    connections::{ConnLimits, Stream, TrackedConn},
    metrics::Metrics,
    pb::{
        admin_server::AdminServer, audit_server::AuditServer, auth_server::AuthServer,
        records_server::RecordsServer,
    },
    tls::Tls,
    vault::Vault,
};

/// Largest request or response message: a record (1 MiB) plus framing.
pub const MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("transport: {0}")]
    Transport(String),
}

/// What [`run`] serves besides the gRPC port.
#[derive(Default)]
pub struct Options {
    /// Audit retention (`audit.retention_days`), applied hourly.
    pub retention_days: Option<u32>,
    /// TLS on the gRPC port (`None`: dev mode, plaintext).
    pub tls: Option<Arc<Tls>>,
    /// The probe listener (`metrics.listen`): `/metrics` and health.
    pub metrics: Option<TcpListener>,
    /// Tenant names as metric labels (`metrics.tenant_labels`).
    pub tenant_labels: bool,
}

/// Accepted connections with Nagle off (without it a response split in
/// two segments waits for the client's delayed ACK, about 40 ms), each
/// closing itself when silent or idle too long. With TLS, each handshake
/// runs in its own task under the handshake timeout, with the
/// configuration current when it starts (so a reload takes effect at the
/// next connection and never touches open ones).
fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    limits: ConnLimits,
) -> impl tokio_stream::Stream<Item = std::io::Result<TrackedConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<TrackedConn>(64);
    tokio::spawn(async move {
        loop {
            let (conn, remote) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(c) => c,
                    Err(e) => {
                        // A failed accept (a reset before we saw it, out of
                        // descriptors) ends that connection, not the server.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            if let Err(e) = conn.set_nodelay(true) {
                tracing::debug!(error = %e, "nodelay");
            }
            let Some(tls) = &tls else {
                let c = TrackedConn::new(Stream::Plain(conn), Some(remote), limits);
                if tx.send(c).await.is_err() {
                    return;
                }
                continue;
            };
            let acceptor = tls.acceptor();
            let timeout = tls.handshake_timeout;
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
                    Ok(Ok(s)) => {
                        let c = TrackedConn::new(Stream::Tls(Box::new(s)), Some(remote), limits);
                        let _ = tx.send(c).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, %remote, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

/// Reloads TLS when its files change (a mounted secret updated, a renewal
/// written in place): checked every few seconds. SIGHUP reloads at once
/// (`coffre serve`).
async fn watch_tls(tls: Arc<Tls>) {
    let mut tick = tokio::time::interval(TLS_POLL);
    loop {
        tick.tick().await;
        match tls.reload_if_changed() {
            None => {}
            Some(Ok(l)) => tracing::info!(denied = l.denied, "TLS files changed: reloaded"),
            Some(Err(e)) => {
                tracing::error!(error = %e, "TLS files changed but do not load: the old ones stay")
            }
        }
    }
}

/// How often TLS files are looked at for a change.
pub const TLS_POLL: Duration = Duration::from_secs(2);

/// Every Coffre service and the server as a whole ("") SERVING or not.
async fn set_health(h: &Health, serving: bool) {
    let (h, metrics) = h;
    metrics.set_serving(serving);
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    h.set_service_status("", status).await;
    h.set_service_status("coffre.v1.Auth", status).await;
    h.set_service_status("coffre.v1.Records", status).await;
    h.set_service_status("coffre.v1.Admin", status).await;
    h.set_service_status("coffre.v1.Audit", status).await;
}

/// Health follows storage: NOT_SERVING from the first failed write or
/// flush (or a nearly full disk), then, once a second, an attempt to write
/// one audit event saying storage is writable again; the first that
/// succeeds makes the server SERVING again, without a restart.
async fn watch_storage(vault: Arc<Vault>, health: Health) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seen = vault.store.failures();
    let mut healthy = true;
    let mut failed_probes = 0u32;
    loop {
        tick.tick().await;
        if let Some(why) = vault.refusing() {
            // Until an operator acts (a newer schema, a head that went
            // backwards): no probe brings it back.
            if healthy {
                tracing::error!(why, "refusing every call: NOT_SERVING");
                healthy = false;
                set_health(&health, false).await;
            }
            continue;
        }
        let failures = vault.store.failures();
        let space = vault.store.space_ok();
        if healthy && (failures != seen || space.is_err()) {
            healthy = false;
            match &space {
                Err(e) => tracing::error!(error = %e, "storage not writable: NOT_SERVING"),
                Ok(()) => tracing::error!("a storage write failed: NOT_SERVING until one succeeds"),
            }
            set_health(&health, false).await;
            // Probe from the next tick: a write that fails for want of
            // space may leave room for a small probe at once, and a probe
            // that succeeded in the same instant would hide the failure.
            continue;
        }
        if healthy {
            continue;
        }
        if space.is_err() {
            continue;
        }
        // Both stores must take a write: the key-value store and the
        // trail's files can fail apart.
        let probe = async {
            let mut b = crate::store::Batch::new();
            b.put(
                crate::store::Space::Meta,
                b"health_probe".to_vec(),
                crate::clock::now_ms().to_be_bytes().to_vec(),
            );
            vault
                .store
                .commit(b)
                .await
                .map_err(crate::error::Error::from)?;
            vault
                .audit
                .alert(
                    crate::audit::Severity::Warning,
                    "storage_writable",
                    "",
                    "",
                    "storage writable again after a failure: serving".into(),
                )
                .await
        };
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), probe).await {
            healthy = true;
            failed_probes = 0;
            seen = vault.store.failures();
            set_health(&health, true).await;
            tracing::warn!("storage writable again: SERVING");
        } else {
            failed_probes += 1;
            if failed_probes % 60 == 30 {
                tracing::error!(
                    "storage still not writable; if the disk has space again, the storage engine may be stuck after a failed write: restart coffre"
                );
            }
        }
    }
}

/// The health service's reporter, and the metrics that mirror it.
type Health = (tonic_health::server::HealthReporter, Arc<Metrics>);

/// A failed write to the mirror or alert file becomes a critical alert in
/// the trail (looked at every 5 s, at most one alert a minute), besides
/// its counter and log line.
async fn watch_line_files(vault: Arc<Vault>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut seen = vault.audit.stats().line_failures();
    let mut last_alert: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let now = vault.audit.stats().line_failures();
        if now == seen || last_alert.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            continue;
        }
        let detail = format!(
            "{} writes to the audit mirror or alert file failed (disk full, file removed?): the trail has the events, a log shipper misses them",
            now - seen
        );
        if vault
            .audit
            .alert(Severity::Critical, "line_file_write_failed", "", "", detail)
            .await
            .is_ok()
        {
            seen = now;
            last_alert = Some(tokio::time::Instant::now());
        }
    }
}

/// Serves until `shutdown` resolves, then drains in-flight calls and
/// flushes storage.
pub async fn run(
    vault: Arc<Vault>,
    options: Options,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let Options {
        retention_days,
        tls,
        metrics: metrics_listener,
        tenant_labels,
    } = options;
    let known = crate::api::known_paths();
    let metrics = Metrics::new(&vault, tenant_labels, known.iter().map(String::as_str));
    let gate = Gate::new(vault.clone());
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health: Health = (reporter, metrics.clone());
    set_health(&health, true).await;
    let watch = tokio::spawn(watch_storage(vault.clone(), health.clone()));
    let probes = metrics_listener.map(|l| {
        tokio::spawn(crate::metrics::serve(
            l,
            metrics.clone(),
            Arc::downgrade(&vault),
            health_service.clone(),
        ))
    });
    let tls_watch = tls.clone().map(|t| tokio::spawn(watch_tls(t)));
    let lines = tokio::spawn(watch_line_files(vault.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Transport(e.to_string()))?;

    let c = vault.connections.clone();
    let builder = Server::builder()
        .timeout(Duration::from_secs(60))
        .http2_keepalive_interval(Some(Duration::from_secs(c.keepalive_secs)))
        .http2_keepalive_timeout(Some(Duration::from_secs(c.keepalive_timeout_secs)))
        .max_concurrent_streams(c.max_streams_per_connection)
        .tcp_keepalive(Some(Duration::from_secs(c.keepalive_secs)));
    let front = FrontLayer::new(gate.clone(), metrics.clone());

    // Refused calls past a peer's allowance are summed up, one event per
    // peer and period.
    let summaries = {
        let gate = gate.clone();
        let every = Duration::from_secs(c.refused_summary_secs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if let Err(e) = gate.flush_refusal_summaries().await {
                    tracing::error!(error = %e, "refused-call summary not stored");
                }
            }
        })
    };

    // The identity providers' signing keys, before the first login needs
    // them.
    if !vault.oidc.is_empty() {
        let v = vault.clone();
        tokio::spawn(async move { v.oidc.warm_up().await });
    }

    let sweeper = {
        let vault = vault.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            let mut minutes = 0u64;
            loop {
                tick.tick().await;
                let v = vault.clone();
                let _ = v.accounts.sweep_expired().await;
                // Retention: hourly, and once at start.
                if let Some(days) = retention_days
                    && minutes.is_multiple_of(60)
                {
                    let before = crate::clock::now_ms() - i64::from(days) * 86_400_000;
                    match vault.audit.prune(before).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(pruned = n, days, "audit retention"),
                        Err(e) => tracing::error!(error = %e, "audit retention failed"),
                    }
                }
                minutes += 1;
            }
        })
    };

    // Scheduled backups (`backup.dir`), one every `backup.interval_hours`.
    let backups = tokio::spawn(crate::ops::backup::schedule(vault.clone()));
    // Several nodes on one database: follow what the others change.
    let follow = tokio::spawn(crate::cluster::follow(Arc::downgrade(&vault)));

    let result = builder
        .layer(front)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            AuthServer::new(AuthService::new(gate.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            RecordsServer::new(RecordsService::new(gate.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AdminServer::new(AdminService::new(gate.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(AuditServer::new(AuditService::new(gate.clone())))
        .serve_with_incoming_shutdown(incoming(listener, tls, ConnLimits::from(&c)), shutdown)
        .await
        .map_err(|e| ServeError::Transport(e.to_string()));
    sweeper.abort();
    if let Some(p) = probes {
        p.abort();
    }
    if let Some(t) = tls_watch {
        t.abort();
    }
    lines.abort();
    backups.abort();
    follow.abort();
    vault.leave().await;
    summaries.abort();
    watch.abort();
    if let Err(e) = gate.flush_refusal_summaries().await {
        tracing::error!(error = %e, "refused-call summary not stored");
    }
    if let Err(e) = vault.store.flush_blocking() {
        tracing::error!(error = %e, "final flush failed");
    }
    result
}
