//! The trail's files: an append-only log of segments in `<data_dir>/audit/`.
//!
//! A segment (`<first seq>.seg`, at most [`SEGMENT_BYTES`] before the next
//! one starts) is a header and frames. The header names the segment's first
//! seq and the chain hash it continues from, under a MAC of the audit key,
//! so that the kept part of a pruned trail still verifies from an
//! authenticated base. A frame is one group commit: the events appended
//! together, encrypted as one AES-256-GCM message (the contents of the trail
//! are no one's to read from a copy of the disk), written with one
//! `write` and one `fdatasync`. Its clear head holds only its first seq, its
//! event count and the chain hash after its last event (an HMAC output).
//!
//! Beside each segment that is full, `<first seq>.idx` holds what finding an
//! event needs without scanning: marks every [`MARK_EVERY`] bytes (seq,
//! offset, time, the chain hash before it) and the segment's index entries,
//! sorted: an 8-byte keyed hash (HMAC under a key derived from the audit
//! key, like the blind index) of a record id, a principal, a tenant or "an
//! alert", and the event's seq. The segment being written keeps the same in
//! memory and rebuilds it from its frames at open. An index file is derived
//! data: a missing or damaged one is rebuilt from its segment.

use std::{
    fs::File,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use parking_lot::{Mutex, RwLock};
use prost::Message;

use super::codec::{self, FrameBody};
use crate::{
    crypto::{self, Aead256, Context, SecretKey},
    pb::AuditEvent,
    store::StorageError,
};

/// The version of the trail's files.
pub const TRAIL_FORMAT: u32 = 2;
/// A segment is closed and indexed once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 16 << 20;
/// Distance between marks: how far a lookup reads past the event it wants.
const MARK_EVERY: u64 = 32 << 10;
/// Events per frame at most (a group commit larger than this writes several).
pub(super) const FRAME_EVENTS: usize = 1024;

const SEG_MAGIC: &[u8; 8] = b"COFFRE-T";
const IDX_MAGIC: &[u8; 8] = b"COFFRE-I";
const SEG_HEADER: u64 = 8 + 4 + 4 + 8 + 32 + 32;
/// `len u32 ‖ first_seq u64 ‖ count u32 ‖ end_hash [32]`; `len` counts
/// what follows it.
const FRAME_HEAD: usize = 4 + 8 + 4 + 32;
const IDX_HEADER: u64 = 8 + 4 + 4 + 8 * 6;
const MARK_LEN: usize = 8 + 8 + 8 + 32;
const ENTRY_LEN: usize = 12;
/// A frame larger than this is damage, not a frame.
const FRAME_MAX: u32 = 64 << 20;

/// The chain: `hash_n = HMAC-SHA256(audit_key, hash_{n-1} ‖ canonical(event_n))`.
pub fn chain_hash(key: &SecretKey, prev: &[u8], e: &AuditEvent) -> [u8; 32] {
    let mut data = prev.to_vec();
    data.extend_from_slice(&super::canonical(e));
    crypto::hmac_sha256(key, &data)
}

/// What an index entry names.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    Record(&'a str),
    Principal(&'a str),
    Tenant(&'a str),
    Alert,
}

/// The keys of the trail, all from the audit key.
pub struct Keys {
    chain: SecretKey,
    enc: Aead256,
    index: SecretKey,
}

impl Keys {
    pub fn new(audit_key: SecretKey) -> Self {
        Self {
            enc: crypto::derive_key(&audit_key, "coffre/audit/frames/v2").aead(),
            index: crypto::derive_key(&audit_key, "coffre/audit/index/v2"),
            chain: audit_key,
        }
    }

    pub fn chain(&self) -> &SecretKey {
        &self.chain
    }

    pub fn aead(&self) -> &Aead256 {
        &self.enc
    }

    /// The keyed hash an index entry stores for `k`.
    pub fn index(&self, k: Key<'_>) -> u64 {
        let (tag, v) = match k {
            Key::Record(v) => (b'r', v),
            Key::Principal(v) => (b'p', v),
            Key::Tenant(v) => (b't', v),
            Key::Alert => (b'a', ""),
        };
        let c = Context::new("coffre/audit-index/v2")
            .with(&[tag])
            .with(v.as_bytes());
        let h = crypto::hmac_sha256(&self.index, c.as_bytes());
        u64::from_be_bytes(h[..8].try_into().expect("8 of 32 bytes"))
    }

    pub(super) fn entries(&self, e: &AuditEvent, out: &mut Vec<u64>) {
        for id in &e.record_ids {
            out.push(self.index(Key::Record(id)));
        }
        if !e.principal.is_empty() {
            out.push(self.index(Key::Principal(&e.principal)));
        }
        if !e.tenant.is_empty() {
            out.push(self.index(Key::Tenant(&e.tenant)));
        }
        if e.action.starts_with("alert/") {
            out.push(self.index(Key::Alert));
        }
    }

    pub(super) fn segment_mac(&self, first_seq: u64, prev: &[u8; 32]) -> [u8; 32] {
        let c = Context::new("coffre/audit-segment/v2")
            .with(&TRAIL_FORMAT.to_be_bytes())
            .with(&first_seq.to_be_bytes())
            .with(prev);
        crypto::hmac_sha256(&self.chain, c.as_bytes())
    }

    fn frame_aad(first_seq: u64, count: u32, end_hash: &[u8]) -> Vec<u8> {
        Context::new("coffre/audit-frame/v2")
            .with(&first_seq.to_be_bytes())
            .with(&count.to_be_bytes())
            .with(end_hash)
            .as_bytes()
            .to_vec()
    }
}

/// A place frames can be read from: the frame that starts at `offset`,
/// whose first event is `seq`, at `time`, chained from `hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub seq: u64,
    pub offset: u64,
    pub time: i64,
    pub hash: [u8; 32],
}

/// What is known of a segment without reading it.
#[derive(Debug, Clone)]
pub struct SegMeta {
    pub first_seq: u64,
    /// The chain hash before `first_seq` (authenticated by the header MAC).
    pub prev_hash: [u8; 32],
    /// `first_seq - 1` while empty.
    pub last_seq: u64,
    pub first_time: i64,
    pub last_time: i64,
    pub path: PathBuf,
}

impl SegMeta {
    fn idx_path(&self) -> PathBuf {
        self.path.with_extension("idx")
    }
    pub fn is_empty(&self) -> bool {
        self.last_seq < self.first_seq
    }
}

/// The segment being written, with its index in memory.
struct Active {
    meta: SegMeta,
    file: Arc<File>,
    /// Bytes durable and readable.
    len: u64,
    marks: Vec<Mark>,
    entries: Vec<(u64, u32)>,
    head_hash: [u8; 32],
    head_time: i64,
}

/// One frame as read from disk, not yet opened.
pub struct RawFrame {
    pub offset: u64,
    pub first_seq: u64,
    pub count: u32,
    pub end_hash: [u8; 32],
    pub sealed: Vec<u8>,
    /// Offset of the next frame.
    pub next: u64,
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The file ends inside the frame (a torn write).
    Short,
    /// The frame's length is impossible.
    Garbled,
    Io(std::io::Error),
}

/// Reads the frame at `offset` of a segment of `len` bytes.
pub fn read_frame(file: &File, offset: u64, len: u64) -> Result<Option<RawFrame>, FrameError> {
    if offset >= len {
        return Ok(None);
    }
    if offset + FRAME_HEAD as u64 > len {
        return Err(FrameError::Short);
    }
    let mut head = [0u8; FRAME_HEAD];
    file.read_exact_at(&mut head, offset)
        .map_err(FrameError::Io)?;
    let body_len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    if body_len < (FRAME_HEAD - 4) as u32 || body_len > FRAME_MAX {
        return Err(FrameError::Garbled);
    }
    let next = offset + 4 + body_len as u64;
    if next > len {
        return Err(FrameError::Short);
    }
    let mut sealed = vec![0u8; body_len as usize - (FRAME_HEAD - 4)];
    file.read_exact_at(&mut sealed, offset + FRAME_HEAD as u64)
        .map_err(FrameError::Io)?;
    Ok(Some(RawFrame {
        offset,
        first_seq: u64::from_le_bytes(head[4..12].try_into().expect("8 bytes")),
        count: u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")),
        end_hash: head[16..48].try_into().expect("32 bytes"),
        sealed,
        next,
    }))
}

impl RawFrame {
    /// The frame's events, with seqs and the hashes of the chain from
    /// `prev` (the hash before its first event). `None` when the frame
    /// fails authentication.
    pub fn open(&self, keys: &Keys, prev: [u8; 32]) -> Option<Vec<AuditEvent>> {
        let aad = Keys::frame_aad(self.first_seq, self.count, &self.end_hash);
        let plain = keys.enc.open(&aad, &self.sealed).ok()?;
        let body = FrameBody::decode(&plain[..]).ok()?;
        if body.events.len() != self.count as usize {
            return None;
        }
        let mut prev = prev;
        let mut out = Vec::with_capacity(body.events.len());
        for (i, s) in body.events.into_iter().enumerate() {
            let mut e = codec::decode(s, body.time, self.first_seq + i as u64);
            let h = chain_hash(&keys.chain, &prev, &e);
            e.prev_hash = prev.to_vec();
            e.hash = h.to_vec();
            prev = h;
            out.push(e);
        }
        Some(out)
    }

    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.count as u64 - 1
    }
}

