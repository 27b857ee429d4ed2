//! The real `coffre` binary as a process: refused starts, SIGTERM, and the
//! crash test (concurrent writers, `kill -9` at a random moment, restart,
//! every acknowledged write still there and decryptable).

mod common;

use std::{
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use coffre::pb::{self, records_client::RecordsClient};
use common::*;
use rand::Rng;

fn boot_env() -> [(&'static str, &'static str); 1] {
    [("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)]
}

/// Runs `coffre serve` expecting a refusal; returns its stderr.
fn refused(config: &std::path::Path, envs: &[(&str, &str)]) -> String {
    let t = Instant::now();
    let err = match spawn_server(config, envs) {
        Ok(mut p) => {
            let _ = p.child.kill();
            panic!("server started but should have refused");
        }
        Err(e) => e,
    };
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "refused within seconds"
    );
    assert!(!err.starts_with("exit status: 0"), "non-zero exit: {err}");
    err
}

async fn sigterm(p: &mut Proc) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            assert!(t.elapsed() < Duration::from_secs(10));
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "exits within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn refused_starts_exit_non_zero_with_one_line() {
    let root = tempfile::tempdir().unwrap();
    let cfg = write_config(root.path(), "");
    let mut p = spawn_server(&cfg, &boot_env()).unwrap();
    let token = bin_login(&p.addr, "system", "admin", ADMIN_PASSWORD).await;
    assert!(!token.is_empty());
    assert!(sigterm(&mut p).await.success(), "SIGTERM: drain and exit 0");

    let key = root.path().join("keys").join("master.key");
    // Group-readable key file.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = refused(&cfg, &[]);
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A different key for the same data (keygen writes a shred list
    // beside it and never over one: the old list moves aside too).
    let good = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    let list = root.path().join("keys").join("master.key.shredded");
    let good_list = std::fs::read(&list).unwrap();
    std::fs::remove_file(&list).unwrap();
    let st = Command::new(bin())
        .args(["keygen", "--out"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let e = refused(&cfg, &[]);
    assert!(e.contains("does not match"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    std::fs::remove_file(&key).unwrap();
    std::fs::write(&key, &good).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&list, &good_list).unwrap();

    // keygen never overwrites.
    let out = Command::new(bin())
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&key).unwrap(), good);

    // Unsafe configurations.
    let e = refused(&cfg, &[("COFFRE_LISTEN", "0.0.0.0:0")]);
    assert!(e.contains("loopback"), "{e}");
    let e = refused(&cfg, &[("COFFRE_DEV", "false")]);
    assert!(e.contains("tls.cert"), "{e}");
    let e = refused(&cfg, &[("COFFRE_ARGON2_T", "many")]);
    assert!(e.contains("COFFRE_ARGON2_T"), "{e}");
    // PostgreSQL without a URL, or one nobody answers (whose password
    // stays out of the message), and a backend that does not exist.
    let e = refused(
        &cfg,
        &[
            ("COFFRE_STORAGE_BACKEND", "postgres"),
            ("COFFRE_STORAGE_POSTGRES_URL", ""),
        ],
    );
    assert!(e.contains("storage.postgres_url"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    let e = refused(
        &cfg,
        &[
            ("COFFRE_STORAGE_BACKEND", "postgres"),
            (
                "COFFRE_STORAGE_POSTGRES_URL",
                "postgres://coffre:hunter2-db-pass@127.0.0.1:1/coffre",
            ),
        ],
    );
    assert!(e.contains("PostgreSQL"), "{e}");
    assert!(!e.contains("hunter2"), "the password leaked: {e}");
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    let e = refused(&cfg, &[("COFFRE_STORAGE_BACKEND", "oracle")]);
    assert!(
        e.contains("COFFRE_STORAGE_BACKEND") || e.contains("backend"),
        "{e}"
    );

    // A weak bootstrap password on an empty directory is refused too.
    let root2 = tempfile::tempdir().unwrap();
    let cfg2 = write_config(root2.path(), "");
    let e = refused(
        &cfg2,
        &[("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", "qwertyuiop12")],
    );
    assert!(
        e.contains("COFFRE_BOOTSTRAP_ADMIN_PASSWORD") && e.contains("too weak"),
        "{e}"
    );
    assert!(
        !e.contains("qwerty"),
        "the refusal does not echo the password: {e}"
    );

    // And the right key still works.
    let mut p = spawn_server(&cfg, &[]).unwrap();
    bin_login(&p.addr, "system", "admin", ADMIN_PASSWORD).await;
    let _ = p.child.kill();
}

#[tokio::test]
async fn a_generated_bootstrap_password_goes_to_a_terminal_only() {
    let root = tempfile::tempdir().unwrap();
    let cfg = write_config(root.path(), "");
    // No terminal, no COFFRE_BOOTSTRAP_ADMIN_PASSWORD: refused, one line,
    // and nothing made.
    let err = refused(&cfg, &[]);
    let msg = err.trim().split_once(": ").map_or(err.as_str(), |x| x.1);
    assert_eq!(msg.trim().lines().count(), 1, "{err}");
    assert!(err.contains("COFFRE_BOOTSTRAP_ADMIN_PASSWORD"), "{err}");

    // On a terminal (`script` gives it one) it is shown there, once.
    let mut child = Command::new("script")
        .args(["-qfec"])
        .arg(format!("{} serve --config {}", bin(), cfg.display()))
        .arg("/dev/null")
        .env_remove("COFFRE_BOOTSTRAP_ADMIN_PASSWORD")
        .env("COFFRE_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (mut addr, mut pw) = (None, None);
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        if let Some(a) = line.split("listening on ").nth(1) {
            addr = Some(a.trim().to_string());
        }
        if let Some(p) = line.split("with password: ").nth(1) {
            pw = Some(p.trim().to_string());
        }
        if addr.is_some() && pw.is_some() {
            break;
        }
    }
    let (addr, pw) = (addr.expect("listening"), pw.expect("password shown"));
    bin_login(&addr, "system", "admin", &pw).await;
    let _ = child.kill();
    let _ = child.wait();
    // Never inside the data directory (T1), never again on a restart.
    for (name, bytes) in stored_files_at(root.path()) {
        assert!(
            !contains(&bytes, pw.as_bytes()),
            "{name} holds the password"
        );
    }
    let mut p = loop {
        match spawn_server(&cfg, &[]) {
            Ok(p) => break p,
            Err(e) if e.contains("another coffre process") => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    let err = std::fs::read_to_string(&p.stderr_path).unwrap();
    assert!(!err.contains(&pw), "not printed again");
    let _ = p.child.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_loses_an_acknowledged_write() {
    let cycles: usize = std::env::var("COFFRE_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let writers = 4;
    let root = tempfile::tempdir().unwrap();
    let cfg = write_config(root.path(), "");
    let mut p = spawn_server(&cfg, &boot_env()).unwrap();
    bin_setup(
        &p.addr,
        &[("clinic", "writer", CLINICIAN_PASSWORD, pb::Role::Service)],
    )
    .await;

    // (id, version, nir) of every acknowledged write, over all cycles.
    let mut all_acked: Vec<(String, u64, String)> = Vec::new();
    let mut lost = 0usize;
    let mut total_acked = 0usize;
    for cycle in 0..cycles {
        let token = bin_login(&p.addr, "clinic", "writer", CLINICIAN_PASSWORD).await;
        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for w in 0..writers {
            let ch = chan(&p.addr).await;
            let token = token.clone();
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                let mut client = RecordsClient::new(ch);
                for n in 0.. {
                    // Half new records, half replacements of this writer's
                    // records from earlier in the cycle.
                    let id = if n % 2 == 1 {
                        format!("c{cycle}-w{w}-{}", n - 1)
                    } else {
                        format!("c{cycle}-w{w}-{n}")
                    };
                    let nir = format!("{cycle}:{w}:{n}");
                    match client
                        .put_record(authed(
                            &token,
                            put(&id, &[("nir", &nir), ("note", "crash")]),
                        ))
                        .await
                    {
                        Ok(r) => acked
                            .lock()
                            .unwrap()
                            .push((id, r.into_inner().version, nir)),
                        Err(_) => break,
                    }
                }
            }));
        }
        let wait = rand::rng().random_range(20..250);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        p.child.kill().unwrap(); // SIGKILL
        p.child.wait().unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let acked = std::mem::take(&mut *acked.lock().unwrap());
        total_acked += acked.len();
        // The latest acknowledged version of each id is what must be there.
        for (id, version, nir) in acked {
            all_acked.retain(|(i, _, _)| i != &id);
            all_acked.push((id, version, nir));
        }
        p = spawn_server(&cfg, &[]).expect("restart after kill -9");
        let token = bin_login(&p.addr, "clinic", "writer", CLINICIAN_PASSWORD).await;
        let mut client = RecordsClient::new(chan(&p.addr).await);
        // Check this cycle's writes every time, and everything at the end.
        let check: Vec<_> = all_acked
            .iter()
            .filter(|(id, _, _)| cycle + 1 == cycles || id.starts_with(&format!("c{cycle}-")))
            .cloned()
            .collect();
        for chunk in check.chunks(1000) {
            let mut stream = client
                .bulk_read(authed(
                    &token,
                    pb::BulkReadRequest {
                        ids: chunk.iter().map(|(i, _, _)| i.clone()).collect(),
                        fields: vec![],
                        purpose: "crash check".into(),
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            let mut seen = std::collections::HashMap::new();
            loop {
                match stream.message().await {
                    Ok(Some(r)) => {
                        seen.insert(r.id.clone(), r);
                    }
                    Ok(None) => break,
                    Err(e) => panic!("cycle {cycle}: read failed after restart: {e:?}"),
                }
            }
            for (id, version, nir) in chunk {
                match seen.get(id) {
                    Some(r) if r.version >= *version => {
                        // A later unacknowledged replace may have landed
                        // (version higher); an acknowledged one never goes
                        // missing or back.
                        if r.version == *version {
                            assert_eq!(&r.fields["nir"], nir, "cycle {cycle} {id}");
                        }
                    }
                    _ => lost += 1,
                }
            }
        }
    }
    let _ = p.child.kill();
    println!(
        "crash test: {cycles} kill -9 cycles, {writers} concurrent writers, {total_acked} acknowledged writes, {} distinct records checked, {lost} lost or undecryptable",
        all_acked.len()
    );
    assert_eq!(lost, 0);
}
