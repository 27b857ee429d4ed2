//! The PostgreSQL backend (`storage.backend = "postgres"`): the key spaces
//! in one table of one database that several Coffre nodes share. The only
//! file that speaks SQL for the key spaces; the trail's and the key store's
//! tables are created here too, so that one versioned schema holds all of
//! Coffre's state.
//!
//! A batch is one statement (a data-modifying `WITH`), so it is atomic and
//! costs one round trip; it is durable when the statement returns
//! (`synchronous_commit` as the cluster sets it: on, for a vault), so
//! `flush` has nothing to do. Keys are `bytea` and PostgreSQL orders
//! `bytea` bytewise, as sled does, so scans agree across backends.
//!
//! Errors carry the SQLSTATE only: a server message can quote a key
//! (`duplicate key value … (space, key)=(…)`), and the connection URL may
//! hold a password. Neither reaches a log line.

use std::{collections::BTreeMap, str::FromStr, sync::Arc, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::{Backend, Batch, Entry, Op, Space, StorageError};

/// The schema this build reads and writes. Bump it with a new entry in
/// [`MIGRATIONS`]; a node finds a newer one and refuses to serve.
pub const SCHEMA_VERSION: i32 = 1;

/// Migration `i` takes the schema from version `i` to `i + 1`, in the
/// transaction that records the new version.
const MIGRATIONS: &[&str] = &[
    // 0 → 1: key spaces, the trail, the key store, shared runtime state.
    "CREATE TABLE coffre_kv (
        space smallint NOT NULL,
        key bytea NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (space, key)
    );
    -- The trail: frames of events exactly as the trail's files hold them
    -- (sealed under the audit key), one global chain whose head row every
    -- node locks to append; keyed hashes of record ids, principals,
    -- tenants and alerts name events for queries.
    CREATE TABLE coffre_audit_frame (
        first_seq bigint PRIMARY KEY,
        last_seq bigint NOT NULL,
        first_time bigint NOT NULL,
        last_time bigint NOT NULL,
        prev bytea NOT NULL,
        raw bytea NOT NULL
    );
    CREATE INDEX coffre_audit_frame_time ON coffre_audit_frame (last_time);
    CREATE TABLE coffre_audit_tag (
        tag bigint NOT NULL,
        seq bigint NOT NULL,
        PRIMARY KEY (tag, seq)
    );
    CREATE TABLE coffre_audit_head (
        id smallint PRIMARY KEY CHECK (id = 1),
        seq bigint NOT NULL,
        hash bytea NOT NULL,
        time_ms bigint NOT NULL,
        base_seq bigint NOT NULL,
        base_prev bytea NOT NULL,
        base_mac bytea
    );
    INSERT INTO coffre_audit_head
        VALUES (1, 0, decode(repeat('00', 32), 'hex'), 0, 1, decode(repeat('00', 32), 'hex'), NULL);
    CREATE TABLE coffre_keystore (
        id smallint PRIMARY KEY CHECK (id = 1),
        version bigint NOT NULL,
        sealed bytea NOT NULL
    );",
];

/// A conditional batch as one statement: `chk` writes the expected key
/// (returning a row only if it did), the other deletes ($4, $5) and puts
/// ($1–$3) happen only then, and `tail` answers how many rows `chk` wrote.
macro_rules! guarded_writes {
    ($chk:literal, $tail:literal) => {
        concat!(
            "WITH chk AS (",
            $chk,
            "), d AS (
                DELETE FROM coffre_kv k USING unnest($4::smallint[], $5::bytea[]) AS x(s, y)
                WHERE k.space = x.s AND k.key = x.y AND EXISTS (SELECT 1 FROM chk)
            ), i AS (
                INSERT INTO coffre_kv (space, key, value)
                SELECT * FROM unnest($1::smallint[], $2::bytea[], $3::bytea[])
                WHERE EXISTS (SELECT 1 FROM chk)
                ON CONFLICT (space, key) DO UPDATE SET value = excluded.value
            ) ",
            $tail
        )
    };
}

/// The `Meta` key a restore into PostgreSQL holds while it writes: a node
/// refuses to start on a database that has it, and a rerun starts over.
pub const RESTORING: &[u8] = b"restoring";

/// What a restore finds in its target database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreTarget {
    Empty,
    Interrupted,
    Used,
}

