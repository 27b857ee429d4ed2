//! Test harness: a real Coffre server on a loopback port with a temporary
//! data directory, reached through the generated gRPC clients. Argon2 is
//! made cheap through config (never by changing the defaults).

#![allow(dead_code)]

pub mod pg;

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use coffre::{
    config::Config,
    pb::{self, admin_client::AdminClient, auth_client::AuthClient, records_client::RecordsClient},
    vault::Vault,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{Request, transport::Channel};

pub const ADMIN_PASSWORD: &str = "violet anchor 8812 meadow crane";
pub const CLINICIAN_PASSWORD: &str = "harbor lantern 5521 cobalt fern";

/// Read budgets that tests of other features never reach; the budgets
/// themselves are tested in `tests/budgets.rs`, with their own limits.
pub const ROOMY_LIMITS: &str = "[limits.clinician]\nreads_per_second = 1000000.0\n\
     read_burst = 1000000\ndistinct_records_per_hour = 1000000\n\
     distinct_records_per_day = 1000000\nfinds_per_minute = 1000000\n\
     [limits.service]\nreads_per_second = 1000000.0\nread_burst = 1000000\n\
     distinct_records_per_hour = 1000000\ndistinct_records_per_day = 1000000\n";

/// Whether this run's backend is one of `backends`; if not, says loudly
/// that the test is skipped and why (a test of sled's files, say).
pub fn runs_on(backends: &[&str], why: &str) -> bool {
    let b = test_backend();
    if backends.contains(&b.as_str()) {
        return true;
    }
    // Straight to the terminal: the test harness captures `eprintln!`.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED on storage.backend = {b}: {why} ***"
    );
    false
}

/// The storage backends the whole suite runs against: `COFFRE_TEST_BACKEND`
/// picks one (default the first). A new backend joins by one line here and
/// one run in `.ci/run`.
pub const BACKENDS: &[&str] = &["sled", "postgres"];

/// The backend of this run of the suite.
pub fn test_backend() -> String {
    let b = std::env::var("COFFRE_TEST_BACKEND").unwrap_or_else(|_| BACKENDS[0].to_string());
    assert!(
        BACKENDS.contains(&b.as_str()),
        "COFFRE_TEST_BACKEND={b}: not one of {BACKENDS:?}"
    );
    b
}

/// With the postgres backend, the `[storage]` line naming the database of
/// the test rooted at `root` (one per root, made on first use); else empty.
pub fn postgres_url_line(root: &Path) -> String {
    if test_backend() != "postgres" {
        return String::new();
    }
    static URLS: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    let mut urls = URLS.lock().unwrap();
    let url = match urls.iter().find(|(r, _)| r == root) {
        Some((_, u)) => u.clone(),
        None => {
            let u = pg::shared()
                .expect("COFFRE_TEST_BACKEND=postgres needs the PostgreSQL server package")
                .new_database();
            urls.push((root.to_path_buf(), u.clone()));
            u
        }
    };
    format!("postgres_url = {url:?}\npool_size = 8\n")
}

/// A config for tests: dev mode on an ephemeral loopback port, cheap Argon2.
pub fn test_config(root: &Path) -> Config {
    test_config_with(root, ROOMY_LIMITS)
}

/// [`test_config`] with `extra` TOML (tables) in place of the roomy limits.
pub fn test_config_with(root: &Path, extra: &str) -> Config {
    let backend = test_backend();
    let url = postgres_url_line(root);
    let text = format!(
        "dev = true\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nmaster_key_file = {:?}\n\
         [argon2]\nm_kib = 64\nt = 1\np = 1\n[storage]\nbackend = {backend:?}\ncache_capacity_mib = 8\nmin_free_mib = 1\n{url}{extra}\n",
        root.join("data"),
        root.join("keys").join("master.key"),
    );
    let path = root.join("coffre.toml");
    std::fs::write(&path, text).unwrap();
    let mut config = Config::load_with_env(Some(&path), |_| None).unwrap();
    // Tests make many refused calls from one address on purpose; the
    // per-peer limit of refused calls is tested with its own settings.
    config.connections.refused_burst = 1_000_000;
    config.connections.refused_per_second = 1_000_000.0;
    config
}

