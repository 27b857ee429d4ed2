//! The audit trail through the real server: exactly one event per RPC,
//! tamper classes found by verification, fail-closed storage, and events
//! that survive `kill -9`.

mod common;

use std::time::Duration;

use coffre::{
    pb::{self, audit_client::AuditClient, auth_client::AuthClient},
    store::Space,
};
use common::*;
use tonic::Code;

/// RPC events after `after`, leaving out the auditor's own queries and
/// alerts (events of their own kind, `alert/...`).
async fn new_events(s: &TestServer, auditor: &str, after: u64) -> Vec<pb::AuditEvent> {
    events(s, auditor, pb::QueryAuditRequest::default())
        .await
        .into_iter()
        .filter(|e| {
            e.seq > after && e.principal != "system/auditor" && !e.action.starts_with("alert/")
        })
        .collect()
}

async fn head(s: &TestServer, auditor: &str) -> u64 {
    events(
        s,
        auditor,
        pb::QueryAuditRequest {
            limit: 1,
            newest_first: true,
            ..Default::default()
        },
    )
    .await[0]
        .seq
}

#[tokio::test]
async fn every_rpc_allowed_or_refused_makes_exactly_one_event() {
    let s = TestServer::start().await;
    let clin = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let aud = system_auditor(&s).await;
    let admin = s.admin_token().await;
    let mut r = s.records().await;
    r.put_record(authed(&clin, put("p1", &[("nir", "1")])))
        .await
        .unwrap();

    type Call<'a> = (
        &'static str,
        &'static str,
        &'static str,
        Vec<&'static str>,
        std::pin::Pin<Box<dyn std::future::Future<Output = Code> + 'a>>,
    );
    let code = |r: Result<(), tonic::Status>| match r {
        Ok(()) => Code::Ok,
        Err(e) => e.code(),
    };
    let ch = s.channel().await;
    let cases: Vec<Call> = vec![
        (
            "Records/GetRecord",
            "clinic/dr_a",
            "ok",
            vec!["p1"],
            Box::pin({
                let mut r = r.clone();
                let t = clin.clone();
                async move { code(r.get_record(authed(&t, get("p1"))).await.map(|_| ())) }
            }),
        ),
        (
            "Records/GetRecord",
            "clinic/dr_a",
            "not_found",
            vec!["nope"],
            Box::pin({
                let mut r = r.clone();
                let t = clin.clone();
                async move { code(r.get_record(authed(&t, get("nope"))).await.map(|_| ())) }
            }),
        ),
        (
            "Records/GetRecord",
            "system/admin",
            "permission_denied",
            vec![],
            Box::pin({
                let mut r = r.clone();
                let t = admin.clone();
                async move { code(r.get_record(authed(&t, get("p1"))).await.map(|_| ())) }
            }),
        ),
        (
            "Records/GetRecord",
            "",
            "unauthenticated",
            vec![],
            Box::pin({
                let mut r = r.clone();
                async move {
                    code(
                        r.get_record(tonic::Request::new(get("p1")))
                            .await
                            .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Records/PutRecord",
            "clinic/dr_a",
            "ok",
            vec!["p2"],
            Box::pin({
                let mut r = r.clone();
                let t = clin.clone();
                async move {
                    code(
                        r.put_record(authed(&t, put("p2", &[("nir", "2")])))
                            .await
                            .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Records/PutRecord",
            "clinic/dr_a",
            "invalid_argument",
            vec!["p3"],
            Box::pin({
                let mut r = r.clone();
                let t = clin.clone();
                async move {
                    code(
                        r.put_record(authed(&t, put("p3", &[("Bad", "2")])))
                            .await
                            .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Records/FindRecords",
            "clinic/dr_a",
            "ok",
            vec!["p1"],
            Box::pin({
                let mut r = r.clone();
                let t = clin.clone();
                async move {
                    code(
                        r.find_records(authed(
                            &t,
                            pb::FindRecordsRequest {
                                field: "nir".into(),
                                value: "1".into(),
                                purpose: "care".into(),
                            },
                        ))
                        .await
                        .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Records/BulkRead",
            "clinic/dr_a",
            "ok",
            vec!["p1", "p2"],
            Box::pin({
                let mut r = r.clone();
                let t = clin.clone();
                async move {
                    code(
                        r.bulk_read(authed(
                            &t,
                            pb::BulkReadRequest {
                                ids: vec!["p1".into(), "p2".into()],
                                fields: vec![],
                                purpose: "transfer".into(),
                            },
                        ))
                        .await
                        .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Records/SetSecret",
            "clinic/dr_a",
            "ok",
            vec!["p1"],
            Box::pin({
                let mut r = r.clone();
                let t = clin.clone();
                async move {
                    code(
                        r.set_secret(authed(
                            &t,
                            pb::SetSecretRequest {
                                record_id: "p1".into(),
                                name: "portal".into(),
                                secret: "s3cret-portal".into(),
                            },
                        ))
                        .await
                        .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Records/VerifySecret",
            "clinic/dr_a",
            "ok",
            vec!["p1"],
            Box::pin({
                let mut r = r.clone();
                let t = clin.clone();
                async move {
                    code(
                        r.verify_secret(authed(
                            &t,
                            pb::VerifySecretRequest {
                                record_id: "p1".into(),
                                name: "portal".into(),
                                candidate: "guess".into(),
                            },
                        ))
                        .await
                        .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Records/DeleteRecord",
            "clinic/dr_a",
            "ok",
            vec!["p2"],
            Box::pin({
                let mut r = r.clone();
                let t = clin.clone();
                async move {
                    code(
                        r.delete_record(authed(
                            &t,
                            pb::DeleteRecordRequest {
                                id: "p2".into(),
                                purpose: String::new(),
                            },
                        ))
                        .await
                        .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Auth/Login",
            "clinic/dr_a",
            "ok",
            vec![],
            Box::pin({
                let ch = ch.clone();
                async move {
                    code(
                        AuthClient::new(ch)
                            .login(pb::LoginRequest {
                                otp: Default::default(),
                                tenant: "clinic".into(),
                                username: "dr_a".into(),
                                password: CLINICIAN_PASSWORD.into(),
                            })
                            .await
                            .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Auth/Login",
            "clinic/ghost",
            "unauthenticated",
            vec![],
            Box::pin({
                let ch = ch.clone();
                async move {
                    code(
                        AuthClient::new(ch)
                            .login(pb::LoginRequest {
                                otp: Default::default(),
                                tenant: "clinic".into(),
                                username: "ghost".into(),
                                password: "wrong password".into(),
                            })
                            .await
                            .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Admin/CreateTenant",
            "system/admin",
            "ok",
            vec![],
            Box::pin({
                let ch = ch.clone();
                let t = admin.clone();
                async move {
                    code(
                        pb::admin_client::AdminClient::new(ch)
                            .create_tenant(authed(
                                &t,
                                pb::CreateTenantRequest {
                                    name: "clinic2".into(),
                                    indexed_fields: vec![],
                                },
                            ))
                            .await
                            .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Admin/CreateTenant",
            "clinic/dr_a",
            "permission_denied",
            vec![],
            Box::pin({
                let ch = ch.clone();
                let t = clin.clone();
                async move {
                    code(
                        pb::admin_client::AdminClient::new(ch)
                            .create_tenant(authed(
                                &t,
                                pb::CreateTenantRequest {
                                    name: "clinic3".into(),
                                    indexed_fields: vec![],
                                },
                            ))
                            .await
                            .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Admin/SetPrincipalLocked",
            "system/admin",
            "ok",
            vec![],
            Box::pin({
                let ch = ch.clone();
                let t = admin.clone();
                async move {
                    code(
                        pb::admin_client::AdminClient::new(ch)
                            .set_principal_locked(authed(
                                &t,
                                pb::SetPrincipalLockedRequest {
                                    tenant: "clinic".into(),
                                    username: "dr_a".into(),
                                    locked: false,
                                },
                            ))
                            .await
                            .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Admin/RotateTenantKey",
            "system/admin",
            "ok",
            vec![],
            Box::pin({
                let ch = ch.clone();
                let t = admin.clone();
                async move {
                    code(
                        pb::admin_client::AdminClient::new(ch)
                            .rotate_tenant_key(authed(
                                &t,
                                pb::RotateTenantKeyRequest {
                                    tenant: "clinic".into(),
                                },
                            ))
                            .await
                            .map(|_| ()),
                    )
                }
            }),
        ),
        (
            "Audit/VerifyAudit",
            "clinic/dr_a",
            "permission_denied",
            vec![],
            Box::pin({
                let ch = ch.clone();
                let t = clin.clone();
                async move {
                    code(
                        AuditClient::new(ch)
                            .verify_audit(authed(&t, pb::VerifyAuditRequest::default()))
                            .await
                            .map(|_| ()),
                    )
                }
            }),
        ),
    ];
    let n = cases.len();
    for (action, principal, outcome, ids, call) in cases {
        let before = head(&s, &aud).await;
        call.await;
        let got = new_events(&s, &aud, before).await;
        assert_eq!(got.len(), 1, "{action} {outcome}: {got:?}");
        let e = &got[0];
        assert_eq!(e.action, format!("coffre.v1.{action}"));
        assert_eq!(e.principal, principal, "{action} {outcome}");
        assert_eq!(e.outcome, outcome, "{action}");
        assert_eq!(e.record_ids, ids, "{action} {outcome}");
        assert!(e.peer.starts_with("127.0.0.1:"), "{e:?}");
        assert_eq!(e.hash.len(), 32);
    }
    println!("audit: {n} RPC cases, one event each");
    // Auditors see the purpose as given, and a patient's accesses by id.
    let p1 = events(
        &s,
        &aud,
        pb::QueryAuditRequest {
            record_id: "p1".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(
        p1.iter()
            .any(|e| e.purpose == "transfer" && e.action.ends_with("BulkRead"))
    );
    let v = AuditClient::new(s.channel().await)
        .verify_audit(authed(&aud, pb::VerifyAuditRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    assert!(v.checked as usize > n);
}

#[tokio::test]
async fn a_tenant_auditor_sees_only_its_tenant() {
    let s = TestServer::start().await;
    let a = s.tenant_with("clinic_a", "dr_a", pb::Role::Clinician).await;
    let b = s.tenant_with("clinic_b", "dr_b", pb::Role::Clinician).await;
    let aud_a = s.tenant_with("clinic_a", "aud_a", pb::Role::Auditor).await;
    let mut r = s.records().await;
    r.put_record(authed(&a, put("x", &[("nir", "1")])))
        .await
        .unwrap();
    r.put_record(authed(&b, put("y", &[("nir", "2")])))
        .await
        .unwrap();
    let seen = events(&s, &aud_a, pb::QueryAuditRequest::default()).await;
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|e| e.tenant == "clinic_a"), "{seen:?}");
    assert!(seen.iter().any(|e| e.record_ids == vec!["x"]));
    let asked_b = events(
        &s,
        &aud_a,
        pb::QueryAuditRequest {
            tenant: "clinic_b".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(asked_b.is_empty());
}

async fn verify(
    s: &TestServer,
    aud: &str,
    checkpoint: Option<(u64, Vec<u8>)>,
) -> pb::VerifyAuditResponse {
    verify_audit(s, aud, checkpoint).await
}

#[tokio::test]
async fn five_tamper_classes_are_detected_and_located() {
    let mut detected = Vec::new();
    for class in ["edit", "insert", "delete", "reorder", "truncate"] {
        let mut s = TestServer::start().await;
        let clin = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
        let aud = system_auditor(&s).await;
        let mut r = s.records().await;
        for i in 0..10 {
            r.put_record(authed(&clin, put(&format!("p{i}"), &[("nir", "1")])))
                .await
                .unwrap();
        }
        let v = verify(&s, &aud, None).await;
        assert!(v.ok);
        let checkpoint = (v.head_seq, v.head_hash.clone());
        s.stop().await;
        // The frame holding event 5 (sequential calls: one event a frame).
        let target = trail_frame_of(&s, 5);
        edit_trail(&s, |frames| {
            let i = frames.iter().position(|f| f.0 == target).unwrap();
            match class {
                "edit" => {
                    // A byte of the encrypted event.
                    let f = &mut frames[i].1;
                    let n = f.len();
                    f[n - 20] ^= 1;
                }
                "insert" => {
                    // An older frame copied in at `target`.
                    let copy = frames[i - 2].clone();
                    frames.insert(i, copy);
                }
                "delete" => {
                    frames.remove(i);
                }
                "reorder" => frames.swap(i, i + 1),
                // The tail cut off: only the auditor's checkpoint can tell.
                "truncate" => frames.truncate(i),
                _ => unreachable!(),
            }
        });
        s.restart().await;
        let aud = s
            .login("system", "auditor", AUDITOR_PASSWORD)
            .await
            .unwrap();
        let v = verify(&s, &aud, Some(checkpoint.clone())).await;
        assert!(!v.ok, "{class} not detected");
        let expect = if class == "truncate" {
            checkpoint.0
        } else {
            target
        };
        assert_eq!(v.first_bad_seq, expect, "{class}: {}", v.reason);
        detected.push(format!("{class}@{} ({})", v.first_bad_seq, v.reason));
    }
    println!(
        "audit tamper: {}/5 detected: {}",
        detected.len(),
        detected.join("; ")
    );
}

#[tokio::test]
async fn a_read_fails_closed_when_its_event_cannot_be_stored() {
    let s = TestServer::start_faulty().await;
    let clin = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    r.put_record(authed(&clin, put("p1", &[("nir", "185077512345678")])))
        .await
        .unwrap();
    s.faults.as_ref().unwrap().fail(Space::Audit);
    let e = r.get_record(authed(&clin, get("p1"))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(!e.message().contains("185077512345678"));
    let e = r
        .bulk_read(authed(
            &clin,
            pb::BulkReadRequest {
                ids: vec!["p1".into()],
                fields: vec![],
                purpose: "x".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "no stream is returned");
    s.faults.as_ref().unwrap().heal();
    let rec = r
        .get_record(authed(&clin, get("p1")))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(rec.fields["nir"], "185077512345678");
}

/// Sets up the real binary with a mirror and info logs; returns the server,
/// the clinician token and the system auditor token.
async fn binary_with_mirror(root: &std::path::Path) -> (Proc, String, String) {
    let cfg = write_config(
        root,
        &format!("[audit]\nmirror_file = {:?}\n", root.join("mirror.jsonl")),
    );
    let p = spawn_server(
        &cfg,
        &[
            ("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN_PASSWORD),
            ("COFFRE_LOG", "debug"),
        ],
    )
    .unwrap();
    bin_setup(
        &p.addr,
        &[
            ("clinic", "dr_a", CLINICIAN_PASSWORD, pb::Role::Clinician),
            ("system", "auditor", AUDITOR_PASSWORD, pb::Role::Auditor),
        ],
    )
    .await;
    let clin = bin_login(&p.addr, "clinic", "dr_a", CLINICIAN_PASSWORD).await;
    let aud = bin_login(&p.addr, "system", "auditor", AUDITOR_PASSWORD).await;
    (p, clin, aud)
}

#[tokio::test]
async fn acknowledged_reads_keep_their_events_through_kill_9() {
    let root = tempfile::tempdir().unwrap();
    let (mut p, clin, _) = binary_with_mirror(root.path()).await;
    let mut r = pb::records_client::RecordsClient::new(chan(&p.addr).await);
    r.put_record(authed(&clin, put("p1", &[("nir", "1")])))
        .await
        .unwrap();
    for i in 0..100 {
        r.get_record(authed(
            &clin,
            pb::GetRecordRequest {
                id: "p1".into(),
                fields: vec![],
                purpose: format!("read {i}"),
            },
        ))
        .await
        .unwrap();
    }
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    let cfg = root.path().join("coffre.toml");
    let mut p = spawn_server(&cfg, &[]).unwrap();
    let aud = bin_login(&p.addr, "system", "auditor", AUDITOR_PASSWORD).await;
    let mut st = AuditClient::new(chan(&p.addr).await)
        .query_audit(authed(
            &aud,
            pb::QueryAuditRequest {
                action: "GetRecord".into(),
                record_id: "p1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut purposes = Vec::new();
    while let Some(e) = st.message().await.unwrap() {
        purposes.push(e.purpose);
    }
    let want: Vec<String> = (0..100).map(|i| format!("read {i}")).collect();
    assert_eq!(purposes, want, "all 100 acknowledged reads, in order");
    let v = AuditClient::new(chan(&p.addr).await)
        .verify_audit(authed(&aud, pb::VerifyAuditRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
    println!(
        "audit after kill -9: 100/100 read events, chain of {} verifies",
        v.checked
    );
    let _ = p.child.kill();
}

#[tokio::test]
async fn no_value_password_or_token_reaches_events_mirror_or_logs() {
    let root = tempfile::tempdir().unwrap();
    let (mut p, clin, aud) = binary_with_mirror(root.path()).await;
    let mut canaries = vec![
        CLINICIAN_PASSWORD.to_string(),
        ADMIN_PASSWORD.to_string(),
        AUDITOR_PASSWORD.to_string(),
        clin.clone(),
        aud.clone(),
    ];
    let mut r = pb::records_client::RecordsClient::new(chan(&p.addr).await);
    for i in 0..20 {
        let nir = format!("CANARYNIR{i:04}");
        let name = format!("CanaryName{i:04}");
        r.put_record(authed(
            &clin,
            put(&format!("p{i}"), &[("nir", &nir), ("family_name", &name)]),
        ))
        .await
        .unwrap();
        r.find_records(authed(
            &clin,
            pb::FindRecordsRequest {
                field: "nir".into(),
                value: nir.clone(),
                purpose: "lookup".into(),
            },
        ))
        .await
        .unwrap();
        let secret = format!("CanarySecret{i:04}");
        r.set_secret(authed(
            &clin,
            pb::SetSecretRequest {
                record_id: format!("p{i}"),
                name: "portal".into(),
                secret: secret.clone(),
            },
        ))
        .await
        .unwrap();
        canaries.extend([nir, name, secret]);
    }
    // A wrong password and a password typed as a username.
    let _ = AuthClient::new(chan(&p.addr).await)
        .login(pb::LoginRequest {
            otp: Default::default(),
            tenant: "clinic".into(),
            username: "canarypasswordasuser".into(),
            password: "CanaryWrongPassword".into(),
        })
        .await;
    canaries.push("CanaryWrongPassword".into());
    let mut st = AuditClient::new(chan(&p.addr).await)
        .query_audit(authed(&aud, pb::QueryAuditRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let mut events = String::new();
    while let Some(e) = st.message().await.unwrap() {
        events.push_str(&format!("{e:?}\n"));
    }
    let _ = p.child.kill();
    p.child.wait().unwrap();
    let mirror = std::fs::read_to_string(root.path().join("mirror.jsonl")).unwrap();
    let logs = std::fs::read_to_string(&p.stderr_path).unwrap();
    assert!(mirror.lines().count() > 60, "mirror has the events");
    assert!(
        logs.contains("coffre.v1.Records/PutRecord"),
        "logs were captured"
    );
    let mut hits = Vec::new();
    for c in &canaries {
        for (name, text) in [("events", &events), ("mirror", &mirror), ("logs", &logs)] {
            if text.contains(c.as_str()) {
                hits.push(format!("{name}: {c}"));
            }
        }
    }
    println!(
        "canary scan: {} canaries over {} events, {} mirror lines, {} log lines: {} hits",
        canaries.len(),
        events.lines().count(),
        mirror.lines().count(),
        logs.lines().count(),
        hits.len()
    );
    assert!(hits.is_empty(), "{hits:?}");
}

#[tokio::test]
async fn lockouts_and_unlocks_raise_alerts() {
    let root = tempfile::tempdir().unwrap();
    let mut config = test_config(root.path());
    let alert_file = root.path().join("alerts.jsonl");
    config.alert_file = Some(alert_file.clone());
    let s = TestServer::start_with(root, config).await;
    s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let aud = system_auditor(&s).await;
    for _ in 0..5 {
        s.login("clinic", "dr_a", "not the password")
            .await
            .unwrap_err();
        s.login("clinic", "ghost", "not the password")
            .await
            .unwrap_err();
    }
    let admin = s.admin_token().await;
    s.admin()
        .await
        .set_principal_locked(authed(
            &admin,
            pb::SetPrincipalLockedRequest {
                tenant: "clinic".into(),
                username: "dr_a".into(),
                locked: false,
            },
        ))
        .await
        .unwrap();
    let alerts: Vec<_> = s
        .alerts(&aud)
        .await
        .into_iter()
        .map(|a| (a.kind, a.severity, a.principal, a.detail))
        .collect();
    let kinds: Vec<_> = alerts
        .iter()
        .map(|a| (a.0.as_str(), a.1.as_str(), a.2.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("reader_created", "warning", "clinic/dr_a"),
            ("login_lockout", "critical", "clinic/dr_a"),
            ("login_lockout", "critical", "clinic/ghost"),
            ("admin_unlock", "warning", "clinic/dr_a"),
        ],
        "{alerts:?}"
    );
    assert!(alerts[0].3.contains("created by system/admin"));
    assert!(alerts[1].3.contains("5 consecutive failed logins"));
    let lines = std::fs::read_to_string(&alert_file).unwrap();
    assert_eq!(lines.lines().count(), 4);
    assert!(!lines.contains("not the password"));
    // A tenant's auditor sees its own tenant's alerts only.
    let other = s.tenant_with("clinic_b", "aud_b", pb::Role::Auditor).await;
    let mut st = AuditClient::new(s.channel().await)
        .list_alerts(authed(&other, pb::ListAlertsRequest { since_unix_ms: 0 }))
        .await
        .unwrap()
        .into_inner();
    assert!(st.message().await.unwrap().is_none());
}

#[tokio::test]
async fn retention_pruning_keeps_the_rest_verifiable() {
    let mut s = TestServer::start().await;
    let clin = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let aud = system_auditor(&s).await;
    let mut r = s.records().await;
    r.put_record(authed(&clin, put("old", &[("nir", "1")])))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cutoff = coffre::clock::now_ms();
    // Retention drops whole segments: close the one holding "old" at the
    // cutoff, as a segment filling up or an earlier pruning run would.
    s.vault.as_ref().unwrap().audit.seal().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    r.put_record(authed(&clin, put("new", &[("nir", "2")])))
        .await
        .unwrap();
    let before = verify(&s, &aud, None).await;
    let pruned = s.vault.as_ref().unwrap().audit.prune(cutoff).await.unwrap();
    assert!(pruned > 3, "pruned {pruned}");
    let after = verify(&s, &aud, None).await;
    assert!(after.ok, "{after:?}");
    assert!(after.checked < before.checked);
    let kept = events(&s, &aud, pb::QueryAuditRequest::default()).await;
    assert!(kept.iter().all(|e| e.time_unix_ms >= cutoff));
    assert!(kept.iter().any(|e| e.record_ids == vec!["new"]));
    println!(
        "retention: pruned {pruned} events, {} kept and verified",
        after.checked
    );

    // Deleting the first kept event is still caught.
    let first = kept[0].seq;
    s.stop().await;
    edit_trail(&s, |frames| {
        assert_eq!(frames[0].0, first);
        frames.remove(0);
    });
    s.restart().await;
    let aud = s
        .login("system", "auditor", AUDITOR_PASSWORD)
        .await
        .unwrap();
    let v = verify(&s, &aud, None).await;
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, first);
}
