//! The second factor, end to end: codes are computed here, by the test's
//! own RFC 6238 implementation, from the secret in the enrolment URI.

mod common;

use coffre::pb::{self, auth_client::AuthClient};
use common::*;

const BAD: &str = "invalid tenant, username or password";

/// A server (dev mode) where admins and auditors need a second factor.
async fn server() -> TestServer {
    let root = tempfile::tempdir().unwrap();
    let config = test_config_with(
        root.path(),
        &format!("{ROOMY_LIMITS}\n[mfa]\nrequired_roles = [\"admin\", \"auditor\"]\n"),
    );
    TestServer::start_with(root, config).await
}

async fn login(s: &TestServer, user: &str, pw: &str, otp: &str) -> Result<String, tonic::Status> {
    AuthClient::new(s.channel().await)
        .login(pb::LoginRequest {
            tenant: "system".into(),
            username: user.into(),
            password: pw.into(),
            otp: otp.into(),
        })
        .await
        .map(|r| r.into_inner().token)
}

/// The principals of `system`, as `token` sees them.
async fn system_principals(
    s: &TestServer,
    token: &str,
) -> Result<Vec<pb::PrincipalInfo>, tonic::Status> {
    s.admin()
        .await
        .list_principals(authed(
            token,
            pb::ListPrincipalsRequest {
                tenant: "system".into(),
            },
        ))
        .await
        .map(|r| r.into_inner().principals)
}

async fn enroll(s: &TestServer, token: &str, password: &str) -> pb::EnrollTotpResponse {
    try_enroll(s, token, password).await.unwrap()
}

