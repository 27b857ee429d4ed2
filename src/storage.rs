//! Storage: the only module that knows sled, and the one that writes the
//! few files the vault rewrites whole ([`AtomicFile`]).
//!
//! Everything above sees a [`Backend`] of named key spaces with atomic
//! batches and an explicit durability point, and a [`Storage`] handle that
//! adds group commit: concurrent writers share one flush, and a write is
//! acknowledged only once a flush that began after it has finished. Another
//! backend (PostgreSQL, for several stateless nodes) implements [`Backend`]
//! without touching the services.

use std::{path::Path, sync::Arc, sync::mpsc, thread};

use tokio::sync::oneshot;

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

/// One write of a batch.
#[derive(Debug)]
pub enum Op {
    Put(Space, Vec<u8>, Vec<u8>),
    Delete(Space, Vec<u8>),
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
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a storage engine must provide.
pub trait Backend: Send + Sync + 'static {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    /// Entries whose key starts with `prefix`, in key order, at most `limit`.
    fn scan_prefix(
        &self,
        space: Space,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError>;
    /// Entries whose key starts with `prefix` and is at least `start`, in
    /// key order, at most `limit` (resumable scans).
    fn scan_from(
        &self,
        space: Space,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError>;
    /// Applies every op atomically; visible at once, durable after `flush`.
    fn apply(&self, batch: Batch) -> Result<(), StorageError>;
    /// The entry with the greatest key in `space`.
    fn last(&self, space: Space) -> Result<Option<Entry>, StorageError>;
    /// Makes every applied batch durable.
    fn flush(&self) -> Result<(), StorageError>;
    /// Asked before a write to state kept outside the backend (the audit
    /// trail's files): fault injection answers here.
    fn admit(&self, _space: Space) -> Result<(), StorageError> {
        Ok(())
    }
}

/// sled settings that operators tune.
#[derive(Debug, Clone)]
pub struct SledOptions {
    pub cache_capacity_bytes: u64,
}

/// The embedded default: sled 0.34, one tree, keys prefixed by their space
/// so that one batch is atomic across spaces.
pub struct SledBackend {
    db: sled::Db,
}

impl SledBackend {
    pub fn open(dir: &Path, opts: &SledOptions) -> Result<Self, StorageError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(opts.cache_capacity_bytes)
            // Our acknowledgements wait for an explicit flush; the periodic
            // one only bounds how much unacknowledged work a crash loses.
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|e| match e {
                // sled's own message is a Debug dump of the OS error.
                sled::Error::Io(ref ioe) if ioe.to_string().contains("could not acquire lock") => {
                    StorageError::Locked(dir.display().to_string())
                }
                other => io(other),
            })?;
        Ok(Self { db })
    }
}

fn io(e: sled::Error) -> StorageError {
    match e {
        sled::Error::Corruption { .. } => StorageError::Corrupt("sled reported corruption"),
        // sled's I/O errors name paths, never keys or values.
        other => StorageError::Io(other.to_string()),
    }
}

fn spaced(space: Space, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(space as u8);
    k.extend_from_slice(key);
    k
}

