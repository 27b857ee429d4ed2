//! Backups, restores and scrubs, against the real server and the real
//! `coffre` binary: a consistent backup while writers write, restored and
//! read back; a backup file that holds no secret; any changed byte, a
//! truncation, another key or a non-empty target refused with nothing
//! written; `kill -9` during a backup and during a restore; scrub finding a
//! flipped field and a rolled-back record; shredded tenants that stay
//! shredded; scheduled backups.

mod common;

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use coffre::{
    config::Config,
    pb::{self, admin_client::AdminClient, audit_client::AuditClient},
    store::{Batch, Space},
};
use common::*;

/// Streams `Admin/Backup` into `path`; the manifest.
/// Whether this run's backend takes `coffre backup` (the embedded one; a
/// PostgreSQL vault is backed up with the database's own tools), saying
/// so when it does not.
fn backups_here() -> bool {
    runs_on(
        &["sled"],
        "backups of a PostgreSQL vault are the database's own in this release",
    )
}

async fn take_backup(s: &TestServer, admin: &str, path: &Path) -> coffre::backup::Manifest {
    let mut st = s
        .admin()
        .await
        .backup(authed(admin, pb::BackupRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(c) = st.message().await.unwrap() {
        bytes.extend_from_slice(&c.data);
    }
    std::fs::write(path, &bytes).unwrap();
    coffre::backup::read_manifest(&mut &bytes[..]).unwrap().0
}

/// A copy of the config file `from` with `key` set to `value`, at `to`.
fn config_with(from: &Path, key: &str, value: &Path, to: &Path) {
    let text = std::fs::read_to_string(from).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|l| match l.starts_with(key) {
            true => format!("{key} = {value:?}"),
            false => l.to_string(),
        })
        .collect();
    std::fs::write(to, text.join("\n")).unwrap();
}

/// A copy of the test server's config file with another data directory.
fn config_for(root: &Path, data: &Path) -> PathBuf {
    let path = data.with_extension("toml");
    config_with(&root.join("coffre.toml"), "data_dir", data, &path);
    path
}

fn load(path: &Path) -> Config {
    let mut c = Config::load_with_env(Some(path), |_| None).unwrap();
    c.connections.refused_burst = 1_000_000;
    c.connections.refused_per_second = 1_000_000.0;
    c
}

fn cli(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("COFFRE_TOKEN")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// Whether `dir` is missing or empty, and no staging directory is left.
fn nothing_written(dir: &Path) {
    let empty = std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none());
    assert!(empty, "{} got files", dir.display());
    let staging = coffre::ops::restore::staging_dir(dir);
    assert!(!staging.exists(), "{} left behind", staging.display());
}

/// A server started on a restored data directory.
async fn start_on(config: &Path) -> TestServer {
    TestServer::start_with(tempfile::tempdir().unwrap(), load(config)).await
}

async fn verify_ok(s: &TestServer, auditor: &str) -> pb::VerifyAuditResponse {
    let v = AuditClient::new(s.channel().await)
        .verify_audit(authed(auditor, pb::VerifyAuditRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "audit verify failed: {}", v.reason);
    v
}

fn fields_of(i: usize, w: usize) -> Vec<(String, String)> {
    ["family_name", "given_name", "nir", "address", "note"]
        .iter()
        .map(|f| (f.to_string(), format!("BK{w}x{i:04}{f}Zq-Émile")))
        .collect()
}

/// A write acknowledged at a time: id and fields.
type Acked = (Instant, String, Vec<(String, String)>);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_while_four_writers_write_restores_every_acknowledged_write() {
    if !backups_here() {
        return;
    }
    let s = TestServer::start().await;
    let admin = s.admin_token().await;
    let clin = s.tenant_with("ward", "dr_a", pb::Role::Clinician).await;
    // Acknowledged writes: id → fields, with when they were acknowledged.
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (acked, stop, clin) = (acked.clone(), stop.clone(), clin.clone());
        let mut r = s.records().await;
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let id = format!("w{w}-{i}");
                let f = fields_of(i, w);
                let refs: Vec<(&str, &str)> =
                    f.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                r.put_record(authed(&clin, put(&id, &refs))).await.unwrap();
                acked.lock().unwrap().push((Instant::now(), id, f));
                i += 1;
            }
        }));
    }
    let canary = s.honeytoken("ward").await;
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let began = Instant::now();
    let file = s.root.path().join("live.backup");
    let manifest = take_backup(&s, &admin, &file).await;
    // Writers go on a little after the backup, then stop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let before: Vec<_> = acked
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _, _)| *at < began)
        .map(|(_, id, f)| (id.clone(), f.clone()))
        .collect();
    let all = acked.lock().unwrap().len();
    assert!(before.len() >= 200 && all > before.len());

    let restored = s.root.path().join("restored");
    let cfg = config_for(s.root.path(), &restored);
    let out = cli(&[
        "restore",
        "--config",
        cfg.to_str().unwrap(),
        "--from",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "restore: {}", stderr(&out));

    let r2 = start_on(&cfg).await;
    let clin2 = r2.login("ward", "dr_a", CLINICIAN_PASSWORD).await.unwrap();
    let mut rec = r2.records().await;
    for (id, f) in &before {
        let got = rec
            .get_record(authed(&clin2, get(id)))
            .await
            .unwrap_or_else(|e| panic!("{id} acknowledged before the backup is missing: {e}"))
            .into_inner()
            .record
            .unwrap();
        let want: std::collections::HashMap<String, String> = f.iter().cloned().collect();
        assert_eq!(got.fields, want, "{id}");
    }
    // The blind index came along: a search finds a record by its nir.
    let (id0, f0) = &before[0];
    let nir = f0.iter().find(|(k, _)| k == "nir").unwrap().1.clone();
    let found = rec
        .find_records(authed(
            &clin2,
            pb::FindRecordsRequest {
                field: "nir".into(),
                value: nir,
                purpose: "care".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert_eq!(found, vec![id0.clone()]);
    // Exactly the writes whose events are at or before the head: one
    // stored record per PutRecord event in the restored trail.
    let auditor = system_auditor(&r2).await;
    let puts = events(
        &r2,
        &auditor,
        pb::QueryAuditRequest {
            tenant: "ward".into(),
            action: "coffre.v1.Records/PutRecord".into(),
            outcome: "ok".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(puts.iter().all(|e| e.seq <= manifest.audit_head_seq));
    let restored_vault = r2.vault.as_ref().unwrap();
    let in_store = restored_vault
        .store
        .count(Space::Records, b"ward\0")
        .await
        .unwrap();
    // (plus the honeytoken, a record with no PutRecord event)
    assert_eq!(in_store, puts.len() as u64 + 1);
    assert_eq!(
        manifest
            .tenants
            .iter()
            .find(|t| t.name == "ward")
            .unwrap()
            .records,
        in_store
    );
    // The restore is in the trail, as such: verify passes and names it.
    let v = verify_ok(&r2, &auditor).await;
    assert_eq!(v.restores.len(), 1);
    assert_eq!(v.restores[0].backup_head_seq, manifest.audit_head_seq);
    assert_eq!(v.restores[0].seq, manifest.audit_head_seq + 1);
    assert_eq!(
        v.restores[0].backup_created_unix_ms,
        manifest.created_unix_ms
    );
    let alerts = r2.alerts(&auditor).await;
    assert!(alerts.iter().any(|a| a.kind == "restore"));
    // Sessions are not in a backup: the old tokens are unknown here.
    let e = rec
        .get_record(authed(&clin, get(&before[0].0)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    // The honeytoken came along too: reading it locks the reader.
    let e = rec
        .get_record(authed(&clin2, get(&canary)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn a_backup_file_holds_no_value_password_or_token() {
    if !backups_here() {
        return;
    }
    let s = TestServer::start().await;
    let admin = s.admin_token().await;
    let clin = s.tenant_with("ward", "dr_a", pb::Role::Clinician).await;
    let mut secrets = vec![
        ADMIN_PASSWORD.to_string(),
        CLINICIAN_PASSWORD.to_string(),
        admin.clone(),
        clin.clone(),
    ];
    let mut r = s.records().await;
    for i in 0..40 {
        let f = fields_of(i, 9);
        let refs: Vec<(&str, &str)> = f.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        r.put_record(authed(&clin, put(&format!("p{i}"), &refs)))
            .await
            .unwrap();
        secrets.extend(f.into_iter().map(|(_, v)| v));
    }
    let portal = "portal secret 4471 Zq lantern";
    r.set_secret(authed(
        &clin,
        pb::SetSecretRequest {
            record_id: "p1".into(),
            name: "portal".into(),
            secret: portal.into(),
        },
    ))
    .await
    .unwrap();
    secrets.push(portal.into());
    let file = s.root.path().join("b.backup");
    take_backup(&s, &admin, &file).await;
    let bytes = std::fs::read(&file).unwrap();
    let mut found = Vec::new();
    for secret in &secrets {
        for form in forms(secret.as_bytes()) {
            if contains(&bytes, &form) {
                found.push(secret.clone());
            }
        }
    }
    assert!(
        found.is_empty(),
        "{} secrets in the backup file",
        found.len()
    );
    // Nor record ids, usernames or field names: the entries are encrypted.
    for clear in ["p17", "dr_a", "family_name", "PutRecord"] {
        assert!(!contains(&bytes, clear.as_bytes()), "{clear} in clear");
    }
}

#[tokio::test]
async fn a_changed_byte_a_truncation_another_key_or_a_full_target_is_refused_with_nothing_written()
{
    if !backups_here() {
        return;
    }
    let s = TestServer::start().await;
    let admin = s.admin_token().await;
    let clin = s.tenant_with("ward", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    for i in 0..300 {
        let f = fields_of(i, 1);
        let refs: Vec<(&str, &str)> = f.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        r.put_record(authed(&clin, put(&format!("p{i}"), &refs)))
            .await
            .unwrap();
    }
    let root = s.root.path();
    let good = root.join("good.backup");
    take_backup(&s, &admin, &good).await;
    let bytes = std::fs::read(&good).unwrap();
    let cfg_main = root.join("coffre.toml");
    let ok = cli(&[
        "backup",
        "verify",
        "--config",
        cfg_main.to_str().unwrap(),
        good.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(report["records"], 300);
    assert_eq!(report["fields"], 1500);
    assert!(report["events"].as_u64().unwrap() > 300);

    let target = root.join("target");
    let cfg = config_for(root, &target);
    let refuse = |file: &Path, what: &str| {
        let v = cli(&[
            "backup",
            "verify",
            "--config",
            cfg.to_str().unwrap(),
            file.to_str().unwrap(),
        ]);
        assert!(!v.status.success(), "verify accepted {what}");
        let e = stderr(&v);
        assert_eq!(e.lines().count(), 1, "{what}: {e}");
        let o = cli(&[
            "restore",
            "--config",
            cfg.to_str().unwrap(),
            "--from",
            file.to_str().unwrap(),
        ]);
        assert!(!o.status.success(), "restore accepted {what}");
        assert_eq!(stderr(&o).lines().count(), 1, "{what}: {}", stderr(&o));
        nothing_written(&target);
        e
    };
    let manifest_len = coffre::backup::read_manifest(&mut &bytes[..])
        .unwrap()
        .1
        .len();
    for at in [
        16,
        manifest_len - 3,
        manifest_len + 10,
        bytes.len() / 2,
        bytes.len() - 40,
        bytes.len() - 1,
    ] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x20;
        let f = root.join(format!("flip{at}.backup"));
        std::fs::write(&f, &bad).unwrap();
        refuse(&f, &format!("a byte flipped at {at}"));
    }
    let cut = root.join("cut.backup");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = refuse(&cut, "a truncated file");
    assert!(e.contains("truncated"), "{e}");

    // Another master key: the message names the key the backup needs.
    let other_key = root.join("other.key");
    let o = cli(&["keygen", "--out", other_key.to_str().unwrap()]);
    assert!(o.status.success());
    let other_cfg = root.join("other.toml");
    config_with(&cfg, "master_key_file", &other_key, &other_cfg);
    let m = coffre::backup::read_manifest(&mut &bytes[..]).unwrap().0;
    for args in [
        vec![
            "backup",
            "verify",
            "--config",
            other_cfg.to_str().unwrap(),
            good.to_str().unwrap(),
        ],
        vec![
            "restore",
            "--config",
            other_cfg.to_str().unwrap(),
            "--from",
            good.to_str().unwrap(),
        ],
    ] {
        let o = cli(&args);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(
            e.contains(&m.key_id()) && e.contains("another master key"),
            "{e}"
        );
    }
    nothing_written(&target);
    let id = cli(&[
        "keys",
        "check-value",
        "--key",
        root.join("keys/master.key").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&id.stdout).contains(&m.key_id()));

    // A non-empty target.
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("something"), b"x").unwrap();
    let o = cli(&[
        "restore",
        "--config",
        cfg.to_str().unwrap(),
        "--from",
        good.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 1);
    std::fs::remove_file(target.join("something")).unwrap();
    // The good file restores into the (now empty) directory.
    let o = cli(&[
        "restore",
        "--config",
        cfg.to_str().unwrap(),
        "--from",
        good.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[tokio::test]
async fn kill_9_during_a_backup_leaves_no_backup_and_the_server_restarts_clean() {
    if !backups_here() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let cfg = write_config(root.path(), "");
    let env = [("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)];
    let mut p = spawn_server(&cfg, &env).unwrap();
    bin_setup(
        &p.addr,
        &[("clinic", "dr_a", CLINICIAN_PASSWORD, pb::Role::Clinician)],
    )
    .await;
    let clin = bin_login(&p.addr, "clinic", "dr_a", CLINICIAN_PASSWORD).await;
    let mut r = pb::records_client::RecordsClient::new(chan(&p.addr).await);
    let big = "x".repeat(8000);
    for i in 0..400 {
        r.put_record(authed(
            &clin,
            put(&format!("p{i}"), &[("note", big.as_str())]),
        ))
        .await
        .unwrap();
    }
    let admin = bin_login(&p.addr, "system", "admin", ADMIN_PASSWORD).await;
    let mut st = AdminClient::new(chan(&p.addr).await)
        .backup(authed(&admin, pb::BackupRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = st.message().await.unwrap().unwrap();
    let partial = root.path().join("partial.backup");
    let mut bytes = first.data;
    p.child.kill().unwrap(); // SIGKILL
    p.child.wait().unwrap();
    while let Ok(Some(c)) = st.message().await {
        bytes.extend_from_slice(&c.data);
    }
    std::fs::write(&partial, &bytes).unwrap();
    let v = cli(&[
        "backup",
        "verify",
        "--config",
        cfg.to_str().unwrap(),
        partial.to_str().unwrap(),
    ]);
    assert!(!v.status.success(), "a partial backup passed verify");
    assert!(stderr(&v).contains("truncated"), "{}", stderr(&v));
    // The CLI never leaves a file under the name asked for.
    let p = spawn_server(&cfg, &[]).unwrap();
    let out = root.path().join("cli.backup");
    let o = Command::new(bin())
        .args(["--addr", &p.addr, "backup", "--out", out.to_str().unwrap()])
        .env(
            "COFFRE_TOKEN",
            bin_login(&p.addr, "system", "admin", ADMIN_PASSWORD).await,
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists() && !root.path().join("cli.backup.partial").exists());
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let v = cli(&[
        "backup",
        "verify",
        "--config",
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(v.status.success(), "{}", stderr(&v));
    // The restarted server's trail is whole.
    let auditor_ok = AuditClient::new(chan(&p.addr).await)
        .verify_audit(authed(
            &admin_or_auditor(&p.addr).await,
            pb::VerifyAuditRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(auditor_ok.ok, "{}", auditor_ok.reason);
}

/// An auditor of `system` on a child-process server.
async fn admin_or_auditor(addr: &str) -> String {
    let admin = bin_login(addr, "system", "admin", ADMIN_PASSWORD).await;
    let _ = AdminClient::new(chan(addr).await)
        .create_principal(authed(
            &admin,
            pb::CreatePrincipalRequest {
                oidc: Default::default(),
                tenant: "system".into(),
                username: "aud".into(),
                password: AUDITOR_PASSWORD.into(),
                role: pb::Role::Auditor as i32,
            },
        ))
        .await;
    bin_login(addr, "system", "aud", AUDITOR_PASSWORD).await
}

#[tokio::test]
async fn kill_9_during_a_restore_leaves_the_target_empty_and_a_rerun_works() {
    if !backups_here() {
        return;
    }
    let s = TestServer::start().await;
    let admin = s.admin_token().await;
    let clin = s.tenant_with("ward", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    let big = "y".repeat(2000);
    for i in 0..3000 {
        r.put_record(authed(
            &clin,
            put(
                &format!("p{i}"),
                &[("note", big.as_str()), ("nir", "1850775")],
            ),
        ))
        .await
        .unwrap();
    }
    let root = s.root.path();
    let file = root.join("big.backup");
    take_backup(&s, &admin, &file).await;
    let target = root.join("target");
    let cfg = config_for(root, &target);
    let staging = coffre::ops::restore::staging_dir(&target);
    let mut killed_in_staging = false;
    for _ in 0..5 {
        let mut child = Command::new(bin())
            .args([
                "restore",
                "--config",
                cfg.to_str().unwrap(),
                "--from",
                file.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !staging.exists() && Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        if staging.exists() {
            killed_in_staging = true;
            nothing_written_but_staging(&target);
            break;
        }
        // Finished before the kill: start over.
        let _ = std::fs::remove_dir_all(&target);
    }
    assert!(killed_in_staging, "never caught the restore while it wrote");
    let o = cli(&[
        "restore",
        "--config",
        cfg.to_str().unwrap(),
        "--from",
        file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "rerun: {}", stderr(&o));
    assert!(!staging.exists());
    let r2 = start_on(&cfg).await;
    let clin2 = r2.login("ward", "dr_a", CLINICIAN_PASSWORD).await.unwrap();
    let got = r2
        .records()
        .await
        .get_record(authed(&clin2, get("p2999")))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(got.fields["note"], big);
    verify_ok(&r2, &system_auditor(&r2).await).await;
}

fn nothing_written_but_staging(target: &Path) {
    let empty = std::fs::read_dir(target).map_or(true, |mut d| d.next().is_none());
    assert!(empty, "a killed restore wrote into the target");
}

// The CLI runs as a child process against this in-process server: more
// than one runtime thread, so the server answers while the test waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_a_flipped_field_and_a_rolled_back_record_and_passes_a_clean_vault() {
    let mut s = TestServer::start().await;
    let clin = s.tenant_with("ward", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    let fields = [("nir", "185077512345678"), ("allergy", "penicillin")];
    for i in 0..40 {
        r.put_record(authed(&clin, put(&format!("p{i}"), &fields)))
            .await
            .unwrap();
    }
    let scrub = async |s: &TestServer| {
        let admin = s.admin_token().await;
        let mut st = s
            .admin()
            .await
            .scrub(authed(&admin, pb::ScrubRequest {}))
            .await
            .unwrap()
            .into_inner();
        let mut last = BTreeMap::new();
        while let Some(p) = st.message().await.unwrap() {
            last.insert(p.tenant.clone(), p);
        }
        last
    };
    let clean = scrub(&s).await;
    assert_eq!(clean[""].failed, 0);
    assert_eq!(clean["ward"].checked, 40);
    assert_eq!(clean["ward"].total, 40);
    assert_eq!(clean[""].checked, 40);

    // p3's first write kept aside, then p3 written again.
    s.stop().await;
    let rkey = |id: &str| format!("ward\0{id}").into_bytes();
    let old_p3 = s
        .raw_store()
        .await
        .get(Space::Records, &rkey("p3"))
        .await
        .unwrap()
        .unwrap();
    s.restart().await;
    let clin = s.login("ward", "dr_a", CLINICIAN_PASSWORD).await.unwrap();
    s.records()
        .await
        .put_record(authed(&clin, put("p3", &[("nir", "2")])))
        .await
        .unwrap();
    s.stop().await;
    {
        let store = s.raw_store().await;
        let mut b = Batch::new();
        b.put(Space::Records, rkey("p3"), old_p3);
        // One byte of p7's allergy ciphertext flipped: past the name, the
        // value's tag and length, the field header and nonce.
        let mut p7 = store
            .get(Space::Records, &rkey("p7"))
            .await
            .unwrap()
            .unwrap();
        let name = p7.windows(7).position(|w| w == b"allergy").unwrap();
        let at = name + 7 + 2 + 5 + 12 + 2;
        p7[at] ^= 1;
        b.put(Space::Records, rkey("p7"), p7);
        // p11 deleted behind the vault's back: the trail's last write of
        // it is a Put.
        b.delete(Space::Records, rkey("p11"));
        store.apply(b).await.unwrap();
        store.flush_blocking().unwrap();
    }
    s.restart().await;
    let found = scrub(&s).await;
    assert_eq!(found["ward"].failed, 3, "{found:?}");
    assert_eq!(found[""].failed, 3);
    let auditor = system_auditor(&s).await;
    let alerts = s.alerts(&auditor).await;
    let a = alerts
        .iter()
        .find(|a| a.kind == "scrub_failed")
        .expect("a scrub_failed alert");
    assert_eq!(a.tenant, "ward");
    let ev = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            action: "alert/scrub_failed".into(),
            ..Default::default()
        },
    )
    .await;
    let mut ids = ev[0].record_ids.clone();
    ids.sort();
    assert_eq!(
        ids,
        vec!["p11".to_string(), "p3".to_string(), "p7".to_string()]
    );
    // The CLI exits non-zero and names no value.
    let o = Command::new(bin())
        .args(["--addr", &s.addr, "scrub"])
        .env("COFFRE_TOKEN", s.admin_token().await)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(
        all.contains("3 failed") || all.contains("3 records failed"),
        "{all}"
    );
    assert!(!all.contains("penicillin") && !all.contains("185077512345678"));
}

#[tokio::test]
async fn a_shredded_tenant_does_not_come_back_from_an_older_backup_unless_overridden() {
    if !backups_here() {
        return;
    }
    let s = TestServer::start().await;
    let admin = s.admin_token().await;
    let gone = s.tenant_with("gone", "dr_g", pb::Role::Clinician).await;
    let stay = s.tenant_with("stay", "dr_s", pb::Role::Clinician).await;
    let mut r = s.records().await;
    for (t, tok) in [("gone", &gone), ("stay", &stay)] {
        for i in 0..20 {
            r.put_record(authed(tok, put(&format!("{t}{i}"), &[("nir", "1850775")])))
                .await
                .unwrap();
        }
    }
    let root = s.root.path();
    let file = root.join("before-shred.backup");
    take_backup(&s, &admin, &file).await;
    s.admin()
        .await
        .shred_tenant(authed(
            &admin,
            pb::ShredTenantRequest {
                tenant: "gone".into(),
                confirm: "gone".into(),
            },
        ))
        .await
        .unwrap();
    let list = std::fs::read_to_string(root.join("keys/master.key.shredded")).unwrap();
    assert!(list.lines().any(|l| l.starts_with("gone\t")), "{list}");

    // 1. A plain restore leaves it out.
    let t1 = root.join("plain");
    let cfg1 = config_for(root, &t1);
    let o = cli(&[
        "restore",
        "--config",
        cfg1.to_str().unwrap(),
        "--from",
        file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("left out as shredded: gone"));
    {
        let r1 = start_on(&cfg1).await;
        assert!(r1.login("gone", "dr_g", CLINICIAN_PASSWORD).await.is_err());
        let stay1 = r1.login("stay", "dr_s", CLINICIAN_PASSWORD).await.unwrap();
        r1.records()
            .await
            .get_record(authed(&stay1, get("stay3")))
            .await
            .unwrap();
        let v = r1.vault.as_ref().unwrap();
        assert_eq!(v.store.count(Space::Records, b"gone\0").await.unwrap(), 0);
        assert!(v.keys.is_shredded("gone"));
        let e = r1
            .admin()
            .await
            .create_tenant(authed(
                &r1.admin_token().await,
                pb::CreateTenantRequest {
                    name: "gone".into(),
                    indexed_fields: vec![],
                },
            ))
            .await
            .unwrap_err();
        assert_ne!(e.code(), tonic::Code::Ok);
    }

    // 2. A copy of the data directory from before the shred (not a
    // backup) is caught at open: shredded again, alerted.
    let t2 = root.join("copy");
    let cfg2 = config_for(root, &t2);
    let o = cli(&[
        "restore",
        "--config",
        cfg2.to_str().unwrap(),
        "--from",
        file.to_str().unwrap(),
        "--restore-shredded",
        "gone",
        "--reason",
        "court order 2026-117",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The override took it off the list: put it back, as if this copy had
    // been made before the shred by other means.
    let list_path = root.join("keys/master.key.shredded");
    let now = std::fs::read_to_string(&list_path).unwrap();
    let line = now.lines().find(|l| l.starts_with("gone\t")).unwrap();
    assert!(
        line.contains("\trestored="),
        "the line stays, marked: {now}"
    );
    std::fs::write(&list_path, &list).unwrap();
    {
        let r2 = start_on(&cfg2).await;
        let auditor = system_auditor(&r2).await;
        let alerts = r2.alerts(&auditor).await;
        assert!(
            alerts
                .iter()
                .any(|a| a.kind == "shredded_tenant_returned" && a.tenant == "gone")
        );
        assert!(
            alerts
                .iter()
                .any(|a| a.kind == "shred_override" && a.tenant == "gone")
        );
        assert!(r2.login("gone", "dr_g", CLINICIAN_PASSWORD).await.is_err());
        let v = r2.vault.as_ref().unwrap();
        assert_eq!(v.store.count(Space::Records, b"gone\0").await.unwrap(), 0);
    }

    // 3. The audited override brings it back (a court order).
    let t3 = root.join("override");
    let cfg3 = config_for(root, &t3);
    let no_reason = cli(&[
        "restore",
        "--config",
        cfg3.to_str().unwrap(),
        "--from",
        file.to_str().unwrap(),
        "--restore-shredded",
        "gone",
    ]);
    assert!(!no_reason.status.success());
    nothing_written(&t3);
    let o = cli(&[
        "restore",
        "--config",
        cfg3.to_str().unwrap(),
        "--from",
        file.to_str().unwrap(),
        "--restore-shredded",
        "gone",
        "--reason",
        "court order 2026-117",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r3 = start_on(&cfg3).await;
    let g3 = r3.login("gone", "dr_g", CLINICIAN_PASSWORD).await.unwrap();
    r3.records()
        .await
        .get_record(authed(&g3, get("gone5")))
        .await
        .unwrap();
    let auditor = system_auditor(&r3).await;
    let ev = events(
        &r3,
        &auditor,
        pb::QueryAuditRequest {
            action: "alert/shred_override".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(ev[0].purpose.contains("court order 2026-117"));
}

#[tokio::test]
async fn scheduled_backups_keep_the_last_ones_and_a_failure_is_alerted() {
    if !backups_here() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("backups");
    let config = test_config_with(
        root.path(),
        &format!("{ROOMY_LIMITS}\n[backup]\ndir = {dir:?}\ninterval_hours = 0.0002\nkeep = 2\n"),
    );
    let s = TestServer::start_with(root, config).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let list = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        v.retain(|p| p.extension().is_some_and(|x| x == "backup"));
        v.sort();
        v
    };
    let auditor = system_auditor(&s).await;
    loop {
        let n = events(
            &s,
            &auditor,
            pb::QueryAuditRequest {
                action: "backup/scheduled".into(),
                ..Default::default()
            },
        )
        .await
        .len();
        if n >= 4 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} scheduled backups in 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let files = list();
    assert!(files.len() <= 2 && !files.is_empty(), "{files:?}");
    let cfg = s.root.path().join("coffre.toml");
    for f in &files {
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let v = cli(&[
            "backup",
            "verify",
            "--config",
            cfg.to_str().unwrap(),
            f.to_str().unwrap(),
        ]);
        // The newest may be renamed away by `keep` while we look.
        if f.exists() {
            assert!(v.status.success(), "{}: {}", f.display(), stderr(&v));
        }
    }
    drop(s);

    // A backup.dir that cannot be written: an alert.
    let root = tempfile::tempdir().unwrap();
    let blocker = root.path().join("not-a-dir");
    std::fs::write(&blocker, b"file").unwrap();
    let config = test_config_with(
        root.path(),
        &format!(
            "{ROOMY_LIMITS}\n[backup]\ndir = {:?}\ninterval_hours = 0.0002\nkeep = 2\n",
            blocker.join("backups")
        ),
    );
    let s = TestServer::start_with(root, config).await;
    let auditor = system_auditor(&s).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if s.alerts(&auditor)
            .await
            .iter()
            .any(|a| a.kind == "backup_failed" && a.severity == "critical")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no backup_failed alert");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// After a restore, `coffre audit verify` reports it, a checkpoint the
/// auditor took before it (past the backup's head) is checked up to the
/// head, and the mirror — which holds the lost stretch, then the restore —
/// still matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_after_a_restore_accepts_old_checkpoints_and_the_mirror() {
    if !backups_here() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let mirror = root.path().join("mirror.jsonl");
    let config = test_config_with(
        root.path(),
        &format!("{ROOMY_LIMITS}\n[audit]\nmirror_file = {mirror:?}\n"),
    );
    let s = TestServer::start_with(root, config).await;
    let admin = s.admin_token().await;
    let clin = s.tenant_with("ward", "dr_a", pb::Role::Clinician).await;
    let auditor = system_auditor(&s).await;
    let mut r = s.records().await;
    for i in 0..10 {
        r.put_record(authed(&clin, put(&format!("p{i}"), &[("nir", "1")])))
            .await
            .unwrap();
    }
    let file = s.root.path().join("mid.backup");
    let m = take_backup(&s, &admin, &file).await;
    // The old vault goes on past the backup; the auditor keeps a
    // checkpoint from then.
    for i in 10..20 {
        r.put_record(authed(&clin, put(&format!("p{i}"), &[("nir", "1")])))
            .await
            .unwrap();
    }
    let cp = verify_ok(&s, &auditor).await;
    assert!(cp.head_seq > m.audit_head_seq);
    let root = s.root.path().to_path_buf();
    let target = root.join("restored");
    let cfg = config_for(&root, &target);
    let o = cli(&[
        "restore",
        "--config",
        cfg.to_str().unwrap(),
        "--from",
        file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r2 = start_on(&cfg).await;
    let aud2 = r2
        .login("system", "auditor", AUDITOR_PASSWORD)
        .await
        .unwrap();
    let run = |args: Vec<String>| {
        let addr = r2.addr.clone();
        let aud2 = aud2.clone();
        std::thread::spawn(move || {
            Command::new(bin())
                .arg("--addr")
                .arg(addr)
                .args(args)
                .env("COFFRE_TOKEN", aud2)
                .output()
                .unwrap()
        })
        .join()
        .unwrap()
    };
    let checkpoint = format!("{}:{}", cp.head_seq, hex::encode(&cp.head_hash));
    let o = run(vec![
        "audit".into(),
        "verify".into(),
        "--checkpoint".into(),
        checkpoint,
        "--mirror".into(),
        mirror.to_str().unwrap().into(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains(&format!("restore at seq {}", m.audit_head_seq + 1)),
        "{out}"
    );
    assert!(out.contains("taken before the restore"), "{out}");
    assert!(out.contains("mirror matches"), "{out}");
    // A checkpoint at or before the backup's head is still checked: a
    // wrong hash there is tampering.
    let bad = format!("{}:{}", m.audit_head_seq, hex::encode([7u8; 32]));
    let o = run(vec![
        "audit".into(),
        "verify".into(),
        "--checkpoint".into(),
        bad,
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("checkpoint"), "{}", stderr(&o));
}

/// One backup at a time: a second one while the first holds its cut is
/// refused (FAILED_PRECONDITION), which is not a storage failure — health
/// stays SERVING — and the first completes.
#[tokio::test]
async fn a_second_backup_waits_its_turn_without_hurting_health() {
    if !backups_here() {
        return;
    }
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let s = TestServer::start().await;
    let admin = s.admin_token().await;
    let clin = s.tenant_with("ward", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    let big = "z".repeat(8000);
    for i in 0..300 {
        r.put_record(authed(
            &clin,
            put(&format!("p{i}"), &[("note", big.as_str())]),
        ))
        .await
        .unwrap();
    }
    let mut first = s
        .admin()
        .await
        .backup(authed(&admin, pb::BackupRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut bytes = first.message().await.unwrap().unwrap().data;
    let e = s
        .admin()
        .await
        .backup(authed(&admin, pb::BackupRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    // Health is watched once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let h = HealthClient::new(s.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, ServingStatus::Serving as i32);
    while let Some(c) = first.message().await.unwrap() {
        bytes.extend_from_slice(&c.data);
    }
    let m = coffre::backup::read_manifest(&mut &bytes[..]).unwrap().0;
    assert_eq!(
        m.tenants.iter().find(|t| t.name == "ward").unwrap().records,
        300
    );
}

/// Backups finishing at once (streamed ones, a scheduled one) each note
/// their time: the stored time is the latest of them, also after a
/// restart (what `coffre_last_backup_timestamp_seconds` and the 26-hour
/// alert read).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_backup_notes_keep_the_latest_time() {
    let mut s = TestServer::start().await;
    let v = s.vault.clone().unwrap();
    let mut tasks = Vec::new();
    // Newest first among 32 notes, so a slow old one would land last.
    for t in (1..=32i64).rev() {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            v.note_backup(1_800_000_000_000 + t).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(v.last_backup_ms(), 1_800_000_000_032);
    drop(v);
    s.restart().await;
    assert_eq!(
        s.vault.as_ref().unwrap().last_backup_ms(),
        1_800_000_000_032,
        "the stored time is the latest"
    );
}

/// The shred list is authenticated, and a restore needs it: missing,
/// edited (even with a checksum made anew) or older than the backup, the
/// restore is refused and nothing written, unless told `--no-shred-list
/// --reason` (audited, critical alert). A server whose list went missing
/// does not start.
#[tokio::test]
async fn a_restore_refuses_a_missing_edited_or_older_shred_list() {
    if !backups_here() {
        return;
    }
    let mut s = TestServer::start().await;
    let admin = s.admin_token().await;
    let gone = s.tenant_with("gone", "dr_g", pb::Role::Clinician).await;
    s.records()
        .await
        .put_record(authed(&gone, put("g1", &[("nir", "1")])))
        .await
        .unwrap();
    let root = s.root.path().to_path_buf();
    let list_path = root.join("keys/master.key.shredded");
    let empty_list = std::fs::read(&list_path).expect("every vault has a list");
    let before = root.join("before.backup");
    take_backup(&s, &admin, &before).await;
    s.admin()
        .await
        .shred_tenant(authed(
            &admin,
            pb::ShredTenantRequest {
                tenant: "gone".into(),
                confirm: "gone".into(),
            },
        ))
        .await
        .unwrap();
    let after = root.join("after.backup");
    let m = take_backup(&s, &admin, &after).await;
    assert_eq!(m.shred_list_count, Some(1));
    let list = std::fs::read_to_string(&list_path).unwrap();
    let restore = |target: &str, file: &Path, extra: &[&str]| {
        let t = root.join(target);
        let cfg = config_for(&root, &t);
        let mut args = vec![
            "restore",
            "--config",
            cfg.to_str().unwrap(),
            "--from",
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        (cli(&args), t, cfg)
    };
    let refused = |o: &Output, t: &Path, why: &str| {
        assert!(!o.status.success(), "restored: {}", stderr(o));
        assert!(stderr(o).contains(why), "{}", stderr(o));
        nothing_written(t);
    };

    // Missing.
    std::fs::remove_file(&list_path).unwrap();
    let (o, t, _) = restore("missing", &before, &[]);
    refused(&o, &t, "no shred list");
    // A line deleted, the MAC left: refused.
    let cut: String = list
        .lines()
        .filter(|l| !l.starts_with("gone\t"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&list_path, &cut).unwrap();
    let (o, t, _) = restore("edited", &before, &[]);
    refused(&o, &t, "MAC fails");
    // A line deleted and a SHA-256 made anew, as the old format had it.
    let body = "coffre-shred-list-v1\n".to_string();
    let sum = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes()));
    std::fs::write(&list_path, format!("{body}sha256 {sum}\n")).unwrap();
    let (o, t, _) = restore("legacy", &before, &[]);
    refused(&o, &t, "unauthenticated format");
    // An authentic list older than the backup (made before the shred).
    std::fs::write(&list_path, &empty_list).unwrap();
    let (o, t, _) = restore("older", &after, &[]);
    refused(&o, &t, "older than the backup");
    // Without a list, only if told why: audited, critical alert.
    let (o, t, _) = restore("unlisted", &before, &["--no-shred-list"]);
    refused(&o, &t, "--reason");
    // Every copy of the list lost: the restore makes one anew from what
    // the backup knows, so the restored vault starts.
    std::fs::remove_file(&list_path).unwrap();
    let (o, _, cfg) = restore(
        "unlisted",
        &after,
        &["--no-shred-list", "--reason", "list lost with the escrow"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    {
        let r = start_on(&cfg).await;
        assert!(r.login("gone", "dr_g", CLINICIAN_PASSWORD).await.is_err());
        let auditor = system_auditor(&r).await;
        let alerts = r.alerts(&auditor).await;
        let a = alerts
            .iter()
            .find(|a| a.kind == "restore_without_shred_list")
            .expect("a critical alert");
        assert_eq!(a.severity, "critical");
    }
    let made = std::fs::read_to_string(&list_path).unwrap();
    assert!(made.lines().any(|l| l.starts_with("gone\t")), "{made}");
    // The restored data directory is private from the start.
    for e in std::fs::read_dir(root.join("unlisted")).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        let m = e.unwrap().metadata().unwrap();
        let want = if m.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(m.permissions().mode() & 0o777, want);
    }

    // The server itself refuses to start once its list is gone.
    std::fs::write(&list_path, &list).unwrap();
    s.stop().await;
    std::fs::remove_file(&list_path).unwrap();
    // (sled lets go of its lock asynchronously.)
    let mut e = String::new();
    for _ in 0..200 {
        e = coffre::vault::Vault::open(&s.config, coffre::vault::Bootstrap::Refuse)
            .await
            .err()
            .expect("refused")
            .to_string();
        if !e.contains("another coffre process") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(e.contains("is missing"), "{e}");
    std::fs::write(&list_path, &list).unwrap();
    s.restart().await;
}