/// How long one statement may take before the call waiting on it fails
/// (UNAVAILABLE): a database that stopped answering must not hang callers.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the PostgreSQL backend needs from the config.
#[derive(Clone)]
pub struct PostgresOptions {
    /// `postgres://user:password@host:port/db`; may hold a password, so it
    /// has no `Debug`.
    pub url: String,
    pub pool_size: usize,
}

/// The key spaces in `coffre_kv`, through a pool of connections.
pub struct PostgresBackend {
    pool: Pool,
    /// Set once the schema is found newer than this build (another node
    /// was upgraded): every operation is refused from then on.
    newer: std::sync::atomic::AtomicI32,
}

/// A PostgreSQL error as a storage error: its SQLSTATE and a class, never
/// the server's message (it may quote a key) nor the URL.
pub fn pg_error(e: tokio_postgres::Error) -> StorageError {
    match e.code() {
        Some(c) => StorageError::Io(format!("PostgreSQL error {}", c.code())),
        None if e.is_closed() => StorageError::Io("PostgreSQL connection closed".into()),
        None => StorageError::Io("PostgreSQL unreachable or the connection failed".into()),
    }
}

pub fn pool_error(e: deadpool_postgres::PoolError) -> StorageError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        deadpool_postgres::PoolError::Timeout(_) => {
            StorageError::Io("PostgreSQL: no connection within the timeout".into())
        }
        _ => StorageError::Io("PostgreSQL connection pool failed".into()),
    }
}

/// Runs `f` within [`STATEMENT_TIMEOUT`].
pub async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    tokio::time::timeout(STATEMENT_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(StorageError::Io(format!(
                "PostgreSQL did not answer within {} s",
                STATEMENT_TIMEOUT.as_secs()
            )))
        })
}

/// The smallest key greater than every key starting with `prefix`, if any.
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut p = prefix.to_vec();
    while let Some(last) = p.pop() {
        if last < 0xff {
            p.push(last + 1);
            return Some(p);
        }
    }
    None
}

impl PostgresBackend {
    /// Connects and brings the schema to [`SCHEMA_VERSION`] (creating it on
    /// an empty database), in one transaction under an advisory lock, so
    /// that nodes starting together migrate once. Refuses a schema newer
    /// than this build.
    pub async fn open(opts: &PostgresOptions) -> Result<Self, StorageError> {
        let pool = Self::pool(opts)?;
        let b = Self {
            pool,
            newer: std::sync::atomic::AtomicI32::new(0),
        };
        b.migrate().await?;
        b.sync_clock().await?;
        Ok(b)
    }

    /// A pool for `opts`, connecting lazily.
    pub fn pool(opts: &PostgresOptions) -> Result<Pool, StorageError> {
        let mut cfg = tokio_postgres::Config::from_str(&opts.url).map_err(|_| {
            StorageError::Io(
                "storage.postgres_url is not a valid PostgreSQL URL (postgres://user@host:port/db)"
                    .into(),
            )
        })?;
        cfg.connect_timeout(STATEMENT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .application_name("coffre");
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Pool::builder(mgr)
            .max_size(opts.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(STATEMENT_TIMEOUT))
            .create_timeout(Some(STATEMENT_TIMEOUT))
            .recycle_timeout(Some(STATEMENT_TIMEOUT))
            .build()
            .map_err(|_| StorageError::Io("PostgreSQL connection pool failed".into()))
    }

    /// The pool, for the trail and the key store's tables.
    pub fn shared_pool(&self) -> Pool {
        self.pool.clone()
    }

    async fn migrate(&self) -> Result<(), StorageError> {
        timed(async {
            let mut c = self.pool.get().await.map_err(pool_error)?;
            let tx = c.transaction().await.map_err(pg_error)?;
            // Any constant: nodes starting together wait here in turn.
            tx.execute("SELECT pg_advisory_xact_lock(7318001)", &[])
                .await
                .map_err(pg_error)?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS coffre_schema (
                    version integer NOT NULL,
                    migrated_at timestamptz NOT NULL DEFAULT now()
                )",
            )
            .await
            .map_err(pg_error)?;
            let row = tx
                .query_opt("SELECT max(version) FROM coffre_schema", &[])
                .await
                .map_err(pg_error)?;
            let found: i32 = row.and_then(|r| r.get::<_, Option<i32>>(0)).unwrap_or(0);
            if found > SCHEMA_VERSION {
                return Err(StorageError::Newer {
                    found,
                    ours: SCHEMA_VERSION,
                });
            }
            for (i, m) in MIGRATIONS.iter().enumerate().skip(found as usize) {
                tx.batch_execute(m).await.map_err(pg_error)?;
                tx.execute(
                    "INSERT INTO coffre_schema (version) VALUES ($1)",
                    &[&(i as i32 + 1)],
                )
                .await
                .map_err(pg_error)?;
            }
            tx.commit().await.map_err(pg_error)?;
            if found < SCHEMA_VERSION {
                tracing::info!(
                    from = found,
                    to = SCHEMA_VERSION,
                    "PostgreSQL schema migrated"
                );
            }
            Ok(())
        })
        .await
    }

