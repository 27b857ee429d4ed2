//! Read budgets against the real server: a stolen account that
//! starts copying a tenant is slowed, stopped, locked and reported, while
//! honest users keep working; honeytokens lock their reader; budgets survive
//! a restart and hold under concurrency.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use coffre::pb;
use common::*;
use tonic::Code;

const AUDITOR_PASSWORD: &str = "quartz meadow 4417 signal heron";

/// A server whose clinicians of tenant `clinic` have the budget `limits`
/// (TOML keys of `[limits.clinician]`), given as a tenant override over a
/// stricter global one, so that both levels of the config are exercised.
async fn server(limits: &str) -> TestServer {
    let root = tempfile::tempdir().unwrap();
    let extra = format!(
        "[limits.clinician]\nreads_per_second = 1.0\nread_burst = 1\n\
         [tenants.clinic.limits.clinician]\n{limits}\n"
    );
    let mut config = test_config_with(root.path(), &extra);
    config.alert_file = Some(root.path().join("alerts.jsonl"));
    let s = TestServer::start_with(root, config).await;
    let admin = s.admin_token().await;
    s.admin()
        .await
        .create_tenant(authed(
            &admin,
            pb::CreateTenantRequest {
                name: "clinic".into(),
                indexed_fields: vec!["nir".into(), "family_name".into(), "blood_group".into()],
            },
        ))
        .await
        .unwrap();
    s.principal("system", "auditor", pb::Role::Auditor, AUDITOR_PASSWORD)
        .await;
    s
}

async fn clinician(s: &TestServer, user: &str) -> String {
    s.principal("clinic", user, pb::Role::Clinician, CLINICIAN_PASSWORD)
        .await;
    s.login("clinic", user, CLINICIAN_PASSWORD).await.unwrap()
}

fn fields(i: u64) -> Vec<(String, String)> {
    coffre::sample::sample_fields(i).into_iter().collect()
}

