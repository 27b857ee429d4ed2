//! The audit trail at a hospital's scale, through the library (no gRPC):
//! generate `TRAIL_EVENTS` events (default 10 million) in the load
//! generator's mix, spread over ten days, then measure
//!
//! - bytes on disk per event (every file of the trail, indexes included);
//! - QueryAudit by record id: latency percentiles over random ids;
//! - a day of one principal's events: time to the first event;
//! - paging newest first with `before_seq`;
//! - VerifyAudit: events/s and the peak RSS of a fresh process;
//! - the idle RSS of a fresh process that opened the trail, against one
//!   that opened an empty trail.
//!
//! `cargo bench --bench audit` (`TRAIL_EVENTS=1000000` for a quick run).
//! The verification and idle figures come from child processes (this
//! binary again, `TRAIL_CHILD=...`), so nothing of the generation counts.

mod support;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use coffre::{audit::Audit, pb, store::Storage};

const DAY_MS: i64 = 86_400_000;
const TASKS: usize = 64;
const RECORDS: u64 = 1_000_000;
const PRINCIPALS: u64 = 200;

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

async fn open(dir: &Path) -> Audit {
    let key = std::fs::read(dir.join("bench-audit-key")).unwrap();
    let sled = coffre::store::SledBackend::open(
        &dir.join("kv"),
        &coffre::store::SledOptions {
            cache_capacity_bytes: 1 << 24,
        },
    )
    .unwrap();
    Audit::open(
        Storage::new(Arc::new(sled)),
        coffre::crypto::SecretKey::from_slice(&key).unwrap(),
        dir,
        None,
        None,
    )
    .await
    .unwrap()
}

