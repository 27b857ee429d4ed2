//! The `coffre` command line: the server (`serve`, `keygen`) and a gRPC
//! client for administrators and applications. Passwords come from a prompt
//! or stdin, never argv. Errors are one line and a non-zero exit.

use std::{
    io::{BufRead, IsTerminal, Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tonic::{
    Request,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use zeroize::Zeroizing;

use crate::{
    config::Config,
    pb::{self, admin_client::AdminClient, auth_client::AuthClient, records_client::RecordsClient},
    vault::{BOOTSTRAP_PASSWORD_ENV, Bootstrap, Vault},
};

#[derive(Parser)]
#[command(
    name = "coffre",
    version,
    about = "Encrypted vault for patient records"
)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Global {
    /// Server URL: http://host:port in dev mode, https://host:port with TLS.
    #[arg(
        long,
        global = true,
        env = "COFFRE_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    addr: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, global = true, env = "COFFRE_CA")]
    ca: Option<PathBuf>,
    /// Where `coffre login` keeps the token (0600); COFFRE_TOKEN wins over it.
    #[arg(long, global = true, env = "COFFRE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a new master key file (0600, never over an existing file).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Log in; the password is read from a prompt or stdin.
    Login {
        #[arg(long, default_value = "system")]
        tenant: String,
        #[arg(long, default_value = "admin")]
        username: String,
        /// Also print the token (for `export COFFRE_TOKEN=...`).
        #[arg(long)]
        print_token: bool,
    },
    /// Revoke the current token.
    Logout,
    /// Change the logged-in principal's password (read from the prompt or
    /// two lines of stdin: old, then new); other sessions are revoked.
    Passwd,
    /// Tenants: create, plant honeytokens, crypto-shred (admins).
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Principals: create, lock, unlock, list (admins; list also auditors).
    #[command(subcommand)]
    Principal(PrincipalCmd),
    /// Records: put, get, find, delete (clinicians and services).
    #[command(subcommand)]
    Record(RecordCmd),
    /// Tenant keys: rotate, rewrap, status, retire; master key rotation.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// The audit trail: query, verify, alerts, report, export (auditors).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Load generator: N concurrent clients against a running server.
    Bench(BenchArgs),
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Create a tenant.
    Create {
        name: String,
        /// A field FindRecords can search (repeatable).
        #[arg(long = "index")]
        indexed_fields: Vec<String>,
    },
    /// Plant honeytokens: canary records that look like the tenant's own;
    /// reading one locks the reader. Keep the printed ids to yourself.
    Honeytoken {
        name: String,
        /// How many canaries to plant.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Crypto-shred a tenant: destroy its keys, then its data. Its records
    /// can never be read again, from this server or from any backup taken
    /// before (once the master key has been rotated). Cannot be undone.
    Shred {
        name: String,
        /// The tenant's name again, to confirm.
        #[arg(long)]
        confirm: String,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Make a new data key version active for the tenant's writes.
    Rotate {
        #[arg(long)]
        tenant: String,
    },
    /// Re-encrypt every field under an older version with the active one
    /// (online, resumable: run it again after an interruption).
    Rewrap {
        #[arg(long)]
        tenant: String,
    },
    /// Rotate the tenant's blind-index key and rebuild its index online
    /// (FindRecords keeps working; resumable).
    RotateIndex {
        #[arg(long)]
        tenant: String,
    },
    /// Key versions: fields sealed, encryptions performed, retired or not.
    Status {
        #[arg(long)]
        tenant: String,
    },
    /// Re-wrap every key of the data directory under a new master key
    /// (made by `coffre keygen`). Offline: stop the server first. Crash-safe
    /// and rerunnable; afterwards only the new key file opens the vault.
    RotateMaster {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The new master key file.
        #[arg(long)]
        new_key: PathBuf,
    },
    /// Destroy a version that seals no field any more.
    Retire {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        version: u32,
    },
}

#[derive(Subcommand)]
enum PrincipalCmd {
    /// Create a principal; the password is read from a prompt or stdin.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        username: String,
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// Lock a principal: its tokens stop at once, login is refused.
    Lock {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        username: String,
    },
    /// Unlock principals (audited, alerted): one or more `--username`, or
    /// `--all-locked` after a guessing storm. Clears failed logins.
    Unlock {
        #[arg(long)]
        tenant: String,
        /// Repeatable.
        #[arg(long, required_unless_present = "all_locked")]
        username: Vec<String>,
        /// Every locked principal of the tenant.
        #[arg(long, conflicts_with = "username")]
        all_locked: bool,
    },
    /// Names, roles and locks of a tenant's principals (admins; auditors).
    List {
        #[arg(long)]
        tenant: String,
    },
}

/// A principal's role.
#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    /// Manages tenants, principals and keys (tenant `system` only).
    Admin,
    /// Reads and writes records, under a read budget.
    Clinician,
    /// An application: reads and writes records, under a read budget.
    Service,
    /// Reads the audit trail (of its tenant, or all from `system`).
    Auditor,
}

/// The format of `audit export`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header line.
    Csv,
}

#[derive(Subcommand)]
enum RecordCmd {
    /// Store a record read as JSON from stdin: {"id": "...", "fields": {...}}.
    Put,
    /// Print a record as JSON.
    Get {
        id: String,
        #[arg(long = "field")]
        fields: Vec<String>,
        #[arg(long, default_value = "")]
        purpose: String,
    },
    /// Ids of records whose indexed field equals the value read from stdin.
    Find {
        #[arg(long)]
        field: String,
        #[arg(long, default_value = "")]
        purpose: String,
    },
    /// Delete a record, its index entries and its secrets.
    Delete {
        id: String,
        #[arg(long, default_value = "")]
        purpose: String,
    },
}

#[derive(Args, Clone, Default)]
struct AuditFilter {
    #[arg(long)]
    tenant: Option<String>,
    /// `tenant/username`.
    #[arg(long)]
    principal: Option<String>,
    #[arg(long)]
    record_id: Option<String>,
    /// Full RPC name or its last part (`GetRecord`).
    #[arg(long)]
    action: Option<String>,
    /// `ok` or a status name in lower case (`permission_denied`).
    #[arg(long)]
    outcome: Option<String>,
    /// Unix milliseconds, or an age such as `7d`, `24h`, `30m`.
    #[arg(long)]
    since: Option<String>,
    #[arg(long)]
    until: Option<String>,
    #[arg(long, default_value_t = 0)]
    limit: u32,
    #[arg(long)]
    newest_first: bool,
    /// Only events with a smaller seq: the next page after the last seq
    /// shown (with `--newest-first`).
    #[arg(long, default_value_t = 0)]
    before_seq: u64,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Events matching the filters, as a table or JSON lines.
    Query(AuditFilter),
    /// Recompute the chain; non-zero exit if it fails.
    Verify {
        /// `SEQ:HASH` from `coffre audit checkpoint`, kept elsewhere.
        #[arg(long)]
        checkpoint: Option<String>,
        /// Cross-check a mirror file (JSON lines) against the store.
        #[arg(long)]
        mirror: Option<PathBuf>,
    },
    /// Print the current `SEQ:HASH` for the auditor to keep elsewhere.
    Checkpoint,
    /// Alerts (lockouts, unlocks, …) since a time.
    Alerts {
        /// Unix milliseconds, or an age such as `7d`, `24h`, `30m`.
        #[arg(long, default_value = "7d")]
        since: String,
    },
    /// Every access to one record: the list a patient may ask for.
    Patient { record_id: String },
    /// Per tenant and period: reads per principal ranked, refused and
    /// throttled calls, lockouts, off-hours reads, and principals whose
    /// distinct-record count stands far above their role's median.
    Report {
        #[arg(long)]
        tenant: Option<String>,
        /// Unix milliseconds, or an age such as `30d`.
        #[arg(long, default_value = "30d")]
        since: String,
        #[arg(long)]
        until: Option<String>,
        /// Office hours as START-END in local hours; reads outside are listed.
        #[arg(long, default_value = "7-20")]
        office_hours: String,
        /// The time zone of the office hours (IANA name).
        #[arg(long, default_value = "Europe/Paris")]
        time_zone: String,
        /// Flag principals reading more than this many times their role's median.
        #[arg(long, default_value_t = 3.0)]
        outlier_factor: f64,
    },
    /// Export events as JSON lines or CSV.
    Export {
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        #[command(flatten)]
        filter: AuditFilter,
    },
}

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Concurrent clients (one HTTP/2 connection each).
    #[arg(long, default_value_t = 16)]
    pub(crate) clients: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    pub(crate) seconds: u64,
    /// Records seeded before the GetRecord phase.
    #[arg(long, default_value_t = 1000)]
    pub(crate) records: usize,
    /// Only load this many records (for memory measurements), then exit.
    #[arg(long)]
    pub(crate) fill: Option<usize>,
}

/// A one-line failure for the user.
#[derive(Debug)]
pub struct CliError(pub(crate) String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(e: impl std::fmt::Display) -> CliError {
    CliError(
        e.to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The server address of this run, for hints on transport failures.
static ADDR: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn status_err(s: tonic::Status) -> CliError {
    // A transport failure surfaces as a status made on this side, with a
    // cause (a status from the server never carries one).
    if let Some(src) = std::error::Error::source(&s) {
        let chain = format!("{}: {}", s.message(), error_chain(src));
        let addr = ADDR.get().map_or("", String::as_str);
        if let Some(hint) = transport_hint(&chain, addr) {
            return CliError(format!("cannot reach {addr}: {hint}"));
        }
        return CliError(format!("cannot reach {addr}: {chain}"));
    }
    let code = format!("{:?}", s.code());
    if s.message().is_empty() {
        CliError(code)
    } else {
        CliError(format!("{code}: {}", s.message()))
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coffre: error: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coffre: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<(), CliError> {
    let g = cli.global;
    let _ = ADDR.set(g.addr.clone());
    match cli.command {
        Command::Serve { config } => serve(config.as_deref()).await,
        Command::Keygen { out } => {
            crate::keys::generate_key_file(&out).map_err(err)?;
            say(
                &g,
                &format!("wrote {}", out.display()),
                json!({"path": out}),
            );
            Ok(())
        }
        Command::Login {
            tenant,
            username,
            print_token,
        } => login(&g, &tenant, &username, print_token).await,
        Command::Logout => {
            let mut c = AuthClient::new(connect(&g).await?);
            c.logout(authed(&g, pb::LogoutRequest {})?)
                .await
                .map_err(status_err)?;
            let _ = std::fs::remove_file(token_path(&g));
            say(&g, "logged out", json!({"ok": true}));
            Ok(())
        }
        Command::Passwd => {
            let old = read_secret("current password: ", false)?;
            let new = read_secret("new password: ", true)?;
            let mut c = AuthClient::new(connect(&g).await?);
            c.change_password(authed(
                &g,
                pb::ChangePasswordRequest {
                    old_password: old.to_string(),
                    new_password: new.to_string(),
                },
            )?)
            .await
            .map_err(status_err)?;
            say(&g, "password changed", json!({"ok": true}));
            Ok(())
        }
        Command::Tenant(TenantCmd::Create {
            name,
            indexed_fields,
        }) => {
            let mut c = AdminClient::new(connect(&g).await?);
            c.create_tenant(authed(
                &g,
                pb::CreateTenantRequest {
                    name: name.clone(),
                    indexed_fields,
                },
            )?)
            .await
            .map_err(status_err)?;
            say(
                &g,
                &format!("tenant {name} created"),
                json!({"tenant": name}),
            );
            Ok(())
        }
        Command::Tenant(TenantCmd::Honeytoken { name, count }) => {
            let mut c = AdminClient::new(connect(&g).await?);
            let mut ids = Vec::new();
            for _ in 0..count {
                let r = c
                    .create_honeytoken(authed(
                        &g,
                        pb::CreateHoneytokenRequest {
                            tenant: name.clone(),
                        },
                    )?)
                    .await
                    .map_err(status_err)?;
                ids.push(r.into_inner().id);
            }
            say(
                &g,
                &format!("{count} honeytoken(s) planted in {name}: {}", ids.join(" ")),
                json!({"tenant": name, "ids": ids}),
            );
            Ok(())
        }
        Command::Tenant(TenantCmd::Shred { name, confirm }) => {
            let mut c = AdminClient::new(connect(&g).await?);
            c.shred_tenant(authed(
                &g,
                pb::ShredTenantRequest {
                    tenant: name.clone(),
                    confirm,
                },
            )?)
            .await
            .map_err(status_err)?;
            say(
                &g,
                &format!("tenant {name} shredded: its keys are destroyed, its records unreadable"),
                json!({"tenant": name, "shredded": true}),
            );
            Ok(())
        }
        Command::Principal(cmd) => principal(&g, cmd).await,
        Command::Record(cmd) => record(&g, cmd).await,
        Command::Bench(args) => bench(&g, args).await,
        Command::Keys(cmd) => keys(&g, cmd).await,
        Command::Audit(cmd) => audit(&g, cmd).await,
    }
}

fn say(g: &Global, human: &str, machine: serde_json::Value) {
    if g.json {
        println!("{machine}");
    } else {
        println!("{human}");
    }
}

fn disable_core_dumps() -> Result<(), CliError> {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| err(format!("disable core dumps: {e}")))?;
    // Also keeps other processes of the same user from ptrace-reading keys.
    nix::sys::prctl::set_dumpable(false).map_err(|e| err(format!("set non-dumpable: {e}")))
}

async fn serve(config_path: Option<&Path>) -> Result<(), CliError> {
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
    if let Some(p) = &report.generated_key {
        eprintln!(
            "coffre: dev mode: generated a new master key at {} (keep it; without it the data is unreadable)",
            p.display()
        );
    }
    if let Some(pw) = &report.bootstrap_password {
        // Printed once, to the operator's terminal, never to the log.
        eprintln!(
            "coffre: created administrator system/admin with password: {}\ncoffre: change it with `coffre login` then `coffre passwd`; it is not shown again.",
            &**pw
        );
    } else if report.bootstrapped {
        eprintln!(
            "coffre: created administrator system/admin with the password from {BOOTSTRAP_PASSWORD_ENV}"
        );
    }
    let tls = crate::server::tls_config(&config).map_err(err)?;
    let listener = tokio::net::TcpListener::bind(config.listen_addr())
        .await
        .map_err(|e| err(format!("listen on {}: {e}", config.listen)))?;
    let local = listener.local_addr().map_err(err)?;
    let scheme = if config.dev { "http" } else { "https" };
    println!("coffre: listening on {scheme}://{local}");
    let _ = std::io::stdout().flush();
    tracing::info!(addr = %local, dev = config.dev, "serving");
    // SIGTERM stops accepting and drains; a client that keeps its
    // connection open must not hold the exit past the 10 s operators expect.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown_signal().await;
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
        r = crate::server::run(vault, config.audit.retention_days, tls, listener, shutdown) => r.map_err(err)?,
        _ = drain_deadline => {
            tracing::warn!("drain timed out; closing remaining connections");
            store.flush_blocking().map_err(err)?;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long SIGTERM waits for in-flight calls before closing connections.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(7);

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down: draining calls");
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COFFRE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sled=warn,h2=warn"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if config.log_format == "json" {
        let _ = b.json().try_init();
    } else {
        let _ = b.try_init();
    }
}

/// Opens a channel to the server named by `--addr`.
async fn connect(g: &Global) -> Result<Channel, CliError> {
    connect_to(&g.addr, g.ca.as_deref()).await
}

pub(crate) async fn connect_to(addr: &str, ca: Option<&Path>) -> Result<Channel, CliError> {
    if !addr.contains("://") {
        return Err(err(format!(
            "--addr {addr} needs a scheme: http://{addr} in dev mode, https://{addr} with TLS"
        )));
    }
    let mut ep = Endpoint::from_shared(addr.to_string())
        .map_err(|_| err(format!("--addr {addr} is not a URL")))?
        .connect_timeout(Duration::from_secs(5));
    if addr.starts_with("https://") {
        let ca = ca.ok_or_else(|| err("https needs the server's CA: --ca FILE or COFFRE_CA"))?;
        let pem = std::fs::read(ca).map_err(|e| err(format!("{}: {e}", ca.display())))?;
        ep = ep
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(err)?;
    }
    ep.connect().await.map_err(|e| {
        let chain = error_chain(&e);
        match transport_hint(&chain, addr) {
            Some(hint) => err(format!("cannot reach {addr}: {hint}")),
            None => err(format!("cannot reach {addr}: {chain}")),
        }
    })
}

/// An error and its causes, on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    parts.join(": ")
}

/// What a person can do about a transport failure, from its causes.
fn transport_hint(chain: &str, addr: &str) -> Option<String> {
    let plain = addr.starts_with("http://");
    let hint = if chain.contains("UnknownIssuer")
        || chain.contains("unknown issuer")
        || chain.contains("BadSignature")
    {
        "the server's certificate is not signed by the CA given: pass the CA that signed it with --ca FILE (or COFFRE_CA)".to_string()
    } else if chain.contains("NotValidForName") || chain.contains("not valid for name") {
        "the server's certificate does not name this host: use a host name its certificate carries in --addr".to_string()
    } else if chain.contains("Expired") || chain.contains("expired") {
        "the server's certificate has expired (or this machine's clock is wrong): renew it"
            .to_string()
    } else if chain.contains("InvalidContentType")
        || chain.contains("corrupt message")
        || chain.contains("WrongVersion")
    {
        format!(
            "the server does not speak TLS: in dev mode use {}",
            addr.replacen("https://", "http://", 1)
        )
    } else if plain
        && (chain.contains("connection closed")
            || chain.contains("frame")
            || chain.contains("h2 protocol")
            || chain.contains("broken pipe")
            || chain.contains("reset"))
    {
        format!(
            "the server expects TLS: use {} with --ca FILE",
            addr.replacen("http://", "https://", 1)
        )
    } else if chain.contains("Connection refused") || chain.contains("connection refused") {
        "nothing listens there: is `coffre serve` running, and is --addr (COFFRE_ADDR) right?"
            .to_string()
    } else if chain.contains("timed out") {
        "no answer within 5 s: check the host, the port and any firewall".to_string()
    } else {
        return None;
    };
    Some(hint)
}

fn token_path(g: &Global) -> PathBuf {
    g.token_file.clone().unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".coffre").join("token")
    })
}

fn token(g: &Global) -> Result<Zeroizing<String>, CliError> {
    if let Ok(t) = std::env::var("COFFRE_TOKEN") {
        return Ok(Zeroizing::new(t));
    }
    std::fs::read_to_string(token_path(g))
        .map(|t| Zeroizing::new(t.trim().to_string()))
        .map_err(|_| err("not logged in: run `coffre login` or set COFFRE_TOKEN"))
}

fn authed<T>(g: &Global, msg: T) -> Result<Request<T>, CliError> {
    with_token(&token(g)?, msg)
}

pub(crate) fn with_token<T>(token: &str, msg: T) -> Result<Request<T>, CliError> {
    let mut req = Request::new(msg);
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| err("token is malformed"))?;
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

/// Reads a secret from the terminal without echo, or one line of stdin.
fn read_secret(prompt: &str, confirm: bool) -> Result<Zeroizing<String>, CliError> {
    if std::io::stdin().is_terminal() {
        let a = Zeroizing::new(rpassword::prompt_password(prompt).map_err(err)?);
        if confirm {
            let b = Zeroizing::new(rpassword::prompt_password("again: ").map_err(err)?);
            if *a != *b {
                return Err(err("the two entries differ"));
            }
        }
        Ok(a)
    } else {
        let mut line = Zeroizing::new(String::new());
        std::io::stdin().lock().read_line(&mut line).map_err(err)?;
        let trimmed = line.trim_end_matches(['\r', '\n']).to_string();
        Ok(Zeroizing::new(trimmed))
    }
}

async fn login(g: &Global, tenant: &str, username: &str, print: bool) -> Result<(), CliError> {
    let password = read_secret("password: ", false)?;
    let mut c = AuthClient::new(connect(g).await?);
    let resp = c
        .login(pb::LoginRequest {
            tenant: tenant.into(),
            username: username.into(),
            password: password.to_string(),
        })
        .await
        .map_err(|s| {
            if s.code() == tonic::Code::Unauthenticated {
                // A locked account answers like a wrong password (so a
                // guesser learns nothing): say what a person can do.
                CliError(format!(
                    "{}; if it persists, the account may be locked: ask an administrator (coffre principal list)",
                    status_err(s)
                ))
            } else {
                status_err(s)
            }
        })?
        .into_inner();
    let token = Zeroizing::new(resp.token);
    let path = token_path(g);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    }
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    f.write_all(token.as_bytes()).map_err(err)?;
    if g.json {
        let mut v = json!({"tenant": tenant, "username": username, "expires_at_unix": resp.expires_at_unix});
        if print {
            v["token"] = json!(&*token);
        }
        println!("{v}");
    } else if print {
        println!("{}", &*token);
    } else {
        println!(
            "logged in as {tenant}/{username}; token saved to {}",
            path.display()
        );
    }
    Ok(())
}

