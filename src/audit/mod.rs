//! The audit trail: one event per RPC, chained by an HMAC so that an edited,
//! inserted, deleted or reordered event is found, written durably before
//! the response leaves (fail-closed), and mirrored as JSON lines.
//!
//! `hash_n = HMAC-SHA256(audit_key, hash_{n-1} ‖ canonical(event_n))`, with
//! `hash_0` all zeroes. Events carry names, ids, purposes and outcomes:
//! never a field value, password or token.

use std::{fs::File, io::Write, path::Path, sync::Arc, time::Duration};

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use crate::{
    clock::now_ms,
    crypto::{self, Context, SecretKey},
    error::{Error, Result},
    pb::{Alert, AuditEvent},
    stats::{LineFile, Stats},
    store::{Space, Storage, StorageError},
};

mod codec;
pub mod log;
mod migrate;
mod pg;
mod retained;

pub use log::TRAIL_FORMAT;
pub use pg::TrailImport;

const GENESIS: [u8; 32] = [0; 32];

/// What a handler says about its call, for the event.
#[derive(Debug, Default, Clone)]
pub struct Note {
    /// The tenant acted on, when no caller names it (Login, admin calls).
    pub tenant: Option<String>,
    /// The principal attempted, when there is no caller yet (Login).
    pub principal: Option<String>,
    pub record_ids: Vec<String>,
    pub fields: Vec<String>,
    pub purpose: String,
}

/// Appended to whatever the trail cut short.
pub const CUT_MARK: &str = "…[cut]";

/// `s` cut to at most `max` bytes (on a character boundary) and marked.
fn cut(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(CUT_MARK);
}

/// A list cut to at most `max` items of at most `item` bytes; the last
/// item kept says how many were left out.
fn cut_list(v: &mut Vec<String>, max: usize, item: usize) {
    if v.len() > max {
        let left = v.len() - max;
        v.truncate(max);
        v.push(format!("{CUT_MARK} {left} more"));
    }
    for s in v.iter_mut() {
        cut(s, item);
    }
}

impl Note {
    /// Bounds what the trail keeps of a request (the input limits: ids of
    /// 128 bytes, 1000 of them, 256 field names, a purpose of 256 bytes),
    /// so that a rejected oversize request costs the trail no more than a
    /// valid one. Anything cut ends with [`CUT_MARK`].
    pub fn bound(&mut self) {
        use crate::model::{MAX_BULK_IDS, MAX_FIELDS, MAX_ID_BYTES, MAX_PURPOSE_BYTES};
        cut(&mut self.purpose, MAX_PURPOSE_BYTES);
        cut_list(&mut self.record_ids, MAX_BULK_IDS, MAX_ID_BYTES);
        // Field names are 64 bytes; account calls name `username=<name>`.
        cut_list(&mut self.fields, MAX_FIELDS, 128);
        for s in [&mut self.tenant, &mut self.principal]
            .into_iter()
            .flatten()
        {
            cut(s, 256);
        }
    }
}

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub ok: bool,
    pub checked: u64,
    /// The first sequence number that fails (0 when `ok`).
    pub first_bad_seq: u64,
    pub head_seq: u64,
    pub head_hash: [u8; 32],
    pub reason: Option<String>,
    /// The restores from backup the chain went through (each starts a new
    /// stretch of the trail after the backup's head).
    pub restores: Vec<RestoreMark>,
    /// A checkpoint that lay past a restore's backup head: the stretch it
    /// named was lost with the restore, and was checked up to that head.
    pub note: Option<String>,
}

/// The action of the event a restore appends to the trail.
pub const RESTORE_ACTION: &str = "alert/restore";

/// A restore from backup, as its event in the trail records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreMark {
    /// The restore event's seq (the backup's head + 1).
    pub seq: u64,
    pub time_unix_ms: i64,
    pub backup_head_seq: u64,
    pub backup_created_unix_ms: i64,
}

impl RestoreMark {
    /// The mark an event records, if it is a restore's.
    pub fn of(e: &AuditEvent) -> Option<Self> {
        if e.action != RESTORE_ACTION {
            return None;
        }
        let field = |name: &str| {
            e.fields
                .iter()
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        };
        Some(Self {
            seq: e.seq,
            time_unix_ms: e.time_unix_ms,
            backup_head_seq: field("backup_head_seq")?.parse().ok()?,
            backup_created_unix_ms: field("backup_created_unix_ms")?.parse().ok()?,
        })
    }
}

/// What a backup copies of the trail: the head as of its cut and the
/// segments holding it, kept in place (retention waits) until dropped.
pub struct TrailSnapshot {
    pub head_seq: u64,
    pub head_hash: [u8; 32],
    segments: Vec<log::SegMeta>,
    _hold: log::Hold,
}

impl TrailSnapshot {
    /// The trail's first seq (the base after retention).
    pub fn first_seq(&self) -> u64 {
        self.segments.first().map_or(1, |m| m.first_seq)
    }

