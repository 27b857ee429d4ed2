//! `coffre.v1.Auth`: login, logout, password change.

use super::*;

pub struct AuthService {
    gate: Gate,
}

impl AuthService {
    pub fn new(gate: Gate) -> Self {
        Self { gate }
    }
}

#[tonic::async_trait]
impl auth_server::Auth for AuthService {
    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Auth/Login",
            async |_c: Option<Caller>, m: pb::LoginRequest, n: &mut Note| {
                // Only well-formed names reach the trail: a password typed
                // into the username box must not.
                let t = TenantName::parse(&m.tenant).ok();
                let u = Username::parse(&m.username).ok();
                n.tenant = t.as_ref().map(|t| t.to_string());
                n.principal = Some(match (&t, &u) {
                    (Some(t), Some(u)) => format!("{t}/{u}"),
                    _ => "(malformed)".into(),
                });
                let l = v
                    .accounts
                    .login(&m.tenant, &m.username, &m.password, &m.otp)
                    .await?;
                Ok(pb::LoginResponse {
                    token: l.token.to_string(),
                    expires_at_unix: l.expires_at_unix,
                })
            }
        )
    }

    async fn logout(
        &self,
        req: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Auth/Logout",
            async |c: Option<Caller>, _m: pb::LogoutRequest, _n: &mut Note| {
                v.accounts.logout(&must(c)?).await?;
                Ok(pb::LogoutResponse {})
            }
        )
    }

    async fn change_password(
        &self,
        req: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Auth/ChangePassword",
            async |c: Option<Caller>, m: pb::ChangePasswordRequest, _n: &mut Note| {
                v.accounts
                    .change_password(&must(c)?, &m.old_password, m.new_password)
                    .await?;
                Ok(pb::ChangePasswordResponse {})
            }
        )
    }

    async fn login_oidc(
        &self,
        req: Request<pb::LoginOidcRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Auth/LoginOidc",
            async |_c: Option<Caller>, m: pb::LoginOidcRequest, n: &mut Note| {
                // The provider is named only when configured (never a
                // token pasted into the wrong box).
                n.tenant = v.oidc.tenant_of(&m.provider).map(|t| t.to_string());
                let provider = match n.tenant {
                    Some(_) => m.provider.as_str(),
                    None => "(unknown)",
                };
                n.fields = vec![format!("provider={provider}")];
                match v.login_oidc(&m.provider, &m.id_token).await {
                    Ok((l, who)) => {
                        n.principal = Some(who);
                        Ok(pb::LoginResponse {
                            token: l.token.to_string(),
                            expires_at_unix: l.expires_at_unix,
                        })
                    }
                    Err(r) => {
                        if let Some(e) = r.error {
                            return Err(e);
                        }
                        n.principal = r.who;
                        n.fields.push(format!("reason={}", r.reason.as_str()));
                        Err(Error::Unauthenticated(crate::accounts::BAD_CREDENTIALS))
                    }
                }
            }
        )
    }

    async fn enroll_totp(
        &self,
        req: Request<pb::EnrollTotpRequest>,
    ) -> Result<Response<pb::EnrollTotpResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Auth/EnrollTotp",
            async |c: Option<Caller>, m: pb::EnrollTotpRequest, _n: &mut Note| {
                let password = zeroize::Zeroizing::new(m.password);
                let e = v.accounts.enroll_totp(&must(c)?, &password).await?;
                Ok(pb::EnrollTotpResponse {
                    otpauth_uri: e.uri.to_string(),
                    recovery_codes: e.recovery_codes.iter().map(|c| c.to_string()).collect(),
                })
            }
        )
    }

    async fn confirm_totp(
        &self,
        req: Request<pb::ConfirmTotpRequest>,
    ) -> Result<Response<pb::ConfirmTotpResponse>, Status> {
        let v = self.gate.vault.clone();
        envelope!(
            self,
            req,
            "Auth/ConfirmTotp",
            async |c: Option<Caller>, m: pb::ConfirmTotpRequest, _n: &mut Note| {
                v.accounts.confirm_totp(&must(c)?, &m.otp).await?;
                Ok(pb::ConfirmTotpResponse {})
            }
        )
    }
}
