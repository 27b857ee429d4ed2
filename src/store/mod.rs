//! Storage: the interface every backend implements, and the handle the
//! rest of the vault uses.
//!
//! Everything above sees a [`Backend`] of named key spaces with atomic
//! batches and an explicit durability point, and a [`Storage`] handle that
//! adds group commit: concurrent writers share one flush, and a write is
//! acknowledged only once a flush that began after it has finished. The
//! interface is async (a network database answers over a socket; sled
//! answers at once), scans go a chunk at a time ([`Storage::scan_each`],
//! [`Cut::scan`]) and [`Storage::count`] counts without holding the entries.
//!
//! Layout: `sled.rs` the embedded default (the only file that knows sled),
//! `postgres.rs` the shared database (the only file that speaks SQL for the
//! key spaces; the trail's tables are `crate::audit`'s `pg.rs`),
//! `faulty.rs` the fault-injecting wrapper of the fail-closed tests,
//! `file.rs` the few files rewritten whole ([`AtomicFile`]). The audit trail
//! keeps its own files (`crate::audit::log`), asking [`Storage::admit`]
//! before each write.
//!
//! # State kept in this process, and how several nodes share it
//!
//! With the PostgreSQL backend several stateless nodes serve one vault
//! (`crate::cluster`); what a node keeps in memory is then a cache the
//! database overrules:
//!
//! | state | one node (sled) | several nodes (postgres) |
//! |---|---|---|
//! | read budgets (`budgets`) | in memory; rebuilt from the principal's events of the last day; scalars in `Space::Budgets` | a row per principal (scalars, a version) and a log of the day's reads; each spend a conditional write ([`Op::Expect`]); a node behind rebuilds its copy |
//! | sessions (`accounts`) | `Space::Sessions`, cached | read from the database on every call (a logout elsewhere counts at once) |
//! | principals, locks (`accounts`) | `Space::Principals`, read on every call; writes under a process lock | the same rows; every read-modify-write conditional |
//! | record versions (`records`) | a stripe lock per record | the write conditional on the record as read |
//! | audit head (`audit`) | in memory, from the trail's files | one chain in the database, its head row locked by each append; a head that moves backwards stops the node |
//! | honeytoken tags (`honeytokens`) | loaded at open | re-read every second |
//! | key jobs (rewrap, reindex) | in-process, resumable from a cursor | a lease row; another node resumes a job whose lease expired |
//! | tenant keys (`keys`) | the key store file | a row changed under a lock; its version read on every call |
//! | encryption counts (`keys`) | reserved in blocks in `Space::Counters` | each node reserves its blocks from the one stored count by a conditional write: the count may run ahead of the encryptions, never behind |
//!
//! The consistent cut a backup needs is [`Storage::cut`]: a brief write
//! barrier across records, key store and trail.

use std::{path::Path, sync::Arc, sync::mpsc, thread};

use tokio::sync::oneshot;

mod cut;
mod faulty;
mod file;
pub mod postgres;
mod sled;

pub use cut::{Cut, CutChunks};

pub use faulty::FaultyBackend;
pub use file::AtomicFile;
pub use postgres::{PostgresBackend, PostgresOptions};
pub use sled::{SledBackend, SledOptions};

/// A storage failure. Carries no key or value bytes.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("storage is closed")]
    Closed,
    #[error("stored data is corrupt: {0}")]
    Corrupt(&'static str),
    /// The filesystem is (nearly) full: writes wait for space.
    #[error("disk nearly full: {free_mib} MiB free for {dir}, below storage.min_free_mib")]
    Full { dir: String, free_mib: u64 },
    /// The directory is held by another process (a running server).
    #[error("another coffre process is using {0}")]
    Locked(String),
    /// Something that runs one at a time is running (a backup's cut).
    #[error("{0}")]
    Busy(&'static str),
    /// A conditional batch found its key changed ([`Op::Expect`]): another
    /// writer went first; read again and retry.
    #[error("a concurrent write went first")]
    Conflict,
    /// The database's schema is newer than this build: another node was
    /// upgraded first.
    #[error(
        "the PostgreSQL schema is version {found}, newer than this coffre's {ours}: upgrade this node"
    )]
    Newer { found: i32, ours: i32 },
}

/// The key spaces of the vault. The byte is part of the stored key, so the
/// numbers are part of the on-disk format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Space {
    Meta = 1,
    Tenants = 2,
    /// Unused since keys moved to the key store file (`keys`); the number
    /// stays reserved.
    Keys = 3,
    Principals = 4,
    Sessions = 5,
    Records = 6,
    Index = 7,
    Secrets = 8,
    Counters = 9,
    Audit = 10,
    Budgets = 11,
    Honeytokens = 12,
    /// Each record's latest write, kept when pruning drops it from the
    /// trail (the trail itself lives in its own files since format 2).
    TrailRetained = 13,
}