pub struct TestServer {
    pub root: tempfile::TempDir,
    pub config: Config,
    pub addr: String,
    /// `host:port` of the probe listener, with `metrics.listen` set.
    pub metrics_addr: Option<String>,
    pub vault: Option<Arc<Vault>>,
    /// With `start_faulty`, the switch that makes storage writes fail.
    pub faults: Option<Arc<coffre::store::FaultyBackend>>,
    want_faults: bool,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let config = test_config(root.path());
        Self::start_with(root, config).await
    }

    /// A server whose storage writes can be made to fail (`faults`).
    pub async fn start_faulty() -> Self {
        let root = tempfile::tempdir().unwrap();
        let config = test_config(root.path());
        let mut s = Self::start_with(root, config).await;
        s.want_faults = true;
        s.restart().await;
        s
    }

    pub async fn start_with(root: tempfile::TempDir, config: Config) -> Self {
        let mut s = Self {
            root,
            config,
            addr: String::new(),
            metrics_addr: None,
            vault: None,
            faults: None,
            want_faults: false,
            stop: None,
            task: None,
        };
        s.boot().await;
        s
    }

    async fn boot(&mut self) {
        // sled releases its lock only once the previous instance is dropped.
        let deadline = Instant::now() + Duration::from_secs(10);
        let vault = loop {
            let want = self.want_faults;
            let mut faulty = None;
            let opened = Vault::open_with(&self.config, Some(ADMIN_PASSWORD.into()), |b| {
                if want {
                    let f = coffre::store::FaultyBackend::new(b);
                    faulty = Some(f.clone());
                    f
                } else {
                    b
                }
            })
            .await;
            self.faults = faulty;
            match opened {
                Ok((v, _)) => break v,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("vault did not open: {e}"),
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls = coffre::tls::Tls::load(&self.config).unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        self.addr = format!("{scheme}://{}", listener.local_addr().unwrap());
        // The probe listener on a port of its own, when the config asks.
        let metrics = match &self.config.metrics.listen {
            Some(_) => {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                self.metrics_addr = Some(l.local_addr().unwrap().to_string());
                Some(l)
            }
            None => None,
        };
        let options = coffre::server::Options {
            tls,
            metrics,
            tenant_labels: self.config.metrics.tenant_labels,
            ..Default::default()
        };
        let (tx, rx) = oneshot::channel::<()>();
        let v = vault.clone();
        self.task = Some(tokio::spawn(async move {
            coffre::server::run(v, options, listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        }));
        self.stop = Some(tx);
        self.vault = Some(vault);
    }

    /// Graceful stop; the data directory stays.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        self.vault = None;
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        self.boot().await;
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.data_dir.clone()
    }

    /// The store as someone with write access to the data (the data
    /// directory, or the database) would open it; the server is stopped
    /// first where the engine allows one process only (sled).
    pub async fn raw_store(&self) -> coffre::store::Storage {
        match self.config.storage.postgres_url.as_ref() {
            Some(url) if test_backend() == "postgres" => {
                let b = coffre::store::PostgresBackend::open(&coffre::store::PostgresOptions {
                    url: url.expose().to_string(),
                    pool_size: 2,
                })
                .await
                .unwrap();
                coffre::store::Storage::new(Arc::new(b))
            }
            _ => open_store(&self.data_dir()).await,
        }
    }

    /// Every file that holds this server's data at rest: the data
    /// directory (sled), or the database's files in the cluster after a
    /// checkpoint (postgres).
    pub fn stored_files(&self) -> Vec<(String, Vec<u8>)> {
        match pg_database(&self.config) {
            Some(_) => stored_files_at(self.root.path()),
            None => all_files(&self.data_dir()),
        }
    }

    /// Bytes the server's data takes at rest.
    pub fn stored_size(&self) -> u64 {
        match pg_database(&self.config) {
            Some((pg, db)) => pg
                .sql(&db, "SELECT pg_database_size(current_database())")
                .parse()
                .unwrap(),
            None => all_files(&self.data_dir())
                .iter()
                .map(|(_, b)| b.len() as u64)
                .sum(),
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn login(
        &self,
        tenant: &str,
        user: &str,
        password: &str,
    ) -> Result<String, tonic::Status> {
        AuthClient::new(self.channel().await)
            .login(pb::LoginRequest {
                otp: Default::default(),
                tenant: tenant.into(),
                username: user.into(),
                password: password.into(),
            })
            .await
            .map(|r| r.into_inner().token)
    }

    pub async fn admin_token(&self) -> String {
        self.login("system", "admin", ADMIN_PASSWORD).await.unwrap()
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    pub async fn records(&self) -> RecordsClient<Channel> {
        RecordsClient::new(self.channel().await)
    }

    /// Creates a principal (as the bootstrap admin).
    pub async fn principal(&self, tenant: &str, user: &str, role: pb::Role, password: &str) {
        let admin = self.admin_token().await;
        self.admin()
            .await
            .create_principal(authed(
                &admin,
                pb::CreatePrincipalRequest {
                    oidc: Default::default(),
                    tenant: tenant.into(),
                    username: user.into(),
                    password: password.into(),
                    role: role as i32,
                },
            ))
            .await
            .unwrap();
    }

    /// Plants a honeytoken in `tenant` (as the bootstrap admin); its id.
    pub async fn honeytoken(&self, tenant: &str) -> String {
        let admin = self.admin_token().await;
        self.admin()
            .await
            .create_honeytoken(authed(
                &admin,
                pb::CreateHoneytokenRequest {
                    tenant: tenant.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .id
    }

    /// Every alert the auditor behind `token` may see.
    pub async fn alerts(&self, token: &str) -> Vec<pb::Alert> {
        let mut st = pb::audit_client::AuditClient::new(self.channel().await)
            .list_alerts(authed(token, pb::ListAlertsRequest { since_unix_ms: 0 }))
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while let Some(a) = st.message().await.unwrap() {
            out.push(a);
        }
        out
    }

    /// Creates a tenant (indexed on `nir`) and a principal; returns its token.
    pub async fn tenant_with(&self, tenant: &str, user: &str, role: pb::Role) -> String {
        let admin = self.admin_token().await;
        let mut a = self.admin().await;
        let _ = a
            .create_tenant(authed(
                &admin,
                pb::CreateTenantRequest {
                    name: tenant.into(),
                    indexed_fields: vec!["nir".into()],
                },
            ))
            .await;
        a.create_principal(authed(
            &admin,
            pb::CreatePrincipalRequest {
                oidc: Default::default(),
                tenant: tenant.into(),
                username: user.into(),
                password: CLINICIAN_PASSWORD.into(),
                role: role as i32,
            },
        ))
        .await
        .unwrap();
        self.login(tenant, user, CLINICIAN_PASSWORD).await.unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// The events of a QueryAudit call made with `token` (an auditor's).
pub async fn events(s: &TestServer, token: &str, q: pb::QueryAuditRequest) -> Vec<pb::AuditEvent> {
    let mut st = pb::audit_client::AuditClient::new(s.channel().await)
        .query_audit(authed(token, q))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = st.message().await.unwrap() {
        out.push(e);
    }
    out
}

pub fn authed<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

pub fn put(id: &str, fields: &[(&str, &str)]) -> pb::PutRecordRequest {
    pb::PutRecordRequest {
        record: Some(pb::Record {
            id: id.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            version: 0,
        }),
    }
}

pub fn get(id: &str) -> pb::GetRecordRequest {
    pb::GetRecordRequest {
        id: id.into(),
        fields: vec![],
        purpose: "care".into(),
    }
}

/// The real `coffre` binary, run as a child process.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub stderr_path: PathBuf,
}

// A test that fails or forgets must not leave a server running behind it
// (CI machines run many test binaries in a row).
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the health service at `addr` (a URL) says `service` is
/// SERVING.
pub async fn serving(addr: &str, service: &str) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    tonic_health::pb::health_client::HealthClient::new(chan(addr).await)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        == ServingStatus::Serving as i32
}

/// Runs `cmd` to its end and panics with its output unless it succeeded.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_coffre")
}

/// Starts `coffre serve --config FILE` and waits for its listening line.
pub fn spawn_server(config_file: &Path, envs: &[(&str, &str)]) -> Result<Proc, String> {
    let dir = config_file.parent().unwrap();
    let stderr_path = dir.join(format!("stderr-{}.log", rand_suffix()));
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--config")
        .arg(config_file)
        .env_remove("COFFRE_BOOTSTRAP_ADMIN_PASSWORD")
        .env("COFFRE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(line)) if line.contains("listening on ") => {
            let addr = line.rsplit(' ').next().unwrap().to_string();
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            Ok(Proc {
                child,
                addr,
                stderr_path,
            })
        }
        _ => {
            let status = child.wait().map_err(|e| e.to_string())?;
            let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            Err(format!("{status}: {err}"))
        }
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes a config file for a child-process server under `root`.
pub fn write_config(root: &Path, extra: &str) -> PathBuf {
    let limits = if extra.contains("[limits.") {
        ""
    } else {
        ROOMY_LIMITS
    };
    let text = format!(
        "dev = true\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nmaster_key_file = {:?}\n{extra}\n\
         [argon2]\nm_kib = 64\nt = 1\np = 1\n[storage]\nbackend = {:?}\nmin_free_mib = 1\n{}{limits}",
        root.join("data"),
        root.join("keys").join("master.key"),
        test_backend(),
        postgres_url_line(root),
    );
    let path = root.join("coffre.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Opens a stopped server's store directly, as an attacker with write
/// access to the data directory would (sled frees its lock asynchronously).
pub async fn open_store(dir: &Path) -> coffre::store::Storage {
    for _ in 0..200 {
        if let Ok(s) = coffre::store::Storage::open_sled(
            dir,
            &coffre::store::SledOptions {
                cache_capacity_bytes: 1 << 20,
            },
        ) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("store did not open");
}

pub async fn chan(addr: &str) -> Channel {
    Channel::from_shared(addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Logs in to a server at `addr` (a child process); panics on refusal.
pub async fn bin_login(addr: &str, tenant: &str, user: &str, pw: &str) -> String {
    AuthClient::new(chan(addr).await)
        .login(pb::LoginRequest {
            otp: Default::default(),
            tenant: tenant.into(),
            username: user.into(),
            password: pw.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// Every file holding the data of the server whose config
/// [`write_config`] wrote under `root` (see [`TestServer::stored_files`]).
pub fn stored_files_at(root: &Path) -> Vec<(String, Vec<u8>)> {
    let line = postgres_url_line(root);
    match line.split('"').nth(1) {
        Some(url) if test_backend() == "postgres" => {
            let pg = pg::shared().unwrap();
            let db = url.rsplit('/').next().unwrap();
            pg.sql(db, "CHECKPOINT");
            let oid = pg.sql(
                db,
                "SELECT oid FROM pg_database WHERE datname = current_database()",
            );
            all_files(&pg.data_dir().join("base").join(oid))
        }
        _ => all_files(&root.join("data")),
    }
}

/// The shared cluster and the database name of a postgres config.
pub fn pg_database(config: &Config) -> Option<(&'static pg::PgCluster, String)> {
    if test_backend() != "postgres" {
        return None;
    }
    let url = config.storage.postgres_url.as_ref()?.expose().to_string();
    let db = url.rsplit('/').next()?.to_string();
    Some((pg::shared()?, db))
}

/// The trail's frames, `(first seq, bytes)` in seq order, of a stopped
/// server's last segment (sled) or of the whole table (postgres), as
/// `edit` leaves them: how the tamper tests act as someone with write
/// access to the data.
pub fn edit_trail(s: &TestServer, edit: impl FnOnce(&mut Vec<(u64, Vec<u8>)>)) {
    let Some((pg, db)) = pg_database(&s.config) else {
        return edit_frames(&s.data_dir(), edit);
    };
    let rows = pg.sql(
        &db,
        "SELECT first_seq || ' ' || encode(raw, 'hex') || ' ' || encode(prev, 'hex') || ' ' || first_time || ' ' || last_time FROM coffre_audit_frame ORDER BY first_seq",
    );
    let mut frames = Vec::new();
    let mut meta = Vec::new();
    for line in rows.lines() {
        let p: Vec<&str> = line.split(' ').collect();
        frames.push((p[0].parse::<u64>().unwrap(), hex::decode(p[1]).unwrap()));
        meta.push((p[2].to_string(), p[3].to_string(), p[4].to_string()));
    }
    let columns: Vec<u64> = frames.iter().map(|f| f.0).collect();
    edit(&mut frames);
    // Each row keeps the seq column of its position (the primary key an
    // attacker cannot duplicate); the bytes say what they say. The head
    // row is moved to the last frame, as an attacker covering a cut would.
    let mut sql = String::from("BEGIN; DELETE FROM coffre_audit_frame;");
    let mut next_col = 0;
    let mut head = (0u64, String::new());
    for (i, (_, raw)) in frames.iter().enumerate() {
        let count = u32::from_le_bytes(raw[12..16].try_into().unwrap()) as u64;
        let col = columns.get(i).copied().unwrap_or(next_col);
        next_col = col + count;
        head = (col + count - 1, hex::encode(&raw[16..48]));
        let (prev, t0, t1) = &meta[i.min(meta.len() - 1)];
        sql.push_str(&format!(
            "INSERT INTO coffre_audit_frame VALUES ({col}, {}, {t0}, {t1}, decode('{prev}', 'hex'), decode('{}', 'hex'));",
            col + count - 1,
            hex::encode(raw)
        ));
    }
    sql.push_str(&format!(
        "UPDATE coffre_audit_head SET seq = {}, hash = decode('{}', 'hex'); COMMIT;",
        head.0, head.1
    ));
    pg.sql(&db, &sql);
}

/// The first seq of the trail's frame that holds `seq`.
pub fn trail_frame_of(s: &TestServer, seq: u64) -> u64 {
    match pg_database(&s.config) {
        Some((pg, db)) => pg
            .sql(
                &db,
                &format!("SELECT first_seq FROM coffre_audit_frame WHERE first_seq <= {seq} ORDER BY first_seq DESC LIMIT 1"),
            )
            .parse()
            .unwrap(),
        None => frame_of(&s.data_dir(), seq).1,
    }
}

/// Every byte of every file under `dir`.
pub fn all_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// Through the server at `addr`, as the bootstrap admin: creates tenant
/// `clinic` (indexed on `nir`) and `principals` (tenant, user, password,
/// role).
pub async fn bin_setup(addr: &str, principals: &[(&str, &str, &str, pb::Role)]) {
    let admin = bin_login(addr, "system", "admin", ADMIN_PASSWORD).await;
    let mut a = AdminClient::new(chan(addr).await);
    a.create_tenant(authed(
        &admin,
        pb::CreateTenantRequest {
            name: "clinic".into(),
            indexed_fields: vec!["nir".into()],
        },
    ))
    .await
    .unwrap();
    for (tenant, user, password, role) in principals {
        a.create_principal(authed(
            &admin,
            pb::CreatePrincipalRequest {
                oidc: Default::default(),
                tenant: tenant.to_string(),
                username: user.to_string(),
                password: password.to_string(),
                role: *role as i32,
            },
        ))
        .await
        .unwrap();
    }
}

/// The trail's frame holding `seq`: `(segment, first seq, count)`.
pub fn frame_of(data_dir: &Path, seq: u64) -> (std::path::PathBuf, u64, u32) {
    let map = coffre::audit::log::frame_map(&coffre::audit::trail_dir(data_dir)).unwrap();
    let f = map
        .into_iter()
        .find(|f| (f.first_seq..f.first_seq + f.count as u64).contains(&seq))
        .expect("a frame holds the seq");
    (f.segment, f.first_seq, f.count)
}

/// Rewrites the last segment of a stopped server's trail as `edit` leaves
/// its frames (`(first seq, bytes)`, in file order): how the tamper tests
/// act as someone with write access to the data directory.
pub fn edit_frames(data_dir: &Path, edit: impl FnOnce(&mut Vec<(u64, Vec<u8>)>)) {
    let dir = coffre::audit::trail_dir(data_dir);
    let map = coffre::audit::log::frame_map(&dir).unwrap();
    let seg = map.last().expect("frames").segment.clone();
    let bytes = std::fs::read(&seg).unwrap();
    let head = coffre::audit::log::HEADER_LEN as usize;
    let mut frames: Vec<(u64, Vec<u8>)> = map
        .iter()
        .filter(|f| f.segment == seg)
        .map(|f| {
            let at = f.offset as usize;
            (f.first_seq, bytes[at..at + f.len as usize].to_vec())
        })
        .collect();
    edit(&mut frames);
    let mut out = bytes[..head].to_vec();
    for (_, f) in frames {
        out.extend_from_slice(&f);
    }
    std::fs::write(&seg, out).unwrap();
}

/// The password of the `system/auditor` the audit tests make.
pub const AUDITOR_PASSWORD: &str = "quill meadow 4402 ember slate";

/// Makes an auditor of tenant `system` (sees every tenant) and logs it in.
pub async fn system_auditor(s: &TestServer) -> String {
    s.principal("system", "auditor", pb::Role::Auditor, AUDITOR_PASSWORD)
        .await;
    s.login("system", "auditor", AUDITOR_PASSWORD)
        .await
        .unwrap()
}

/// `VerifyAudit` as `aud`, against a checkpoint if given.
pub async fn verify_audit(
    s: &TestServer,
    aud: &str,
    checkpoint: Option<(u64, Vec<u8>)>,
) -> pb::VerifyAuditResponse {
    let (checkpoint_seq, checkpoint_hash) = checkpoint.unwrap_or_default();
    pb::audit_client::AuditClient::new(s.channel().await)
        .verify_audit(authed(
            aud,
            pb::VerifyAuditRequest {
                checkpoint_seq,
                checkpoint_hash,
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// The forms a secret could take in a file: plain, UTF-16 (both orders),
/// hex, and base64 (standard and URL-safe, at each of the three alignments).
pub fn forms(secret: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let mut v = vec![secret.to_vec(), hex::encode(secret).into_bytes()];
    if let Ok(s) = std::str::from_utf8(secret) {
        v.push(s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect());
        v.push(s.encode_utf16().flat_map(|u| u.to_be_bytes()).collect());
    }
    for engine in [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE,
    ] {
        for pad in 0..3 {
            let mut buf = vec![0u8; pad];
            buf.extend_from_slice(secret);
            let enc = engine.encode(&buf);
            // Drop the characters that depend on the neighbouring bytes.
            let start = if pad == 0 {
                0
            } else {
                (pad * 4).div_ceil(3) + 1
            };
            let end = enc.trim_end_matches('=').len().saturating_sub(2);
            if end > start + 8 {
                v.push(enc.as_bytes()[start..end].to_vec());
            }
        }
    }
    v
}

// The second factor, computed the way an authenticator app does.

/// The secret of an otpauth URI (base32 → bytes).
pub fn totp_secret_of(uri: &str) -> Vec<u8> {
    let b32 = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut out, mut buf, mut bits) = (Vec::new(), 0u64, 0);
    for c in b32.bytes() {
        buf = (buf << 5) | alphabet.iter().position(|&a| a == c).unwrap() as u64;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

/// RFC 4226/6238: HMAC-SHA-1, dynamic truncation, 6 digits.
pub fn totp_code(secret: &[u8], step: i64) -> String {
    let mut mac = <hmac::Hmac<sha1::Sha1> as hmac::Mac>::new_from_slice(secret).unwrap();
    hmac::Mac::update(&mut mac, &(step as u64).to_be_bytes());
    let h = hmac::Mac::finalize(mac).into_bytes();
    let o = (h[19] & 15) as usize;
    let n = u32::from_be_bytes([h[o] & 0x7f, h[o + 1], h[o + 2], h[o + 3]]) % 1_000_000;
    format!("{n:06}")
}

pub fn totp_step_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        / 30
}

/// The approval id a refused call names, checked against its message.
pub fn approval_id(e: &tonic::Status) -> String {
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let id = e
        .metadata()
        .get("coffre-approval-id")
        .expect("the id in metadata")
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(e.message(), format!("approval required: {id}"));
    id
}
