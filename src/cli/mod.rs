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
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
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
    /// Client certificate (PEM) for a server that requires one (mTLS).
    #[arg(
        long,
        global = true,
        env = "COFFRE_CLIENT_CERT",
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(
        long,
        global = true,
        env = "COFFRE_CLIENT_KEY",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
    /// Where `coffre login` keeps the token (0600); COFFRE_TOKEN wins over it.
    #[arg(long, global = true, env = "COFFRE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Ask a server's health service (on its gRPC port, or on
    /// metrics.listen as http://host:port): exit 0 only when SERVING. For
    /// container health checks and scripts.
    Health {
        /// A service name (coffre.v1.Records, ...); empty: the server.
        #[arg(long, default_value = "")]
        service: String,
    },
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
        /// The second factor: a TOTP code or a recovery code. `--otp`
        /// alone prompts for it (or reads the next line of stdin).
        #[arg(long, num_args = 0..=1, default_missing_value = "")]
        otp: Option<String>,
        /// Single sign-on: log in with an id token of this `[oidc.<name>]`
        /// provider, read from stdin (no password).
        #[arg(long, conflicts_with_all = ["otp", "tenant", "username"])]
        oidc: Option<String>,
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
    /// Back up the whole vault while it serves (admins): one consistent
    /// snapshot, encrypted and authenticated under the master key.
    /// `coffre backup verify` checks a backup file offline.
    Backup(BackupArgs),
    /// Restore a backup file into an empty data directory (offline, with
    /// the master key; verifies the whole file before writing anything).
    Restore {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// Bring back a tenant on the shred list all the same (a court
        /// order; repeatable): audited and alerted, needs --reason.
        #[arg(long)]
        restore_shredded: Vec<String>,
        /// Why the shred list is overridden (written to the audit trail).
        #[arg(long)]
        reason: Option<String>,
        /// Restore without a shred list whose MAC checks (lost, or made
        /// under another key): needs --reason; audited with a critical
        /// alert. Tenants shredded in the backup's own trail stay out.
        #[arg(long)]
        no_shred_list: bool,
    },
    /// Check every stored record whole and against the audit trail's last
    /// write of it (admins, online, paced); non-zero exit on any failure.
    Scrub,
    /// Load generator: N concurrent clients against a running server.
    Bench(BenchArgs),
    /// The second factor (TOTP): enrol, confirm, reset someone's.
    #[command(subcommand)]
    Mfa(MfaCmd),
    /// The two-person rule: list, approve or deny requests (admins).
    #[command(subcommand)]
    Approvals(ApprovalsCmd),
    /// Export grants: an honest bulk read beyond a budget (admins;
    /// two-person).
    #[command(subcommand)]
    Export(ExportCmd),
}

#[derive(Subcommand)]
enum MfaCmd {
    /// Start enrolment of the logged-in principal: prints the otpauth URI,
    /// a QR code to scan, and ten one-time recovery codes (shown once).
    /// Asks the account's password again (prompted, or read from stdin).
    Enroll {
        /// The account has no password: it logged in by single sign-on
        /// (`coffre login --oidc`) less than 300 s ago.
        #[arg(long)]
        sso: bool,
    },
    /// Finish enrolment with a code from the authenticator app (prompted,
    /// or read from stdin), then log in again with --otp.
    Confirm {
        #[arg(long)]
        otp: Option<String>,
    },
    /// Clear a principal's second factor (a lost phone): it enrols again
    /// at its next login. Needs a second admin's approval.
    Reset {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        username: String,
    },
}

#[derive(Subcommand)]
enum ApprovalsCmd {
    /// Requests of the last 30 days and their state, newest first.
    List {
        /// Only those in this state: pending, approved, denied, used,
        /// expired.
        #[arg(long)]
        state: Option<String>,
        /// At most this many (the server answers 100 without it, at most
        /// 1000).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Only those requested before this id (the last of a page).
        #[arg(long)]
        before: Option<String>,
    },
    /// Approve another admin's request; the requester then repeats the
    /// command once.
    Approve { id: String },
    /// Deny a request (or withdraw one's own).
    Deny { id: String },
}

