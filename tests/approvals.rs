//! The two-person rule and export grants, on a real server: what one admin
//! asks, another approves; an approval is spent once, expires, or is
//! denied; an export grant lets one principal read exactly its records
//! beyond its budget, for its purpose only, and shows in alerts and the
//! report.

mod common;

use coffre::pb::{self, admin_client::AdminClient};
use common::*;
use tonic::transport::Channel;

const B_PASSWORD: &str = "orchard violet 7730 basalt wren";

/// A server where every guarded action needs a second admin (approvals
/// last `ttl_minutes`), with a second admin `admin-b` and tenant `clinic`.
async fn server(ttl_minutes: f64, extra: &str) -> (TestServer, String, String) {
    let root = tempfile::tempdir().unwrap();
    let config = test_config_with(
        root.path(),
        &format!(
            "{extra}\n[approval]\nrequired_for = [\"shred_tenant\", \"retire_key_version\", \"reset_mfa\", \"export_grant\"]\nttl_minutes = {ttl_minutes}\n"
        ),
    );
    let s = TestServer::start_with(root, config).await;
    s.principal("system", "admin-b", pb::Role::Admin, B_PASSWORD)
        .await;
    let a = s.admin_token().await;
    let b = s.login("system", "admin-b", B_PASSWORD).await.unwrap();
    for t in ["clinic", "doomed", "kept"] {
        s.admin()
            .await
            .create_tenant(authed(
                &a,
                pb::CreateTenantRequest {
                    name: t.into(),
                    indexed_fields: vec![],
                },
            ))
            .await
            .unwrap();
    }
    (s, a, b)
}

async fn shred(s: &TestServer, token: &str, t: &str) -> Result<(), tonic::Status> {
    s.admin()
        .await
        .shred_tenant(authed(
            token,
            pb::ShredTenantRequest {
                tenant: t.into(),
                confirm: t.into(),
            },
        ))
        .await
        .map(|_| ())
}

async fn decide(s: &TestServer, token: &str, id: &str, yes: bool) -> Result<(), tonic::Status> {
    let mut a = s.admin().await;
    if yes {
        a.approve(authed(token, pb::ApproveRequest { id: id.into() }))
            .await
            .map(|_| ())
    } else {
        a.deny(authed(token, pb::DenyRequest { id: id.into() }))
            .await
            .map(|_| ())
    }
}