/// Writes `n` ten-field records (writes spend no read budget) with 16
/// concurrent clients; returns their ids.
async fn seed(s: &TestServer, token: &str, n: u64) -> Vec<String> {
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let ch = s.channel().await;
        let token = token.to_string();
        tasks.push(tokio::spawn(async move {
            let mut r = pb::records_client::RecordsClient::new(ch);
            let mut ids = Vec::new();
            for i in (w..n).step_by(16) {
                let id = format!("p{i:05}");
                let f = fields(i);
                let refs: Vec<(&str, &str)> =
                    f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                r.put_record(authed(&token, put(&id, &refs))).await.unwrap();
                ids.push(id);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    ids.sort();
    ids
}

fn get_for(id: &str, purpose: &str) -> pb::GetRecordRequest {
    pb::GetRecordRequest {
        id: id.into(),
        fields: vec![],
        purpose: purpose.into(),
    }
}

/// Reads `ids` by BulkRead: (records received, the status that ended the
/// stream if any).
async fn bulk(
    r: &mut pb::records_client::RecordsClient<tonic::transport::Channel>,
    token: &str,
    ids: &[String],
) -> (u64, Option<tonic::Status>) {
    let mut stream = match r
        .bulk_read(authed(
            token,
            pb::BulkReadRequest {
                ids: ids.to_vec(),
                fields: vec![],
                purpose: "export".into(),
            },
        ))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => return (0, Some(e)),
    };
    let mut n = 0;
    loop {
        match stream.message().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => return (n, None),
            Err(e) => return (n, Some(e)),
        }
    }
}

async fn alerts(s: &TestServer) -> Vec<pb::Alert> {
    let aud = s
        .login("system", "auditor", AUDITOR_PASSWORD)
        .await
        .unwrap();
    s.alerts(&aud).await
}

/// Issue 4, point 1: one clinician, 8 threads, 5,000 records by GetRecord
/// and BulkRead. It gets at most its budget, is throttled, then locked, an
/// alert names it, and another clinician keeps reading meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scripted_exfiltration_is_capped_locked_and_reported() {
    const BURST: u64 = 60;
    const PER_HOUR: u64 = 150;
    let s = server(&format!(
        "reads_per_second = 5.0\nread_burst = {BURST}\n\
         distinct_records_per_hour = {PER_HOUR}\ndistinct_records_per_day = 400\n\
         lock_after_throttles = 10\n"
    ))
    .await;
    let loader = clinician(&s, "loader").await;
    let ids = Arc::new(seed(&s, &loader, 5000).await);
    let thief = clinician(&s, "dr_x").await;
    let honest = clinician(&s, "dr_h").await;

    // The honest clinician reads a few patients, at a human pace, during
    // the whole attack.
    let attack_over = Arc::new(AtomicBool::new(false));
    let honest_task = {
        let ch = s.channel().await;
        let over = attack_over.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            let mut r = pb::records_client::RecordsClient::new(ch);
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut i = 0;
            while !over.load(Ordering::Relaxed) || ok < 5 {
                match r.get_record(authed(&honest, get(&ids[i % 20]))).await {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (ok, failed)
        })
    };

    let started = std::time::Instant::now();
    let received = Arc::new(AtomicU64::new(0));
    let exhausted = Arc::new(AtomicU64::new(0));
    let denied = Arc::new(AtomicU64::new(0));
    let mut thieves = Vec::new();
    for t in 0..8usize {
        let ch = s.channel().await;
        let (ids, thief) = (ids.clone(), thief.clone());
        let (received, exhausted, denied) = (received.clone(), exhausted.clone(), denied.clone());
        thieves.push(tokio::spawn(async move {
            let mut r = pb::records_client::RecordsClient::new(ch);
            // Each thread takes its share: even threads by GetRecord, odd
            // ones by BulkRead of 100 ids.
            let share: Vec<String> = ids.iter().skip(t).step_by(8).cloned().collect();
            let count = |status: Option<tonic::Status>| match status.map(|s| s.code()) {
                Some(Code::ResourceExhausted) => {
                    exhausted.fetch_add(1, Ordering::Relaxed);
                }
                Some(Code::PermissionDenied | Code::Unauthenticated) => {
                    denied.fetch_add(1, Ordering::Relaxed);
                }
                Some(c) => panic!("unexpected {c:?}"),
                None => {}
            };
            if t % 2 == 0 {
                for id in &share {
                    match r.get_record(authed(&thief, get(id))).await {
                        Ok(_) => {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => count(Some(e)),
                    }
                }
            } else {
                for chunk in share.chunks(100) {
                    let (n, status) = bulk(&mut r, &thief, chunk).await;
                    received.fetch_add(n, Ordering::Relaxed);
                    count(status);
                }
            }
        }));
    }
    for t in thieves {
        t.await.unwrap();
    }
    let attack = started.elapsed();
    attack_over.store(true, Ordering::Relaxed);
    let (honest_ok, honest_failed) = honest_task.await.unwrap();

    let got = received.load(Ordering::Relaxed);
    println!(
        "exfiltration: attempted 5000 records, received {got} (budget: burst {BURST}, \
         {PER_HOUR} distinct/hour); {} RESOURCE_EXHAUSTED, {} refused as locked; \
         all 5000 attempts over in {:.1} s; honest clinician meanwhile: {honest_ok} reads ok, \
         {honest_failed} failed",
        exhausted.load(Ordering::Relaxed),
        denied.load(Ordering::Relaxed),
        attack.as_secs_f64(),
    );
    assert!(got > 0 && got <= PER_HOUR, "received {got}");
    assert!(exhausted.load(Ordering::Relaxed) > 0);
    assert!(denied.load(Ordering::Relaxed) > 0, "the lock stopped calls");
    assert_eq!(honest_failed, 0, "honest reads never failed");

    // Locked: the token is dead and login is refused.
    let mut r = s.records().await;
    let e = r
        .get_record(authed(&thief, get(&ids[0])))
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated),
        "{e:?}"
    );
    let e = s
        .login("clinic", "dr_x", CLINICIAN_PASSWORD)
        .await
        .unwrap_err();
    // A locked account answers like bad credentials at login.
    assert_eq!(e.code(), Code::Unauthenticated);

    let alerts = alerts(&s).await;
    let lock = alerts
        .iter()
        .find(|a| a.kind == "budget_lockout")
        .expect("a lockout alert");
    assert_eq!(lock.principal, "clinic/dr_x");
    assert_eq!(lock.severity, "critical");
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "budget_exceeded" && a.principal == "clinic/dr_x")
    );
    assert!(
        !alerts
            .iter()
            .any(|a| a.principal == "clinic/dr_h" && a.kind != "reader_created"),
        "nothing against the honest clinician (but its creation)"
    );
    // The same alert, as a JSON line for the SIEM.
    let lines = std::fs::read_to_string(s.config.alert_file.as_ref().unwrap()).unwrap();
    let lockout: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["kind"] == "budget_lockout")
        .collect();
    assert_eq!(lockout.len(), 1);
    assert_eq!(lockout[0]["principal"], "clinic/dr_x");
    assert_eq!(lockout[0]["severity"], "critical");
}