#[derive(Subcommand)]
enum ExportCmd {
    /// Let a principal read up to --max-records records beyond its budget,
    /// with exactly --purpose, within --hours. Needs a second admin's
    /// approval; alerted when used, listed in `coffre audit report`.
    Grant {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        username: String,
        #[arg(long)]
        max_records: u32,
        #[arg(long)]
        purpose: String,
        #[arg(long)]
        hours: u32,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct BackupArgs {
    /// Where to write the backup file (never over an existing file).
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<BackupCmd>,
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Check a backup file whole with the master key, offline: its MAC and
    /// manifest, every key, record and field, the audit chain. A restore
    /// drill without restoring; nothing is written.
    Verify {
        #[arg(long)]
        config: Option<PathBuf>,
        file: PathBuf,
    },
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
    /// Print a master key file's check value: the id a backup names when
    /// it needs that key (label escrowed keys with it).
    CheckValue {
        #[arg(long)]
        key: PathBuf,
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
        /// Bind an OpenID Connect identity, `<provider>:<subject>`: the
        /// principal signs in by that provider only (no password asked).
        #[arg(long)]
        oidc: Option<String>,
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
        /// Offline, on the server, with its master key and no session: the
        /// way back when every other admin is locked (stop the server
        /// first with the embedded store). Audited, critical alert.
        #[arg(long, conflicts_with = "all_locked")]
        config: Option<PathBuf>,
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
    /// Which record phase to run after the health baseline: both, or only
    /// `get` or `put` (to count what one kind of call costs the database).
    #[arg(long, default_value = "all", value_parser = ["all", "get", "put"])]
    pub(crate) phase: String,
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
    if let Some(id) = s
        .metadata()
        .get("coffre-approval-id")
        .and_then(|v| v.to_str().ok())
    {
        return CliError(format!(
            "approval required: {id}; a second admin runs `coffre approvals approve {id}`, then run this command again (once, before the approval expires)"
        ));
    }
    let code = format!("{:?}", s.code());
    if s.message().is_empty() {
        CliError(code)
    } else {
        CliError(format!("{code}: {}", s.message()))
    }
}

/// A status met while reading a streamed answer: the server's own (a
/// stream dropped because this side stopped reading says so), or the
/// connection breaking mid-stream — never a hint about how to connect
/// (TLS, certificates), which worked.
fn stream_err(s: tonic::Status) -> CliError {
    match std::error::Error::source(&s) {
        Some(src) => CliError(format!(
            "the answer was cut: the connection broke while it streamed ({}: {})",
            s.message(),
            error_chain(src)
        )),
        None => status_err(s),
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
        Command::Health { service } => health(&g, &service).await,
        Command::Keygen { out } => {
            // Its shred list beside it, empty, from the start: every vault
            // has one, and a missing one is then a loss, not a default.
            let list = crate::shredlist::default_path(&out);
            if list.exists() {
                return Err(err(format!(
                    "{} exists (the shred list of an earlier key?): move it away first",
                    list.display()
                )));
            }
            crate::keys::generate_key_file(&out).map_err(err)?;
            let key = crate::keys::load_key_file(&out).map_err(err)?;
            crate::shredlist::ShredList::create_empty(&list, key.shred_list_key()).map_err(err)?;
            say(
                &g,
                &format!(
                    "wrote {} and its shred list {} (escrow both together)",
                    out.display(),
                    list.display()
                ),
                json!({"path": out, "shred_list": list}),
            );
            Ok(())
        }
        Command::Login {
            tenant,
            username,
            print_token,
            otp,
            oidc,
        } => login(&g, &tenant, &username, print_token, otp, oidc).await,
        Command::Mfa(cmd) => mfa(&g, cmd).await,
        Command::Approvals(cmd) => approvals(&g, cmd).await,
        Command::Export(cmd) => export(&g, cmd).await,
        Command::Logout => logout(&g).await,
        Command::Passwd => passwd(&g).await,
        Command::Tenant(cmd) => tenant(&g, cmd).await,
        Command::Principal(cmd) => principal(&g, cmd).await,
        Command::Record(cmd) => record(&g, cmd).await,
        Command::Bench(args) => bench(&g, args).await,
        Command::Keys(cmd) => keys(&g, cmd).await,
        Command::Audit(cmd) => audit(&g, cmd).await,
        Command::Backup(BackupArgs { out, cmd }) => match (cmd, out) {
            (Some(BackupCmd::Verify { config, file }), _) => {
                backup::verify(&g, config.as_deref(), &file).await
            }
            (None, Some(out)) => backup::backup(&g, &out).await,
            (None, None) => Err(err("coffre backup needs --out FILE")),
        },
        Command::Restore {
            config,
            from,
            restore_shredded,
            reason,
            no_shred_list,
        } => {
            backup::restore(
                &g,
                config.as_deref(),
                &from,
                crate::ops::restore::RestoreOptions {
                    restore_shredded,
                    reason,
                    no_shred_list,
                    operator: std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
                },
            )
            .await
        }
        Command::Scrub => backup::scrub(&g).await,
    }
}

async fn health(g: &Global, service: &str) -> Result<(), CliError> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let ch = connect(g).await?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let status = tokio::time::timeout(
        Duration::from_secs(5),
        h.check(HealthCheckRequest {
            service: service.to_string(),
        }),
    )
    .await
    .map_err(|_| err("no answer within 5 s"))?
    .map_err(status_err)?
    .into_inner()
    .status;
    let name = ServingStatus::try_from(status)
        .map(|s| s.as_str_name())
        .unwrap_or("UNKNOWN");
    say(g, name, json!({"service": service, "status": name}));
    if status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(err(format!(
            "{} is {name}",
            if service.is_empty() {
                "the server"
            } else {
                service
            }
        )))
    }
}

fn say(g: &Global, human: &str, machine: serde_json::Value) {
    if g.json {
        println!("{machine}");
    } else {
        println!("{human}");
    }
}

mod audit;
mod backup;
mod bench;
mod client;
mod keys;
mod login;
mod mfa;
mod principal;
mod record;
mod serve;
mod tenant;

use audit::*;
use bench::*;
use client::*;
use keys::*;
use login::*;
use mfa::*;
use principal::*;
use record::*;
use serve::*;
use tenant::*;
