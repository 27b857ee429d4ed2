//! The vault: opens storage and keys, wires accounts, tenants and records
//! together, and bootstraps an empty data directory.

use std::{fs, os::unix::fs::DirBuilderExt, path::Path, sync::Arc};

use zeroize::Zeroizing;

use crate::{
    accounts::{Accounts, Caller, Hasher},
    audit::Audit,
    budgets::{Budgets, Policy, Read},
    config::Config,
    error::Error,
    honeytokens::Honeytokens,
    keys::{self, KeyError, Keyring},
    model::{FieldName, Fields, Password, RecordId, Role, TenantName, Username},
    records::Records,
    records::{PlainRecord, Written},
    store::{Backend, Batch, SledBackend, SledOptions, Space, Storage, StorageError},
    tenants::Tenant,
    tenants::Tenants,
};

/// Why the vault would not open. One line each, safe to print.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("data_dir {0}: {1}")]
    DataDir(String, String),
    #[error("{}", storage_message(.0))]
    Storage(#[from] StorageError),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    /// The data directory's format is not one this release reads.
    #[error("{0}")]
    Format(String),
}

fn storage_message(e: &StorageError) -> String {
    match e {
        // Already one plain sentence naming the directory.
        StorageError::Locked(_) => e.to_string(),
        other => format!("storage: {other}"),
    }
}

impl From<Error> for StartError {
    fn from(e: Error) -> Self {
        StartError::Bootstrap(e.to_string())
    }
}

/// A stored record against the trail's last write of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrailCheck {
    /// The record is the one last written (or, deleted, is absent).
    Matches,
    /// An older copy (or a deleted record) was put back.
    RolledBack,
    /// The trail's last write stored it; it is gone.
    Missing,
    /// The trail holds no write of it (pruned, or a honeytoken).
    NoWriteInTrail,
}

/// Where the first administrator's password comes from, on an empty data
/// directory.
#[derive(Clone)]
pub enum Bootstrap {
    /// Given by the operator (env `COFFRE_BOOTSTRAP_ADMIN_PASSWORD`).
    Password(String),
    /// Generated, and reported once in [`OpenReport`] (for a terminal).
    Random,
    /// Neither: an empty data directory is refused (no terminal to show a
    /// generated password on, and a log must never carry it).
    Refuse,
}

impl From<Option<String>> for Bootstrap {
    fn from(p: Option<String>) -> Self {
        p.map_or(Bootstrap::Random, Bootstrap::Password)
    }
}

/// What opening the vault did that the operator must hear about once.
#[derive(Default)]
pub struct OpenReport {
    /// Records migrated to the current format at this start.
    pub migrated_records: u64,
    /// Dev mode made a new master key file here.
    pub generated_key: Option<std::path::PathBuf>,
    /// The bootstrap admin's generated password, to print once.
    pub bootstrap_password: Option<Zeroizing<String>>,
    /// The bootstrap admin was created.
    pub bootstrapped: bool,
    /// Tenants on the shred list that came back with the data directory,
    /// shredded again.
    pub reshredded: Vec<String>,
}

pub struct Vault {
    pub store: Storage,
    pub audit: Arc<Audit>,
    pub keys: Arc<Keyring>,
    pub accounts: Arc<Accounts>,
    pub tenants: Tenants,
    pub records: Records,
    pub budgets: Budgets,
    pub honeytokens: Honeytokens,
    /// Trusted OpenID Connect providers.
    pub oidc: crate::oidc::Oidc,
    /// The two-person rule.
    pub approvals: crate::approvals::Approvals,
    /// Export grants (reads beyond a budget, for one purpose).
    pub grants: crate::grants::Grants,
    /// Bounds on connections, streams and refused calls (`connections.*`).
    pub connections: crate::config::ConnectionsConfig,
    /// Scheduled backups (`backup.*`).
    pub backup: crate::config::BackupConfig,
    /// When the last backup (streamed or scheduled) was taken, unix ms.
    last_backup_ms: std::sync::atomic::AtomicI64,
    backup_note: tokio::sync::Mutex<()>,
    /// Tenants with a key job (rewrap, reindex) running here, one at a
    /// time, with its progress.
    key_jobs: parking_lot::Mutex<std::collections::HashMap<TenantName, JobProgress>>,
    /// This node among others on one database (postgres), if any.
    pub(crate) node: Option<crate::cluster::Node>,
}

/// Records (rewrap, reindex) per durable step of a tenant-wide key job.
/// A step's crypto holds its runtime worker: 16 records (~1 ms) keep the
/// p99 of concurrent reads within 1.2–1.3× of idle, where 64 (~3.5 ms) gave
/// up to 2.4× (BENCHMARKS.md, "Rewrap").
const JOB_STEP: usize = 16;

/// Frees a tenant's job slot when the job ends, however it ends.
struct JobSlot<'a>(
    &'a parking_lot::Mutex<std::collections::HashMap<TenantName, JobProgress>>,
    TenantName,
);

/// A key job running on this node: which, and how far (records).
#[derive(Debug, Clone)]
pub struct JobProgress {
    pub job: &'static str,
    pub done: u64,
    pub total: u64,
}

impl Drop for JobSlot<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

/// A reading call under way: the caller's tenant, and the export grant
/// records reserved for it, if its purpose is a grant's.
pub struct Reads {
    pub tenant: Arc<Tenant>,
    grant: Option<crate::grants::Reservation>,
}

impl Reads {
    /// Whether the call reads under an export grant.
    pub fn granted(&self) -> bool {
        self.grant.is_some()
    }
}

/// `Meta` key of the time of the last backup written whole.
const LAST_BACKUP_KEY: &[u8] = b"last_backup_ms";

/// Name of the first administrator made on an empty data directory.
pub const BOOTSTRAP_ADMIN: &str = "admin";
pub const BOOTSTRAP_PASSWORD_ENV: &str = "COFFRE_BOOTSTRAP_ADMIN_PASSWORD";

impl Vault {
    /// Opens (or initialises) the vault described by `config`.
    pub async fn open(
        config: &Config,
        bootstrap: impl Into<Bootstrap>,
    ) -> Result<(Arc<Self>, OpenReport), StartError> {
        Self::open_with(config, bootstrap, |b| b).await
    }