impl Backend for SledBackend {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .db
            .get(spaced(space, key))
            .map_err(io)?
            .map(|v| v.to_vec()))
    }

    fn scan_prefix(
        &self,
        space: Space,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(spaced(space, prefix)).take(limit) {
            let (k, v) = kv.map_err(io)?;
            out.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn scan_from(
        &self,
        space: Space,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        let p = spaced(space, prefix);
        let from = spaced(space, start.max(prefix));
        let mut out = Vec::new();
        for kv in self.db.range(from..).take(limit) {
            let (k, v) = kv.map_err(io)?;
            if !k.starts_with(&p) {
                break;
            }
            out.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, mut batch: Batch) -> Result<(), StorageError> {
        // A lone write is atomic by itself; sled's batches take a global
        // lock that stalls every concurrent reader, so skip it when we can.
        if batch.0.len() == 1 {
            return match batch.0.pop().expect("one op") {
                Op::Put(s, k, v) => self.db.insert(spaced(s, &k), v).map(|_| ()),
                Op::Delete(s, k) => self.db.remove(spaced(s, &k)).map(|_| ()),
            }
            .map_err(io);
        }
        let mut b = sled::Batch::default();
        for op in batch.0 {
            match op {
                Op::Put(s, k, v) => b.insert(spaced(s, &k), v),
                Op::Delete(s, k) => b.remove(spaced(s, &k)),
            }
        }
        self.db.apply_batch(b).map_err(io)
    }

    fn last(&self, space: Space) -> Result<Option<Entry>, StorageError> {
        let lo = [space as u8];
        let hi = [space as u8 + 1];
        match self.db.range(&lo[..]..&hi[..]).next_back() {
            Some(kv) => {
                let (k, v) = kv.map_err(io)?;
                Ok(Some((k[1..].to_vec(), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    fn flush(&self) -> Result<(), StorageError> {
        self.db.flush().map(|_| ()).map_err(io)
    }
}

/// A backend that fails writes to chosen spaces on demand: the fault
/// injection of the fail-closed tests, usable against any backend.
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    failing: parking_lot::Mutex<Vec<Space>>,
    /// Ops applied so far, by space (what a call wrote, for tests).
    writes: parking_lot::Mutex<std::collections::HashMap<u8, u64>>,
}

impl FaultyBackend {
    pub fn new(inner: Arc<dyn Backend>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            failing: parking_lot::Mutex::new(Vec::new()),
            writes: Default::default(),
        })
    }

    /// From now on, batches touching `space` fail.
    pub fn fail(&self, space: Space) {
        self.failing.lock().push(space);
    }

    pub fn heal(&self) {
        self.failing.lock().clear();
    }

    /// Ops applied to the backend so far, all spaces together.
    pub fn writes(&self) -> u64 {
        self.writes.lock().values().sum()
    }
}

impl Backend for FaultyBackend {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(space, key)
    }
    fn scan_prefix(
        &self,
        space: Space,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.inner.scan_prefix(space, prefix, limit)
    }
    fn scan_from(
        &self,
        space: Space,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.inner.scan_from(space, prefix, start, limit)
    }
    fn apply(&self, batch: Batch) -> Result<(), StorageError> {
        let failing = self.failing.lock().clone();
        let touches = batch.0.iter().any(|op| match op {
            Op::Put(s, _, _) | Op::Delete(s, _) => failing.contains(s),
        });
        if touches {
            return Err(StorageError::Io("injected fault".into()));
        }
        {
            let mut w = self.writes.lock();
            for op in &batch.0 {
                let (Op::Put(s, _, _) | Op::Delete(s, _)) = op;
                *w.entry(*s as u8).or_default() += 1;
            }
        }
        self.inner.apply(batch)
    }
    fn last(&self, space: Space) -> Result<Option<Entry>, StorageError> {
        self.inner.last(space)
    }
    fn flush(&self) -> Result<(), StorageError> {
        self.inner.flush()
    }
    fn admit(&self, space: Space) -> Result<(), StorageError> {
        if self.failing.lock().contains(&space) {
            return Err(StorageError::Io("injected fault".into()));
        }
        self.inner.admit(space)
    }
}

/// A small file rewritten whole and atomically (write a temporary file,
/// fsync, rename over, fsync the directory): after a crash it holds the old
/// contents or the new, never a mix. Unlike a log-structured store, a
/// replace leaves no trace of the old bytes in the directory, which is what
/// destroying a key needs. Created 0600.
#[derive(Debug, Clone)]
pub struct AtomicFile {
    path: std::path::PathBuf,
}

impl AtomicFile {
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The contents, or `None` if the file does not exist.
    pub fn read(&self) -> Result<Option<Vec<u8>>, StorageError> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::Io(format!("{}: {e}", self.path.display()))),
        }
    }

    /// Replaces the contents, durably, in the steps a crash test counts:
    /// 1 write the temporary file, 2 fsync it, 3 rename it over, 4 fsync the
    /// directory. `stop_before` ends early after the steps before it (a
    /// simulated kill, for tests).
    pub fn replace_steps(
        &self,
        bytes: &[u8],
        stop_before: Option<u32>,
    ) -> Result<(), StorageError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e: std::io::Error| StorageError::Io(format!("{}: {e}", self.path.display()));
        let stop = |step: u32| stop_before.is_some_and(|s| s <= step);
        let tmp = self.path.with_extension("tmp");
        if stop(1) {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        std::io::Write::write_all(&mut f, bytes).map_err(err)?;
        if stop(2) {
            return Ok(());
        }
        f.sync_all().map_err(err)?;
        drop(f);
        if stop(3) {
            return Ok(());
        }
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if stop(4) {
            return Ok(());
        }
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)
    }

    pub fn replace(&self, bytes: &[u8]) -> Result<(), StorageError> {
        self.replace_steps(bytes, None)
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
        }
    }

    /// Refuses writes while `guard` says the disk is nearly full.
    pub fn with_space_guard(mut self, guard: SpaceGuard) -> Self {
        self.space = Some(Arc::new(guard));
        self
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
        if r.is_err() {
            self.failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    pub fn open_sled(dir: &Path, opts: &SledOptions) -> Result<Self, StorageError> {
        Ok(Self::new(Arc::new(SledBackend::open(dir, opts)?)))
    }

    pub fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.backend.get(space, key)
    }

    pub fn scan_prefix(
        &self,
        space: Space,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.backend.scan_prefix(space, prefix, limit)
    }

    pub fn last(&self, space: Space) -> Result<Option<Entry>, StorageError> {
        self.backend.last(space)
    }

    pub fn scan_from(
        &self,
        space: Space,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.backend.scan_from(space, prefix, start, limit)
    }

    /// Applies a batch without waiting for durability (for state whose loss
    /// in a crash is harmless, such as a session's last-use time).
    pub fn apply(&self, batch: Batch) -> Result<(), StorageError> {
        self.space_ok()?;
        let r = self.backend.apply(batch);
        self.counted(r)
    }

    /// Applies the ops one at a time: not atomic, but never through the
    /// backend's batch path (sled's takes a global lock that stalls every
    /// reader). Only for state where every prefix of the ops is safe.
    pub fn apply_each(&self, batch: Batch) -> Result<(), StorageError> {
        for op in batch.0 {
            self.apply(Batch(vec![op]))?;
        }
        Ok(())
    }

    /// Applies a batch and returns once it is durable. Concurrent callers
    /// share flushes.
    pub async fn commit(&self, batch: Batch) -> Result<(), StorageError> {
        if !batch.is_empty() {
            self.apply(batch)?;
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
                let _ = tx.send(backend.flush());
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
        let result = backend.flush().map_err(|e| e.to_string());
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
            assert_eq!(s.get(Space::Records, b"k").unwrap().unwrap(), b"v1");
            assert_eq!(s.get(Space::Index, b"k").unwrap().unwrap(), b"i1");
            assert!(s.get(Space::Meta, b"k").unwrap().is_none());
        }
        // sled releases its lock when the last handle drops; give the flush
        // thread's clone a moment by reopening in a loop.
        let s = loop {
            match Storage::open_sled(dir.path(), &opts) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        let rows = s.scan_prefix(Space::Records, b"", 10).unwrap();
        assert_eq!(rows, vec![(b"k".to_vec(), b"v1".to_vec())]);
    }
}
