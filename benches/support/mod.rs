//! What the in-process benchmarks share: a real server on a loopback port
//! over a temporary data directory, a tenant `b` with clinician `c` and 200
//! records, and a GetRecord load of concurrent gRPC clients.

#![allow(dead_code)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use coffre::{
    config::Config,
    pb::{self, admin_client::AdminClient, auth_client::AuthClient, records_client::RecordsClient},
    store::Backend,
    vault::Vault,
};
use tonic::{Request, transport::Channel};

pub const PW: &str = "violet anchor 8812 meadow crane";
pub const RECORDS: u64 = 200;
/// Read budgets that one principal reading thousands of records a second
/// never reaches (the benchmarks measure throughput, not the budgets).
pub const ROOMY_LIMITS: &str = "[limits.clinician]\nreads_per_second = 1000000.0\n\
     read_burst = 1000000\ndistinct_records_per_hour = 1000000\n\
     distinct_records_per_day = 1000000\n";

/// The runtime to measure on, or `None` when the binary runs without
/// `--bench` (as `cargo test --benches` does): then nothing is measured.
pub fn runtime_if_measuring() -> Option<tokio::runtime::Runtime> {
    std::env::args().any(|a| a == "--bench").then(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

pub fn authed<T>(t: &str, m: T) -> Request<T> {
    let mut r = Request::new(m);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {t}").parse().unwrap());
    r
}

pub struct Bench {
    pub vault: Arc<Vault>,
    pub addr: String,
    pub token: Arc<String>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), coffre::server::ServeError>>,
    _root: tempfile::TempDir,
}

/// Starts a server (storage passed through `wrap`), with `extra` TOML and
/// [`RECORDS`] records.
pub async fn start(extra: &str, wrap: impl FnOnce(Arc<dyn Backend>) -> Arc<dyn Backend>) -> Bench {
    start_with(extra, wrap, RECORDS).await
}

/// [`start`] with `records` records (ids `p0`…), loaded by 16 clients.
pub async fn start_with(
    extra: &str,
    wrap: impl FnOnce(Arc<dyn Backend>) -> Arc<dyn Backend>,
    records: u64,
) -> Bench {
    let root = tempfile::tempdir().unwrap();
    let cfg = root.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "dev = true\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nmaster_key_file = {:?}\n\
             [argon2]\nm_kib = 64\nt = 1\np = 1\n{extra}\n",
            root.path().join("data"),
            root.path().join("m.key")
        ),
    )
    .unwrap();
    let config = Config::load_with_env(Some(&cfg), |_| None).unwrap();
    let (vault, _) = Vault::open_with(&config, Some(PW.into()), wrap)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(coffre::server::run(
        vault.clone(),
        Default::default(),
        listener,
        async {
            let _ = rx.await;
        },
    ));
    let ch = connect(&addr).await;
    let login = |t: &str, u: &str| pb::LoginRequest {
        otp: Default::default(),
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
            oidc: Default::default(),
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
    let mut loaders = Vec::new();
    for c in 0..16 {
        let (ch, token) = (connect(&addr).await, token.clone());
        loaders.push(tokio::spawn(async move {
            let mut r = RecordsClient::new(ch);
            for i in (c..records).step_by(16) {
                r.put_record(authed(
                    &token,
                    pb::PutRecordRequest {
                        record: Some(pb::Record {
                            id: format!("p{i}"),
                            fields: coffre::sample::sample_fields(i),
                            version: 0,
                        }),
                    },
                ))
                .await
                .unwrap();
            }
        }));
    }
    for l in loaders {
        l.await.unwrap();
    }
    Bench {
        vault,
        addr,
        token,
        stop,
        server,
        _root: root,
    }
}

pub async fn connect(addr: &str) -> Channel {
    Channel::from_shared(addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// GetRecord figures of one load phase.
pub struct Load {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Bench {
    /// `clients` concurrent clients reading the records for `secs`.
    pub async fn get_load(&self, clients: usize, secs: Duration) -> Load {
        let deadline = Instant::now() + secs;
        self.get_load_while(clients, RECORDS, move || Instant::now() < deadline)
            .await
    }

    /// `clients` concurrent clients reading the first `records` records
    /// for as long as `go` says.
    pub async fn get_load_while(
        &self,
        clients: usize,
        records: u64,
        go: impl Fn() -> bool + Clone + Send + 'static,
    ) -> Load {
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let ch = connect(&self.addr).await;
            let (token, go) = (self.token.clone(), go.clone());
            tasks.push(tokio::spawn(async move {
                let mut r = RecordsClient::new(ch);
                let mut lat = Vec::new();
                let mut i = c as u64;
                while go() {
                    let t = Instant::now();
                    r.get_record(authed(
                        &token,
                        pb::GetRecordRequest {
                            id: format!("p{}", i % records),
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
        Load {
            rps: lat.len() as f64 / secs,
            p50_ms: lat[lat.len() / 2] as f64 / 1000.0,
            p99_ms: lat[lat.len() * 99 / 100] as f64 / 1000.0,
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
    }
}
