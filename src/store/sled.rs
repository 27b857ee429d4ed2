//! The embedded default: sled 0.34 in the data directory. The only file
//! that knows sled.

use std::path::Path;

use super::{Backend, Batch, Entry, Op, Space, StorageError};

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

impl SledBackend {
    /// A conditional batch, in one sled transaction.
    fn apply_if(&self, batch: Batch) -> Result<(), StorageError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let r = self.db.transaction(|tx| {
            for op in &batch.0 {
                if let Op::Expect(s, k, want) = op
                    && tx.get(spaced(*s, k))?.as_deref() != want.as_deref()
                {
                    return Err(ConflictableTransactionError::Abort(()));
                }
            }
            for op in &batch.0 {
                match op {
                    Op::Put(s, k, v) => {
                        tx.insert(spaced(*s, k), v.as_slice())?;
                    }
                    Op::Delete(s, k) => {
                        tx.remove(spaced(*s, k))?;
                    }
                    Op::Expect(..) => {}
                }
            }
            Ok(())
        });
        match r {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(())) => Err(StorageError::Conflict),
            Err(TransactionError::Storage(e)) => Err(io(e)),
        }
    }
}

#[async_trait::async_trait]
impl Backend for SledBackend {
    async fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .db
            .get(spaced(space, key))
            .map_err(io)?
            .map(|v| v.to_vec()))
    }

    async fn scan_prefix(
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

    async fn scan_from(
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

    async fn apply(&self, mut batch: Batch) -> Result<(), StorageError> {
        if batch.is_conditional() {
            return self.apply_if(batch);
        }
        // A lone write is atomic by itself; sled's batches take a global
        // lock that stalls every concurrent reader, so skip it when we can.
        if batch.0.len() == 1 {
            return match batch.0.pop().expect("one op") {
                Op::Put(s, k, v) => self.db.insert(spaced(s, &k), v).map(|_| ()),
                Op::Delete(s, k) => self.db.remove(spaced(s, &k)).map(|_| ()),
                Op::Expect(..) => Ok(()),
            }
            .map_err(io);
        }
        let mut b = sled::Batch::default();
        for op in batch.0 {
            match op {
                Op::Put(s, k, v) => b.insert(spaced(s, &k), v),
                Op::Delete(s, k) => b.remove(spaced(s, &k)),
                Op::Expect(..) => {}
            }
        }
        self.db.apply_batch(b).map_err(io)
    }

    async fn last(&self, space: Space) -> Result<Option<Entry>, StorageError> {
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

    async fn flush(&self) -> Result<(), StorageError> {
        self.db.flush().map(|_| ()).map_err(io)
    }
    async fn size_bytes(&self) -> Option<u64> {
        self.db.size_on_disk().ok()
    }
}
