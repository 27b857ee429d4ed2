//! Server configuration: a TOML file, every key overridable by an
//! environment variable `COFFRE_<KEY>` (dots become underscores:
//! `argon2.m_kib` ← `COFFRE_ARGON2_M_KIB`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0}: {1}")]
    Read(String, String),
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, `host:port`.
    pub listen: String,
    pub data_dir: PathBuf,
    /// Must lie outside `data_dir`, so that a copy of the data is not a copy
    /// of the key.
    pub master_key_file: PathBuf,
    /// Plaintext gRPC on loopback, for development only.
    pub dev: bool,
    pub tls: TlsConfig,
    pub argon2: Argon2Config,
    pub session: SessionConfig,
    pub storage: StorageConfig,
    pub alert_file: Option<PathBuf>,
    pub audit: AuditConfig,
    pub keys: KeysConfig,
    /// Scheduled backups (`backup.dir` unset: none).
    pub backup: BackupConfig,
    /// What one connection, one account and one peer may hold or send.
    pub connections: ConnectionsConfig,
    /// `text` or `json`.
    pub log_format: String,
    pub metrics: MetricsConfig,
    /// Read budgets per role (`[limits.<role>]`, role `clinician` or
    /// `service`), over the built-in defaults of `budgets`.
    pub limits: BTreeMap<String, LimitsConfig>,
    /// Per-tenant overrides (`[tenants.<name>.limits.<role>]`), over
    /// `limits`.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// OpenID Connect providers whose id tokens log in (`[oidc.<name>]`).
    pub oidc: BTreeMap<String, OidcProviderConfig>,
    /// The second factor (`[mfa]`).
    pub mfa: MfaConfig,
    /// The two-person rule (`[approval]`).
    pub approval: ApprovalConfig,
}

/// One OpenID Connect provider (`[oidc.<name>]`): Pro Santé Connect, or the
/// hospital's own (Keycloak, ADFS, Entra ID).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OidcProviderConfig {
    /// The `iss` its id tokens carry, exactly.
    pub issuer: String,
    /// The `aud` they must carry: Coffre's client id at the provider.
    pub audience: String,
    /// Where its signing keys are published (HTTPS; plain HTTP only to a
    /// loopback address). One of `jwks_url` and `jwks_file`.
    pub jwks_url: Option<String>,
    /// The JWKS as a file (re-read when a token names an unknown key).
    pub jwks_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) for `jwks_url`, beside the system's.
    pub ca_file: Option<PathBuf>,
    /// The tenant whose principals this provider logs in.
    pub tenant: String,
    /// The claim that names the person (default `sub`).
    pub subject_claim: Option<String>,
    /// Accepted signature algorithms: RS256, PS256, ES256 (default all
    /// three). Never `none`, never HMAC.
    pub algorithms: Option<Vec<String>>,
    /// If set, the token's `acr` must be one of these.
    pub required_acr: Vec<String>,
    /// Oldest `iat` accepted, in seconds (default 300).
    pub max_age_secs: Option<u64>,
    /// Clock skew allowed on `exp`, `nbf` and `iat` (default 30).
    pub leeway_secs: Option<u64>,
}

/// `[mfa]`: which roles log in with a TOTP code.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MfaConfig {
    /// Default `["admin", "auditor"]`, and `[]` in dev mode.
    pub required_roles: Option<Vec<String>>,
}

/// `[approval]`: the actions a second admin must approve.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApprovalConfig {
    /// Any of `shred_tenant`, `retire_key_version`, `reset_mfa`,
    /// `export_grant`, `admin_change`; default all five, and `[]` in dev
    /// mode.
    pub required_for: Option<Vec<String>>,
    /// How long a request may wait for, then use, its approval.
    pub ttl_minutes: f64,
    /// An admin created less than this before a request cannot approve
    /// it: a puppet admin is useless, and its creation alert has time to
    /// be read. Default 60, and 0 in dev mode.
    pub min_approver_age_minutes: Option<f64>,
    /// Pending requests one admin may have at once.
    pub max_pending_per_requester: u32,
}

