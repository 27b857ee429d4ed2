//! A login flood (200 concurrent failing logins, Argon2id at its default
//! cost) must not stop another client's record reads. This reports the read
//! latency before and during the flood; it asserts that reads keep
//! succeeding, not a timing (figures go to BENCHMARKS.md).

mod common;

use std::time::{Duration, Instant};

use coffre::{config::Config, pb};
use common::*;

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_during_a_login_flood() {
    let root = tempfile::tempdir().unwrap();
    let mut config: Config = test_config(root.path());
    // The production default cost: this test is about its load.
    config.argon2 = Default::default();
    let s = TestServer::start_with(root, config).await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    for i in 0..20 {
        r.put_record(authed(
            &token,
            put(&format!("p{i}"), &[("nir", "1"), ("name", "x")]),
        ))
        .await
        .unwrap();
    }
    let read_for = |until: Box<dyn Fn() -> bool + Send>| {
        let mut r = r.clone();
        let token = token.clone();
        async move {
            let mut lat = Vec::new();
            let mut i = 0;
            while !until() {
                let t = Instant::now();
                r.get_record(authed(&token, get(&format!("p{}", i % 20))))
                    .await
                    .expect("reads succeed during the flood");
                lat.push(t.elapsed().as_micros() as u64);
                i += 1;
            }
            lat
        }
    };
    let end = Instant::now() + Duration::from_secs(2);
    let mut before = read_for(Box::new(move || Instant::now() > end)).await;

    let flood_start = Instant::now();
    let mut logins = Vec::new();
    for i in 0..200 {
        let ch = s.channel().await;
        logins.push(tokio::spawn(async move {
            pb::auth_client::AuthClient::new(ch)
                .login(pb::LoginRequest {
                    otp: Default::default(),
                    tenant: "clinic".into(),
                    username: format!("guess{i}"),
                    password: "not the password at all".into(),
                })
                .await
        }));
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let reader = tokio::spawn(read_for(Box::new(move || {
        d.load(std::sync::atomic::Ordering::Relaxed)
    })));
    let mut refused = 0;
    for l in logins {
        let e = l.await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        refused += 1;
    }
    let flood_secs = flood_start.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut during = reader.await.unwrap();
    assert_eq!(refused, 200);
    assert!(!during.is_empty(), "reads completed during the flood");
    println!(
        "login flood: 200 failing logins took {flood_secs:.1} s; GetRecord before: {} reads p50 {:.2} ms p99 {:.2} ms; during: {} reads p50 {:.2} ms p99 {:.2} ms",
        before.len(),
        pct(&mut before, 0.5),
        pct(&mut before, 0.99),
        during.len(),
        pct(&mut during, 0.5),
        pct(&mut during, 0.99),
    );
}