    /// Bytes of the segment files (an upper bound of what is copied).
    pub fn bytes(&self) -> u64 {
        self.segments
            .iter()
            .filter_map(|m| std::fs::metadata(&m.path).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Each segment's header (`true`) and frames (`false`) up to the head,
    /// oldest first.
    pub fn export(
        &self,
        mut piece: impl FnMut(bool, Vec<u8>) -> std::result::Result<(), StorageError>,
    ) -> std::result::Result<(), StorageError> {
        for meta in &self.segments {
            log::export_segment(meta, self.head_seq, &mut piece)?;
        }
        Ok(())
    }
}

/// Filters of `QueryAudit`; empty strings and zeroes match everything.
#[derive(Debug, Default, Clone)]
pub struct Query {
    /// Restricts to one tenant (an auditor's own), whatever `tenant` says.
    pub scope: Option<String>,
    pub tenant: String,
    pub principal: String,
    pub record_id: String,
    pub action: String,
    pub outcome: String,
    pub since_unix_ms: i64,
    pub until_unix_ms: i64,
    pub limit: usize,
    pub newest_first: bool,
    /// Only events with a smaller seq (0: no bound): paging.
    pub before_seq: u64,
    /// Only alerts (`alert/<kind>` events).
    pub alerts_only: bool,
}

impl Query {
    /// Whether `e` passes every filter.
    pub fn matches(&self, e: &AuditEvent) -> bool {
        self.scope.as_deref().is_none_or(|s| e.tenant == s)
            && (self.tenant.is_empty() || e.tenant == self.tenant)
            && (self.principal.is_empty() || e.principal == self.principal)
            && (self.record_id.is_empty() || e.record_ids.contains(&self.record_id))
            && (self.action.is_empty()
                || e.action == self.action
                || e.action
                    .strip_suffix(self.action.as_str())
                    .is_some_and(|rest| rest.ends_with('/')))
            && (!self.alerts_only || e.action.starts_with("alert/"))
            && (self.outcome.is_empty() || e.outcome == self.outcome)
            && (self.since_unix_ms == 0 || e.time_unix_ms >= self.since_unix_ms)
            && (self.until_unix_ms == 0 || e.time_unix_ms < self.until_unix_ms)
            && (self.before_seq == 0 || e.seq < self.before_seq)
    }
}

/// One pass of `verify` over the chain, whatever holds the frames (the
/// trail's files or the database's rows): each frame checked in seq order
/// from the authenticated base, restores and the auditor's checkpoint
/// noted on the way, then the verdict.
struct ChainWalk {
    head_seq: u64,
    checkpoint: Option<(u64, [u8; 32])>,
    /// The hash before the next frame, and that frame's first seq.
    prev: [u8; 32],
    expect: u64,
    checked: u64,
    restores: Vec<RestoreMark>,
    note: Option<String>,
    seen_checkpoint: bool,
    next_report: u64,
}

impl ChainWalk {
    fn new(base: (u64, [u8; 32]), head_seq: u64, checkpoint: Option<(u64, [u8; 32])>) -> Self {
        Self {
            head_seq,
            checkpoint,
            prev: base.1,
            expect: base.0,
            checked: 0,
            restores: Vec::new(),
            note: None,
            // A checkpoint older than the retention window can no longer
            // be checked; the authenticated base stands in for it.
            seen_checkpoint: checkpoint.is_none_or(|(cs, _)| cs < base.0),
            next_report: 1 << 16,
        }
    }

    /// The verdict that the chain breaks at `seq`, for `why`.
    fn bad(&self, seq: u64, why: &str) -> Verification {
        Verification {
            ok: false,
            checked: self.checked,
            first_bad_seq: seq,
            head_seq: self.head_seq,
            head_hash: self.prev,
            reason: Some(why.to_string()),
            restores: Vec::new(),
            note: None,
        }
    }

    /// Checks the next frame; `Err` names the first bad seq and why (for
    /// [`ChainWalk::bad`]).
    fn frame(
        &mut self,
        keys: &log::Keys,
        frame: &log::RawFrame,
        progress: &mut impl FnMut(u64),
    ) -> std::result::Result<(), (u64, &'static str)> {
        if frame.first_seq != self.expect {
            return Err((self.expect, "sequence gap or reordering"));
        }
        let Some(events) = frame.open(keys, self.prev) else {
            return Err((self.expect, "event was modified"));
        };
        let end: [u8; 32] = events
            .last()
            .and_then(|e| e.hash.as_slice().try_into().ok())
            .unwrap_or(self.prev);
        if !crypto::ct_eq(&end, &frame.end_hash) {
            return Err((self.expect, "event was modified"));
        }
        self.restores
            .extend(events.iter().filter_map(RestoreMark::of));
        if let Some((cs, ch)) = self.checkpoint
            && (frame.first_seq..=frame.last_seq()).contains(&cs)
        {
            let e = &events[(cs - frame.first_seq) as usize];
            if !crypto::ct_eq(&ch, &e.hash) {
                // Taken before a restore, past the backup's head: that
                // stretch was lost with the restore, not tampered with.
                match self.restores.iter().rev().find(|r| r.backup_head_seq < cs) {
                    Some(r) => self.note = Some(restore_note(cs, r)),
                    None => return Err((cs, "checkpoint hash differs")),
                }
            }
            self.seen_checkpoint = true;
        }
        self.prev = end;
        self.expect += frame.count as u64;
        self.checked += frame.count as u64;
        if self.checked >= self.next_report {
            progress(self.checked);
            self.next_report += 1 << 16;
        }
        Ok(())
    }

    /// The verdict once every frame up to the head was read.
    fn finish(mut self, mut progress: impl FnMut(u64)) -> Verification {
        if self.expect <= self.head_seq {
            return self.bad(self.expect, "events missing at the tail");
        }
        if !self.seen_checkpoint
            && let Some((cs, _)) = self.checkpoint
            && let Some(r) = self.restores.iter().rev().find(|r| r.backup_head_seq < cs)
        {
            self.note = Some(restore_note(cs, r));
            self.seen_checkpoint = true;
        }
        if !self.seen_checkpoint {
            let cs = self.checkpoint.map_or(0, |c| c.0);
            return self.bad(cs, "chain no longer reaches the checkpoint (truncated)");
        }
        progress(self.checked);
        Verification {
            ok: true,
            checked: self.checked,
            first_bad_seq: 0,
            head_seq: self.head_seq,
            head_hash: self.prev,
            reason: None,
            restores: self.restores,
            note: self.note,
        }
    }
}

fn restore_note(cs: u64, r: &RestoreMark) -> String {
    format!(
        "checkpoint at seq {cs} was taken before the restore at seq {} (backup head seq {}): checked up to the backup's head",
        r.seq, r.backup_head_seq
    )
}

/// How long a caller waits for its event to be durable before the call
/// fails (UNAVAILABLE): a disk stuck after an I/O error must not hang it.
const DURABLE_TIMEOUT: Duration = Duration::from_secs(5);

// The writer does not linger for more events: an fdatasync of an append
// costs ~0.2 ms on the reference machine and events queue up while it runs;
// a 300 µs linger only added latency (BENCHMARKS.md).

type Waiter = oneshot::Sender<Result<(), String>>;

/// The chain's head and the events waiting for the writer, under one lock:
/// a failed write takes back every event chained after the durable head.
struct State {
    /// The last event handed out (maybe not yet durable).
    seq: u64,
    hash: [u8; 32],
    time: i64,
    /// The last durable event.
    durable: (u64, [u8; 32], i64),
    pending: Vec<AuditEvent>,
    waiters: Vec<Waiter>,
    closed: bool,
}

struct Shared {
    log: log::Log,
    state: Mutex<State>,
    wake: Condvar,
    /// Held by whoever writes a frame: the writer thread or a caller.
    committer: Mutex<()>,
    store: Storage,
    mirror: Option<Arc<Lines>>,
    stats: Arc<Stats>,
}

/// Where the trail lives: its own files beside the data (sled), or the
/// tables of the database every node shares (postgres).
enum Backing {
    Files(Arc<Shared>),
    Pg(Arc<pg::Trail>),
}

pub struct Audit {
    backing: Backing,
    /// The alert for a head gone backwards was raised.
    head_alerted: std::sync::atomic::AtomicBool,
    alert_file: Option<Arc<Lines>>,
    mirror: Option<Arc<Lines>>,
    stats: Arc<Stats>,
    /// What opening found: migration, a torn tail cut off.
    opened: Opened,
}

/// What opening the trail did.
#[derive(Debug, Default, Clone)]
pub struct Opened {
    /// Events moved from the format-1 trail (events in the key-value store).
    pub migrated: u64,
    pub torn_bytes: u64,
    pub reindexed: u32,
}

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Opens a JSON-lines file for appending, created 0600: it names who read
/// which record, which is no one else's business on the host. An existing
/// file readable by group or others is narrowed to 0600.
fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let meta = f.metadata()?;
    // Only a regular file is narrowed: a FIFO or a device (a log shipper's
    // pipe) keeps the modes its owner gave it.
    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "narrowing permissions to 0600");
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

/// A JSON-lines file (the mirror, the alert file) for a log shipper: one
/// whole line per write, reopened by path on SIGHUP so that logrotate can
/// move it away. A failed write is counted (`coffre_line_write_failures`)
/// and logged; the server raises an alert for it.
pub struct Lines {
    path: std::path::PathBuf,
    file: Mutex<File>,
    which: crate::stats::LineFile,
    stats: Arc<Stats>,
}

impl Lines {
    fn open(path: &Path, which: crate::stats::LineFile, stats: &Arc<Stats>) -> Result<Arc<Self>> {
        let file =
            open_append(path).map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            which,
            stats: stats.clone(),
        }))
    }

    /// Appends `lines` (each ending in a newline) in one write.
    fn write(&self, lines: &str) {
        if let Err(err) = self.file.lock().write_all(lines.as_bytes()) {
            self.stats.line_failed(self.which.clone());
            tracing::error!(error = %err, file = ?self.which, "line file write failed");
        }
    }

    /// Opens the path again (after logrotate moved the file away); on
    /// failure the old file is kept.
    fn reopen(&self) -> std::io::Result<()> {
        let f = open_append(&self.path)?;
        *self.file.lock() = f;
        Ok(())
    }
}

