//! `metrics.listen`: Prometheus text at `/metrics` and the gRPC health
//! service on a plaintext listener of their own, scraped from a live
//! server; the alert rules in `deploy/prometheus/` name only series it
//! serves, and `promtool` accepts them.

mod common;

use std::time::Duration;

use coffre::pb;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PATIENT: &str = "Zoe Marchand-Quatremer";
const NIR: &str = "2850775123456";

/// GET `path` over HTTP/1.1; status line and body.
async fn http_get(addr: &str, path: &str) -> (String, String) {
    try_get(addr, path).await.unwrap()
}

async fn try_get(addr: &str, path: &str) -> std::io::Result<(String, String)> {
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    c.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    // Chunked or not, the body's lines are all there for a search.
    Ok((status, body.to_string()))
}

async fn scrape(s: &TestServer) -> String {
    let (status, body) = http_get(s.metrics_addr.as_ref().unwrap(), "/metrics").await;
    assert!(status.contains("200"), "{status}");
    body
}

/// The sum of the samples of `name` whose labels include every pair of
/// `labels` (absent: 0).
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, want)| rest.contains(&format!("{k}=\"{want}\"")))
                .then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

fn has_series(text: &str, name: &str) -> bool {
    text.lines().any(|l| {
        !l.starts_with('#')
            && l.split(['{', ' ']).next().is_some_and(|n| {
                n == name || n.strip_prefix(name).is_some_and(|r| r.starts_with('_'))
            })
    })
}

async fn metrics_server(extra: &str) -> TestServer {
    let root = tempfile::tempdir().unwrap();
    let config = test_config_with(
        root.path(),
        &format!("[metrics]\nlisten = \"127.0.0.1:0\"\n{extra}"),
    );
    TestServer::start_with(root, config).await
}

fn record(id: &str) -> pb::PutRecordRequest {
    put(id, &[("name", PATIENT), ("nir", NIR)])
}

/// A clinician of tenant `maternite` who has stored `patient-1`; its token.
async fn one_record(s: &TestServer) -> String {
    let token = s
        .tenant_with("maternite", "dr-lefebvre", pb::Role::Clinician)
        .await;
    s.records()
        .await
        .put_record(authed(&token, record("patient-1")))
        .await
        .expect("stored (a mirror that fails does not fail the call)");
    token
}

