//! `coffre backup` (online), `coffre backup verify` and `coffre restore`
//! (offline, with the master key), `coffre scrub` (online).

use super::*;

/// `[#####.....] 40 %  400/1000 MiB ...` on a terminal, every 200 ms.
struct Bar {
    on: bool,
    started: std::time::Instant,
    last: std::time::Instant,
}

impl Bar {
    fn new(g: &Global) -> Self {
        let now = std::time::Instant::now();
        Self {
            on: std::io::stderr().is_terminal() && !g.json,
            started: now,
            last: now - Duration::from_secs(1),
        }
    }

    fn show(&mut self, what: &str, done: u64, total: u64) {
        if !self.on || self.last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last = std::time::Instant::now();
        let mib = |b: u64| b >> 20;
        eprint!(
            "\r{what}: {}",
            progress_line(
                mib(done),
                mib(total.max(done)),
                "MiB",
                self.started.elapsed()
            )
        );
    }

    fn end(&self) {
        if self.on {
            eprintln!();
        }
    }
}

fn tenant_counts_json(t: &[crate::backup::TenantCounts]) -> serde_json::Value {
    t.iter()
        .map(|t| {
            json!({"tenant": t.name, "records": t.records, "principals": t.principals,
                   "secrets": t.secrets, "index_entries": t.index_entries})
        })
        .collect()
}

/// `coffre backup --out FILE`: the stream of `Admin/Backup` into
/// `FILE.partial` (0600, never over an existing file), fsynced, then
/// renamed to `FILE`: a backup cut short never carries the final name.
pub(super) async fn backup(g: &Global, out: &Path) -> Result<(), CliError> {
    if out.exists() {
        return Err(err(format!(
            "{} exists: a backup never overwrites a file",
            out.display()
        )));
    }
    let partial = {
        let mut name = out.as_os_str().to_owned();
        name.push(".partial");
        PathBuf::from(name)
    };
    let mut st = AdminClient::new(connect(g).await?)
        .backup(authed(g, pb::BackupRequest {})?)
        .await
        .map_err(status_err)?
        .into_inner();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| err(format!("{}: {e}", partial.display())))?;
    let result = async {
        let mut bar = Bar::new(g);
        let mut head = Vec::new();
        let mut manifest = None;
        let mut bytes = 0u64;
        while let Some(chunk) = st.message().await.map_err(stream_err)? {
            file.write_all(&chunk.data)
                .map_err(|e| err(format!("{}: {e}", partial.display())))?;
            bytes += chunk.data.len() as u64;
            if manifest.is_none() {
                head.extend_from_slice(&chunk.data);
                if let Ok((m, _)) = crate::backup::read_manifest(&mut &head[..]) {
                    manifest = Some(m);
                    head = Vec::new();
                }
            }
            bar.show(
                "backup",
                bytes,
                manifest
                    .as_ref()
                    .map_or(0, |m: &crate::backup::Manifest| m.bytes),
            );
        }
        bar.end();
        file.sync_all()
            .map_err(|e| err(format!("{}: {e}", partial.display())))?;
        let m = manifest.ok_or_else(|| err("the server sent no backup"))?;
        Ok::<_, CliError>((m, bytes))
    }
    .await;
    let (m, bytes) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).map_err(|e| err(format!("{}: {e}", out.display())))?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(format!("{}: {e}", dir.display())))?;
    let records: u64 = m.tenants.iter().map(|t| t.records).sum();
    say(
        g,
        &format!(
            "wrote {} ({bytes} bytes): {records} records, {} tenants, audit head seq {}, master key {} \
             — check it with `coffre backup verify --config CFG {}`",
            out.display(),
            m.tenants.len(),
            m.audit_head_seq,
            m.key_id(),
            out.display()
        ),
        json!({"path": out, "bytes": bytes, "records": records, "created_unix_ms": m.created_unix_ms,
               "audit_head_seq": m.audit_head_seq, "master_key": m.key_id(),
               "tenants": tenant_counts_json(&m.tenants)}),
    );
    Ok(())
}