/// A segment as a reader sees it at one moment.
pub struct SegView {
    pub meta: SegMeta,
    pub file: Arc<File>,
    pub len: u64,
    marks: Arc<Vec<Mark>>,
    index: IndexView,
}

enum IndexView {
    /// The segment being written: its entries are read in place, under the
    /// log's lock ([`Log::lookup`]), never copied per query.
    Active,
    /// A closed segment's entries while its index file is being written.
    Memory(Arc<Vec<(u64, u32)>>),
    /// A sealed segment's index file: entries sorted from `at`.
    File { file: File, at: u64, n: u64 },
}

impl SegView {
    pub fn marks(&self) -> &[Mark] {
        &self.marks
    }

    /// Seqs of this segment with an entry for `key`, ascending (the
    /// segment being written answers through [`Log::lookup`]).
    fn lookup(&self, key: u64) -> Result<Vec<u64>, StorageError> {
        let first = self.meta.first_seq;
        let mut out: Vec<u64> = match &self.index {
            IndexView::Active => {
                return Err(StorageError::Corrupt(
                    "active segment looked up without its log",
                ));
            }
            IndexView::Memory(entries) => entries
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, d)| first + *d as u64)
                .collect(),
            IndexView::File { file, at, n } => {
                let read = |i: u64| -> Result<(u64, u32), StorageError> {
                    let mut b = [0u8; ENTRY_LEN];
                    file.read_exact_at(&mut b, at + i * ENTRY_LEN as u64)
                        .map_err(io)?;
                    Ok((
                        u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
                        u32::from_be_bytes(b[8..].try_into().expect("4 bytes")),
                    ))
                };
                let (mut lo, mut hi) = (0u64, *n);
                while lo < hi {
                    let mid = (lo + hi) / 2;
                    if read(mid)?.0 < key {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                let mut out = Vec::new();
                // Matching entries are contiguous: read them in chunks.
                let mut i = lo;
                'chunks: while i < *n {
                    let take = (*n - i).min(1024);
                    let mut buf = vec![0u8; take as usize * ENTRY_LEN];
                    file.read_exact_at(&mut buf, at + i * ENTRY_LEN as u64)
                        .map_err(io)?;
                    for c in buf.chunks_exact(ENTRY_LEN) {
                        if u64::from_be_bytes(c[..8].try_into().expect("8 bytes")) != key {
                            break 'chunks;
                        }
                        out.push(first + u32::from_be_bytes(c[8..].try_into().expect("4")) as u64);
                    }
                    i += take;
                }
                out
            }
        };
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Frames from `from` on, with the chain hash before each, until `f`
    /// says stop or the segment ends. A frame that fails is passed as
    /// `None` (its events cannot be read).
    pub fn frames(
        &self,
        from: Mark,
        mut f: impl FnMut(&RawFrame, [u8; 32]) -> bool,
    ) -> Result<(), StorageError> {
        let mut offset = from.offset;
        let mut prev = from.hash;
        loop {
            match read_frame(&self.file, offset, self.len) {
                Ok(Some(frame)) => {
                    if !f(&frame, prev) {
                        return Ok(());
                    }
                    prev = frame.end_hash;
                    offset = frame.next;
                }
                Ok(None) => return Ok(()),
                Err(FrameError::Io(e)) => return Err(io(e)),
                Err(_) => return Err(StorageError::Corrupt("audit frame damaged")),
            }
        }
    }
}