#[tokio::test]
async fn metrics_move_with_calls_and_carry_no_id_principal_or_value() {
    let s = metrics_server(
        "[limits.clinician]\nreads_per_second = 0.001\nread_burst = 4\nlock_after_throttles = 2\n",
    )
    .await;
    let token = s
        .tenant_with("maternite", "dr-lefebvre", pb::Role::Clinician)
        .await;
    let mut r = s.records().await;
    let before = scrape(&s).await;
    let get_ok = [
        ("grpc_service", "coffre.v1.Records"),
        ("grpc_method", "GetRecord"),
        ("grpc_code", "OK"),
    ];
    let started_get = [
        ("grpc_service", "coffre.v1.Records"),
        ("grpc_method", "GetRecord"),
        ("grpc_type", "unary"),
    ];
    for i in 0..3 {
        r.put_record(authed(&token, record(&format!("patient-{i}"))))
            .await
            .unwrap();
    }
    for i in 0..3 {
        r.get_record(authed(&token, get(&format!("patient-{i}"))))
            .await
            .unwrap();
    }
    let missing = r
        .get_record(authed(&token, get("patient-absent")))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let after = scrape(&s).await;
    let moved = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(moved("grpc_server_started_total", &started_get), 4.0);
    assert_eq!(moved("grpc_server_handled_total", &get_ok), 3.0);
    assert_eq!(
        moved(
            "grpc_server_handled_total",
            &[("grpc_method", "GetRecord"), ("grpc_code", "NotFound")]
        ),
        1.0
    );
    assert_eq!(
        moved(
            "grpc_server_handled_total",
            &[("grpc_method", "PutRecord"), ("grpc_code", "OK")]
        ),
        3.0
    );
    // The histogram: explicit buckets, a count per method.
    assert_eq!(
        moved(
            "grpc_server_handling_seconds_count",
            &[("grpc_method", "GetRecord")]
        ),
        4.0
    );
    assert!(
        after.contains("grpc_server_handling_seconds_bucket{"),
        "no buckets"
    );
    assert!(after.contains("le=\"0.005\""), "explicit buckets");
    // Every event was appended: the append histogram counted them.
    assert!(moved("coffre_audit_append_seconds_count", &[]) >= 7.0);
    assert!(value(&after, "coffre_audit_group_commit_events_count", &[]) >= 1.0);
    assert_eq!(
        value(&after, "coffre_audit_append_failures_total", &[]),
        0.0
    );
    assert_eq!(value(&after, "coffre_serving", &[]), 1.0);
    assert!(value(&after, "coffre_storage_bytes", &[]) > 0.0);
    // Free space: known on the embedded store, NaN (never 0) elsewhere.
    let free = value(&after, "coffre_storage_free_bytes", &[]);
    if test_backend() == "sled" {
        assert!(free > 0.0, "{free}");
    } else {
        assert!(free.is_nan(), "{free}");
    }
    assert!(
        value(&after, "coffre_key_encryptions", &[]) >= 6.0,
        "2 fields × 3 puts"
    );
    assert!(value(&after, "coffre_key_rotation_bound", &[]) > 0.0);
    // An unknown path counts as unknown, not as a new series of its name.
    let mut raw = tonic::client::Grpc::new(s.channel().await);
    raw.ready().await.unwrap();
    // (a method name of a known service is no way in either)
    for path in [
        "/coffre.v1.Records/patient-0-exfil",
        "/coffre.v1.Records/GetRecordZ9",
    ] {
        raw.ready().await.unwrap();
        let odd: Result<tonic::Response<()>, _> = raw
            .unary(
                tonic::Request::new(()),
                http::uri::PathAndQuery::from_static(path),
                EmptyCodec,
            )
            .await;
        assert!(odd.is_err());
    }

    // Throttles and the budget lock, by role; then a honeytoken hit.
    for i in 0..8 {
        let _ = r
            .get_record(authed(&token, get(&format!("patient-{}", i % 3))))
            .await;
    }
    let hit = s.honeytoken("maternite").await;
    let other = s
        .tenant_with("maternite", "dr-morel", pb::Role::Clinician)
        .await;
    let _ = r.get_record(authed(&other, get(&hit))).await;
    let _ = s
        .login("maternite", "dr-morel", "wrong password, surely")
        .await;
    let last = scrape(&s).await;
    assert!(
        value(
            &last,
            "coffre_budget_throttles_total",
            &[("role", "clinician")]
        ) >= 2.0,
        "{last}"
    );
    assert_eq!(
        value(
            &last,
            "coffre_locks_total",
            &[("reason", "budget"), ("role", "clinician")]
        ),
        1.0
    );
    assert_eq!(value(&last, "coffre_honeytoken_hits_total", &[]), 1.0);
    assert_eq!(
        value(&last, "coffre_locks_total", &[("reason", "honeytoken")]),
        1.0
    );
    assert!(value(&last, "coffre_login_failures_total", &[]) >= 1.0);
    assert_eq!(
        value(
            &last,
            "grpc_server_started_total",
            &[("grpc_service", "unknown"), ("grpc_method", "unknown")]
        ),
        2.0
    );
    assert!(!last.contains("GetRecordZ9"));

    // Nothing that names a patient, a record, a person or a tenant.
    for text in [&after, &last] {
        for secret in [
            PATIENT,
            NIR,
            "patient-0",
            "patient-absent",
            "exfil",
            &hit,
            "dr-lefebvre",
            "dr-morel",
            "maternite",
            &token,
        ] {
            assert!(!text.contains(secret), "{secret:?} in /metrics");
        }
    }
}

/// A codec for a call whose answer is never read (the unknown path).
#[derive(Default)]
struct EmptyCodec;

impl tonic::codec::Codec for EmptyCodec {
    type Encode = ();
    type Decode = ();
    type Encoder = EmptyCodec;
    type Decoder = EmptyCodec;
    fn encoder(&mut self) -> Self::Encoder {
        EmptyCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        EmptyCodec
    }
}