/// What every trail reports to besides itself: the core's counters, the
/// mirror file and the alert file.
struct Outlets {
    stats: Arc<Stats>,
    mirror: Option<Arc<Lines>>,
    alert_file: Option<Arc<Lines>>,
}

impl Outlets {
    fn open(mirror: Option<&Path>, alert_file: Option<&Path>) -> Result<Self> {
        let stats = Arc::new(Stats::default());
        let open = |p: Option<&Path>, which| p.map(|p| Lines::open(p, which, &stats)).transpose();
        Ok(Self {
            mirror: open(mirror, LineFile::mirror)?,
            alert_file: open(alert_file, LineFile::alert)?,
            stats,
        })
    }
}

/// The bytes the chain MACs for one event (everything but the hashes).
pub fn canonical(e: &AuditEvent) -> Vec<u8> {
    let mut c = Context::new("coffre/audit/v1");
    c.push(&e.seq.to_be_bytes())
        .push(&e.time_unix_ms.to_be_bytes())
        .push(e.tenant.as_bytes())
        .push(e.principal.as_bytes())
        .push(e.role.as_bytes())
        .push(e.action.as_bytes())
        .push(&(e.record_ids.len() as u64).to_be_bytes());
    for id in &e.record_ids {
        c.push(id.as_bytes());
    }
    c.push(&(e.fields.len() as u64).to_be_bytes());
    for f in &e.fields {
        c.push(f.as_bytes());
    }
    c.push(e.purpose.as_bytes())
        .push(e.outcome.as_bytes())
        .push(e.peer.as_bytes());
    c.as_bytes().to_vec()
}