    /// Like [`Vault::open`], with the storage backend passed through `wrap`
    /// first (fault injection in tests).
    pub async fn open_with(
        config: &Config,
        bootstrap: impl Into<Bootstrap>,
        wrap: impl FnOnce(Arc<dyn Backend>) -> Arc<dyn Backend>,
    ) -> Result<(Arc<Self>, OpenReport), StartError> {
        let mut report = OpenReport::default();
        let key_path = &config.master_key_file;
        if config.dev && !key_path.exists() {
            if let Some(parent) = key_path.parent().filter(|p| !p.as_os_str().is_empty()) {
                make_private_dir(parent)?;
            }
            keys::generate_key_file(key_path)?;
            report.generated_key = Some(key_path.clone());
        }
        let master = keys::load_key_file(key_path)?;
        let pg = match (&config.storage.backend, &config.storage.postgres_url) {
            (crate::config::StorageBackend::Postgres, Some(url)) => {
                Some(crate::store::PostgresOptions {
                    url: url.expose().to_string(),
                    pool_size: config.storage.pool_size,
                })
            }
            _ => None,
        };
        let mut pg_backend = None;
        let (store, home) = match &pg {
            Some(opts) => {
                let backend = Arc::new(crate::store::PostgresBackend::open(opts).await?);
                if backend.restore_target().await?
                    == crate::store::postgres::RestoreTarget::Interrupted
                {
                    return Err(StartError::Format(
                        "a restore into this database did not finish: run coffre restore again"
                            .into(),
                    ));
                }
                let pool = backend.shared_pool();
                pg_backend = Some(backend.clone());
                (
                    Storage::new(wrap(backend)).shared_with_other_nodes(),
                    keys::KeyHome::Db(crate::store::postgres::KeyStoreRow::new(opts), pool),
                )
            }
            None => {
                make_private_dir(&config.data_dir)?;
                narrow_data_dir(
                    &config.data_dir,
                    &[
                        config.audit.mirror_file.as_deref(),
                        config.alert_file.as_deref(),
                    ],
                )?;
                let sled = SledBackend::open(
                    &config.data_dir,
                    &SledOptions {
                        cache_capacity_bytes: config.storage.cache_capacity_mib * 1024 * 1024,
                    },
                )?;
                (
                    Storage::new(wrap(Arc::new(sled))).with_space_guard(
                        crate::store::SpaceGuard::new(
                            &config.data_dir,
                            config.storage.min_free_mib,
                        ),
                    ),
                    keys::KeyHome::in_dir(&config.data_dir),
                )
            }
        };
        let keys = Arc::new(
            Keyring::open(
                store.clone(),
                home,
                &master,
                config.keys.rotate_after_encryptions,
            )
            .await?,
        );
        let list = open_shred_list(config, &master, &store).await?;
        drop(master);
        let came_back = keys.attach_shred_list(list)?;
        let pepper = crate::crypto::SecretKey::from_slice(keys.pepper().expose())
            .expect("pepper is KEY_LEN bytes");
        let hasher = Hasher::new(&config.argon2, pepper)?;
        let audit_key = crate::crypto::SecretKey::from_slice(keys.audit_key().expose())
            .expect("audit key is KEY_LEN bytes");
        let audit = match &pg {
            Some(opts) => Audit::open_postgres(
                opts,
                store.clone(),
                audit_key,
                config.audit.mirror_file.as_deref(),
                config.alert_file.as_deref(),
            )?,
            None => {
                Audit::open(
                    store.clone(),
                    audit_key,
                    &config.data_dir,
                    config.audit.mirror_file.as_deref(),
                    config.alert_file.as_deref(),
                )
                .await?
            }
        };
        let audit = Arc::new(audit);
        let mfa_roles = config
            .mfa_roles()
            .iter()
            .filter_map(|r| Role::parse(r).ok())
            .collect();
        let mut accounts = Accounts::new(
            store.clone(),
            hasher.clone(),
            config.session.clone(),
            audit.clone(),
        )
        .with_mfa(
            mfa_roles,
            crate::crypto::derive_key(keys.pepper(), "coffre/totp-secrets/v1"),
        );
        if pg.is_some() {
            accounts = accounts.shared();
        }
        let accounts = Arc::new(accounts);
        let node = match pg_backend {
            Some(b) => Some(
                crate::cluster::Node::join(&store, b, config)
                    .await
                    .map_err(|e| StartError::Format(e.to_string()))?,
            ),
            None => None,
        };
        let derived = |k: &crate::crypto::SecretKey| {
            crate::crypto::SecretKey::from_slice(k.expose())
                .expect("derived keys are KEY_LEN bytes")
        };
        let last_backup = match store.get(Space::Meta, LAST_BACKUP_KEY).await? {
            Some(v) if v.len() == 8 => i64::from_be_bytes(v.try_into().expect("8 bytes")),
            _ => 0,
        };
        let vault = Arc::new(Self {
            budgets: Budgets::new(
                store.clone(),
                audit.clone(),
                accounts.clone(),
                derived(keys.budget_key()),
                Policy::from_config(config),
            ),
            honeytokens: Honeytokens::open(store.clone(), derived(keys.honeytoken_key())).await?,
            oidc: crate::oidc::Oidc::new(&config.oidc).map_err(StartError::Bootstrap)?,
            approvals: crate::approvals::Approvals::new(
                store.clone(),
                audit.clone(),
                config.approval_actions(),
                config.approval.ttl_minutes,
                config.min_approver_age_minutes(),
                config.approval.max_pending_per_requester,
            ),
            grants: crate::grants::Grants::new(store.clone(), audit.clone()),
            audit,
            accounts,
            tenants: Tenants::new(store.clone(), keys.clone()),
            records: Records::new(store.clone(), keys.clone(), hasher),
            keys,
            store,
            connections: config.connections.clone(),
            backup: config.backup.clone(),
            last_backup_ms: std::sync::atomic::AtomicI64::new(last_backup),
            backup_note: Default::default(),
            key_jobs: Default::default(),
            node,
        });
        for t in came_back {
            // Its keys are gone already (attach_shred_list); its data goes
            // now, and the auditors hear of it.
            vault
                .audit
                .alert(
                    crate::audit::Severity::Critical,
                    "shredded_tenant_returned",
                    &t,
                    "",
                    "a tenant on the shred list came back with the data (an older backup or copy): its keys were destroyed again and its data deleted".into(),
                )
                .await?;
            let name = TenantName::parse(&t)?;
            vault.shred_tenant_data(&name, "system/coffre").await?;
            report.reshredded.push(t);
        }
        report.migrated_records = vault.migrate_records().await?;
        vault.bootstrap(bootstrap.into(), &mut report).await?;
        Ok((vault, report))
    }

