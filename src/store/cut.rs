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
    collections::HashMap,
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
    pre: Mutex<HashMap<Key, Option<Vec<u8>>>>,
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
            return Err(StorageError::Io("a cut is open already".into()));
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
    /// time ([`Storage::scan_each`]): memory stays bounded whatever the store's size (plus the
    /// pre-images of keys written while the scan runs).
    pub async fn scan(
        &self,
        space: Space,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StorageError> {
        let mut seen = std::collections::HashSet::new();
        let mut stopped = false;
        self.storage
            .scan_each(space, prefix, |k, live| {
                let pre = self
                    .state
                    .pre
                    .lock()
                    .get(&(space as u8, k.to_vec()))
                    .cloned();
                stopped = match pre {
                    // Written since the cut: the value it had then (none:
                    // created since, not in the cut).
                    Some(before) => {
                        seen.insert(k.to_vec());
                        before.is_some_and(|v| !f(k, &v))
                    }
                    None => !f(k, live),
                };
                !stopped
            })
            .await?;
        if stopped {
            return Ok(());
        }
        // Keys deleted since the cut: their pre-images, in key order.
        let mut gone: Vec<(Vec<u8>, Vec<u8>)> = self
            .state
            .pre
            .lock()
            .iter()
            .filter(|((s, k), v)| {
                *s == space as u8 && k.starts_with(prefix) && v.is_some() && !seen.contains(k)
            })
            .map(|((_, k), v)| (k.clone(), v.clone().unwrap_or_default()))
            .collect();
        gone.sort();
        for (k, v) in gone {
            if self.storage.get(space, &k).await?.is_none() && !f(&k, &v) {
                return Ok(());
            }
        }
        Ok(())
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

impl Drop for Cut {
    fn drop(&mut self) {
        let mut open = self.storage.cuts.open.write();
        if open.as_ref().is_some_and(|s| Arc::ptr_eq(s, &self.state)) {
            *open = None;
        }
    }
}
