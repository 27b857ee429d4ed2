//! Accounts and sessions: principals with Argon2id password hashes, login
//! with lockout, bearer tokens stored only as hashes, idle and absolute
//! expiry.
//!
//! Argon2id runs on the blocking pool behind a semaphore, each worker
//! reusing its memory, so that a login flood queues instead of stalling the
//! runtime or ballooning RSS. An unknown user costs one hash too, against a
//! dummy, and gets the same answer as a wrong password.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use argon2::{Algorithm, Argon2, AssociatedData, Block, ParamsBuilder, Version};
use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD as B64};
use parking_lot::{Mutex, RwLock};
use prost::Message;
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::{
    audit::{Audit, Severity},
    clock::now_ms,
    config::{Argon2Config, SessionConfig},
    crypto::{self, SecretKey},
    error::{Error, Result},
    model::{Password, Role, TenantName, Username},
    store::{Batch, Space, Storage, StorageError},
};

/// Consecutive failed logins before an account locks.
pub const LOCK_AFTER_FAILURES: u32 = 5;
const LOCK_BASE_SECS: i64 = 60;
const LOCK_MAX_SECS: i64 = 3600;
/// Bound on the in-memory failure counts kept for unknown usernames.
const MAX_UNKNOWN_TRACKED: usize = 100_000;
/// How often a read-modify-write of a principal starts again after other
/// nodes' writes went first before the call gives up (UNAVAILABLE).
const CONFLICT_RETRIES: usize = 64;

/// How stale a session's stored last-use time may get before it is rewritten.
const LAST_USE_PERSIST_MS: i64 = 60_000;

/// How long a revoked or expired session is kept (as a hash, with its
/// principal's name) so that calls still made with it are attributed in
/// the trail: a thief who keeps trying after a lock is seen.
const REVOKED_KEPT_MS: i64 = 24 * 3600 * 1000;
/// How recent a single sign-on login must be to stand for a password.
pub const FRESH_SSO_MS: i64 = 300 * 1000;

/// The one answer to a failed login: a wrong password, an unknown user and
/// a locked account look the same (T6).
pub const BAD_CREDENTIALS: &str = "invalid tenant, username or password";
const LOCKED: &str = "account locked";
const NO_SESSION: &str = "missing, expired or revoked token";

/// Computes and checks Argon2id hashes off the async runtime.
pub struct Hasher {
    params: Argon2Config,
    pepper: SecretKey,
    permits: Semaphore,
    /// Hashes waiting for a permit (the login queue's depth).
    waiting: std::sync::atomic::AtomicUsize,
    memory: Mutex<Vec<Vec<Block>>>,
    dummy_phc: String,
}

/// Counts a hash as waiting until it holds a permit (or gives up).
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hasher")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

struct Phc {
    m: u32,
    t: u32,
    p: u32,
    salt: Vec<u8>,
    hash: Zeroizing<Vec<u8>>,
}

impl Phc {
    fn parse(s: &str) -> Option<Self> {
        let parts: Vec<&str> = s.split('$').collect();
        if parts.len() != 6 || parts[1] != "argon2id" || parts[2] != "v=19" {
            return None;
        }
        let mut m = None;
        let mut t = None;
        let mut p = None;
        for kv in parts[3].split(',') {
            let (k, v) = kv.split_once('=')?;
            let v: u32 = v.parse().ok()?;
            match k {
                "m" => m = Some(v),
                "t" => t = Some(v),
                "p" => p = Some(v),
                _ => return None,
            }
        }
        Some(Self {
            m: m?,
            t: t?,
            p: p?,
            salt: B64.decode(parts[4]).ok()?,
            hash: Zeroizing::new(B64.decode(parts[5]).ok()?),
        })
    }

    fn format(&self) -> String {
        format!(
            "$argon2id$v=19$m={},t={},p={}${}${}",
            self.m,
            self.t,
            self.p,
            B64.encode(&self.salt),
            B64.encode(&self.hash[..])
        )
    }
}

impl Hasher {
    pub fn new(params: &Argon2Config, pepper: SecretKey) -> Result<Arc<Self>> {
        let concurrency = if params.max_concurrent == 0 {
            // Leave a core to the runtime so a login flood cannot starve
            // record reads.
            std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
        } else {
            params.max_concurrent
        };
        let mut h = Self {
            params: params.clone(),
            pepper,
            permits: Semaphore::new(concurrency),
            waiting: Default::default(),
            memory: Mutex::new(Vec::new()),
            dummy_phc: String::new(),
        };
        // Unknown users are checked against this, at the same cost.
        let dummy = Zeroizing::new(crate::crypto::random_array::<24>());
        h.dummy_phc = h.hash_blocking(&B64.encode(&dummy[..]), b"coffre/dummy")?;
        Ok(Arc::new(h))
    }

    /// Hashes waiting for their turn now.
    pub fn queued(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _w = Waiting(&self.waiting);
        self.permits.acquire().await.map_err(|_| closed())
    }

    /// A PHC string for `password`, bound to `context` (Argon2 associated
    /// data), so a hash moved to another account or record never verifies.
    pub async fn hash(self: &Arc<Self>, password: &Password, context: &[u8]) -> Result<String> {
        let _permit = self.turn().await?;
        let me = self.clone();
        let pw = Zeroizing::new(password.expose().to_string());
        let ctx = context.to_vec();
        tokio::task::spawn_blocking(move || me.hash_blocking(&pw, &ctx))
            .await
            .map_err(|_| Error::Internal("hash task failed".into()))?
    }

    /// Whether `candidate` matches `phc` (or, with `None`, runs the same work
    /// against the dummy and answers false).
    pub async fn verify(
        self: &Arc<Self>,
        phc: Option<&str>,
        candidate: &Password,
        context: &[u8],
    ) -> Result<bool> {
        let _permit = self.turn().await?;
        let me = self.clone();
        let known = phc.is_some();
        let phc = phc.map(str::to_string);
        let pw = Zeroizing::new(candidate.expose().to_string());
        let ctx = context.to_vec();
        tokio::task::spawn_blocking(move || {
            let target = phc.as_deref().unwrap_or(&me.dummy_phc);
            let ok = me.verify_blocking(target, &pw, &ctx)?;
            Ok(ok && known)
        })
        .await
        .map_err(|_| Error::Internal("hash task failed".into()))?
    }

    fn hash_blocking(&self, password: &str, context: &[u8]) -> Result<String> {
        let salt = crypto::random_array::<16>().to_vec();
        let hash = self.compute(
            self.params.m_kib,
            self.params.t,
            self.params.p,
            &salt,
            password,
            context,
        )?;
        Ok(Phc {
            m: self.params.m_kib,
            t: self.params.t,
            p: self.params.p,
            salt,
            hash,
        }
        .format())
    }

    fn verify_blocking(&self, phc: &str, password: &str, context: &[u8]) -> Result<bool> {
        let phc = Phc::parse(phc).ok_or(Error::DataLoss)?;
        let got = self.compute(phc.m, phc.t, phc.p, &phc.salt, password, context)?;
        Ok(crypto::ct_eq(&got, &phc.hash))
    }

