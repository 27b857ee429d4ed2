//! `coffre login`: a password prompt, a token saved 0600.

use super::*;

pub(super) async fn login(
    g: &Global,
    tenant: &str,
    username: &str,
    print: bool,
    otp: Option<String>,
    oidc: Option<String>,
) -> Result<(), CliError> {
    let mut c = AuthClient::new(connect(g).await?);
    // With single sign-on the server, not the command line, knows who.
    let who = match &oidc {
        Some(p) => format!("through {p}"),
        None => format!("as {tenant}/{username}"),
    };
    let sent = match &oidc {
        Some(provider) => {
            let id_token = read_secret("id token: ", false)?;
            c.login_oidc(pb::LoginOidcRequest {
                provider: provider.clone(),
                id_token: id_token.to_string(),
            })
            .await
        }
        None => {
            let password = read_secret("password: ", false)?;
            let otp = match otp {
                Some(code) if code.is_empty() => read_secret("code: ", false)?,
                Some(code) => Zeroizing::new(code),
                None => Zeroizing::new(String::new()),
            };
            c.login(pb::LoginRequest {
                tenant: tenant.into(),
                username: username.into(),
                password: password.to_string(),
                otp: otp.to_string(),
            })
            .await
        }
    };
    let resp = sent
        .map_err(|s| {
            if s.code() == tonic::Code::Unauthenticated {
                // A locked account answers like a wrong password (so a
                // guesser learns nothing): say what a person can do.
                CliError(format!(
                    "{}; admins and auditors also need --otp (a code of their authenticator app); if it persists, the account may be locked: ask an administrator (coffre principal list)",
                    status_err(s)
                ))
            } else {
                status_err(s)
            }
        })?
        .into_inner();
    let token = Zeroizing::new(resp.token);
    let path = token_path(g);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    }
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    f.write_all(token.as_bytes()).map_err(err)?;
    if g.json {
        let mut v = match &oidc {
            Some(p) => json!({"provider": p, "expires_at_unix": resp.expires_at_unix}),
            None => {
                json!({"tenant": tenant, "username": username, "expires_at_unix": resp.expires_at_unix})
            }
        };
        if print {
            v["token"] = json!(&*token);
        }
        println!("{v}");
    } else if print {
        println!("{}", &*token);
    } else {
        println!("logged in {who}; token saved to {}", path.display());
    }
    Ok(())
}

/// `coffre logout`: revokes the token and forgets it.
pub(super) async fn logout(g: &Global) -> Result<(), CliError> {
    let mut c = AuthClient::new(connect(g).await?);
    c.logout(authed(g, pb::LogoutRequest {})?)
        .await
        .map_err(status_err)?;
    let _ = std::fs::remove_file(token_path(g));
    say(g, "logged out", json!({"ok": true}));
    Ok(())
}

/// `coffre passwd`: changes the caller's password (prompted twice).
pub(super) async fn passwd(g: &Global) -> Result<(), CliError> {
    let old = read_secret("current password: ", false)?;
    let new = read_secret("new password: ", true)?;
    let mut c = AuthClient::new(connect(g).await?);
    c.change_password(authed(
        g,
        pb::ChangePasswordRequest {
            old_password: old.to_string(),
            new_password: new.to_string(),
        },
    )?)
    .await
    .map_err(status_err)?;
    say(g, "password changed", json!({"ok": true}));
    Ok(())
}
