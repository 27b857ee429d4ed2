//! The README's walk-through, run with the real `coffre` binary against a
//! real server: secrets on stdin, one-line errors, `--json`.

mod common;

use std::{
    io::Write,
    path::Path,
    process::{Command, Output, Stdio},
};

use coffre::pb;
use common::*;

fn coffre(addr: &str, token_file: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .env("COFFRE_ADDR", addr)
        .env("COFFRE_TOKEN_FILE", token_file)
        .env_remove("COFFRE_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn fails(o: &Output) -> String {
    assert!(!o.status.success());
    let e = String::from_utf8(o.stderr.clone()).unwrap();
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    assert!(e.starts_with("coffre: error: "), "{e}");
    e
}

#[tokio::test]
async fn readme_walkthrough() {
    let root = tempfile::tempdir().unwrap();
    let cfg = write_config(root.path(), "");
    let mut p = spawn_server(&cfg, &[("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)]).unwrap();
    let tok = root.path().join("token");
    let run = |args: &[&str], stdin: &str| coffre(&p.addr, &tok, args, stdin);
    let admin_pw = format!("{ADMIN_PASSWORD}\n");
    let clin_pw = format!("{CLINICIAN_PASSWORD}\n");

    ok(&run(&["login"], &admin_pw));
    let mode = std::fs::metadata(&tok).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    assert!(
        ok(&run(
            &["tenant", "create", "clinique-nord", "--index", "nir"],
            ""
        ))
        .contains("created")
    );
    let e = fails(&run(
        &[
            "principal",
            "create",
            "--tenant",
            "clinique-nord",
            "--username",
            "dr.martin",
            "--role",
            "clinician",
        ],
        "abc\n",
    ));
    assert!(e.contains("at least 12"), "{e}");
    ok(&run(
        &[
            "principal",
            "create",
            "--tenant",
            "clinique-nord",
            "--username",
            "dr.martin",
            "--role",
            "clinician",
        ],
        &clin_pw,
    ));
    ok(&run(
        &[
            "login",
            "--tenant",
            "clinique-nord",
            "--username",
            "dr.martin",
        ],
        &clin_pw,
    ));
    let put = ok(&run(
        &["--json", "record", "put"],
        r#"{"id": "p-001", "fields": {"family_name": "Durand", "nir": "185077512345678", "blood_group": "O+"}}"#,
    ));
    let v: serde_json::Value = serde_json::from_str(&put).unwrap();
    assert_eq!(v["version"], 1);
    let got = ok(&run(
        &[
            "record",
            "get",
            "p-001",
            "--field",
            "blood_group",
            "--purpose",
            "consultation",
        ],
        "",
    ));
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(v["fields"], serde_json::json!({"blood_group": "O+"}));
    assert_eq!(
        ok(&run(
            &["record", "find", "--field", "nir"],
            "185077512345678\n"
        ))
        .trim(),
        "p-001"
    );
    let e = fails(&run(&["record", "get", "p-404"], ""));
    assert!(e.contains("NotFound"), "{e}");

    // The admin manages but cannot read.
    ok(&run(&["login"], &admin_pw));
    let e = fails(&run(&["record", "get", "p-001"], ""));
    assert!(e.contains("PermissionDenied"), "{e}");
    ok(&run(
        &[
            "principal",
            "lock",
            "--tenant",
            "clinique-nord",
            "--username",
            "dr.martin",
        ],
        "",
    ));
    let e = fails(&run(
        &[
            "login",
            "--tenant",
            "clinique-nord",
            "--username",
            "dr.martin",
        ],
        &clin_pw,
    ));
    assert!(e.contains("locked") && e.contains("administrator"), "{e}");
    ok(&run(&["login"], &admin_pw));
    let listed = ok(&run(
        &["principal", "list", "--tenant", "clinique-nord"],
        "",
    ));
    let line = listed.lines().find(|l| l.contains("dr.martin")).unwrap();
    assert!(
        line.contains("clinician") && line.contains("yes"),
        "{listed}"
    );
    // A second server on the same data: refused in one plain line on the
    // embedded store; a second node of the same vault on PostgreSQL, where
    // the lock just raised is seen at once.
    if test_backend() == "sled" {
        let second = spawn_server(&cfg, &[]).err().expect("refused");
        assert!(
            second.contains("another coffre process is using"),
            "{second}"
        );
    } else {
        let second = spawn_server(&cfg, &[]).expect("a second node starts");
        let e = fails(&coffre(
            &second.addr,
            &root.path().join("token2"),
            &[
                "login",
                "--tenant",
                "clinique-nord",
                "--username",
                "dr.martin",
            ],
            &clin_pw,
        ));
        assert!(
            e.contains("administrator"),
            "locked on the second node too: {e}"
        );
    }
    // After a guessing storm: every locked principal of the tenant at once.
    let unlocked = ok(&run(
        &[
            "principal",
            "unlock",
            "--tenant",
            "clinique-nord",
            "--all-locked",
        ],
        "",
    ));
    assert!(unlocked.contains("dr.martin"), "{unlocked}");
    let listed = ok(&run(
        &["principal", "list", "--tenant", "clinique-nord"],
        "",
    ));
    assert!(!listed.contains("yes"), "{listed}");

    // A honeytoken planted by the admin locks the clinician who reads it.
    let planted = ok(&run(
        &[
            "--json",
            "tenant",
            "honeytoken",
            "clinique-nord",
            "--count",
            "2",
        ],
        "",
    ));
    let v: serde_json::Value = serde_json::from_str(&planted).unwrap();
    let canary = v["ids"][1].as_str().unwrap().to_string();
    assert_eq!(v["ids"].as_array().unwrap().len(), 2);
    let martin = [
        "login",
        "--tenant",
        "clinique-nord",
        "--username",
        "dr.martin",
    ];
    ok(&run(&martin, &clin_pw));
    let e = fails(&run(&["record", "get", &canary], ""));
    assert!(e.contains("PermissionDenied"), "{e}");
    assert!(fails(&run(&martin, &clin_pw)).contains("locked"));
    ok(&run(&["login"], &admin_pw));

    // Key lifecycle: rotate, rewrap, retire.
    let t = ["--tenant", "clinique-nord"];
    assert!(ok(&run(&[&["keys", "rotate"][..], &t].concat(), "")).contains("version 2 active"));
    let e = fails(&run(
        &[&["keys", "retire", "--version", "1"][..], &t].concat(),
        "",
    ));
    assert!(
        e.contains("FailedPrecondition") && e.contains("rewrap first"),
        "{e}"
    );
    let done = ok(&run(&[&["--json", "keys", "rewrap"][..], &t].concat(), ""));
    let v: serde_json::Value = serde_json::from_str(&done).unwrap();
    assert_eq!(v["done"], v["total"]);
    assert!(v["total"].as_u64().unwrap() >= 3, "{v}");
    ok(&run(
        &[&["keys", "retire", "--version", "1"][..], &t].concat(),
        "",
    ));
    let rebuilt = ok(&run(&[&["keys", "rotate-index"][..], &t].concat(), ""));
    assert!(rebuilt.contains("old key is destroyed"), "{rebuilt}");
    let table = ok(&run(&[&["keys", "status"][..], &t].concat(), ""));
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with('1') && l.ends_with("retired")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.trim_start().starts_with('2') && l.ends_with("active")),
        "{table}"
    );

    // Crypto-shredding: refused without the name typed again, then final.
    let e = fails(&run(
        &["tenant", "shred", "clinique-nord", "--confirm", "clinique"],
        "",
    ));
    assert!(
        e.contains("InvalidArgument") && e.contains("confirm"),
        "{e}"
    );
    ok(&run(&[&["keys", "status"][..], &t].concat(), ""));
    let gone = ok(&run(
        &[
            "--json",
            "tenant",
            "shred",
            "clinique-nord",
            "--confirm",
            "clinique-nord",
        ],
        "",
    ));
    let v: serde_json::Value = serde_json::from_str(&gone).unwrap();
    assert_eq!(v["shredded"], true, "{v}");
    let e = fails(&run(&[&["keys", "status"][..], &t].concat(), ""));
    assert!(e.contains("NotFound"), "no keys left to report on: {e}");
    let e = fails(&run(&["tenant", "create", "clinique-nord"], ""));
    assert!(
        e.contains("shredded"),
        "a shredded name is never reused: {e}"
    );

    // Password change through stdin: old, then new.
    let new_pw = "saffron glacier 6602 pebble lark";
    ok(&run(&["passwd"], &format!("{ADMIN_PASSWORD}\n{new_pw}\n")));
    fails(&run(&["login"], &admin_pw));
    ok(&run(&["login"], &format!("{new_pw}\n")));

    let _ = p.child.kill();
    let e = fails(&coffre(
        "http://127.0.0.1:9",
        &tok,
        &["tenant", "create", "x"],
        "",
    ));
    assert!(e.contains("cannot reach"), "{e}");
    let e = fails(&coffre("not a url", &tok, &["logout"], ""));
    assert!(e.contains("needs a scheme"), "{e}");
    let e = fails(&coffre("http://not a url", &tok, &["logout"], ""));
    assert!(e.contains("not a URL"), "{e}");
}

#[tokio::test]
async fn auditor_cli_query_patient_checkpoint_verify_export() {
    let root = tempfile::tempdir().unwrap();
    let mirror = root.path().join("mirror.jsonl");
    let cfg = write_config(root.path(), &format!("[audit]\nmirror_file = {mirror:?}\n"));
    let mut p = spawn_server(&cfg, &[("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)]).unwrap();
    let tok = root.path().join("token");
    let run = |args: &[&str], stdin: &str| coffre(&p.addr, &tok, args, stdin);
    let aud_pw = "lattice ember 5150 harbor wren\n";
    ok(&run(&["login"], &format!("{ADMIN_PASSWORD}\n")));
    ok(&run(&["tenant", "create", "clinic"], ""));
    ok(&run(
        &[
            "principal",
            "create",
            "--tenant",
            "clinic",
            "--username",
            "dr",
            "--role",
            "clinician",
        ],
        &format!("{CLINICIAN_PASSWORD}\n"),
    ));
    ok(&run(
        &[
            "principal",
            "create",
            "--tenant",
            "system",
            "--username",
            "aud",
            "--role",
            "auditor",
        ],
        aud_pw,
    ));
    ok(&run(
        &["login", "--tenant", "clinic", "--username", "dr"],
        &format!("{CLINICIAN_PASSWORD}\n"),
    ));
    ok(&run(
        &["record", "put"],
        r#"{"id": "p-9", "fields": {"nir": "1"}}"#,
    ));
    ok(&run(
        &[
            "record",
            "get",
            "p-9",
            "--purpose",
            "consultation, \"urgent\"",
        ],
        "",
    ));
    ok(&run(
        &["login", "--tenant", "system", "--username", "aud"],
        aud_pw,
    ));

    let table = ok(&run(&["audit", "patient", "p-9"], ""));
    assert!(
        table.contains("clinic/dr") && table.contains("Records/GetRecord"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 3, "header, put, get: {table}");
    let lines = ok(&run(
        &[
            "--json",
            "audit",
            "query",
            "--action",
            "GetRecord",
            "--outcome",
            "ok",
        ],
        "",
    ));
    let v: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(v["purpose"], "consultation, \"urgent\"");
    let report = ok(&run(
        &["audit", "report", "--tenant", "clinic", "--since", "1d"],
        "",
    ));
    assert!(
        report.contains("clinic/dr") && report.contains("reads per principal"),
        "{report}"
    );
    let cp = ok(&run(&["audit", "checkpoint"], "")).trim().to_string();
    assert!(cp.contains(':'), "{cp}");
    let m = mirror.to_str().unwrap();
    let out = ok(&run(
        &["audit", "verify", "--checkpoint", &cp, "--mirror", m],
        "",
    ));
    assert!(
        out.contains("audit chain ok") && out.contains("mirror matches"),
        "{out}"
    );
    let csv = ok(&run(
        &["audit", "export", "--format", "csv", "--since", "1h"],
        "",
    ));
    assert!(csv.starts_with("seq,time_unix_ms"));
    assert!(csv.contains("\"consultation, \"\"urgent\"\"\""), "{csv}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&mirror).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the mirror is private");
    }
    // A mirror enabled after the first events: said plainly, not a failure.
    // (The server appends to the file it opened, O_APPEND, so cutting its
    // head in place leaves a live mirror that starts later.)
    let full = std::fs::read_to_string(&mirror).unwrap();
    let tail: Vec<&str> = full.lines().skip(5).collect();
    std::fs::write(&mirror, tail.join("\n") + "\n").unwrap();
    let out = ok(&run(&["audit", "verify", "--mirror", m], ""));
    assert!(
        out.contains("mirror starts at seq 6") && out.contains("mirror matches"),
        "{out}"
    );
    // A tenant's auditor checks the mirror on its own tenant's events.
    ok(&run(&["login"], &format!("{ADMIN_PASSWORD}\n")));
    ok(&run(
        &[
            "principal",
            "create",
            "--tenant",
            "clinic",
            "--username",
            "aud2",
            "--role",
            "auditor",
        ],
        aud_pw,
    ));
    ok(&run(
        &["login", "--tenant", "clinic", "--username", "aud2"],
        aud_pw,
    ));
    let out = ok(&run(&["audit", "verify", "--mirror", m], ""));
    assert!(
        out.contains("tenant clinic") && out.contains("mirror matches"),
        "{out}"
    );
    ok(&run(
        &["login", "--tenant", "system", "--username", "aud"],
        aud_pw,
    ));
    // A forged mirror line is reported.
    let mut text = std::fs::read_to_string(&mirror).unwrap();
    text = text.replacen("\"hash\":\"", "\"hash\":\"00", 1);
    std::fs::write(&mirror, text).unwrap();
    let e = fails(&run(&["audit", "verify", "--mirror", m], ""));
    assert!(e.contains("mirror differs"), "{e}");
    let e = fails(&run(&["audit", "verify", "--checkpoint", "99999:00"], ""));
    assert!(e.contains("32 bytes"), "{e}");
    let far = format!("99999:{}", "0".repeat(64));
    let e = fails(&run(&["audit", "verify", "--checkpoint", &far], ""));
    assert!(e.contains("FAILS"), "{e}");
    let _ = p.child.kill();
}

/// `coffre keys rotate-master`: refused while the server runs; offline it
/// re-wraps every key, is in the trail, and the server then starts on the
/// new key only, with the audit chain verifying across the change.
#[tokio::test]
async fn rotate_master_offline_then_serve_on_the_new_key() {
    const AUDITOR: &str = "copper lantern 7731 meadow finch";
    let root = tempfile::tempdir().unwrap();
    let cfg = write_config(root.path(), "");
    let mut p = spawn_server(&cfg, &[("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)]).unwrap();
    bin_setup(
        &p.addr,
        &[
            ("clinic", "dr_a", CLINICIAN_PASSWORD, pb::Role::Clinician),
            ("system", "auditor", AUDITOR, pb::Role::Auditor),
        ],
    )
    .await;
    let tok = root.path().join("token");
    let new_key = root.path().join("keys").join("new.key");
    let cfg_s = cfg.to_str().unwrap();
    let new_s = new_key.to_str().unwrap();
    ok(&coffre(&p.addr, &tok, &["keygen", "--out", new_s], ""));
    let rotate = [
        "keys",
        "rotate-master",
        "--config",
        cfg_s,
        "--new-key",
        new_s,
    ];
    let e = fails(&coffre(&p.addr, &tok, &rotate, ""));
    assert!(e.contains("stop the server first"), "{e}");
    // A shredded tenant: its shred list follows the key to the new file.
    let admin = bin_login(&p.addr, "system", "admin", ADMIN_PASSWORD).await;
    let mut adm = pb::admin_client::AdminClient::new(chan(&p.addr).await);
    adm.create_tenant(authed(
        &admin,
        pb::CreateTenantRequest {
            name: "old_ward".into(),
            indexed_fields: vec![],
        },
    ))
    .await
    .unwrap();
    adm.shred_tenant(authed(
        &admin,
        pb::ShredTenantRequest {
            tenant: "old_ward".into(),
            confirm: "old_ward".into(),
        },
    ))
    .await
    .unwrap();

    p.child.kill().unwrap();
    p.child.wait().unwrap();
    // sled's lock goes with the process, a killed node's heartbeat after
    // 10 s (PostgreSQL): the command may retry on them.
    let mut out = coffre(&p.addr, &tok, &rotate, "");
    for _ in 0..200 {
        if out.status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        out = coffre(&p.addr, &tok, &rotate, "");
    }
    assert!(ok(&out).contains("re-wrapped"));
    assert!(ok(&coffre(&p.addr, &tok, &rotate, "")).contains("already under the new key"));
    let list = std::fs::read_to_string(root.path().join("keys").join("new.key.shredded")).unwrap();
    assert!(list.contains("old_ward\t"), "{list}");

    let e = spawn_server(&cfg, &[]).err().unwrap_or_default();
    assert!(e.contains("does not match"), "the old key is refused: {e}");
    let p = spawn_server(&cfg, &[("COFFRE_MASTER_KEY_FILE", new_s)]).unwrap();
    let aud = bin_login(&p.addr, "system", "auditor", AUDITOR).await;
    let mut a = pb::audit_client::AuditClient::new(chan(&p.addr).await);
    let v = a
        .verify_audit(authed(&aud, pb::VerifyAuditRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "the chain verifies across the rotation: {}", v.reason);
    let mut st = a
        .query_audit(authed(
            &aud,
            pb::QueryAuditRequest {
                action: "keys/rotate_master".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let e = st
        .message()
        .await
        .unwrap()
        .expect("the rotation is in the trail");
    assert!(e.purpose.contains("re-wrapped"), "{}", e.purpose);
    bin_login(&p.addr, "clinic", "dr_a", CLINICIAN_PASSWORD).await;
}

/// The identity walk-through of the README with the real binary: the
/// bootstrap admin enrols a second factor, guarded commands print the
/// approval id and the second admin's command, and a clinician signs in
/// with an id token (keys from a JWKS file).
#[tokio::test]
async fn second_factor_two_person_rule_and_single_sign_on_from_the_cli() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
    let root = tempfile::tempdir().unwrap();
    // The identity provider's key and its published JWKS (as a file).
    let kp = rcgen::KeyPair::generate().unwrap();
    let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("kc-1".into());
    let jwks = root.path().join("jwks.json");
    std::fs::write(&jwks, serde_json::json!({ "keys": [jwk] }).to_string()).unwrap();
    let cfg = write_config(
        root.path(),
        &format!(
            "[mfa]\nrequired_roles = [\"admin\", \"auditor\"]\n\
             [approval]\nrequired_for = [\"shred_tenant\", \"retire_key_version\", \"reset_mfa\", \"export_grant\"]\n\
             [oidc.keycloak]\nissuer = \"https://sso.chu.example/realms/staff\"\naudience = \"coffre\"\n\
             jwks_file = {jwks:?}\ntenant = \"clinic\"\n"
        ),
    );
    let p = spawn_server(&cfg, &[("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)]).unwrap();
    let tok = root.path().join("token");
    let tok_b = root.path().join("token-b");
    let run = |args: &[&str], stdin: &str| coffre(&p.addr, &tok, args, stdin);
    let run_b = |args: &[&str], stdin: &str| coffre(&p.addr, &tok_b, args, stdin);

    // Enrol: the first login can only enrol; the enrolment prints a QR
    // code, the URI and ten recovery codes.
    let enrol = |run: &dyn Fn(&[&str], &str) -> Output, user: &str, pw: &str| -> Vec<u8> {
        ok(&run(&["login", "--username", user], &format!("{pw}\n")));
        let e = fails(&run(&["tenant", "create", "never"], ""));
        assert!(e.contains("coffre mfa enroll"), "{e}");
        // The password again, on stdin; a wrong one enrols nothing.
        let e = fails(&run(&["mfa", "enroll"], "not my password\n"));
        assert!(e.contains("invalid tenant, username or password"), "{e}");
        let out = ok(&run(&["mfa", "enroll"], &format!("{pw}\n")));
        assert!(out.contains('█') || out.contains('▀'), "a QR code: {out}");
        let uri = out.lines().find(|l| l.starts_with("otpauth://")).unwrap();
        let codes: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|l| l.len() == 13 && l.as_bytes()[1] == b'-')
            .collect();
        assert_eq!(codes.len(), 10, "{out}");
        let secret = totp_secret_of(uri);
        let now = totp_step_now();
        ok(&run(
            &["mfa", "confirm"],
            &format!("{}\n", totp_code(&secret, now)),
        ));
        // Password and code on two lines of stdin.
        ok(&run(
            &["login", "--username", user, "--otp"],
            &format!("{pw}\n{}\n", totp_code(&secret, now + 1)),
        ));
        secret
    };
    enrol(&run, "admin", ADMIN_PASSWORD);
    ok(&run(&["tenant", "create", "clinic"], ""));
    ok(&run(
        &[
            "principal",
            "create",
            "--tenant",
            "system",
            "--username",
            "admin-b",
            "--role",
            "admin",
        ],
        &format!("{AUDITOR_PASSWORD}\n"),
    ));
    enrol(&run_b, "admin-b", AUDITOR_PASSWORD);

    // Two people: the first asks, the command says what the second runs.
    let e = fails(&run(
        &["tenant", "shred", "clinic", "--confirm", "clinic"],
        "",
    ));
    let id = e
        .split("approval required: ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap()
        .to_string();
    assert!(e.contains(&format!("coffre approvals approve {id}")), "{e}");
    let e = fails(&run(&["approvals", "approve", &id], ""));
    assert!(e.contains("own request"), "{e}");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&run_b(&["--json", "approvals", "list"], ""))).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["state"], "pending");
    assert!(ok(&run_b(&["approvals", "approve", &id], "")).contains("approved"));

    // Single sign-on for a clinician bound to the provider's subject.
    ok(&run(
        &[
            "principal",
            "create",
            "--tenant",
            "clinic",
            "--username",
            "dr-house",
            "--role",
            "clinician",
            "--oidc",
            "keycloak:f81d4fae-7dec",
        ],
        "",
    ));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("kc-1".into());
    let id_token = jsonwebtoken::encode(
        &h,
        &serde_json::json!({
            "iss": "https://sso.chu.example/realms/staff", "aud": "coffre",
            "sub": "f81d4fae-7dec", "iat": now, "exp": now + 300, "jti": "j-1",
        }),
        &enc,
    )
    .unwrap();
    let tok_c = root.path().join("token-c");
    let out = ok(&coffre(
        &p.addr,
        &tok_c,
        &["login", "--oidc", "keycloak"],
        &format!("{id_token}\n"),
    ));
    assert!(out.contains("keycloak"), "{out}");
    ok(&coffre(
        &p.addr,
        &tok_c,
        &["record", "put"],
        r#"{"id": "p-1", "fields": {"family_name": "Durand"}}"#,
    ));
    // The list shows the binding, and the admins' second factors.
    let out = ok(&run(&["principal", "list", "--tenant", "clinic"], ""));
    let row = out.lines().find(|l| l.starts_with("dr-house")).unwrap();
    assert!(row.contains("keycloak:f81d4fae-7dec"), "{out}");
    let sys: Vec<serde_json::Value> = ok(&run(
        &["--json", "principal", "list", "--tenant", "system"],
        "",
    ))
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    for p in &sys {
        assert_eq!(p["mfa_enrolled"], true, "{p}");
        assert_eq!(p["recovery_codes_left"], 10, "{p}");
    }
    assert_eq!(sys.len(), 2);
    // The same token again: refused in one line, like a bad password.
    let e = fails(&coffre(
        &p.addr,
        &tok_c,
        &["login", "--oidc", "keycloak"],
        &format!("{id_token}\n"),
    ));
    assert!(e.contains("invalid tenant, username or password"), "{e}");

    // The approved shred runs once.
    assert!(
        ok(&run(
            &["tenant", "shred", "clinic", "--confirm", "clinic"],
            ""
        ))
        .contains("shredded")
    );
}

/// The approval id in a guarded command's one-line refusal.
fn approval_id(e: &str) -> String {
    e.split("approval required: ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("no approval id in {e}"))
        .to_string()
}

/// One rogue (or stolen) admin against the two-person rule, from the CLI
/// as that operator would try it: a puppet admin needs a second admin and,
/// once made, cannot approve what was asked before it existed; locking
/// the other admin leaves the rogue alone but not free (creating or
/// unlocking an admin still needs a second one); the way back is the
/// offline unlock on the server, audited and alerted.
#[tokio::test]
async fn one_admin_cannot_satisfy_the_two_person_rule_alone() {
    let root = tempfile::tempdir().unwrap();
    let cfg = write_config(
        root.path(),
        "[approval]\nrequired_for = [\"shred_tenant\", \"admin_change\"]\n\
         min_approver_age_minutes = 0.05\nmax_pending_per_requester = 4\n",
    );
    let p = spawn_server(&cfg, &[("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)]).unwrap();
    let tok = root.path().join("token");
    let tok_b = root.path().join("token-b");
    let tok_p = root.path().join("token-p");
    let tok_au = root.path().join("token-au");
    let admin_pw = format!("{ADMIN_PASSWORD}\n");
    let b_pw = format!("{AUDITOR_PASSWORD}\n");
    let create = |addr: &str, user: &str, role: &str, pw: &str| {
        coffre(
            addr,
            &tok,
            &[
                "principal",
                "create",
                "--tenant",
                "system",
                "--username",
                user,
                "--role",
                role,
            ],
            pw,
        )
    };
    ok(&coffre(&p.addr, &tok, &["login"], &admin_pw));
    ok(&coffre(&p.addr, &tok, &["tenant", "create", "doomed"], ""));
    // The bootstrap: the second admin needs nobody (there is no one), and
    // is alerted.
    ok(&create(&p.addr, "admin-b", "admin", &b_pw));
    ok(&create(&p.addr, "auditor", "auditor", &b_pw));
    ok(&coffre(
        &p.addr,
        &tok_b,
        &["login", "--username", "admin-b"],
        &b_pw,
    ));
    ok(&coffre(
        &p.addr,
        &tok_au,
        &["login", "--username", "auditor"],
        &b_pw,
    ));
    // admin-b comes of age as an approver.
    std::thread::sleep(std::time::Duration::from_secs(4));

    // The puppet path: A asks for a shred, then for a puppet admin.
    let shred = fails(&coffre(
        &p.addr,
        &tok,
        &["tenant", "shred", "doomed", "--confirm", "doomed"],
        "",
    ));
    let shred_id = approval_id(&shred);
    let puppet = approval_id(&fails(&create(&p.addr, "puppet", "admin", &b_pw)));
    assert!(
        fails(&coffre(
            &p.addr,
            &tok,
            &["approvals", "approve", &puppet],
            ""
        ))
        .contains("own request")
    );
    // The lock-then-create path: A locks B at once...
    ok(&coffre(
        &p.addr,
        &tok,
        &[
            "principal",
            "lock",
            "--tenant",
            "system",
            "--username",
            "admin-b",
        ],
        "",
    ));
    let e = fails(&coffre(&p.addr, &tok_b, &["approvals", "list"], ""));
    assert!(e.contains("PermissionDenied"), "{e}");
    // ...but a locked admin still counts: no second bootstrap, and the
    // unlock is guarded too.
    approval_id(&fails(&create(&p.addr, "puppet-2", "admin", &b_pw)));
    approval_id(&fails(&coffre(
        &p.addr,
        &tok,
        &[
            "principal",
            "unlock",
            "--tenant",
            "system",
            "--username",
            "admin-b",
        ],
        "",
    )));
    // Four pending: the fifth request is refused, not stored.
    let e = fails(&create(&p.addr, "puppet-3", "admin", &b_pw));
    assert!(e.contains("max_pending_per_requester"), "{e}");
    let pending: serde_json::Value = serde_json::from_str(&ok(&coffre(
        &p.addr,
        &tok,
        &[
            "--json",
            "approvals",
            "list",
            "--state",
            "pending",
            "--limit",
            "2",
        ],
        "",
    )))
    .unwrap();
    assert_eq!(pending.as_array().unwrap().len(), 2, "{pending}");
    let last = pending[1]["id"].as_str().unwrap().to_string();
    let rest: serde_json::Value = serde_json::from_str(&ok(&coffre(
        &p.addr,
        &tok,
        &[
            "--json",
            "approvals",
            "list",
            "--state",
            "pending",
            "--before",
            &last,
        ],
        "",
    )))
    .unwrap();
    assert_eq!(rest.as_array().unwrap().len(), 2, "{rest}");
    assert_eq!(rest[1]["id"], shred_id.as_str(), "oldest last: {rest}");

    // The way back: offline, on the server, with the master key.
    drop(p);
    let out = ok(&coffre(
        "http://127.0.0.1:1",
        &tok,
        &[
            "principal",
            "unlock",
            "--tenant",
            "system",
            "--username",
            "admin-b",
            "--config",
            cfg.to_str().unwrap(),
        ],
        "",
    ));
    assert!(out.contains("unlocked offline"), "{out}");
    let p = spawn_server(&cfg, &[]).unwrap();
    ok(&coffre(
        &p.addr,
        &tok_b,
        &["login", "--username", "admin-b"],
        &b_pw,
    ));
    ok(&coffre(&p.addr, &tok, &["login"], &admin_pw));

    // B approves the puppet; it exists, but is younger than the shred
    // request it was made for: its approval is refused.
    ok(&coffre(
        &p.addr,
        &tok_b,
        &["approvals", "approve", &puppet],
        "",
    ));
    ok(&create(&p.addr, "puppet", "admin", &b_pw));
    ok(&coffre(
        &p.addr,
        &tok_p,
        &["login", "--username", "puppet"],
        &b_pw,
    ));
    std::thread::sleep(std::time::Duration::from_secs(4));
    let e = fails(&coffre(
        &p.addr,
        &tok_p,
        &["approvals", "approve", &shred_id],
        "",
    ));
    assert!(e.contains("min_approver_age_minutes"), "{e}");
    ok(&coffre(
        &p.addr,
        &tok_b,
        &["approvals", "approve", &shred_id],
        "",
    ));
    ok(&coffre(
        &p.addr,
        &tok,
        &["tenant", "shred", "doomed", "--confirm", "doomed"],
        "",
    ));

    // Every admin made, the lock and the offline unlock are critical
    // alerts for the reviewers.
    let alerts = ok(&coffre(
        &p.addr,
        &tok_au,
        &["--json", "audit", "alerts"],
        "",
    ));
    let kinds: Vec<(String, String, String)> = alerts
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|v| match v {
            serde_json::Value::Array(a) => a,
            one => vec![one],
        })
        .map(|a| {
            (
                a["kind"].as_str().unwrap_or_default().to_string(),
                a["principal"].as_str().unwrap_or_default().to_string(),
                a["severity"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for (kind, who) in [
        ("admin_created", "system/admin-b"),
        ("admin_created", "system/puppet"),
        ("admin_locked", "system/admin-b"),
        ("offline_unlock", "system/admin-b"),
    ] {
        assert!(
            kinds
                .iter()
                .any(|(k, p, s)| k == kind && p == who && s == "critical"),
            "{kind} {who}: {kinds:?}"
        );
    }
}