impl Default for ApprovalConfig {
    fn default() -> Self {
        Self {
            required_for: None,
            ttl_minutes: 60.0,
            min_approver_age_minutes: None,
            max_pending_per_requester: 10,
        }
    }
}

/// The longest a session or an approver's probation may be set to: longer
/// is a typo, and would overflow the clock's arithmetic.
const YEAR_SECS: u64 = 365 * 24 * 3600;

/// The least free space the store keeps outside dev mode, in MiB.
pub const MIN_FREE_MIB_PRODUCTION: u64 = 64;

/// The actions the two-person rule can guard.
pub const APPROVAL_ACTIONS: &[&str] = &[
    "shred_tenant",
    "retire_key_version",
    "reset_mfa",
    "export_grant",
    "admin_change",
];

/// Read-budget settings of one role; an absent key keeps the value below it
/// (tenant over `[limits]` over the built-in default).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub reads_per_second: Option<f64>,
    pub read_burst: Option<u32>,
    pub distinct_records_per_hour: Option<u32>,
    pub distinct_records_per_day: Option<u32>,
    pub finds_per_minute: Option<u32>,
    pub lock_after_throttles: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    pub limits: BTreeMap<String, LimitsConfig>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// With it, clients must present a certificate signed by this CA (mTLS).
    pub client_ca: Option<PathBuf>,
    /// Client certificates refused although the CA signed them: one serial
    /// number per line, in hex (`openssl x509 -serial` prints it); `#`
    /// starts a comment. Reloaded with the certificates on SIGHUP.
    pub deny_serials_file: Option<PathBuf>,
}

/// The Prometheus listener (`[metrics]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` serving `/metrics` and the gRPC health service, in
    /// plaintext; unset: no such listener.
    pub listen: Option<String>,
    /// Label per-tenant series with the tenant's name. Off by default: the
    /// listener is plaintext and tenant names can say which hospital
    /// services exist.
    pub tenant_labels: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Argon2Config {
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
    /// Hashes computed at once; the rest queue, so a login flood cannot take
    /// every core. 0 means one less than the number of cores (at least 1).
    pub max_concurrent: usize,
}

impl Default for Argon2Config {
    fn default() -> Self {
        // OWASP's Argon2id baseline: 19 MiB, 2 passes, 1 lane.
        Self {
            m_kib: 19456,
            t: 2,
            p: 1,
            max_concurrent: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    pub idle_secs: u64,
    pub absolute_secs: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_secs: 15 * 60,
            absolute_secs: 8 * 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Where every piece of state lives: `sled` (embedded, in `data_dir`;
    /// the default) or `postgres` (one database several nodes share).
    pub backend: StorageBackend,
    /// With `backend = "postgres"`: `postgres://user[:password]@host:port/db`.
    /// May carry a password: never logged, printed as `[redacted]`.
    pub postgres_url: Option<SecretString>,
    /// Connections to PostgreSQL per node.
    pub pool_size: usize,
    /// sled's page cache; bounds the server's memory whatever the data size.
    pub cache_capacity_mib: u64,
    /// Writes are refused (UNAVAILABLE, health NOT_SERVING) while the
    /// filesystem of `data_dir` has less free space than this: sled never
    /// meets a full disk, after which it would need a restart.
    pub min_free_mib: u64,
}

/// A config string that may hold a secret (a database password): its
/// `Debug` says `[redacted]`; the value leaves through [`SecretString::expose`].
#[derive(Clone, Deserialize, Serialize)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The value: only to hand it to the library that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The storage engines `storage.backend` names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    #[default]
    Sled,
    Postgres,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            backend: StorageBackend::Sled,
            postgres_url: None,
            pool_size: 16,
            cache_capacity_mib: 32,
            min_free_mib: 256,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    pub mirror_file: Option<PathBuf>,
    pub retention_days: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    pub rotate_after_encryptions: u64,
    /// The shred list (tenants whose keys were destroyed), kept with the
    /// master key and outside `data_dir`; default `<master_key_file>.shredded`.
    /// Set it where the master key's directory is read-only (a mounted
    /// secret, a systemd credential).
    pub shred_list_file: Option<PathBuf>,
}

impl Default for KeysConfig {
    fn default() -> Self {
        // 0.9 × 2^32: the NIST SP 800-38D bound for random 96-bit nonces,
        // with the margin Vault uses.
        Self {
            rotate_after_encryptions: (0.9 * 4_294_967_296.0) as u64,
            shred_list_file: None,
        }
    }
}

/// Backups the server writes on its own: one every `interval_hours` into
/// `dir` (files 0600, written whole then renamed), the last `keep` kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    pub dir: Option<PathBuf>,
    pub interval_hours: f64,
    pub keep: u32,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            dir: None,
            interval_hours: 24.0,
            keep: 7,
        }
    }
}