fn io(e: std::io::Error) -> StorageError {
    StorageError::Io(format!("audit trail: {e}"))
}

fn seg_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// What opening the log found.
#[derive(Debug, Default, Clone)]
pub struct Recovery {
    pub head_seq: u64,
    pub head_hash: [u8; 32],
    pub head_time: i64,
    /// Bytes of a torn last frame (a write a crash interrupted, never
    /// acknowledged) cut off at open.
    pub torn_bytes: u64,
    /// Index files rebuilt from their segments.
    pub reindexed: u32,
}

pub struct Log {
    dir: PathBuf,
    keys: Keys,
    sealed: RwLock<Vec<SegMeta>>,
    active: RwLock<Active>,
    /// Held by whoever changes the files (append, seal, prune).
    write: Mutex<WriteState>,
    /// Closed segments whose index file is still being written (in the
    /// background, so that closing a segment never stalls appends): their
    /// index stays in memory until then.
    pending: Arc<Mutex<std::collections::HashMap<u64, PendingIndex>>>,
    /// Backups reading the segments: retention drops none while any holds.
    holds: Arc<Mutex<usize>>,
}

/// Keeps every segment in place while a backup copies them
/// ([`Log::hold`]).
pub struct Hold(Arc<Mutex<usize>>);

impl Drop for Hold {
    fn drop(&mut self) {
        *self.0.lock() -= 1;
    }
}

type PendingIndex = (Arc<Vec<Mark>>, Arc<Vec<(u64, u32)>>);

#[derive(Default)]
struct WriteState {
    /// Bytes past the durable length left by a failed write, to cut first.
    dirty: bool,
}

fn create_dir(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// The segments of `dir`, by first seq.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().is_some_and(|x| x == "seg")
            && let Some(seq) = p
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, p));
        }
    }
    out.sort();
    Ok(out)
}

impl Log {
    /// Whether `dir` holds a trail in this format.
    pub fn exists(dir: &Path) -> bool {
        list_segments(dir).is_ok_and(|s| !s.is_empty())
    }