    fn compute(
        &self,
        m: u32,
        t: u32,
        p: u32,
        salt: &[u8],
        password: &str,
        context: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        let ad = crypto::sha256(context);
        let params = ParamsBuilder::new()
            .m_cost(m)
            .t_cost(t)
            .p_cost(p)
            .output_len(32)
            .data(AssociatedData::new(&ad).map_err(|_| Error::Internal("argon2 ad".into()))?)
            .build()
            .map_err(|_| Error::DataLoss)?;
        let blocks = params.block_count();
        let argon = Argon2::new_with_secret(
            self.pepper.expose(),
            Algorithm::Argon2id,
            Version::V0x13,
            params,
        )
        .map_err(|_| Error::Internal("argon2 setup".into()))?;
        // Reuse a worker buffer: allocating 19 MiB per hash costs time and,
        // under a flood, hundreds of MiB of RSS.
        let mut mem = {
            let mut pool = self.memory.lock();
            match pool.iter().position(|b| b.len() >= blocks) {
                Some(i) => pool.swap_remove(i),
                None => vec![Block::default(); blocks],
            }
        };
        let mut out = Zeroizing::new(vec![0u8; 32]);
        let res = argon.hash_password_into_with_memory(
            password.as_bytes(),
            salt,
            &mut out,
            &mut mem[..blocks],
        );
        if mem.len() == self.params.m_kib as usize {
            self.memory.lock().push(mem);
        }
        res.map_err(|_| Error::Internal("argon2 hash".into()))?;
        Ok(out)
    }
}

fn closed() -> Error {
    Error::Internal("hasher closed".into())
}

#[derive(Clone, PartialEq, Message)]
struct StoredPrincipal {
    #[prost(string, tag = "1")]
    role: String,
    #[prost(string, tag = "2")]
    phc: String,
    #[prost(uint32, tag = "3")]
    failed_logins: u32,
    #[prost(int64, tag = "4")]
    locked_until_ms: i64,
    #[prost(bool, tag = "5")]
    admin_locked: bool,
    #[prost(int64, tag = "6")]
    created_ms: i64,
    /// Why the account is locked until an administrator unlocks it.
    #[prost(string, tag = "7")]
    lock_reason: String,
    /// Sessions opened before this time were revoked by a lock: they
    /// answer "locked" while it lasts and are gone after an unlock.
    #[prost(int64, tag = "8")]
    sessions_from_ms: i64,
    /// The OpenID Connect identity bound to it (`provider:subject`).
    #[prost(string, tag = "9")]
    oidc: String,
    /// The TOTP secret, sealed; empty until enrolment is confirmed.
    #[prost(bytes = "vec", tag = "10")]
    totp_sealed: Vec<u8>,
    /// A secret enrolled but not confirmed yet.
    #[prost(bytes = "vec", tag = "11")]
    totp_pending_sealed: Vec<u8>,
    /// The step of the last TOTP code accepted: only later ones are.
    #[prost(int64, tag = "12")]
    totp_last_step: i64,
    /// Argon2id hashes of the recovery codes, by slot; empty once used.
    #[prost(string, repeated, tag = "13")]
    recovery: Vec<String>,
    #[prost(string, repeated, tag = "14")]
    recovery_pending: Vec<String>,
}

impl StoredPrincipal {
    fn locked_at(&self, now: i64) -> bool {
        self.admin_locked || self.locked_until_ms > now
    }
}

#[derive(Clone, PartialEq, Message)]
struct StoredSession {
    #[prost(string, tag = "1")]
    tenant: String,
    #[prost(string, tag = "2")]
    username: String,
    #[prost(int64, tag = "3")]
    created_ms: i64,
    #[prost(int64, tag = "4")]
    expires_ms: i64,
    #[prost(int64, tag = "5")]
    last_used_ms: i64,
    /// Revoked or expired: kept only to attribute later calls.
    #[prost(bool, tag = "6")]
    revoked: bool,
    /// Opened by a principal that must enrol a second factor first: it
    /// can only enrol (and log out).
    #[prost(bool, tag = "7")]
    enroll_only: bool,
    /// Opened by a single sign-on login (`LoginOidc`).
    #[prost(bool, tag = "8")]
    oidc: bool,
}

/// A token that was refused, and whose it was when the token was once
/// valid (revoked by a lock or a password change, expired): the trail
/// names the principal without the token becoming valid again.
#[derive(Debug)]
pub struct Refused {
    pub error: Error,
    /// `(tenant, username, role)` of the token's principal, when known.
    pub who: Option<(TenantName, Username, Option<Role>)>,
}

impl Refused {
    fn anonymous(error: Error) -> Self {
        Self { error, who: None }
    }
}

impl From<Error> for Refused {
    fn from(error: Error) -> Self {
        Self::anonymous(error)
    }
}

impl From<crate::store::StorageError> for Refused {
    fn from(e: crate::store::StorageError) -> Self {
        Self::anonymous(e.into())
    }
}

impl From<prost::DecodeError> for Refused {
    fn from(e: prost::DecodeError) -> Self {
        Self::anonymous(e.into())
    }
}

/// What an administrator or auditor sees of a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalInfo {
    pub username: String,
    pub role: String,
    pub locked: bool,
    pub lock_reason: String,
    pub locked_until_ms: i64,
    pub failed_logins: u32,
    pub mfa_enrolled: bool,
    pub recovery_codes_left: u32,
    /// `provider:subject`, or empty.
    pub oidc: String,
}

/// A principal's role and creation time.
#[derive(Debug, Clone, Copy)]
pub struct Basics {
    pub role: Role,
    pub created_ms: i64,
}

/// Who is calling, established from a valid token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: TenantName,
    pub username: Username,
    pub role: Role,
    /// A session that can only enrol a second factor.
    pub enroll_only: bool,
    /// When the session was opened, and whether by single sign-on: a
    /// principal without a password proves itself again by a fresh one.
    pub session_created_ms: i64,
    pub via_oidc: bool,
    token_hash: [u8; 32],
}

impl Caller {
    /// `tenant/username`, as audit events name principals.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.tenant, self.username)
    }
}

struct CachedSession {
    tenant: TenantName,
    username: Username,
    created_ms: i64,
    expires_ms: i64,
    last_used_ms: AtomicI64,
    persisted_ms: AtomicI64,
    enroll_only: bool,
    oidc: bool,
}

/// What a login's second factor came to.
enum Factor {
    /// The principal has no second factor.
    NotEnrolled,
    /// A TOTP code of this step.
    Totp(i64),
    /// The recovery code of this slot, whose stored hash is this.
    Recovery(usize, String),
    /// Missing or wrong.
    Wrong,
}

/// A new TOTP enrolment: shown once to the principal, then never again.
pub struct Enrolment {
    pub uri: Zeroizing<String>,
    pub recovery_codes: Vec<Zeroizing<String>>,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Enrolment([redacted])")
    }
}

/// An id token that opened no session: why (for the trail), whose it
/// was when known, or the error that stopped the check.
#[derive(Debug)]
pub struct IdentityRefused {
    pub reason: crate::oidc::Refusal,
    pub who: Option<String>,
    /// Storage failed: not a refusal of the token.
    pub error: Option<Error>,
}

