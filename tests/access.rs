//! Who may do what: tenant isolation, separation of duties, tokens,
//! lockout, and the health and reflection services.

mod common;

use coffre::pb::{self, auth_client::AuthClient};
use common::*;
use tonic::{Code, Request};

fn req<T>(token: Option<&str>, msg: T) -> Request<T> {
    match token {
        Some(t) => authed(t, msg),
        None => Request::new(msg),
    }
}

/// Calls every record RPC with `token` (None: no token) and returns the codes.
async fn record_rpc_codes(
    s: &TestServer,
    token: Option<&str>,
    id: &str,
) -> Vec<(&'static str, Code)> {
    let mut r = s.records().await;
    let code = |res: Result<(), tonic::Status>| match res {
        Ok(()) => Code::Ok,
        Err(e) => e.code(),
    };
    let mut out = Vec::new();
    out.push((
        "PutRecord",
        code(
            r.put_record(req(token, put(id, &[("nir", "9")])))
                .await
                .map(|_| ()),
        ),
    ));
    out.push((
        "GetRecord",
        code(r.get_record(req(token, get(id))).await.map(|_| ())),
    ));
    out.push((
        "FindRecords",
        code(
            r.find_records(req(
                token,
                pb::FindRecordsRequest {
                    field: "nir".into(),
                    value: "1".into(),
                    purpose: String::new(),
                },
            ))
            .await
            .map(|_| ()),
        ),
    ));
    let bulk = r
        .bulk_read(req(
            token,
            pb::BulkReadRequest {
                ids: vec![id.into()],
                fields: vec![],
                purpose: "audit".into(),
            },
        ))
        .await;
    let bulk_code = match bulk {
        Err(e) => e.code(),
        Ok(s) => {
            let mut s = s.into_inner();
            match s.message().await {
                Ok(Some(_)) => Code::Ok,
                Ok(None) => Code::NotFound,
                Err(e) => e.code(),
            }
        }
    };
    out.push(("BulkRead", bulk_code));
    out.push((
        "SetSecret",
        code(
            r.set_secret(req(
                token,
                pb::SetSecretRequest {
                    record_id: id.into(),
                    name: "pw".into(),
                    secret: "x".into(),
                },
            ))
            .await
            .map(|_| ()),
        ),
    ));
    out.push((
        "VerifySecret",
        code(
            r.verify_secret(req(
                token,
                pb::VerifySecretRequest {
                    record_id: id.into(),
                    name: "pw".into(),
                    candidate: "x".into(),
                },
            ))
            .await
            .map(|_| ()),
        ),
    ));
    out.push((
        "DeleteRecord",
        code(
            r.delete_record(req(
                token,
                pb::DeleteRecordRequest {
                    id: id.into(),
                    purpose: String::new(),
                },
            ))
            .await
            .map(|_| ()),
        ),
    ));
    out
}