async fn approvals(s: &TestServer, token: &str) -> Vec<pb::Approval> {
    s.admin()
        .await
        .list_approvals(authed(token, pb::ListApprovalsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .approvals
}

async fn tenant_exists(a: &mut AdminClient<Channel>, token: &str, t: &str) -> bool {
    a.key_status(authed(token, pb::KeyStatusRequest { tenant: t.into() }))
        .await
        .is_ok()
}

#[tokio::test]
async fn shredding_needs_a_second_admin_and_an_approval_is_spent_once() {
    let (s, a, b) = server(60.0, ROOMY_LIMITS).await;
    let mut adm = s.admin().await;
    let e = shred(&s, &a, "doomed").await.unwrap_err();
    let id = approval_id(&e);
    assert!(tenant_exists(&mut adm, &a, "doomed").await);
    // Asking again before a decision names the same request.
    assert_eq!(approval_id(&shred(&s, &a, "doomed").await.unwrap_err()), id);
    // Nobody approves their own request.
    let e = decide(&s, &a, &id, true).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let listed = approvals(&s, &b).await;
    assert_eq!(listed.len(), 1);
    let p = &listed[0];
    assert_eq!(
        (
            p.action.as_str(),
            p.target.as_str(),
            p.requested_by.as_str(),
            p.state.as_str()
        ),
        ("shred_tenant", "tenant=doomed", "system/admin", "pending")
    );
    assert!(p.expires_at_unix_ms - p.requested_at_unix_ms == 3_600_000);
    // Another admin approves: the requester's repeat runs, once.
    decide(&s, &b, &id, true).await.unwrap();
    // An approval of one target does not cover another.
    approval_id(&shred(&s, &a, "kept").await.unwrap_err());
    // Nor does it let the approver run it.
    approval_id(&shred(&s, &b, "doomed").await.unwrap_err());
    shred(&s, &a, "doomed").await.unwrap();
    assert!(!tenant_exists(&mut adm, &a, "doomed").await);
    let listed = approvals(&s, &a).await;
    let used = listed.iter().find(|x| x.id == id).unwrap();
    assert_eq!(
        (used.state.as_str(), used.decided_by.as_str()),
        ("used", "system/admin-b")
    );
    // Deciding a spent approval again is refused.
    assert_eq!(
        decide(&s, &b, &id, true).await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );

    // A denied request does nothing: the repeat asks anew.
    let kept = approval_id(&shred(&s, &a, "kept").await.unwrap_err());
    decide(&s, &b, &kept, false).await.unwrap();
    let again = approval_id(&shred(&s, &a, "kept").await.unwrap_err());
    assert_ne!(again, kept);
    assert!(tenant_exists(&mut adm, &a, "kept").await);
    assert_eq!(
        decide(&s, &b, &kept, true).await.unwrap_err().code(),
        tonic::Code::FailedPrecondition,
        "a denied request cannot be approved after"
    );

    // Every step is audited and alerted.
    let auditor = system_auditor(&s).await;
    let kinds: Vec<String> = s
        .alerts(&auditor)
        .await
        .into_iter()
        .map(|a| a.kind)
        .collect();
    for k in [
        "approval_requested",
        "approval_granted",
        "approval_used",
        "approval_denied",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} in {kinds:?}");
    }
    let ev = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            action: "coffre.v1.Admin/ShredTenant".into(),
            ..Default::default()
        },
    )
    .await;
    let first = &ev[0];
    assert_eq!(first.outcome, "failed_precondition");
    assert!(
        first.fields.contains(&format!("approval={id}")),
        "{first:?}"
    );
    let approve = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            action: "coffre.v1.Admin/Approve".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(approve.iter().any(|e| e.outcome == "ok"
        && e.principal == "system/admin-b"
        && e.fields.contains(&format!("approval={id}"))));
    assert!(
        approve
            .iter()
            .any(|e| e.outcome == "permission_denied" && e.principal == "system/admin")
    );
}

#[tokio::test]
async fn an_expired_approval_does_nothing() {
    // 1.2 s approvals.
    let (s, a, b) = server(0.02, ROOMY_LIMITS).await;
    let mut adm = s.admin().await;
    let id = approval_id(&shred(&s, &a, "doomed").await.unwrap_err());
    decide(&s, &b, &id, true).await.unwrap();
    let late = approval_id(&shred(&s, &a, "kept").await.unwrap_err());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let again = approval_id(&shred(&s, &a, "doomed").await.unwrap_err());
    assert_ne!(again, id);
    assert!(tenant_exists(&mut adm, &a, "doomed").await);
    // Too late to approve, too.
    assert_eq!(
        decide(&s, &b, &late, true).await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    let states: Vec<_> = approvals(&s, &a)
        .await
        .into_iter()
        .filter(|x| x.id == id || x.id == late)
        .map(|x| x.state)
        .collect();
    assert_eq!(states, vec!["expired", "expired"]);
}

#[tokio::test]
async fn parallel_decisions_on_one_request_settle_it_once() {
    let (s, a, b) = server(60.0, "").await;
    s.principal("system", "admin-c", pb::Role::Admin, B_PASSWORD)
        .await;
    let c = s.login("system", "admin-c", B_PASSWORD).await.unwrap();
    let id = approval_id(&shred(&s, &a, "doomed").await.unwrap_err());
    // Two admins, eight approvals and eight denials at once.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s_token = if i % 2 == 0 { b.clone() } else { c.clone() };
        let yes = i % 4 < 2;
        let mut adm = s.admin().await;
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let ok = if yes {
                adm.approve(authed(&s_token, pb::ApproveRequest { id }))
                    .await
                    .is_ok()
            } else {
                adm.deny(authed(&s_token, pb::DenyRequest { id }))
                    .await
                    .is_ok()
            };
            ok.then_some(yes)
        }));
    }
    let mut won = Vec::new();
    for t in tasks {
        won.extend(t.await.unwrap());
    }
    assert_eq!(won.len(), 1, "exactly one decision lands: {won:?}");
    let state = &approvals(&s, &b).await[0].state;
    assert_eq!(state, if won[0] { "approved" } else { "denied" });
    // And the shred follows that one decision.
    assert_eq!(shred(&s, &a, "doomed").await.is_ok(), won[0]);
}