impl IdentityRefused {
    fn error(e: Error) -> Self {
        Self {
            reason: crate::oidc::Refusal::KeysUnavailable,
            who: None,
            error: Some(e),
        }
    }
}

/// Where spent id tokens are remembered (in `Meta`, until they would
/// expire anyway).
const REPLAY_PREFIX: &[u8] = b"oidc-spent\0";

fn recovery_candidate(code: &str) -> Result<Password> {
    Password::candidate(crate::totp::normalize_recovery(code).to_string())
        .map_err(|_| Error::Unauthenticated(BAD_CREDENTIALS))
}

fn recovery_context(tenant: &TenantName, username: &Username, slot: usize) -> Vec<u8> {
    crypto::Context::new("coffre/recovery-code/v1")
        .with(tenant.as_str().as_bytes())
        .with(username.as_str().as_bytes())
        .with(&[slot as u8])
        .as_bytes()
        .to_vec()
}

fn totp_aad(tenant: &TenantName, username: &Username) -> Vec<u8> {
    crypto::Context::new("coffre/totp-secret/v1")
        .with(tenant.as_str().as_bytes())
        .with(username.as_str().as_bytes())
        .as_bytes()
        .to_vec()
}

/// A successful login.
pub struct Login {
    /// The bearer token: shown to the client once, stored only as a hash.
    pub token: Zeroizing<String>,
    pub expires_at_unix: i64,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("token", &"[redacted]")
            .field("expires_at_unix", &self.expires_at_unix)
            .finish()
    }
}

pub struct Accounts {
    store: Storage,
    /// Lockouts and unlocks raise alerts.
    audit: Arc<Audit>,
    hasher: Arc<Hasher>,
    session: SessionConfig,
    sessions: RwLock<HashMap<[u8; 32], Arc<CachedSession>>>,
    /// Sessions are shared with other nodes (one database): none is
    /// trusted from this node's cache.
    shared: bool,
    unknown_failures: Mutex<HashMap<[u8; 32], (u32, i64)>>,
    /// One login at a time per (tenant, username), known or not: parallel
    /// guesses queue, so the fifth failure locks before a sixth is tried.
    login_turns: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    /// Every read-modify-write of a stored principal holds this: a login's
    /// write-back re-reads, so it can neither lose a failure nor undo a
    /// lock raised meanwhile (a budget, a honeytoken, an administrator).
    principal_writes: tokio::sync::Mutex<()>,
    /// Roles that log in with a second factor.
    mfa_roles: Vec<Role>,
    /// Seals TOTP secrets (derived from the pepper).
    totp_key: SecretKey,
}

/// A login's turn on its name; gives the slot back when no one else waits.
struct LoginTurn<'a> {
    accounts: &'a Accounts,
    key: [u8; 32],
    slot: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for LoginTurn<'_> {
    fn drop(&mut self) {
        let mut map = self.accounts.login_turns.lock();
        // Ours and the map's: nobody else holds or waits for this slot.
        if Arc::strong_count(&self.slot) == 2 {
            map.remove(&self.key);
        }
    }
}

fn principal_key(tenant: &TenantName, username: &Username) -> Vec<u8> {
    let mut k = tenant.as_str().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(username.as_str().as_bytes());
    k
}

/// The names a [`principal_key`] holds (an identity's binding stores one).
fn parse_principal_key(k: &[u8]) -> Option<(TenantName, Username)> {
    let (t, u) = k.split_at(k.iter().position(|&c| c == 0)?);
    Some((
        TenantName::parse(std::str::from_utf8(t).ok()?).ok()?,
        Username::parse(std::str::from_utf8(&u[1..]).ok()?).ok()?,
    ))
}

fn password_context(tenant: &TenantName, username: &Username) -> Vec<u8> {
    crypto::Context::new("coffre/password/v1")
        .with(tenant.as_str().as_bytes())
        .with(username.as_str().as_bytes())
        .as_bytes()
        .to_vec()
}

fn lock_secs(failures: u32) -> i64 {
    let extra = failures.saturating_sub(LOCK_AFTER_FAILURES).min(16);
    (LOCK_BASE_SECS << extra).min(LOCK_MAX_SECS)
}

impl Accounts {
    pub fn new(
        store: Storage,
        hasher: Arc<Hasher>,
        session: SessionConfig,
        audit: Arc<Audit>,
    ) -> Self {
        Self {
            store,
            audit,
            hasher,
            session,
            sessions: RwLock::new(HashMap::new()),
            shared: false,
            unknown_failures: Mutex::new(HashMap::new()),
            login_turns: Mutex::new(HashMap::new()),
            principal_writes: tokio::sync::Mutex::new(()),
            mfa_roles: Vec::new(),
            // Replaced by `with_mfa` (the vault's key); until then nothing
            // sealed survives a restart.
            totp_key: SecretKey::random(),
        }
    }

    /// Roles that need a second factor, and the key sealing TOTP secrets.
    pub fn with_mfa(mut self, roles: Vec<Role>, totp_key: SecretKey) -> Self {
        self.mfa_roles = roles;
        self.totp_key = totp_key;
        self
    }

    /// For a node that shares its database with others: every call reads
    /// its session from the database (a logout elsewhere counts at once).
    pub fn shared(mut self) -> Self {
        self.shared = true;
        self
    }

    /// Password hashes waiting for a free Argon2id slot.
    /// Whether `role` logs in with a second factor (`mfa.required_roles`).
    pub fn needs_second_factor(&self, role: Role) -> bool {
        self.mfa_roles.contains(&role)
    }

    pub fn hash_queue(&self) -> usize {
        self.hasher.queued()
    }

