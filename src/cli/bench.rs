//! `coffre bench`: a load generator against a running server. It makes a
//! throwaway tenant and clinician, then drives N concurrent clients (one
//! connection each) through three phases of equal length —
//! `grpc.health.v1.Health/Check` (the gRPC stack's own baseline),
//! `GetRecord` and `PutRecord` of ten-field records — and prints req/s and
//! latency percentiles, with each ratio to the baseline.
//!
//! Private to the CLI: the load generator is not part of the library's API.

use super::*;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    pb::{admin_client::AdminClient, records_client::RecordsClient},
    sample::sample_fields,
};

pub(super) async fn bench(g: &Global, args: BenchArgs) -> Result<(), CliError> {
    run(g.addr.clone(), g.ca.clone(), token(g)?, args, g.json)
        .await
        .map_err(err)
}

struct Phase {
    name: &'static str,
    latencies_us: Vec<u64>,
    errors: u64,
    elapsed: Duration,
}

impl Phase {
    /// A phase that was not run (`--phase`).
    fn skipped(name: &'static str) -> Self {
        Self {
            name,
            latencies_us: Vec::new(),
            errors: 0,
            elapsed: Duration::ZERO,
        }
    }

    fn rate(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

pub(super) async fn run(
    addr: String,
    ca: Option<PathBuf>,
    admin_token: Zeroizing<String>,
    args: BenchArgs,
    json_out: bool,
) -> Result<(), String> {
    let ch = connect_to(&addr, ca.as_deref()).await.map_err(|e| e.0)?;
    let tag = hex::encode(crate::crypto::random_array::<4>());
    let tenant = format!("bench_{tag}");
    let password = format!(
        "bench {} horse battery {}",
        tag,
        hex::encode(crate::crypto::random_array::<8>())
    );
    let mut admin = AdminClient::new(ch.clone());
    let st = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    admin
        .create_tenant(
            with_token(
                &admin_token,
                pb::CreateTenantRequest {
                    name: tenant.clone(),
                    indexed_fields: vec!["nir".into()],
                },
            )
            .map_err(|e| e.0)?,
        )
        .await
        .map_err(st)?;
    admin
        .create_principal(
            with_token(
                &admin_token,
                pb::CreatePrincipalRequest {
                    oidc: String::new(),
                    tenant: tenant.clone(),
                    username: "bench".into(),
                    password: password.clone(),
                    role: pb::Role::Clinician as i32,
                },
            )
            .map_err(|e| e.0)?,
        )
        .await
        .map_err(st)?;
    let token = AuthClient::new(ch.clone())
        .login(pb::LoginRequest {
            otp: String::new(),
            tenant: tenant.clone(),
            username: "bench".into(),
            password,
        })
        .await
        .map_err(st)?
        .into_inner()
        .token;
    let token = Arc::new(token);

    let mut channels = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        channels.push(connect_to(&addr, ca.as_deref()).await.map_err(|e| e.0)?);
    }

    let seed = args.fill.unwrap_or(args.records).max(1);
    eprintln!(
        "bench: tenant {tenant}: loading {seed} records with {} clients",
        args.clients
    );
    let ids = load(&channels, &token, seed).await?;
    if args.fill.is_some() {
        let msg = format!("loaded {} records into tenant {tenant}", ids.len());
        if json_out {
            println!("{}", json!({"tenant": tenant, "records": ids.len()}));
        } else {
            println!("{msg}");
        }
        return Ok(());
    }
    let ids = Arc::new(ids);
    let secs = Duration::from_secs(args.seconds);
    let health = drive("health_check", &channels, secs, {
        move |ch: Channel, _i: u64| async move {
            HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|_| ())
        }
    })
    .await;
    let get = if args.phase == "put" {
        Phase::skipped("get_record")
    } else {
        drive("get_record", &channels, secs, {
            let token = token.clone();
            let ids = ids.clone();
            move |ch: Channel, i: u64| {
                let token = token.clone();
                let id = ids[(i as usize * 7919) % ids.len()].clone();
                async move {
                    let req = with_token(
                        &token,
                        pb::GetRecordRequest {
                            id,
                            fields: vec![],
                            purpose: "bench".into(),
                        },
                    )
                    .map_err(|e| tonic::Status::internal(e.0))?;
                    RecordsClient::new(ch).get_record(req).await.map(|_| ())
                }
            }
        })
        .await
    };
    let put = if args.phase == "get" {
        Phase::skipped("put_record")
    } else {
        drive("put_record", &channels, secs, {
            let token = token.clone();
            move |ch: Channel, i: u64| {
                let token = token.clone();
                async move {
                    let req = with_token(
                        &token,
                        pb::PutRecordRequest {
                            record: Some(pb::Record {
                                id: String::new(),
                                fields: sample_fields(1_000_000 + i),
                                version: 0,
                            }),
                        },
                    )
                    .map_err(|e| tonic::Status::internal(e.0))?;
                    RecordsClient::new(ch).put_record(req).await.map(|_| ())
                }
            }
        })
        .await
    };

