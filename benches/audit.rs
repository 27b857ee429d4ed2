//! GetRecord throughput with the durable audit trail (every event flushed
//! through group commit before the response) against the same run with
//! events kept only in memory (flush turned into a no-op), 64 concurrent
//! gRPC clients on loopback. `cargo bench --bench audit`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use coffre::{
    config::Config,
    pb::{self, admin_client::AdminClient, auth_client::AuthClient, records_client::RecordsClient},
    storage::{Backend, Batch, Entry, Space, StorageError},
    vault::Vault,
};
use tonic::{Request, transport::Channel};

/// Applies writes but never makes them durable.
struct NoFlush(Arc<dyn Backend>);

impl Backend for NoFlush {
    fn get(&self, s: Space, k: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.0.get(s, k)
    }
    fn scan_prefix(&self, s: Space, p: &[u8], l: usize) -> Result<Vec<Entry>, StorageError> {
        self.0.scan_prefix(s, p, l)
    }
    fn apply(&self, b: Batch) -> Result<(), StorageError> {
        self.0.apply(b)
    }
    fn last(&self, s: Space) -> Result<Option<Entry>, StorageError> {
        self.0.last(s)
    }
    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

const PW: &str = "violet anchor 8812 meadow crane";
const CLIENTS: usize = 64;
const SECONDS: u64 = 8;

fn authed<T>(t: &str, m: T) -> Request<T> {
    let mut r = Request::new(m);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {t}").parse().unwrap());
    r
}

async fn run(durable: bool) -> (f64, f64) {
    let root = tempfile::tempdir().unwrap();
    let cfg = root.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "dev = true\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nmaster_key_file = {:?}\n[argon2]\nm_kib = 64\nt = 1\np = 1\n",
            root.path().join("data"),
            root.path().join("m.key")
        ),
    )
    .unwrap();
    let config = Config::load_with_env(Some(&cfg), |_| None).unwrap();
    let (vault, _) = Vault::open_with(&config, Some(PW.into()), |b| {
        if durable {
            b
        } else {
            Arc::new(NoFlush(b)) as Arc<dyn Backend>
        }
    })
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(coffre::server::run(vault, None, None, listener, async {
        let _ = rx.await;
    }));
    let ch = Channel::from_shared(addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let login = |t: &str, u: &str| pb::LoginRequest {
        tenant: t.into(),
        username: u.into(),
        password: PW.into(),
    };
    let admin = AuthClient::new(ch.clone())
        .login(login("system", "admin"))
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut a = AdminClient::new(ch.clone());
    a.create_tenant(authed(
        &admin,
        pb::CreateTenantRequest {
            name: "b".into(),
            indexed_fields: vec![],
        },
    ))
    .await
    .unwrap();
    a.create_principal(authed(
        &admin,
        pb::CreatePrincipalRequest {
            tenant: "b".into(),
            username: "c".into(),
            password: PW.into(),
            role: pb::Role::Clinician as i32,
        },
    ))
    .await
    .unwrap();
    let token = Arc::new(
        AuthClient::new(ch.clone())
            .login(login("b", "c"))
            .await
            .unwrap()
            .into_inner()
            .token,
    );
    let mut r = RecordsClient::new(ch.clone());
    for i in 0..200u64 {
        r.put_record(authed(
            &token,
            pb::PutRecordRequest {
                record: Some(pb::Record {
                    id: format!("p{i}"),
                    fields: coffre::bench::sample_fields(i),
                    version: 0,
                }),
            },
        ))
        .await
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let ch = Channel::from_shared(addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = RecordsClient::new(ch);
            let mut lat = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let t = Instant::now();
                r.get_record(authed(
                    &token,
                    pb::GetRecordRequest {
                        id: format!("p{}", i % 200),
                        fields: vec![],
                        purpose: "bench".into(),
                    },
                ))
                .await
                .unwrap();
                lat.push(t.elapsed().as_micros() as u64);
                i += 7;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let _ = tx.send(());
    let _ = server.await;
    (
        lat.len() as f64 / secs,
        lat[lat.len() * 99 / 100] as f64 / 1000.0,
    )
}

/// Events per second through `Audit::record` alone (no gRPC).
async fn record_only(durable: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let sled: Arc<dyn Backend> = Arc::new(
        coffre::storage::SledBackend::open(
            dir.path(),
            &coffre::storage::SledOptions {
                cache_capacity_bytes: 1 << 25,
            },
        )
        .unwrap(),
    );
    let backend = if durable {
        sled
    } else {
        Arc::new(NoFlush(sled)) as Arc<dyn Backend>
    };
    let store = coffre::storage::Storage::new(backend);
    let audit = Arc::new(
        coffre::audit::Audit::open(store, coffre::crypto::SecretKey::random(), None, None).unwrap(),
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..64 {
        let audit = audit.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200 {
                audit
                    .record(pb::AuditEvent {
                        tenant: "b".into(),
                        principal: format!("b/c{c}"),
                        action: "coffre.v1.Records/GetRecord".into(),
                        record_ids: vec![format!("p{i}")],
                        outcome: "ok".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (64 * 200) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    // `cargo test --benches` runs bench binaries with no arguments but
    // `--bench`; only measure when asked to.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for durable in [false, true] {
        let eps = rt.block_on(record_only(durable));
        println!("Audit::record alone, 64 tasks, durable={durable}: {eps:.0} events/s");
    }
    let (mem_rps, mem_p99) = rt.block_on(run(false));
    let (dur_rps, dur_p99) = rt.block_on(run(true));
    println!("GetRecord, {CLIENTS} clients, {SECONDS} s each, audit events:");
    println!("  in memory only : {mem_rps:>8.0} req/s  p99 {mem_p99:.2} ms");
    println!("  durable        : {dur_rps:>8.0} req/s  p99 {dur_p99:.2} ms");
    println!("  in-memory / durable = {:.2}", mem_rps / dur_rps);
}