/// The directory of the trail's files inside a data directory.
pub fn trail_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("audit")
}

impl Audit {
    /// Opens the trail of `data_dir` (migrating a format-1 trail from the
    /// key-value store first) and starts its writer.
    pub async fn open(
        store: Storage,
        key: SecretKey,
        data_dir: &Path,
        mirror: Option<&Path>,
        alert_file: Option<&Path>,
    ) -> Result<Self> {
        let dir = trail_dir(data_dir);
        let keys = log::Keys::new(key);
        let migrated = migrate::from_store(&store, &keys, &dir).await?;
        let (log, rec) = log::Log::open(&dir, keys, (1, GENESIS))?;
        if rec.torn_bytes > 0 {
            tracing::warn!(
                bytes = rec.torn_bytes,
                "audit trail: cut a torn last frame (a write interrupted by a crash, never acknowledged)"
            );
        }
        let head = (rec.head_seq, rec.head_hash, rec.head_time);
        let out = Outlets::open(mirror, alert_file)?;
        let shared = Arc::new(Shared {
            log,
            state: Mutex::new(State {
                seq: head.0,
                hash: head.1,
                time: head.2,
                durable: head,
                pending: Vec::new(),
                waiters: Vec::new(),
                closed: false,
            }),
            wake: Condvar::new(),
            committer: Mutex::new(()),
            store,
            mirror: out.mirror.clone(),
            stats: out.stats.clone(),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("coffre-audit".into())
            .spawn(move || s.writer())
            .map_err(|e| Error::Internal(format!("audit writer: {e}")))?;
        let opened = Opened {
            migrated,
            torn_bytes: rec.torn_bytes,
            reindexed: rec.reindexed,
        };
        Ok(Self::with(Backing::Files(shared), out, opened))
    }

    /// Opens the trail in the PostgreSQL database of `opts`.
    pub fn open_postgres(
        opts: &crate::store::PostgresOptions,
        store: Storage,
        key: SecretKey,
        mirror: Option<&Path>,
        alert_file: Option<&Path>,
    ) -> Result<Self> {
        let out = Outlets::open(mirror, alert_file)?;
        let trail = pg::Trail::open(opts, store, key, out.mirror.clone(), out.stats.clone())?;
        Ok(Self::with(Backing::Pg(trail), out, Opened::default()))
    }

    fn with(backing: Backing, out: Outlets, opened: Opened) -> Self {
        Self {
            backing,
            head_alerted: Default::default(),
            alert_file: out.alert_file,
            mirror: out.mirror,
            stats: out.stats,
            opened,
        }
    }

    /// The files' shared state, or the trail in the database.
    fn files(&self) -> std::result::Result<&Arc<Shared>, &Arc<pg::Trail>> {
        match &self.backing {
            Backing::Files(s) => Ok(s),
            Backing::Pg(t) => Err(t),
        }
    }

    /// Re-reads the database's head (postgres), so that a head gone
    /// backwards stops the trail even on a node with nothing to write. The
    /// first time it is seen, a critical alert goes to the alert file (the
    /// trail itself can take no event then).
    pub fn check_head(&self) -> Result<()> {
        let Err(t) = self.files() else {
            return Ok(());
        };
        let r = t.head_now().map(|_| ());
        if t.diverged()
            && !self
                .head_alerted
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            self.alert_outside_trail(
                "trail_head_moved_backwards",
                "the audit trail's head moved backwards in the database (a failover to a standby that lacked acknowledged events?): this node refuses every call until restarted",
            );
        }
        r
    }

    /// An alert the trail cannot take: to the log and the alert file only.
    fn alert_outside_trail(&self, kind: &str, detail: &str) {
        tracing::error!(kind, "critical alert: {detail}");
        if let Some(f) = &self.alert_file {
            let a = Alert {
                seq: 0,
                time_unix_ms: now_ms(),
                severity: Severity::Critical.as_str().into(),
                tenant: String::new(),
                principal: String::new(),
                kind: kind.into(),
                detail: detail.into(),
            };
            f.write(&format!("{}\n", alert_json(&a)));
        }
    }

    /// What the core counted (appends, throttles, locks, hits).
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Reopens the mirror and alert files by path (SIGHUP, after
    /// logrotate). A file that cannot be opened keeps the old one; the
    /// error names the path.
    pub fn reopen_files(&self) -> std::result::Result<(), String> {
        for l in self.mirror.iter().chain(&self.alert_file) {
            l.reopen()
                .map_err(|e| format!("{}: {e}", l.path.display()))?;
        }
        Ok(())
    }

    /// Whether the trail stopped because the database's head went
    /// backwards (postgres only).
    pub fn diverged(&self) -> bool {
        matches!(&self.backing, Backing::Pg(t) if t.diverged())
    }

    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// The head: the last durable event's seq and hash.
    pub fn head(&self) -> (u64, [u8; 32]) {
        let shared = match self.files() {
            Ok(s) => s,
            Err(t) => return t.head(),
        };
        let d = shared.state.lock().durable;
        (d.0, d.1)
    }

    /// Bytes of the trail's files on disk (indexes included).
    pub fn disk_bytes(&self) -> u64 {
        match self.files() {
            Ok(s) => s.log.disk_bytes(),
            Err(_) => 0,
        }
    }

    /// Chains one event and returns once it is durable, with the seq and
    /// time it was given. An error means the event is not stored: the
    /// caller must fail the RPC.
    pub async fn record(&self, e: AuditEvent) -> Result<Recorded> {
        self.append(e, None).await
    }

    /// [`Audit::record`] keeping the event's own `time_unix_ms` when it is
    /// not before the head's: for generating a trail that spans days in a
    /// benchmark, and for imports. No service calls it.
    pub async fn record_dated(&self, e: AuditEvent) -> Result<Recorded> {
        let t = e.time_unix_ms;
        self.append(e, Some(t)).await
    }

    async fn append(&self, e: AuditEvent, at: Option<i64>) -> Result<Recorded> {
        let started = std::time::Instant::now();
        let r = self.append_timed(e, at).await;
        match &r {
            Ok(_) => self
                .stats
                .audit_append_seconds
                .observe(started.elapsed().as_secs_f64()),
            Err(_) => {
                self.stats.audit_append_failures.inc();
            }
        }
        r
    }

    async fn append_timed(&self, mut e: AuditEvent, at: Option<i64>) -> Result<Recorded> {
        let shared = match self.files() {
            Ok(s) => s,
            // The database's clock stamps events: `at` does not apply.
            Err(t) => return t.append(e).await,
        };
        let (tx, rx) = oneshot::channel();
        // The event moves to the writer; the caller keeps what it was given.
        let recorded = {
            let mut st = shared.state.lock();
            if st.closed {
                return Err(Error::Unavailable(StorageError::Closed));
            }
            e.seq = st.seq + 1;
            // Time never goes backwards in the trail: a time range is a
            // seq range.
            e.time_unix_ms = at.unwrap_or_else(now_ms).max(st.time);
            e.prev_hash = st.hash.to_vec();
            let hash = log::chain_hash(shared.log.keys().chain(), &st.hash, &e);
            e.hash = hash.to_vec();
            st.seq = e.seq;
            st.hash = hash;
            st.time = e.time_unix_ms;
            let recorded = Recorded {
                seq: e.seq,
                time_unix_ms: e.time_unix_ms,
            };
            st.pending.push(e);
            st.waiters.push(tx);
            recorded
        };
        shared.wake.notify_one();
        match tokio::time::timeout(DURABLE_TIMEOUT, rx).await {
            Ok(Ok(Ok(()))) => Ok(recorded),
            Ok(Ok(Err(msg))) => Err(Error::Unavailable(StorageError::Io(msg))),
            Ok(Err(_)) => Err(Error::Unavailable(StorageError::Closed)),
            Err(_) => {
                shared.store.note_failure();
                Err(Error::Unavailable(StorageError::Io(format!(
                    "audit write did not finish within {} s",
                    DURABLE_TIMEOUT.as_secs()
                ))))
            }
        }
    }

    /// Raises an alert: an audit event (action `alert/<kind>`, outcome the
    /// severity, `purpose` the detail) and a JSON line in `alert_file`.
    /// `detail` must name no value: counts and durations only.
    pub async fn alert(
        &self,
        severity: Severity,
        kind: &str,
        tenant: &str,
        principal: &str,
        detail: String,
    ) -> Result<()> {
        let e = AuditEvent {
            tenant: tenant.into(),
            principal: principal.into(),
            purpose: detail,
            ..Default::default()
        };
        self.alert_event(severity, kind, e).await.map(|_| ())
    }

    /// [`Audit::alert`] of a whole event (with record ids or fields):
    /// action and outcome are set here.
    pub async fn alert_event(
        &self,
        severity: Severity,
        kind: &str,
        mut e: AuditEvent,
    ) -> Result<Recorded> {
        e.action = format!("alert/{kind}");
        e.outcome = severity.as_str().into();
        let mut a = event_to_alert(&e);
        let principal = e.principal.clone();
        let r = self.record(e).await?;
        (a.seq, a.time_unix_ms) = (r.seq, r.time_unix_ms);
        tracing::warn!(kind, severity = severity.as_str(), principal, "alert");
        if let Some(f) = &self.alert_file {
            f.write(&format!("{}\n", alert_json(&a)));
        }
        Ok(r)
    }

    /// Alerts since `since_unix_ms`, limited to `scope` when given, each
    /// passed to `emit` (oldest first) until it returns false.
    pub fn alerts_each(
        &self,
        since_unix_ms: i64,
        scope: Option<&str>,
        mut emit: impl FnMut(Alert) -> bool,
    ) -> Result<()> {
        let q = Query {
            scope: scope.map(str::to_string),
            since_unix_ms,
            alerts_only: true,
            ..Default::default()
        };
        self.query_each(&q, |e| emit(event_to_alert(&e)))
    }

    /// Alerts since `since_unix_ms` (collected: for tests and small calls).
    pub fn alerts(&self, since_unix_ms: i64, scope: Option<&str>) -> Result<Vec<Alert>> {
        let mut out = Vec::new();
        self.alerts_each(since_unix_ms, scope, |a| {
            out.push(a);
            true
        })?;
        Ok(out)
    }

    /// Recomputes the whole chain; names the first sequence number that
    /// fails. `checkpoint` (seq, hash) is a head the auditor kept elsewhere:
    /// the chain must still reach it.
    pub fn verify(&self, checkpoint: Option<(u64, [u8; 32])>) -> Result<Verification> {
        self.verify_with(checkpoint, |_| {})
    }

    /// [`Audit::verify`], calling `progress` with the events checked so far
    /// every 65,536 events. Reads one frame at a time: constant memory.
    pub fn verify_with(
        &self,
        checkpoint: Option<(u64, [u8; 32])>,
        mut progress: impl FnMut(u64),
    ) -> Result<Verification> {
        let shared = match self.files() {
            Ok(s) => s,
            Err(t) => return t.verify_with(checkpoint, progress),
        };
        let head = shared.state.lock().durable;
        let log = &shared.log;
        let keys = log.keys();
        let metas = log.metas();
        let mut walk = ChainWalk::new((metas[0].first_seq, metas[0].prev_hash), head.0, checkpoint);
        'segments: for meta in &metas {
            let view = log.view(meta)?;
            match log::read_segment_header(keys, &view.file) {
                Ok((first, p)) => {
                    if first != walk.expect {
                        return Ok(walk.bad(walk.expect, "sequence gap or reordering"));
                    }
                    if p != walk.prev {
                        return Ok(walk.bad(walk.expect, "previous hash does not match"));
                    }
                }
                Err(_) => return Ok(walk.bad(walk.expect, "segment header fails its MAC")),
            }
            let mut offset = log::HEADER_LEN;
            loop {
                if walk.expect > head.0 {
                    // Events appended while we read are for the next run.
                    break 'segments;
                }
                let frame = match log::read_frame(&view.file, offset, view.len) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(log::FrameError::Io(e)) => {
                        return Err(Error::Unavailable(StorageError::Io(e.to_string())));
                    }
                    Err(_) => return Ok(walk.bad(walk.expect, "frame damaged")),
                };
                offset = frame.next;
                if let Err((seq, why)) = walk.frame(keys, &frame, &mut progress) {
                    return Ok(walk.bad(seq, why));
                }
            }
        }
        Ok(walk.finish(progress))
    }

