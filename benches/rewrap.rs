//! Rewrap throughput while serving reads, and the read p99 during the
//! rewrap against idle: 20 000 ten-field records, 4 concurrent gRPC readers,
//! one in-process server. `cargo bench --bench rewrap`.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

const RECORDS: u64 = 20_000;
const READERS: usize = 4;

fn main() {
    let Some(rt) = support::runtime_if_measuring() else {
        return;
    };
    rt.block_on(async {
        let b = support::start_with(support::ROOMY_LIMITS, |b| b, RECORDS).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let idle = b
            .get_load_while(READERS, RECORDS, move || Instant::now() < deadline)
            .await;
        println!(
            "idle: {:.0} reads/s, p50 {:.2} ms, p99 {:.2} ms",
            idle.rps, idle.p50_ms, idle.p99_ms
        );
        let tenant = b
            .vault
            .tenants
            .get(&coffre::model::TenantName::parse("b").unwrap())
            .await
            .unwrap();
        b.vault.keys.rotate(&tenant.keys).await.unwrap();
        let running = Arc::new(AtomicBool::new(true));
        let rewrap = {
            let (vault, running) = (b.vault.clone(), running.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let out = vault.rewrap(&tenant, |_, _| {}).await.unwrap();
                running.store(false, Ordering::Relaxed);
                (out, started.elapsed())
            })
        };
        let flag = running.clone();
        let during = b
            .get_load_while(READERS, RECORDS, move || flag.load(Ordering::Relaxed))
            .await;
        let (fields, took) = rewrap.await.unwrap();
        println!(
            "rewrap: {fields} fields in {:.2} s = {:.0} fields/s while serving reads",
            took.as_secs_f64(),
            fields as f64 / took.as_secs_f64()
        );
        println!(
            "during rewrap: {:.0} reads/s, p50 {:.2} ms, p99 {:.2} ms (idle p99 {:.2} ms: ×{:.2})",
            during.rps,
            during.p50_ms,
            during.p99_ms,
            idle.p99_ms,
            during.p99_ms / idle.p99_ms
        );
        b.stop().await;
    });
}
