//! The consistent cut: a view of every key space as of one instant, read
//! while the vault keeps serving. sled has no snapshot, so the cut keeps
//! pre-images: from the instant it opens, the first write to each key
//! records the value the key had before (or its absence); a scan through
//! the cut returns, for every key, its pre-image when it has one and its
//! live value otherwise. Opening the cut takes a write barrier only long
//! enough to flip that switch (writers hold the barrier's read side while
//! they record and apply), plus whatever the caller captures with it (the
//! trail's head, the key store's bytes); [`Cut::held`] says how long writes
//! were held.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::{Mutex, RwLock};
use tokio::sync::RwLock as AsyncRwLock;

use super::{Backend, Batch, Op, Space, Storage, StorageError};

type Key = (u8, Vec<u8>);

/// The pre-images of the open cut.
#[derive(Default)]
pub(super) struct CutState {
    /// Ordered, so that a chunk of a scan finds the keys deleted within
    /// its range.
    pre: Mutex<BTreeMap<Key, Option<Vec<u8>>>>,
}

/// Shared by every clone of a [`Storage`].
#[derive(Default)]
pub(super) struct Cuts {
    /// Writers hold the read side while they record pre-images and apply.
    pub(super) barrier: AsyncRwLock<()>,
    pub(super) open: RwLock<Option<Arc<CutState>>>,
}

impl Cuts {
    /// Records, for the open cut if any, the pre-image of every key `batch`
    /// writes that has none yet. Call under the barrier's read side, before
    /// applying the batch.
    pub(super) async fn record(
        &self,
        backend: &dyn Backend,
        batch: &Batch,
    ) -> Result<(), StorageError> {
        let Some(state) = self.open.read().clone() else {
            return Ok(());
        };
        for op in &batch.0 {
            let (space, key) = match op {
                Op::Put(s, k, _) | Op::Delete(s, k) => (*s, k),
                Op::Expect(..) => continue,
            };
            let id = (space as u8, key.clone());
            if state.pre.lock().contains_key(&id) {
                continue;
            }
            let before = backend.get(space, key).await?;
            state.pre.lock().entry(id).or_insert(before);
        }
        Ok(())
    }
}

/// A view of the store as of the instant it was taken. Dropping it ends
/// the pre-image recording.
pub struct Cut {
    storage: Storage,
    state: Arc<CutState>,
    held: Duration,
}

impl Storage {
    /// Opens a cut. `capture` runs while writes are held (keep it short):
    /// what else must be taken at the same instant. At most one cut is
    /// open at a time.
    pub async fn cut<T>(&self, capture: impl FnOnce() -> T) -> Result<(Cut, T), StorageError> {
        let asked = Instant::now();
        let _barrier = self.cuts.barrier.write().await;
        let held_from = Instant::now();
        let mut open = self.cuts.open.write();
        if open.is_some() {
            return Err(StorageError::Busy(
                "a backup is already running: try again when it ends",
            ));
        }
        let state = Arc::new(CutState::default());
        *open = Some(state.clone());
        drop(open);
        let captured = capture();
        let held = held_from.elapsed();
        tracing::debug!(
            waited_us = (held_from - asked).as_micros() as u64,
            held_us = held.as_micros() as u64,
            "consistent cut opened"
        );
        Ok((
            Cut {
                storage: self.clone(),
                state,
                held,
            },
            captured,
        ))
    }
}

impl Storage {
    /// Held by a call from before its first write to after its audit
    /// event, so that a cut falls between calls, never inside one.
    pub async fn write_scope(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.calls.clone().read_owned().await
    }

    /// [`Storage::cut`] once the writing calls in flight have finished
    /// (new ones wait): the cut holds exactly the writes whose audit events
    /// are at or before what `capture` reads of the trail.
    pub async fn cut_between_calls<T>(
        &self,
        capture: impl FnOnce() -> T,
    ) -> Result<(Cut, T), StorageError> {
        let asked = Instant::now();
        let _calls = self.calls.write().await;
        let (mut cut, t) = self.cut(capture).await?;
        cut.held = asked.elapsed();
        Ok((cut, t))
    }
}

impl Cut {
    /// How long writes were held to open it.
    pub fn held(&self) -> Duration {
        self.held
    }

    /// Keys written since the cut opened.
    pub fn changed(&self) -> usize {
        self.state.pre.lock().len()
    }