/// Bounds on what a slow, idle, silent or refused client may hold: memory,
/// file descriptors, streams, audit events.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// HTTP/2 keepalive ping interval; a peer that does not answer within
    /// `keepalive_timeout_secs` is disconnected.
    pub keepalive_secs: u64,
    pub keepalive_timeout_secs: u64,
    /// A connection that has not sent its first request (TLS handshake,
    /// HTTP/2 preface, headers) within this many seconds is closed.
    pub handshake_secs: u64,
    /// A connection with no call in progress for this long is closed.
    pub idle_secs: u64,
    /// Concurrent calls (HTTP/2 streams) on one connection.
    pub max_streams_per_connection: u32,
    /// Concurrent calls of one principal across all its connections; past
    /// it a call answers RESOURCE_EXHAUSTED (not a budget throttle).
    pub max_streams_per_principal: u32,
    /// A streamed response whose reader takes longer than this to accept
    /// the next message is dropped (and the drop is audited).
    pub stream_send_timeout_secs: u64,
    /// Calls refused before reaching the vault (bad or missing token,
    /// undecodable request, failed login) each peer address may make per
    /// second, with `refused_burst` at once, before they are refused
    /// without an event each: one summary event per peer and
    /// `refused_summary_secs` stands for them.
    pub refused_per_second: f64,
    pub refused_burst: u32,
    pub refused_summary_secs: u64,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            keepalive_secs: 30,
            keepalive_timeout_secs: 10,
            handshake_secs: 10,
            idle_secs: 300,
            max_streams_per_connection: 64,
            max_streams_per_principal: 64,
            stream_send_timeout_secs: 30,
            refused_per_second: 5.0,
            refused_burst: 50,
            refused_summary_secs: 10,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            data_dir: "coffre-data".into(),
            master_key_file: "keys/master.key".into(),
            dev: false,
            tls: TlsConfig::default(),
            argon2: Argon2Config::default(),
            session: SessionConfig::default(),
            storage: StorageConfig::default(),
            alert_file: None,
            audit: AuditConfig::default(),
            keys: KeysConfig::default(),
            backup: BackupConfig::default(),
            connections: ConnectionsConfig::default(),
            log_format: "text".into(),
            metrics: MetricsConfig::default(),
            limits: BTreeMap::new(),
            tenants: BTreeMap::new(),
            oidc: BTreeMap::new(),
            mfa: MfaConfig::default(),
            approval: ApprovalConfig::default(),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Float,
    Bool,
    /// Comma-separated (empty: an empty list).
    List,
}

