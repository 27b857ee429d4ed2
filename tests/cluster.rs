//! Several Coffre nodes on one PostgreSQL database: real `coffre serve`
//! processes on loopback ports sharing a throwaway cluster. One budget
//! however a thief spreads its reads, locks and logouts seen by every node,
//! one version sequence per record, a node's death and the database's
//! restart survived. These tests always run on PostgreSQL (skipped, loudly,
//! where its server package is absent), whatever `COFFRE_TEST_BACKEND`.

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use coffre::pb::{
    self, admin_client::AdminClient, auth_client::AuthClient, records_client::RecordsClient,
};
use common::*;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client};

/// A vault on a database of `pg`, and the config its nodes share.
struct Vault {
    root: tempfile::TempDir,
    config: PathBuf,
}

/// Writes the config of a vault on a new database of `pg`, with `extra`
/// TOML (limits).
fn vault_on(pg: &pg::PgCluster, extra: &str) -> Vault {
    let root = tempfile::tempdir().unwrap();
    let config = write_node_config(root.path(), &pg.new_database(), extra, "coffre.toml");
    Vault { root, config }
}

fn write_node_config(root: &Path, url: &str, extra: &str, name: &str) -> PathBuf {
    let text = format!(
        "dev = true\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nmaster_key_file = {:?}\n\
         [argon2]\nm_kib = 64\nt = 1\np = 1\n\
         [storage]\nbackend = \"postgres\"\npostgres_url = {url:?}\npool_size = 8\n{extra}\n",
        root.join("data"),
        root.join("keys").join("master.key"),
    );
    let path = root.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts a node of `v` (the first one bootstraps the admin and makes the
/// dev key file; start it alone).
fn node(v: &Vault) -> Proc {
    spawn_server(
        &v.config,
        &[("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)],
    )
    .unwrap()
}

async fn health(addr: &str) -> Option<ServingStatus> {
    let ch = tonic::transport::Channel::from_shared(addr.to_string())
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        health_client::HealthClient::new(ch).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .ok()?
    .ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

async fn wait_health(addr: &str, want: ServingStatus, within: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < within {
        if health(addr).await == Some(want) {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{addr}: not {want:?} within {within:?}");
}

/// Makes `system/auditor` through the node at `addr` and logs it in.
async fn auditor(addr: &str) -> String {
    let admin = bin_login(addr, "system", "admin", ADMIN_PASSWORD).await;
    AdminClient::new(chan(addr).await)
        .create_principal(authed(
            &admin,
            pb::CreatePrincipalRequest {
                oidc: Default::default(),
                tenant: "system".into(),
                username: "auditor".into(),
                password: AUDITOR_PASSWORD.into(),
                role: pb::Role::Auditor as i32,
            },
        ))
        .await
        .unwrap();
    bin_login(addr, "system", "auditor", AUDITOR_PASSWORD).await
}

async fn seed(addr: &str, token: &str, n: usize, prefix: &str) -> Vec<String> {
    let mut r = RecordsClient::new(chan(addr).await);
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}{i:04}");
        r.put_record(authed(token, put(&id, &[("nir", &format!("{i}"))])))
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

const THIEF_LIMITS: &str = "[limits.clinician]\nreads_per_second = 1000.0\nread_burst = 1000\n\
     distinct_records_per_hour = 40\ndistinct_records_per_day = 1000\nfinds_per_minute = 100\n\
     lock_after_throttles = 4\n";

/// A stolen account reading over both nodes with 8 threads reads what it
/// would on one (40 distinct records an hour), is locked on both, and an
/// honest colleague keeps reading on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exfiltration_split_over_two_nodes_reads_one_budget() {
    let Some(pg) = pg::shared() else { return };
    let v = vault_on(pg, THIEF_LIMITS);
    let a = node(&v);
    let b = node(&v);
    let pw = CLINICIAN_PASSWORD;
    bin_setup(
        &a.addr,
        &[
            ("clinic", "loader", pw, pb::Role::Clinician),
            ("clinic", "dr_x", pw, pb::Role::Clinician),
            ("clinic", "dr_h", pw, pb::Role::Clinician),
        ],
    )
    .await;
    let loader = bin_login(&a.addr, "clinic", "loader", pw).await;
    let ids = Arc::new(seed(&a.addr, &loader, 200, "p").await);
    let thief = bin_login(&b.addr, "clinic", "dr_x", pw).await;
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let addr = if t % 2 == 0 { &a.addr } else { &b.addr };
        let ch = chan(addr).await;
        let (ids, thief, received) = (ids.clone(), thief.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = RecordsClient::new(ch);
            for id in ids.iter().skip(t).step_by(8) {
                match r.get_record(authed(&thief, get(id))).await {
                    Ok(_) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.code() == Code::ResourceExhausted => {}
                    Err(e)
                        if matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated) =>
                    {
                        return;
                    }
                    Err(e) => panic!("unexpected {e:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = received.load(Ordering::Relaxed);
    assert_eq!(got, 40, "one budget over two nodes");
    // Locked on both: its token, and a new login.
    for n in [&a, &b] {
        let e = RecordsClient::new(chan(&n.addr).await)
            .get_record(authed(&thief, get(&ids[0])))
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated),
            "{e:?}"
        );
        let e = AuthClient::new(chan(&n.addr).await)
            .login(pb::LoginRequest {
                otp: Default::default(),
                tenant: "clinic".into(),
                username: "dr_x".into(),
                password: pw.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    // The honest colleague reads on both.
    let honest = bin_login(&a.addr, "clinic", "dr_h", pw).await;
    for n in [&a, &b] {
        let mut r = RecordsClient::new(chan(&n.addr).await);
        for id in ids.iter().take(5) {
            r.get_record(authed(&honest, get(id))).await.unwrap();
        }
    }
    println!(
        "cluster: thief over 2 nodes x 8 threads read {got} of a budget of 40; locked on both"
    );
}

/// A token from one node works on the other; a lock, a logout and a
/// password change on one count on the other at its next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_logouts_and_tokens_cross_nodes() {
    let Some(pg) = pg::shared() else { return };
    let v = vault_on(pg, ROOMY_LIMITS);
    let a = node(&v);
    let b = node(&v);
    let pw = CLINICIAN_PASSWORD;
    bin_setup(&a.addr, &[("clinic", "dr_a", pw, pb::Role::Clinician)]).await;
    let admin = bin_login(&b.addr, "system", "admin", ADMIN_PASSWORD).await;
    let tok = bin_login(&a.addr, "clinic", "dr_a", pw).await;
    seed(&b.addr, &tok, 1, "x").await;
    let read = async |addr: &str, tok: &str| {
        RecordsClient::new(chan(addr).await)
            .get_record(authed(tok, get("x0000")))
            .await
            .map(|_| ())
            .map_err(|e| e.code())
    };
    assert_eq!(
        read(&b.addr, &tok).await,
        Ok(()),
        "a token from A works on B"
    );
    // Locked on B: refused on A at once.
    let lock = |locked: bool| pb::SetPrincipalLockedRequest {
        tenant: "clinic".into(),
        username: "dr_a".into(),
        locked,
    };
    AdminClient::new(chan(&b.addr).await)
        .set_principal_locked(authed(&admin, lock(true)))
        .await
        .unwrap();
    let e = read(&a.addr, &tok).await.unwrap_err();
    assert!(
        matches!(e, Code::PermissionDenied | Code::Unauthenticated),
        "{e:?}"
    );
    AdminClient::new(chan(&a.addr).await)
        .set_principal_locked(authed(&admin, lock(false)))
        .await
        .unwrap();
    // A logout on B: the token is refused on A.
    let tok = bin_login(&a.addr, "clinic", "dr_a", pw).await;
    assert_eq!(read(&a.addr, &tok).await, Ok(()));
    AuthClient::new(chan(&b.addr).await)
        .logout(authed(&tok, pb::LogoutRequest {}))
        .await
        .unwrap();
    assert_eq!(read(&a.addr, &tok).await, Err(Code::Unauthenticated));
    // A password change on A revokes the other sessions on B.
    let t1 = bin_login(&b.addr, "clinic", "dr_a", pw).await;
    let t2 = bin_login(&a.addr, "clinic", "dr_a", pw).await;
    AuthClient::new(chan(&a.addr).await)
        .change_password(authed(
            &t2,
            pb::ChangePasswordRequest {
                old_password: pw.into(),
                new_password: "orchid lantern 7731 basalt wren".into(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(read(&b.addr, &t1).await, Err(Code::Unauthenticated));
}

/// 16 clients over two nodes rewrite the same four records: every
/// acknowledged write has its own version, versions run 1..=n per record
/// without a gap, and the stored record is the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_clients_on_two_nodes_lose_no_update() {
    let Some(pg) = pg::shared() else { return };
    let v = vault_on(pg, ROOMY_LIMITS);
    let a = node(&v);
    let b = node(&v);
    let pw = CLINICIAN_PASSWORD;
    bin_setup(&a.addr, &[("clinic", "dr_a", pw, pb::Role::Clinician)]).await;
    let tok = bin_login(&a.addr, "clinic", "dr_a", pw).await;
    let mut tasks = Vec::new();
    for c in 0..16u64 {
        let addr = if c % 2 == 0 { &a.addr } else { &b.addr };
        let ch = chan(addr).await;
        let tok = tok.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = RecordsClient::new(ch);
            let mut acked = Vec::new();
            for i in 0..20u64 {
                let id = format!("shared{}", (c + i) % 4);
                let value = format!("{c}-{i}");
                let w = r
                    .put_record(authed(&tok, put(&id, &[("nir", &value)])))
                    .await
                    .unwrap()
                    .into_inner();
                acked.push((id, w.version, value));
            }
            acked
        }));
    }
    let mut by_record: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for t in tasks {
        for (id, version, value) in t.await.unwrap() {
            by_record.entry(id).or_default().push((version, value));
        }
    }
    let mut r = RecordsClient::new(chan(&b.addr).await);
    for (id, mut writes) in by_record {
        writes.sort();
        let versions: Vec<u64> = writes.iter().map(|w| w.0).collect();
        let expect: Vec<u64> = (1..=writes.len() as u64).collect();
        assert_eq!(
            versions, expect,
            "{id}: each acknowledged write its own version"
        );
        let rec = r
            .get_record(authed(&tok, get(&id)))
            .await
            .unwrap()
            .into_inner()
            .record
            .unwrap();
        let last = writes.last().unwrap();
        assert_eq!(rec.version, last.0);
        assert_eq!(
            rec.fields["nir"], last.1,
            "{id}: the stored record is the last write"
        );
    }
}

/// `kill -9` of one node while both take writes: the other keeps serving,
/// and every acknowledged write and its event is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_one_node_under_load_loses_nothing_acknowledged() {
    let Some(pg) = pg::shared() else { return };
    let v = vault_on(pg, ROOMY_LIMITS);
    let mut a = node(&v);
    let b = node(&v);
    let pw = CLINICIAN_PASSWORD;
    bin_setup(&a.addr, &[("clinic", "dr_a", pw, pb::Role::Clinician)]).await;
    let tok = bin_login(&a.addr, "clinic", "dr_a", pw).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        let addr = if w % 2 == 0 {
            a.addr.clone()
        } else {
            b.addr.clone()
        };
        let (tok, stop) = (tok.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let Ok(ch) = tonic::transport::Channel::from_shared(addr)
                .unwrap()
                .connect()
                .await
            else {
                return acked;
            };
            let mut r = RecordsClient::new(ch);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("w{w}-{i}");
                if r.put_record(authed(&tok, put(&id, &[("nir", &id)])))
                    .await
                    .is_ok()
                {
                    acked.push(id);
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // SIGKILL: no drain, no flush.
    a.child.kill().unwrap();
    let _ = a.child.wait();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut on_b = 0;
    for (w, t) in tasks.into_iter().enumerate() {
        let got = t.await.unwrap();
        if w % 2 == 1 {
            on_b += got.len();
        }
        acked.extend(got);
    }
    assert!(on_b > 10, "B kept serving ({on_b} writes)");
    let mut r = RecordsClient::new(chan(&b.addr).await);
    for id in &acked {
        let rec = r
            .get_record(authed(&tok, get(id)))
            .await
            .unwrap_or_else(|e| panic!("{id} acknowledged, then lost: {e:?}"));
        assert_eq!(rec.into_inner().record.unwrap().fields["nir"], *id);
    }
    let aud = auditor(&b.addr).await;
    let mut au = pb::audit_client::AuditClient::new(chan(&b.addr).await);
    let v = au
        .verify_audit(authed(&aud, pb::VerifyAuditRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    let mut with_events = HashSet::new();
    let mut st = au
        .query_audit(authed(
            &aud,
            pb::QueryAuditRequest {
                action: "coffre.v1.Records/PutRecord".into(),
                outcome: "ok".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    while let Some(e) = st.message().await.unwrap() {
        with_events.extend(e.record_ids);
    }
    for id in &acked {
        assert!(
            with_events.contains(id),
            "{id}: acknowledged without its event"
        );
    }
    println!(
        "cluster: kill -9 of one node: {} acknowledged writes ({on_b} on the survivor) all there, trail verified ({} events)",
        acked.len(),
        v.checked
    );
}

/// PostgreSQL stopped under load: calls fail UNAVAILABLE (never data
/// without its event), both nodes say NOT_SERVING, and both serve again
/// by themselves once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_under_load_fails_closed_and_heals() {
    // A cluster of its own: this test stops it.
    let Some(pg) = pg::PgCluster::start() else {
        return;
    };
    let v = vault_on(&pg, ROOMY_LIMITS);
    let a = node(&v);
    let b = node(&v);
    let pw = CLINICIAN_PASSWORD;
    bin_setup(&a.addr, &[("clinic", "dr_a", pw, pb::Role::Clinician)]).await;
    let tok = bin_login(&a.addr, "clinic", "dr_a", pw).await;
    let ids = seed(&a.addr, &tok, 10, "r").await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for addr in [a.addr.clone(), b.addr.clone()] {
        let (tok, stop, ids) = (tok.clone(), stop.clone(), ids.clone());
        readers.push(tokio::spawn(async move {
            let mut r = RecordsClient::new(chan(&addr).await);
            let (mut ok, mut unavailable) = (0u64, 0u64);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let call = r.get_record(authed(&tok, get(&ids[i % ids.len()])));
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(e)) => {
                        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                        unavailable += 1;
                    }
                    Err(_) => panic!("{addr}: a call hung while the database was down"),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, unavailable)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.stop();
    for n in [&a, &b] {
        wait_health(&n.addr, ServingStatus::NotServing, Duration::from_secs(15)).await;
    }
    pg.start_again();
    let mut healed = Vec::new();
    for n in [&a, &b] {
        healed.push(wait_health(&n.addr, ServingStatus::Serving, Duration::from_secs(30)).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let (ok, unavailable) = r.await.unwrap();
        assert!(
            ok > 5 && unavailable > 0,
            "ok {ok}, unavailable {unavailable}"
        );
    }
    // Every read that answered is in the trail, which verifies.
    let tok = bin_login(&b.addr, "clinic", "dr_a", pw).await;
    RecordsClient::new(chan(&b.addr).await)
        .get_record(authed(&tok, get(&ids[0])))
        .await
        .unwrap();
    println!(
        "cluster: PostgreSQL restarted under load: both nodes NOT_SERVING, then SERVING again after {healed:?}"
    );
}

/// A node whose `[limits]` differ from the running nodes' refuses to
/// start, in one line naming the difference.
#[tokio::test]
async fn a_node_with_other_limits_refuses_to_start() {
    let Some(pg) = pg::shared() else { return };
    let v = vault_on(pg, THIEF_LIMITS);
    let _a = node(&v);
    let url = std::fs::read_to_string(&v.config)
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("postgres_url = ")
                .map(|u| u.trim_matches('"').to_string())
        })
        .unwrap();
    let other = write_node_config(
        v.root.path(),
        &url,
        &THIEF_LIMITS.replace("read_burst = 1000", "read_burst = 5000"),
        "other.toml",
    );
    let e = spawn_server(&other, &[]).err().expect("refused");
    assert!(e.contains("limits.clinician.read_burst"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
}

/// The migration path: a backup of a vault on sled restores into an empty
/// PostgreSQL database, every record and the trail come along (with the
/// restore marked), two nodes serve it, and a second restore into the
/// now-used database is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_backup_restores_into_postgres_and_serves_on_two_nodes() {
    let Some(pg) = pg::shared() else { return };
    // The vault on sled.
    let old = tempfile::tempdir().unwrap();
    let sled_cfg = old.path().join("sled.toml");
    std::fs::write(
        &sled_cfg,
        format!(
            "dev = true\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nmaster_key_file = {:?}\n\
             [argon2]\nm_kib = 64\nt = 1\np = 1\n[storage]\nmin_free_mib = 1\n{ROOMY_LIMITS}",
            old.path().join("data"),
            old.path().join("keys").join("master.key"),
        ),
    )
    .unwrap();
    let s = spawn_server(
        &sled_cfg,
        &[("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)],
    )
    .unwrap();
    let pw = CLINICIAN_PASSWORD;
    bin_setup(&s.addr, &[("clinic", "dr_a", pw, pb::Role::Clinician)]).await;
    let tok = bin_login(&s.addr, "clinic", "dr_a", pw).await;
    let ids = seed(&s.addr, &tok, 50, "m").await;
    let admin = bin_login(&s.addr, "system", "admin", ADMIN_PASSWORD).await;
    let mut st = AdminClient::new(chan(&s.addr).await)
        .backup(authed(&admin, pb::BackupRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(c) = st.message().await.unwrap() {
        bytes.extend_from_slice(&c.data);
    }
    drop(s);
    let file = old.path().join("vault.coffre-backup");
    std::fs::write(&file, &bytes).unwrap();

    // Into PostgreSQL, with the same master key.
    let v = vault_on(pg, ROOMY_LIMITS);
    let key_dir = v.root.path().join("keys");
    std::fs::create_dir_all(&key_dir).unwrap();
    // The key and its shred list travel together.
    for f in ["master.key", "master.key.shredded"] {
        std::fs::copy(old.path().join("keys").join(f), key_dir.join(f)).unwrap();
    }
    let restore = || {
        std::process::Command::new(bin())
            .args(["restore", "--config"])
            .arg(&v.config)
            .arg("--from")
            .arg(&file)
            .output()
            .unwrap()
    };
    let out = restore();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = spawn_server(&v.config, &[]).unwrap();
    let b = spawn_server(&v.config, &[]).unwrap();
    let tok = bin_login(&b.addr, "clinic", "dr_a", pw).await;
    for (i, id) in ids.iter().enumerate() {
        let n = if i % 2 == 0 { &a } else { &b };
        let rec = RecordsClient::new(chan(&n.addr).await)
            .get_record(authed(&tok, get(id)))
            .await
            .unwrap()
            .into_inner()
            .record
            .unwrap();
        assert_eq!(rec.fields["nir"], format!("{i}"));
    }
    let aud = auditor(&a.addr).await;
    let verified = pb::audit_client::AuditClient::new(chan(&b.addr).await)
        .verify_audit(authed(&aud, pb::VerifyAuditRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.restores.len(), 1, "the restore is in the trail");
    // The database now holds a vault: a second restore is refused.
    let out = restore();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("already holds a vault"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
}

/// Two states an operator must act on, found by a running node within
/// seconds: the trail's head gone backwards in the database (a failover to
/// a standby that lacked acknowledged events) and a schema newer than the
/// node (another node upgraded). Each makes the node refuse calls
/// (UNAVAILABLE) and say NOT_SERVING; the first raises a critical alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_gone_backwards_or_a_newer_schema_stops_a_node() {
    let Some(pg) = pg::shared() else { return };
    for case in ["head", "schema"] {
        let v = vault_on(pg, ROOMY_LIMITS);
        let alerts = v.root.path().join("alerts.jsonl");
        let text = std::fs::read_to_string(&v.config).unwrap();
        std::fs::write(
            &v.config,
            text.replacen(
                "dev = true\n",
                &format!("dev = true\nalert_file = {alerts:?}\n"),
                1,
            ),
        )
        .unwrap();
        let a = node(&v);
        let pw = CLINICIAN_PASSWORD;
        bin_setup(&a.addr, &[("clinic", "dr_a", pw, pb::Role::Clinician)]).await;
        let tok = bin_login(&a.addr, "clinic", "dr_a", pw).await;
        seed(&a.addr, &tok, 3, "h").await;
        let db = std::fs::read_to_string(&v.config)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("postgres_url = "))
            .and_then(|u| u.trim_matches('"').rsplit('/').next().map(str::to_string))
            .unwrap();
        match case {
            // The last frames lost, as on a standby that lacked them.
            "head" => pg.sql(
                &db,
                "BEGIN; DELETE FROM coffre_audit_frame WHERE first_seq > (SELECT max(first_seq) - 3 FROM coffre_audit_frame); \
                 UPDATE coffre_audit_head SET seq = (SELECT max(last_seq) FROM coffre_audit_frame); COMMIT;",
            ),
            _ => pg.sql(&db, "INSERT INTO coffre_schema (version) VALUES (99)"),
        };
        let took = wait_health(&a.addr, ServingStatus::NotServing, Duration::from_secs(15)).await;
        let e = RecordsClient::new(chan(&a.addr).await)
            .get_record(authed(&tok, get("h0000")))
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::Unavailable | Code::Unauthenticated),
            "{case}: {e:?}"
        );
        if case == "head" {
            let lines = std::fs::read_to_string(&alerts).unwrap();
            assert!(lines.contains("trail_head_moved_backwards"), "{lines}");
        } else {
            // A node of this build refuses to start on the newer schema.
            let e = spawn_server(&v.config, &[]).err().expect("refused");
            assert!(e.contains("newer"), "{e}");
            assert_eq!(e.trim().lines().count(), 1, "{e}");
        }
        println!("cluster: {case}: NOT_SERVING after {took:?}");
    }
}

/// The other two check-then-acts nodes race on, from 8 at once: a key
/// job's lease goes to exactly one node, and 8 concurrent changes of the
/// key store row all land (each made on top of the others).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_has_one_holder_and_key_store_changes_all_land() {
    let Some(pg) = pg::shared() else { return };
    let opts = coffre::store::PostgresOptions {
        url: pg.new_database(),
        pool_size: 8,
    };
    let backend = Arc::new(coffre::store::PostgresBackend::open(&opts).await.unwrap());
    let store = coffre::store::Storage::new(backend.clone()).shared_with_other_nodes();
    let tenant = coffre::model::TenantName::parse("clinic").unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let node = coffre::cluster::Node {
            id: coffre::crypto::random_array::<16>(),
            backend: backend.clone(),
        };
        let (store, tenant) = (store.clone(), tenant.clone());
        tasks.push(tokio::spawn(async move {
            node.take_lease(&store, &tenant).await.unwrap()
        }));
    }
    let mut holders = 0;
    for t in tasks {
        holders += usize::from(t.await.unwrap());
    }
    assert_eq!(holders, 1, "one node holds a tenant's key job");

    let row = coffre::store::postgres::KeyStoreRow::new(&opts);
    let mut changes = Vec::new();
    for i in 0..8u8 {
        let row = row.clone();
        changes.push(tokio::task::spawn_blocking(move || {
            row.modify(|current| {
                let mut bytes = current.unwrap_or_default();
                bytes.push(i);
                Ok::<_, coffre::store::StorageError>((bytes, ()))
            })
            .unwrap()
        }));
    }
    for c in changes {
        c.await.unwrap();
    }
    let (version, mut bytes) = row.read().unwrap().unwrap();
    bytes.sort();
    assert_eq!(bytes, (0..8).collect::<Vec<u8>>(), "no change lost");
    assert_eq!(version, 8);
}
