//! The storage interface's contract, run against every backend in
//! [`BACKENDS`] (a new one joins by one line): atomic batches, scans in
//! bounded chunks, counts, and the consistent cut under concurrent writers.
//! PostgreSQL runs as a throwaway cluster the test starts (skipped, loudly,
//! where the server package is absent).

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use coffre::store::{Batch, Space, Storage};

/// A fresh, empty store of one backend, and what keeps it alive.
type Opened = (Storage, Box<dyn std::any::Any + Send>);

/// Every backend the contract runs against.
const BACKENDS: &[&str] = &["sled", "postgres"];

/// A fresh, empty store of `name`, or `None` where it cannot run here.
async fn open(name: &str) -> Option<Opened> {
    match name {
        "sled" => Some(sled()),
        "postgres" => postgres().await,
        other => panic!("no backend {other}"),
    }
}

async fn postgres() -> Option<Opened> {
    let pg = common::pg::PgCluster::start()?;
    let backend = coffre::store::PostgresBackend::open(&coffre::store::PostgresOptions {
        url: pg.url("postgres"),
        pool_size: 8,
    })
    .await
    .unwrap();
    Some((Storage::new(Arc::new(backend)), Box::new(pg)))
}

fn sled() -> Opened {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open_sled(
        dir.path(),
        &coffre::store::SledOptions {
            cache_capacity_bytes: 1 << 22,
        },
    )
    .unwrap();
    (s, Box::new(dir))
}

fn key(i: u64) -> Vec<u8> {
    format!("k{i:08}").into_bytes()
}

#[tokio::test]
async fn scans_stream_in_key_order_and_count() {
    for name in BACKENDS {
        let Some((s, _keep)) = open(name).await else {
            continue;
        };
        for chunk in 0..3u64 {
            let mut b = Batch::new();
            for i in chunk * 1000..(chunk + 1) * 1000 {
                b.put(Space::Records, key(i), i.to_be_bytes().to_vec());
            }
            s.commit(b).await.unwrap();
        }
        let mut b = Batch::new();
        b.put(Space::Index, key(1), b"other space".to_vec());
        s.commit(b).await.unwrap();
        let mut seen = Vec::new();
        s.scan_each(Space::Records, b"k", |k, v| {
            seen.push((k.to_vec(), v.to_vec()));
            true
        })
        .await
        .unwrap();
        assert_eq!(seen.len(), 3000, "{name}");
        assert!(
            seen.windows(2).all(|w| w[0].0 < w[1].0),
            "{name}: key order"
        );
        assert_eq!(seen[1234].1, 1234u64.to_be_bytes(), "{name}");
        assert_eq!(s.count(Space::Records, b"").await.unwrap(), 3000, "{name}");
        assert_eq!(
            s.count(Space::Records, b"k00001").await.unwrap(),
            1000,
            "{name}"
        );
        assert_eq!(s.count(Space::Index, b"").await.unwrap(), 1, "{name}");
        let mut first = 0;
        s.scan_each(Space::Records, b"", |_, _| {
            first += 1;
            first < 10
        })
        .await
        .unwrap();
        assert_eq!(first, 10, "{name}: a scan stops when asked");
    }
}