/// `coffre backup verify --config CFG FILE`: the whole file checked with
/// the master key, nothing written.
pub(super) async fn verify(g: &Global, config: Option<&Path>, file: &Path) -> Result<(), CliError> {
    let config = Config::load(config).map_err(err)?;
    let master = crate::keys::load_key_file(&config.master_key_file).map_err(err)?;
    let started = std::time::Instant::now();
    let mut bar = Bar::new(g);
    let v = crate::ops::restore::verify_file(file, &master, |d, t| bar.show("verify", d, t))
        .map_err(err)?;
    bar.end();
    let secs = started.elapsed().as_secs_f64();
    let m = &v.manifest;
    if g.json {
        println!(
            "{}",
            json!({"ok": true, "path": file, "created_unix_ms": m.created_unix_ms,
                   "audit_head_seq": m.audit_head_seq, "audit_first_seq": m.audit_first_seq,
                   "master_key": m.key_id(), "records": v.records, "fields": v.fields,
                   "secrets": v.secrets, "keys": v.keys, "events": v.events,
                   "store_entries": v.store_entries, "bytes": v.bytes,
                   "shredded_leftovers": v.shredded_leftovers, "seconds": secs,
                   "tenants": tenant_counts_json(&v.tenants)})
        );
    } else {
        println!(
            "{}: OK — made {} under master key {}, audit events {}..={}",
            file.display(),
            utc_time(m.created_unix_ms),
            m.key_id(),
            m.audit_first_seq,
            m.audit_head_seq
        );
        println!(
            "  {} records ({} fields decrypted and authenticated), {} secrets, {} wrapped keys, {} audit events chained, {} entries in {secs:.1} s",
            v.records, v.fields, v.secrets, v.keys, v.events, v.store_entries
        );
        for t in &v.tenants {
            println!(
                "  tenant {}: {} records, {} principals, {} secrets",
                t.name, t.records, t.principals, t.secrets
            );
        }
    }
    Ok(())
}

/// `coffre restore --config CFG --from FILE`.
pub(super) async fn restore(
    g: &Global,
    config: Option<&Path>,
    from: &Path,
    opts: crate::ops::restore::RestoreOptions,
) -> Result<(), CliError> {
    let config = Config::load(config).map_err(err)?;
    let started = std::time::Instant::now();
    let mut bar = Bar::new(g);
    let r = crate::ops::restore::restore(&config, from, &opts, |what, d, t| bar.show(what, d, t))
        .await
        .map_err(err)?;
    bar.end();
    let secs = started.elapsed().as_secs_f64();
    let m = &r.verified.manifest;
    let into = match config.storage.backend {
        crate::config::StorageBackend::Postgres => "the PostgreSQL database".to_string(),
        crate::config::StorageBackend::Sled => config.data_dir.display().to_string(),
    };
    say(
        g,
        &format!(
            "restored {} into {} in {secs:.1} s: {} records, audit head seq {} (backup of {}); \
             the restore is event {} of the trail{}. Start the server; everyone logs in again.",
            from.display(),
            into,
            r.verified.records,
            m.audit_head_seq,
            utc_time(m.created_unix_ms),
            r.restore_seq,
            if r.dropped.is_empty() {
                String::new()
            } else {
                format!("; left out as shredded: {}", r.dropped.join(", "))
            }
        ),
        json!({"ok": true, "data_dir": config.data_dir, "records": r.verified.records,
               "audit_head_seq": m.audit_head_seq, "created_unix_ms": m.created_unix_ms,
               "restore_seq": r.restore_seq, "dropped_shredded": r.dropped, "seconds": secs}),
    );
    Ok(())
}

/// `coffre scrub`: per tenant, checked, total, failed; non-zero exit if
/// any record fails.
pub(super) async fn scrub(g: &Global) -> Result<(), CliError> {
    let mut st = AdminClient::new(connect(g).await?)
        .scrub(authed(g, pb::ScrubRequest {})?)
        .await
        .map_err(status_err)?
        .into_inner();
    let bar = std::io::stderr().is_terminal() && !g.json;
    let started = std::time::Instant::now();
    let mut finals: Vec<pb::ScrubProgress> = Vec::new();
    let mut total = None;
    while let Some(p) = st.message().await.map_err(stream_err)? {
        if p.tenant.is_empty() {
            total = Some(p);
            continue;
        }
        if bar {
            eprint!(
                "\r{}: {}",
                p.tenant,
                progress_line(p.checked, p.total, "records", started.elapsed())
            );
        }
        match finals.iter_mut().find(|f| f.tenant == p.tenant) {
            Some(f) => *f = p,
            None => finals.push(p),
        }
    }
    if bar {
        eprintln!();
    }
    let total = total.ok_or_else(|| err("the scrub ended without its total"))?;
    if g.json {
        let tenants: Vec<_> = finals
            .iter()
            .map(|p| json!({"tenant": p.tenant, "checked": p.checked, "total": p.total, "failed": p.failed}))
            .collect();
        println!(
            "{}",
            json!({"checked": total.checked, "total": total.total, "failed": total.failed, "tenants": tenants})
        );
    } else {
        for p in &finals {
            println!(
                "tenant {}: {} checked, {} failed",
                p.tenant, p.checked, p.failed
            );
        }
        println!(
            "scrub: {} records checked, {} failed ({:.1} s)",
            total.checked,
            total.failed,
            started.elapsed().as_secs_f64()
        );
    }
    if total.failed > 0 {
        return Err(err(format!(
            "{} records failed the scrub: see `coffre audit alerts` (scrub_failed names them)",
            total.failed
        )));
    }
    Ok(())
}
