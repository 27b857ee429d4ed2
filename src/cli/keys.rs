//! `coffre keys`: rotate, rewrap, status, retire, reindex, rotate-master.

use super::*;

pub(super) async fn keys(g: &Global, cmd: KeysCmd) -> Result<(), CliError> {
    // Every command but the offline rotate-master talks to the server.
    let admin = || async { Ok::<_, CliError>(AdminClient::new(connect(g).await?)) };
    match cmd {
        KeysCmd::Rotate { tenant } => {
            let r = admin()
                .await?
                .rotate_tenant_key(authed(
                    g,
                    pb::RotateTenantKeyRequest {
                        tenant: tenant.clone(),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            say(
                g,
                &format!(
                    "tenant {tenant}: key version {} active; run `coffre keys rewrap --tenant {tenant}`",
                    r.active_version
                ),
                json!({"tenant": tenant, "active_version": r.active_version}),
            );
        }
        KeysCmd::Rewrap { tenant } => {
            let st = admin()
                .await?
                .rewrap_tenant(authed(
                    g,
                    pb::RewrapTenantRequest {
                        tenant: tenant.clone(),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            let (last, took) = follow(g, st, "fields").await?;
            say(
                g,
                &format!(
                    "tenant {tenant}: {} of {} fields under the active key ({took:.1} s)",
                    last.done, last.total
                ),
                json!({"tenant": tenant, "done": last.done, "total": last.total}),
            );
        }
        KeysCmd::RotateIndex { tenant } => {
            let st = admin()
                .await?
                .rotate_index_key(authed(
                    g,
                    pb::RotateIndexKeyRequest {
                        tenant: tenant.clone(),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            let (last, took) = follow(g, st, "records").await?;
            say(
                g,
                &format!(
                    "tenant {tenant}: index rebuilt under a new key, {} records ({took:.1} s); the old key is destroyed",
                    last.total
                ),
                json!({"tenant": tenant, "done": last.done, "total": last.total}),
            );
        }
        KeysCmd::Status { tenant } => {
            let r = admin()
                .await?
                .key_status(authed(
                    g,
                    pb::KeyStatusRequest {
                        tenant: tenant.clone(),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            if g.json {
                let versions: Vec<_> = r
                    .versions
                    .iter()
                    .map(|v| {
                        json!({"version": v.version, "fields": v.fields, "encryptions": v.encryptions,
                               "retired": v.retired, "active": v.version == r.active_version})
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"tenant": tenant, "active_version": r.active_version, "versions": versions,
                           "encryptions_are_upper_bounds": true})
                );
            } else {
                println!(
                    "{:>7}  {:>12}  {:>12}  state",
                    "version", "fields", "encryptions"
                );
                for v in &r.versions {
                    let state = if v.retired {
                        "retired"
                    } else if v.version == r.active_version {
                        "active"
                    } else {
                        "decrypt only"
                    };
                    println!(
                        "{:>7}  {:>12}  {:>12}  {state}",
                        v.version, v.fields, v.encryptions
                    );
                }
                // Counts are made durable in blocks, ahead of use, so that a
                // crash never under-counts: after a restart they jump.
                println!(
                    "encryptions are upper bounds (counted durably in blocks of {} ahead of use; exact near the rotation bound)",
                    crate::keys::COUNTER_BLOCK
                );
            }
        }
        KeysCmd::RotateMaster { config, new_key } => {
            rotate_master(g, config.as_deref(), &new_key).await?
        }
        KeysCmd::CheckValue { key } => {
            let master = crate::keys::load_key_file(&key).map_err(err)?;
            let check = crate::keys::key_check_value(&master);
            let id = crate::keys::check_value_id(&check);
            say(
                g,
                &format!("{}: check value {id}", key.display()),
                json!({"path": key, "check_value": id}),
            );
        }
        KeysCmd::Retire { tenant, version } => {
            admin()
                .await?
                .retire_key_version(authed(
                    g,
                    pb::RetireKeyVersionRequest {
                        tenant: tenant.clone(),
                        version,
                    },
                )?)
                .await
                .map_err(status_err)?;
            say(
                g,
                &format!("tenant {tenant}: key version {version} retired and destroyed"),
                json!({"tenant": tenant, "retired": version}),
            );
        }
    }
    Ok(())
}

pub(super) async fn rotate_master(
    g: &Global,
    config: Option<&Path>,
    new_key: &Path,
) -> Result<(), CliError> {
    let config = crate::config::Config::load(config).map_err(err)?;
    let operator = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let (human, keys) = match crate::ops::rotate_master(&config, new_key, &operator)
        .await
        .map_err(err)?
    {
        crate::ops::MasterRotated::Rotated { keys } => (format!("re-wrapped {keys} keys"), keys),
        crate::ops::MasterRotated::AlreadyDone => ("already under the new key".to_string(), 0),
    };
    say(
        g,
        &format!(
            "{human}: now set master_key_file = {} (or move it over {}), start the server, \
             take a backup, and escrow the old key (check value in `coffre keys check-value`) \
             for as long as backups made under it are kept",
            new_key.display(),
            config.master_key_file.display()
        ),
        json!({"rewrapped": keys, "new_key": new_key, "old_key": config.master_key_file}),
    );
    Ok(())
}

/// Follows a key job's progress stream, with a progress bar on a terminal;
/// returns the last report and the seconds taken.
pub(super) async fn follow(
    g: &Global,
    mut st: tonic::Streaming<pb::RewrapProgress>,
    unit: &str,
) -> Result<(pb::RewrapProgress, f64), CliError> {
    let bar = std::io::stderr().is_terminal() && !g.json;
    let started = std::time::Instant::now();
    let mut last = pb::RewrapProgress::default();
    while let Some(p) = st.message().await.map_err(stream_err)? {
        last = p;
        if bar {
            eprint!(
                "\r{}",
                progress_line(p.done, p.total, unit, started.elapsed())
            );
        }
    }
    if bar {
        eprintln!();
    }
    Ok((last, started.elapsed().as_secs_f64()))
}

/// `[#####.....] 40 %  12000/30000 fields  8 500/s  ETA 2 s`
pub(super) fn progress_line(
    done: u64,
    total: u64,
    unit: &str,
    elapsed: std::time::Duration,
) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = (frac * 30.0).round() as usize;
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let eta = if rate > 0.0 {
        format!("{:.0} s", (total.saturating_sub(done)) as f64 / rate)
    } else {
        "?".into()
    };
    format!(
        "[{}{}] {:>3.0} %  {done}/{total} {unit}  {rate:.0}/s  ETA {eta}   ",
        "#".repeat(filled.min(30)),
        ".".repeat(30 - filled.min(30)),
        frac * 100.0
    )
}
