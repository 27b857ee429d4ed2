//! `coffre audit`: query, patient, export, report, alerts, verify, checkpoint.

use super::*;

pub(super) fn parse_when(s: &Option<String>) -> Result<i64, CliError> {
    let Some(s) = s else { return Ok(0) };
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = n.parse().map_err(|_| {
        err(format!(
            "{s:?}: use unix milliseconds or an age like 7d, 24h, 30m"
        ))
    })?;
    let secs = match unit {
        "d" => n * 86_400,
        "h" => n * 3_600,
        "m" => n * 60,
        _ => return Err(err(format!("{s:?}: unit must be d, h or m"))),
    };
    Ok(crate::clock::now_ms() - secs * 1000)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` from unix milliseconds (UTC).
pub(super) fn fmt_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// The `QueryAudit` stream for `f`.
async fn query(g: &Global, f: &AuditFilter) -> Result<tonic::Streaming<pb::AuditEvent>, CliError> {
    let mut c = pb::audit_client::AuditClient::new(connect(g).await?);
    let req = pb::QueryAuditRequest {
        tenant: f.tenant.clone().unwrap_or_default(),
        principal: f.principal.clone().unwrap_or_default(),
        record_id: f.record_id.clone().unwrap_or_default(),
        action: f.action.clone().unwrap_or_default(),
        outcome: f.outcome.clone().unwrap_or_default(),
        since_unix_ms: parse_when(&f.since)?,
        until_unix_ms: parse_when(&f.until)?,
        limit: f.limit,
        newest_first: f.newest_first,
        before_seq: f.before_seq,
    };
    Ok(c.query_audit(authed(g, req)?)
        .await
        .map_err(status_err)?
        .into_inner())
}

/// Every event for `f`, collected (the report and the mirror check need
/// them together).
pub(super) async fn fetch_events(
    g: &Global,
    f: &AuditFilter,
) -> Result<Vec<pb::AuditEvent>, CliError> {
    let mut st = query(g, f).await?;
    let mut out = Vec::new();
    while let Some(e) = st.message().await.map_err(stream_err)? {
        out.push(e);
    }
    Ok(out)
}

/// Prints the events for `f` as they arrive: a table, or JSON lines.
async fn print_events(g: &Global, f: &AuditFilter) -> Result<(), CliError> {
    let mut st = query(g, f).await?;
    if !g.json {
        println!(
            "{:>6}  {:<24}  {:<24}  {:<30}  {:<18}  {:<20}  purpose",
            "seq", "time (UTC)", "principal", "action", "outcome", "records"
        );
    }
    while let Some(e) = st.message().await.map_err(stream_err)? {
        if g.json {
            println!("{}", crate::audit::to_json(&e));
            continue;
        }
        let action = e.action.trim_start_matches("coffre.v1.");
        let mut ids = e.record_ids.join(",");
        if ids.len() > 20 {
            ids = format!("{}… ({})", &ids[..16], e.record_ids.len());
        }
        println!(
            "{:>6}  {:<24}  {:<24}  {:<30}  {:<18}  {:<20}  {}",
            e.seq,
            fmt_time(e.time_unix_ms),
            e.principal,
            action,
            e.outcome,
            ids,
            e.purpose.escape_debug()
        );
    }
    Ok(())
}

pub(super) fn csv_cell(s: &str) -> String {
    // Quote always; neutralise spreadsheet formulas.
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub(super) async fn audit(g: &Global, cmd: AuditCmd) -> Result<(), CliError> {
    match cmd {
        AuditCmd::Query(f) => print_events(g, &f).await,
        AuditCmd::Patient { record_id } => {
            let f = AuditFilter {
                record_id: Some(record_id),
                ..Default::default()
            };
            print_events(g, &f).await
        }
        AuditCmd::Export { format, filter } => export(g, format, &filter).await,
        AuditCmd::Report {
            tenant,
            since,
            until,
            office_hours,
            time_zone,
            outlier_factor,
        } => {
            report(
                g,
                tenant,
                since,
                until,
                &office_hours,
                &time_zone,
                outlier_factor,
            )
            .await
        }
        AuditCmd::Alerts { since } => alerts(g, since).await,
        AuditCmd::Checkpoint => checkpoint(g).await,
        AuditCmd::Verify { checkpoint, mirror } => verify(g, checkpoint, mirror).await,
    }
}

/// `audit export`: every matching event, as JSON lines or CSV, written as
/// it arrives (constant memory whatever the trail's length).
async fn export(g: &Global, format: ExportFormat, f: &AuditFilter) -> Result<(), CliError> {
    let mut st = query(g, f).await?;
    if format == ExportFormat::Csv {
        println!(
            "seq,time_unix_ms,time,tenant,principal,role,action,record_ids,fields,purpose,outcome,peer,hash"
        );
    }
    while let Some(e) = st.message().await.map_err(stream_err)? {
        match format {
            ExportFormat::Jsonl => println!("{}", crate::audit::to_json(&e)),
            ExportFormat::Csv => {
                let cells = [
                    e.seq.to_string(),
                    e.time_unix_ms.to_string(),
                    fmt_time(e.time_unix_ms),
                    e.tenant.clone(),
                    e.principal.clone(),
                    e.role.clone(),
                    e.action.clone(),
                    e.record_ids.join(" "),
                    e.fields.join(" "),
                    e.purpose.clone(),
                    e.outcome.clone(),
                    e.peer.clone(),
                    hex::encode(&e.hash),
                ];
                let row: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
                println!("{}", row.join(","));
            }
        }
    }
    Ok(())
}

/// `audit report`: the period's figures (computed here from the events).
#[allow(clippy::too_many_arguments)]
async fn report(
    g: &Global,
    tenant: Option<String>,
    since: String,
    until: Option<String>,
    office_hours: &str,
    time_zone: &str,
    outlier_factor: f64,
) -> Result<(), CliError> {
    let f = AuditFilter {
        tenant,
        since: Some(since),
        until,
        ..Default::default()
    };
    let events = fetch_events(g, &f).await?;
    let (start, end) = office_hours
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.parse::<i64>().ok()?)))
        .filter(|(a, b)| a < b && *b <= 24)
        .ok_or_else(|| err("--office-hours is START-END in hours, such as 7-20"))?;
    let tz: chrono_tz::Tz = time_zone.parse().map_err(|_| {
        err(format!(
            "--time-zone {time_zone}: not an IANA time zone (such as Europe/Paris)"
        ))
    })?;
    let hours = crate::report::OfficeHours {
        start: start as u32,
        end: end as u32,
        tz,
    };
    let report = crate::report::build(&events, hours, outlier_factor);
    if g.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(err)?);
    } else {
        print!("{}", crate::report::render(&report));
    }
    Ok(())
}

/// `audit alerts`: alerts since a time, as they stream.
async fn alerts(g: &Global, since: String) -> Result<(), CliError> {
    let mut c = pb::audit_client::AuditClient::new(connect(g).await?);
    let mut st = c
        .list_alerts(authed(
            g,
            pb::ListAlertsRequest {
                since_unix_ms: parse_when(&Some(since))?,
            },
        )?)
        .await
        .map_err(status_err)?
        .into_inner();
    if !g.json {
        println!(
            "{:>6}  {:<24}  {:<9}  {:<16}  {:<24}  detail",
            "seq", "time (UTC)", "severity", "kind", "principal"
        );
    }
    while let Some(a) = st.message().await.map_err(stream_err)? {
        if g.json {
            println!("{}", crate::audit::alert_json(&a));
        } else {
            println!(
                "{:>6}  {:<24}  {:<9}  {:<16}  {:<24}  {}",
                a.seq,
                fmt_time(a.time_unix_ms),
                a.severity,
                a.kind,
                a.principal,
                a.detail.escape_debug()
            );
        }
    }
    Ok(())
}

/// `audit checkpoint`: the head to keep elsewhere, once the chain verifies.
async fn checkpoint(g: &Global) -> Result<(), CliError> {
    let v = verify_call(g, None).await?;
    if !v.ok {
        return Err(err(format!(
            "the chain fails at seq {} ({}): no checkpoint taken",
            v.first_bad_seq, v.reason
        )));
    }
    let cp = format!("{}:{}", v.head_seq, hex::encode(&v.head_hash));
    say(
        g,
        &cp,
        json!({"seq": v.head_seq, "hash": hex::encode(&v.head_hash), "checkpoint": cp}),
    );
    Ok(())
}

/// `audit verify`: the chain (and a checkpoint, and a mirror), with the
/// time it took and the rate; a spinner on a terminal while it runs.
async fn verify(
    g: &Global,
    checkpoint: Option<String>,
    mirror: Option<PathBuf>,
) -> Result<(), CliError> {
    let cp = checkpoint
        .map(|c| {
            let (seq, hash) = c
                .split_once(':')
                .ok_or_else(|| err("--checkpoint is SEQ:HASH"))?;
            let seq: u64 = seq
                .parse()
                .map_err(|_| err("--checkpoint SEQ is a number"))?;
            let hash = hex::decode(hash).map_err(|_| err("--checkpoint HASH is hex"))?;
            Ok::<_, CliError>((seq, hash))
        })
        .transpose()?;
    let started = std::time::Instant::now();
    let v = with_spinner(g, "verifying the audit trail", verify_call(g, cp)).await?;
    let took = started.elapsed();
    let mirror_report = match &mirror {
        Some(path) => Some(check_mirror(g, path).await?),
        None => None,
    };
    let mirror_ok = mirror_report.as_ref().is_none_or(|r| r.problem.is_none());
    if g.json {
        let m = mirror_report.as_ref().map(|r| {
            json!({"ok": r.problem.is_none(), "problem": r.problem, "starts_at_seq": r.starts_at,
                           "events_before_mirror": r.before, "tenant": r.tenant})
        });
        println!(
            "{}",
            json!({"ok": v.ok && mirror_ok, "checked": v.checked, "first_bad_seq": v.first_bad_seq,
                           "reason": v.reason, "head_seq": v.head_seq, "head_hash": hex::encode(&v.head_hash),
                           "restores": v.restores.iter().map(|r| json!({"seq": r.seq, "time_unix_ms": r.time_unix_ms,
                               "backup_head_seq": r.backup_head_seq, "backup_created_unix_ms": r.backup_created_unix_ms})).collect::<Vec<_>>(),
                           "note": (!v.note.is_empty()).then_some(&v.note),
                           "mirror": m})
        );
    } else if v.ok {
        println!(
            "audit chain ok: {} events in {:.1} s ({:.0} events/s), head {}:{}",
            v.checked,
            took.as_secs_f64(),
            v.checked as f64 / took.as_secs_f64().max(1e-3),
            v.head_seq,
            hex::encode(&v.head_hash)
        );
        for r in &v.restores {
            println!(
                "restore at seq {} ({}) from a backup made {} (head seq {}): events the old vault wrote after seq {} are not in this trail",
                r.seq,
                utc_time(r.time_unix_ms),
                utc_time(r.backup_created_unix_ms),
                r.backup_head_seq,
                r.backup_head_seq
            );
        }
        if !v.note.is_empty() {
            println!("{}", v.note);
        }
    }
    if !v.ok {
        return Err(err(format!(
            "audit chain FAILS at seq {}: {} ({} events checked before it)",
            v.first_bad_seq, v.reason, v.checked
        )));
    }
    if let Some(r) = &mirror_report {
        if let Some(problem) = &r.problem {
            return Err(err(format!("mirror differs from the store: {problem}")));
        }
        if !g.json {
            if let Some(t) = &r.tenant {
                println!("mirror compared on tenant {t}'s events (what this auditor sees)");
            }
            if let Some(seq) = r.starts_at {
                println!(
                    "mirror starts at seq {seq}: the {} earlier events were written before it (mirror enabled later, or its head removed)",
                    r.before
                );
            }
            println!("mirror matches the store");
        }
    }
    Ok(())
}

pub(super) async fn verify_call(
    g: &Global,
    checkpoint: Option<(u64, Vec<u8>)>,
) -> Result<pb::VerifyAuditResponse, CliError> {
    let (checkpoint_seq, checkpoint_hash) = checkpoint.unwrap_or_default();
    let mut c = pb::audit_client::AuditClient::new(connect(g).await?);
    Ok(c.verify_audit(authed(
        g,
        pb::VerifyAuditRequest {
            checkpoint_seq,
            checkpoint_hash,
        },
    )?)
    .await
    .map_err(status_err)?
    .into_inner())
}

/// What `audit verify --mirror` found.
#[derive(Clone, Default)]
pub(super) struct MirrorCheck {
    /// The first difference, if any.
    problem: Option<String>,
    /// The mirror's first event in scope, when it starts after the trail
    /// (the mirror was enabled later, or its head was cut).
    starts_at: Option<u64>,
    /// Stored events before `starts_at`: not expected in the mirror.
    before: u64,
    /// Only this tenant's events are compared (a tenant's auditor).
    tenant: Option<String>,
}

/// Compares the mirror with the events the caller may see: every stored
/// event from the mirror's first one on must be in it with the same hash,
/// and the mirror must hold nothing in scope that the store lacks. A
/// tenant's auditor sees its tenant's events only, so only those lines of
/// the mirror are compared.
pub(super) async fn check_mirror(g: &Global, path: &Path) -> Result<MirrorCheck, CliError> {
    let stored = fetch_events(g, &AuditFilter::default()).await?;
    // Read after the query: every event the query returned was in the
    // mirror before it was visible (the mirror may run ahead, not behind).
    let text =
        std::fs::read_to_string(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
    // A tenant's auditor sees only its tenant's events; one of `system`
    // sees its own logins in `system` too.
    let tenant = stored
        .first()
        .map(|e| e.tenant.clone())
        .filter(|t| !t.is_empty() && t != crate::model::SYSTEM_TENANT)
        .filter(|t| stored.iter().all(|e| &e.tenant == t));
    let mut mirror = std::collections::BTreeMap::new();
    let mut last_line_seq = 0u64;
    for (n, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|_| err(format!("{}: line {} is not JSON", path.display(), n + 1)))?;
        let seq = v["seq"]
            .as_u64()
            .ok_or_else(|| err(format!("line {}: no seq", n + 1)))?;
        // A restore from backup takes the trail back to the backup's head:
        // from its event on, the mirror's older lines name a stretch that
        // was lost with the restore.
        if seq <= last_line_seq {
            if v["action"].as_str() != Some(crate::audit::RESTORE_ACTION) {
                return Ok(MirrorCheck {
                    problem: Some(format!(
                        "line {} goes back to seq {seq} without a restore",
                        n + 1
                    )),
                    ..Default::default()
                });
            }
            mirror.retain(|s, _| *s < seq);
        }
        last_line_seq = seq;
        if tenant
            .as_deref()
            .is_some_and(|t| v["tenant"].as_str() != Some(t))
        {
            continue;
        }
        mirror.insert(seq, v["hash"].as_str().unwrap_or_default().to_string());
    }
    let mut check = MirrorCheck {
        tenant,
        ..Default::default()
    };
    let Some(first) = mirror.keys().next().copied() else {
        check.problem = Some("the mirror holds no event this auditor may see".into());
        return Ok(check);
    };
    if stored.first().is_some_and(|e| e.seq < first) {
        check.starts_at = Some(first);
    }
    for e in &stored {
        if e.seq < first {
            check.before += 1;
            continue;
        }
        match mirror.remove(&e.seq) {
            None => {
                check.problem = Some(format!("seq {} is missing from the mirror", e.seq));
                return Ok(check);
            }
            Some(h) if h != hex::encode(&e.hash) => {
                check.problem = Some(format!("seq {} has another hash in the mirror", e.seq));
                return Ok(check);
            }
            Some(_) => {}
        }
    }
    // The mirror may run ahead by the events of this very check.
    let last = stored.last().map_or(0, |e| e.seq);
    if let Some((seq, _)) = mirror.iter().find(|(s, _)| **s <= last) {
        check.problem = Some(format!("seq {seq} is in the mirror but not in the store"));
    }
    Ok(check)
}

/// Runs `fut`, showing `what` and the seconds elapsed on stderr while it
/// runs — on a terminal, and not with `--json`.
async fn with_spinner<T>(g: &Global, what: &str, fut: impl std::future::Future<Output = T>) -> T {
    use std::io::IsTerminal;
    if g.json || !std::io::stderr().is_terminal() {
        return fut.await;
    }
    let started = std::time::Instant::now();
    let mut fut = std::pin::pin!(fut);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let out = loop {
        tokio::select! {
            out = &mut fut => break out,
            _ = tick.tick() => eprint!("\r{what}… {:.0} s", started.elapsed().as_secs_f64()),
        }
    };
    eprint!("\r\x1b[2K");
    out
}