/// Writers keep rewriting pairs of keys in one batch (`a<i>` and `b<i>`,
/// the same value) and deleting and re-creating others while a cut is
/// taken and scanned: the cut must show every pair equal (no batch half
/// seen), no value written after it, and the keys deleted after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_is_one_instant_while_writers_run() {
    for name in BACKENDS {
        let Some((s, _keep)) = open(name).await else {
            continue;
        };
        const PAIRS: u64 = 200;
        let mut b = Batch::new();
        for i in 0..PAIRS {
            b.put(
                Space::Records,
                format!("a{i:04}"),
                0u64.to_be_bytes().to_vec(),
            );
            b.put(
                Space::Records,
                format!("b{i:04}"),
                0u64.to_be_bytes().to_vec(),
            );
            b.put(Space::Index, format!("d{i:04}"), b"present".to_vec());
        }
        s.commit(b).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let version = Arc::new(AtomicU64::new(0));
        // Deletions start once the cut is open: it must still show them.
        let cut_open = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..4u64 {
            let (s, stop, version) = (s.clone(), stop.clone(), version.clone());
            let cut_open = cut_open.clone();
            writers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let v = version.fetch_add(1, Ordering::SeqCst) + 1;
                    let i = (n * 4 + w) % PAIRS;
                    let mut b = Batch::new();
                    b.put(Space::Records, format!("a{i:04}"), v.to_be_bytes().to_vec());
                    b.put(Space::Records, format!("b{i:04}"), v.to_be_bytes().to_vec());
                    if cut_open.load(Ordering::SeqCst) {
                        b.delete(Space::Index, format!("d{i:04}"));
                    }
                    s.apply(b).await.unwrap();
                    n += 1;
                    tokio::task::yield_now().await;
                }
                n
            }));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (cut, at) = s
            .cut_between_calls(|| version.load(Ordering::SeqCst))
            .await
            .unwrap();
        cut_open.store(true, Ordering::SeqCst);
        // Let the writers move well past the cut before reading through it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut a = std::collections::BTreeMap::new();
        let mut b = std::collections::BTreeMap::new();
        cut.scan(Space::Records, b"", |k, v| {
            let v = u64::from_be_bytes(v.try_into().unwrap());
            let (side, i) = k.split_at(1);
            if side == b"a" {
                a.insert(i.to_vec(), v);
            } else {
                b.insert(i.to_vec(), v);
            }
            true
        })
        .await
        .unwrap();
        let present = cut.count(Space::Index, b"").await.unwrap();
        stop.store(true, Ordering::Relaxed);
        let mut writes = 0;
        for w in writers {
            writes += w.await.unwrap();
        }
        assert_eq!(a.len() as u64, PAIRS, "{name}");
        assert_eq!(a, b, "{name}: a batch seen in half");
        let newest = a.values().copied().max().unwrap();
        assert!(newest <= at, "{name}: the cut shows a write made after it");
        let live_present = s.count(Space::Index, b"").await.unwrap();
        assert_eq!(
            present, PAIRS,
            "{name}: keys deleted after the cut are in it"
        );
        assert!(live_present < PAIRS, "{name}: the writers did delete");
        println!(
            "{name}: cut held writes {:?}; {writes} writes ran, {} keys changed after the cut; {} index keys at the cut, {live_present} now",
            cut.held(),
            cut.changed(),
            present
        );
    }
}

/// A cut read chunk by chunk (as a backup reads it, awaiting between
/// chunks) while writers delete and re-create keys ahead of and behind the
/// scan, rewrite others, and create new ones: every key of the cut comes
/// out exactly once, with its value at the cut, and no key made since.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_read_in_chunks_holds_each_key_once_while_keys_come_and_go() {
    for name in BACKENDS {
        let Some((s, _keep)) = open(name).await else {
            continue;
        };
        const KEYS: u64 = 3000;
        let mut b = Batch::new();
        for i in 0..KEYS {
            b.put(Space::Records, format!("k{i:05}"), b"cut".to_vec());
        }
        s.commit(b).await.unwrap();
        let (cut, ()) = s.cut_between_calls(|| ()).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..3u64 {
            let (s, stop) = (s.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let i = (n * 7919 + w * 1013) % KEYS;
                    let key = format!("k{i:05}");
                    let mut b = Batch::new();
                    match n % 3 {
                        // Deleted, then back with another value.
                        0 => {
                            s.apply({
                                let mut d = Batch::new();
                                d.delete(Space::Records, key.clone());
                                d
                            })
                            .await
                            .unwrap();
                            tokio::task::yield_now().await;
                            b.put(Space::Records, key, b"after".to_vec());
                        }
                        1 => b.put(Space::Records, key, b"after".to_vec()),
                        _ => b.put(Space::Records, format!("{key}new{w}"), b"new".to_vec()),
                    }
                    s.apply(b).await.unwrap();
                    n += 1;
                    tokio::task::yield_now().await;
                }
                n
            }));
        }
        let mut seen = std::collections::BTreeMap::new();
        let mut chunks = cut.chunks(Space::Records, b"");
        let mut n_chunks = 0;
        while let Some(rows) = chunks.next().await.unwrap() {
            n_chunks += 1;
            for (k, v) in rows {
                *seen.entry(k.clone()).or_insert(0) += 1;
                assert_eq!(v, b"cut", "{name}: a value written after the cut");
            }
            // Long enough for writers on a network database to act between
            // chunks too.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let mut writes = 0;
        for w in writers {
            writes += w.await.unwrap();
        }
        assert!(
            n_chunks > 3 && writes > 100,
            "{name}: {n_chunks} chunks, {writes} writes"
        );
        assert_eq!(seen.len() as u64, KEYS, "{name}: keys missing or added");
        assert!(
            seen.values().all(|n| *n == 1),
            "{name}: a key came out twice"
        );
    }
}