    /// Opens (or starts, from `base`: the first seq and the hash before it)
    /// the trail in `dir`. A torn last frame is cut off; a missing index is
    /// rebuilt.
    pub fn open(
        dir: &Path,
        keys: Keys,
        base: (u64, [u8; 32]),
    ) -> Result<(Self, Recovery), StorageError> {
        create_dir(dir)?;
        let mut segs = list_segments(dir)?;
        let mut rec = Recovery::default();
        if segs.is_empty() {
            let path = dir.join(seg_name(base.0));
            write_segment_header(&keys, &path, base.0, &base.1, &[])?;
            sync_dir(dir)?;
            segs.push((base.0, path));
        }
        let (_, active_path) = segs.pop().expect("one segment at least");
        let mut sealed = Vec::new();
        for (_, path) in segs {
            let meta = match read_index_meta(&keys, &path) {
                Some(m) => m,
                None => {
                    rec.reindexed += 1;
                    let scan = scan_segment(&keys, &path, false)?;
                    write_index(&scan)?;
                    scan.meta
                }
            };
            sealed.push(meta);
        }
        let scan = scan_segment(&keys, &active_path, true)?;
        rec.torn_bytes = scan.torn;
        rec.head_seq = scan.meta.last_seq;
        rec.head_hash = scan.head_hash;
        rec.head_time = scan.head_time;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&active_path)
            .map_err(io)?;
        if scan.torn > 0 {
            file.set_len(scan.len).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        let active = Active {
            meta: scan.meta,
            file: Arc::new(file),
            len: scan.len,
            marks: scan.marks,
            entries: scan.entries,
            head_hash: scan.head_hash,
            head_time: scan.head_time,
        };
        Ok((
            Self {
                dir: dir.to_path_buf(),
                keys,
                sealed: RwLock::new(sealed),
                active: RwLock::new(active),
                write: Mutex::new(WriteState::default()),
                pending: Arc::default(),
                holds: Arc::default(),
            },
            rec,
        ))
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Appends `events` (consecutive seqs after the head, hashes filled)
    /// and makes them durable: one write and one `fdatasync` per frame.
    /// On error nothing of them is kept.
    pub fn append(&self, events: &[AuditEvent]) -> Result<(), StorageError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut w = self.write.lock();
        let (file, len, first_expected) = {
            let a = self.active.read();
            (
                a.file.clone(),
                a.len,
                a.meta.last_seq.max(a.meta.first_seq - 1) + 1,
            )
        };
        if w.dirty {
            file.set_len(len).map_err(io)?;
            w.dirty = false;
        }
        if events[0].seq != first_expected {
            return Err(StorageError::Corrupt("audit append out of sequence"));
        }
        let mut buf = Vec::new();
        let mut frames = Vec::new();
        for chunk in events.chunks(FRAME_EVENTS) {
            let start = len + buf.len() as u64;
            let mut entries = Vec::new();
            encode_frame(&self.keys, chunk, &mut buf, &mut entries);
            frames.push((start, chunk, entries));
        }
        let r = file.write_all_at(&buf, len).and_then(|()| file.sync_data());
        if let Err(e) = r {
            w.dirty = true;
            let _ = file.set_len(len).map(|()| w.dirty = false);
            return Err(io(e));
        }
        let full = {
            let mut a = self.active.write();
            for (start, chunk, entries) in frames {
                let first = &chunk[0];
                let need_mark = a
                    .marks
                    .last()
                    .is_none_or(|m| start - m.offset >= MARK_EVERY);
                if need_mark {
                    let hash = a.head_hash;
                    a.marks.push(Mark {
                        seq: first.seq,
                        offset: start,
                        time: first.time_unix_ms,
                        hash,
                    });
                }
                let fs = a.meta.first_seq;
                for (seq, k) in entries {
                    a.entries.push((k, (seq - fs) as u32));
                }
                let last = chunk.last().expect("chunks are not empty");
                if a.meta.is_empty() {
                    a.meta.first_time = first.time_unix_ms;
                }
                a.meta.last_seq = last.seq;
                a.meta.last_time = last.time_unix_ms;
                a.head_hash = last.hash.as_slice().try_into().unwrap_or([0; 32]);
                a.head_time = last.time_unix_ms;
            }
            a.len = len + buf.len() as u64;
            a.len >= SEGMENT_BYTES
        };
        if full {
            // The events are durable: a failure to start the next segment
            // leaves them in this one, which simply grows.
            if let Err(e) = self.seal_active() {
                tracing::error!(error = %e, "audit segment could not be closed; it keeps growing");
            }
        }
        Ok(())
    }

    /// Closes the active segment (writes its index) and starts the next.
    fn seal_active(&self) -> Result<std::thread::JoinHandle<()>, StorageError> {
        let (scan, next_first, head_hash) = {
            let a = self.active.read();
            (
                Scan {
                    meta: a.meta.clone(),
                    marks: a.marks.clone(),
                    entries: a.entries.clone(),
                    len: a.len,
                    head_hash: a.head_hash,
                    head_time: a.head_time,
                    torn: 0,
                },
                a.meta.last_seq + 1,
                a.head_hash,
            )
        };
        let path = self.dir.join(seg_name(next_first));
        write_segment_header(&self.keys, &path, next_first, &head_hash, &[])?;
        sync_dir(&self.dir)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let mut a = self.active.write();
        let old = std::mem::replace(
            &mut *a,
            Active {
                meta: SegMeta {
                    first_seq: next_first,
                    prev_hash: head_hash,
                    last_seq: next_first - 1,
                    first_time: scan.head_time,
                    last_time: scan.head_time,
                    path,
                },
                file: Arc::new(file),
                len: SEG_HEADER,
                marks: vec![Mark {
                    seq: next_first,
                    offset: SEG_HEADER,
                    time: scan.head_time,
                    hash: head_hash,
                }],
                entries: Vec::new(),
                head_hash,
                head_time: scan.head_time,
            },
        );
        let first = old.meta.first_seq;
        self.pending.lock().insert(
            first,
            (Arc::new(scan.marks.clone()), Arc::new(scan.entries.clone())),
        );
        self.sealed.write().push(old.meta);
        drop(a);
        // Sorting and writing a full segment's index takes tens of
        // milliseconds: not on the append path. A crash before it lands
        // only means a rebuild at the next start.
        let pending = self.pending.clone();
        std::thread::Builder::new()
            .name("coffre-audit-index".into())
            .spawn(move || match write_index(&scan) {
                Ok(()) => {
                    pending.lock().remove(&first);
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "audit index not written; kept in memory, rebuilt at the next start"
                ),
            })
            .map_err(|e| StorageError::Io(format!("audit index thread: {e}")))
    }

