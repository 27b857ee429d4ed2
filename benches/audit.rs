//! GetRecord throughput with the durable audit trail (every event flushed
//! through group commit before the response) against the same run with
//! events kept only in memory (flush turned into a no-op), 64 concurrent
//! gRPC clients on loopback. `cargo bench --bench audit`.

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use coffre::{
    pb,
    storage::{Backend, Batch, Entry, Space, StorageError},
};

/// Applies writes but never makes them durable.
struct NoFlush(Arc<dyn Backend>);

impl Backend for NoFlush {
    fn get(&self, s: Space, k: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.0.get(s, k)
    }
    fn scan_prefix(&self, s: Space, p: &[u8], l: usize) -> Result<Vec<Entry>, StorageError> {
        self.0.scan_prefix(s, p, l)
    }
    fn scan_from(
        &self,
        s: Space,
        p: &[u8],
        from: &[u8],
        l: usize,
    ) -> Result<Vec<Entry>, StorageError> {
        self.0.scan_from(s, p, from, l)
    }
    fn apply(&self, b: Batch) -> Result<(), StorageError> {
        self.0.apply(b)
    }
    fn last(&self, s: Space) -> Result<Option<Entry>, StorageError> {
        self.0.last(s)
    }
    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }
}

const CLIENTS: usize = 64;
const SECONDS: u64 = 8;

async fn run(durable: bool) -> (f64, f64) {
    let b = support::start(support::ROOMY_LIMITS, |b| {
        if durable {
            b
        } else {
            Arc::new(NoFlush(b)) as Arc<dyn Backend>
        }
    })
    .await;
    let load = b.get_load(CLIENTS, Duration::from_secs(SECONDS)).await;
    b.stop().await;
    (load.rps, load.p99_ms)
}

/// Events per second through `Audit::record` alone (no gRPC).
async fn record_only(durable: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let sled: Arc<dyn Backend> = Arc::new(
        coffre::storage::SledBackend::open(
            dir.path(),
            &coffre::storage::SledOptions {
                cache_capacity_bytes: 1 << 25,
            },
        )
        .unwrap(),
    );
    let backend = if durable {
        sled
    } else {
        Arc::new(NoFlush(sled)) as Arc<dyn Backend>
    };
    let store = coffre::storage::Storage::new(backend);
    let audit = Arc::new(
        coffre::audit::Audit::open(
            store,
            coffre::crypto::SecretKey::random(),
            dir.path(),
            None,
            None,
        )
        .unwrap(),
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..64 {
        let audit = audit.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200 {
                audit
                    .record(pb::AuditEvent {
                        tenant: "b".into(),
                        principal: format!("b/c{c}"),
                        action: "coffre.v1.Records/GetRecord".into(),
                        record_ids: vec![format!("p{i}")],
                        outcome: "ok".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (64 * 200) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let Some(rt) = support::runtime_if_measuring() else {
        return;
    };
    for durable in [false, true] {
        let eps = rt.block_on(record_only(durable));
        println!("Audit::record alone, 64 tasks, durable={durable}: {eps:.0} events/s");
    }
    let (mem_rps, mem_p99) = rt.block_on(run(false));
    let (dur_rps, dur_p99) = rt.block_on(run(true));
    println!("GetRecord, {CLIENTS} clients, {SECONDS} s each, audit events:");
    println!("  in memory only : {mem_rps:>8.0} req/s  p99 {mem_p99:.2} ms");
    println!("  durable        : {dur_rps:>8.0} req/s  p99 {dur_p99:.2} ms");
    println!("  in-memory / durable = {:.2}", mem_rps / dur_rps);
}