    /// Brings the records of a data directory written before records were
    /// sealed as a whole to the current format, in place: each record is
    /// rewritten atomically, the format is recorded in the authenticated
    /// key store last, so a migration killed half-way finishes at the next
    /// start. Returns how many records were sealed.
    async fn migrate_records(&self) -> Result<u64, StartError> {
        let format = self.keys.record_format();
        if format > crate::records::RECORD_FORMAT {
            return Err(StartError::Format(format!(
                "data directory record format {format} is newer than this coffre reads ({}): run a newer coffre",
                crate::records::RECORD_FORMAT
            )));
        }
        if format == crate::records::RECORD_FORMAT {
            return Ok(0);
        }
        let names = self.tenants.names().await?;
        let plain: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.keys.ensure_record_keys(&plain)?;
        let mut total = 0;
        for name in &names {
            let tenant = match self.tenants.get(name).await {
                Ok(t) => t,
                // Shredded: nothing of it can be read or needs sealing.
                Err(Error::NotFound) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut cursor = Vec::new();
            loop {
                let (done, next) = self.records.migrate_step(&tenant, &cursor, 256).await?;
                total += done;
                match next {
                    Some(c) => cursor = c,
                    None => break,
                }
            }
        }
        self.store.flush_blocking()?;
        self.keys.set_record_format(crate::records::RECORD_FORMAT)?;
        if total > 0 {
            tracing::info!(records = total, "records sealed as a whole (format 2)");
        }
        Ok(total)
    }

    /// Why this node refuses every call, if it does: the database's schema
    /// is newer than this build, or the trail's head went backwards.
    pub fn refusing(&self) -> Option<String> {
        if self.audit.diverged() {
            return Some("the audit trail's head moved backwards in the database".into());
        }
        let node = self.node.as_ref()?;
        node.backend.refusal().map(|e| e.to_string())
    }

    /// Leaves the other nodes (its heartbeat goes), at shutdown.
    pub async fn leave(&self) {
        if let Some(node) = &self.node {
            node.leave(&self.store).await;
        }
    }

    /// Notes a backup written whole (its creation time), durably, so that
    /// the "no backup for a day" alert survives a restart.
    pub async fn note_backup(&self, created_unix_ms: i64) {
        // One at a time from the max to its write: the stored time never
        // goes back behind a slower, older note.
        let _turn = self.backup_note.lock().await;
        self.last_backup_ms
            .fetch_max(created_unix_ms, std::sync::atomic::Ordering::Relaxed);
        let mut b = Batch::new();
        b.put(
            Space::Meta,
            LAST_BACKUP_KEY.to_vec(),
            self.last_backup_ms().to_be_bytes().to_vec(),
        );
        if let Err(e) = self.store.commit(b).await {
            tracing::warn!(error = %e, "time of the last backup not stored");
        }
    }

    /// When the last backup written whole was taken (0: none recorded).
    pub fn last_backup_ms(&self) -> i64 {
        self.last_backup_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Compares a stored record with the last write of it the audit trail
    /// holds (its version and write id, from the PutRecord event; or its
    /// deletion): a record put back from an older copy of the data
    /// directory seals correctly but is not the latest write. What `scrub`
    /// runs on every record.
    pub async fn check_against_trail(
        &self,
        tenant: &Tenant,
        id: &RecordId,
    ) -> Result<TrailCheck, Error> {
        let stamp = self.records.stamp(tenant, id).await?;
        self.compare_with_trail(tenant, id, stamp).await
    }

    /// [`Vault::check_against_trail`] for a record whose stamp (version,
    /// write id; `None`: absent) the caller has already read and checked.
    pub async fn compare_with_trail(
        &self,
        tenant: &Tenant,
        id: &RecordId,
        stamp: Option<(u64, [u8; 16])>,
    ) -> Result<TrailCheck, Error> {
        let Some(last) = self
            .audit
            .latest_write(tenant.name.as_str(), id.as_str())
            .await?
        else {
            return Ok(TrailCheck::NoWriteInTrail);
        };
        if last.deleted {
            return Ok(match stamp {
                None => TrailCheck::Matches,
                Some(_) => TrailCheck::RolledBack,
            });
        }
        let Some((version, write_id)) = stamp else {
            return Ok(TrailCheck::Missing);
        };
        let version_ok = last.version.is_none_or(|v| v == version.to_string());
        let write_ok = last.write_id.is_none_or(|w| w == hex::encode(write_id));
        Ok(if version_ok && write_ok {
            TrailCheck::Matches
        } else {
            TrailCheck::RolledBack
        })
    }

    /// Starts a reading call (Get, Find, BulkRead) of `caller` with its
    /// purpose: `break_glass` opens its hour of doubled budget. Returns the
    /// caller's tenant, which every read needs, so no read path can skip
    /// this step.
    ///
    /// `records`: how many records the call may read. With the purpose of
    /// a live export grant of the caller, that many of the grant's records
    /// are reserved for the call, and its reads spend them, not the budget.
    pub async fn begin_reads(
        &self,
        caller: &Caller,
        purpose: &crate::model::Purpose,
        records: usize,
    ) -> Result<Reads, Error> {
        let tenant = self.tenants.get(&caller.tenant).await?;
        let wanted = u32::try_from(records).unwrap_or(u32::MAX);
        let grant = self.grants.reserve(caller, purpose, wanted).await?;
        if grant.is_none() {
            self.budgets.begin(caller, purpose).await?;
        }
        Ok(Reads { tenant, grant })
    }

    /// Locks or unlocks a principal (an administrator's call). An unlock
    /// also clears the throttles its budget counted toward the lock; its
    /// windows stay (an unlock refills nothing).
    ///
    /// Locking an admin takes effect at once, with a critical alert
    /// (incident response must not wait for the suspect); unlocking one is
    /// `admin_change`, for a second admin to approve.
    pub async fn set_principal_locked(
        &self,
        tenant: &TenantName,
        username: &Username,
        locked: bool,
        by: &Caller,
    ) -> Result<(), Error> {
        let info = self
            .accounts
            .info(tenant, username)
            .await?
            .ok_or(Error::NotFound)?;
        let admin = info.role == Role::Admin;
        if admin && !locked {
            self.approvals
                .check(
                    "admin_change",
                    &format!("tenant={tenant} username={username} unlock"),
                    by,
                )
                .await?;
        }
        self.accounts.set_locked(tenant, username, locked).await?;
        if admin && locked {
            // A suspect's approvals no longer count.
            let voided = self
                .approvals
                .void_granted_by(&format!("{tenant}/{username}"))
                .await?;
            self.audit
                .alert(
                    crate::audit::Severity::Critical,
                    "admin_locked",
                    tenant.as_str(),
                    &format!("{tenant}/{username}"),
                    format!(
                        "admin account locked by {}; its sessions ended; {voided} approvals it granted and nobody used yet are void",
                        by.principal()
                    ),
                )
                .await?;
        }
        if !locked {
            self.budgets.unlocked(tenant, username.as_str()).await?;
        }
        Ok(())
    }

    /// Creates a principal. An admin is `admin_change`: a second admin
    /// approves it, except while the vault has fewer than two admins
    /// (locked ones counted: the bootstrap); every admin created raises a
    /// critical alert. Two parallel creations cannot both pass as the
    /// bootstrap: each claims its admin count's slot in the same batch that
    /// writes the principal.
    pub async fn create_principal(&self, new: NewPrincipal<'_>, by: &Caller) -> Result<(), Error> {
        let NewPrincipal {
            tenant,
            username,
            password,
            role,
            oidc,
        } = new;
        if role != Role::Admin {
            self.accounts
                .create(tenant, username, password, role, oidc, None)
                .await?;
            if role.reads_records() {
                // An admin who makes a reader could sign in as it: every
                // reader made is for a reviewer to see, with its maker.
                self.audit
                    .alert(
                        crate::audit::Severity::Warning,
                        "reader_created",
                        tenant.as_str(),
                        &format!("{tenant}/{username}"),
                        format!(
                            "{} account created by {}, signing in by {}",
                            role.as_str(),
                            by.principal(),
                            match oidc {
                                Some(b) => format!("single sign-on ({})", b.provider),
                                None => "a password its creator chose".into(),
                            }
                        ),
                    )
                    .await?;
            }
            return Ok(());
        }
        for _ in 0..3 {
            if self.accounts.exists(tenant, username).await? {
                return Err(Error::AlreadyExists("principal already exists".into()));
            }
            let admins = self.accounts.count_role(tenant, Role::Admin).await?;
            let how = if admins < 2 {
                let slot = format!("admin-bootstrap\0{admins}").into_bytes();
                match self
                    .accounts
                    .create(tenant, username, password, role, oidc, Some(slot))
                    .await
                {
                    // The slot went to a parallel creation: decide again.
                    Err(Error::AlreadyExists(_))
                        if !self.accounts.exists(tenant, username).await? =>
                    {
                        continue;
                    }
                    r => r?,
                }
                format!(
                    "admin created by {} without a second admin: the vault had {admins} (the bootstrap)",
                    by.principal()
                )
            } else {
                // The approval is for this admin as it will sign in: the
                // identity it is bound to is part of what was approved.
                let mut target = format!("tenant={tenant} username={username} create");
                if let Some(b) = oidc {
                    target.push_str(&format!(" oidc={b}"));
                }
                let approval = self.approvals.check("admin_change", &target, by).await?;
                self.accounts
                    .create(tenant, username, password, role, oidc, None)
                    .await?;
                match approval {
                    Some(a) => format!(
                        "admin created by {} under approval {} of {}",
                        by.principal(),
                        a.id,
                        a.decided_by
                    ),
                    None => format!("admin created by {}", by.principal()),
                }
            };
            self.audit
                .alert(
                    crate::audit::Severity::Critical,
                    "admin_created",
                    tenant.as_str(),
                    &format!("{tenant}/{username}"),
                    how,
                )
                .await?;
            return Ok(());
        }
        Err(Error::FailedPrecondition(
            "admins were created meanwhile: run this again".into(),
        ))
    }

    /// Approves (`yes`) or denies an approval request as `by`.
    pub async fn decide_approval(
        &self,
        id: &str,
        by: &Caller,
        yes: bool,
    ) -> Result<crate::approvals::Approval, Error> {
        let created_ms = self
            .accounts
            .info(&by.tenant, &by.username)
            .await?
            .ok_or(Error::Unauthenticated("no such session"))?
            .created_ms;
        self.approvals
            .decide(
                id,
                crate::approvals::Approver {
                    caller: by,
                    created_ms,
                },
                yes,
            )
            .await
    }

    /// Unlocks a principal from the server itself, with the master key and
    /// no session: the way back when every other admin is locked. Audited,
    /// with a critical alert.
    pub async fn unlock_offline(
        &self,
        tenant: &TenantName,
        username: &Username,
        operator: &str,
    ) -> Result<(), Error> {
        self.accounts.set_locked(tenant, username, false).await?;
        self.budgets.unlocked(tenant, username.as_str()).await?;
        self.audit
            .record(crate::pb::AuditEvent {
                action: "offline/unlock_principal".into(),
                tenant: tenant.to_string(),
                principal: operator.to_string(),
                fields: vec![format!("username={username}")],
                outcome: "ok".into(),
                ..Default::default()
            })
            .await?;
        self.audit
            .alert(
                crate::audit::Severity::Critical,
                "offline_unlock",
                tenant.as_str(),
                &format!("{tenant}/{username}"),
                format!("unlocked offline with the master key by {operator} on the server"),
            )
            .await?;
        self.store.sync().await?;
        Ok(())
    }

    /// Makes a new data key version active for `tenant`, durably.
    pub async fn rotate_tenant_key(&self, tenant: &Tenant) -> Result<u32, Error> {
        let version = self.keys.rotate(&tenant.keys).await?;
        self.store.sync().await?;
        Ok(version)
    }

    /// Retires (destroys) a data key version no field uses any more.
    pub async fn retire_key_version(
        &self,
        tenant: &Tenant,
        version: u32,
        by: &Caller,
    ) -> Result<(), Error> {
        // Usage only falls for a version that no longer encrypts (rewraps
        // move fields off it; writes use the active one): counted first,
        // it is an upper bound when the version is destroyed.
        let used = self
            .records
            .key_usage(tenant)
            .await?
            .get(&version)
            .copied()
            .unwrap_or(0);
        // A second admin is asked only for a retirement that can happen.
        self.keys.retirable(&tenant.keys, version)?;
        if used > 0 {
            return Err(crate::keys::RetireError::InUse(used).into());
        }
        self.approvals
            .check(
                "retire_key_version",
                &format!("tenant={} version={version}", tenant.name),
                by,
            )
            .await?;
        self.keys
            .retire::<Error>(&tenant.keys, version, || Ok(used))
            .await?;
        self.store.sync().await?;
        Ok(())
    }

    /// Reads one record for `caller` under its read budget: a
    /// honeytoken locks the caller, a spent budget refuses, and only then is
    /// anything decrypted. A missing id spends budget like a present one.
    pub async fn read_record(
        &self,
        caller: &Caller,
        reads: &Reads,
        id: &RecordId,
        projection: &[FieldName],
        action: &str,
    ) -> Result<PlainRecord, Error> {
        let tenant = &*reads.tenant;
        if self.honeytokens.is_canary(&tenant.name, id) {
            return Err(self.honeytoken_tripped(caller, action).await);
        }
        let sealed = self.records.fetch(tenant, id).await?;
        let read = match sealed {
            Some(_) => Read::Record(id),
            None => Read::Missing,
        };
        match &reads.grant {
            Some(g) if g.take() => {}
            // The grant's purpose reads under the grant only.
            Some(_) => {
                return Err(Error::OverBudget {
                    limit: "export grant used up",
                    retry_after_ms: 0,
                });
            }
            None => {
                if let Err(refused) = self.budgets.spend_read(caller, read).await? {
                    return Err(self.budgets.throttled(caller, action, refused).await);
                }
            }
        }
        let sealed = sealed.ok_or(Error::NotFound)?;
        match sealed.open(tenant, projection) {
            // Between the fetch and the decryption a rewrap may have moved
            // the record to the active key and a retirement destroyed the
            // version it was sealed under: the record as it is now is the
            // one to read. Bytes that did not change failed on their own.
            Err(Error::DataLoss) => match self.records.fetch(tenant, id).await? {
                Some(now) if now != sealed => now.open(tenant, projection),
                _ => Err(Error::DataLoss),
            },
            opened => opened,
        }
    }

    /// Stores a record; if the write took the tenant's data key to its
    /// encryption bound, the automatic rotation is recorded in the trail.
    pub async fn put_record(
        &self,
        tenant: &Tenant,
        id: Option<RecordId>,
        fields: Fields,
    ) -> Result<Written, Error> {
        let w = self.records.put(tenant, id, fields).await?;
        self.key_rotated(tenant, w.rotated_to).await?;
        Ok(w)
    }

    /// Re-encrypts every field of `tenant` still under an older key version
    /// with the active one, online, reporting `(done, total)` fields after
    /// each durable step (the last report is `(total, total)`: every field
    /// counted at the start is then under the active version, rewrapped
    /// here or replaced meanwhile by a write). Resumable: a run cut short
    /// (crash, `kill -9`) goes on where it stopped when run again.
    pub async fn rewrap(&self, tenant: &Tenant, progress: impl Fn(u64, u64)) -> Result<u64, Error> {
        let target = tenant.keys.active_version();
        let (total, rotated) = self
            .resumable_job(
                tenant,
                "rewrap",
                // A stored run toward another version starts over.
                &target.to_be_bytes(),
                KeyJob::Rewrap { target },
                progress,
            )
            .await?;
        self.key_rotated(tenant, rotated).await?;
        Ok(total)
    }

    /// Rotates the tenant's blind-index key and moves every record's index
    /// entries to the new key, online (searches look under both keys until
    /// the end), in steps like [`Vault::rewrap`]; then the old key is
    /// destroyed. Reports `(done, total)` records.
    pub async fn rotate_index(
        &self,
        tenant: &Tenant,
        progress: impl Fn(u64, u64),
    ) -> Result<u64, Error> {
        self.keys.begin_index_rotation(&tenant.keys).await?;
        let (total, _) = self
            .resumable_job(tenant, "reindex", b"", KeyJob::Reindex, progress)
            .await?;
        // Every record's entries are durable under the next key (the job
        // committed its last step) before the current one is destroyed.
        self.keys.finish_index_rotation(&tenant.keys).await?;
        Ok(total)
    }

    /// The size of a key job, given what an earlier run did.
    async fn job_total(&self, tenant: &Tenant, job: KeyJob, done: u64) -> Result<u64, Error> {
        Ok(match job {
            KeyJob::Rewrap { target } => {
                let left: u64 = self
                    .records
                    .key_usage(tenant)
                    .await?
                    .iter()
                    .filter(|(v, _)| **v != target)
                    .map(|(_, n)| n)
                    .sum();
                done + left
            }
            KeyJob::Reindex => self.records.count(tenant).await?.max(done),
        })
    }

    /// One step of a key job from `cursor`: what it did, where the next
    /// starts (none: the end), and a key rotation the step caused.
    async fn job_step(
        &self,
        tenant: &Tenant,
        job: KeyJob,
        cursor: &[u8],
    ) -> Result<(u64, Option<Vec<u8>>, Option<u32>), Error> {
        Ok(match job {
            KeyJob::Rewrap { .. } => {
                let step = self.records.rewrap_step(tenant, cursor, JOB_STEP).await?;
                (step.fields, step.cursor, step.rotated_to)
            }
            KeyJob::Reindex => {
                let (n, next) = self.records.reindex_step(tenant, cursor, JOB_STEP).await?;
                (n, next, None)
            }
        })
    }

    /// Runs a tenant-wide key job, one per tenant at a time: `step` from the
    /// stored cursor on until it returns no cursor, each step made durable
    /// with the job's progress under `Meta` `<name>\0<tenant>` (a stored run
    /// with another `tag` starts over), then a sleep as long as the step
    /// took, so that the job takes at most half of a core and reads keep
    /// their latency. `total` gets the done count stored by an earlier run
    /// and answers the whole job's size.
    async fn resumable_job(
        &self,
        tenant: &Tenant,
        name: &'static str,
        tag: &[u8],
        job: KeyJob,
        progress: impl Fn(u64, u64),
    ) -> Result<(u64, Option<u32>), Error> {
        {
            let mut jobs = self.key_jobs.lock();
            if jobs.contains_key(&tenant.name) {
                return Err(Error::FailedPrecondition(
                    "a rewrap or index rebuild of this tenant is already running".into(),
                ));
            }
            let p = JobProgress {
                job: name,
                done: 0,
                total: 0,
            };
            jobs.insert(tenant.name.clone(), p);
        }
        let _running = JobSlot(&self.key_jobs, tenant.name.clone());
        // One node runs a tenant's job: the lease says which, and another
        // takes it over if that one stops renewing it.
        if let Some(node) = &self.node
            && !node.take_lease(&self.store, &tenant.name).await?
        {
            return Err(Error::FailedPrecondition(
                "a rewrap or index rebuild of this tenant is running on another node".into(),
            ));
        }
        let r = self.run_job(tenant, name, tag, job, progress).await;
        if let Some(node) = &self.node {
            node.release_lease(&self.store, &tenant.name).await;
        }
        r
    }

    /// Whether this node runs a key job of `tenant` now.
    pub(crate) fn job_running_here(&self, tenant: &TenantName) -> bool {
        self.key_jobs.lock().contains_key(tenant)
    }

    /// The key jobs running on this node now, with their progress.
    pub fn key_jobs(&self) -> Vec<(TenantName, JobProgress)> {
        let jobs = self.key_jobs.lock();
        jobs.iter().map(|(t, p)| (t.clone(), p.clone())).collect()
    }

    /// Resumes a key job another node left (`name`: rewrap or reindex).
    pub(crate) async fn resume_job(&self, name: &str, tenant: &TenantName) -> Result<(), Error> {
        let tenant = self.tenants.get(tenant).await?;
        match name {
            "rewrap" => self.rewrap(&tenant, |_, _| {}).await.map(|_| ()),
            _ => {
                self.resumable_job(&tenant, "reindex", b"", KeyJob::Reindex, |_, _| {})
                    .await?;
                self.keys.finish_index_rotation(&tenant.keys).await?;
                Ok(())
            }
        }
    }

    /// The steps of [`Vault::resumable_job`], its slot (and lease) held.
    async fn run_job(
        &self,
        tenant: &Tenant,
        name: &str,
        tag: &[u8],
        job: KeyJob,
        progress: impl Fn(u64, u64),
    ) -> Result<(u64, Option<u32>), Error> {
        let key = [name.as_bytes(), b"\0", tenant.name.as_str().as_bytes()].concat();
        let head = [&[tag.len() as u8][..], tag].concat();
        let (mut done, mut cursor) = match self.store.get(Space::Meta, &key).await? {
            Some(v) if v.len() >= head.len() + 8 && v.starts_with(&head) => {
                let at = head.len();
                (
                    u64::from_be_bytes(v[at..at + 8].try_into().expect("8 bytes")),
                    v[at + 8..].to_vec(),
                )
            }
            _ => (0, Vec::new()),
        };
        let total = self.job_total(tenant, job, done).await?;
        let progress = |d: u64, t: u64| {
            if let Some(p) = self.key_jobs.lock().get_mut(&tenant.name) {
                (p.done, p.total) = (d, t);
            }
            progress(d, t);
        };
        let mut rotated = None;
        progress(done, total);
        loop {
            let started = std::time::Instant::now();
            let (n, next, r) = self.job_step(tenant, job, &cursor).await?;
            rotated = r.or(rotated);
            done += n;
            let Some(next) = next else { break };
            cursor = next;
            let mut b = Batch::new();
            b.put(
                Space::Meta,
                key.clone(),
                [&head[..], &done.to_be_bytes(), &cursor].concat(),
            );
            self.store.commit(b).await?;
            if let Some(node) = &self.node
                && !node.take_lease(&self.store, &tenant.name).await?
            {
                return Err(Error::Unavailable(crate::store::StorageError::Busy(
                    "this node lost the key job's lease to another node",
                )));
            }
            progress(done.min(total), total);
            tokio::time::sleep(started.elapsed().max(std::time::Duration::from_millis(1))).await;
        }
        let mut b = Batch::new();
        b.delete(Space::Meta, key);
        self.store.commit(b).await?;
        let total = total.max(done);
        progress(total, total);
        Ok((total, rotated))
    }

    /// Crypto-shreds a tenant: its keys are destroyed first (durably: from
    /// then on nothing of it can be decrypted, whatever copies of the data
    /// remain), then its entry, records, index, secrets, principals,
    /// sessions and budgets are deleted. Its audit events stay (they hold
    /// no values, and the chain must verify). Runs again to finish after a
    /// crash. Returns the number of records deleted.
    pub async fn shred_tenant(
        &self,
        name: &TenantName,
        confirm: &str,
        by: &Caller,
    ) -> Result<u64, Error> {
        if name.is_system() {
            return Err(Error::InvalidArgument(
                "tenant system cannot be shredded".into(),
            ));
        }
        if confirm != name.as_str() {
            return Err(Error::InvalidArgument(
                "confirm must equal the tenant's name".into(),
            ));
        }
        if !self.tenants.exists(name).await? && !self.keys.is_shredded(name.as_str()) {
            return Err(Error::NotFound);
        }
        self.approvals
            .check("shred_tenant", &format!("tenant={name}"), by)
            .await?;
        self.shred_tenant_data(name, &by.principal()).await
    }

    /// Destroys a tenant's keys and deletes its data: the shred itself,
    /// once decided (or again, for a shredded tenant that came back).
    async fn shred_tenant_data(&self, name: &TenantName, by: &str) -> Result<u64, Error> {
        self.keys.shred_tenant(name.as_str()).await?;
        self.tenants.delete(name).await?;
        let mut prefix = name.as_str().as_bytes().to_vec();
        prefix.push(0);
        let mut records = 0;
        for space in [
            Space::Records,
            Space::Index,
            Space::Secrets,
            Space::Counters,
            Space::Principals,
            Space::Budgets,
        ] {
            loop {
                let keys = self.store.scan_prefix(space, &prefix, 1024).await?;
                if keys.is_empty() {
                    break;
                }
                if space == Space::Records {
                    records += keys.len() as u64;
                }
                let mut b = Batch::new();
                for (k, _) in keys {
                    b.delete(space, k);
                }
                self.store.apply_each(b).await?;
            }
        }
        self.accounts.forget_tenant(name).await?;
        self.accounts.forget_bindings(name).await?;
        self.grants.forget_tenant(name).await?;
        self.budgets.forget_tenant(name);
        self.store.sync().await?;
        self.audit
            .alert(
                crate::audit::Severity::Warning,
                "tenant_shredded",
                name.as_str(),
                by,
                format!("tenant keys destroyed; {records} records deleted"),
            )
            .await?;
        Ok(records)
    }

    /// Logs in with an OpenID Connect id token of `provider`.
    pub async fn login_oidc(
        &self,
        provider: &str,
        token: &str,
    ) -> Result<(crate::accounts::Login, String), crate::accounts::IdentityRefused> {
        let r = match self.oidc.verify(provider, token).await {
            Ok(id) => self.accounts.login_identity(&id).await,
            Err(reason) => Err(crate::accounts::IdentityRefused {
                reason,
                who: None,
                error: None,
            }),
        };
        if let Err(e) = &r {
            // A storage error is not a refusal of the token.
            if e.error.is_none() {
                self.audit.stats().oidc_refused(e.reason);
            }
        }
        r
    }

    /// Checks an identity to bind to a principal of `tenant` with `role`:
    /// its provider is configured and logs in to that tenant, and a role
    /// that needs a second factor is bound only to a provider that asks
    /// for an `acr` (a single sign-on login skips the TOTP code).
    pub fn check_binding(
        &self,
        tenant: &TenantName,
        raw: &str,
        role: Role,
    ) -> Result<crate::oidc::Binding, Error> {
        let b = crate::oidc::Binding::parse(raw).map_err(Error::InvalidArgument)?;
        if self.accounts.needs_second_factor(role) && !self.oidc.requires_acr(&b.provider) {
            return Err(Error::InvalidArgument(format!(
                "role {} logs in with a second factor, and provider {:?} asks for none: set its required_acr to the contexts that mean one",
                role.as_str(),
                b.provider
            )));
        }
        match self.oidc.tenant_of(&b.provider) {
            None => Err(Error::InvalidArgument(format!(
                "no provider {:?} in this server's [oidc] config",
                b.provider
            ))),
            Some(t) if t != tenant => Err(Error::InvalidArgument(format!(
                "provider {:?} logs in to tenant {t}, not {tenant}",
                b.provider
            ))),
            Some(_) => Ok(b),
        }
    }

    /// Clears a principal's second factor, with a second admin's approval.
    pub async fn reset_mfa(
        &self,
        tenant: &TenantName,
        username: &Username,
        by: &Caller,
    ) -> Result<(), Error> {
        if !self.accounts.exists(tenant, username).await? {
            return Err(Error::NotFound);
        }
        self.approvals
            .check(
                "reset_mfa",
                &format!("tenant={tenant} username={username}"),
                by,
            )
            .await?;
        self.accounts.reset_mfa(tenant, username).await
    }

    /// Opens an export grant, with a second admin's approval.
    pub async fn grant_export(
        &self,
        tenant: &TenantName,
        username: &Username,
        max_records: u32,
        purpose: &crate::model::Purpose,
        hours: u32,
        by: &Caller,
    ) -> Result<(), Error> {
        if purpose.is_empty() {
            return Err(Error::InvalidArgument("purpose is required".into()));
        }
        crate::grants::check_bounds(max_records, hours)?;
        if !self.accounts.exists(tenant, username).await? {
            return Err(Error::NotFound);
        }
        self.approvals
            .check(
                "export_grant",
                &format!(
                    "tenant={tenant} username={username} max_records={max_records} hours={hours} purpose={:?}",
                    purpose.as_str()
                ),
                by,
            )
            .await?;
        self.grants
            .grant(tenant, username, max_records, purpose, hours, by)
            .await
    }

    /// Records an automatic rotation (the nonce bound of AES-GCM) in the trail.
    pub async fn key_rotated(&self, tenant: &Tenant, to: Option<u32>) -> Result<(), Error> {
        let Some(version) = to else { return Ok(()) };
        self.audit
            .record(crate::pb::AuditEvent {
                tenant: tenant.name.to_string(),
                principal: "system/coffre".into(),
                action: "keys/auto_rotate".into(),
                purpose: format!(
                    "data key reached keys.rotate_after_encryptions; version {version} active"
                ),
                outcome: "ok".into(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// FindRecords under the find rate limit; a hit on a honeytoken locks
    /// the caller. The ids found spend no read budget until read.
    pub async fn find_records(
        &self,
        caller: &Caller,
        tenant: &Tenant,
        field: &FieldName,
        value: &str,
        action: &str,
    ) -> Result<Vec<RecordId>, Error> {
        if let Err(refused) = self.budgets.spend_find(caller).await? {
            return Err(self.budgets.throttled(caller, action, refused).await);
        }
        let ids = self.records.find(tenant, field, value).await?;
        if ids
            .iter()
            .any(|id| self.honeytokens.is_canary(&tenant.name, id))
        {
            return Err(self.honeytoken_tripped(caller, action).await);
        }
        Ok(ids)
    }

    async fn honeytoken_tripped(&self, caller: &Caller, action: &str) -> Error {
        let stats = self.audit.stats();
        stats.honeytoken_hits.inc();
        stats.lock(crate::stats::LockReason::honeytoken, caller.role.as_str());
        let detail = format!("honeytoken hit by {action}; account locked");
        match self.budgets.lock(caller, "honeytoken_read", detail).await {
            Ok(()) => Error::PermissionDenied("account locked"),
            Err(e) => e,
        }
    }

    async fn bootstrap(
        &self,
        password: Bootstrap,
        report: &mut OpenReport,
    ) -> Result<(), StartError> {
        let system = TenantName::system();
        if self.tenants.exists(&system).await? {
            return Ok(());
        }
        let admin = Username::parse(BOOTSTRAP_ADMIN)?;
        let password = match password {
            Bootstrap::Password(p) => Password::new_checked(p, &[BOOTSTRAP_ADMIN])
                .map_err(|e| StartError::Bootstrap(format!("{BOOTSTRAP_PASSWORD_ENV}: {e}")))?,
            Bootstrap::Refuse => {
                return Err(StartError::Bootstrap(format!(
                    "an empty data directory needs the first administrator's password: set {BOOTSTRAP_PASSWORD_ENV} (a generated one is shown only on a terminal)"
                )));
            }
            Bootstrap::Random => {
                let raw = Zeroizing::new(crate::crypto::random_array::<18>());
                let text = base64::Engine::encode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    &raw[..],
                );
                report.bootstrap_password = Some(Zeroizing::new(text.clone()));
                Password::new_checked(text, &[])?
            }
        };
        // Principal first: if we crash between the two, the next start
        // retries the whole bootstrap (the tenant is the marker).
        if self.accounts.exists(&system, &admin).await? {
            // An earlier start made the admin and crashed before the tenant:
            // its password stands, and a new one must not be shown.
            report.bootstrap_password = None;
        } else {
            self.accounts
                .create(&system, &admin, Some(&password), Role::Admin, None, None)
                .await?;
        }
        self.tenants.create(&system, &[]).await?;
        report.bootstrapped = true;
        Ok(())
    }
}

/// A principal to create, as [`Vault::create_principal`] takes it.
pub struct NewPrincipal<'a> {
    pub tenant: &'a TenantName,
    pub username: &'a Username,
    pub password: Option<&'a crate::model::Password>,
    pub role: Role,
    pub oidc: Option<&'a crate::oidc::Binding>,
}

/// The tenant-wide key jobs [`Vault::resumable_job`] runs.
#[derive(Debug, Clone, Copy)]
enum KeyJob {
    /// Re-encrypt every field under `target`, the active version.
    Rewrap { target: u32 },
    /// Move every record's index entries to the next index key.
    Reindex,
}

/// Set in `Meta` once this vault's shred list is authenticated: from then
/// on a missing list, or one in the unauthenticated format of an earlier
/// release, is refused rather than read as "nothing was shredded".
const SHRED_LIST_MARK: &[u8] = b"shred-list\0authenticated";

/// Loads the shred list beside the master key (MAC checked). The first
/// open of a vault that has no authenticated list yet creates it (empty)
/// or rewrites an earlier release's under the MAC, once.
async fn open_shred_list(
    config: &Config,
    master: &keys::MasterKey,
    store: &Storage,
) -> Result<crate::shredlist::ShredList, StartError> {
    let path = config.shred_list_path();
    let mut list = crate::shredlist::ShredList::load(&path, master.shred_list_key())
        .map_err(KeyError::from)?;
    let marked = store.get(Space::Meta, SHRED_LIST_MARK).await?.is_some();
    if marked && !list.existed() {
        return Err(StartError::Format(format!(
            "shred list {} is missing: put back the copy escrowed with the master key (without it, shredded tenants could come back)",
            path.display()
        )));
    }
    if marked && list.legacy() {
        return Err(StartError::Format(format!(
            "shred list {} is in the unauthenticated format although this vault's list was authenticated: it was replaced; put back the copy escrowed with the master key",
            path.display()
        )));
    }
    if !list.existed() || list.legacy() {
        list.save().map_err(KeyError::from)?;
    }
    if !marked {
        let mut b = Batch::new();
        b.put(Space::Meta, SHRED_LIST_MARK.to_vec(), Vec::new());
        store.commit(b).await?;
    }
    Ok(list)
}

/// Makes everything in the data directory the vault's alone: files 0600,
/// folders 0700. The embedded store creates its files with the process's
/// umask (0644 under the usual 022), so the umask is narrowed to 077 for
/// the process, and what exists already is narrowed once. `keep` (the
/// mirror and alert files, read by a log shipper) keep their modes.
pub(crate) fn narrow_data_dir(dir: &Path, keep: &[Option<&Path>]) -> Result<(), StartError> {
    use nix::sys::stat::{Mode, umask};
    use std::os::unix::fs::PermissionsExt;
    umask(Mode::from_bits_truncate(0o077));
    let failed =
        |p: &Path, e: std::io::Error| StartError::DataDir(p.display().to_string(), e.to_string());
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).map_err(|e| failed(&d, e))? {
            let entry = entry.map_err(|e| failed(&d, e))?;
            let path = entry.path();
            if keep.iter().flatten().any(|k| *k == path) {
                continue;
            }
            // Not followed: a link's target is not ours to change.
            let meta = fs::symlink_metadata(&path).map_err(|e| failed(&path, e))?;
            let want = if meta.is_dir() {
                todo.push(path.clone());
                0o700
            } else if meta.is_file() {
                0o600
            } else {
                continue;
            };
            if meta.permissions().mode() & 0o777 != want {
                fs::set_permissions(&path, fs::Permissions::from_mode(want))
                    .map_err(|e| failed(&path, e))?;
            }
        }
    }
    Ok(())
}

fn make_private_dir(dir: &Path) -> Result<(), StartError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StartError::DataDir(dir.display().to_string(), e.to_string()))
}
