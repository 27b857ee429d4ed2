//! The trail in PostgreSQL (`storage.backend = "postgres"`): one global
//! chain that every node appends to.
//!
//! Frames are the very bytes the trail's files hold (events sealed under
//! the audit key, the frame's end hash bound as associated data), one row
//! each in `coffre_audit_frame`; `coffre_audit_tag` names each event's
//! record ids, principal, tenant and alert kind by keyed hash, for queries
//! in O(log n + results). A node appends a group of events in one
//! transaction: it locks the head row (`coffre_audit_head`), chains its
//! events after it with the database's clock, inserts the frame and its
//! tags and moves the head. Nodes take turns on that lock, so there is one
//! chain whatever the number of nodes, and `VerifyAudit` on any node checks
//! every node's events. (Per-node chains anchored together would let nodes
//! append in parallel; one chain was chosen because a group commit holds
//! the lock for one round trip and keeps verification one pass — see
//! BENCHMARKS.md.)
//!
//! A node remembers the highest head it has seen. A head below it (a
//! failover to a standby that lacked acknowledged events) stops the trail
//! on that node: every call fails UNAVAILABLE and health says NOT_SERVING
//! until an operator has looked (restart the node).
//!
//! The pool's connections run on a runtime of this module's own, so that
//! the synchronous callers (the writer thread, queries from blocking
//! threads) never block a runtime that drives them.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use deadpool_postgres::Pool;
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use super::{
    ChainWalk, DURABLE_TIMEOUT, GENESIS, Lines, Query, Recorded, Verification, log, mirror_lines,
    retained,
};
use crate::{
    crypto::{self, SecretKey},
    error::{Error, Result},
    pb::AuditEvent,
    stats::Stats,
    store::{
        Space, Storage, StorageError,
        postgres::{PostgresBackend, PostgresOptions, pg_error, pool_error, timed},
    },
};

type Waiter = oneshot::Sender<std::result::Result<Recorded, String>>;

struct Pending {
    events: Vec<AuditEvent>,
    waiters: Vec<Waiter>,
    closed: bool,
}

/// The trail's tables, a writer thread, and the runtime of their pool.
pub struct Trail {
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    pool: Pool,
    keys: Arc<log::Keys>,
    /// The audit key, for checks that own their keys.
    pending: Mutex<Pending>,
    wake: Condvar,
    /// The highest head this node has seen (durable in the database).
    seen: AtomicU64,
    seen_hash: Mutex<[u8; 32]>,
    /// The head went backwards: the trail refuses every append.
    diverged: AtomicBool,
    store: Storage,
    mirror: Option<Arc<Lines>>,
    stats: Arc<Stats>,
}

/// A frame row: its first seq, the hash before it, its bytes.
struct FrameRow {
    first_seq: u64,
    prev: [u8; 32],
    raw: Vec<u8>,
}

fn hash32(v: &[u8]) -> [u8; 32] {
    v.try_into().unwrap_or([0; 32])
}