#[tokio::test]
async fn tenants_are_isolated_and_admins_and_auditors_read_nothing() {
    let s = TestServer::start().await;
    let a = s.tenant_with("clinic_a", "dr_a", pb::Role::Clinician).await;
    let b = s.tenant_with("clinic_b", "dr_b", pb::Role::Clinician).await;
    let auditor = s.tenant_with("clinic_a", "aud", pb::Role::Auditor).await;
    let admin = s.admin_token().await;
    let mut r = s.records().await;
    r.put_record(authed(&a, put("shared-id", &[("nir", "1")])))
        .await
        .unwrap();

    // Another tenant's clinician: NOT_FOUND exactly as for a missing id,
    // and the blind index finds nothing.
    let mut r_b = s.records().await;
    let other = r_b
        .get_record(authed(&b, get("shared-id")))
        .await
        .unwrap_err();
    let missing = r_b
        .get_record(authed(&b, get("never-was")))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);
    assert_eq!(other.message(), missing.message(), "no existence oracle");
    let ids = r_b
        .find_records(authed(
            &b,
            pb::FindRecordsRequest {
                field: "nir".into(),
                value: "1".into(),
                purpose: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert!(ids.is_empty());
    for (rpc, code) in record_rpc_codes(&s, Some(&b), "shared-id").await {
        if rpc == "PutRecord" {
            assert_eq!(code, Code::Ok, "b writes its own record of that id");
        } else if rpc != "FindRecords" {
            // b's own record now exists, so only check a's is untouched below.
        }
    }
    let still = r
        .get_record(authed(&a, get("shared-id")))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(still.fields["nir"], "1", "a's record untouched by b");

    for (who, token) in [("admin", &admin), ("auditor", &auditor)] {
        for (rpc, code) in record_rpc_codes(&s, Some(token), "shared-id").await {
            assert_eq!(code, Code::PermissionDenied, "{who} {rpc}");
        }
    }
    for (rpc, code) in record_rpc_codes(&s, None, "shared-id").await {
        assert_eq!(code, Code::Unauthenticated, "no token {rpc}");
    }
    for (rpc, code) in record_rpc_codes(&s, Some("cf1.forged-token"), "shared-id").await {
        assert_eq!(code, Code::Unauthenticated, "forged token {rpc}");
    }
    // Clinicians cannot administer.
    let e = s
        .admin()
        .await
        .create_tenant(authed(
            &a,
            pb::CreateTenantRequest {
                name: "evil".into(),
                indexed_fields: vec![],
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn logout_revokes_and_lock_stops_tokens() {
    let s = TestServer::start().await;
    let t1 = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let t2 = s.login("clinic", "dr_a", CLINICIAN_PASSWORD).await.unwrap();
    assert!(t1.len() >= 43, "at least 256 bits of token");
    assert_ne!(t1, t2);
    let mut auth = AuthClient::new(s.channel().await);
    auth.logout(authed(&t1, pb::LogoutRequest {}))
        .await
        .unwrap();
    let mut r = s.records().await;
    let e = r.get_record(authed(&t1, get("x"))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "revoked");
    // A token revoked by a logout keeps its author in the trail.
    let auditor = system_auditor(&s).await;
    let refused = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            action: "coffre.v1.Records/GetRecord".into(),
            ..Default::default()
        },
    )
    .await;
    let last = refused.last().expect("the refused call is audited");
    assert_eq!(last.outcome, "unauthenticated");
    assert_eq!(last.principal, "clinic/dr_a", "{last:?}");
    assert_eq!(
        r.get_record(authed(&t2, get("x")))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "the other session lives"
    );

    let admin = s.admin_token().await;
    let lock = |locked| pb::SetPrincipalLockedRequest {
        tenant: "clinic".into(),
        username: "dr_a".into(),
        locked,
    };
    s.admin()
        .await
        .set_principal_locked(authed(&admin, lock(true)))
        .await
        .unwrap();
    let e = r.get_record(authed(&t2, get("x"))).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::PermissionDenied,
        "locked: tokens stop at once"
    );
    let e = s
        .login("clinic", "dr_a", CLINICIAN_PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "a locked account answers like bad credentials"
    );
    s.admin()
        .await
        .set_principal_locked(authed(&admin, lock(false)))
        .await
        .unwrap();
    // A lock revokes the sessions it found: after the unlock the old token
    // is gone (it may be the stolen one), and a new login works.
    assert_eq!(
        r.get_record(authed(&t2, get("x")))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let t3 = s.login("clinic", "dr_a", CLINICIAN_PASSWORD).await.unwrap();
    assert_eq!(
        r.get_record(authed(&t3, get("x")))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn five_failures_lock_and_unknown_users_look_the_same() {
    let s = TestServer::start().await;
    s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let bad = s
        .login("clinic", "dr_a", "wrong password 1")
        .await
        .unwrap_err();
    let unknown = s
        .login("clinic", "nobody", "wrong password 1")
        .await
        .unwrap_err();
    let bad_tenant = s
        .login("nowhere", "dr_a", "wrong password 1")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::Unauthenticated);
    assert_eq!(
        (unknown.code(), unknown.message()),
        (bad.code(), bad.message())
    );
    assert_eq!(
        (bad_tenant.code(), bad_tenant.message()),
        (bad.code(), bad.message())
    );
    for _ in 0..3 {
        s.login("clinic", "dr_a", "wrong password 1")
            .await
            .unwrap_err();
        s.login("clinic", "nobody", "wrong password 1")
            .await
            .unwrap_err();
    }
    // Fifth failure locks; from then on even the right password is refused.
    s.login("clinic", "dr_a", "wrong").await.unwrap_err();
    s.login("clinic", "nobody", "wrong").await.unwrap_err();
    let real = s
        .login("clinic", "dr_a", CLINICIAN_PASSWORD)
        .await
        .unwrap_err();
    let ghost = s
        .login("clinic", "nobody", CLINICIAN_PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(
        (real.code(), real.message()),
        (bad.code(), bad.message()),
        "a locked account answers exactly like bad credentials"
    );
    assert_eq!(
        (ghost.code(), ghost.message()),
        (real.code(), real.message()),
        "a lock does not reveal that the user exists"
    );
    // An admin unlock clears it.
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
    s.login("clinic", "dr_a", CLINICIAN_PASSWORD).await.unwrap();
}

#[tokio::test]
async fn passwords_follow_the_policy_and_change() {
    let s = TestServer::start().await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let admin = s.admin_token().await;
    for (pw, why) in [
        ("tiny9", "at least 12"),
        ("password1234", "too weak"),
        ("clinicclinic", "too weak"),
    ] {
        let e = s
            .admin()
            .await
            .create_principal(authed(
                &admin,
                pb::CreatePrincipalRequest {
                    oidc: Default::default(),
                    tenant: "clinic".into(),
                    username: "dr_b".into(),
                    password: pw.into(),
                    role: pb::Role::Clinician as i32,
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{pw}");
        assert!(e.message().contains(why), "{pw}: {}", e.message());
        assert!(
            !e.message().contains(pw),
            "the message never repeats the password"
        );
    }
    let other_session = s.login("clinic", "dr_a", CLINICIAN_PASSWORD).await.unwrap();
    let mut auth = AuthClient::new(s.channel().await);
    let e = auth
        .change_password(authed(
            &token,
            pb::ChangePasswordRequest {
                old_password: "not it".into(),
                new_password: "granite willow 3390 ember tide".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    auth.change_password(authed(
        &token,
        pb::ChangePasswordRequest {
            old_password: CLINICIAN_PASSWORD.into(),
            new_password: "granite willow 3390 ember tide".into(),
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        s.login("clinic", "dr_a", CLINICIAN_PASSWORD)
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    s.login("clinic", "dr_a", "granite willow 3390 ember tide")
        .await
        .unwrap();
    let mut r = s.records().await;
    assert_eq!(
        r.get_record(authed(&other_session, get("x")))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated,
        "a password change revokes the other sessions"
    );
    assert_eq!(
        r.get_record(authed(&token, get("x")))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "but keeps the caller's"
    );
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let s = TestServer::start().await;
    let mut h = HealthClient::new(s.channel().await);
    for service in [
        "",
        "coffre.v1.Auth",
        "coffre.v1.Records",
        "coffre.v1.Admin",
        "coffre.v1.Audit",
    ] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(s.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "coffre.v1.Records",
        "coffre.v1.Auth",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    // Tenant system (administrators, auditors) can never be shredded.
    let admin = s.admin_token().await;
    let e = s
        .admin()
        .await
        .shred_tenant(authed(
            &admin,
            pb::ShredTenantRequest {
                tenant: "system".into(),
                confirm: "system".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}
