//! `coffre tenant`: create, plant honeytokens, shred.

use super::*;

pub(super) async fn tenant(g: &Global, cmd: TenantCmd) -> Result<(), CliError> {
    match cmd {
        TenantCmd::Create {
            name,
            indexed_fields,
        } => {
            let mut c = AdminClient::new(connect(g).await?);
            c.create_tenant(authed(
                g,
                pb::CreateTenantRequest {
                    name: name.clone(),
                    indexed_fields,
                },
            )?)
            .await
            .map_err(status_err)?;
            say(
                g,
                &format!("tenant {name} created"),
                json!({"tenant": name}),
            );
            Ok(())
        }
        TenantCmd::Honeytoken { name, count } => {
            let mut c = AdminClient::new(connect(g).await?);
            let mut ids = Vec::new();
            for _ in 0..count {
                let r = c
                    .create_honeytoken(authed(
                        g,
                        pb::CreateHoneytokenRequest {
                            tenant: name.clone(),
                        },
                    )?)
                    .await
                    .map_err(status_err)?;
                ids.push(r.into_inner().id);
            }
            say(
                g,
                &format!("{count} honeytoken(s) planted in {name}: {}", ids.join(" ")),
                json!({"tenant": name, "ids": ids}),
            );
            Ok(())
        }
        TenantCmd::Shred { name, confirm } => {
            let mut c = AdminClient::new(connect(g).await?);
            c.shred_tenant(authed(
                g,
                pb::ShredTenantRequest {
                    tenant: name.clone(),
                    confirm,
                },
            )?)
            .await
            .map_err(status_err)?;
            say(
                g,
                &format!("tenant {name} shredded: its keys are destroyed, its records unreadable"),
                json!({"tenant": name, "shredded": true}),
            );
            Ok(())
        }
    }
}