    /// Why every operation is refused, if it is.
    pub fn refusal(&self) -> Option<StorageError> {
        self.ready().err()
    }

    /// Refuses every operation once the schema was found newer.
    fn ready(&self) -> Result<(), StorageError> {
        match self.newer.load(std::sync::atomic::Ordering::Relaxed) {
            0 => Ok(()),
            found => Err(StorageError::Newer {
                found,
                ours: SCHEMA_VERSION,
            }),
        }
    }

    /// Re-reads the schema version: a newer one (another node upgraded)
    /// stops this node, with one line in its log.
    pub async fn check_schema(&self) -> Result<(), StorageError> {
        self.ready()?;
        let found = self.schema_version().await?;
        if found > SCHEMA_VERSION {
            self.newer
                .store(found, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(
                found,
                ours = SCHEMA_VERSION,
                "the PostgreSQL schema is newer than this coffre: refusing every call (NOT_SERVING); upgrade this node"
            );
        }
        self.ready()
    }

    /// Measures this node's offset from the database's clock and follows
    /// it ([`crate::clock`]): nodes whose clocks drift stamp sessions and
    /// budgets alike.
    pub async fn sync_clock(&self) -> Result<(), StorageError> {
        timed(async {
            let c = self.pool.get().await.map_err(pool_error)?;
            let before = crate::clock::local_ms();
            let r = c
                .query_one(
                    "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                    &[],
                )
                .await
                .map_err(pg_error)?;
            let after = crate::clock::local_ms();
            let db: i64 = r.get(0);
            crate::clock::set_offset_ms(db - (before + after) / 2);
            Ok(())
        })
        .await
    }

    /// What a restore finds in the database: nothing of a vault, the
    /// leftovers of a restore that did not finish (its marker), or a vault.
    pub async fn restore_target(&self) -> Result<RestoreTarget, StorageError> {
        timed(async {
            let c = self.pool.get().await.map_err(pool_error)?;
            let r = c
                .query_one(
                    "SELECT \
                     EXISTS (SELECT 1 FROM coffre_kv WHERE space = $1 AND key = $2), \
                     EXISTS (SELECT 1 FROM coffre_kv WHERE NOT (space = $1 AND key = $2)) \
                       OR EXISTS (SELECT 1 FROM coffre_keystore) \
                       OR EXISTS (SELECT 1 FROM coffre_audit_frame)",
                    &[&(Space::Meta as i16), &RESTORING.to_vec()],
                )
                .await
                .map_err(pg_error)?;
            Ok(match (r.get::<_, bool>(0), r.get::<_, bool>(1)) {
                (true, _) => RestoreTarget::Interrupted,
                (false, false) => RestoreTarget::Empty,
                (false, true) => RestoreTarget::Used,
            })
        })
        .await
    }

    /// Empties every table of a restore that did not finish (its marker is
    /// there), keeping the marker: the rerun starts from nothing.
    pub async fn wipe_interrupted_restore(&self) -> Result<(), StorageError> {
        if self.restore_target().await? != RestoreTarget::Interrupted {
            return Err(StorageError::Busy(
                "only a database left by an interrupted restore is emptied",
            ));
        }
        timed(async {
            let mut c = self.pool.get().await.map_err(pool_error)?;
            let tx = c.transaction().await.map_err(pg_error)?;
            tx.batch_execute(
                "DELETE FROM coffre_kv WHERE NOT (space = 1 AND key = 'restoring'::bytea); \
                 TRUNCATE coffre_audit_frame, coffre_audit_tag, coffre_keystore; \
                 UPDATE coffre_audit_head SET seq = 0, hash = decode(repeat('00', 32), 'hex'), \
                   time_ms = 0, base_seq = 1, base_prev = decode(repeat('00', 32), 'hex'), base_mac = NULL",
            )
            .await
            .map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)
        })
        .await
    }