async fn keys(g: &Global, cmd: KeysCmd) -> Result<(), CliError> {
    // Every command but the offline rotate-master talks to the server.
    let admin = || async { Ok::<_, CliError>(AdminClient::new(connect(g).await?)) };
    match cmd {
        KeysCmd::Rotate { tenant } => {
            let r = admin()
                .await?
                .rotate_tenant_key(authed(
                    g,
                    pb::RotateTenantKeyRequest {
                        tenant: tenant.clone(),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            say(
                g,
                &format!(
                    "tenant {tenant}: key version {} active; run `coffre keys rewrap --tenant {tenant}`",
                    r.active_version
                ),
                json!({"tenant": tenant, "active_version": r.active_version}),
            );
        }
        KeysCmd::Rewrap { tenant } => {
            let st = admin()
                .await?
                .rewrap_tenant(authed(
                    g,
                    pb::RewrapTenantRequest {
                        tenant: tenant.clone(),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            let (last, took) = follow(g, st, "fields").await?;
            say(
                g,
                &format!(
                    "tenant {tenant}: {} of {} fields under the active key ({took:.1} s)",
                    last.done, last.total
                ),
                json!({"tenant": tenant, "done": last.done, "total": last.total}),
            );
        }
        KeysCmd::RotateIndex { tenant } => {
            let st = admin()
                .await?
                .rotate_index_key(authed(
                    g,
                    pb::RotateIndexKeyRequest {
                        tenant: tenant.clone(),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            let (last, took) = follow(g, st, "records").await?;
            say(
                g,
                &format!(
                    "tenant {tenant}: index rebuilt under a new key, {} records ({took:.1} s); the old key is destroyed",
                    last.total
                ),
                json!({"tenant": tenant, "done": last.done, "total": last.total}),
            );
        }
        KeysCmd::Status { tenant } => {
            let r = admin()
                .await?
                .key_status(authed(
                    g,
                    pb::KeyStatusRequest {
                        tenant: tenant.clone(),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            if g.json {
                let versions: Vec<_> = r
                    .versions
                    .iter()
                    .map(|v| {
                        json!({"version": v.version, "fields": v.fields, "encryptions": v.encryptions,
                               "retired": v.retired, "active": v.version == r.active_version})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"tenant": tenant, "active_version": r.active_version, "versions": versions,
                           "encryptions_are_upper_bounds": true})
                );
            } else {
                println!(
                    "{:>7}  {:>12}  {:>12}  state",
                    "version", "fields", "encryptions"
                );
                for v in &r.versions {
                    let state = if v.retired {
                        "retired"
                    } else if v.version == r.active_version {
                        "active"
                    } else {
                        "decrypt only"
                    };
                    println!(
                        "{:>7}  {:>12}  {:>12}  {state}",
                        v.version, v.fields, v.encryptions
                    );
                }
                // Counts are made durable in blocks, ahead of use, so that a
                // crash never under-counts: after a restart they jump.
                println!(
                    "encryptions are upper bounds (counted durably in blocks of {} ahead of use; exact near the rotation bound)",
                    crate::keys::COUNTER_BLOCK
                );
            }
        }
        KeysCmd::RotateMaster { config, new_key } => {
            rotate_master(g, config.as_deref(), &new_key).await?
        }
        KeysCmd::Retire { tenant, version } => {
            admin()
                .await?
                .retire_key_version(authed(
                    g,
                    pb::RetireKeyVersionRequest {
                        tenant: tenant.clone(),
                        version,
                    },
                )?)
                .await
                .map_err(status_err)?;
            say(
                g,
                &format!("tenant {tenant}: key version {version} retired and destroyed"),
                json!({"tenant": tenant, "retired": version}),
            );
        }
    }
    Ok(())
}

async fn rotate_master(g: &Global, config: Option<&Path>, new_key: &Path) -> Result<(), CliError> {
    let config = crate::config::Config::load(config).map_err(err)?;
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    if same(new_key, &config.master_key_file) {
        return Err(err(
            "--new-key is the current master key file: make a new one with `coffre keygen`",
        ));
    }
    let old = crate::keys::load_key_file(&config.master_key_file).map_err(err)?;
    let new = crate::keys::load_key_file(new_key).map_err(err)?;
    // Holding sled's lock proves no server is running on this directory.
    let held = crate::storage::Storage::open_sled(
        &config.data_dir,
        &crate::storage::SledOptions {
            cache_capacity_bytes: 1 << 20,
        },
    )
    .map_err(|e| match e {
        crate::storage::StorageError::Locked(_) => err(format!("{e}: stop the server first")),
        e => err(format!(
            "data_dir {}: {e} (stop the server first)",
            config.data_dir.display()
        )),
    })?;
    let outcome = crate::keys::rotate_master(&config.data_dir, &old, &new, None).map_err(err)?;
    let (human, keys) = match outcome {
        crate::keys::MasterRotation::Rotated { keys } => (format!("re-wrapped {keys} keys"), keys),
        crate::keys::MasterRotation::AlreadyDone => ("already under the new key".to_string(), 0),
    };
    // In the trail like every key operation: opened with the new key, the
    // audit key is the same as before, so the chain simply goes on.
    let ring =
        crate::keys::Keyring::open(held.clone(), &config.data_dir, &new, u64::MAX).map_err(err)?;
    let audit_key = crate::crypto::SecretKey::from_slice(ring.audit_key().expose())
        .expect("audit key is KEY_LEN bytes");
    let audit = crate::audit::Audit::open(
        held.clone(),
        audit_key,
        &config.data_dir,
        config.audit.mirror_file.as_deref(),
        config.alert_file.as_deref(),
    )
    .map_err(err)?;
    let operator = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    audit
        .record(pb::AuditEvent {
            tenant: "system".into(),
            principal: format!("system/cli:{operator}"),
            role: "admin".into(),
            action: "keys/rotate_master".into(),
            purpose: format!("{keys} keys re-wrapped under a new master key"),
            outcome: "ok".into(),
            ..Default::default()
        })
        .await
        .map_err(err)?;
    say(
        g,
        &format!(
            "{human}: now set master_key_file = {} (or move it over {}), start the server, \
             and destroy the old key file and every copy of it",
            new_key.display(),
            config.master_key_file.display()
        ),
        json!({"rewrapped": keys, "new_key": new_key, "old_key": config.master_key_file}),
    );
    Ok(())
}

/// Follows a key job's progress stream, with a progress bar on a terminal;
/// returns the last report and the seconds taken.
async fn follow(
    g: &Global,
    mut st: tonic::Streaming<pb::RewrapProgress>,
    unit: &str,
) -> Result<(pb::RewrapProgress, f64), CliError> {
    let bar = std::io::stderr().is_terminal() && !g.json;
    let started = std::time::Instant::now();
    let mut last = pb::RewrapProgress::default();
    while let Some(p) = st.message().await.map_err(status_err)? {
        last = p;
        if bar {
            eprint!(
                "\r{}",
                progress_line(p.done, p.total, unit, started.elapsed())
            );
        }
    }
    if bar {
        eprintln!();
    }
    Ok((last, started.elapsed().as_secs_f64()))
}

/// `[#####.....] 40 %  12000/30000 fields  8 500/s  ETA 2 s`
fn progress_line(done: u64, total: u64, unit: &str, elapsed: std::time::Duration) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = (frac * 30.0).round() as usize;
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let eta = if rate > 0.0 {
        format!("{:.0} s", (total.saturating_sub(done)) as f64 / rate)
    } else {
        "?".into()
    };
    format!(
        "[{}{}] {:>3.0} %  {done}/{total} {unit}  {rate:.0}/s  ETA {eta}   ",
        "#".repeat(filled.min(30)),
        ".".repeat(30 - filled.min(30)),
        frac * 100.0
    )
}

async fn principal(g: &Global, cmd: PrincipalCmd) -> Result<(), CliError> {
    let mut c = AdminClient::new(connect(g).await?);
    match cmd {
        PrincipalCmd::Create {
            tenant,
            username,
            role,
        } => {
            let (role, pb_role) = match role {
                RoleArg::Admin => (crate::model::Role::Admin, pb::Role::Admin),
                RoleArg::Clinician => (crate::model::Role::Clinician, pb::Role::Clinician),
                RoleArg::Service => (crate::model::Role::Service, pb::Role::Service),
                RoleArg::Auditor => (crate::model::Role::Auditor, pb::Role::Auditor),
            };
            let password = read_secret("new password: ", true)?;
            c.create_principal(authed(
                g,
                pb::CreatePrincipalRequest {
                    tenant: tenant.clone(),
                    username: username.clone(),
                    password: password.to_string(),
                    role: pb_role as i32,
                },
            )?)
            .await
            .map_err(status_err)?;
            say(
                g,
                &format!("principal {tenant}/{username} created ({})", role.as_str()),
                json!({"tenant": tenant, "username": username, "role": role.as_str()}),
            );
        }
        PrincipalCmd::Lock { tenant, username } => {
            set_locked(g, &mut c, tenant, username, true).await?
        }
        PrincipalCmd::Unlock {
            tenant,
            username,
            all_locked,
        } => {
            let names = if all_locked {
                list_principals(g, &mut c, &tenant)
                    .await?
                    .into_iter()
                    .filter(|p| p.locked)
                    .map(|p| p.username)
                    .collect()
            } else {
                username
            };
            if names.is_empty() {
                say(g, "no locked principal", json!({"unlocked": []}));
            }
            for username in names {
                set_locked(g, &mut c, tenant.clone(), username, false).await?;
            }
        }
        PrincipalCmd::List { tenant } => {
            let list = list_principals(g, &mut c, &tenant).await?;
            if g.json {
                for p in &list {
                    println!(
                        "{}",
                        json!({
                            "tenant": tenant,
                            "username": p.username,
                            "role": p.role,
                            "locked": p.locked,
                            "lock_reason": p.lock_reason,
                            "locked_until_unix_ms": p.locked_until_unix_ms,
                            "failed_logins": p.failed_logins,
                        })
                    );
                }
            } else {
                println!("{:<32} {:<10} {:<7} REASON", "USERNAME", "ROLE", "LOCKED");
                for p in &list {
                    println!(
                        "{:<32} {:<10} {:<7} {}",
                        p.username,
                        p.role,
                        if p.locked { "yes" } else { "no" },
                        p.lock_reason
                    );
                }
            }
        }
    }
    Ok(())
}

async fn list_principals(
    g: &Global,
    c: &mut AdminClient<Channel>,
    tenant: &str,
) -> Result<Vec<pb::PrincipalInfo>, CliError> {
    Ok(c.list_principals(authed(
        g,
        pb::ListPrincipalsRequest {
            tenant: tenant.to_string(),
        },
    )?)
    .await
    .map_err(status_err)?
    .into_inner()
    .principals)
}

async fn set_locked(
    g: &Global,
    c: &mut AdminClient<Channel>,
    tenant: String,
    username: String,
    locked: bool,
) -> Result<(), CliError> {
    c.set_principal_locked(authed(
        g,
        pb::SetPrincipalLockedRequest {
            tenant: tenant.clone(),
            username: username.clone(),
            locked,
        },
    )?)
    .await
    .map_err(status_err)?;
    let word = if locked { "locked" } else { "unlocked" };
    say(
        g,
        &format!("principal {tenant}/{username} {word}"),
        json!({"tenant": tenant, "username": username, "locked": locked}),
    );
    Ok(())
}

async fn record(g: &Global, cmd: RecordCmd) -> Result<(), CliError> {
    let mut c = RecordsClient::new(connect(g).await?);
    match cmd {
        RecordCmd::Put => {
            let mut input = Zeroizing::new(String::new());
            std::io::stdin().read_to_string(&mut input).map_err(err)?;
            #[derive(serde::Deserialize)]
            struct In {
                #[serde(default)]
                id: String,
                fields: std::collections::HashMap<String, String>,
            }
            let rec: In = serde_json::from_str(&input).map_err(|_| {
                err("stdin must be JSON: {\"id\": \"...\", \"fields\": {\"name\": \"value\"}}")
            })?;
            let r = c
                .put_record(authed(
                    g,
                    pb::PutRecordRequest {
                        record: Some(pb::Record {
                            id: rec.id,
                            fields: rec.fields,
                            version: 0,
                        }),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            say(
                g,
                &format!("stored {} version {}", r.id, r.version),
                json!({"id": r.id, "version": r.version}),
            );
        }
        RecordCmd::Get {
            id,
            fields,
            purpose,
        } => {
            let r = c
                .get_record(authed(
                    g,
                    pb::GetRecordRequest {
                        id,
                        fields,
                        purpose,
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner()
                .record
                .unwrap_or_default();
            let fields: std::collections::BTreeMap<_, _> = r.fields.into_iter().collect();
            println!(
                "{}",
                json!({"id": r.id, "version": r.version, "fields": fields})
            );
        }
        RecordCmd::Find { field, purpose } => {
            let value = read_secret("value: ", false)?;
            let r = c
                .find_records(authed(
                    g,
                    pb::FindRecordsRequest {
                        field,
                        value: value.to_string(),
                        purpose,
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            if g.json {
                println!("{}", json!({"ids": r.ids}));
            } else {
                for id in r.ids {
                    println!("{id}");
                }
            }
        }
        RecordCmd::Delete { id, purpose } => {
            c.delete_record(authed(
                g,
                pb::DeleteRecordRequest {
                    id: id.clone(),
                    purpose,
                },
            )?)
            .await
            .map_err(status_err)?;
            say(g, &format!("deleted {id}"), json!({"id": id}));
        }
    }
    Ok(())
}

fn parse_when(s: &Option<String>) -> Result<i64, CliError> {
    let Some(s) = s else { return Ok(0) };
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = n.parse().map_err(|_| {
        err(format!(
            "{s:?}: use unix milliseconds or an age like 7d, 24h, 30m"
        ))
    })?;
    let secs = match unit {
        "d" => n * 86_400,
        "h" => n * 3_600,
        "m" => n * 60,
        _ => return Err(err(format!("{s:?}: unit must be d, h or m"))),
    };
    Ok(crate::accounts::now_ms() - secs * 1000)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` from unix milliseconds (UTC).
fn fmt_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

async fn fetch_events(g: &Global, f: &AuditFilter) -> Result<Vec<pb::AuditEvent>, CliError> {
    let mut c = pb::audit_client::AuditClient::new(connect(g).await?);
    let req = pb::QueryAuditRequest {
        tenant: f.tenant.clone().unwrap_or_default(),
        principal: f.principal.clone().unwrap_or_default(),
        record_id: f.record_id.clone().unwrap_or_default(),
        action: f.action.clone().unwrap_or_default(),
        outcome: f.outcome.clone().unwrap_or_default(),
        since_unix_ms: parse_when(&f.since)?,
        until_unix_ms: parse_when(&f.until)?,
        limit: f.limit,
        newest_first: f.newest_first,
        before_seq: f.before_seq,
    };
    let mut st = c
        .query_audit(authed(g, req)?)
        .await
        .map_err(status_err)?
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = st.message().await.map_err(status_err)? {
        out.push(e);
    }
    Ok(out)
}

fn print_events(g: &Global, events: &[pb::AuditEvent]) {
    if g.json {
        for e in events {
            println!("{}", crate::audit::to_json(e));
        }
        return;
    }
    println!(
        "{:>6}  {:<24}  {:<24}  {:<30}  {:<18}  {:<20}  purpose",
        "seq", "time (UTC)", "principal", "action", "outcome", "records"
    );
    for e in events {
        let action = e.action.trim_start_matches("coffre.v1.");
        let mut ids = e.record_ids.join(",");
        if ids.len() > 20 {
            ids = format!("{}… ({})", &ids[..16], e.record_ids.len());
        }
        println!(
            "{:>6}  {:<24}  {:<24}  {:<30}  {:<18}  {:<20}  {}",
            e.seq,
            fmt_time(e.time_unix_ms),
            e.principal,
            action,
            e.outcome,
            ids,
            e.purpose.escape_debug()
        );
    }
}

fn csv_cell(s: &str) -> String {
    // Quote always; neutralise spreadsheet formulas.
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    format!("\"{}\"", s.replace('"', "\"\""))
}

async fn audit(g: &Global, cmd: AuditCmd) -> Result<(), CliError> {
    match cmd {
        AuditCmd::Query(f) => print_events(g, &fetch_events(g, &f).await?),
        AuditCmd::Patient { record_id } => {
            let f = AuditFilter {
                record_id: Some(record_id),
                ..Default::default()
            };
            print_events(g, &fetch_events(g, &f).await?);
        }
        AuditCmd::Export { format, filter } => {
            let events = fetch_events(g, &filter).await?;
            match format {
                ExportFormat::Jsonl => {
                    for e in &events {
                        println!("{}", crate::audit::to_json(e));
                    }
                }
                ExportFormat::Csv => {
                    println!(
                        "seq,time_unix_ms,time,tenant,principal,role,action,record_ids,fields,purpose,outcome,peer,hash"
                    );
                    for e in &events {
                        let cells = [
                            e.seq.to_string(),
                            e.time_unix_ms.to_string(),
                            fmt_time(e.time_unix_ms),
                            e.tenant.clone(),
                            e.principal.clone(),
                            e.role.clone(),
                            e.action.clone(),
                            e.record_ids.join(" "),
                            e.fields.join(" "),
                            e.purpose.clone(),
                            e.outcome.clone(),
                            e.peer.clone(),
                            hex::encode(&e.hash),
                        ];
                        let row: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
                        println!("{}", row.join(","));
                    }
                }
            }
        }
        AuditCmd::Report {
            tenant,
            since,
            until,
            office_hours,
            time_zone,
            outlier_factor,
        } => {
            let f = AuditFilter {
                tenant,
                since: Some(since),
                until,
                ..Default::default()
            };
            let events = fetch_events(g, &f).await?;
            let (start, end) = office_hours
                .split_once('-')
                .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.parse::<i64>().ok()?)))
                .filter(|(a, b)| a < b && *b <= 24)
                .ok_or_else(|| err("--office-hours is START-END in hours, such as 7-20"))?;
            let tz: chrono_tz::Tz = time_zone.parse().map_err(|_| {
                err(format!(
                    "--time-zone {time_zone}: not an IANA time zone (such as Europe/Paris)"
                ))
            })?;
            let hours = crate::report::OfficeHours {
                start: start as u32,
                end: end as u32,
                tz,
            };
            let report = crate::report::build(&events, hours, outlier_factor);
            if g.json {
                println!("{}", serde_json::to_string_pretty(&report).map_err(err)?);
            } else {
                print!("{}", crate::report::render(&report));
            }
        }
        AuditCmd::Alerts { since } => {
            let mut c = pb::audit_client::AuditClient::new(connect(g).await?);
            let mut st = c
                .list_alerts(authed(
                    g,
                    pb::ListAlertsRequest {
                        since_unix_ms: parse_when(&Some(since))?,
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            if !g.json {
                println!(
                    "{:>6}  {:<24}  {:<9}  {:<16}  {:<24}  detail",
                    "seq", "time (UTC)", "severity", "kind", "principal"
                );
            }
            while let Some(a) = st.message().await.map_err(status_err)? {
                if g.json {
                    println!("{}", crate::audit::alert_json(&a));
                } else {
                    println!(
                        "{:>6}  {:<24}  {:<9}  {:<16}  {:<24}  {}",
                        a.seq,
                        fmt_time(a.time_unix_ms),
                        a.severity,
                        a.kind,
                        a.principal,
                        a.detail.escape_debug()
                    );
                }
            }
        }
        AuditCmd::Checkpoint => {
            let v = verify_call(g, None).await?;
            if !v.ok {
                return Err(err(format!(
                    "the chain fails at seq {} ({}): no checkpoint taken",
                    v.first_bad_seq, v.reason
                )));
            }
            let cp = format!("{}:{}", v.head_seq, hex::encode(&v.head_hash));
            say(
                g,
                &cp,
                json!({"seq": v.head_seq, "hash": hex::encode(&v.head_hash), "checkpoint": cp}),
            );
        }
        AuditCmd::Verify { checkpoint, mirror } => {
            let cp = checkpoint
                .map(|c| {
                    let (seq, hash) = c
                        .split_once(':')
                        .ok_or_else(|| err("--checkpoint is SEQ:HASH"))?;
                    let seq: u64 = seq
                        .parse()
                        .map_err(|_| err("--checkpoint SEQ is a number"))?;
                    let hash = hex::decode(hash).map_err(|_| err("--checkpoint HASH is hex"))?;
                    Ok::<_, CliError>((seq, hash))
                })
                .transpose()?;
            let v = verify_call(g, cp).await?;
            let mirror_report = match &mirror {
                Some(path) => Some(check_mirror(g, path).await?),
                None => None,
            };
            let mirror_ok = mirror_report.as_ref().is_none_or(|r| r.problem.is_none());
            if g.json {
                let m = mirror_report.as_ref().map(|r| {
                    json!({"ok": r.problem.is_none(), "problem": r.problem, "starts_at_seq": r.starts_at,
                           "events_before_mirror": r.before, "tenant": r.tenant})
                });
                println!(
                    "{}",
                    json!({"ok": v.ok && mirror_ok, "checked": v.checked, "first_bad_seq": v.first_bad_seq,
                           "reason": v.reason, "head_seq": v.head_seq, "head_hash": hex::encode(&v.head_hash),
                           "mirror": m})
                );
            } else if v.ok {
                println!(
                    "audit chain ok: {} events, head {}:{}",
                    v.checked,
                    v.head_seq,
                    hex::encode(&v.head_hash)
                );
            }
            if !v.ok {
                return Err(err(format!(
                    "audit chain FAILS at seq {}: {} ({} events checked before it)",
                    v.first_bad_seq, v.reason, v.checked
                )));
            }
            if let Some(r) = &mirror_report {
                if let Some(problem) = &r.problem {
                    return Err(err(format!("mirror differs from the store: {problem}")));
                }
                if !g.json {
                    if let Some(t) = &r.tenant {
                        println!("mirror compared on tenant {t}'s events (what this auditor sees)");
                    }
                    if let Some(seq) = r.starts_at {
                        println!(
                            "mirror starts at seq {seq}: the {} earlier events were written before it (mirror enabled later, or its head removed)",
                            r.before
                        );
                    }
                    println!("mirror matches the store");
                }
            }
        }
    }
    Ok(())
}

async fn verify_call(
    g: &Global,
    checkpoint: Option<(u64, Vec<u8>)>,
) -> Result<pb::VerifyAuditResponse, CliError> {
    let (checkpoint_seq, checkpoint_hash) = checkpoint.unwrap_or_default();
    let mut c = pb::audit_client::AuditClient::new(connect(g).await?);
    Ok(c.verify_audit(authed(
        g,
        pb::VerifyAuditRequest {
            checkpoint_seq,
            checkpoint_hash,
        },
    )?)
    .await
    .map_err(status_err)?
    .into_inner())
}

/// What `audit verify --mirror` found.
#[derive(Clone, Default)]
struct MirrorCheck {
    /// The first difference, if any.
    problem: Option<String>,
    /// The mirror's first event in scope, when it starts after the trail
    /// (the mirror was enabled later, or its head was cut).
    starts_at: Option<u64>,
    /// Stored events before `starts_at`: not expected in the mirror.
    before: u64,
    /// Only this tenant's events are compared (a tenant's auditor).
    tenant: Option<String>,
}

/// Compares the mirror with the events the caller may see: every stored
/// event from the mirror's first one on must be in it with the same hash,
/// and the mirror must hold nothing in scope that the store lacks. A
/// tenant's auditor sees its tenant's events only, so only those lines of
/// the mirror are compared.
async fn check_mirror(g: &Global, path: &Path) -> Result<MirrorCheck, CliError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    let stored = fetch_events(g, &AuditFilter::default()).await?;
    // The last event is this query's own: it names the caller's tenant.
    let tenant = stored
        .last()
        .map(|e| e.tenant.clone())
        .filter(|t| !t.is_empty() && t != crate::model::SYSTEM_TENANT);
    let mut mirror = std::collections::BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|_| err(format!("{}: line {} is not JSON", path.display(), n + 1)))?;
        let seq = v["seq"]
            .as_u64()
            .ok_or_else(|| err(format!("line {}: no seq", n + 1)))?;
        if tenant
            .as_deref()
            .is_some_and(|t| v["tenant"].as_str() != Some(t))
        {
            continue;
        }
        mirror.insert(seq, v["hash"].as_str().unwrap_or_default().to_string());
    }
    let mut check = MirrorCheck {
        tenant,
        ..Default::default()
    };
    let Some(first) = mirror.keys().next().copied() else {
        check.problem = Some("the mirror holds no event this auditor may see".into());
        return Ok(check);
    };
    if stored.first().is_some_and(|e| e.seq < first) {
        check.starts_at = Some(first);
    }
    for e in &stored {
        if e.seq < first {
            check.before += 1;
            continue;
        }
        match mirror.remove(&e.seq) {
            None => {
                check.problem = Some(format!("seq {} is missing from the mirror", e.seq));
                return Ok(check);
            }
            Some(h) if h != hex::encode(&e.hash) => {
                check.problem = Some(format!("seq {} has another hash in the mirror", e.seq));
                return Ok(check);
            }
            Some(_) => {}
        }
    }
    // The mirror may run ahead by the events of this very check.
    let last = stored.last().map_or(0, |e| e.seq);
    if let Some((seq, _)) = mirror.iter().find(|(s, _)| **s <= last) {
        check.problem = Some(format!("seq {seq} is in the mirror but not in the store"));
    }
    Ok(check)
}

async fn bench(g: &Global, args: BenchArgs) -> Result<(), CliError> {
    crate::bench::run(g.addr.clone(), g.ca.clone(), token(g)?, args, g.json)
        .await
        .map_err(err)
}
