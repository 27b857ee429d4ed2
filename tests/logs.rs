//! The real binary's logs and line files, as a log shipper and logrotate
//! meet them: `log_format = "json"` writes one JSON object per line, each
//! call's line names its request id and principal and never a value; the
//! mirror and alert files reopen on SIGHUP.

mod common;

use std::{process::Command, time::Duration};

use coffre::pb;
use common::*;

const PATIENT: &str = "Ines Delacroix-Vautrin";

fn hup(p: &Proc) {
    let st = Command::new("kill")
        .args(["-HUP", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn json_logs_name_the_request_and_principal_never_a_value() {
    let root = tempfile::tempdir().unwrap();
    let cfg = write_config(root.path(), "log_format = \"json\"");
    let p = spawn_server(
        &cfg,
        &[
            ("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD),
            ("COFFRE_LOG", "info"),
        ],
    )
    .unwrap();
    bin_setup(
        &p.addr,
        &[("clinic", "dr-roux", CLINICIAN_PASSWORD, pb::Role::Clinician)],
    )
    .await;
    let token = bin_login(&p.addr, "clinic", "dr-roux", CLINICIAN_PASSWORD).await;
    let mut r = pb::records_client::RecordsClient::new(chan(&p.addr).await);
    let mut req = authed(&token, put("patient-77", &[("name", PATIENT)]));
    req.metadata_mut()
        .insert("x-request-id", "ward-7-req-0042".parse().unwrap());
    let resp = r.put_record(req).await.unwrap();
    assert_eq!(
        resp.metadata().get("x-request-id").unwrap(),
        "ward-7-req-0042",
        "the id comes back"
    );
    // Without one, the server makes one up and says which.
    let e = r
        .get_record(authed(&token, get("patient-absent")))
        .await
        .unwrap_err();
    let made = e
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(made.len(), 32, "{made}");
    assert!(made.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");

    let log = || std::fs::read_to_string(&p.stderr_path).unwrap();
    wait_for("the call's log line", || log().contains(&made)).await;
    let text = log();
    let mut rpc_lines = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["message"] == "rpc" {
            rpc_lines.push(v);
        }
    }
    let put_line = rpc_lines
        .iter()
        .find(|v| v["request_id"] == "ward-7-req-0042")
        .expect("the PutRecord line");
    assert_eq!(put_line["action"], "coffre.v1.Records/PutRecord");
    assert_eq!(put_line["principal"], "clinic/dr-roux");
    assert_eq!(put_line["outcome"], "ok");
    assert!(put_line["audit_seq"].as_u64().unwrap() > 0);
    let get_line = rpc_lines
        .iter()
        .find(|v| v["request_id"] == made.as_str())
        .unwrap();
    assert_eq!(get_line["outcome"], "not_found");
    for secret in [PATIENT, CLINICIAN_PASSWORD, ADMIN_PASSWORD, token.as_str()] {
        assert!(!text.contains(secret), "{secret:?} in the log");
    }
    // No colours when the log is not a terminal.
    assert!(!text.contains('\u{1b}'));
}

#[tokio::test]
async fn mirror_and_alert_files_reopen_on_sighup() {
    let root = tempfile::tempdir().unwrap();
    let mirror = root.path().join("mirror.jsonl");
    let alerts = root.path().join("alerts.jsonl");
    let cfg = write_config(
        root.path(),
        &format!("alert_file = {alerts:?}\n[audit]\nmirror_file = {mirror:?}\n"),
    );
    let p = spawn_server(&cfg, &[("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD)]).unwrap();
    bin_login(&p.addr, "system", "admin", ADMIN_PASSWORD).await;
    assert!(
        std::fs::read_to_string(&mirror)
            .unwrap()
            .contains("Auth/Login")
    );
    // logrotate: move the files away, then SIGHUP.
    let rotated = root.path().join("mirror.jsonl.1");
    let rotated_alerts = root.path().join("alerts.jsonl.1");
    std::fs::rename(&mirror, &rotated).unwrap();
    std::fs::rename(&alerts, &rotated_alerts).unwrap();
    hup(&p);
    wait_for("the mirror reopened", || mirror.exists() && alerts.exists()).await;
    let before = std::fs::read_to_string(&rotated).unwrap();
    // Five failed logins lock a name: an alert, in both new files.
    for _ in 0..5 {
        let _ = pb::auth_client::AuthClient::new(chan(&p.addr).await)
            .login(pb::LoginRequest {
                otp: Default::default(),
                tenant: "system".into(),
                username: "intruder".into(),
                password: "not the password at all".into(),
            })
            .await;
    }
    let now = std::fs::read_to_string(&mirror).unwrap();
    assert!(now.contains("Auth/Login"), "new events go to the new file");
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap(),
        before,
        "the old file is left alone"
    );
    let a = std::fs::read_to_string(&alerts).unwrap();
    assert!(a.contains("login_lockout"), "{a}");
    use std::os::unix::fs::PermissionsExt;
    for f in [&mirror, &alerts] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // The server still serves after the signal.
    bin_login(&p.addr, "system", "admin", ADMIN_PASSWORD).await;
}