/// A stored key (within its space) and value.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One write of a batch, or the condition it is applied under.
#[derive(Debug)]
pub enum Op {
    Put(Space, Vec<u8>, Vec<u8>),
    Delete(Space, Vec<u8>),
    /// The batch applies only if the key holds this value (`None`: is
    /// absent); otherwise nothing of it is applied and `apply` answers
    /// [`StorageError::Conflict`]. At most one per batch. What makes a
    /// read-modify-write exact across nodes (a login's failure count, a
    /// budget, a record's version): read, compute, apply expecting what
    /// was read, and start again on a conflict.
    Expect(Space, Vec<u8>, Option<Vec<u8>>),
}

/// Writes applied all together or not at all.
#[derive(Debug, Default)]
pub struct Batch(pub Vec<Op>);

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, space: Space, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.0.push(Op::Put(space, key.into(), value.into()));
    }
    pub fn delete(&mut self, space: Space, key: impl Into<Vec<u8>>) {
        self.0.push(Op::Delete(space, key.into()));
    }
    /// Applies the batch only if `key` still holds `value` ([`Op::Expect`]).
    pub fn expect(&mut self, space: Space, key: impl Into<Vec<u8>>, value: Option<Vec<u8>>) {
        self.0.push(Op::Expect(space, key.into(), value));
    }
    /// Whether the batch is conditional ([`Op::Expect`]).
    pub fn is_conditional(&self) -> bool {
        self.0.iter().any(|op| matches!(op, Op::Expect(..)))
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a storage engine must provide: async point reads, chunked range
/// scans, atomic batches, an explicit durability point. The next backend
/// implements this trait and joins the contract tests (`tests/store.rs`)
/// by one line.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    async fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Entries whose key starts with `prefix`, in key order, at most `limit`.
    async fn scan_prefix(
        &self,
        space: Space,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError>;
    /// Entries whose key starts with `prefix` and is at least `start`, in
    /// key order, at most `limit` (resumable scans).
    async fn scan_from(
        &self,
        space: Space,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError>;
    /// Applies every op atomically; visible at once, durable after `flush`.
    async fn apply(&self, batch: Batch) -> Result<(), StorageError>;
    /// The entry with the greatest key in `space`.
    async fn last(&self, space: Space) -> Result<Option<Entry>, StorageError>;
    /// Makes every applied batch durable.
    async fn flush(&self) -> Result<(), StorageError>;
    /// Bytes the store takes where it lives (files or database), if it
    /// can tell.
    async fn size_bytes(&self) -> Option<u64> {
        None
    }
    /// Asked before a write to state kept outside the backend (the audit
    /// trail's files): fault injection answers here.
    fn admit(&self, _space: Space) -> Result<(), StorageError> {
        Ok(())
    }
}

/// How long a flush may take before the write waiting on it fails
/// (UNAVAILABLE): a storage engine stuck after an I/O error must not hang
/// its callers.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Refuses writes while the data directory's filesystem is nearly full, so
/// that the engine never meets ENOSPC (sled 0.34 does not recover from a
/// failed write without a restart). Free space is looked up at most every
/// 100 ms.
pub struct SpaceGuard {
    dir: std::path::PathBuf,
    min_free: u64,
    checked: parking_lot::Mutex<(std::time::Instant, Option<u64>)>,
}

impl SpaceGuard {
    pub fn new(dir: &Path, min_free_mib: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            min_free: min_free_mib * 1024 * 1024,
            checked: parking_lot::Mutex::new((std::time::Instant::now(), None)),
        }
    }

    /// Free bytes for an unprivileged writer, if the filesystem says.
    fn free(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.dir).ok()?;
        Some(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    pub fn check(&self) -> Result<(), StorageError> {
        let free = {
            let mut c = self.checked.lock();
            if c.1.is_none() || c.0.elapsed() > std::time::Duration::from_millis(100) {
                *c = (std::time::Instant::now(), self.free());
            }
            c.1
        };
        match free {
            Some(f) if f < self.min_free => Err(StorageError::Full {
                dir: self.dir.display().to_string(),
                free_mib: f / (1024 * 1024),
            }),
            _ => Ok(()),
        }
    }
}

/// The handle the rest of the vault uses: a backend plus group commit.
#[derive(Clone)]
pub struct Storage {
    backend: Arc<dyn Backend>,
    flusher: mpsc::Sender<oneshot::Sender<Result<(), String>>>,
    space: Option<Arc<SpaceGuard>>,
    /// Failed writes and flushes so far: health watches it.
    failures: Arc<std::sync::atomic::AtomicU64>,
    /// The write barrier and the open consistent cut, if any.
    cuts: Arc<cut::Cuts>,
    /// Held (shared) by a call from before its write to after its audit
    /// event; taken whole by [`Storage::cut_between_calls`].
    calls: Arc<tokio::sync::RwLock<()>>,
    /// Other processes write the same store (nodes on one database): a
    /// read-modify-write must be conditional ([`Op::Expect`]), since this
    /// process's locks do not reach them.
    shared: bool,
}

impl Storage {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        let (tx, rx) = mpsc::channel::<oneshot::Sender<Result<(), String>>>();
        let b = backend.clone();
        thread::Builder::new()
            .name("coffre-flush".into())
            .spawn(move || group_commit_loop(&*b, rx))
            .expect("spawn the flush thread");
        Self {
            backend,
            flusher: tx,
            space: None,
            failures: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            cuts: Arc::default(),
            calls: Arc::default(),
            shared: false,
        }
    }

    /// Marks the store as written by other nodes too.
    pub fn shared_with_other_nodes(mut self) -> Self {
        self.shared = true;
        self
    }

    /// Whether other nodes write this store.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Refuses writes while `guard` says the disk is nearly full.
    pub fn with_space_guard(mut self, guard: SpaceGuard) -> Self {
        self.space = Some(Arc::new(guard));
        self
    }

    /// Bytes the store takes (sled's files; the whole database on
    /// PostgreSQL), if it can tell.
    pub async fn size_bytes(&self) -> Option<u64> {
        self.backend.size_bytes().await
    }

    /// Free bytes of the data directory's filesystem for the vault (the
    /// embedded store only).
    pub fn free_bytes(&self) -> Option<u64> {
        self.space.as_ref()?.free()
    }

    /// How many writes or flushes have failed since the start.
    pub fn failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts a failed write made outside the backend (the trail's files).
    pub fn note_failure(&self) {
        self.failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a write to `space`, kept outside the backend, may go ahead:
    /// free space and injected faults.
    pub fn admit(&self, space: Space) -> Result<(), StorageError> {
        self.space_ok()?;
        self.backend.admit(space)
    }

    /// Whether writes may go ahead as far as free space goes.
    pub fn space_ok(&self) -> Result<(), StorageError> {
        self.space.as_ref().map_or(Ok(()), |g| g.check())
    }

    fn counted<T>(&self, r: Result<T, StorageError>) -> Result<T, StorageError> {
        // A conditional batch that lost a race is no failure of storage.
        if r.as_ref()
            .is_err_and(|e| !matches!(e, StorageError::Conflict))
        {
            self.failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    pub fn open_sled(dir: &Path, opts: &SledOptions) -> Result<Self, StorageError> {
        Ok(Self::new(Arc::new(SledBackend::open(dir, opts)?)))
    }

    pub async fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.backend.get(space, key).await
    }

    pub async fn scan_prefix(
        &self,
        space: Space,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.backend.scan_prefix(space, prefix, limit).await
    }

    pub async fn last(&self, space: Space) -> Result<Option<Entry>, StorageError> {
        self.backend.last(space).await
    }

    pub async fn scan_from(
        &self,
        space: Space,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.backend.scan_from(space, prefix, start, limit).await
    }

    /// Applies a batch without waiting for durability (for state whose loss
    /// in a crash is harmless, such as a session's last-use time).
    pub async fn apply(&self, batch: Batch) -> Result<(), StorageError> {
        self.space_ok()?;
        let r = {
            let _barrier = self.cuts.barrier.read().await;
            match self.cuts.record(&*self.backend, &batch).await {
                Ok(()) => self.backend.apply(batch).await,
                Err(e) => Err(e),
            }
        };
        self.counted(r)
    }

    /// Entries of `space` under `prefix`, in key order, passed to `f` until
    /// it returns false; read a chunk at a time (bounded memory). Live
    /// values: for a view as of one instant, scan through a [`Cut`].
    pub async fn scan_each(
        &self,
        space: Space,
        prefix: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        self.scan_each_from(space, prefix, prefix, f).await
    }

    /// [`Storage::scan_each`] from `start` on (keys under `prefix` that
    /// are at least `start`).
    pub async fn scan_each_from(
        &self,
        space: Space,
        prefix: &[u8],
        start: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let mut start = start.to_vec();
        loop {
            let rows = self.scan_from(space, prefix, &start, 512).await?;
            let Some(last) = rows.last().map(|(k, _)| k.clone()) else {
                return Ok(());
            };
            for (k, v) in rows {
                if !f(&k, &v) {
                    return Ok(());
                }
            }
            start = last;
            start.push(0);
        }
    }

    /// How many entries `space` holds under `prefix`.
    pub async fn count(&self, space: Space, prefix: &[u8]) -> Result<u64, StorageError> {
        let mut n = 0;
        self.scan_each(space, prefix, |_, _| {
            n += 1;
            true
        })
        .await?;
        Ok(n)
    }

    /// Applies the ops one at a time: not atomic, but never through the
    /// backend's batch path (sled's takes a global lock that stalls every
    /// reader). Only for state where every prefix of the ops is safe.
    pub async fn apply_each(&self, batch: Batch) -> Result<(), StorageError> {
        for op in batch.0 {
            self.apply(Batch(vec![op])).await?;
        }
        Ok(())
    }

    /// Applies a batch and returns once it is durable. Concurrent callers
    /// share flushes.
    pub async fn commit(&self, batch: Batch) -> Result<(), StorageError> {
        if !batch.is_empty() {
            self.apply(batch).await?;
        }
        self.sync().await
    }

    /// Waits for a flush that starts after every write applied so far.
    pub async fn sync(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.flusher.send(tx).map_err(|_| StorageError::Closed)?;
        let r = match tokio::time::timeout(FLUSH_TIMEOUT, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(StorageError::Io(e)),
            Ok(Err(_)) => Err(StorageError::Closed),
            Err(_) => Err(StorageError::Io(format!(
                "flush did not finish within {} s",
                FLUSH_TIMEOUT.as_secs()
            ))),
        };
        self.counted(r)
    }

    /// Flushes from a synchronous context (start-up, shutdown).
    /// Bounded by [`FLUSH_TIMEOUT`]: an engine stuck after an I/O error must
    /// not hold the process at shutdown.
    pub fn flush_blocking(&self) -> Result<(), StorageError> {
        let (tx, rx) = mpsc::channel();
        let backend = self.backend.clone();
        thread::Builder::new()
            .name("coffre-final-flush".into())
            .spawn(move || {
                let _ = tx.send(futures::executor::block_on(backend.flush()));
            })
            .map_err(|e| StorageError::Io(e.to_string()))?;
        let r = rx.recv_timeout(FLUSH_TIMEOUT).unwrap_or_else(|_| {
            Err(StorageError::Io(format!(
                "flush did not finish within {} s",
                FLUSH_TIMEOUT.as_secs()
            )))
        });
        self.counted(r)
    }
}

/// How long the flusher lingers for more writers once a flush has shown
/// concurrency (PostgreSQL's `commit_delay`): a few hundred microseconds
/// turn many small flushes into one.
const COMMIT_DELAY: std::time::Duration = std::time::Duration::from_micros(300);

/// Waits for a request, gathers every request that arrives with it, flushes
/// once, and answers them all: one fsync per group rather than per write.
fn group_commit_loop(
    backend: &dyn Backend,
    rx: mpsc::Receiver<oneshot::Sender<Result<(), String>>>,
) {
    let mut concurrent = false;
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        if concurrent {
            let until = std::time::Instant::now() + COMMIT_DELAY;
            while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(more) => waiters.push(more),
                    Err(_) => break,
                }
            }
        }
        while let Ok(more) = rx.try_recv() {
            waiters.push(more);
        }
        concurrent = waiters.len() > 1;
        let started = std::time::Instant::now();
        let result = futures::executor::block_on(backend.flush()).map_err(|e| e.to_string());
        tracing::trace!(
            group = waiters.len(),
            micros = started.elapsed().as_micros() as u64,
            "flush"
        );
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batch_is_atomic_across_spaces_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SledOptions {
            cache_capacity_bytes: 1 << 20,
        };
        {
            let s = Storage::open_sled(dir.path(), &opts).unwrap();
            let mut b = Batch::new();
            b.put(Space::Records, b"k".to_vec(), b"v1".to_vec());
            b.put(Space::Index, b"k".to_vec(), b"i1".to_vec());
            s.commit(b).await.unwrap();
            assert_eq!(s.get(Space::Records, b"k").await.unwrap().unwrap(), b"v1");
            assert_eq!(s.get(Space::Index, b"k").await.unwrap().unwrap(), b"i1");
            assert!(s.get(Space::Meta, b"k").await.unwrap().is_none());
        }
        // sled releases its lock when the last handle drops; give the flush
        // thread's clone a moment by reopening in a loop.
        let s = loop {
            match Storage::open_sled(dir.path(), &opts) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        let rows = s.scan_prefix(Space::Records, b"", 10).await.unwrap();
        assert_eq!(rows, vec![(b"k".to_vec(), b"v1".to_vec())]);
    }
}
