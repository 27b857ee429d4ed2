//! `coffre mfa`, `coffre approvals`, `coffre export`: the second factor and
//! the two-person rule.

use super::*;

pub(super) async fn mfa(g: &Global, cmd: MfaCmd) -> Result<(), CliError> {
    match cmd {
        MfaCmd::Enroll { sso } => {
            // The password again: a stolen session cannot enrol its own
            // factor. A single sign-on account logs in again instead.
            let password = if sso {
                Zeroizing::new(String::new())
            } else {
                read_secret("password: ", false)?
            };
            let mut c = AuthClient::new(connect(g).await?);
            let e = c
                .enroll_totp(authed(
                    g,
                    pb::EnrollTotpRequest {
                        password: password.to_string(),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            let uri = Zeroizing::new(e.otpauth_uri);
            let codes: Vec<Zeroizing<String>> =
                e.recovery_codes.into_iter().map(Zeroizing::new).collect();
            if g.json {
                let codes: Vec<&str> = codes.iter().map(|c| c.as_str()).collect();
                println!(
                    "{}",
                    json!({"otpauth_uri": uri.as_str(), "recovery_codes": codes})
                );
                return Ok(());
            }
            println!("Scan this with an authenticator app (or enter the URI by hand):\n");
            if let Ok(qr) = qrcode::QrCode::new(uri.as_bytes()) {
                use qrcode::render::unicode::Dense1x2;
                // Light on dark reads best in most terminals.
                let art = qr
                    .render::<Dense1x2>()
                    .dark_color(Dense1x2::Light)
                    .light_color(Dense1x2::Dark)
                    .build();
                println!("{art}\n");
            }
            println!("{}\n", uri.as_str());
            println!("Recovery codes (each works once; keep them offline, apart from the phone):");
            for code in &codes {
                println!("  {}", code.as_str());
            }
            println!(
                "\nThen: coffre mfa confirm (with the app's current code), and log in again with --otp."
            );
        }
        MfaCmd::Confirm { otp } => {
            let otp = match otp {
                Some(o) => Zeroizing::new(o),
                None => read_secret("code: ", false)?,
            };
            let mut c = AuthClient::new(connect(g).await?);
            c.confirm_totp(authed(
                g,
                pb::ConfirmTotpRequest {
                    otp: otp.to_string(),
                },
            )?)
            .await
            .map_err(status_err)?;
            say(
                g,
                "second factor enrolled; log in again with --otp",
                json!({"ok": true}),
            );
        }
        MfaCmd::Reset { tenant, username } => {
            let mut c = AdminClient::new(connect(g).await?);
            c.reset_mfa(authed(
                g,
                pb::ResetMfaRequest {
                    tenant: tenant.clone(),
                    username: username.clone(),
                },
            )?)
            .await
            .map_err(status_err)?;
            say(
                g,
                &format!(
                    "second factor of {tenant}/{username} reset; it enrols again at its next login"
                ),
                json!({"tenant": tenant, "username": username, "reset": true}),
            );
        }
    }
    Ok(())
}

pub(super) async fn approvals(g: &Global, cmd: ApprovalsCmd) -> Result<(), CliError> {
    let mut c = AdminClient::new(connect(g).await?);
    match cmd {
        ApprovalsCmd::List {
            state,
            limit,
            before,
        } => {
            let list = c
                .list_approvals(authed(
                    g,
                    pb::ListApprovalsRequest {
                        state: state.unwrap_or_default(),
                        limit,
                        before_id: before.unwrap_or_default(),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner()
                .approvals;
            if g.json {
                let rows: Vec<_> = list
                    .iter()
                    .map(|a| {
                        json!({
                            "id": a.id, "action": a.action, "target": a.target,
                            "requested_by": a.requested_by,
                            "requested_at_unix_ms": a.requested_at_unix_ms,
                            "expires_at_unix_ms": a.expires_at_unix_ms,
                            "state": a.state, "decided_by": a.decided_by,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else if list.is_empty() {
                println!("no approval requests");
            } else {
                for a in list {
                    let by = if a.decided_by.is_empty() {
                        String::new()
                    } else {
                        format!(" by {}", a.decided_by)
                    };
                    println!(
                        "{}  {:<8}{by}  {} {}  requested by {} at {}, expires {}",
                        a.id,
                        a.state,
                        a.action,
                        a.target,
                        a.requested_by,
                        utc_time(a.requested_at_unix_ms),
                        utc_time(a.expires_at_unix_ms)
                    );
                }
            }
        }
        ApprovalsCmd::Approve { id } => {
            c.approve(authed(g, pb::ApproveRequest { id: id.clone() })?)
                .await
                .map_err(status_err)?;
            say(
                g,
                &format!("{id} approved: the requester may now repeat the command once"),
                json!({"id": id, "state": "approved"}),
            );
        }
        ApprovalsCmd::Deny { id } => {
            c.deny(authed(g, pb::DenyRequest { id: id.clone() })?)
                .await
                .map_err(status_err)?;
            say(
                g,
                &format!("{id} denied"),
                json!({"id": id, "state": "denied"}),
            );
        }
    }
    Ok(())
}

pub(super) async fn export(g: &Global, cmd: ExportCmd) -> Result<(), CliError> {
    let ExportCmd::Grant {
        tenant,
        username,
        max_records,
        purpose,
        hours,
    } = cmd;
    let mut c = AdminClient::new(connect(g).await?);
    c.grant_export(authed(
        g,
        pb::GrantExportRequest {
            tenant: tenant.clone(),
            username: username.clone(),
            max_records,
            purpose: purpose.clone(),
            hours,
        },
    )?)
    .await
    .map_err(status_err)?;
    say(
        g,
        &format!(
            "{tenant}/{username} may read up to {max_records} records beyond its budget with purpose {purpose:?} for {hours} h"
        ),
        json!({"tenant": tenant, "username": username, "max_records": max_records, "purpose": purpose, "hours": hours}),
    );
    Ok(())
}
