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
                    .login(&m.tenant, &m.username, &m.password)
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
}