    /// Keeps retention from dropping any segment until the hold is
    /// dropped (taken before the segments are listed).
    pub fn hold(&self) -> Hold {
        *self.holds.lock() += 1;
        Hold(self.holds.clone())
    }

    /// Segment metadata only (cheap), oldest first; the last is active.
    pub fn metas(&self) -> Vec<SegMeta> {
        let mut v = self.sealed.read().clone();
        v.push(self.active.read().meta.clone());
        v
    }

    pub fn active_view(&self) -> SegView {
        let a = self.active.read();
        SegView {
            meta: a.meta.clone(),
            file: a.file.clone(),
            len: a.len,
            marks: Arc::new(a.marks.clone()),
            index: IndexView::Active,
        }
    }

    /// Seqs of `view`'s segment with an index entry for `key`, ascending.
    pub fn lookup(&self, view: &SegView, key: u64) -> Result<Vec<u64>, StorageError> {
        if !matches!(view.index, IndexView::Active) {
            return view.lookup(key);
        }
        let a = self.active.read();
        if a.meta.first_seq != view.meta.first_seq {
            // Closed since the view was taken: its index is elsewhere now.
            drop(a);
            return self.sealed_view(view.meta.clone())?.lookup(key);
        }
        let first = a.meta.first_seq;
        let mut out: Vec<u64> = a
            .entries
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, d)| first + *d as u64)
            .collect();
        drop(a);
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// A view of `meta`, or of the active segment if it is the active one.
    pub fn view(&self, meta: &SegMeta) -> Result<SegView, StorageError> {
        if self.active.read().meta.first_seq == meta.first_seq {
            return Ok(self.active_view());
        }
        self.sealed_view(meta.clone())
    }

    fn sealed_view(&self, meta: SegMeta) -> Result<SegView, StorageError> {
        let file = File::open(&meta.path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if let Some((marks, entries)) = self.pending.lock().get(&meta.first_seq).cloned() {
            return Ok(SegView {
                meta,
                file: Arc::new(file),
                len,
                marks,
                index: IndexView::Memory(entries),
            });
        }
        let idx = File::open(meta.idx_path()).map_err(io)?;
        let mut head = [0u8; IDX_HEADER as usize];
        idx.read_exact_at(&mut head, 0).map_err(io)?;
        let n_marks = u64::from_le_bytes(head[48..56].try_into().expect("8 bytes"));
        let n_entries = u64::from_le_bytes(head[56..64].try_into().expect("8 bytes"));
        let mut mb = vec![0u8; n_marks as usize * MARK_LEN];
        idx.read_exact_at(&mut mb, IDX_HEADER).map_err(io)?;
        let marks = mb
            .chunks_exact(MARK_LEN)
            .map(|c| Mark {
                seq: u64::from_le_bytes(c[..8].try_into().expect("8")),
                offset: u64::from_le_bytes(c[8..16].try_into().expect("8")),
                time: i64::from_le_bytes(c[16..24].try_into().expect("8")),
                hash: c[24..56].try_into().expect("32"),
            })
            .collect();
        Ok(SegView {
            meta,
            file: Arc::new(file),
            len,
            marks: Arc::new(marks),
            index: IndexView::File {
                file: idx,
                at: IDX_HEADER + n_marks * MARK_LEN as u64,
                n: n_entries,
            },
        })
    }

    /// The oldest closed segment, if all its events are older than
    /// `before_time` (and its index is on disk): the next one retention may
    /// drop. Never the one being written.
    pub fn oldest_due(&self, before_time: i64) -> Option<SegMeta> {
        let meta = self.sealed.read().first().cloned()?;
        (meta.last_time < before_time && !self.pending.lock().contains_key(&meta.first_seq))
            .then_some(meta)
    }

    /// Drops `meta`, the oldest closed segment; the next segment's
    /// authenticated header becomes the base. Returns the events dropped.
    pub fn drop_oldest(&self, meta: &SegMeta) -> Result<u64, StorageError> {
        let _w = self.write.lock();
        let holds = self.holds.lock();
        if *holds > 0 {
            // A backup is copying the segments: the next run drops it.
            return Ok(0);
        }
        {
            let mut sealed = self.sealed.write();
            if sealed.first().is_none_or(|m| m.first_seq != meta.first_seq) {
                return Ok(0);
            }
            sealed.remove(0);
        }
        std::fs::remove_file(meta.idx_path()).map_err(io)?;
        std::fs::remove_file(&meta.path).map_err(io)?;
        sync_dir(&self.dir)?;
        Ok(meta.last_seq + 1 - meta.first_seq)
    }

    /// Closes the active segment now if it holds events, so that the next
    /// pruning can drop it whole (retention works on whole segments).
    pub fn seal_now(&self) -> Result<(), StorageError> {
        let _w = self.write.lock();
        if self.active.read().meta.is_empty() {
            return Ok(());
        }
        // Asked for (pruning, tests): wait until its index is on disk.
        let _ = self.seal_active()?.join();
        Ok(())
    }

    /// Bytes of every file of the trail.
    pub fn disk_bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

pub(super) fn encode_frame(
    keys: &Keys,
    events: &[AuditEvent],
    out: &mut Vec<u8>,
    entries: &mut Vec<(u64, u64)>,
) {
    let base = events[0].time_unix_ms;
    let body = FrameBody {
        time: base,
        events: events.iter().map(|e| codec::encode(e, base)).collect(),
    };
    let mut ks = Vec::new();
    for e in events {
        ks.clear();
        keys.entries(e, &mut ks);
        entries.extend(ks.iter().map(|k| (e.seq, *k)));
    }
    let first_seq = events[0].seq;
    let count = events.len() as u32;
    let end_hash: [u8; 32] = events
        .last()
        .and_then(|e| e.hash.as_slice().try_into().ok())
        .unwrap_or([0; 32]);
    let plain = zeroize::Zeroizing::new(body.encode_to_vec());
    let sealed = keys
        .enc
        .seal(&Keys::frame_aad(first_seq, count, &end_hash), &plain);
    let body_len = (FRAME_HEAD - 4 + sealed.len()) as u32;
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&first_seq.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&end_hash);
    out.extend_from_slice(&sealed);
}