    if get.errors > 0 {
        eprintln!(
            "bench: {} GetRecord calls failed: the server's read budgets throttle one \
             principal reading this fast (read budgets); serve with roomy [limits.clinician], \
             as deploy/coffre.bench.toml has",
            get.errors
        );
    }
    let base = health.rate();
    let phases = [health, get, put];
    if json_out {
        let rows: Vec<_> = phases
            .iter()
            .map(|p| {
                json!({"phase": p.name, "req_per_s": p.rate(), "p50_ms": p.pct(0.5),
                       "p99_ms": p.pct(0.99), "errors": p.errors, "ratio_to_health": p.rate() / base})
            })
            .collect();
        println!(
            "{}",
            json!({"clients": args.clients, "seconds": args.seconds, "phases": rows})
        );
    } else {
        println!(
            "{:<14} {:>10} {:>9} {:>9} {:>7} {:>8}",
            "phase", "req/s", "p50 ms", "p99 ms", "errors", "ratio"
        );
        for p in &phases {
            println!(
                "{:<14} {:>10.0} {:>9.2} {:>9.2} {:>7} {:>8.2}",
                p.name,
                p.rate(),
                p.pct(0.5),
                p.pct(0.99),
                p.errors,
                p.rate() / base
            );
        }
    }
    Ok(())
}

/// Puts `n` records over the clients' channels; returns their ids.
async fn load(channels: &[Channel], token: &Arc<String>, n: usize) -> Result<Vec<String>, String> {
    let clients = channels.len();
    let per = n.div_ceil(clients);
    let mut tasks = Vec::new();
    for (c, ch) in channels.iter().enumerate() {
        let ch = ch.clone();
        let token = token.clone();
        let start = c * per;
        let end = ((c + 1) * per).min(n);
        tasks.push(tokio::spawn(async move {
            let mut client = RecordsClient::new(ch);
            let mut ids = Vec::with_capacity(end.saturating_sub(start));
            for i in start..end {
                let req = with_token(
                    &token,
                    pb::PutRecordRequest {
                        record: Some(pb::Record {
                            id: String::new(),
                            fields: sample_fields(i as u64),
                            version: 0,
                        }),
                    },
                )
                .map_err(|e| e.0)?;
                let r = client
                    .put_record(req)
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
                ids.push(r.into_inner().id);
                if c == 0 && (i - start) % 10_000 == 9_999 {
                    eprintln!("bench: loaded about {} of {n}", (i - start + 1) * clients);
                }
            }
            Ok::<_, String>(ids)
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for t in tasks {
        ids.extend(t.await.map_err(|e| e.to_string())??);
    }
    Ok(ids)
}

async fn drive<F, Fut>(name: &'static str, channels: &[Channel], secs: Duration, call: F) -> Phase
where
    F: Fn(Channel, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let start = Instant::now();
    let deadline = start + secs;
    let mut tasks = Vec::new();
    for (c, ch) in channels.iter().enumerate() {
        let ch = ch.clone();
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = c as u64 * 1_000_000_007;
            while Instant::now() < deadline {
                let t = Instant::now();
                match call(ch.clone(), i).await {
                    Ok(()) => lat.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            latencies_us.extend(l);
            errors += e;
        }
    }
    latencies_us.sort_unstable();
    Phase {
        name,
        latencies_us,
        errors,
        elapsed: start.elapsed(),
    }
}