#[test]
fn a_throwaway_postgresql_starts_answers_and_stops() {
    let Some(pg) = common::pg::PgCluster::start() else {
        return;
    };
    assert_eq!(pg.sql("postgres", "select 40 + 2"), "42");
    pg.sql("postgres", "create extension if not exists pgcrypto");
    let v = pg.sql(
        "postgres",
        "select pgp_sym_decrypt(pgp_sym_encrypt('x', 'k'), 'k')",
    );
    assert_eq!(v, "x");
    let port = pg.port;
    drop(pg);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "stopped at the end"
    );
}

/// Through a running server: a cut taken while clients write holds exactly
/// the writes whose audit events are at or before the trail's head it
/// captured — no write without its event, no event without its write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_between_calls_matches_the_trail_head() {
    let s = common::TestServer::start().await;
    let clin = s
        .tenant_with("clinic", "dr_a", coffre::pb::Role::Clinician)
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..8 {
        let (stop, clin, ch) = (stop.clone(), clin.clone(), s.channel().await);
        writers.push(tokio::spawn(async move {
            let mut r = coffre::pb::records_client::RecordsClient::new(ch);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                r.put_record(common::authed(
                    &clin,
                    common::put(&format!("w{t}-{n}"), &[("nir", "1")]),
                ))
                .await
                .unwrap();
                n += 1;
            }
            n
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = s.vault.clone().unwrap();
    let (cut, head) = v
        .store
        .cut_between_calls(|| v.audit.head().0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut puts = 0;
    for w in writers {
        puts += w.await.unwrap();
    }
    let mut in_cut = std::collections::BTreeSet::new();
    cut.scan(Space::Records, b"clinic\0", |k, _| {
        in_cut.insert(String::from_utf8(k[b"clinic\0".len()..].to_vec()).unwrap());
        true
    })
    .await
    .unwrap();
    let events = v
        .audit
        .query(&coffre::audit::Query {
            action: "PutRecord".into(),
            outcome: "ok".into(),
            ..Default::default()
        })
        .unwrap();
    let (before, after): (Vec<_>, Vec<_>) = events.iter().partition(|e| e.seq <= head);
    let written: std::collections::BTreeSet<String> =
        before.iter().map(|e| e.record_ids[0].clone()).collect();
    assert!(!after.is_empty(), "writes went on after the cut");
    assert_eq!(in_cut, written);
    println!(
        "{puts} puts; the cut (writes held {:?}) holds {} records, the {} events at or before seq {head}",
        cut.held(),
        in_cut.len(),
        before.len()
    );
}

/// A conditional batch is a read-modify-write no concurrent writer can
/// undo: 8 writers each add 1 fifty times to one counter (read, add, apply
/// expecting what was read, again on a conflict), and none is lost; a
/// conflicting batch writes nothing, not even its other keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_batches_lose_no_update_under_concurrency() {
    for name in BACKENDS {
        let Some((s, _keep)) = open(name).await else {
            continue;
        };
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut conflicts = 0u64;
                for i in 0..50u64 {
                    loop {
                        let now = s.get(Space::Counters, b"n").await.unwrap();
                        let n = now
                            .as_deref()
                            .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()));
                        let mut b = Batch::new();
                        b.expect(Space::Counters, b"n".to_vec(), now);
                        b.put(
                            Space::Counters,
                            b"n".to_vec(),
                            (n + 1).to_be_bytes().to_vec(),
                        );
                        b.put(Space::Records, key(w * 1000 + i), b"side".to_vec());
                        match s.apply(b).await {
                            Ok(()) => break,
                            Err(coffre::store::StorageError::Conflict) => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            }));
        }
        let mut conflicts = 0;
        for t in tasks {
            conflicts += t.await.unwrap();
        }
        let n = s.get(Space::Counters, b"n").await.unwrap().unwrap();
        assert_eq!(u64::from_be_bytes(n.try_into().unwrap()), 400, "{name}");
        assert_eq!(s.count(Space::Records, b"k").await.unwrap(), 400, "{name}");
        // A stale condition: nothing of the batch lands.
        let mut b = Batch::new();
        b.expect(
            Space::Counters,
            b"n".to_vec(),
            Some(7u64.to_be_bytes().to_vec()),
        );
        b.put(Space::Records, b"stale".to_vec(), b"x".to_vec());
        assert!(matches!(
            s.apply(b).await,
            Err(coffre::store::StorageError::Conflict)
        ));
        assert!(s.get(Space::Records, b"stale").await.unwrap().is_none());
        println!("{name}: 400 conditional increments, {conflicts} retried after a conflict");
    }
}