async fn try_enroll(
    s: &TestServer,
    token: &str,
    password: &str,
) -> Result<pb::EnrollTotpResponse, tonic::Status> {
    AuthClient::new(s.channel().await)
        .enroll_totp(authed(
            token,
            pb::EnrollTotpRequest {
                password: password.into(),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

async fn confirm(s: &TestServer, token: &str, otp: &str) -> Result<(), tonic::Status> {
    AuthClient::new(s.channel().await)
        .confirm_totp(authed(token, pb::ConfirmTotpRequest { otp: otp.into() }))
        .await
        .map(|_| ())
}

async fn create_tenant(s: &TestServer, token: &str, name: &str) -> Result<(), tonic::Status> {
    s.admin()
        .await
        .create_tenant(authed(
            token,
            pb::CreateTenantRequest {
                name: name.into(),
                indexed_fields: vec![],
            },
        ))
        .await
        .map(|_| ())
}

fn refused_like_a_bad_password(r: Result<String, tonic::Status>, why: &str) {
    let e = r.expect_err(why);
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::Unauthenticated, BAD),
        "{why}"
    );
}

#[tokio::test]
async fn an_admin_enrols_then_logs_in_with_codes_and_recovery_codes() {
    let s = server().await;
    // Not enrolled: the password opens a session that can only enrol.
    let t = login(&s, "admin", ADMIN_PASSWORD, "").await.unwrap();
    let e = create_tenant(&s, &t, "clinic").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("coffre mfa enroll"), "{}", e.message());
    let e = system_principals(&s, &t).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    let en = enroll(&s, &t, ADMIN_PASSWORD).await;
    assert!(
        en.otpauth_uri
            .starts_with("otpauth://totp/Coffre:system%2Fadmin?secret="),
        "{}",
        en.otpauth_uri
    );
    assert!(en.otpauth_uri.contains("algorithm=SHA1&digits=6&period=30"));
    assert_eq!(en.recovery_codes.len(), 10);
    let secret = totp_secret_of(&en.otpauth_uri);
    assert_eq!(secret.len(), 20);
    // Pending until confirmed: a login still gets an enrol-only session.
    let t2 = login(&s, "admin", ADMIN_PASSWORD, "").await.unwrap();
    assert_eq!(
        create_tenant(&s, &t2, "clinic").await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    let now = totp_step_now();
    let wrong = totp_code(&secret, now + 7);
    assert_eq!(
        confirm(&s, &t, &wrong).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    confirm(&s, &t, &totp_code(&secret, now)).await.unwrap();
    // Enrolment ended the enrol-only session's purpose, not the session:
    // it still cannot do anything else.
    assert_eq!(
        create_tenant(&s, &t, "clinic").await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );

    // Enrolled: no code, a wrong code, a reused code: like a bad password.
    refused_like_a_bad_password(login(&s, "admin", ADMIN_PASSWORD, "").await, "no code");
    refused_like_a_bad_password(
        login(&s, "admin", ADMIN_PASSWORD, &totp_code(&secret, now + 5)).await,
        "wrong code",
    );
    let next = totp_code(&secret, now + 1);
    let full = login(&s, "admin", ADMIN_PASSWORD, &next).await.unwrap();
    create_tenant(&s, &full, "clinic").await.unwrap();
    refused_like_a_bad_password(login(&s, "admin", ADMIN_PASSWORD, &next).await, "reused");
    // The code confirmed at enrolment was spent there too.
    refused_like_a_bad_password(
        login(&s, "admin", ADMIN_PASSWORD, &totp_code(&secret, now)).await,
        "code of the enrolment",
    );
    // A right code with a wrong password is still a bad password.
    refused_like_a_bad_password(
        login(
            &s,
            "admin",
            "not the password at all",
            &totp_code(&secret, now + 1),
        )
        .await,
        "wrong password",
    );

    // Recovery codes: each works once, in place of a code.
    let rc = &en.recovery_codes;
    login(&s, "admin", ADMIN_PASSWORD, &rc[3]).await.unwrap();
    refused_like_a_bad_password(
        login(&s, "admin", ADMIN_PASSWORD, &rc[3]).await,
        "recovery reused",
    );
    login(&s, "admin", ADMIN_PASSWORD, &rc[7].to_lowercase())
        .await
        .unwrap();
    // An administrator sees the factor and the codes left, no more.
    let me = system_principals(&s, &full)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.username == "admin")
        .unwrap();
    assert_eq!((me.mfa_enrolled, me.recovery_codes_left), (true, 8));
    assert_eq!(me.oidc, "");
    // Same shape, wrong code.
    let forged = format!("{}AAAAA-AAAAA", &rc[0][..2]);
    refused_like_a_bad_password(
        login(&s, "admin", ADMIN_PASSWORD, &forged).await,
        "forged recovery",
    );

    // Five wrong codes in a row lock the account; then even a good
    // recovery code is refused.
    for i in 0..5 {
        refused_like_a_bad_password(
            login(
                &s,
                "admin",
                ADMIN_PASSWORD,
                &totp_code(&secret, now + 10 + i),
            )
            .await,
            "wrong code",
        );
    }
    refused_like_a_bad_password(login(&s, "admin", ADMIN_PASSWORD, &rc[1]).await, "locked");
    // The lock stops the session already open too.
    let e = system_principals(&s, &full).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn one_code_opens_one_session_under_parallel_logins() {
    let s = server().await;
    let t = login(&s, "admin", ADMIN_PASSWORD, "").await.unwrap();
    let secret = totp_secret_of(&enroll(&s, &t, ADMIN_PASSWORD).await.otpauth_uri);
    let now = totp_step_now();
    confirm(&s, &t, &totp_code(&secret, now - 1)).await.unwrap();
    let c = totp_code(&secret, now + 1);
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let ch = s.channel().await;
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            AuthClient::new(ch)
                .login(pb::LoginRequest {
                    tenant: "system".into(),
                    username: "admin".into(),
                    password: ADMIN_PASSWORD.into(),
                    otp: c,
                })
                .await
                .is_ok()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    assert_eq!(ok, 1, "a code is accepted once, whatever the concurrency");
}

#[tokio::test]
async fn a_lost_phone_is_reset_by_another_admin_and_the_principal_enrols_again() {
    let s = server().await;
    // The bootstrap admin enrols and creates a second admin and an auditor.
    let t = login(&s, "admin", ADMIN_PASSWORD, "").await.unwrap();
    let secret = totp_secret_of(&enroll(&s, &t, ADMIN_PASSWORD).await.otpauth_uri);
    let now = totp_step_now();
    confirm(&s, &t, &totp_code(&secret, now)).await.unwrap();
    let full = login(&s, "admin", ADMIN_PASSWORD, &totp_code(&secret, now + 1))
        .await
        .unwrap();
    for (user, role) in [("admin-b", pb::Role::Admin), ("auditor", pb::Role::Auditor)] {
        s.admin()
            .await
            .create_principal(authed(
                &full,
                pb::CreatePrincipalRequest {
                    tenant: "system".into(),
                    username: user.into(),
                    password: AUDITOR_PASSWORD.into(),
                    role: role as i32,
                    oidc: String::new(),
                },
            ))
            .await
            .unwrap();
    }
    // An unenrolled auditor can only enrol too.
    let aud = login(&s, "auditor", AUDITOR_PASSWORD, "").await.unwrap();
    let e = pb::audit_client::AuditClient::new(s.channel().await)
        .verify_audit(authed(&aud, pb::VerifyAuditRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // admin-b enrols, then resets the first admin's factor.
    let tb = login(&s, "admin-b", AUDITOR_PASSWORD, "").await.unwrap();
    let sb = totp_secret_of(&enroll(&s, &tb, AUDITOR_PASSWORD).await.otpauth_uri);
    confirm(&s, &tb, &totp_code(&sb, now)).await.unwrap();
    let full_b = login(&s, "admin-b", AUDITOR_PASSWORD, &totp_code(&sb, now + 1))
        .await
        .unwrap();
    s.admin()
        .await
        .reset_mfa(authed(
            &full_b,
            pb::ResetMfaRequest {
                tenant: "system".into(),
                username: "admin".into(),
            },
        ))
        .await
        .unwrap();
    // admin-b replaces its own factor from a full session: allowed, and
    // alerted (a stolen session could do the same).
    let nb = totp_secret_of(&enroll(&s, &full_b, AUDITOR_PASSWORD).await.otpauth_uri);
    confirm(&s, &full_b, &totp_code(&nb, now)).await.unwrap();
    // Its sessions ended; its next login can only enrol again.
    assert_eq!(
        create_tenant(&s, &full, "x").await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let again = login(&s, "admin", ADMIN_PASSWORD, "").await.unwrap();
    assert_eq!(
        create_tenant(&s, &again, "x").await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    let fresh = totp_secret_of(&enroll(&s, &again, ADMIN_PASSWORD).await.otpauth_uri);
    assert_ne!(fresh, secret);
    // The alert says who was reset.
    let alerts = {
        let na = totp_secret_of(&enroll(&s, &aud, AUDITOR_PASSWORD).await.otpauth_uri);
        confirm(&s, &aud, &totp_code(&na, now)).await.unwrap();
        let aud = login(&s, "auditor", AUDITOR_PASSWORD, &totp_code(&na, now + 1))
            .await
            .unwrap();
        s.alerts(&aud).await
    };
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "mfa_reset" && a.principal == "system/admin"),
        "{alerts:?}"
    );
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "mfa_replaced" && a.principal == "system/admin-b"),
        "{alerts:?}"
    );
}

/// A stolen clinician session (no second factor yet) cannot put its own
/// factor in front of the owner: the password is asked again, wrong
/// guesses count toward the lockout, and every enrolment is an alert.
#[tokio::test]
async fn enrolment_needs_the_password_again_and_is_alerted() {
    // Clinicians may enrol (nobody requires them to).
    let s = TestServer::start().await;
    let stolen = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    for guess in ["", "not the password at all"] {
        let e = try_enroll(&s, &stolen, guess).await.unwrap_err();
        assert_eq!((e.code(), e.message()), (tonic::Code::Unauthenticated, BAD));
    }
    // Guesses count: after five in all, the account is locked and so is
    // the stolen session.
    for _ in 0..4 {
        let _ = try_enroll(&s, &stolen, "another wrong guess here").await;
    }
    let e = try_enroll(&s, &stolen, CLINICIAN_PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    let owner = s.tenant_with("ward", "dr_b", pb::Role::Clinician).await;
    let en = enroll(&s, &owner, CLINICIAN_PASSWORD).await;
    let secret = totp_secret_of(&en.otpauth_uri);
    confirm(&s, &owner, &totp_code(&secret, totp_step_now()))
        .await
        .unwrap();
    let auditor = system_auditor(&s).await;
    let alerts = s.alerts(&auditor).await;
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "mfa_enrolled" && a.principal == "ward/dr_b"),
        "{alerts:?}"
    );
    assert!(
        alerts
            .iter()
            .any(|a| a.kind == "login_lockout" && a.principal == "clinic/dr_a"),
        "{alerts:?}"
    );
}