#[tokio::test]
async fn one_approval_lets_exactly_one_of_parallel_repeats_through() {
    let (s, a, b) = server(60.0, ROOMY_LIMITS).await;
    s.principal("clinic", "reader", pb::Role::Clinician, CLINICIAN_PASSWORD)
        .await;
    let grant = || pb::GrantExportRequest {
        tenant: "clinic".into(),
        username: "reader".into(),
        max_records: 10,
        purpose: "transfer to CHU Lyon".into(),
        hours: 1,
    };
    let e = s
        .admin()
        .await
        .grant_export(authed(&a, grant()))
        .await
        .unwrap_err();
    let id = approval_id(&e);
    decide(&s, &b, &id, true).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let mut c = s.admin().await;
        let (a, g) = (a.clone(), grant());
        tasks.push(tokio::spawn(async move {
            c.grant_export(authed(&a, g)).await.is_ok()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    assert_eq!(ok, 1);
}

/// Budget of a clinician here: 5 records at once, 20 an hour.
const TIGHT: &str = "[limits.clinician]\nreads_per_second = 1.0\nread_burst = 5\n\
    distinct_records_per_hour = 20\ndistinct_records_per_day = 40\nlock_after_throttles = 1000\n";
const PURPOSE: &str = "research extract, protocol 2026-114";

/// `n` records with ids `<prefix>0000…`, written by `token`.
async fn records(s: &TestServer, token: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut rec = s.records().await;
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i:04}")).collect();
    for id in &ids {
        rec.put_record(authed(token, put(id, &[("name", "Patient")])))
            .await
            .unwrap();
    }
    ids
}

/// A grant of `max_records` to `clinic/researcher` for [`PURPOSE`]: asked
/// by `a`, approved by `b`, then given.
async fn grant_by_two(s: &TestServer, a: &str, b: &str, max_records: u32, hours: u32) {
    let grant = pb::GrantExportRequest {
        tenant: "clinic".into(),
        username: "researcher".into(),
        max_records,
        purpose: PURPOSE.into(),
        hours,
    };
    let mut adm = s.admin().await;
    let id = approval_id(
        &adm.grant_export(authed(a, grant.clone()))
            .await
            .unwrap_err(),
    );
    decide(s, b, &id, true).await.unwrap();
    adm.grant_export(authed(a, grant)).await.unwrap();
}

#[tokio::test]
async fn an_export_grant_reads_its_records_beyond_the_budget_and_no_more() {
    let (s, a, b) = server(60.0, TIGHT).await;
    let researcher = s
        .tenant_with("clinic", "researcher", pb::Role::Clinician)
        .await;
    s.principal("clinic", "other", pb::Role::Clinician, CLINICIAN_PASSWORD)
        .await;
    let other = s
        .login("clinic", "other", CLINICIAN_PASSWORD)
        .await
        .unwrap();
    // A grant out of bounds is refused before anyone is asked.
    for (max_records, hours) in [(0, 2), (1000, 0), (1000, 24 * 365)] {
        let e = s
            .admin()
            .await
            .grant_export(authed(
                &a,
                pb::GrantExportRequest {
                    tenant: "clinic".into(),
                    username: "researcher".into(),
                    max_records,
                    purpose: PURPOSE.into(),
                    hours,
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{max_records} {hours}"
        );
        assert!(e.metadata().get("coffre-approval-id").is_none(), "{e:?}");
    }
    assert!(approvals(&s, &b).await.is_empty());
    // 1,010 records (writes spend no read budget).
    let rec = s.records().await;
    let ids = records(&s, &researcher, "p", 1010).await;
    grant_by_two(&s, &a, &b, 1000, 2).await;

    let bulk = |token: &str, ids: &[String], purpose: &str| {
        let req = authed(
            token,
            pb::BulkReadRequest {
                ids: ids.to_vec(),
                fields: vec![],
                purpose: purpose.into(),
            },
        );
        let mut rec = rec.clone();
        async move {
            let mut st = match rec.bulk_read(req).await {
                Ok(r) => r.into_inner(),
                Err(e) => return (0, Some(e.code())),
            };
            let mut n = 0;
            loop {
                match st.message().await {
                    Ok(Some(_)) => n += 1,
                    Ok(None) => return (n, None),
                    Err(e) => return (n, Some(e.code())),
                }
            }
        }
    };
    // With the purpose, 1,000 records in one call, far past the budget.
    assert_eq!(bulk(&researcher, &ids[..1000], PURPOSE).await, (1000, None));
    // Then no more under the grant.
    let (n, code) = bulk(&researcher, &ids[1000..], PURPOSE).await;
    assert_eq!((n, code), (0, Some(tonic::Code::ResourceExhausted)));
    // Its own budget is untouched: other purposes read 5 at once, as before.
    let (n, code) = bulk(&researcher, &ids[1000..], "care").await;
    assert_eq!((n, code), (5, Some(tonic::Code::ResourceExhausted)));
    // Another clinician with the same purpose has only its budget.
    let (n, code) = bulk(&other, &ids[..10], PURPOSE).await;
    assert_eq!((n, code), (5, Some(tonic::Code::ResourceExhausted)));

    // The alert and the report show it.
    let auditor = system_auditor(&s).await;
    let alerts = s.alerts(&auditor).await;
    for kind in ["export_granted", "export_grant_used"] {
        let al = alerts
            .iter()
            .find(|x| x.kind == kind && x.principal == "clinic/researcher")
            .unwrap_or_else(|| panic!("{kind} in {alerts:?}"));
        assert!(al.detail.contains(PURPOSE), "{al:?}");
    }
    let all = events(&s, &auditor, pb::QueryAuditRequest::default()).await;
    let report = coffre::report::build(
        &all,
        coffre::report::OfficeHours {
            start: 0,
            end: 24,
            tz: chrono_tz::UTC,
        },
        3.0,
    );
    assert_eq!(report.export_grants.len(), 1);
    let g = &report.export_grants[0];
    assert_eq!(
        (
            g.principal.as_str(),
            g.purpose.as_str(),
            g.max_records,
            g.records_read,
            g.granted_by.as_str()
        ),
        ("clinic/researcher", PURPOSE, 1000, 1000, "system/admin")
    );
    assert!(coffre::report::render(&report).contains("1000 of 1000 records read"));
}

#[tokio::test]
async fn parallel_reads_under_one_grant_never_pass_its_bound() {
    let (s, a, b) = server(60.0, TIGHT).await;
    let researcher = s
        .tenant_with("clinic", "researcher", pb::Role::Clinician)
        .await;
    let ids = records(&s, &researcher, "q", 300).await;
    grant_by_two(&s, &a, &b, 500, 1).await;
    // Eight readers of 100 records each, at once: 800 asked, 500 allowed.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut rec = s.records().await;
        let req = authed(
            &researcher,
            pb::BulkReadRequest {
                ids: ids[i * 25..i * 25 + 100].to_vec(),
                fields: vec![],
                purpose: PURPOSE.into(),
            },
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0usize;
            if let Ok(r) = rec.bulk_read(req).await {
                let mut st = r.into_inner();
                while let Ok(Some(_)) = st.message().await {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 500);
}

#[tokio::test]
async fn retiring_a_key_version_and_resetting_a_second_factor_need_a_second_admin() {
    let (s, a, b) = server(60.0, ROOMY_LIMITS).await;
    let mut adm = s.admin().await;
    // Version 1 of `clinic`, no longer active and used by no field.
    adm.rotate_tenant_key(authed(
        &a,
        pb::RotateTenantKeyRequest {
            tenant: "clinic".into(),
        },
    ))
    .await
    .unwrap();
    let retire = || pb::RetireKeyVersionRequest {
        tenant: "clinic".into(),
        version: 1,
    };
    // The active version cannot be retired: no approval is asked for it.
    let e = adm
        .retire_key_version(authed(
            &a,
            pb::RetireKeyVersionRequest {
                tenant: "clinic".into(),
                version: 2,
            },
        ))
        .await
        .unwrap_err();
    assert!(e.metadata().get("coffre-approval-id").is_none(), "{e:?}");
    let id = approval_id(
        &adm.retire_key_version(authed(&a, retire()))
            .await
            .unwrap_err(),
    );
    let listed = approvals(&s, &b).await;
    assert_eq!(listed[0].target, "tenant=clinic version=1");
    decide(&s, &b, &id, true).await.unwrap();
    adm.retire_key_version(authed(&a, retire())).await.unwrap();
    let st = adm
        .key_status(authed(
            &a,
            pb::KeyStatusRequest {
                tenant: "clinic".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(st.versions.iter().any(|v| v.version == 1 && v.retired));

    // Resetting B's second factor: A asks; B, the subject, cannot approve
    // it; a third admin can.
    s.principal("system", "admin-c", pb::Role::Admin, B_PASSWORD)
        .await;
    let c = s.login("system", "admin-c", B_PASSWORD).await.unwrap();
    let reset = || pb::ResetMfaRequest {
        tenant: "system".into(),
        username: "admin-b".into(),
    };
    let id = approval_id(&adm.reset_mfa(authed(&a, reset())).await.unwrap_err());
    assert_eq!(
        approvals(&s, &a)
            .await
            .iter()
            .find(|x| x.id == id)
            .unwrap()
            .target,
        "tenant=system username=admin-b"
    );
    assert_eq!(
        decide(&s, &b, &id, true).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    decide(&s, &c, &id, true).await.unwrap();
    adm.reset_mfa(authed(&a, reset())).await.unwrap();
    // The reset ended B's sessions.
    assert_eq!(
        decide(&s, &b, "ap-000000000000", true)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
}

/// Sixteen admins created at once while the vault has one: exactly one
/// passes as the bootstrap (the second admin); every other one becomes a
/// request, and no more than the cap of them are pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_admin_creations_pass_the_bootstrap_once() {
    let root = tempfile::tempdir().unwrap();
    let mut config = test_config_with(
        root.path(),
        "[approval]\nrequired_for = [\"admin_change\"]\nmax_pending_per_requester = 10\n",
    );
    // Hashing a password takes a few milliseconds here, as it does for
    // real: the window between counting the admins and writing one.
    config.argon2.m_kib = 4096;
    let s = TestServer::start_with(root, config).await;
    let a = s.admin_token().await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let ch = s.channel().await;
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            AdminClient::new(ch)
                .create_principal(authed(
                    &a,
                    pb::CreatePrincipalRequest {
                        tenant: "system".into(),
                        username: format!("extra-{i}"),
                        password: B_PASSWORD.into(),
                        role: pb::Role::Admin as i32,
                        oidc: String::new(),
                    },
                ))
                .await
        }));
    }
    let (mut created, mut asked, mut capped) = (0, 0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => created += 1,
            Err(e) if e.message().starts_with("approval required") => asked += 1,
            Err(e) if e.message().contains("max_pending_per_requester") => capped += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!((created, asked, capped), (1, 10, 5));
    let admins = s
        .admin()
        .await
        .list_principals(authed(
            &a,
            pb::ListPrincipalsRequest {
                tenant: "system".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .principals
        .into_iter()
        .filter(|p| p.role == "admin")
        .count();
    assert_eq!(admins, 2);
    let pending = s
        .admin()
        .await
        .list_approvals(authed(
            &a,
            pb::ListApprovalsRequest {
                state: "pending".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .approvals;
    assert_eq!(pending.len(), 10);
    assert!(pending.iter().all(|p| p.action == "admin_change"));
}

/// What a second admin approves is what runs: an admin's creation is tied
/// to the identity it will sign in by; the guarded call's event names the
/// approval it spent; an approval granted by an admin who is then locked
/// is void; and an auditor (who logs in with a second factor) is bound
/// only to a provider whose logins carry one (`required_acr`).
#[tokio::test]
async fn approvals_bind_what_runs_and_die_with_a_locked_approver() {
    let root = tempfile::tempdir().unwrap();
    let jwks = root.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys": []}"#).unwrap();
    let config = test_config_with(
        root.path(),
        &format!(
            "[approval]\nrequired_for = [\"admin_change\", \"shred_tenant\"]\n\
             [mfa]\nrequired_roles = [\"auditor\"]\n\
             [oidc.corp]\nissuer = \"https://sso.example\"\naudience = \"coffre\"\njwks_file = {jwks:?}\ntenant = \"system\"\n\
             [oidc.strong]\nissuer = \"https://sso2.example\"\naudience = \"coffre\"\njwks_file = {jwks:?}\ntenant = \"system\"\nrequired_acr = [\"eidas3\"]\n"
        ),
    );
    let s = TestServer::start_with(root, config).await;
    s.principal("system", "admin-b", pb::Role::Admin, B_PASSWORD)
        .await;
    let a = s.admin_token().await;
    let b = s.login("system", "admin-b", B_PASSWORD).await.unwrap();
    let create = |user: &'static str, role: pb::Role, oidc: &'static str| {
        let s = &s;
        let a = a.clone();
        async move {
            s.admin()
                .await
                .create_principal(authed(
                    &a,
                    pb::CreatePrincipalRequest {
                        tenant: "system".into(),
                        username: user.into(),
                        password: String::new(),
                        role: role as i32,
                        oidc: oidc.into(),
                    },
                ))
                .await
        }
    };
    // An auditor bound to a provider that asks for no acr: refused.
    let e = create("aud", pb::Role::Auditor, "corp:aud")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("required_acr"), "{e:?}");
    create("aud", pb::Role::Auditor, "strong:aud")
        .await
        .unwrap();

    // Carol approved as corp:carol cannot be made as corp:mallory.
    let id = approval_id(
        &create("carol", pb::Role::Admin, "corp:carol")
            .await
            .unwrap_err(),
    );
    decide(&s, &b, &id, true).await.unwrap();
    let other = approval_id(
        &create("carol", pb::Role::Admin, "corp:mallory")
            .await
            .unwrap_err(),
    );
    assert_ne!(other, id);
    create("carol", pb::Role::Admin, "corp:carol")
        .await
        .unwrap();

    // B approves a shred, then is locked: the approval is void.
    s.admin()
        .await
        .create_tenant(authed(
            &a,
            pb::CreateTenantRequest {
                name: "doomed".into(),
                indexed_fields: vec![],
            },
        ))
        .await
        .unwrap();
    let id = approval_id(&shred(&s, &a, "doomed").await.unwrap_err());
    decide(&s, &b, &id, true).await.unwrap();
    s.admin()
        .await
        .set_principal_locked(authed(
            &a,
            pb::SetPrincipalLockedRequest {
                tenant: "system".into(),
                username: "admin-b".into(),
                locked: true,
            },
        ))
        .await
        .unwrap();
    let again = approval_id(&shred(&s, &a, "doomed").await.unwrap_err());
    assert_ne!(again, id, "the locked approver's approval was voided");
    let listed = approvals(&s, &a).await;
    assert_eq!(listed.iter().find(|x| x.id == id).unwrap().state, "denied");

    // The creation that spent its approval names it in the trail (read
    // from the vault: an auditor here would have to enrol first).
    let mut created = Vec::new();
    s.vault
        .as_ref()
        .unwrap()
        .audit
        .query_each(
            &coffre::audit::Query {
                action: "coffre.v1.Admin/CreatePrincipal".into(),
                outcome: "ok".into(),
                ..Default::default()
            },
            |e| {
                created.push(e);
                true
            },
        )
        .unwrap();
    let carol = created
        .iter()
        .find(|e| e.fields.contains(&"username=carol".to_string()))
        .expect("carol's creation");
    assert!(
        carol.fields.iter().any(|f| f.starts_with("approval=ap-")),
        "{carol:?}"
    );
}