    /// The value of `key` as of the cut.
    pub async fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let live = self.storage.get(space, key).await?;
        Ok(
            match self.state.pre.lock().get(&(space as u8, key.to_vec())) {
                Some(before) => before.clone(),
                None => live,
            },
        )
    }

    /// Every entry of `space` under `prefix` as of the cut, in key order,
    /// passed to `f` until it returns false. Reads a chunk of keys at a
    /// time ([`Cut::chunks`]): memory stays bounded whatever the store's
    /// size (plus the pre-images of keys written while the scan runs).
    pub async fn scan(
        &self,
        space: Space,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let mut chunks = self.chunks(space, prefix);
        while let Some(rows) = chunks.next().await? {
            for (k, v) in rows {
                if !f(&k, &v) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// The entries of `space` under `prefix` as of the cut, a chunk at a
    /// time, for a caller that awaits between chunks (a backup sending
    /// them over the network).
    pub fn chunks<'a>(&'a self, space: Space, prefix: &[u8]) -> CutChunks<'a> {
        CutChunks {
            cut: self,
            space,
            prefix: prefix.to_vec(),
            start: Some(prefix.to_vec()),
        }
    }

    /// How many entries of `space` under `prefix` the cut holds.
    pub async fn count(&self, space: Space, prefix: &[u8]) -> Result<u64, StorageError> {
        let mut n = 0;
        self.scan(space, prefix, |_, _| {
            n += 1;
            true
        })
        .await?;
        Ok(n)
    }
}

/// A scan through a [`Cut`], chunk by chunk ([`Cut::chunks`]), in key
/// order: a key written since the cut shows its pre-image, a key created
/// since is left out, a key deleted since comes back.
pub struct CutChunks<'a> {
    cut: &'a Cut,
    space: Space,
    prefix: Vec<u8>,
    /// Where the scan goes on; `None` once it is done.
    start: Option<Vec<u8>>,
}

/// Keys per chunk.
const CHUNK: usize = 512;

impl CutChunks<'_> {
    /// The next chunk (never empty), or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Vec<(Vec<u8>, Vec<u8>)>>, StorageError> {
        let space = self.space as u8;
        while let Some(start) = self.start.take() {
            let rows = self
                .cut
                .storage
                .scan_from(self.space, &self.prefix, &start, CHUNK)
                .await?;
            // The key range this chunk covers: to just past its last row,
            // or to the end of the prefix.
            let end = match rows.last() {
                Some((last, _)) if rows.len() == CHUNK => {
                    let mut next = last.clone();
                    next.push(0);
                    self.start = Some(next.clone());
                    Some(next)
                }
                _ => None,
            };
            // Pre-images are recorded before their write is applied: one
            // written or deleted before the rows were read is in the map
            // now; one written after was read live, unchanged since the cut.
            let pre = self.cut.state.pre.lock();
            let upper = match &end {
                Some(e) => std::ops::Bound::Excluded((space, e.clone())),
                None => std::ops::Bound::Unbounded,
            };
            let mut changed = pre
                .range((std::ops::Bound::Included((space, start.clone())), upper))
                .take_while(|((s, k), _)| *s == space && k.starts_with(&self.prefix))
                .peekable();
            let mut out = Vec::with_capacity(rows.len());
            for (k, live) in rows {
                // Deleted since the cut, before this key: back in.
                while let Some(((_, ck), before)) = changed.next_if(|((_, ck), _)| *ck < k) {
                    if let Some(v) = before {
                        out.push((ck.clone(), v.clone()));
                    }
                }
                match changed.next_if(|((_, ck), _)| *ck == k) {
                    // Written since the cut: the value it had then (none:
                    // created since, not in the cut).
                    Some((_, before)) => {
                        if let Some(v) = before {
                            out.push((k, v.clone()));
                        }
                    }
                    None => out.push((k, live)),
                }
            }
            for ((_, ck), before) in changed {
                if let Some(v) = before {
                    out.push((ck.clone(), v.clone()));
                }
            }
            drop(pre);
            if !out.is_empty() {
                return Ok(Some(out));
            }
        }
        Ok(None)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let mut open = self.storage.cuts.open.write();
        if open.as_ref().is_some_and(|s| Arc::ptr_eq(s, &self.state)) {
            *open = None;
        }
    }
}