    /// Re-reads a principal and applies `f` to it under the write lock;
    /// `f` returns whether to store the result. `None` when it is gone.
    async fn update<R>(
        &self,
        tenant: &TenantName,
        username: &Username,
        mut f: impl FnMut(&mut StoredPrincipal) -> (bool, R),
    ) -> Result<Option<R>> {
        let _w = self.principal_writes.lock().await;
        let key = principal_key(tenant, username);
        // This process's lock orders its own writers; other nodes' writes
        // are caught by the condition, and `f` runs again on what they
        // wrote (a failure count is never lost to a parallel guess).
        for _ in 0..CONFLICT_RETRIES {
            let Some(raw) = self.store.get(Space::Principals, &key).await? else {
                return Ok(None);
            };
            let mut p = StoredPrincipal::decode(&raw[..])?;
            let (write, r) = f(&mut p);
            if !write {
                return Ok(Some(r));
            }
            let mut b = Batch::new();
            if self.store.is_shared() {
                b.expect(Space::Principals, key.clone(), Some(raw));
            }
            b.put(Space::Principals, key.clone(), p.encode_to_vec());
            match self.store.commit(b).await {
                Ok(()) => return Ok(Some(r)),
                Err(StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Unavailable(StorageError::Busy(
            "a principal changed under too many concurrent writes",
        )))
    }

    async fn login_turn(
        &self,
        tenant: &str,
        username: &str,
    ) -> (LoginTurn<'_>, tokio::sync::OwnedMutexGuard<()>) {
        let key = crypto::sha256(
            crypto::Context::new("coffre/login-turn/v1")
                .with(tenant.as_bytes())
                .with(username.as_bytes())
                .as_bytes(),
        );
        let slot = self.login_turns.lock().entry(key).or_default().clone();
        let guard = slot.clone().lock_owned().await;
        (
            LoginTurn {
                accounts: self,
                key,
                slot,
            },
            guard,
        )
    }

    async fn load(
        &self,
        tenant: &TenantName,
        username: &Username,
    ) -> Result<Option<StoredPrincipal>> {
        Ok(self
            .store
            .get(Space::Principals, &principal_key(tenant, username))
            .await?
            .map(|b| StoredPrincipal::decode(&b[..]))
            .transpose()?)
    }

    pub async fn exists(&self, tenant: &TenantName, username: &Username) -> Result<bool> {
        Ok(self.load(tenant, username).await?.is_some())
    }

    /// Creates a principal; the password has passed the policy already.
    /// With a binding, the principal also (or only, without a password)
    /// logs in by single sign-on; an identity binds one principal at most.
    /// With `claim`, that `Meta` key, which must not exist yet, is written
    /// in the same batch (a creation that counts on a count): a lost claim
    /// answers ALREADY_EXISTS like a lost name.
    pub async fn create(
        &self,
        tenant: &TenantName,
        username: &Username,
        password: Option<&Password>,
        role: Role,
        oidc: Option<&crate::oidc::Binding>,
        claim: Option<Vec<u8>>,
    ) -> Result<()> {
        if self.exists(tenant, username).await? {
            return Err(Error::AlreadyExists("principal already exists".into()));
        }
        let phc = match password {
            Some(pw) => {
                self.hasher
                    .hash(pw, &password_context(tenant, username))
                    .await?
            }
            // Never matches: a password login costs the same and fails.
            None => String::new(),
        };
        if let Some(b) = oidc {
            // Claimed first, atomically: two principals never share one.
            let mut claim = Batch::new();
            claim.expect(Space::Meta, b.key(), None);
            claim.put(Space::Meta, b.key(), principal_key(tenant, username));
            match self.store.commit(claim).await {
                Err(StorageError::Conflict) => {
                    return Err(Error::AlreadyExists(
                        "this identity is bound to another principal".into(),
                    ));
                }
                r => r?,
            }
        }
        let p = StoredPrincipal {
            role: role.as_str().into(),
            phc,
            created_ms: now_ms(),
            oidc: oidc.map(|b| b.to_string()).unwrap_or_default(),
            ..Default::default()
        };
        let key = principal_key(tenant, username);
        let mut b = Batch::new();
        // Two nodes creating the same name: one wins, the other is told.
        b.expect(Space::Principals, key.clone(), None);
        b.put(Space::Principals, key.clone(), p.encode_to_vec());
        if let Some(c) = claim {
            b.expect(Space::Meta, c.clone(), None);
            b.put(Space::Meta, c, key);
        }
        let created = match self.store.commit(b).await {
            Err(StorageError::Conflict) => {
                Err(Error::AlreadyExists("principal already exists".into()))
            }
            r => Ok(r?),
        };
        if created.is_err()
            && let Some(b) = oidc
        {
            let mut undo = Batch::new();
            undo.delete(Space::Meta, b.key());
            self.store.commit(undo).await?;
        }
        created
    }

    /// Checks credentials (and the second factor, where the role or an
    /// enrolment asks for one) and opens a session. Every failure answers
    /// the same, after the same work: a wrong password, a wrong or missing
    /// code, an unknown user, a locked account. Logins to one name take
    /// turns, so parallel guesses count exactly as sequential ones.
    pub async fn login(
        &self,
        tenant: &str,
        username: &str,
        password: &str,
        otp: &str,
    ) -> Result<Login> {
        let password = Password::candidate(password.to_string())
            .map_err(|_| Error::Unauthenticated(BAD_CREDENTIALS))?;
        // The guard drops after the turn, which gives the slot back.
        let (_turn, _guard) = self.login_turn(tenant, username).await;
        let names = TenantName::parse(tenant)
            .and_then(|t| Username::parse(username).map(|u| (t, u)))
            .ok();
        let now = now_ms();
        let stored = match &names {
            Some((t, u)) => self.load(t, u).await?,
            None => None,
        };
        let recovery = crate::totp::recovery_slot(otp);
        let Some(((t, u), p)) = names.clone().zip(stored) else {
            if recovery.is_some() {
                // The same work as checking a recovery code.
                self.hasher
                    .verify(None, &recovery_candidate(otp)?, b"coffre/dummy")
                    .await?;
            }
            return self.fail_unknown(tenant, username, &password, now).await;
        };
        let ctx = password_context(&t, &u);
        let phc = (!p.phc.is_empty()).then_some(p.phc.as_str());
        let password_ok = self.hasher.verify(phc, &password, &ctx).await?;
        // The second factor is checked whatever the password gave, so its
        // cost says nothing about the password.
        let enrolled = !p.totp_sealed.is_empty();
        let factor = if let Some(slot) = recovery {
            let stored = p.recovery.get(slot).filter(|h| !h.is_empty() && enrolled);
            let ok = self
                .hasher
                .verify(
                    stored.map(String::as_str),
                    &recovery_candidate(otp)?,
                    &recovery_context(&t, &u, slot),
                )
                .await?;
            match stored {
                Some(h) if ok => Factor::Recovery(slot, h.clone()),
                _ => Factor::Wrong,
            }
        } else if enrolled {
            let secret = self.open_totp(&t, &u, &p.totp_sealed)?;
            match secret.check(otp, now, p.totp_last_step) {
                Some(step) => Factor::Totp(step),
                None => Factor::Wrong,
            }
        } else {
            Factor::NotEnrolled
        };
        let role = p.role.clone();
        let needs_factor = Role::parse(&role).is_ok_and(|r| self.mfa_roles.contains(&r));
        let ok = password_ok && !matches!(factor, Factor::Wrong);
        if !ok {
            self.audit.stats().login_failures.inc();
        }
        if p.locked_at(now) {
            // The same work and answer as a wrong password; a guess at a
            // locked account is not counted (the back-off is already on).
            return Err(Error::Unauthenticated(BAD_CREDENTIALS));
        }
        let outcome = self
            .update(&t, &u, |p| {
                let now = now_ms();
                // A code another login used meanwhile counts as wrong.
                let factor_ok = match &factor {
                    Factor::Totp(step) => *step > p.totp_last_step,
                    Factor::Recovery(slot, h) => p.recovery.get(*slot) == Some(h),
                    Factor::NotEnrolled => p.totp_sealed.is_empty(),
                    Factor::Wrong => false,
                };
                if !(ok && factor_ok) {
                    p.failed_logins = p.failed_logins.saturating_add(1);
                    let locked = p.failed_logins >= LOCK_AFTER_FAILURES;
                    if locked {
                        p.locked_until_ms = now + lock_secs(p.failed_logins) * 1000;
                    }
                    return (true, Err(locked.then_some(p.failed_logins)));
                }
                if p.locked_at(now) {
                    // Locked while the hash ran: a lock is never undone here.
                    return (false, Err(None));
                }
                let mut write = p.failed_logins != 0;
                match &factor {
                    Factor::Totp(step) => {
                        p.totp_last_step = *step;
                        write = true;
                    }
                    Factor::Recovery(slot, _) => {
                        p.recovery[*slot].clear();
                        write = true;
                    }
                    _ => {}
                }
                p.failed_logins = 0;
                p.locked_until_ms = 0;
                (write, Ok(()))
            })
            .await?;
        match outcome {
            Some(Ok(())) => {
                if let Factor::Recovery(..) = factor {
                    self.audit
                        .alert(
                            Severity::Warning,
                            "recovery_code_used",
                            t.as_str(),
                            &format!("{t}/{u}"),
                            "logged in with a one-time recovery code".into(),
                        )
                        .await?;
                }
                let enroll_only = needs_factor && matches!(factor, Factor::NotEnrolled);
                self.open_session(t, u, now, enroll_only, false).await
            }
            Some(Err(Some(failures))) => {
                self.audit
                    .stats()
                    .lock(crate::stats::LockReason::login, &role);
                self.lock_alert(t.as_str(), &format!("{t}/{u}"), failures)
                    .await?;
                Err(Error::Unauthenticated(BAD_CREDENTIALS))
            }
            Some(Err(None)) | None => Err(Error::Unauthenticated(BAD_CREDENTIALS)),
        }
    }

    /// Opens a session for the principal an id token's identity is bound
    /// to. The token has passed every check of `oidc`; here it is spent
    /// (single use, across restarts and nodes) and its binding looked up.
    pub async fn login_identity(
        &self,
        id: &crate::oidc::Identity,
    ) -> Result<(Login, String), IdentityRefused> {
        use crate::oidc::Refusal;
        let refused = |r: Refusal, who: Option<String>| IdentityRefused {
            reason: r,
            who,
            error: None,
        };
        let now = now_ms();
        // Spent first: a replay is caught whatever else is wrong with it.
        let mut key = REPLAY_PREFIX.to_vec();
        key.extend_from_slice(&id.replay_key);
        let mut b = Batch::new();
        b.expect(Space::Meta, key.clone(), None);
        b.put(Space::Meta, key, id.replay_until_ms.to_be_bytes().to_vec());
        match self.store.commit(b).await {
            Ok(()) => {}
            Err(StorageError::Conflict) => return Err(refused(Refusal::Replayed, None)),
            Err(e) => return Err(IdentityRefused::error(e.into())),
        }
        let binding = crate::oidc::Binding {
            provider: id.provider.clone(),
            subject: id.subject.clone(),
        };
        let bound = self
            .store
            .get(Space::Meta, &binding.key())
            .await
            .map_err(|e| IdentityRefused::error(e.into()))?;
        let Some((t, u)) = bound.as_deref().and_then(parse_principal_key) else {
            return Err(refused(Refusal::UnboundSubject, None));
        };
        let who = format!("{t}/{u}");
        if t != id.tenant {
            return Err(refused(Refusal::UnboundSubject, None));
        }
        let p = self.load(&t, &u).await.map_err(IdentityRefused::error)?;
        let Some(p) = p.filter(|p| p.oidc == binding.to_string()) else {
            return Err(refused(Refusal::UnboundSubject, None));
        };
        if p.locked_at(now) {
            return Err(refused(Refusal::Locked, Some(who)));
        }
        let login = self
            .open_session(t, u, now, false, true)
            .await
            .map_err(IdentityRefused::error)?;
        Ok((login, who))
    }

    /// Starts TOTP enrolment of `caller`: a new secret and recovery codes,
    /// kept pending until [`Accounts::confirm_totp`].
    /// The account's password is asked again (a principal without one
    /// needs a single sign-on session under [`FRESH_SSO_MS`] old): a stolen
    /// session must not put its own factor in front of the owner.
    pub async fn enroll_totp(&self, caller: &Caller, password: &str) -> Result<Enrolment> {
        self.recheck(caller, password).await?;
        let (t, u) = (&caller.tenant, &caller.username);
        let secret = crate::totp::TotpSecret::random();
        let codes = crate::totp::new_recovery_codes();
        let mut hashes = Vec::new();
        for (slot, code) in codes.iter().enumerate() {
            let pw = recovery_candidate(code)?;
            hashes.push(self.hasher.hash(&pw, &recovery_context(t, u, slot)).await?);
        }
        let sealed = self.totp_key.aead().seal(&totp_aad(t, u), secret.expose());
        self.update(t, u, |p| {
            p.totp_pending_sealed = sealed.clone();
            p.recovery_pending = hashes.clone();
            (true, ())
        })
        .await?
        .ok_or(Error::NotFound)?;
        // Whoever enrols decides who logs in from now on: every enrolment
        // is for a reviewer (and the owner) to see, as it starts.
        self.audit
            .alert(
                Severity::Warning,
                "mfa_enrolled",
                t.as_str(),
                &caller.principal(),
                "second factor enrolment started (active once confirmed with a code)".into(),
            )
            .await?;
        Ok(Enrolment {
            uri: secret.uri("Coffre", &caller.principal()),
            recovery_codes: codes,
        })
    }

    /// Proves again that the caller is the account's owner: its password,
    /// or for a principal without one a single sign-on login made less
    /// than [`FRESH_SSO_MS`] ago. A wrong password counts toward the
    /// lockout as a failed login does (a stolen session is no oracle).
    async fn recheck(&self, caller: &Caller, password: &str) -> Result<()> {
        let (t, u) = (&caller.tenant, &caller.username);
        let (_turn, _guard) = self.login_turn(t.as_str(), u.as_str()).await;
        let p = self
            .load(t, u)
            .await?
            .ok_or(Error::Unauthenticated(BAD_CREDENTIALS))?;
        if p.phc.is_empty() {
            if caller.via_oidc && now_ms() - caller.session_created_ms < FRESH_SSO_MS {
                return Ok(());
            }
            return Err(Error::FailedPrecondition(
                "this account has no password: log in again by single sign-on (coffre login --oidc), then enrol within 300 s".into(),
            ));
        }
        self.recheck_password(caller, &p, password).await
    }

    /// Checks `password` against the caller's stored principal `p`,
    /// counting a wrong one toward the lockout. Runs in the login turn.
    async fn recheck_password(
        &self,
        caller: &Caller,
        p: &StoredPrincipal,
        password: &str,
    ) -> Result<()> {
        let (t, u) = (&caller.tenant, &caller.username);
        let phc = (!p.phc.is_empty()).then_some(p.phc.as_str());
        let candidate = Password::candidate(password.to_string())
            .map_err(|_| Error::Unauthenticated(BAD_CREDENTIALS))?;
        if self
            .hasher
            .verify(phc, &candidate, &password_context(t, u))
            .await?
        {
            return Ok(());
        }
        self.audit.stats().login_failures.inc();
        let locked = self
            .update(t, u, |p| {
                p.failed_logins = p.failed_logins.saturating_add(1);
                let locked = p.failed_logins >= LOCK_AFTER_FAILURES;
                if locked {
                    p.locked_until_ms = now_ms() + lock_secs(p.failed_logins) * 1000;
                }
                (true, locked.then_some(p.failed_logins))
            })
            .await?
            .flatten();
        if let Some(failures) = locked {
            self.audit
                .stats()
                .lock(crate::stats::LockReason::login, &p.role);
            self.lock_alert(t.as_str(), &caller.principal(), failures)
                .await?;
        }
        Err(Error::Unauthenticated(BAD_CREDENTIALS))
    }

    /// Makes the pending enrolment of `caller` active, given a code of it.
    pub async fn confirm_totp(&self, caller: &Caller, otp: &str) -> Result<()> {
        let (t, u) = (&caller.tenant, &caller.username);
        let p = self.load(t, u).await?.ok_or(Error::NotFound)?;
        if p.totp_pending_sealed.is_empty() {
            return Err(Error::FailedPrecondition(
                "no enrolment in progress: run coffre mfa enroll first".into(),
            ));
        }
        let secret = self.open_totp(t, u, &p.totp_pending_sealed)?;
        let step = secret.check(otp, now_ms(), 0).ok_or_else(|| {
            Error::InvalidArgument(
                "the code does not match the enrolment (check the device's clock)".into(),
            )
        })?;
        let pending = p.totp_pending_sealed.clone();
        let replacing = !p.totp_sealed.is_empty();
        self.update(t, u, |p| {
            if p.totp_pending_sealed != pending {
                return (false, false);
            }
            p.totp_sealed = std::mem::take(&mut p.totp_pending_sealed);
            p.recovery = std::mem::take(&mut p.recovery_pending);
            p.totp_last_step = step;
            (true, true)
        })
        .await?
        .filter(|confirmed| *confirmed)
        .ok_or_else(|| {
            Error::FailedPrecondition("the enrolment changed meanwhile: enrol again".into())
        })?;
        if replacing {
            // A stolen session could swap the factor: its owner should hear.
            self.audit
                .alert(
                    Severity::Warning,
                    "mfa_replaced",
                    t.as_str(),
                    &caller.principal(),
                    "second factor replaced by a new enrolment".into(),
                )
                .await?;
        }
        Ok(())
    }

    /// Clears a principal's second factor (a lost device) and ends its
    /// sessions: it enrols again at its next login.
    pub async fn reset_mfa(&self, tenant: &TenantName, username: &Username) -> Result<()> {
        self.update(tenant, username, |p| {
            p.totp_sealed.clear();
            p.totp_pending_sealed.clear();
            p.recovery.clear();
            p.recovery_pending.clear();
            p.totp_last_step = 0;
            p.sessions_from_ms = now_ms() + 1;
            (true, ())
        })
        .await?
        .ok_or(Error::NotFound)?;
        self.audit
            .alert(
                Severity::Warning,
                "mfa_reset",
                tenant.as_str(),
                &format!("{tenant}/{username}"),
                "second factor reset by an administrator; enrols again at next login".into(),
            )
            .await
    }

    fn open_totp(
        &self,
        tenant: &TenantName,
        username: &Username,
        sealed: &[u8],
    ) -> Result<crate::totp::TotpSecret> {
        let raw = self
            .totp_key
            .aead()
            .open(&totp_aad(tenant, username), sealed)?;
        Ok(crate::totp::TotpSecret::from_bytes(raw))
    }

    async fn fail_unknown(
        &self,
        tenant: &str,
        username: &str,
        password: &Password,
        now: i64,
    ) -> Result<Login> {
        // Unknown names lock like real ones, so a lock reveals nothing.
        let key = crypto::sha256(
            crypto::Context::new("coffre/unknown/v1")
                .with(tenant.as_bytes())
                .with(username.as_bytes())
                .as_bytes(),
        );
        self.hasher.verify(None, password, b"coffre/dummy").await?;
        self.audit.stats().login_failures.inc();
        if let Some((_, until)) = self.unknown_failures.lock().get(&key)
            && *until > now
        {
            return Err(Error::Unauthenticated(BAD_CREDENTIALS));
        }
        let failures = {
            let mut map = self.unknown_failures.lock();
            if map.len() >= MAX_UNKNOWN_TRACKED {
                map.clear();
            }
            let e = map.entry(key).or_insert((0, 0));
            e.0 = e.0.saturating_add(1);
            if e.0 >= LOCK_AFTER_FAILURES {
                e.1 = now + lock_secs(e.0) * 1000;
            }
            e.0
        };
        if failures >= LOCK_AFTER_FAILURES {
            self.audit.stats().lock(crate::stats::LockReason::login, "");
            // Named only when well-formed (never a password typed as a name).
            let names = TenantName::parse(tenant)
                .and_then(|t| Username::parse(username).map(|u| (t, u)))
                .ok();
            let (t, who) = match &names {
                Some((t, u)) => (t.to_string(), format!("{t}/{u}")),
                None => (String::new(), "(malformed)".to_string()),
            };
            self.lock_alert(&t, &who, failures).await?;
        }
        Err(Error::Unauthenticated(BAD_CREDENTIALS))
    }

    async fn open_session(
        &self,
        tenant: TenantName,
        username: Username,
        now: i64,
        enroll_only: bool,
        oidc: bool,
    ) -> Result<Login> {
        let raw = Zeroizing::new(crypto::random_array::<32>());
        let token = Zeroizing::new(format!(
            "cf1.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[..])
        ));
        let hash = crypto::sha256(token.as_bytes());
        let expires_ms = now + (self.session.absolute_secs as i64) * 1000;
        let s = StoredSession {
            tenant: tenant.to_string(),
            username: username.to_string(),
            created_ms: now,
            expires_ms,
            last_used_ms: now,
            revoked: false,
            enroll_only,
            oidc,
        };
        let mut b = Batch::new();
        b.put(Space::Sessions, hash.to_vec(), s.encode_to_vec());
        self.store.commit(b).await?;
        self.sessions.write().insert(
            hash,
            Arc::new(CachedSession {
                tenant,
                username,
                created_ms: now,
                expires_ms,
                last_used_ms: AtomicI64::new(now),
                persisted_ms: AtomicI64::new(now),
                enroll_only,
                oidc,
            }),
        );
        Ok(Login {
            token,
            expires_at_unix: expires_ms / 1000,
        })
    }

    /// The caller behind a bearer token, if the token is valid and its
    /// principal is neither locked nor deleted. A refused token that was
    /// once valid still names its principal, for the trail.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, Refused> {
        let hash = crypto::sha256(token.as_bytes());
        let now = now_ms();
        // Several nodes share the sessions: a logout on another node must
        // refuse the next call here, so the stored session decides.
        let cached = if self.shared {
            None
        } else {
            self.sessions.read().get(&hash).cloned()
        };
        let s = match cached {
            Some(s) => s,
            None => {
                let Some(bytes) = self.store.get(Space::Sessions, &hash).await? else {
                    return Err(Refused::anonymous(Error::Unauthenticated(NO_SESSION)));
                };
                let st = StoredSession::decode(&bytes[..])?;
                let tenant = TenantName::parse(&st.tenant).map_err(|_| Error::DataLoss)?;
                let username = Username::parse(&st.username).map_err(|_| Error::DataLoss)?;
                let s = Arc::new(CachedSession {
                    tenant,
                    username,
                    created_ms: st.created_ms,
                    expires_ms: st.expires_ms,
                    last_used_ms: AtomicI64::new(st.last_used_ms),
                    persisted_ms: AtomicI64::new(st.last_used_ms),
                    enroll_only: st.enroll_only,
                    oidc: st.oidc,
                });
                if st.revoked {
                    let role = self
                        .load(&s.tenant, &s.username)
                        .await?
                        .and_then(|p| Role::parse(&p.role).ok());
                    return Err(Refused {
                        error: Error::Unauthenticated(NO_SESSION),
                        who: Some((s.tenant.clone(), s.username.clone(), role)),
                    });
                }
                self.sessions.write().insert(hash, s.clone());
                s
            }
        };
        let refused = |error: Error, role: Option<Role>| Refused {
            error,
            who: Some((s.tenant.clone(), s.username.clone(), role)),
        };
        let p = self.load(&s.tenant, &s.username).await?;
        let role = p.as_ref().and_then(|p| Role::parse(&p.role).ok());
        let idle_ms = (self.session.idle_secs as i64) * 1000;
        if now >= s.expires_ms || now - s.last_used_ms.load(Ordering::Relaxed) > idle_ms {
            self.revoke_session(&hash, &s).await;
            return Err(refused(Error::Unauthenticated(NO_SESSION), role));
        }
        let Some(p) = p else {
            self.forget_session(&hash).await;
            return Err(Refused::anonymous(Error::Unauthenticated(NO_SESSION)));
        };
        if p.locked_at(now) {
            return Err(refused(Error::PermissionDenied(LOCKED), role));
        }
        if s.created_ms < p.sessions_from_ms {
            self.revoke_session(&hash, &s).await;
            return Err(refused(Error::Unauthenticated(NO_SESSION), role));
        }
        let role = role.ok_or(Error::DataLoss)?;
        s.last_used_ms.store(now, Ordering::Relaxed);
        if now - s.persisted_ms.load(Ordering::Relaxed) > LAST_USE_PERSIST_MS {
            s.persisted_ms.store(now, Ordering::Relaxed);
            let st = StoredSession {
                tenant: s.tenant.to_string(),
                username: s.username.to_string(),
                created_ms: s.created_ms,
                expires_ms: s.expires_ms,
                last_used_ms: now,
                revoked: false,
                enroll_only: s.enroll_only,
                oidc: s.oidc,
            };
            // Only over the session as stored and not revoked: a logout
            // racing this call must not be written back over.
            let Some(raw) = self.store.get(Space::Sessions, &hash).await? else {
                return Err(refused(Error::Unauthenticated(NO_SESSION), Some(role)));
            };
            if StoredSession::decode(&raw[..])?.revoked {
                self.sessions.write().remove(&hash);
                return Err(refused(Error::Unauthenticated(NO_SESSION), Some(role)));
            }
            let mut b = Batch::new();
            b.expect(Space::Sessions, hash.to_vec(), Some(raw));
            b.put(Space::Sessions, hash.to_vec(), st.encode_to_vec());
            // Losing this in a crash, or to a concurrent update, only
            // shortens the idle window.
            match self.store.commit(b).await {
                Ok(()) | Err(StorageError::Conflict) => {}
                Err(e) => return Err(Error::from(e).into()),
            }
        }
        Ok(Caller {
            tenant: s.tenant.clone(),
            username: s.username.clone(),
            role,
            enroll_only: s.enroll_only,
            session_created_ms: s.created_ms,
            via_oidc: s.oidc,
            token_hash: hash,
        })
    }

    /// Marks a session revoked: it never authenticates again, but stays
    /// stored (as a hash) for [`REVOKED_KEPT_MS`] so that later calls with
    /// it are attributed to its principal.
    async fn revoke_session(&self, hash: &[u8; 32], s: &CachedSession) {
        self.sessions.write().remove(hash);
        let st = StoredSession {
            tenant: s.tenant.to_string(),
            username: s.username.to_string(),
            created_ms: s.created_ms,
            expires_ms: s.expires_ms,
            last_used_ms: s.last_used_ms.load(Ordering::Relaxed),
            revoked: true,
            enroll_only: s.enroll_only,
            oidc: s.oidc,
        };
        let mut b = Batch::new();
        b.put(Space::Sessions, hash.to_vec(), st.encode_to_vec());
        let _ = self.store.apply(b).await;
    }

    async fn forget_session(&self, hash: &[u8; 32]) {
        self.sessions.write().remove(hash);
        let mut b = Batch::new();
        b.delete(Space::Sessions, hash.to_vec());
        let _ = self.store.apply(b).await;
    }

    /// Revokes the caller's token, durably. The session stays stored as
    /// revoked, like a lock's or a password change's, so that later calls
    /// with the token are still attributed to its principal.
    pub async fn logout(&self, caller: &Caller) -> Result<()> {
        self.sessions.write().remove(&caller.token_hash);
        let key = caller.token_hash.to_vec();
        let Some(raw) = self.store.get(Space::Sessions, &key).await? else {
            return Ok(());
        };
        let mut st = StoredSession::decode(&raw[..])?;
        st.revoked = true;
        let mut b = Batch::new();
        b.put(Space::Sessions, key, st.encode_to_vec());
        Ok(self.store.commit(b).await?)
    }

    /// Changes the caller's password and revokes its other sessions.
    pub async fn change_password(&self, caller: &Caller, old: &str, new: String) -> Result<()> {
        let new = Password::new_checked(new, &[caller.username.as_str(), caller.tenant.as_str()])?;
        let ctx = password_context(&caller.tenant, &caller.username);
        {
            // Guesses at the old password count toward the lockout: a
            // stolen session is no oracle.
            let (_turn, _guard) = self
                .login_turn(caller.tenant.as_str(), caller.username.as_str())
                .await;
            let p = self
                .load(&caller.tenant, &caller.username)
                .await?
                .ok_or(Error::Unauthenticated(BAD_CREDENTIALS))?;
            self.recheck_password(caller, &p, old).await?;
        }
        let phc = self.hasher.hash(&new, &ctx).await?;
        self.update(&caller.tenant, &caller.username, |p| {
            p.phc = phc.clone();
            (true, ())
        })
        .await?
        .ok_or(Error::Unauthenticated(BAD_CREDENTIALS))?;
        for hash in self
            .session_hashes_of(&caller.tenant, &caller.username)
            .await?
        {
            if hash != caller.token_hash {
                let cached = self.sessions.read().get(&hash).cloned();
                match cached {
                    Some(s) => self.revoke_session(&hash, &s).await,
                    None => self.forget_session(&hash).await,
                }
            }
        }
        Ok(self.store.sync().await?)
    }

    async fn session_hashes_of(
        &self,
        tenant: &TenantName,
        username: &Username,
    ) -> Result<Vec<[u8; 32]>> {
        let mut out = Vec::new();
        for (k, v) in self
            .store
            .scan_prefix(Space::Sessions, b"", usize::MAX)
            .await?
        {
            let s = StoredSession::decode(&v[..])?;
            if s.tenant == tenant.as_str()
                && s.username == username.as_str()
                && let Ok(h) = k.try_into()
            {
                out.push(h);
            }
        }
        Ok(out)
    }

    async fn lock_alert(&self, tenant: &str, principal: &str, failures: u32) -> Result<()> {
        self.audit
            .alert(
                Severity::Critical,
                "login_lockout",
                tenant,
                principal,
                format!(
                    "{failures} consecutive failed logins; locked for {} s",
                    lock_secs(failures)
                ),
            )
            .await
    }

    /// Locks or unlocks a principal. Unlocking also clears failed logins.
    pub async fn set_locked(
        &self,
        tenant: &TenantName,
        username: &Username,
        locked: bool,
    ) -> Result<()> {
        self.update(tenant, username, |p| {
            p.admin_locked = locked;
            if locked {
                p.lock_reason = "locked by an administrator".into();
                p.sessions_from_ms = now_ms() + 1;
            } else {
                p.failed_logins = 0;
                p.locked_until_ms = 0;
                p.lock_reason.clear();
            }
            (true, ())
        })
        .await?
        .ok_or(Error::NotFound)?;
        if !locked {
            // Unlocking undoes a defence: reviewers should see each one.
            self.audit
                .alert(
                    Severity::Warning,
                    "admin_unlock",
                    tenant.as_str(),
                    &format!("{tenant}/{username}"),
                    "account unlocked by an administrator".into(),
                )
                .await?;
        }
        Ok(())
    }

    /// Locks a principal until an administrator unlocks it and revokes
    /// every session it has: its tokens stop working at once (a spent
    /// budget, a honeytoken read). Returns whether it was unlocked before,
    /// so the caller alerts once.
    pub async fn lock_out(
        &self,
        tenant: &TenantName,
        username: &Username,
        reason: &str,
    ) -> Result<bool> {
        self.update(tenant, username, |p| {
            let was_locked = p.admin_locked;
            p.admin_locked = true;
            if !was_locked {
                p.lock_reason = reason.into();
            }
            p.sessions_from_ms = now_ms() + 1;
            (true, !was_locked)
        })
        .await?
        .ok_or(Error::NotFound)
    }

    /// What the vault's rules need of one principal: its role and when it
    /// was created.
    pub async fn info(&self, tenant: &TenantName, username: &Username) -> Result<Option<Basics>> {
        let Some(p) = self.load(tenant, username).await? else {
            return Ok(None);
        };
        Ok(Some(Basics {
            role: Role::parse(&p.role).map_err(|_| Error::DataLoss)?,
            created_ms: p.created_ms,
        }))
    }

    /// How many principals of `tenant` have `role`, locked ones counted.
    pub async fn count_role(&self, tenant: &TenantName, role: Role) -> Result<usize> {
        let mut prefix = tenant.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut n = 0;
        for (_, v) in self
            .store
            .scan_prefix(Space::Principals, &prefix, usize::MAX)
            .await?
        {
            if StoredPrincipal::decode(&v[..])?.role == role.as_str() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The principals of `tenant`, in name order, with their locks.
    pub async fn list(&self, tenant: &TenantName) -> Result<Vec<PrincipalInfo>> {
        let now = now_ms();
        let mut prefix = tenant.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for (k, v) in self
            .store
            .scan_prefix(Space::Principals, &prefix, usize::MAX)
            .await?
        {
            let p = StoredPrincipal::decode(&v[..])?;
            let username =
                String::from_utf8(k[prefix.len()..].to_vec()).map_err(|_| Error::DataLoss)?;
            let backoff = !p.admin_locked && p.locked_until_ms > now;
            let lock_reason = if p.admin_locked {
                p.lock_reason.clone()
            } else if backoff {
                format!("{} consecutive failed logins (back-off)", p.failed_logins)
            } else {
                String::new()
            };
            out.push(PrincipalInfo {
                username,
                role: p.role.clone(),
                locked: p.locked_at(now),
                lock_reason,
                locked_until_ms: if backoff { p.locked_until_ms } else { 0 },
                failed_logins: p.failed_logins,
                mfa_enrolled: !p.totp_sealed.is_empty(),
                recovery_codes_left: if p.totp_sealed.is_empty() {
                    0
                } else {
                    u32::try_from(p.recovery.iter().filter(|h| !h.is_empty()).count())
                        .unwrap_or(u32::MAX)
                },
                oidc: p.oidc.clone(),
            });
        }
        Ok(out)
    }

    /// Revokes every session of a tenant's principals (a shredded tenant).
    pub async fn forget_tenant(&self, tenant: &TenantName) -> Result<()> {
        let mut b = Batch::new();
        for (k, v) in self
            .store
            .scan_prefix(Space::Sessions, b"", usize::MAX)
            .await?
        {
            if StoredSession::decode(&v[..])?.tenant == tenant.as_str() {
                if let Ok(h) = <[u8; 32]>::try_from(&k[..]) {
                    self.sessions.write().remove(&h);
                }
                b.delete(Space::Sessions, k);
            }
        }
        Ok(self.store.apply_each(b).await?)
    }

    /// Forgets the identities bound to a tenant's principals (a shredded
    /// tenant): a tenant made again later starts with none.
    pub async fn forget_bindings(&self, tenant: &TenantName) -> Result<()> {
        let mut owner = tenant.as_str().as_bytes().to_vec();
        owner.push(0);
        let mut b = Batch::new();
        for (k, v) in self
            .store
            .scan_prefix(Space::Meta, crate::oidc::BINDING_PREFIX, usize::MAX)
            .await?
        {
            if v.starts_with(&owner) {
                b.delete(Space::Meta, k);
            }
        }
        Ok(self.store.apply_each(b).await?)
    }

    /// Drops expired sessions from memory and storage.
    pub async fn sweep_expired(&self) -> Result<usize> {
        let now = now_ms();
        let idle_ms = (self.session.idle_secs as i64) * 1000;
        let mut b = Batch::new();
        for (k, v) in self
            .store
            .scan_prefix(Space::Sessions, b"", usize::MAX)
            .await?
        {
            let s = StoredSession::decode(&v[..])?;
            let cached_last = <[u8; 32]>::try_from(&k[..])
                .ok()
                .and_then(|h| self.sessions.read().get(&h).cloned())
                .map(|c| c.last_used_ms.load(Ordering::Relaxed))
                .unwrap_or(s.last_used_ms);
            let ended = s.revoked || now >= s.expires_ms || now - cached_last > idle_ms;
            if ended && let Ok(h) = <[u8; 32]>::try_from(&k[..]) {
                self.sessions.write().remove(&h);
            }
            // Kept a while longer (revoked) to attribute calls made with it.
            let ended_at = s.expires_ms.min(cached_last + idle_ms);
            if ended && now - ended_at > REVOKED_KEPT_MS {
                b.delete(Space::Sessions, k);
            }
        }
        // Spent id tokens past the time they would be refused anyway.
        for (k, v) in self
            .store
            .scan_prefix(Space::Meta, REPLAY_PREFIX, usize::MAX)
            .await?
        {
            let until = <[u8; 8]>::try_from(&v[..]).map_or(0, i64::from_be_bytes);
            if until < now {
                b.delete(Space::Meta, k);
            }
        }
        let n = b.0.len();
        if n > 0 {
            self.store.apply(b).await?;
        }
        Ok(n)
    }
}