/// Writes a new segment file: its header, then `frames` (already encoded),
/// durably and atomically, created 0600.
fn write_segment_header(
    keys: &Keys,
    path: &Path,
    first_seq: u64,
    prev: &[u8; 32],
    frames: &[u8],
) -> Result<(), StorageError> {
    let mut b = Vec::with_capacity(SEG_HEADER as usize + frames.len());
    b.extend_from_slice(SEG_MAGIC);
    b.extend_from_slice(&TRAIL_FORMAT.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&first_seq.to_le_bytes());
    b.extend_from_slice(prev);
    b.extend_from_slice(&keys.segment_mac(first_seq, prev));
    b.extend_from_slice(frames);
    crate::store::AtomicFile::new(path).replace(&b)
}

/// Parses one frame from its bytes as [`read_frame`] reads them from a
/// segment (a backup carries frames one by one).
pub fn parse_frame(raw: &[u8]) -> Result<RawFrame, FrameError> {
    if raw.len() < FRAME_HEAD {
        return Err(FrameError::Short);
    }
    let body_len = u32::from_le_bytes(raw[..4].try_into().expect("4 bytes"));
    if body_len < (FRAME_HEAD - 4) as u32 || body_len > FRAME_MAX {
        return Err(FrameError::Garbled);
    }
    if raw.len() != 4 + body_len as usize {
        return Err(FrameError::Short);
    }
    Ok(RawFrame {
        offset: 0,
        first_seq: u64::from_le_bytes(raw[4..12].try_into().expect("8 bytes")),
        count: u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes")),
        end_hash: raw[16..48].try_into().expect("32 bytes"),
        sealed: raw[FRAME_HEAD..].to_vec(),
        next: raw.len() as u64,
    })
}

