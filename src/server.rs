//! The gRPC server: Coffre's services plus `grpc.health.v1` and reflection,
//! over TLS (rustls, optionally mTLS) or, in dev mode, plaintext loopback.
//!
//! [`run`] takes a bound listener and a shutdown future, so tests start the
//! server on port 0 and stop it when they like.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::{
    api::{AdminService, AuditService, AuthService, FrontLayer, Gate, RecordsService},
    config::Config,
    connections::{ConnLimits, TrackedConn},
    pb::{
        admin_server::AdminServer, audit_server::AuditServer, auth_server::AuthServer,
        records_server::RecordsServer,
    },
    vault::Vault,
};

/// Largest request or response message: a record (1 MiB) plus framing.
pub const MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("tls: {0}")]
    Tls(String),
    #[error("transport: {0}")]
    Transport(String),
}

/// Reads the TLS identity (and client CA for mTLS) named by the config.
pub fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, ServeError> {
    if config.dev {
        return Ok(None);
    }
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ServeError::Tls(format!("{}: {e}", p.display())))
    };
    let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
        return Err(ServeError::Tls("tls.cert and tls.key are required".into()));
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &config.tls.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

/// Accepted connections with Nagle off (tonic's own `tcp_nodelay` applies
/// only to listeners it binds, and without it a response split in two
/// segments waits for the client's delayed ACK, about 40 ms), each closing
/// itself when silent or idle too long.
fn incoming(
    listener: TcpListener,
    limits: ConnLimits,
) -> impl tokio_stream::Stream<Item = std::io::Result<TrackedConn>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).filter_map(move |conn| {
        // A failed accept (a reset before we saw it, out of descriptors)
        // ends that connection, not the server.
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                return None;
            }
        };
        if let Err(e) = conn.set_nodelay(true) {
            tracing::debug!(error = %e, "nodelay");
        }
        Some(Ok(TrackedConn::new(conn, limits)))
    })
}

/// Every Coffre service and the server as a whole ("") SERVING or not.
async fn set_health(h: &tonic_health::server::HealthReporter, serving: bool) {
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
async fn watch_storage(vault: Arc<Vault>, health: tonic_health::server::HealthReporter) {
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

/// Serves until `shutdown` resolves, then drains in-flight calls and
/// flushes storage.
pub async fn run(
    vault: Arc<Vault>,
    retention_days: Option<u32>,
    tls: Option<ServerTlsConfig>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let gate = Gate::new(vault.clone());
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, true).await;
    let watch = tokio::spawn(watch_storage(vault.clone(), health.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Transport(e.to_string()))?;

    let c = vault.connections.clone();
    let mut builder = Server::builder()
        .timeout(Duration::from_secs(60))
        .http2_keepalive_interval(Some(Duration::from_secs(c.keepalive_secs)))
        .http2_keepalive_timeout(Some(Duration::from_secs(c.keepalive_timeout_secs)))
        .max_concurrent_streams(c.max_streams_per_connection)
        .tcp_keepalive(Some(Duration::from_secs(c.keepalive_secs)));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.timeout(Duration::from_secs(c.handshake_secs)))
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let front = FrontLayer::new(gate.clone());

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
        .serve_with_incoming_shutdown(incoming(listener, ConnLimits::from(&c)), shutdown)
        .await
        .map_err(|e| ServeError::Transport(e.to_string()));
    sweeper.abort();
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