    /// A snapshot of the trail for a backup: its durable head now, and the
    /// segments that hold it, which retention leaves in place until the
    /// snapshot is dropped. Cheap: taken inside a backup's write barrier.
    pub fn snapshot(&self) -> Result<TrailSnapshot> {
        let shared = self.files().map_err(|_| {
            Error::FailedPrecondition(
                "backups of a PostgreSQL vault are not in this release: back up the database (pg_dump, pgBackRest)".into(),
            )
        })?;
        let hold = shared.log.hold();
        let (head_seq, head_hash) = self.head();
        Ok(TrailSnapshot {
            head_seq,
            head_hash,
            segments: shared.log.metas(),
            _hold: hold,
        })
    }

    /// Closes the segment being written, so that retention can drop it
    /// whole once all its events are past `retention_days`.
    pub fn seal(&self) -> Result<()> {
        match self.files() {
            Ok(s) => Ok(s.log.seal_now()?),
            // Rows go one frame at a time: nothing to close.
            Err(_) => Ok(()),
        }
    }

    /// Drops the events older than `before_unix_ms`, whole segments at a
    /// time (so up to one segment more is kept), and closes the segment
    /// being written once it holds events that are due, so that the next
    /// run can drop it. What scrub needs of the dropped events (each
    /// record's latest write) is kept aside first. The kept chain verifies
    /// from the first kept segment's authenticated header. Returns how many
    /// events went.
    pub async fn prune(&self, before_unix_ms: i64) -> Result<u64> {
        let shared = match self.files() {
            Ok(s) => s,
            Err(t) => return t.prune(before_unix_ms).await,
        };
        let mut dropped = 0;
        while let Some(meta) = shared.log.oldest_due(before_unix_ms) {
            // What scrub needs of it is kept aside, durably, before it goes.
            let s2 = shared.clone();
            let m2 = meta.clone();
            let latest = tokio::task::spawn_blocking(move || {
                let view = s2.log.view(&m2)?;
                retained::collect_latest_writes(s2.log.keys(), &view)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
            retained::keep_latest_writes(&shared.store, shared.log.keys(), latest).await?;
            dropped += shared.log.drop_oldest(&meta)?;
        }
        let active = shared.log.active_view();
        if !active.meta.is_empty() && active.meta.first_time < before_unix_ms {
            let s2 = shared.clone();
            tokio::task::spawn_blocking(move || s2.log.seal_now())
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
        }
        Ok(dropped)
    }

    /// Events matching `q`, oldest first unless `q.newest_first`, each
    /// passed to `emit` until it returns false. Looks events up by the most
    /// selective filter it has (record id, principal, alerts, tenant: keyed
    /// hashes in the segments' indexes) or reads the seq range a time range
    /// covers: O(log n + results) per segment touched, one frame's events
    /// in memory at a time.
    pub fn query_each(&self, q: &Query, mut emit: impl FnMut(AuditEvent) -> bool) -> Result<()> {
        let shared = match self.files() {
            Ok(s) => s,
            Err(t) => {
                let key = if !q.record_id.is_empty() {
                    Some(log::Key::Record(&q.record_id))
                } else if !q.principal.is_empty() {
                    Some(log::Key::Principal(&q.principal))
                } else if q.alerts_only {
                    Some(log::Key::Alert)
                } else if !q.tenant.is_empty() {
                    Some(log::Key::Tenant(&q.tenant))
                } else {
                    q.scope.as_deref().map(log::Key::Tenant)
                };
                return t.query_each(q, key, emit);
            }
        };
        let log = &shared.log;
        let keys = log.keys();
        let durable = shared.state.lock().durable.0;
        let upper = match q.before_seq {
            0 => durable,
            b => durable.min(b - 1),
        };
        let tenant = if q.tenant.is_empty() {
            q.scope.as_deref()
        } else {
            Some(q.tenant.as_str())
        };
        let key = if !q.record_id.is_empty() {
            Some(keys.index(log::Key::Record(&q.record_id)))
        } else if !q.principal.is_empty() {
            Some(keys.index(log::Key::Principal(&q.principal)))
        } else if q.alerts_only {
            Some(keys.index(log::Key::Alert))
        } else {
            tenant.map(|t| keys.index(log::Key::Tenant(t)))
        };
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let mut sent = 0usize;
        let mut metas: Vec<_> = log
            .metas()
            .into_iter()
            .filter(|m| {
                !m.is_empty()
                    && m.first_seq <= upper
                    && (q.since_unix_ms == 0 || m.last_time >= q.since_unix_ms)
                    && (q.until_unix_ms == 0 || m.first_time < q.until_unix_ms)
            })
            .collect();
        if q.newest_first {
            metas.reverse();
        }
        for meta in metas {
            let view = log.view(&meta)?;
            let wanted = match key {
                Some(k) => {
                    let mut s = log.lookup(&view, k)?;
                    s.retain(|&seq| seq <= upper);
                    if s.is_empty() {
                        continue;
                    }
                    Some(s)
                }
                None => None,
            };
            // Blocks between marks, in the order asked, skipping those
            // outside the time range or holding no wanted seq.
            let marks = view.marks();
            let mut blocks: Vec<usize> = (0..marks.len()).collect();
            if q.newest_first {
                blocks.reverse();
            }
            for b in blocks {
                let m = marks[b];
                let end_seq = marks.get(b + 1).map_or(u64::MAX, |n| n.seq);
                let end_time = marks.get(b + 1).map_or(i64::MAX, |n| n.time);
                if m.seq > upper
                    || (q.until_unix_ms != 0 && m.time >= q.until_unix_ms)
                    || (q.since_unix_ms != 0 && end_time < q.since_unix_ms)
                {
                    continue;
                }
                let in_block = wanted.as_ref().map(|w| {
                    let lo = w.partition_point(|&s| s < m.seq);
                    let hi = w.partition_point(|&s| s < end_seq);
                    &w[lo..hi]
                });
                if in_block.is_some_and(|s| s.is_empty()) {
                    continue;
                }
                let last_wanted = in_block.map_or(end_seq.min(upper + 1) - 1, |s| s[s.len() - 1]);
                let mut found = Vec::new();
                let mut failed = false;
                view.frames(m, |frame, prev| {
                    if frame.first_seq > last_wanted {
                        return false;
                    }
                    let touches = in_block.is_none_or(|s| {
                        let lo = s.partition_point(|&x| x < frame.first_seq);
                        s.get(lo).is_some_and(|&x| x <= frame.last_seq())
                    });
                    if !touches {
                        return true;
                    }
                    match frame.open(keys, prev) {
                        Some(events) => {
                            found.extend(events.into_iter().filter(|e| {
                                e.seq <= upper
                                    && in_block.is_none_or(|s| s.binary_search(&e.seq).is_ok())
                                    && q.matches(e)
                            }));
                            true
                        }
                        None => {
                            failed = true;
                            false
                        }
                    }
                })?;
                if failed {
                    return Err(Error::DataLoss);
                }
                if q.newest_first {
                    found.reverse();
                }
                for e in found {
                    if !emit(e) {
                        return Ok(());
                    }
                    sent += 1;
                    if sent >= limit {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Events matching `q`, collected (for tests and small answers; the
    /// services stream with [`Audit::query_each`]).
    pub fn query(&self, q: &Query) -> Result<Vec<AuditEvent>> {
        let mut out = Vec::new();
        self.query_each(q, |e| {
            out.push(e);
            true
        })?;
        Ok(out)
    }

    /// The latest write (Put or Delete, outcome ok) of `tenant`'s record
    /// `id` the trail holds: from the kept events, else from what pruning
    /// kept aside.
    pub async fn latest_write(&self, tenant: &str, id: &str) -> Result<Option<LatestWrite>> {
        let mut last = None;
        self.query_each(
            &Query {
                tenant: tenant.into(),
                record_id: id.into(),
                outcome: "ok".into(),
                newest_first: true,
                ..Default::default()
            },
            |e| match LatestWrite::of(&e) {
                Some(w) => {
                    last = Some(w);
                    false
                }
                None => true,
            },
        )?;
        match last {
            Some(w) => Ok(Some(w)),
            None => match self.files() {
                Ok(s) => retained::lookup(&s.store, s.log.keys(), tenant, id).await,
                Err(t) => t.retained(tenant, id).await,
            },
        }
    }
}

/// What the trail says exists: the records whose latest write it holds
/// (in the kept trail, else among the writes pruning kept aside) is a Put.
#[derive(Debug, Default)]
pub struct Written {
    /// `(tenant, record id)`.
    pub records: Vec<(String, String)>,
    /// Kept-aside writes that do not name their record (kept by an
    /// earlier release): those records are checked only from the store's
    /// side.
    pub unnamed: u64,
}

impl Audit {
    /// Walks the kept trail newest first, then the writes kept aside, for
    /// every record whose latest write is a Put. The walk reads the whole
    /// trail (off the runtime's workers); memory is one entry per record
    /// the trail has seen written.
    pub async fn records_written(self: &Arc<Self>) -> Result<Written> {
        let me = self.clone();
        let (seen, mut records) = tokio::task::spawn_blocking(move || {
            let mut seen = std::collections::HashSet::<(String, String)>::new();
            let mut live = Vec::new();
            me.query_each(
                &Query {
                    outcome: "ok".into(),
                    newest_first: true,
                    ..Default::default()
                },
                |e| {
                    if let Some(w) = LatestWrite::of(&e) {
                        for id in &e.record_ids {
                            let k = (e.tenant.clone(), id.clone());
                            if !seen.contains(&k) {
                                if !w.deleted {
                                    live.push(k.clone());
                                }
                                seen.insert(k);
                            }
                        }
                    }
                    true
                },
            )
            .map(|()| (seen, live))
        })
        .await
        .map_err(|e| Error::Internal(format!("trail walk: {e}")))??;
        let (kept, unnamed) = match self.files() {
            Ok(s) => retained::all(&s.store, s.log.keys()).await?,
            Err(t) => t.retained_all().await?,
        };
        for (tenant, id, w) in kept {
            if !w.deleted && !seen.contains(&(tenant.clone(), id.clone())) {
                records.push((tenant, id));
            }
        }
        Ok(Written { records, unnamed })
    }
}

/// Where [`Audit::record`] put an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub seq: u64,
    pub time_unix_ms: i64,
}

/// A record's last write as the trail tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestWrite {
    pub seq: u64,
    pub deleted: bool,
    /// `version=N` of the PutRecord event, if noted.
    pub version: Option<String>,
    /// `write=<hex>` of the PutRecord event, if noted.
    pub write_id: Option<String>,
}

impl LatestWrite {
    /// The write `e` is, if it is one (a successful Put or Delete).
    pub fn of(e: &AuditEvent) -> Option<Self> {
        let deleted = match e.action.as_str() {
            "coffre.v1.Records/PutRecord" => false,
            "coffre.v1.Records/DeleteRecord" => true,
            _ => return None,
        };
        if e.outcome != "ok" {
            return None;
        }
        let noted = |key: &str| {
            e.fields
                .iter()
                .find_map(|f| f.strip_prefix(key).map(str::to_string))
        };
        Some(Self {
            seq: e.seq,
            deleted,
            version: noted("version="),
            write_id: noted("write="),
        })
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        match &self.backing {
            Backing::Files(shared) => {
                shared.state.lock().closed = true;
                shared.wake.notify_all();
            }
            Backing::Pg(t) => t.close(),
        }
    }
}

impl Shared {
    /// The writer: takes every pending event, writes them as one frame with
    /// one fdatasync, then answers their callers. A failed write takes back
    /// every event chained since the durable head, so the chain in memory
    /// never runs ahead of the one on disk.
    fn writer(&self) {
        loop {
            {
                let mut st = self.state.lock();
                while st.pending.is_empty() && !st.closed {
                    self.wake.wait(&mut st);
                }
                if st.pending.is_empty() {
                    return;
                }
            }
            let _turn = self.committer.lock();
            self.commit_pending();
        }
    }

    /// Takes every pending event, writes them, answers their callers.
    /// Returns false when nothing was pending. Call with `committer` held.
    fn commit_pending(&self) -> bool {
        let (events, waiters) = {
            let mut st = self.state.lock();
            if st.pending.is_empty() {
                return false;
            }
            (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.waiters),
            )
        };
        let result = self
            .store
            .admit(Space::Audit)
            .and_then(|()| self.log.append(&events));
        match result {
            Ok(()) => {
                self.stats
                    .audit_group_commit_events
                    .observe(events.len() as f64);
                // The mirror line before the answer: a caller that reads the
                // mirror after its call finds its event there. The trail has
                // the events already; a mirror failure is counted and
                // alerted, not fatal, and `verify --mirror` shows the gap.
                if let Some(m) = &self.mirror {
                    m.write(&mirror_lines(&events));
                }
                // Visible to queries only now: whatever a query returns is in
                // the mirror already.
                let last = events.last().expect("not empty");
                {
                    let mut st = self.state.lock();
                    st.durable = (
                        last.seq,
                        last.hash.as_slice().try_into().unwrap_or([0; 32]),
                        last.time_unix_ms,
                    );
                }
                for w in waiters {
                    let _ = w.send(Ok(()));
                }
            }
            Err(e) => {
                self.store.note_failure();
                let msg = e.to_string();
                let later = {
                    let mut st = self.state.lock();
                    let (seq, hash, time) = st.durable;
                    st.seq = seq;
                    st.hash = hash;
                    st.time = time;
                    st.pending.clear();
                    std::mem::take(&mut st.waiters)
                };
                for w in waiters.into_iter().chain(later) {
                    let _ = w.send(Err(msg.clone()));
                }
            }
        }
        true
    }
}

fn event_to_alert(e: &AuditEvent) -> Alert {
    Alert {
        seq: e.seq,
        time_unix_ms: e.time_unix_ms,
        severity: e.outcome.clone(),
        tenant: e.tenant.clone(),
        principal: e.principal.clone(),
        kind: e.action.trim_start_matches("alert/").to_string(),
        detail: e.purpose.clone(),
    }
}

/// One alert as a JSON object.
pub fn alert_json(a: &Alert) -> serde_json::Value {
    serde_json::json!({
        "seq": a.seq,
        "time_unix_ms": a.time_unix_ms,
        "severity": a.severity,
        "tenant": a.tenant,
        "principal": a.principal,
        "kind": a.kind,
        "detail": a.detail,
    })
}

/// Events as mirror lines, one JSON object each.
fn mirror_lines(events: &[AuditEvent]) -> String {
    let mut lines = String::new();
    for e in events {
        lines.push_str(&to_json(e).to_string());
        lines.push('\n');
    }
    lines
}

/// One event as a JSON object (hashes in hex), for the mirror and exports.
pub fn to_json(e: &AuditEvent) -> serde_json::Value {
    serde_json::json!({
        "seq": e.seq,
        "time_unix_ms": e.time_unix_ms,
        "tenant": e.tenant,
        "principal": e.principal,
        "role": e.role,
        "action": e.action,
        "record_ids": e.record_ids,
        "fields": e.fields,
        "purpose": e.purpose,
        "outcome": e.outcome,
        "peer": e.peer,
        "prev_hash": hex::encode(&e.prev_hash),
        "hash": hex::encode(&e.hash),
    })
}