/// A segment's header as bytes, checked: its first seq and the hash before
/// it, if the MAC holds.
pub fn parse_segment_header(keys: &Keys, h: &[u8]) -> Result<(u64, [u8; 32]), StorageError> {
    if h.len() != SEG_HEADER as usize {
        return Err(StorageError::Corrupt("audit segment header is short"));
    }
    if &h[..8] != SEG_MAGIC {
        return Err(StorageError::Corrupt("not an audit segment"));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != TRAIL_FORMAT {
        return Err(StorageError::Corrupt("audit segment of another format"));
    }
    let first = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    let prev: [u8; 32] = h[24..56].try_into().expect("32 bytes");
    if !crypto::ct_eq(&keys.segment_mac(first, &prev), &h[56..88]) {
        return Err(StorageError::Corrupt("audit segment header fails its MAC"));
    }
    Ok((first, prev))
}

/// The file name of the segment whose header is `h` (unchecked).
pub fn segment_file_name(h: &[u8]) -> Option<String> {
    let first = u64::from_le_bytes(h.get(16..24)?.try_into().ok()?);
    Some(seg_name(first))
}

/// The pieces of the trail up to a head, read from the segment files: each
/// segment's header, then its frames (what a backup carries of the trail).
pub fn export_segment(
    meta: &SegMeta,
    head_seq: u64,
    mut piece: impl FnMut(bool, Vec<u8>) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    if meta.first_seq > head_seq {
        return Ok(());
    }
    let file = File::open(&meta.path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut h = vec![0u8; SEG_HEADER as usize];
    file.read_exact_at(&mut h, 0).map_err(io)?;
    piece(true, h)?;
    let mut offset = SEG_HEADER;
    loop {
        let frame = match read_frame(&file, offset, len) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(FrameError::Io(e)) => return Err(io(e)),
            Err(_) => return Err(StorageError::Corrupt("audit frame damaged")),
        };
        if frame.first_seq > head_seq {
            return Ok(());
        }
        if frame.last_seq() > head_seq {
            return Err(StorageError::Corrupt("audit frame crosses the head"));
        }
        let mut raw = Vec::with_capacity(FRAME_HEAD + frame.sealed.len());
        raw.extend_from_slice(&((FRAME_HEAD - 4 + frame.sealed.len()) as u32).to_le_bytes());
        raw.extend_from_slice(&frame.first_seq.to_le_bytes());
        raw.extend_from_slice(&frame.count.to_le_bytes());
        raw.extend_from_slice(&frame.end_hash);
        raw.extend_from_slice(&frame.sealed);
        offset = frame.next;
        let last = frame.last_seq();
        piece(false, raw)?;
        if last == head_seq {
            return Ok(());
        }
    }
}

/// Checks a trail given piece by piece (segment headers and frames, as a
/// backup carries them): every header's MAC, every frame's authentication,
/// the chain from the first segment's base, seqs without gap.
pub struct ChainCheck {
    keys: Keys,
    /// The next seq expected; 0 before the first segment.
    expect: u64,
    prev: [u8; 32],
    pub checked: u64,
}

impl ChainCheck {
    pub fn new(keys: Keys) -> Self {
        Self {
            keys,
            expect: 0,
            prev: [0; 32],
            checked: 0,
        }
    }

    pub fn segment(&mut self, header: &[u8]) -> Result<(), String> {
        let (first, prev) =
            parse_segment_header(&self.keys, header).map_err(|e| format!("audit trail: {e}"))?;
        if self.expect == 0 {
            (self.expect, self.prev) = (first, prev);
        } else if first != self.expect || prev != self.prev {
            return Err(format!(
                "audit trail: segment at seq {first} does not continue the chain (expected seq {})",
                self.expect
            ));
        }
        Ok(())
    }

    /// Checks a frame; `each` sees its events.
    pub fn frame(&mut self, raw: &[u8], mut each: impl FnMut(&AuditEvent)) -> Result<(), String> {
        let frame = parse_frame(raw).map_err(|_| "audit trail: a frame is damaged".to_string())?;
        if self.expect == 0 {
            return Err("audit trail: a frame before any segment".into());
        }
        if frame.first_seq != self.expect {
            return Err(format!(
                "audit trail: sequence gap at seq {} (expected {})",
                frame.first_seq, self.expect
            ));
        }
        let events = frame
            .open(&self.keys, self.prev)
            .ok_or_else(|| format!("audit trail: event at seq {} was modified", self.expect))?;
        let end: [u8; 32] = events
            .last()
            .and_then(|e| e.hash.as_slice().try_into().ok())
            .unwrap_or(self.prev);
        if !crypto::ct_eq(&end, &frame.end_hash) {
            return Err(format!(
                "audit trail: event at seq {} was modified",
                self.expect
            ));
        }
        for e in &events {
            each(e);
        }
        self.prev = end;
        self.expect += u64::from(frame.count);
        self.checked += u64::from(frame.count);
        Ok(())
    }

    /// The last seq checked and the chain hash after it.
    pub fn head(&self) -> (u64, [u8; 32]) {
        (self.expect.saturating_sub(1), self.prev)
    }
}

/// A segment's header: its first seq and the hash before it, if the MAC
/// holds.
pub fn read_segment_header(keys: &Keys, file: &File) -> Result<(u64, [u8; 32]), StorageError> {
    let mut h = [0u8; SEG_HEADER as usize];
    file.read_exact_at(&mut h, 0)
        .map_err(|_| StorageError::Corrupt("audit segment header is short"))?;
    parse_segment_header(keys, &h)
}

/// What reading a whole segment found.
struct Scan {
    meta: SegMeta,
    marks: Vec<Mark>,
    entries: Vec<(u64, u32)>,
    /// Bytes up to the end of the last whole frame.
    len: u64,
    head_hash: [u8; 32],
    head_time: i64,
    torn: u64,
}

/// Reads every frame of a segment to rebuild its marks and index. A frame
/// that fails to open keeps its place (verification will name it); a torn
/// frame at the very end (only `active`) is left out.
fn scan_segment(keys: &Keys, path: &Path, active: bool) -> Result<Scan, StorageError> {
    let file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let (first_seq, prev) = read_segment_header(keys, &file)?;
    let mut scan = Scan {
        meta: SegMeta {
            first_seq,
            prev_hash: prev,
            last_seq: first_seq - 1,
            first_time: 0,
            last_time: 0,
            path: path.to_path_buf(),
        },
        marks: Vec::new(),
        entries: Vec::new(),
        len: SEG_HEADER,
        head_hash: prev,
        head_time: 0,
        torn: 0,
    };
    let mut offset = SEG_HEADER;
    let mut ks = Vec::new();
    loop {
        let frame = match read_frame(&file, offset, file_len) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(FrameError::Io(e)) => return Err(io(e)),
            Err(_) if active => {
                scan.torn = file_len - offset;
                break;
            }
            Err(_) => return Err(StorageError::Corrupt("audit segment frame damaged")),
        };
        let events = frame.open(keys, scan.head_hash);
        if events.is_none() && active && frame.next == file_len {
            // A last frame that does not authenticate is a write the crash
            // tore (the file grew before its bytes landed).
            scan.torn = file_len - offset;
            break;
        }
        let time = events
            .as_ref()
            .and_then(|e| e.first())
            .map_or(scan.head_time, |e| e.time_unix_ms);
        if scan
            .marks
            .last()
            .is_none_or(|m| offset - m.offset >= MARK_EVERY)
        {
            scan.marks.push(Mark {
                seq: frame.first_seq,
                offset,
                time,
                hash: scan.head_hash,
            });
        }
        if let Some(events) = &events {
            for e in events {
                ks.clear();
                keys.entries(e, &mut ks);
                for k in &ks {
                    scan.entries
                        .push((*k, e.seq.saturating_sub(first_seq) as u32));
                }
            }
            if let Some(last) = events.last() {
                if scan.meta.is_empty() {
                    scan.meta.first_time = time;
                }
                scan.head_time = last.time_unix_ms;
            }
        }
        scan.meta.last_seq = frame.last_seq();
        scan.meta.last_time = scan.head_time;
        scan.head_hash = frame.end_hash;
        offset = frame.next;
        scan.len = offset;
    }
    if scan.marks.is_empty() {
        scan.marks.push(Mark {
            seq: first_seq,
            offset: SEG_HEADER,
            time: scan.head_time,
            hash: prev,
        });
    }
    Ok(scan)
}