fn record_id(n: u64) -> String {
    // UUID-shaped, like the ids the server makes.
    let h = coffre::crypto::sha256(&n.to_be_bytes());
    let x = hex::encode(&h[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

fn tenant(p: u64) -> String {
    format!("bench_{:08x}", p % 4)
}

fn principal(p: u64) -> String {
    format!("{}/dr_{p:03}", tenant(p))
}

/// Event `i` of the mix: 85 % reads, 10 % writes, 5 % logins and finds.
fn event(i: u64, time: i64) -> pb::AuditEvent {
    let r = coffre::crypto::sha256(&i.to_le_bytes());
    let p = u64::from(r[0]) * 256 + u64::from(r[1]);
    let p = p % PRINCIPALS;
    let rec = u64::from_le_bytes(r[2..10].try_into().unwrap()) % RECORDS;
    let kind = r[10] % 100;
    let mut e = pb::AuditEvent {
        time_unix_ms: time,
        tenant: tenant(p),
        principal: principal(p),
        role: "clinician".into(),
        outcome: "ok".into(),
        peer: format!("10.1.{}.{}:{}", r[11], r[12], 40000 + u32::from(r[13]) * 97),
        ..Default::default()
    };
    match kind {
        0..85 => {
            e.action = "coffre.v1.Records/GetRecord".into();
            e.record_ids = vec![record_id(rec)];
            e.purpose = "bench".into();
        }
        85..95 => {
            e.action = "coffre.v1.Records/PutRecord".into();
            e.record_ids = vec![record_id(rec)];
            e.fields = vec![
                "nir".into(),
                "family_name".into(),
                "given_name".into(),
                format!("version={}", 1 + r[14] % 5),
                format!("write={}", hex::encode(&r[16..32])),
            ];
        }
        95..98 => {
            e.action = "coffre.v1.Records/FindRecords".into();
            e.fields = vec!["nir".into()];
            e.purpose = "bench".into();
        }
        _ => {
            e.action = "coffre.v1.Auth/Login".into();
        }
    }
    e
}

async fn generate(audit: Arc<Audit>, n: u64, start_ms: i64) -> f64 {
    let step = (10 * DAY_MS) as f64 / n as f64;
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let audit = audit.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = start_ms + (i as f64 * step) as i64;
                audit.record_dated(event(i, t)).await.unwrap();
                if i > 0 && i.is_multiple_of(1_000_000) {
                    eprintln!("  {i} events");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn child(rt: &tokio::runtime::Runtime, kind: &str, dir: &Path) {
    let base = rss_kib("VmRSS:");
    let audit = rt.block_on(open(dir));
    let opened = rss_kib("VmRSS:");
    match kind {
        "idle" => println!("idle_rss_kib {} {}", opened, opened - base.min(opened)),
        "verify" => {
            let t = Instant::now();
            let v = audit.verify(None).unwrap();
            assert!(v.ok, "{v:?}");
            let secs = t.elapsed().as_secs_f64();
            println!(
                "verify {} {:.0} {}",
                v.checked,
                v.checked as f64 / secs,
                rss_kib("VmHWM:")
            );
        }
        _ => unreachable!(),
    }
}

fn run_child(kind: &str, dir: &Path) -> Vec<String> {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .env("TRAIL_CHILD", kind)
        .env("TRAIL_DIR", dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn main() {
    if let Ok(kind) = std::env::var("TRAIL_CHILD") {
        let rt = tokio::runtime::Runtime::new().unwrap();
        child(
            &rt,
            &kind,
            &PathBuf::from(std::env::var("TRAIL_DIR").unwrap()),
        );
        return;
    }
    let Some(rt) = support::runtime_if_measuring() else {
        return;
    };
    let n: u64 = std::env::var("TRAIL_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    std::fs::write(
        dir.join("bench-audit-key"),
        coffre::crypto::random_array::<32>(),
    )
    .unwrap();
    let empty = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.join("bench-audit-key"),
        empty.path().join("bench-audit-key"),
    )
    .unwrap();
    drop(rt.block_on(open(empty.path())));

    let start_ms = coffre::clock::now_ms() - 11 * DAY_MS;
    let audit = Arc::new(rt.block_on(open(dir)));
    eprintln!("generating {n} events over 10 days, {TASKS} tasks");
    let eps = rt.block_on(generate(audit.clone(), n, start_ms));
    let trail_bytes = audit.disk_bytes();
    println!("trail: {n} events generated at {eps:.0} events/s (durable, {TASKS} tasks)");
    println!(
        "trail: {:.1} MiB on disk, {:.0} bytes/event (segments and indexes)",
        trail_bytes as f64 / (1 << 20) as f64,
        trail_bytes as f64 / n as f64
    );

    // QueryAudit by record id.
    let mut lat = Vec::new();
    let mut found = 0usize;
    for k in 0..1000u64 {
        let id = record_id((k * 7919) % RECORDS);
        let t = Instant::now();
        let events = audit
            .query(&coffre::audit::Query {
                record_id: id,
                ..Default::default()
            })
            .unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        found += events.len();
    }
    println!(
        "query by record id (1000 ids, {:.1} events each): p50 {:.2} ms, p99 {:.2} ms",
        found as f64 / 1000.0,
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );

    // A day of one principal's events: the first one, and all of them.
    let mut first = Vec::new();
    let mut all = Vec::new();
    let mut day_events = 0usize;
    for k in 0..50u64 {
        let day = start_ms + ((k % 9) as i64 + 1) * DAY_MS;
        let q = coffre::audit::Query {
            principal: principal(k * 3 % PRINCIPALS),
            since_unix_ms: day,
            until_unix_ms: day + DAY_MS,
            ..Default::default()
        };
        let t = Instant::now();
        let mut got = false;
        audit
            .query_each(&q, |_| {
                got = true;
                false
            })
            .unwrap();
        first.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(got);
        let t = Instant::now();
        let mut c = 0;
        audit
            .query_each(&q, |_| {
                c += 1;
                true
            })
            .unwrap();
        all.push(t.elapsed().as_secs_f64() * 1000.0);
        day_events += c;
    }
    println!(
        "a principal's day ({} events): first event p50 {:.2} ms, p99 {:.2} ms; whole day p50 {:.1} ms, p99 {:.1} ms",
        day_events / 50,
        pct(&mut first, 0.5),
        pct(&mut first, 0.99),
        pct(&mut all, 0.5),
        pct(&mut all, 0.99)
    );

    // Paging newest first, 100 events a page, ten pages.
    let t = Instant::now();
    let mut before = 0;
    for _ in 0..10 {
        let page = audit
            .query(&coffre::audit::Query {
                limit: 100,
                newest_first: true,
                before_seq: before,
                ..Default::default()
            })
            .unwrap();
        before = page.last().unwrap().seq;
    }
    println!(
        "ten pages of 100, newest first: {:.2} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    drop(audit);
    std::thread::sleep(Duration::from_millis(200));

    let v = run_child("verify", dir);
    println!(
        "verify (fresh process): {} events at {} events/s, peak RSS {:.1} MiB",
        v[1],
        v[2],
        v[3].parse::<f64>().unwrap() / 1024.0
    );
    let idle_full = run_child("idle", dir);
    let idle_empty = run_child("idle", empty.path());
    println!(
        "idle RSS after open: {:.1} MiB with {n} events, {:.1} MiB with none (trail's share {:.1} vs {:.1} MiB)",
        idle_full[1].parse::<f64>().unwrap() / 1024.0,
        idle_empty[1].parse::<f64>().unwrap() / 1024.0,
        idle_full[2].parse::<f64>().unwrap() / 1024.0,
        idle_empty[2].parse::<f64>().unwrap() / 1024.0,
    );
}