/// Issue 4, point 2: a honeytoken read locks within that call, the lock
/// survives a restart, and an administrator's unlock (itself alerted) lets
/// the clinician log in again. A bulk read or a find hit trips it too;
/// an honest find on a common value does not.
#[tokio::test]
async fn honeytokens_lock_their_reader_through_restarts() {
    let mut s = server("read_burst = 1000\nreads_per_second = 1000.0\n").await;
    let writer = clinician(&s, "writer").await;
    let ids = seed(&s, &writer, 20).await;
    let canary = s.honeytoken("clinic").await;
    // Same id form as the server's own ids; same field names as the
    // tenant's records.
    assert!(uuid_like(&canary), "{canary}");
    let vault = s.vault.clone().unwrap();
    let tenant = vault
        .tenants
        .get(&coffre::model::TenantName::parse("clinic").unwrap())
        .await
        .unwrap();
    let canary_id = coffre::model::RecordId::parse(&canary).unwrap();
    let plain = vault.records.get(&tenant, &canary_id, &[]).await.unwrap();
    let real = vault
        .records
        .get(
            &tenant,
            &coffre::model::RecordId::parse(&ids[0]).unwrap(),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        plain.fields.keys().collect::<Vec<_>>(),
        real.fields.keys().collect::<Vec<_>>()
    );

    // An honest find on a common value (a blood group) never hits the
    // canary, whatever its own blood group.
    let honest = clinician(&s, "dr_h").await;
    let mut r = s.records().await;
    for group in ["A+", "A-", "B+", "O+", "O-", "AB+"] {
        let found = r
            .find_records(authed(
                &honest,
                pb::FindRecordsRequest {
                    field: "blood_group".into(),
                    value: group.into(),
                    purpose: "care".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .ids;
        assert!(!found.contains(&canary));
    }

    // GetRecord on the canary: locked within the call.
    let thief = clinician(&s, "dr_x").await;
    let e = r
        .get_record(authed(&thief, get(&canary)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(!e.message().contains(&plain.fields["nir"][..]));
    let e = r
        .get_record(authed(&thief, get(&ids[0])))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "its token stopped at once"
    );

    // A bulk read with the canary in the middle stops there.
    let bulk_thief = clinician(&s, "dr_y").await;
    let mut list = ids[..5].to_vec();
    list.push(canary.clone());
    list.extend_from_slice(&ids[5..10]);
    let (n, status) = bulk(&mut r, &bulk_thief, &list).await;
    assert_eq!(status.unwrap().code(), Code::PermissionDenied);
    assert!(n <= 5, "nothing after the canary: {n}");

    // A find whose result holds the canary (its NIR, from a leaked copy).
    let finder = clinician(&s, "dr_z").await;
    let e = r
        .find_records(authed(
            &finder,
            pb::FindRecordsRequest {
                field: "nir".into(),
                value: plain.fields["nir"].to_string(),
                purpose: "care".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    drop((plain, real, tenant, vault));

    let critical: Vec<_> = alerts(&s)
        .await
        .into_iter()
        .filter(|a| a.kind == "honeytoken_read")
        .collect();
    let mut named: Vec<_> = critical.iter().map(|a| a.principal.clone()).collect();
    named.sort();
    assert_eq!(named, ["clinic/dr_x", "clinic/dr_y", "clinic/dr_z"]);
    assert!(critical.iter().all(|a| a.severity == "critical"));

    // Still locked after a restart; the honest clinician is not.
    s.restart().await;
    let e = s
        .login("clinic", "dr_x", CLINICIAN_PASSWORD)
        .await
        .unwrap_err();
    // A locked account answers like bad credentials at login.
    assert_eq!(e.code(), Code::Unauthenticated);
    s.login("clinic", "dr_h", CLINICIAN_PASSWORD).await.unwrap();

    let admin = s.admin_token().await;
    s.admin()
        .await
        .set_principal_locked(authed(
            &admin,
            pb::SetPrincipalLockedRequest {
                tenant: "clinic".into(),
                username: "dr_x".into(),
                locked: false,
            },
        ))
        .await
        .unwrap();
    let token = s.login("clinic", "dr_x", CLINICIAN_PASSWORD).await.unwrap();
    let mut r = s.records().await;
    r.get_record(authed(&token, get(&ids[1]))).await.unwrap();
    assert!(
        alerts(&s)
            .await
            .iter()
            .any(|a| a.kind == "admin_unlock" && a.principal == "clinic/dr_x")
    );
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Reads `ids` one by one until refused: (served, the refusal).
async fn read_until_refused(
    s: &TestServer,
    token: &str,
    ids: &[String],
    purpose: &str,
) -> (u64, Option<tonic::Status>) {
    let mut r = s.records().await;
    let mut n = 0;
    for id in ids {
        match r.get_record(authed(token, get_for(id, purpose))).await {
            Ok(_) => n += 1,
            Err(e) => return (n, Some(e)),
        }
    }
    (n, None)
}

/// Issue 4, point 3: a restart mid-window refills nothing.
#[tokio::test]
async fn a_restart_does_not_refill_a_budget() {
    let mut s = server(
        "reads_per_second = 1000.0\nread_burst = 1000\n\
         distinct_records_per_hour = 30\nlock_after_throttles = 100\n",
    )
    .await;
    let writer = clinician(&s, "writer").await;
    let ids = seed(&s, &writer, 60).await;
    let token = clinician(&s, "dr_a").await;
    let (before, refused) = read_until_refused(&s, &token, &ids[..20], "care").await;
    assert_eq!((before, refused.is_none()), (20, true));

    s.restart().await;
    let token = s.login("clinic", "dr_a", CLINICIAN_PASSWORD).await.unwrap();
    // Re-reading what the window holds is free of new distinct budget.
    let (again, _) = read_until_refused(&s, &token, &ids[..20], "care").await;
    assert_eq!(again, 20);
    let (after, refused) = read_until_refused(&s, &token, &ids[20..], "care").await;
    let refused = refused.expect("refused at the window's edge");
    println!("restart: {before} distinct reads before, {after} after (hourly limit 30)");
    assert_eq!(before + after, 30);
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("distinct_records_per_hour"),
        "{}",
        refused.message()
    );
    let wait: u64 = refused
        .metadata()
        .get("retry-after")
        .expect("retry-after")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait > 3000 && wait <= 3600, "{wait}");
}

/// Issue 4, point 4: 16 clients of one principal cannot together exceed
/// its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_parallel_clients_share_one_budget_exactly() {
    const BUDGET: u64 = 100;
    let s = server(&format!(
        "reads_per_second = 10000.0\nread_burst = 10000\n\
         distinct_records_per_hour = {BUDGET}\nlock_after_throttles = 100000\n"
    ))
    .await;
    let writer = clinician(&s, "writer").await;
    let ids = Arc::new(seed(&s, &writer, 400).await);
    let token = clinician(&s, "dr_a").await;
    let served = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..16usize {
        let ch = s.channel().await;
        let (ids, token, served) = (ids.clone(), token.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = pb::records_client::RecordsClient::new(ch);
            let share: Vec<String> = ids.iter().skip(c).step_by(16).cloned().collect();
            if c % 4 == 0 {
                let (n, status) = bulk(&mut r, &token, &share).await;
                served.fetch_add(n, Ordering::Relaxed);
                if let Some(status) = status {
                    assert_eq!(status.code(), Code::ResourceExhausted);
                }
            } else {
                for id in &share {
                    match r.get_record(authed(&token, get(id))).await {
                        Ok(_) => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => assert_eq!(e.code(), Code::ResourceExhausted),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let served = served.load(Ordering::Relaxed);
    println!(
        "concurrency: 16 clients, 400 distinct records tried, {served} served (budget {BUDGET})"
    );
    assert_eq!(served, BUDGET);
}

/// Issue 4, point 5: a slow dump just under the hourly limit, over a day
/// simulated on the budgets' clock, meets the daily window.
#[tokio::test]
async fn a_slow_dump_is_stopped_by_the_daily_window() {
    const HOURLY: u64 = 20;
    const DAILY: u64 = 100;
    let s = server(&format!(
        "reads_per_second = 1000.0\nread_burst = 1000\n\
         distinct_records_per_hour = {HOURLY}\ndistinct_records_per_day = {DAILY}\n\
         lock_after_throttles = 100\n"
    ))
    .await;
    let writer = clinician(&s, "writer").await;
    let ids = seed(&s, &writer, 24 * HOURLY).await;
    let token = clinician(&s, "dr_slow").await;
    let clock = s.vault.clone().unwrap();
    let mut total = 0;
    let mut stopped = None;
    for hour in 0..24 {
        let batch: Vec<String> = ids
            .iter()
            .skip((hour * (HOURLY - 1)) as usize)
            .take((HOURLY - 1) as usize)
            .cloned()
            .collect();
        let (n, refused) = read_until_refused(&s, &token, &batch, "care").await;
        total += n;
        if let Some(e) = refused {
            stopped = Some((hour, e));
            break;
        }
        // Only the budgets' clock moves: sessions keep real time.
        clock.budgets.clock().advance(Duration::from_secs(3600));
    }
    let (hour, e) = stopped.expect("the daily window stopped the dump");
    println!(
        "slow dump: {HOURLY} - 1 distinct records an hour, stopped in simulated hour {hour} \
         after {total} records (daily limit {DAILY})"
    );
    assert_eq!(total, DAILY);
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("distinct_records_per_day"),
        "{}",
        e.message()
    );
    // A day after the first reads, the window has room again.
    clock
        .budgets
        .clock()
        .advance(Duration::from_secs(24 * 3600 - hour * 3600 + 60));
    let (n, _) = read_until_refused(&s, &token, &ids[400..401], "care").await;
    assert_eq!(n, 1);
}

/// Break-glass doubles the budget for an hour and raises a warning alert;
/// FindRecords has its own rate.
#[tokio::test]
async fn break_glass_doubles_for_an_hour_and_finds_are_rate_limited() {
    let s = server(
        "reads_per_second = 1000.0\nread_burst = 1000\n\
         distinct_records_per_hour = 10\nfinds_per_minute = 5\nlock_after_throttles = 100\n",
    )
    .await;
    let writer = clinician(&s, "writer").await;
    let ids = seed(&s, &writer, 40).await;
    let token = clinician(&s, "dr_er").await;
    let (n, refused) = read_until_refused(&s, &token, &ids[..15], "care").await;
    assert_eq!(n, 10);
    assert_eq!(refused.unwrap().code(), Code::ResourceExhausted);
    let (n, refused) = read_until_refused(&s, &token, &ids[10..30], "break_glass").await;
    assert_eq!(n, 10, "doubled: 20 distinct in the hour");
    assert_eq!(refused.unwrap().code(), Code::ResourceExhausted);
    let glass: Vec<_> = alerts(&s)
        .await
        .into_iter()
        .filter(|a| a.kind == "break_glass")
        .collect();
    assert_eq!(glass.len(), 1, "one alert per emergency access");
    assert_eq!(glass[0].severity, "warning");
    assert_eq!(glass[0].principal, "clinic/dr_er");

    // Two hours later: the doubling is over, the hour window is empty.
    s.vault
        .as_ref()
        .unwrap()
        .budgets
        .clock()
        .advance(Duration::from_secs(7200));
    let (n, _) = read_until_refused(&s, &token, &ids[20..40], "care").await;
    assert_eq!(n, 10);

    let mut r = s.records().await;
    let find = || pb::FindRecordsRequest {
        field: "nir".into(),
        value: "nobody".into(),
        purpose: "care".into(),
    };
    for _ in 0..5 {
        r.find_records(authed(&token, find())).await.unwrap();
    }
    let e = r.find_records(authed(&token, find())).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("finds_per_minute"), "{}", e.message());
}

/// A read's only durable write is its audit event: budget spends live in
/// memory and come back from the trail after a restart (the test above),
/// the session's last use is rewritten at most once a minute.
#[tokio::test]
async fn a_read_writes_nothing_but_its_audit_event() {
    if !runs_on(
        &["sled"],
        "on PostgreSQL a read also writes its spend to the budget row every node shares",
    ) {
        return;
    }
    let s = TestServer::start_faulty().await;
    let clin = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    for i in 0..30 {
        r.put_record(authed(&clin, put(&format!("p{i}"), &[("nir", "1")])))
            .await
            .unwrap();
    }
    // The first read loads the principal's budget (and may store that it
    // exists); from then on reads add nothing to the key-value store.
    r.get_record(authed(&clin, get("p0"))).await.unwrap();
    let faults = s.faults.clone().unwrap();
    let audit = &s.vault.as_ref().unwrap().audit;
    let (writes, head) = (faults.writes(), audit.head().0);
    for i in 1..30 {
        r.get_record(authed(&clin, get(&format!("p{i}"))))
            .await
            .unwrap();
    }
    let e = r.get_record(authed(&clin, get("nope"))).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut st = r
        .bulk_read(authed(
            &clin,
            pb::BulkReadRequest {
                ids: vec!["p1".into(), "p2".into()],
                fields: vec![],
                purpose: "care".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    while st.message().await.unwrap().is_some() {}
    assert_eq!(
        faults.writes(),
        writes,
        "31 reads and a bulk read wrote to the key-value store"
    );
    assert_eq!(audit.head().0, head + 31, "one event each");
}

/// After a restart the budget comes back from the trail; the first read
/// call must not find its own event there and count its reads twice (a
/// BulkRead's event is written before its records are read).
#[tokio::test]
async fn the_first_read_after_a_restart_is_not_counted_twice() {
    // One token a millisecond: 300 reads need 300 ms of refill since the
    // last spend the budget knows of.
    let root = tempfile::tempdir().unwrap();
    let config = test_config_with(
        root.path(),
        "[limits.clinician]\nreads_per_second = 1000.0\nread_burst = 1000\n\
         distinct_records_per_hour = 100000\ndistinct_records_per_day = 100000\n",
    );
    let mut s = TestServer::start_with(root, config).await;
    let clin = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    let ids: Vec<String> = (0..300).map(|i| format!("p{i}")).collect();
    for id in &ids {
        r.put_record(authed(&clin, put(id, &[("nir", "1")])))
            .await
            .unwrap();
    }
    for round in 0..3 {
        s.restart().await;
        // Well past the last spend: the bucket has refilled since.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let clin = s.login("clinic", "dr_a", CLINICIAN_PASSWORD).await.unwrap();
        let mut r = s.records().await;
        let mut st = r
            .bulk_read(authed(
                &clin,
                pb::BulkReadRequest {
                    ids: ids.clone(),
                    fields: vec![],
                    purpose: "care".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let mut n = 0;
        while let Some(_rec) = st.message().await.unwrap() {
            n += 1;
        }
        assert_eq!(n, ids.len(), "round {round}");
    }
}