/// Every scalar key an environment variable may override.
const ENV_KEYS: &[(&str, Kind)] = &[
    ("listen", Kind::Str),
    ("data_dir", Kind::Str),
    ("master_key_file", Kind::Str),
    ("dev", Kind::Bool),
    ("tls.cert", Kind::Str),
    ("tls.key", Kind::Str),
    ("tls.client_ca", Kind::Str),
    ("tls.deny_serials_file", Kind::Str),
    ("argon2.m_kib", Kind::Int),
    ("argon2.t", Kind::Int),
    ("argon2.p", Kind::Int),
    ("argon2.max_concurrent", Kind::Int),
    ("session.idle_secs", Kind::Int),
    ("session.absolute_secs", Kind::Int),
    ("storage.backend", Kind::Str),
    ("storage.postgres_url", Kind::Str),
    ("storage.pool_size", Kind::Int),
    ("storage.cache_capacity_mib", Kind::Int),
    ("storage.min_free_mib", Kind::Int),
    ("alert_file", Kind::Str),
    ("audit.mirror_file", Kind::Str),
    ("audit.retention_days", Kind::Int),
    ("keys.rotate_after_encryptions", Kind::Int),
    ("keys.shred_list_file", Kind::Str),
    ("backup.dir", Kind::Str),
    ("backup.interval_hours", Kind::Float),
    ("backup.keep", Kind::Int),
    ("connections.keepalive_secs", Kind::Int),
    ("connections.keepalive_timeout_secs", Kind::Int),
    ("connections.handshake_secs", Kind::Int),
    ("connections.idle_secs", Kind::Int),
    ("connections.max_streams_per_connection", Kind::Int),
    ("connections.max_streams_per_principal", Kind::Int),
    ("connections.stream_send_timeout_secs", Kind::Int),
    ("connections.refused_per_second", Kind::Float),
    ("connections.refused_burst", Kind::Int),
    ("connections.refused_summary_secs", Kind::Int),
    ("log_format", Kind::Str),
    ("metrics.listen", Kind::Str),
    ("metrics.tenant_labels", Kind::Bool),
    ("approval.ttl_minutes", Kind::Float),
    ("approval.required_for", Kind::List),
    ("approval.min_approver_age_minutes", Kind::Float),
    ("approval.max_pending_per_requester", Kind::Int),
    ("mfa.required_roles", Kind::List),
    ("limits.clinician.reads_per_second", Kind::Float),
    ("limits.clinician.read_burst", Kind::Int),
    ("limits.clinician.distinct_records_per_hour", Kind::Int),
    ("limits.clinician.distinct_records_per_day", Kind::Int),
    ("limits.clinician.finds_per_minute", Kind::Int),
    ("limits.clinician.lock_after_throttles", Kind::Int),
    ("limits.service.reads_per_second", Kind::Float),
    ("limits.service.read_burst", Kind::Int),
    ("limits.service.distinct_records_per_hour", Kind::Int),
    ("limits.service.distinct_records_per_day", Kind::Int),
    ("limits.service.finds_per_minute", Kind::Int),
    ("limits.service.lock_after_throttles", Kind::Int),
];

/// The environment variable that overrides a config key.
pub fn env_name(key: &str) -> String {
    format!("COFFRE_{}", key.replace('.', "_").to_uppercase())
}

impl Config {
    /// Where the shred list lives (`keys.shred_list_file`, or beside the
    /// master key file).
    pub fn shred_list_path(&self) -> PathBuf {
        self.keys
            .shred_list_file
            .clone()
            .unwrap_or_else(|| crate::shredlist::default_path(&self.master_key_file))
    }

    /// The roles that log in with a second factor.
    pub fn mfa_roles(&self) -> Vec<String> {
        match &self.mfa.required_roles {
            Some(r) => r.clone(),
            None if self.dev => Vec::new(),
            None => vec!["admin".into(), "auditor".into()],
        }
    }

    /// The actions a second admin must approve.
    pub fn approval_actions(&self) -> Vec<String> {
        match &self.approval.required_for {
            Some(a) => a.clone(),
            None if self.dev => Vec::new(),
            None => APPROVAL_ACTIONS.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// How long after its creation an admin may approve requests.
    pub fn min_approver_age_minutes(&self) -> f64 {
        match self.approval.min_approver_age_minutes {
            Some(m) => m,
            None if self.dev => 0.0,
            None => 60.0,
        }
    }

    /// What a start should tell the operator about a config it accepts but
    /// that weakens a defence.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if !self.dev && !self.approval_actions().iter().any(|a| a == "admin_change") {
            w.push("approval.required_for omits admin_change: one admin can create a second admin and approve its own requests with it".into());
        }
        for (name, p) in &self.oidc {
            if !self.dev && p.required_acr.is_empty() && p.tenant == "system" {
                w.push(format!(
                    "oidc.{name} logs in to tenant system without required_acr: its logins skip the second factor (admins and auditors cannot be bound to it)"
                ));
            }
        }
        if self.dev && self.storage.min_free_mib < MIN_FREE_MIB_PRODUCTION {
            w.push(format!(
                "storage.min_free_mib = {} is below {MIN_FREE_MIB_PRODUCTION}: a disk this full can wedge the embedded store (accepted in dev mode only)",
                self.storage.min_free_mib
            ));
        }
        w
    }