/// Writes a closed segment's index file, atomically.
fn write_index(scan: &Scan) -> Result<(), StorageError> {
    let mut entries = scan.entries.clone();
    entries.sort_unstable();
    let m = &scan.meta;
    let mut b = Vec::with_capacity(
        IDX_HEADER as usize + scan.marks.len() * MARK_LEN + entries.len() * ENTRY_LEN,
    );
    b.extend_from_slice(IDX_MAGIC);
    b.extend_from_slice(&TRAIL_FORMAT.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&m.first_seq.to_le_bytes());
    b.extend_from_slice(&m.last_seq.to_le_bytes());
    b.extend_from_slice(&m.first_time.to_le_bytes());
    b.extend_from_slice(&m.last_time.to_le_bytes());
    b.extend_from_slice(&(scan.marks.len() as u64).to_le_bytes());
    b.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for mk in &scan.marks {
        b.extend_from_slice(&mk.seq.to_le_bytes());
        b.extend_from_slice(&mk.offset.to_le_bytes());
        b.extend_from_slice(&mk.time.to_le_bytes());
        b.extend_from_slice(&mk.hash);
    }
    for (k, d) in entries {
        b.extend_from_slice(&k.to_be_bytes());
        b.extend_from_slice(&d.to_be_bytes());
    }
    crate::store::AtomicFile::new(m.idx_path()).replace(&b)
}

/// A closed segment's metadata from its index file, if the index is whole
/// and belongs to the segment (its header authenticated).
fn read_index_meta(keys: &Keys, seg: &Path) -> Option<SegMeta> {
    let file = File::open(seg).ok()?;
    let (first_seq, prev_hash) = read_segment_header(keys, &file).ok()?;
    let idx = File::open(seg.with_extension("idx")).ok()?;
    let len = idx.metadata().ok()?.len();
    let mut h = [0u8; IDX_HEADER as usize];
    idx.read_exact_at(&mut h, 0).ok()?;
    let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    let (n_marks, n_entries) = (word(48), word(56));
    let whole = &h[..8] == IDX_MAGIC
        && u32::from_le_bytes(h[8..12].try_into().expect("4")) == TRAIL_FORMAT
        && word(16) == first_seq
        && n_marks > 0
        && IDX_HEADER + n_marks * MARK_LEN as u64 + n_entries * ENTRY_LEN as u64 == len;
    whole.then(|| SegMeta {
        first_seq,
        prev_hash,
        last_seq: word(24),
        first_time: word(32) as i64,
        last_time: word(40) as i64,
        path: seg.to_path_buf(),
    })
}

/// Where one frame of a trail lies.
#[derive(Debug, Clone)]
pub struct FrameAt {
    pub segment: PathBuf,
    pub offset: u64,
    pub first_seq: u64,
    pub count: u32,
    pub len: u64,
}

/// Where each frame of a trail lies, in order (for forensics and the
/// tamper tests).
pub fn frame_map(dir: &Path) -> Result<Vec<FrameAt>, StorageError> {
    let mut out = Vec::new();
    for (_, path) in list_segments(dir)? {
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut offset = SEG_HEADER;
        while let Ok(Some(f)) = read_frame(&file, offset, len) {
            out.push(FrameAt {
                segment: path.clone(),
                offset,
                first_seq: f.first_seq,
                count: f.count,
                len: f.next - offset,
            });
            offset = f.next;
        }
    }
    Ok(out)
}

/// Bytes of a segment's header: where its first frame starts.
pub const HEADER_LEN: u64 = SEG_HEADER;