impl Trail {
    /// Connects to the trail's tables and starts the writer.
    pub fn open(
        opts: &PostgresOptions,
        store: Storage,
        key: SecretKey,
        mirror: Option<Arc<Lines>>,
        stats: Arc<Stats>,
    ) -> Result<Arc<Self>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coffre-pg-trail")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("trail runtime: {e}")))?;
        let pool = PostgresBackend::pool(opts)?;
        let t = Arc::new(Self {
            handle: rt.handle().clone(),
            rt: Mutex::new(Some(rt)),
            pool,
            keys: Arc::new(log::Keys::new(key)),
            pending: Mutex::new(Pending {
                events: Vec::new(),
                waiters: Vec::new(),
                closed: false,
            }),
            wake: Condvar::new(),
            seen: AtomicU64::new(0),
            seen_hash: Mutex::new(GENESIS),
            diverged: AtomicBool::new(false),
            store,
            mirror,
            stats,
        });
        let (seq, hash) = t.read_head()?;
        t.seen.store(seq, Ordering::SeqCst);
        *t.seen_hash.lock() = hash;
        let w = t.clone();
        std::thread::Builder::new()
            .name("coffre-audit".into())
            .spawn(move || w.writer())
            .map_err(|e| Error::Internal(format!("audit writer: {e}")))?;
        Ok(t)
    }

    /// Runs `f` on the trail's runtime and waits for it (from any thread).
    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = std::result::Result<T, StorageError>> + Send + 'static,
    ) -> std::result::Result<T, StorageError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(timed(f).await);
        });
        rx.recv().unwrap_or(Err(StorageError::Closed))
    }

    /// The head in the database now; notes a head that went backwards.
    fn read_head(&self) -> std::result::Result<(u64, [u8; 32]), StorageError> {
        // Seen before the read: an append that lands while we read moves
        // `seen` past what we read, which is no step backwards.
        let seen = self.seen.load(Ordering::SeqCst);
        let pool = self.pool.clone();
        let (seq, hash) = self.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let r = c
                .query_one("SELECT seq, hash FROM coffre_audit_head WHERE id = 1", &[])
                .await
                .map_err(pg_error)?;
            Ok((r.get::<_, i64>(0) as u64, hash32(&r.get::<_, Vec<u8>>(1))))
        })?;
        self.check_not_behind(seq, seen)?;
        Ok((seq, hash))
    }

    /// Whether the head `seq` read from the database is behind `seen`, the
    /// highest this node knew durable before reading it.
    fn check_not_behind(&self, seq: u64, seen: u64) -> std::result::Result<(), StorageError> {
        if seq < seen {
            if !self.diverged.swap(true, Ordering::SeqCst) {
                tracing::error!(
                    seen,
                    found = seq,
                    "audit trail: the database's head moved backwards (a failover to a standby that lacked acknowledged events?): refusing every call; restart this node once the database is checked"
                );
            }
            return Err(StorageError::Io(
                "the audit trail's head moved backwards in the database".into(),
            ));
        }
        Ok(())
    }

    /// The database's head now (a head behind the one seen stops the
    /// trail).
    pub fn head_now(&self) -> Result<(u64, [u8; 32])> {
        Ok(self.read_head()?)
    }

    /// Whether the trail saw its head move backwards.
    pub fn diverged(&self) -> bool {
        self.diverged.load(Ordering::SeqCst)
    }

    /// The last head this node saw durable.
    pub fn head(&self) -> (u64, [u8; 32]) {
        (self.seen.load(Ordering::SeqCst), *self.seen_hash.lock())
    }

    /// Queues `e` for the writer and waits until it is durable.
    pub async fn append(&self, e: AuditEvent) -> Result<Recorded> {
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock();
            if p.closed {
                return Err(Error::Unavailable(StorageError::Closed));
            }
            p.events.push(e);
            p.waiters.push(tx);
        }
        self.wake.notify_one();
        match tokio::time::timeout(DURABLE_TIMEOUT, rx).await {
            Ok(Ok(Ok(r))) => Ok(r),
            Ok(Ok(Err(msg))) => Err(Error::Unavailable(StorageError::Io(msg))),
            Ok(Err(_)) => Err(Error::Unavailable(StorageError::Closed)),
            Err(_) => {
                self.store.note_failure();
                Err(Error::Unavailable(StorageError::Io(format!(
                    "audit write did not finish within {} s",
                    DURABLE_TIMEOUT.as_secs()
                ))))
            }
        }
    }

    pub fn close(&self) {
        self.pending.lock().closed = true;
        self.wake.notify_all();
        if let Some(rt) = self.rt.lock().take() {
            rt.shutdown_background();
        }
    }

    fn writer(self: Arc<Self>) {
        loop {
            let (events, waiters) = {
                let mut p = self.pending.lock();
                while p.events.is_empty() && !p.closed {
                    self.wake.wait(&mut p);
                }
                if p.events.is_empty() {
                    return;
                }
                (
                    std::mem::take(&mut p.events),
                    std::mem::take(&mut p.waiters),
                )
            };
            let result = if self.diverged() {
                Err(StorageError::Io(
                    "the audit trail's head moved backwards in the database".into(),
                ))
            } else {
                self.store
                    .admit(Space::Audit)
                    .and_then(|()| self.run(Self::commit(self.clone(), events)))
            };
            match result {
                Ok(events) => {
                    self.stats
                        .audit_group_commit_events
                        .observe(events.len() as f64);
                    if let Some(m) = &self.mirror {
                        m.write(&mirror_lines(&events));
                    }
                    for (e, w) in events.iter().zip(waiters) {
                        let _ = w.send(Ok(Recorded {
                            seq: e.seq,
                            time_unix_ms: e.time_unix_ms,
                        }));
                    }
                }
                Err(e) => {
                    self.store.note_failure();
                    let msg = e.to_string();
                    for w in waiters {
                        let _ = w.send(Err(msg.clone()));
                    }
                }
            }
        }
    }

    /// One transaction: lock the head, chain `events` after it with the
    /// database's time, insert their frames and tags, move the head.
    async fn commit(
        self: Arc<Self>,
        mut events: Vec<AuditEvent>,
    ) -> std::result::Result<Vec<AuditEvent>, StorageError> {
        // Only this writer moves `seen` forward on this node.
        let seen = self.seen.load(Ordering::SeqCst);
        let mut c = self.pool.get().await.map_err(pool_error)?;
        let tx = c.transaction().await.map_err(pg_error)?;
        let head = tx
            .query_one(
                "SELECT seq, hash, time_ms, \
                 (extract(epoch FROM clock_timestamp()) * 1000)::bigint \
                 FROM coffre_audit_head WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(pg_error)?;
        let mut seq = head.get::<_, i64>(0) as u64;
        self.check_not_behind(seq, seen)?;
        let mut hash = hash32(&head.get::<_, Vec<u8>>(1));
        // Time never goes backwards in the trail, whatever the clocks.
        let time = head.get::<_, i64>(3).max(head.get::<_, i64>(2));
        for e in &mut events {
            seq += 1;
            e.seq = seq;
            e.time_unix_ms = time;
            e.prev_hash = hash.to_vec();
            hash = log::chain_hash(self.keys.chain(), &hash, e);
            e.hash = hash.to_vec();
        }
        let (mut f_first, mut f_last, mut f_t0, mut f_t1, mut f_prev, mut f_raw) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut tags, mut tag_seqs) = (vec![], vec![]);
        for chunk in events.chunks(log::FRAME_EVENTS) {
            let (mut raw, mut entries) = (Vec::new(), Vec::new());
            log::encode_frame(&self.keys, chunk, &mut raw, &mut entries);
            let (first, last) = (&chunk[0], &chunk[chunk.len() - 1]);
            f_first.push(first.seq as i64);
            f_last.push(last.seq as i64);
            f_t0.push(first.time_unix_ms);
            f_t1.push(last.time_unix_ms);
            f_prev.push(first.prev_hash.clone());
            f_raw.push(raw);
            for (s, k) in entries {
                tag_seqs.push(s as i64);
                tags.push(k as i64);
            }
        }
        tx.execute(
            "WITH f AS (
                INSERT INTO coffre_audit_frame
                SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                                     $5::bytea[], $6::bytea[])
            ), t AS (
                INSERT INTO coffre_audit_tag
                SELECT * FROM unnest($7::bigint[], $8::bigint[]) ON CONFLICT DO NOTHING
            )
            UPDATE coffre_audit_head SET seq = $9, hash = $10, time_ms = $11 WHERE id = 1",
            &[
                &f_first,
                &f_last,
                &f_t0,
                &f_t1,
                &f_prev,
                &f_raw,
                &tags,
                &tag_seqs,
                &(seq as i64),
                &hash.to_vec(),
                &time,
            ],
        )
        .await
        .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)?;
        let prev = self.seen.fetch_max(seq, Ordering::SeqCst);
        if prev < seq {
            *self.seen_hash.lock() = hash;
        }
        Ok(events)
    }

    /// Frames from `from_seq` on (at most `limit`), oldest first, or newest
    /// first below `from_seq` when `desc`, within a time range.
    fn frames(
        &self,
        from_seq: u64,
        upper: u64,
        desc: bool,
        since: i64,
        until: i64,
        limit: i64,
    ) -> std::result::Result<Vec<FrameRow>, StorageError> {
        let pool = self.pool.clone();
        let until = if until == 0 { i64::MAX } else { until };
        self.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let sql = if desc {
                "SELECT first_seq, prev, raw FROM coffre_audit_frame \
                 WHERE first_seq < $1 AND first_seq <= $2 AND last_time >= $3 AND first_time < $4 \
                 ORDER BY first_seq DESC LIMIT $5"
            } else {
                "SELECT first_seq, prev, raw FROM coffre_audit_frame \
                 WHERE last_seq >= $1 AND first_seq <= $2 AND last_time >= $3 AND first_time < $4 \
                 ORDER BY first_seq LIMIT $5"
            };
            let rows = c
                .query(
                    sql,
                    &[&(from_seq as i64), &(upper as i64), &since, &until, &limit],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows
                .into_iter()
                .map(|r| FrameRow {
                    first_seq: r.get::<_, i64>(0) as u64,
                    prev: hash32(&r.get::<_, Vec<u8>>(1)),
                    raw: r.get(2),
                })
                .collect())
        })
    }

    /// The seqs tagged `tag` after `after` (before it when `desc`), at most
    /// `limit`, and the frames that hold them.
    fn tagged(
        &self,
        tag: u64,
        after: u64,
        upper: u64,
        desc: bool,
        limit: i64,
    ) -> std::result::Result<(Vec<u64>, Vec<FrameRow>), StorageError> {
        let pool = self.pool.clone();
        self.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let sql = if desc {
                "SELECT seq FROM coffre_audit_tag WHERE tag = $1 AND seq < $2 AND seq <= $3 \
                 ORDER BY seq DESC LIMIT $4"
            } else {
                "SELECT seq FROM coffre_audit_tag WHERE tag = $1 AND seq > $2 AND seq <= $3 \
                 ORDER BY seq LIMIT $4"
            };
            let seqs: Vec<i64> = c
                .query(
                    sql,
                    &[&(tag as i64), &(after as i64), &(upper as i64), &limit],
                )
                .await
                .map_err(pg_error)?
                .into_iter()
                .map(|r| r.get(0))
                .collect();
            let frames = c
                .query(
                    "SELECT DISTINCT f.first_seq, f.prev, f.raw FROM unnest($1::bigint[]) s(seq) \
                     CROSS JOIN LATERAL (SELECT first_seq, prev, raw FROM coffre_audit_frame \
                       WHERE first_seq <= s.seq ORDER BY first_seq DESC LIMIT 1) f",
                    &[&seqs],
                )
                .await
                .map_err(pg_error)?
                .into_iter()
                .map(|r| FrameRow {
                    first_seq: r.get::<_, i64>(0) as u64,
                    prev: hash32(&r.get::<_, Vec<u8>>(1)),
                    raw: r.get(2),
                })
                .collect();
            Ok((seqs.into_iter().map(|s| s as u64).collect(), frames))
        })
    }

    fn open_frame(&self, f: &FrameRow) -> Result<Vec<AuditEvent>> {
        let raw = log::parse_frame(&f.raw).map_err(|_| Error::DataLoss)?;
        if raw.first_seq != f.first_seq {
            return Err(Error::DataLoss);
        }
        raw.open(&self.keys, f.prev).ok_or(Error::DataLoss)
    }

    /// [`super::Audit::query_each`] on the tables.
    pub fn query_each(
        &self,
        q: &Query,
        key: Option<log::Key<'_>>,
        mut emit: impl FnMut(AuditEvent) -> bool,
    ) -> Result<()> {
        let (head, _) = self.read_head()?;
        let upper = match q.before_seq {
            0 => head,
            b => head.min(b - 1),
        };
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let mut sent = 0usize;
        const PAGE: i64 = 256;
        let mut emit_all = |events: Vec<AuditEvent>| -> bool {
            for e in events {
                if !emit(e) {
                    return false;
                }
                sent += 1;
                if sent >= limit {
                    return false;
                }
            }
            true
        };
        match key {
            Some(k) => {
                let tag = self.keys.index(k);
                let mut cursor = if q.newest_first { upper + 1 } else { 0 };
                loop {
                    let (seqs, frames) = self.tagged(tag, cursor, upper, q.newest_first, PAGE)?;
                    let Some(&last) = seqs.last() else {
                        return Ok(());
                    };
                    let mut found = Vec::new();
                    for f in &frames {
                        found.extend(self.open_frame(f)?.into_iter().filter(|e| {
                            seqs.binary_search_by(|s| {
                                if q.newest_first {
                                    e.seq.cmp(s)
                                } else {
                                    s.cmp(&e.seq)
                                }
                            })
                            .is_ok()
                                && q.matches(e)
                        }));
                    }
                    found.sort_by_key(|e| e.seq);
                    if q.newest_first {
                        found.reverse();
                    }
                    if !emit_all(found) || (seqs.len() as i64) < PAGE {
                        return Ok(());
                    }
                    cursor = last;
                }
            }
            None => {
                let mut cursor = if q.newest_first { upper + 1 } else { 0 };
                loop {
                    let frames = self.frames(
                        cursor,
                        upper,
                        q.newest_first,
                        q.since_unix_ms,
                        q.until_unix_ms,
                        16,
                    )?;
                    let Some(last) = frames.last() else {
                        return Ok(());
                    };
                    cursor = if q.newest_first {
                        last.first_seq
                    } else {
                        // The next frame starts after this one's events.
                        0
                    };
                    let mut next_from = 0;
                    for f in &frames {
                        let mut events: Vec<AuditEvent> = self.open_frame(f)?;
                        next_from = events.last().map_or(f.first_seq, |e| e.seq) + 1;
                        events.retain(|e| e.seq <= upper && q.matches(e));
                        if q.newest_first {
                            events.reverse();
                        }
                        if !emit_all(events) {
                            return Ok(());
                        }
                    }
                    if !q.newest_first {
                        cursor = next_from;
                    }
                    if frames.len() < 16 {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// [`super::Audit::verify_with`] on the tables: the base's MAC, then
    /// every frame in seq order from it to the head.
    pub fn verify_with(
        &self,
        checkpoint: Option<(u64, [u8; 32])>,
        mut progress: impl FnMut(u64),
    ) -> Result<Verification> {
        let seen = self.seen.load(Ordering::SeqCst);
        let pool = self.pool.clone();
        let (head_seq, base_seq, base_prev, base_mac) = self.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let r = c
                .query_one(
                    "SELECT seq, base_seq, base_prev, base_mac FROM coffre_audit_head WHERE id = 1",
                    &[],
                )
                .await
                .map_err(pg_error)?;
            Ok((
                r.get::<_, i64>(0) as u64,
                r.get::<_, i64>(1) as u64,
                hash32(&r.get::<_, Vec<u8>>(2)),
                r.get::<_, Option<Vec<u8>>>(3),
            ))
        })?;
        self.check_not_behind(head_seq, seen)?;
        let mut walk = ChainWalk::new((base_seq, base_prev), head_seq, checkpoint);
        let genesis = base_seq == 1 && base_prev == GENESIS;
        let base_ok = base_mac
            .as_deref()
            .is_some_and(|m| crypto::ct_eq(m, &self.keys.segment_mac(base_seq, &base_prev)));
        if !genesis && !base_ok {
            return Ok(walk.bad(base_seq, "trail base fails its MAC"));
        }
        'pages: while walk.expect <= head_seq {
            let frames = self.frames(walk.expect, head_seq, false, 0, 0, 64)?;
            if frames.is_empty() {
                break;
            }
            for f in &frames {
                let Ok(frame) = log::parse_frame(&f.raw) else {
                    return Ok(walk.bad(walk.expect, "frame damaged"));
                };
                // The row's key must name the frame its bytes hold.
                if f.first_seq != walk.expect {
                    return Ok(walk.bad(walk.expect, "sequence gap or reordering"));
                }
                if let Err((seq, why)) = walk.frame(&self.keys, &frame, &mut progress) {
                    return Ok(walk.bad(seq, why));
                }
                if walk.expect > head_seq {
                    break 'pages;
                }
            }
        }
        Ok(walk.finish(progress))
    }

    /// Drops the frames whose events are all older than `before_unix_ms`
    /// (never the head's), keeping each record's latest write aside first,
    /// and moves the authenticated base. One node at a time (an advisory
    /// lock); returns how many events went.
    pub async fn prune(self: &Arc<Self>, before_unix_ms: i64) -> Result<u64> {
        let mut dropped = 0;
        loop {
            let (head, _) = {
                let t = self.clone();
                tokio::task::spawn_blocking(move || t.read_head())
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))??
            };
            let t = self.clone();
            let frames = tokio::task::spawn_blocking(move || {
                t.frames(0, head.saturating_sub(1), false, 0, before_unix_ms, 64)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
            // Only frames wholly before the cut and before the head.
            let mut latest = retained::Latest::default();
            let mut last: Option<(u64, [u8; 32])> = None;
            for f in &frames {
                let events = self.open_frame(f)?;
                let Some(end) = events.last() else { continue };
                if end.time_unix_ms >= before_unix_ms || end.seq >= head {
                    break;
                }
                retained::note_latest(&self.keys, &events, &mut latest);
                last = Some((end.seq, hash32(&end.hash)));
            }
            let Some((last_seq, last_hash)) = last else {
                return Ok(dropped);
            };
            retained::keep_latest_writes(&self.store, &self.keys, latest).await?;
            let mac = self.keys.segment_mac(last_seq + 1, &last_hash).to_vec();
            let pool = self.pool.clone();
            let n = {
                let t = self.clone();
                tokio::task::spawn_blocking(move || {
                    t.run(async move {
                        let mut c = pool.get().await.map_err(pool_error)?;
                        let tx = c.transaction().await.map_err(pg_error)?;
                        let got: bool = tx
                            .query_one("SELECT pg_try_advisory_xact_lock(7318002)", &[])
                            .await
                            .map_err(pg_error)?
                            .get(0);
                        if !got {
                            return Ok(None);
                        }
                        let base: i64 = tx
                            .query_one("SELECT base_seq FROM coffre_audit_head WHERE id = 1", &[])
                            .await
                            .map_err(pg_error)?
                            .get(0);
                        let last = last_seq as i64;
                        tx.execute(
                            "DELETE FROM coffre_audit_frame WHERE last_seq <= $1",
                            &[&last],
                        )
                        .await
                        .map_err(pg_error)?;
                        tx.execute("DELETE FROM coffre_audit_tag WHERE seq <= $1", &[&last])
                            .await
                            .map_err(pg_error)?;
                        tx.execute(
                            "UPDATE coffre_audit_head SET base_seq = $1, base_prev = $2, base_mac = $3 \
                             WHERE id = 1 AND base_seq <= $1",
                            &[&(last + 1), &last_hash.to_vec(), &mac],
                        )
                        .await
                        .map_err(pg_error)?;
                        tx.commit().await.map_err(pg_error)?;
                        Ok(Some((last + 1 - base).max(0) as u64))
                    })
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))??
            };
            match n {
                Some(n) => dropped += n,
                // Another node is pruning.
                None => return Ok(dropped),
            }
        }
    }
}

/// Writes a trail given piece by piece (a backup's segment headers and
/// frames) into the tables of an empty database, checking the chain as it
/// goes: what `coffre restore` does with a backup made on either backend.
pub struct TrailImport {
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    keys: log::Keys,
    base: Option<(u64, [u8; 32])>,
    expect: u64,
    prev: [u8; 32],
    head: (u64, [u8; 32], i64),
    rows: Vec<ImportRow>,
    tags: Vec<(i64, i64)>,
}

type ImportResult<T> = std::result::Result<T, StorageError>;

/// A frame row to insert: first and last seq, first and last time, the
/// hash before it, its bytes.
type ImportRow = (u64, u64, i64, i64, Vec<u8>, Vec<u8>);

impl TrailImport {
    /// Into the database of `opts`, whose trail must be empty.
    pub fn new(opts: &PostgresOptions, key: SecretKey) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("trail runtime: {e}")))?;
        let pool = PostgresBackend::pool(opts)?;
        let t = Self {
            rt: Some(rt),
            pool,
            keys: log::Keys::new(key),
            base: None,
            expect: 0,
            prev: GENESIS,
            head: (0, GENESIS, 0),
            rows: Vec::new(),
            tags: Vec::new(),
        };
        let pool = t.pool.clone();
        let seq = t.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let r = c
                .query_one("SELECT seq FROM coffre_audit_head WHERE id = 1", &[])
                .await
                .map_err(pg_error)?;
            Ok(r.get::<_, i64>(0))
        })?;
        if seq != 0 {
            return Err(Error::FailedPrecondition(
                "the database already holds an audit trail: restore writes only into an empty database".into(),
            ));
        }
        Ok(t)
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = ImportResult<T>> + Send + 'static,
    ) -> ImportResult<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        let rt = self.rt.as_ref().ok_or(StorageError::Closed)?;
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().unwrap_or(Err(StorageError::Closed))
    }

    /// A segment's header: the first one sets the trail's base, the others
    /// must continue the chain.
    pub fn segment(&mut self, h: &[u8]) -> std::result::Result<(), String> {
        let (first, prev) = log::parse_segment_header(&self.keys, h).map_err(|e| e.to_string())?;
        match self.base {
            None => {
                self.base = Some((first, prev));
                (self.expect, self.prev) = (first, prev);
            }
            Some(_) if first != self.expect || prev != self.prev => {
                return Err(format!(
                    "audit segment at seq {first} does not continue the chain"
                ));
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// One frame, checked and queued (written 256 at a time).
    pub fn frame(&mut self, raw: Vec<u8>) -> std::result::Result<(), String> {
        let frame = log::parse_frame(&raw).map_err(|_| "an audit frame is damaged".to_string())?;
        if self.base.is_none() || frame.first_seq != self.expect {
            return Err(format!(
                "audit frame at seq {} out of sequence",
                frame.first_seq
            ));
        }
        let events = frame.open(&self.keys, self.prev).ok_or_else(|| {
            format!(
                "audit frame at seq {} fails authentication",
                frame.first_seq
            )
        })?;
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return Err("an empty audit frame".into());
        };
        let end = hash32(&last.hash);
        if !crypto::ct_eq(&end, &frame.end_hash) {
            return Err(format!(
                "audit frame at seq {} was modified",
                frame.first_seq
            ));
        }
        let mut ks = Vec::new();
        for e in &events {
            ks.clear();
            self.keys.entries(e, &mut ks);
            self.tags
                .extend(ks.iter().map(|k| (*k as i64, e.seq as i64)));
        }
        self.rows.push((
            first.seq,
            last.seq,
            first.time_unix_ms,
            last.time_unix_ms,
            self.prev.to_vec(),
            raw,
        ));
        self.head = (last.seq, end, last.time_unix_ms);
        self.prev = end;
        self.expect = last.seq + 1;
        if self.rows.len() >= 256 {
            self.flush().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn flush(&mut self) -> ImportResult<()> {
        let rows = std::mem::take(&mut self.rows);
        let tags = std::mem::take(&mut self.tags);
        if rows.is_empty() {
            return Ok(());
        }
        let pool = self.pool.clone();
        self.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            let (mut a, mut b, mut t0, mut t1, mut p, mut r) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for row in rows {
                a.push(row.0 as i64);
                b.push(row.1 as i64);
                t0.push(row.2);
                t1.push(row.3);
                p.push(row.4);
                r.push(row.5);
            }
            let (tk, ts): (Vec<i64>, Vec<i64>) = tags.into_iter().unzip();
            c.execute(
                "WITH f AS (
                    INSERT INTO coffre_audit_frame
                    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                                         $5::bytea[], $6::bytea[])
                )
                INSERT INTO coffre_audit_tag
                SELECT * FROM unnest($7::bigint[], $8::bigint[]) ON CONFLICT DO NOTHING",
                &[&a, &b, &t0, &t1, &p, &r, &tk, &ts],
            )
            .await
            .map_err(pg_error)?;
            Ok(())
        })
    }

    /// The last frames written and the head row set: the trail starts at
    /// the first segment's base and ends at the last frame.
    pub fn finish(&mut self) -> ImportResult<()> {
        self.flush()?;
        let Some((base_seq, base_prev)) = self.base else {
            return Ok(());
        };
        let mac = self.keys.segment_mac(base_seq, &base_prev).to_vec();
        let (seq, hash, time) = self.head;
        let pool = self.pool.clone();
        self.run(async move {
            let c = pool.get().await.map_err(pool_error)?;
            c.execute(
                "UPDATE coffre_audit_head SET seq = $1, hash = $2, time_ms = $3, \
                 base_seq = $4, base_prev = $5, base_mac = $6 WHERE id = 1",
                &[
                    &(seq as i64),
                    &hash.to_vec(),
                    &time,
                    &(base_seq as i64),
                    &base_prev.to_vec(),
                    &mac,
                ],
            )
            .await
            .map_err(pg_error)?;
            Ok(())
        })
    }
}

impl Drop for TrailImport {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Trail {
    /// The latest write of a record that pruning kept aside.
    pub async fn retained_all(&self) -> Result<(Vec<(String, String, super::LatestWrite)>, u64)> {
        retained::all(&self.store, &self.keys).await
    }

    pub async fn retained(&self, tenant: &str, id: &str) -> Result<Option<super::LatestWrite>> {
        retained::lookup(&self.store, &self.keys, tenant, id).await
    }
}

impl Drop for Trail {
    fn drop(&mut self) {
        self.close();
    }
}
