//! Fault injection for the fail-closed tests, around any backend.

use std::sync::Arc;

use super::{Backend, Batch, Entry, Op, Space, StorageError};

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

#[async_trait::async_trait]
impl Backend for FaultyBackend {
    async fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.inner.get(space, key).await
    }
    async fn scan_prefix(
        &self,
        space: Space,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.inner.scan_prefix(space, prefix, limit).await
    }
    async fn scan_from(
        &self,
        space: Space,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.inner.scan_from(space, prefix, start, limit).await
    }
    async fn apply(&self, batch: Batch) -> Result<(), StorageError> {
        let failing = self.failing.lock().clone();
        let touches = batch.0.iter().any(|op| match op {
            Op::Put(s, _, _) | Op::Delete(s, _) => failing.contains(s),
            Op::Expect(..) => false,
        });
        if touches {
            return Err(StorageError::Io("injected fault".into()));
        }
        {
            let mut w = self.writes.lock();
            for op in &batch.0 {
                if let Op::Put(s, _, _) | Op::Delete(s, _) = op {
                    *w.entry(*s as u8).or_default() += 1;
                }
            }
        }
        self.inner.apply(batch).await
    }
    async fn last(&self, space: Space) -> Result<Option<Entry>, StorageError> {
        self.inner.last(space).await
    }
    async fn flush(&self) -> Result<(), StorageError> {
        self.inner.flush().await
    }
    async fn size_bytes(&self) -> Option<u64> {
        self.inner.size_bytes().await
    }
    fn admit(&self, space: Space) -> Result<(), StorageError> {
        if self.failing.lock().contains(&space) {
            return Err(StorageError::Io("injected fault".into()));
        }
        self.inner.admit(space)
    }
}