    /// Reads `file` (if any), applies environment overrides, and checks the
    /// result.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, |k| std::env::var(k).ok())
    }

    pub fn load_with_env(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| ConfigError::Read(p.display().to_string(), e.to_string()))?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Read(p.display().to_string(), one_line(&e)))?
            }
            None => toml::Table::new(),
        };
        for (key, kind) in ENV_KEYS {
            let name = env_name(key);
            let Some(raw) = env(&name) else { continue };
            let value =
                match kind {
                    Kind::Str => toml::Value::String(raw),
                    Kind::Int => toml::Value::Integer(raw.trim().parse().map_err(|_| {
                        ConfigError::Invalid(format!("{name} must be a whole number"))
                    })?),
                    Kind::Float => {
                        toml::Value::Float(raw.trim().parse().map_err(|_| {
                            ConfigError::Invalid(format!("{name} must be a number"))
                        })?)
                    }
                    Kind::List => toml::Value::Array(
                        raw.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(|s| toml::Value::String(s.to_string()))
                            .collect(),
                    ),
                    Kind::Bool => toml::Value::Boolean(match raw.trim() {
                        "1" | "true" | "yes" => true,
                        "0" | "false" | "no" => false,
                        _ => {
                            return Err(ConfigError::Invalid(format!(
                                "{name} must be true or false"
                            )));
                        }
                    }),
                };
            set_path(&mut table, key, value);
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(one_line(&e)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let addr: SocketAddr = self.listen.parse().map_err(|_| {
            ConfigError::Invalid(format!("listen {:?} is not host:port", self.listen))
        })?;
        if self.dev {
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Invalid(format!(
                    "dev mode serves plaintext and listens on loopback only, not {addr}"
                )));
            }
        } else if self.tls.cert.is_none() || self.tls.key.is_none() {
            return Err(ConfigError::Invalid(
                "tls.cert and tls.key are required unless dev = true".into(),
            ));
        }
        if self.argon2.m_kib < 8 * self.argon2.p.max(1) || self.argon2.t == 0 || self.argon2.p == 0
        {
            return Err(ConfigError::Invalid(
                "argon2: need t >= 1, p >= 1 and m_kib >= 8 * p".into(),
            ));
        }
        if self.session.idle_secs == 0 || self.session.absolute_secs < self.session.idle_secs {
            return Err(ConfigError::Invalid(
                "session: need idle_secs > 0 and absolute_secs >= idle_secs".into(),
            ));
        }
        if self.session.absolute_secs > YEAR_SECS {
            return Err(ConfigError::Invalid(
                "session.absolute_secs: at most a year (31536000)".into(),
            ));
        }
        if let Some(m) = &self.metrics.listen
            && m.parse::<SocketAddr>().is_err()
        {
            return Err(ConfigError::Invalid(format!(
                "metrics.listen {m:?} is not host:port"
            )));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid(
                "log_format must be text or json".into(),
            ));
        }
        let c = &self.connections;
        for (key, v) in [
            ("keepalive_secs", c.keepalive_secs),
            ("keepalive_timeout_secs", c.keepalive_timeout_secs),
            ("handshake_secs", c.handshake_secs),
            ("idle_secs", c.idle_secs),
            (
                "max_streams_per_connection",
                u64::from(c.max_streams_per_connection),
            ),
            (
                "max_streams_per_principal",
                u64::from(c.max_streams_per_principal),
            ),
            ("stream_send_timeout_secs", c.stream_send_timeout_secs),
            ("refused_burst", u64::from(c.refused_burst)),
            ("refused_summary_secs", c.refused_summary_secs),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!(
                    "connections.{key} must be at least 1"
                )));
            }
        }
        for r in self.mfa_roles() {
            if crate::model::Role::parse(&r).is_err() {
                return Err(ConfigError::Invalid(format!(
                    "mfa.required_roles: {r:?} is not a role (admin, clinician, service, auditor)"
                )));
            }
        }
        for a in self.approval_actions() {
            if !APPROVAL_ACTIONS.contains(&a.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "approval.required_for: {a:?} is not one of {}",
                    APPROVAL_ACTIONS.join(", ")
                )));
            }
        }
        let age = self.min_approver_age_minutes();
        if !(age.is_finite() && (0.0..=YEAR_SECS as f64 / 60.0).contains(&age)) {
            return Err(ConfigError::Invalid(
                "approval.min_approver_age_minutes: from 0 to a year (525600)".into(),
            ));
        }
        if self.approval.max_pending_per_requester == 0 {
            return Err(ConfigError::Invalid(
                "approval.max_pending_per_requester must be at least 1".into(),
            ));
        }
        if self.storage.min_free_mib == 0 {
            return Err(ConfigError::Invalid(
                "storage.min_free_mib must be at least 1: 0 turns off the only guard against a full disk wedging the store".into(),
            ));
        }
        if !self.dev && self.storage.min_free_mib < MIN_FREE_MIB_PRODUCTION {
            return Err(ConfigError::Invalid(format!(
                "storage.min_free_mib must be at least {MIN_FREE_MIB_PRODUCTION} outside dev mode (a disk this full can wedge the embedded store)"
            )));
        }
        if !(self.approval.ttl_minutes.is_finite()
            && self.approval.ttl_minutes > 0.0
            && self.approval.ttl_minutes <= 7.0 * 24.0 * 60.0)
        {
            return Err(ConfigError::Invalid(
                "approval.ttl_minutes: above 0, at most a week (10080)".into(),
            ));
        }
        for (name, p) in &self.oidc {
            crate::oidc::check_config(name, p).map_err(ConfigError::Invalid)?;
        }
        if !(self.backup.interval_hours.is_finite() && self.backup.interval_hours > 0.0)
            || self.backup.keep == 0
        {
            return Err(ConfigError::Invalid(
                "backup: need interval_hours > 0 and keep >= 1".into(),
            ));
        }
        if !(c.refused_per_second.is_finite() && c.refused_per_second > 0.0) {
            return Err(ConfigError::Invalid(
                "connections.refused_per_second must be a positive number".into(),
            ));
        }
        for (role, l) in &self.limits {
            l.validate(&format!("limits.{role}"), role)?;
        }
        for (tenant, t) in &self.tenants {
            if crate::model::TenantName::parse(tenant).is_err() {
                return Err(ConfigError::Invalid(format!(
                    "tenants.{tenant}: not a valid tenant name"
                )));
            }
            for (role, l) in &t.limits {
                l.validate(&format!("tenants.{tenant}.limits.{role}"), role)?;
            }
        }
        if inside(&self.master_key_file, &self.data_dir) {
            return Err(ConfigError::Invalid(
                "master_key_file must not lie inside data_dir".into(),
            ));
        }
        let url = self
            .storage
            .postgres_url
            .as_ref()
            .filter(|u| !u.expose().trim().is_empty());
        match (self.storage.backend, url) {
            (StorageBackend::Postgres, None) => {
                return Err(ConfigError::Invalid(
                    "storage.backend = \"postgres\" needs storage.postgres_url (or env COFFRE_STORAGE_POSTGRES_URL)"
                        .into(),
                ));
            }
            (StorageBackend::Postgres, Some(_)) if self.backup.dir.is_some() => {
                return Err(ConfigError::Invalid(
                    "backup.dir: scheduled backups of a PostgreSQL vault are not in this release; back up the database itself (pg_dump, pgBackRest, Barman)".into(),
                ));
            }
            (StorageBackend::Postgres, Some(_)) if self.storage.pool_size == 0 => {
                return Err(ConfigError::Invalid(
                    "storage.pool_size must be at least 1".into(),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> SocketAddr {
        // validate() has parsed it already.
        self.listen.parse().expect("listen validated at load")
    }
}

impl LimitsConfig {
    fn validate(&self, at: &str, role: &str) -> Result<(), ConfigError> {
        if !matches!(role, "clinician" | "service") {
            return Err(ConfigError::Invalid(format!(
                "{at}: only clinician and service read records"
            )));
        }
        if self
            .reads_per_second
            .is_some_and(|r| !(r.is_finite() && r > 0.0))
        {
            return Err(ConfigError::Invalid(format!(
                "{at}.reads_per_second must be a positive number"
            )));
        }
        for (key, v) in [
            ("read_burst", self.read_burst),
            ("distinct_records_per_hour", self.distinct_records_per_hour),
            ("distinct_records_per_day", self.distinct_records_per_day),
            ("finds_per_minute", self.finds_per_minute),
            ("lock_after_throttles", self.lock_after_throttles),
        ] {
            if v == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "{at}.{key} must be at least 1"
                )));
            }
        }
        Ok(())
    }
}

