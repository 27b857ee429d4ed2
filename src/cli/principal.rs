//! `coffre principal`: create, lock, unlock, list.

use super::*;

pub(super) async fn principal(g: &Global, cmd: PrincipalCmd) -> Result<(), CliError> {
    if let PrincipalCmd::Unlock {
        tenant,
        username,
        config: Some(config),
        ..
    } = &cmd
    {
        return unlock_offline(g, config, tenant, username).await;
    }
    let mut c = AdminClient::new(connect(g).await?);
    match cmd {
        PrincipalCmd::Create {
            tenant,
            username,
            role,
            oidc,
        } => {
            let (role, pb_role) = match role {
                RoleArg::Admin => (crate::model::Role::Admin, pb::Role::Admin),
                RoleArg::Clinician => (crate::model::Role::Clinician, pb::Role::Clinician),
                RoleArg::Service => (crate::model::Role::Service, pb::Role::Service),
                RoleArg::Auditor => (crate::model::Role::Auditor, pb::Role::Auditor),
            };
            // A principal bound to an identity signs in by it only.
            let password = match oidc {
                Some(_) => Zeroizing::new(String::new()),
                None => read_secret("new password: ", true)?,
            };
            c.create_principal(authed(
                g,
                pb::CreatePrincipalRequest {
                    oidc: oidc.clone().unwrap_or_default(),
                    tenant: tenant.clone(),
                    username: username.clone(),
                    password: password.to_string(),
                    role: pb_role as i32,
                },
            )?)
            .await
            .map_err(status_err)?;
            say(
                g,
                &format!("principal {tenant}/{username} created ({})", role.as_str()),
                json!({"tenant": tenant, "username": username, "role": role.as_str()}),
            );
        }
        PrincipalCmd::Lock { tenant, username } => {
            set_locked(g, &mut c, tenant, username, true).await?
        }
        PrincipalCmd::Unlock {
            tenant,
            username,
            all_locked,
            ..
        } => {
            let names = if all_locked {
                list_principals(g, &mut c, &tenant)
                    .await?
                    .into_iter()
                    .filter(|p| p.locked)
                    .map(|p| p.username)
                    .collect()
            } else {
                username
            };
            if names.is_empty() {
                say(g, "no locked principal", json!({"unlocked": []}));
            }
            // Each one is tried: an admin's unlock waiting for a second
            // admin does not keep the others locked.
            let mut failed = Vec::new();
            let total = names.len();
            for username in names {
                if let Err(e) = set_locked(g, &mut c, tenant.clone(), username.clone(), false).await
                {
                    failed.push(format!("{username}: {}", e.0));
                }
            }
            if !failed.is_empty() {
                return Err(err(format!(
                    "{} of {total} not unlocked: {}",
                    failed.len(),
                    failed.join(" | ")
                )));
            }
        }
        PrincipalCmd::List { tenant } => {
            let list = list_principals(g, &mut c, &tenant).await?;
            if g.json {
                for p in &list {
                    println!(
                        "{}",
                        json!({
                            "tenant": tenant,
                            "username": p.username,
                            "role": p.role,
                            "locked": p.locked,
                            "lock_reason": p.lock_reason,
                            "locked_until_unix_ms": p.locked_until_unix_ms,
                            "failed_logins": p.failed_logins,
                            "mfa_enrolled": p.mfa_enrolled,
                            "recovery_codes_left": p.recovery_codes_left,
                            "oidc": p.oidc,
                        })
                    );
                }
            } else {
                println!(
                    "{:<32} {:<10} {:<7} {:<9} {:<24} REASON",
                    "USERNAME", "ROLE", "LOCKED", "TOTP", "SSO"
                );
                for p in &list {
                    // TOTP: "no", or "yes (N)" with the recovery codes left.
                    let totp = if p.mfa_enrolled {
                        format!("yes ({})", p.recovery_codes_left)
                    } else {
                        "no".to_string()
                    };
                    let sso = if p.oidc.is_empty() { "-" } else { &p.oidc };
                    println!(
                        "{:<32} {:<10} {:<7} {:<9} {:<24} {}",
                        p.username,
                        p.role,
                        if p.locked { "yes" } else { "no" },
                        totp,
                        sso,
                        p.lock_reason
                    );
                }
            }
        }
    }
    Ok(())
}

pub(super) async fn list_principals(
    g: &Global,
    c: &mut AdminClient<Channel>,
    tenant: &str,
) -> Result<Vec<pb::PrincipalInfo>, CliError> {
    Ok(c.list_principals(authed(
        g,
        pb::ListPrincipalsRequest {
            tenant: tenant.to_string(),
        },
    )?)
    .await
    .map_err(status_err)?
    .into_inner()
    .principals)
}

pub(super) async fn set_locked(
    g: &Global,
    c: &mut AdminClient<Channel>,
    tenant: String,
    username: String,
    locked: bool,
) -> Result<(), CliError> {
    c.set_principal_locked(authed(
        g,
        pb::SetPrincipalLockedRequest {
            tenant: tenant.clone(),
            username: username.clone(),
            locked,
        },
    )?)
    .await
    .map_err(status_err)?;
    let word = if locked { "locked" } else { "unlocked" };
    say(
        g,
        &format!("principal {tenant}/{username} {word}"),
        json!({"tenant": tenant, "username": username, "locked": locked}),
    );
    Ok(())
}

/// `coffre principal unlock --config CFG`: opens the vault itself (the
/// master key file is the credential) and unlocks, audited and alerted.
async fn unlock_offline(
    g: &Global,
    config: &Path,
    tenant: &str,
    usernames: &[String],
) -> Result<(), CliError> {
    let config = Config::load(Some(config)).map_err(err)?;
    let tenant = crate::model::TenantName::parse(tenant).map_err(err)?;
    let names = usernames
        .iter()
        .map(|u| crate::model::Username::parse(u).map_err(err))
        .collect::<Result<Vec<_>, _>>()?;
    let operator = format!(
        "offline:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    );
    let (vault, _) = Vault::open(&config, crate::vault::Bootstrap::Refuse)
        .await
        .map_err(err)?;
    for u in &names {
        vault
            .unlock_offline(&tenant, u, &operator)
            .await
            .map_err(|e| match e {
                crate::error::Error::NotFound => err(format!("no principal {tenant}/{u}")),
                e => err(e),
            })?;
        say(
            g,
            &format!("principal {tenant}/{u} unlocked offline (audited, alerted)"),
            json!({"tenant": tenant.as_str(), "username": u.as_str(), "unlocked": true, "offline": true}),
        );
    }
    vault.store.sync().await.map_err(err)?;
    Ok(())
}
