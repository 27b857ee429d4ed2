//! The vault: opens storage and keys, wires accounts, tenants and records
//! together, and bootstraps an empty data directory.

use std::{fs, os::unix::fs::DirBuilderExt, path::Path, sync::Arc};

use zeroize::Zeroizing;

use crate::{
    accounts::{Accounts, Hasher},
    audit::Audit,
    config::Config,
    error::Error,
    keys::{self, KeyError, Keyring},
    model::{Password, Role, TenantName, Username},
    records::Records,
    storage::{Backend, SledBackend, SledOptions, Storage, StorageError},
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
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
}

impl From<Error> for StartError {
    fn from(e: Error) -> Self {
        StartError::Bootstrap(e.to_string())
    }
}

/// What opening the vault did that the operator must hear about once.
#[derive(Default)]
pub struct OpenReport {
    /// Dev mode made a new master key file here.
    pub generated_key: Option<std::path::PathBuf>,
    /// The bootstrap admin's generated password, to print once.
    pub bootstrap_password: Option<Zeroizing<String>>,
    /// The bootstrap admin was created.
    pub bootstrapped: bool,
}

pub struct Vault {
    pub store: Storage,
    pub audit: Arc<Audit>,
    pub keys: Arc<Keyring>,
    pub accounts: Accounts,
    pub tenants: Tenants,
    pub records: Records,
}

/// Name of the first administrator made on an empty data directory.
pub const BOOTSTRAP_ADMIN: &str = "admin";
pub const BOOTSTRAP_PASSWORD_ENV: &str = "COFFRE_BOOTSTRAP_ADMIN_PASSWORD";

impl Vault {
    /// Opens (or initialises) the vault described by `config`.
    pub async fn open(
        config: &Config,
        bootstrap_password: Option<String>,
    ) -> Result<(Arc<Self>, OpenReport), StartError> {
        Self::open_with(config, bootstrap_password, |b| b).await
    }

    /// Like [`Vault::open`], with the storage backend passed through `wrap`
    /// first (fault injection in tests).
    pub async fn open_with(
        config: &Config,
        bootstrap_password: Option<String>,
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
        make_private_dir(&config.data_dir)?;
        let sled = SledBackend::open(
            &config.data_dir,
            &SledOptions {
                cache_capacity_bytes: config.storage.cache_capacity_mib * 1024 * 1024,
            },
        )?;
        let store = Storage::new(wrap(Arc::new(sled)));
        let keys = Arc::new(Keyring::open(store.clone(), &master)?);
        drop(master);
        let pepper = crate::crypto::SecretKey::from_slice(keys.pepper().expose())
            .expect("pepper is KEY_LEN bytes");
        let hasher = Hasher::new(&config.argon2, pepper)?;
        let audit_key = crate::crypto::SecretKey::from_slice(keys.audit_key().expose())
            .expect("audit key is KEY_LEN bytes");
        let audit = Audit::open(
            store.clone(),
            audit_key,
            config.audit.mirror_file.as_deref(),
            config.alert_file.as_deref(),
        )?;
        let audit = Arc::new(audit);
        let vault = Arc::new(Self {
            audit: audit.clone(),
            accounts: Accounts::new(store.clone(), hasher.clone(), config.session.clone(), audit),
            tenants: Tenants::new(store.clone(), keys.clone()),
            records: Records::new(store.clone(), keys.clone(), hasher),
            keys,
            store,
        });
        vault.bootstrap(bootstrap_password, &mut report).await?;
        Ok((vault, report))
    }

    async fn bootstrap(
        &self,
        password: Option<String>,
        report: &mut OpenReport,
    ) -> Result<(), StartError> {
        let system = TenantName::system();
        if self.tenants.exists(&system)? {
            return Ok(());
        }
        let admin = Username::parse(BOOTSTRAP_ADMIN)?;
        let password = match password {
            Some(p) => Password::new_checked(p, &[BOOTSTRAP_ADMIN])
                .map_err(|e| StartError::Bootstrap(format!("{BOOTSTRAP_PASSWORD_ENV}: {e}")))?,
            None => {
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
        if self.accounts.exists(&system, &admin)? {
            // An earlier start made the admin and crashed before the tenant:
            // its password stands, and a new one must not be shown.
            report.bootstrap_password = None;
        } else {
            self.accounts
                .create(&system, &admin, &password, Role::Admin)
                .await?;
        }
        self.tenants.create(&system, &[]).await?;
        report.bootstrapped = true;
        Ok(())
    }
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