/// Whether `path` lies under `dir`, comparing absolute, normalised forms of
/// whatever exists of them.
fn inside(path: &Path, dir: &Path) -> bool {
    let abs = |p: &Path| -> PathBuf {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(p)
        };
        // Canonicalise the deepest existing ancestor, keep the rest.
        let mut existing = p.as_path();
        let mut rest = Vec::new();
        while !existing.exists() {
            match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_owned());
                    existing = parent;
                }
                _ => break,
            }
        }
        let mut out = existing
            .canonicalize()
            .unwrap_or_else(|_| existing.to_path_buf());
        for name in rest.into_iter().rev() {
            out.push(name);
        }
        out
    };
    abs(path).starts_with(abs(dir))
}

fn set_path(table: &mut toml::Table, dotted: &str, value: toml::Value) {
    let mut parts = dotted.split('.').peekable();
    let mut cur = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(part.to_string(), value);
            return;
        }
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        cur = entry.as_table_mut().expect("made a table just above");
    }
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every scalar path under `v` (`argon2.m_kib`), maps of roles and
    /// tenants left out.
    fn paths(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) if !(at == "limits" || at == "tenants") => {
                for (k, v) in m {
                    let p = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    paths(v, &p, out);
                }
            }
            serde_json::Value::Object(_) => {}
            _ => out.push(at.to_string()),
        }
    }

    /// ENV_KEYS is written by hand: it must name every scalar key of the
    /// config, and nothing else.
    #[test]
    fn every_config_key_has_its_environment_variable() {
        let mut keys = Vec::new();
        paths(
            &serde_json::to_value(Config::default()).unwrap(),
            "",
            &mut keys,
        );
        for role in ["clinician", "service"] {
            let l = serde_json::to_value(LimitsConfig::default()).unwrap();
            paths(&l, &format!("limits.{role}"), &mut keys);
        }
        keys.sort();
        let mut env: Vec<String> = ENV_KEYS.iter().map(|(k, _)| k.to_string()).collect();
        env.sort();
        assert_eq!(env, keys);
    }

    /// Outside dev mode admins and auditors need a second factor and
    /// every guarded action a second admin; dev mode asks neither unless
    /// told; lists come from the environment too.
    /// 0 turns off the disk-full guard: refused; below 64 MiB refused
    /// outside dev mode and a warning in it. A start that leaves
    /// admin_change unguarded outside dev mode warns.
    #[test]
    fn min_free_space_and_unguarded_admin_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let load = |text: &str| {
            std::fs::write(&f, text).unwrap();
            Config::load_with_env(Some(&f), |_| None)
        };
        let e = load("dev = true\n[storage]\nmin_free_mib = 0\n").unwrap_err();
        assert!(e.to_string().contains("min_free_mib"), "{e}");
        let dev = load("dev = true\n[storage]\nmin_free_mib = 16\n").unwrap();
        assert!(dev.warnings().iter().any(|w| w.contains("min_free_mib")));
        let tls = "tls.cert = \"/c\"\ntls.key = \"/k\"\n";
        let e = load(&format!("{tls}[storage]\nmin_free_mib = 16\n")).unwrap_err();
        assert!(e.to_string().contains("at least 64"), "{e}");
        let prod = load(tls).unwrap();
        assert!(prod.warnings().is_empty(), "{:?}", prod.warnings());
        assert_eq!(prod.min_approver_age_minutes(), 60.0);
        let open = load(&format!(
            "{tls}[approval]\nrequired_for = [\"shred_tenant\"]\n"
        ))
        .unwrap();
        assert!(open.warnings().iter().any(|w| w.contains("admin_change")));
        // Values that would overflow the clock's arithmetic are typos.
        assert!(load("dev = true\n[approval]\nttl_minutes = 1e300\n").is_err());
        assert!(load("dev = true\n[approval]\nmin_approver_age_minutes = 1e300\n").is_err());
        assert!(
            load("dev = true\n[session]\nidle_secs = 10000000000000000\nabsolute_secs = 10000000000000000\n")
                .is_err()
        );
    }

    #[test]
    fn identity_defaults_depend_on_dev_mode() {
        let prod = Config::default();
        assert_eq!(prod.mfa_roles(), vec!["admin", "auditor"]);
        assert_eq!(prod.approval_actions(), APPROVAL_ACTIONS.to_vec());
        let dev = Config {
            dev: true,
            ..Config::default()
        };
        assert!(dev.mfa_roles().is_empty() && dev.approval_actions().is_empty());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "dev = true\n").unwrap();
        let c = Config::load_with_env(Some(&f), |k| match k {
            "COFFRE_MFA_REQUIRED_ROLES" => Some("admin, auditor".into()),
            "COFFRE_APPROVAL_REQUIRED_FOR" => Some("shred_tenant".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.mfa_roles(), vec!["admin", "auditor"]);
        assert_eq!(c.approval_actions(), vec!["shred_tenant"]);
        let bad = Config::load_with_env(Some(&f), |k| {
            (k == "COFFRE_APPROVAL_REQUIRED_FOR").then(|| "shred_everything".into())
        });
        assert!(
            bad.unwrap_err()
                .to_string()
                .contains("approval.required_for")
        );
    }

    #[test]
    fn env_overrides_file_and_types_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "dev = true\n[argon2]\nm_kib = 64\n").unwrap();
        let c = Config::load_with_env(Some(&f), |k| match k {
            "COFFRE_ARGON2_M_KIB" => Some("128".into()),
            "COFFRE_LISTEN" => Some("127.0.0.1:0".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.argon2.m_kib, 128);
        assert_eq!(c.listen, "127.0.0.1:0");
        let bad = Config::load_with_env(Some(&f), |k| {
            (k == "COFFRE_ARGON2_T").then(|| "two".to_string())
        });
        assert!(bad.unwrap_err().to_string().contains("COFFRE_ARGON2_T"));
    }

    #[test]
    fn unsafe_setups_are_refused() {
        let no_env = |_: &str| None;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:1\"\n").unwrap();
        let e = Config::load_with_env(Some(&f), no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.cert"), "{e}");
        std::fs::write(&f, "dev = true\nlisten = \"0.0.0.0:1\"\n").unwrap();
        let e = Config::load_with_env(Some(&f), no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("loopback"), "{e}");
        std::fs::write(
            &f,
            "dev = true\ndata_dir = \"/srv/d\"\nmaster_key_file = \"/srv/d/k\"\n",
        )
        .unwrap();
        let e = Config::load_with_env(Some(&f), no_env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("inside data_dir"), "{e}");
        std::fs::write(&f, "dev = true\nbogus = 1\n").unwrap();
        assert!(Config::load_with_env(Some(&f), no_env).is_err());
        for (budget, says) in [
            (
                "[limits.admin]\nread_burst = 5\n",
                "only clinician and service",
            ),
            (
                "[limits.clinician]\nread_burst = 0\n",
                "read_burst must be at least 1",
            ),
            ("[limits.service]\nreads_per_second = -1.0\n", "positive"),
            (
                "[tenants.Bad.limits.clinician]\nread_burst = 5\n",
                "tenant name",
            ),
            ("[limits.clinician]\nread_brust = 5\n", "read_brust"),
        ] {
            std::fs::write(&f, format!("dev = true\n{budget}")).unwrap();
            let e = Config::load_with_env(Some(&f), no_env)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{budget}: {e}");
        }
    }
}