impl tonic::codec::Encoder for EmptyCodec {
    type Item = ();
    type Error = tonic::Status;
    fn encode(&mut self, _: (), _: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl tonic::codec::Decoder for EmptyCodec {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, _: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<()>, Self::Error> {
        Ok(Some(()))
    }
}

#[tokio::test]
async fn tenant_labels_only_when_switched_on() {
    let s = metrics_server("tenant_labels = true\n").await;
    one_record(&s).await;
    let text = scrape(&s).await;
    assert!(
        value(&text, "coffre_key_encryptions", &[("tenant", "maternite")]) >= 2.0,
        "{text}"
    );
    assert!(
        value(
            &text,
            "coffre_key_encryptions_ratio",
            &[("tenant", "maternite")]
        ) > 0.0
    );
    // Still no record id, principal or value.
    for secret in [PATIENT, NIR, "patient-1", "dr-lefebvre"] {
        assert!(!text.contains(secret), "{secret:?} in /metrics");
    }
}

#[tokio::test]
async fn the_probe_listener_serves_health_and_nothing_else() {
    let s = metrics_server("").await;
    let addr = s.metrics_addr.clone().unwrap();
    for service in ["", "coffre.v1.Records"] {
        assert!(
            serving(&format!("http://{addr}"), service).await,
            "{service}"
        );
    }
    // No Coffre RPC on the probe port.
    let mut r = pb::records_client::RecordsClient::new(chan(&format!("http://{addr}")).await);
    let e = r.get_record(get("patient-1")).await.unwrap_err();
    assert_ne!(e.code(), tonic::Code::Ok);
    let (status, _) = http_get(&addr, "/admin").await;
    assert!(status.contains("404"), "{status}");
    // No /metrics on the gRPC port.
    let grpc = s.addr.trim_start_matches("http://");
    // (an HTTP/1.1 request there is refused outright, or answered not 200)
    if let Ok((status, body)) = try_get(grpc, "/metrics").await {
        assert!(!status.contains("200"), "{status}");
        assert!(!body.contains("grpc_server"), "{body}");
    }
}

#[tokio::test]
async fn a_failed_mirror_write_is_counted_and_alerted() {
    // /dev/full takes the open and refuses every write (ENOSPC).
    let s = metrics_server("[audit]\nmirror_file = \"/dev/full\"\n").await;
    one_record(&s).await;
    let text = scrape(&s).await;
    assert!(
        value(
            &text,
            "coffre_line_write_failures_total",
            &[("file", "mirror")]
        ) >= 1.0,
        "{text}"
    );
    let auditor = system_auditor(&s).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let alerts = s.alerts(&auditor).await;
        if alerts.iter().any(|a| a.kind == "line_file_write_failed") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no alert: {alerts:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every series an alert rule names is served by a live server, and
/// promtool (Debian's `prometheus` package) accepts the rules and passes
/// their unit tests.
#[tokio::test]
async fn identity_series_count_refused_tokens_two_person_steps_and_grant_reads() {
    let s =
        metrics_server("[approval]\nrequired_for = [\"export_grant\", \"shred_tenant\"]\n").await;
    const B: &str = "orchard violet 7730 basalt wren";
    s.principal("system", "admin-b", pb::Role::Admin, B).await;
    let a = s.admin_token().await;
    let b = s.login("system", "admin-b", B).await.unwrap();
    let researcher = s
        .tenant_with("clinic", "researcher", pb::Role::Clinician)
        .await;
    let before = scrape(&s).await;
    for step in ["requested", "granted", "denied", "used"] {
        assert_eq!(
            value(&before, "coffre_approvals_total", &[("step", step)]),
            0.0,
            "{step}: series exist at 0 before the first request"
        );
    }

    // Two tokens for a provider this server does not have.
    for _ in 0..2 {
        let e = coffre::pb::auth_client::AuthClient::new(s.channel().await)
            .login_oidc(pb::LoginOidcRequest {
                provider: "nowhere".into(),
                id_token: "a.b.c".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }

    // A grant asked, approved, given; a shred asked and denied.
    let grant = pb::GrantExportRequest {
        tenant: "clinic".into(),
        username: "researcher".into(),
        max_records: 20,
        purpose: "research extract".into(),
        hours: 1,
    };
    let mut adm = s.admin().await;
    let id = approval_id(
        &adm.grant_export(authed(&a, grant.clone()))
            .await
            .unwrap_err(),
    );
    adm.approve(authed(&b, pb::ApproveRequest { id }))
        .await
        .unwrap();
    adm.grant_export(authed(&a, grant)).await.unwrap();
    let e = adm
        .shred_tenant(authed(
            &a,
            pb::ShredTenantRequest {
                tenant: "clinic".into(),
                confirm: "clinic".into(),
            },
        ))
        .await
        .unwrap_err();
    let id = approval_id(&e);
    adm.deny(authed(&b, pb::DenyRequest { id })).await.unwrap();

    // Eight records read under the grant.
    let mut rec = s.records().await;
    let ids: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
    for id in &ids {
        rec.put_record(authed(&researcher, record(id)))
            .await
            .unwrap();
    }
    let mut st = rec
        .bulk_read(authed(
            &researcher,
            pb::BulkReadRequest {
                ids: ids.clone(),
                fields: vec![],
                purpose: "research extract".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while st.message().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 8);

    let text = scrape(&s).await;
    assert_eq!(
        value(
            &text,
            "coffre_oidc_refusals_total",
            &[("reason", "unknown_provider")]
        ),
        2.0
    );
    assert_eq!(value(&text, "coffre_oidc_refusals_total", &[]), 2.0);
    for (step, want) in [
        ("requested", 2.0),
        ("granted", 1.0),
        ("denied", 1.0),
        ("used", 1.0),
    ] {
        assert_eq!(
            value(&text, "coffre_approvals_total", &[("step", step)]),
            want,
            "{step}"
        );
    }
    assert_eq!(value(&text, "coffre_export_grant_records_total", &[]), 8.0);
    // Nothing of the token, the purpose or the principals in the series.
    for secret in ["a.b.c", "research extract", "researcher", "admin-b"] {
        assert!(!text.contains(secret), "{secret} in the metrics");
    }
}

#[tokio::test]
async fn alert_rules_name_live_series_and_promtool_accepts_them() {
    let rules_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/coffre-rules.yml"
    );
    let rules: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(rules_path).unwrap()).unwrap();
    let s = metrics_server("").await;
    // A live server has answered calls (the gRPC series exist from the
    // first call on).
    s.admin_token().await;
    let text = scrape(&s).await;
    let mut named = 0;
    let mut alerts = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let expr = rule["expr"].as_str().unwrap();
            alerts.push(rule["alert"].as_str().unwrap().to_string());
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("coffre_") || word.starts_with("grpc_server_") {
                    named += 1;
                    assert!(has_series(&text, word), "{word} (in {expr:?}) not served");
                }
            }
            assert!(rule["annotations"]["summary"].as_str().is_some());
            assert!(rule["labels"]["severity"].as_str().is_some());
        }
    }
    assert!(named >= 7, "{named}");
    for want in [
        "CoffreAuditAppendFailing",
        "CoffreNotServing",
        "CoffreHoneytokenHit",
        "CoffreLockStorm",
        "CoffreKeyNearRotationBound",
        "CoffreNoRecentBackup",
        "CoffreDiskFilling",
        "CoffreLineFileWriteFailing",
    ] {
        assert!(
            alerts.iter().any(|a| a == want),
            "{want} missing: {alerts:?}"
        );
    }
    let Some(promtool) = which("promtool") else {
        eprintln!(
            "*** SKIPPED promtool checks: promtool not installed (apt-get install prometheus) ***"
        );
        return;
    };
    run_ok(std::process::Command::new(&promtool).args(["check", "rules", rules_path]));
    let tests = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/coffre-rules.test.yml"
    );
    run_ok(std::process::Command::new(&promtool).args(["test", "rules", tests]));
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/prometheus.yml"
    );
    run_ok(std::process::Command::new(&promtool).args([
        "check",
        "config",
        "--syntax-only",
        config,
    ]));
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(cmd))
        .find(|p| p.is_file())
}