    /// The schema version the database holds now.
    pub async fn schema_version(&self) -> Result<i32, StorageError> {
        timed(async {
            let c = self.pool.get().await.map_err(pool_error)?;
            let r = c
                .query_one("SELECT max(version) FROM coffre_schema", &[])
                .await
                .map_err(pg_error)?;
            Ok(r.get::<_, Option<i32>>(0).unwrap_or(0))
        })
        .await
    }

    async fn rows(
        &self,
        space: Space,
        from: &[u8],
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.ready()?;
        let limit = limit.min(i64::MAX as usize) as i64;
        let space = space as i16;
        timed(async {
            let c = self.pool.get().await.map_err(pool_error)?;
            let rows = match successor(prefix) {
                Some(end) => {
                    let st = c
                        .prepare_cached(
                            "SELECT key, value FROM coffre_kv WHERE space = $1 AND key >= $2 \
                             AND key < $3 ORDER BY key LIMIT $4",
                        )
                        .await
                        .map_err(pg_error)?;
                    c.query(&st, &[&space, &from, &end, &limit]).await
                }
                None => {
                    let st = c
                        .prepare_cached(
                            "SELECT key, value FROM coffre_kv WHERE space = $1 AND key >= $2 \
                             ORDER BY key LIMIT $3",
                        )
                        .await
                        .map_err(pg_error)?;
                    c.query(&st, &[&space, &from, &limit]).await
                }
            }
            .map_err(pg_error)?;
            Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await
    }
}

#[async_trait::async_trait]
impl Backend for PostgresBackend {
    async fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.ready()?;
        let space = space as i16;
        timed(async {
            let c = self.pool.get().await.map_err(pool_error)?;
            let st = c
                .prepare_cached("SELECT value FROM coffre_kv WHERE space = $1 AND key = $2")
                .await
                .map_err(pg_error)?;
            let row = c.query_opt(&st, &[&space, &key]).await.map_err(pg_error)?;
            Ok(row.map(|r| r.get(0)))
        })
        .await
    }

    async fn scan_prefix(
        &self,
        space: Space,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.rows(space, prefix, prefix, limit).await
    }

    async fn scan_from(
        &self,
        space: Space,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.rows(space, start.max(prefix), prefix, limit).await
    }

    async fn apply(&self, batch: Batch) -> Result<(), StorageError> {
        self.ready()?;
        // The last op on a key decides it: the same final state as applying
        // them in order, in one statement that touches each key once.
        let mut last: BTreeMap<(i16, Vec<u8>), Option<Vec<u8>>> = BTreeMap::new();
        let mut condition = None;
        for op in batch.0 {
            match op {
                Op::Put(s, k, v) => {
                    last.insert((s as i16, k), Some(v));
                }
                Op::Delete(s, k) => {
                    last.insert((s as i16, k), None);
                }
                Op::Expect(s, k, v) => condition = Some((s as i16, k, v)),
            }
        }
        let (mut ps, mut pk, mut pv, mut ds, mut dk) = (vec![], vec![], vec![], vec![], vec![]);
        for ((s, k), v) in last {
            match v {
                Some(v) => {
                    ps.push(s);
                    pk.push(k);
                    pv.push(v);
                }
                None => {
                    ds.push(s);
                    dk.push(k);
                }
            }
        }
        const WRITE: &str = "WITH d AS (
                DELETE FROM coffre_kv k USING unnest($4::smallint[], $5::bytea[]) AS x(s, y)
                WHERE k.space = x.s AND k.key = x.y
            )
            INSERT INTO coffre_kv (space, key, value)
            SELECT * FROM unnest($1::smallint[], $2::bytea[], $3::bytea[])
            ON CONFLICT (space, key) DO UPDATE SET value = excluded.value";
        timed(async {
            let mut c = self.pool.get().await.map_err(pool_error)?;
            let st = c.prepare_cached(WRITE).await.map_err(pg_error)?;
            let Some((space, key, want)) = condition else {
                c.execute(&st, &[&ps, &pk, &pv, &ds, &dk])
                    .await
                    .map_err(pg_error)?;
                return Ok(());
            };
            // The usual condition — the batch rewrites the very key it
            // expects — is one statement, one round trip: the key's
            // UPDATE (or INSERT, expecting it absent) is the check, and the
            // other writes happen only if it wrote. A concurrent writer of
            // the key makes the UPDATE wait, then find the value changed.
            if let Some(i) = ps
                .iter()
                .zip(&pk)
                .position(|(s, k)| *s == space && *k == key)
            {
                let new_value = pv.remove(i);
                ps.remove(i);
                pk.remove(i);
                let sql = match want {
                    Some(_) => guarded_writes!(
                        "UPDATE coffre_kv SET value = $7 \
                         WHERE space = $6 AND key = $8 AND value = $9 RETURNING 1",
                        "SELECT count(*) FROM chk"
                    ),
                    None => guarded_writes!(
                        "INSERT INTO coffre_kv (space, key, value) VALUES ($6, $8, $7) \
                         ON CONFLICT (space, key) DO NOTHING RETURNING 1",
                        "SELECT count(*) FROM chk WHERE $9::bytea IS NULL"
                    ),
                };
                let st = c.prepare_cached(sql).await.map_err(pg_error)?;
                let row = c
                    .query_one(
                        &st,
                        &[&ps, &pk, &pv, &ds, &dk, &space, &new_value, &key, &want],
                    )
                    .await
                    .map_err(pg_error)?;
                return match row.get::<_, i64>(0) {
                    1 => Ok(()),
                    _ => Err(StorageError::Conflict),
                };
            }
            // Writers of one key take turns on an advisory lock named by
            // it (a row lock cannot hold a key that does not exist yet);
            // the value is read after the lock is granted, in a statement
            // of its own (a snapshot taken after the wait).
            let lock = i64::from_be_bytes(
                crate::crypto::sha256(&[&space.to_be_bytes()[..], &key].concat())[..8]
                    .try_into()
                    .expect("8 of 32 bytes"),
            );
            let tx = c.transaction().await.map_err(pg_error)?;
            let lock_args: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&lock];
            let read_args: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&space, &key];
            // Sent together, run in turn: one round trip.
            let (_, now) = futures::try_join!(
                tx.execute("SELECT pg_advisory_xact_lock($1)", &lock_args),
                tx.query_opt(
                    "SELECT value FROM coffre_kv WHERE space = $1 AND key = $2",
                    &read_args
                ),
            )
            .map_err(pg_error)?;
            let now: Option<Vec<u8>> = now.map(|r| r.get(0));
            if now != want {
                return Err(StorageError::Conflict);
            }
            tx.execute(&st, &[&ps, &pk, &pv, &ds, &dk])
                .await
                .map_err(pg_error)?;
            tx.commit().await.map_err(pg_error)
        })
        .await
    }

    async fn last(&self, space: Space) -> Result<Option<Entry>, StorageError> {
        self.ready()?;
        let space = space as i16;
        timed(async {
            let c = self.pool.get().await.map_err(pool_error)?;
            let row = c
                .query_opt(
                    "SELECT key, value FROM coffre_kv WHERE space = $1 ORDER BY key DESC LIMIT 1",
                    &[&space],
                )
                .await
                .map_err(pg_error)?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
        .await
    }

    async fn flush(&self) -> Result<(), StorageError> {
        // Every statement committed before it returned.
        self.ready()
    }

    fn admit(&self, _space: Space) -> Result<(), StorageError> {
        self.ready()
    }

    async fn size_bytes(&self) -> Option<u64> {
        timed(async {
            let c = self.pool.get().await.map_err(pool_error)?;
            let row = c
                .query_one("SELECT pg_database_size(current_database())", &[])
                .await
                .map_err(pg_error)?;
            Ok(row.get::<_, i64>(0))
        })
        .await
        .ok()
        .map(|n| n as u64)
    }
}

/// The key store's row (`coffre_keystore`): the sealed key store file's
/// bytes, replaced whole (an `UPDATE` leaves the old bytes in a dead tuple
/// until vacuum, and in WAL archives: the shred list, checked at every
/// open, is what keeps a shredded tenant shredded), and a version every
/// node compares to know when to reload.
///
/// Its calls are synchronous (the key ring's are): each runs on a thread
/// of its own with its own connection, so that a caller on an async
/// worker never blocks the runtime that drives the pool's connections.
#[derive(Clone)]
pub struct KeyStoreRow {
    url: String,
}

impl KeyStoreRow {
    pub fn new(opts: &PostgresOptions) -> Self {
        Self {
            url: opts.url.clone(),
        }
    }

    /// Runs `f` with a fresh connection, on a thread of its own.
    fn with_client<T: Send>(
        &self,
        f: impl AsyncFnOnce(&mut tokio_postgres::Client) -> Result<T, StorageError> + Send,
    ) -> Result<T, StorageError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| StorageError::Io(format!("key store thread: {e}")))?;
                rt.block_on(timed(async {
                    let cfg = tokio_postgres::Config::from_str(&self.url)
                        .map_err(|_| StorageError::Io("bad storage.postgres_url".into()))?;
                    let (mut client, conn) = cfg.connect(NoTls).await.map_err(pg_error)?;
                    tokio::spawn(conn);
                    f(&mut client).await
                }))
            })
            .join()
            .unwrap_or_else(|_| Err(StorageError::Io("key store thread failed".into())))
        })
    }

    /// The sealed bytes and their version, if a key store exists.
    pub fn read(&self) -> Result<Option<(i64, Vec<u8>)>, StorageError> {
        self.with_client(async |c| {
            let row = c
                .query_opt("SELECT version, sealed FROM coffre_keystore", &[])
                .await
                .map_err(pg_error)?;
            Ok(row.map(|r| (r.get(0), r.get(1))))
        })
    }

    /// Locks the row, passes its bytes (`None` on a new database) to
    /// `change`, stores what it returns with the next version, and commits:
    /// nodes changing keys at once take turns, each from the other's
    /// result. Returns `change`'s value and the new version.
    pub fn modify<T: Send, E: From<StorageError> + Send>(
        &self,
        change: impl FnOnce(Option<Vec<u8>>) -> Result<(Vec<u8>, T), E> + Send,
    ) -> Result<(T, i64), E> {
        let mut out: Option<Result<T, E>> = None;
        let version = self.with_client(async |c| {
            let tx = c.transaction().await.map_err(pg_error)?;
            tx.execute("LOCK TABLE coffre_keystore IN EXCLUSIVE MODE", &[])
                .await
                .map_err(pg_error)?;
            let row = tx
                .query_opt("SELECT version, sealed FROM coffre_keystore", &[])
                .await
                .map_err(pg_error)?;
            let (version, current) = match row {
                Some(r) => (r.get::<_, i64>(0), Some(r.get::<_, Vec<u8>>(1))),
                None => (0, None),
            };
            match change(current) {
                Ok((bytes, t)) => {
                    tx.execute(
                        "INSERT INTO coffre_keystore (id, version, sealed) VALUES (1, $1, $2) \
                         ON CONFLICT (id) DO UPDATE SET version = excluded.version, sealed = excluded.sealed",
                        &[&(version + 1), &bytes],
                    )
                    .await
                    .map_err(pg_error)?;
                    tx.commit().await.map_err(pg_error)?;
                    out = Some(Ok(t));
                    Ok(version + 1)
                }
                Err(e) => {
                    out = Some(Err(e));
                    Ok(version)
                }
            }
        })?;
        match out {
            Some(Ok(t)) => Ok((t, version)),
            Some(Err(e)) => Err(e),
            None => Err(StorageError::Io("key store update did not run".into()).into()),
        }
    }
}

/// The key store's version now, through the pool (a cheap poll).
pub async fn keystore_version(pool: &Pool) -> Result<i64, StorageError> {
    timed(async {
        let c = pool.get().await.map_err(pool_error)?;
        let row = c
            .query_opt("SELECT version FROM coffre_keystore", &[])
            .await
            .map_err(pg_error)?;
        Ok(row.map_or(0, |r| r.get(0)))
    })
    .await
}

/// Opens the backend as a trait object.
pub async fn open(opts: &PostgresOptions) -> Result<Arc<PostgresBackend>, StorageError> {
    Ok(Arc::new(PostgresBackend::open(opts).await?))
}

#[cfg(test)]
mod tests {
    use super::successor;

    #[test]
    fn successor_bounds_a_prefix() {
        assert_eq!(successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(successor(b"\xff\xff"), None);
        assert_eq!(successor(b""), None);
    }
}
