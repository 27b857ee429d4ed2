//! The auditors' report over a period, computed from audit events: who read
//! how much, what was refused or throttled, lockouts, reads outside office
//! hours, and principals who read far more distinct records than the median
//! of their role (the slow exfiltration a per-call limit does not show).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::pb::AuditEvent;

#[derive(Debug, Serialize)]
pub struct PrincipalReads {
    pub principal: String,
    pub role: String,
    pub records_read: u64,
    pub distinct_records: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub events: u64,
    /// Ranked by records read, most first.
    pub reads: Vec<PrincipalReads>,
    /// `(principal, outcome) → count` for every call that did not succeed.
    pub refused: BTreeMap<String, u64>,
    pub throttled: BTreeMap<String, u64>,
    pub lockouts: Vec<String>,
    /// `(principal, reads outside office hours)`.
    pub off_hours_reads: BTreeMap<String, u64>,
    /// Principals above `factor ×` their role's median distinct records.
    pub outliers: Vec<String>,
    /// Export grants given in the period, with what was read under each.
    pub export_grants: Vec<ExportGrant>,
}

/// An export grant and the reads made with its purpose after it.
#[derive(Debug, Serialize)]
pub struct ExportGrant {
    pub principal: String,
    pub purpose: String,
    pub max_records: u64,
    pub hours: u64,
    pub granted_by: String,
    pub granted_unix_ms: i64,
    pub records_read: u64,
}

/// The value of `key=` among an event's fields.
fn field<'a>(e: &'a AuditEvent, key: &str) -> Option<&'a str> {
    e.fields
        .iter()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
}

fn is_read(action: &str) -> bool {
    action.ends_with("/GetRecord") || action.ends_with("/BulkRead")
}

/// Office hours: `[start, end)` in whole hours of local time in `tz`.
#[derive(Debug, Clone, Copy)]
pub struct OfficeHours {
    pub start: u32,
    pub end: u32,
    pub tz: chrono_tz::Tz,
}

impl OfficeHours {
    /// Whether `unix_ms` falls outside office hours in their time zone
    /// (daylight saving included).
    pub fn outside(&self, unix_ms: i64) -> bool {
        use chrono::{TimeZone, Timelike};
        let hour = match self.tz.timestamp_millis_opt(unix_ms) {
            chrono::LocalResult::Single(t) => t.hour(),
            chrono::LocalResult::Ambiguous(t, _) => t.hour(),
            chrono::LocalResult::None => return false,
        };
        hour < self.start || hour >= self.end
    }
}

pub fn build(events: &[AuditEvent], office_hours: OfficeHours, factor: f64) -> Report {
    let mut reads: BTreeMap<&str, (String, u64, BTreeSet<&str>)> = BTreeMap::new();
    let mut refused = BTreeMap::new();
    let mut throttled = BTreeMap::new();
    let mut lockouts = Vec::new();
    let mut off_hours = BTreeMap::new();
    for e in events {
        if e.action == "alert/login_lockout" {
            lockouts.push(e.principal.clone());
            continue;
        }
        if e.outcome != "ok" && !e.action.starts_with("alert/") {
            *refused
                .entry(format!("{} {}", e.principal, e.outcome))
                .or_insert(0u64) += 1;
            if e.outcome == "resource_exhausted" {
                *throttled.entry(e.principal.clone()).or_insert(0u64) += 1;
            }
        }
        if is_read(&e.action) && e.outcome == "ok" {
            let r = reads
                .entry(&e.principal)
                .or_insert_with(|| (e.role.clone(), 0, BTreeSet::new()));
            r.1 += e.record_ids.len() as u64;
            r.2.extend(e.record_ids.iter().map(String::as_str));
            if office_hours.outside(e.time_unix_ms) {
                *off_hours.entry(e.principal.clone()).or_insert(0u64) += 1;
            }
        }
    }
    let mut export_grants: Vec<ExportGrant> = events
        .iter()
        .filter(|e| e.action == "coffre.v1.Admin/GrantExport" && e.outcome == "ok")
        .map(|e| ExportGrant {
            principal: format!("{}/{}", e.tenant, field(e, "username").unwrap_or("")),
            purpose: e.purpose.clone(),
            max_records: field(e, "max_records")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            hours: field(e, "hours").and_then(|v| v.parse().ok()).unwrap_or(0),
            granted_by: e.principal.clone(),
            granted_unix_ms: e.time_unix_ms,
            records_read: 0,
        })
        .collect();
    for e in events
        .iter()
        .filter(|e| is_read(&e.action) && e.outcome == "ok")
    {
        // The latest grant before the read with its principal and purpose.
        if let Some(g) = export_grants.iter_mut().rev().find(|g| {
            g.principal == e.principal
                && g.purpose == e.purpose
                && g.granted_unix_ms <= e.time_unix_ms
        }) {
            g.records_read += e.record_ids.len() as u64;
        }
    }
    let mut ranked: Vec<PrincipalReads> = reads
        .into_iter()
        .map(|(p, (role, n, ids))| PrincipalReads {
            principal: p.to_string(),
            role,
            records_read: n,
            distinct_records: ids.len() as u64,
        })
        .collect();
    ranked.sort_by_key(|r| std::cmp::Reverse(r.records_read));
    let mut by_role: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for r in &ranked {
        by_role.entry(&r.role).or_default().push(r.distinct_records);
    }
    let medians: BTreeMap<&str, f64> = by_role
        .into_iter()
        .map(|(role, mut v)| {
            v.sort_unstable();
            let m = if v.len() % 2 == 1 {
                v[v.len() / 2] as f64
            } else {
                (v[v.len() / 2 - 1] + v[v.len() / 2]) as f64 / 2.0
            };
            (role, m)
        })
        .collect();
    let outliers = ranked
        .iter()
        .filter(|r| {
            let m = medians.get(r.role.as_str()).copied().unwrap_or(0.0);
            m > 0.0 && r.distinct_records as f64 > factor * m
        })
        .map(|r| r.principal.clone())
        .collect();
    Report {
        events: events.len() as u64,
        reads: ranked,
        refused,
        throttled,
        lockouts,
        off_hours_reads: off_hours,
        outliers,
        export_grants,
    }
}

pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "events in period: {}", r.events);
    let _ = writeln!(s, "\nreads per principal (most first):");
    let _ = writeln!(
        s,
        "  {:<32} {:<10} {:>8} {:>9}",
        "principal", "role", "records", "distinct"
    );
    for p in &r.reads {
        let _ = writeln!(
            s,
            "  {:<32} {:<10} {:>8} {:>9}",
            p.principal, p.role, p.records_read, p.distinct_records
        );
    }
    let section = |s: &mut String, title: &str, m: &BTreeMap<String, u64>| {
        let _ = writeln!(s, "\n{title}:{}", if m.is_empty() { " none" } else { "" });
        for (k, v) in m {
            let _ = writeln!(s, "  {k}: {v}");
        }
    };
    section(&mut s, "refused calls", &r.refused);
    section(&mut s, "throttled calls", &r.throttled);
    section(&mut s, "reads outside office hours", &r.off_hours_reads);
    let _ = writeln!(
        s,
        "\nlockouts: {}",
        if r.lockouts.is_empty() {
            "none".into()
        } else {
            r.lockouts.join(", ")
        }
    );
    let _ = writeln!(
        s,
        "far above their role's median of distinct records: {}",
        if r.outliers.is_empty() {
            "none".into()
        } else {
            r.outliers.join(", ")
        }
    );
    let _ = writeln!(
        s,
        "\nexport grants:{}",
        if r.export_grants.is_empty() {
            " none"
        } else {
            ""
        }
    );
    for g in &r.export_grants {
        let _ = writeln!(
            s,
            "  {} purpose {:?}: {} of {} records read; granted by {} for {} h",
            g.principal, g.purpose, g.records_read, g.max_records, g.granted_by, g.hours
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &str, ids: &[&str], hour: i64) -> AuditEvent {
        AuditEvent {
            principal: p.into(),
            role: "clinician".into(),
            action: "coffre.v1.Records/GetRecord".into(),
            outcome: "ok".into(),
            record_ids: ids.iter().map(|s| s.to_string()).collect(),
            time_unix_ms: hour * 3_600_000,
            ..Default::default()
        }
    }

    #[test]
    fn office_hours_are_local_time() {
        let paris = OfficeHours {
            start: 7,
            end: 20,
            tz: chrono_tz::Europe::Paris,
        };
        // 2026-07-01 05:30 UTC is 07:30 in Paris (summer time): inside.
        let summer = 1_782_883_800_000;
        assert!(!paris.outside(summer));
        // 2026-01-15 06:30 UTC is 07:30 in Paris (winter time): inside;
        // 19:30 UTC is 20:30 there: outside.
        assert!(!paris.outside(1_768_458_600_000));
        assert!(paris.outside(1_768_505_400_000));
    }

    #[test]
    fn ranks_reads_and_flags_outliers_and_off_hours() {
        let mut ev = vec![
            read("t/a", &["1"], 10),
            read("t/b", &["1", "2"], 10),
            read("t/c", &["3"], 9),
        ];
        let many: Vec<String> = (0..50).map(|i| format!("r{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        ev.push(read("t/x", &refs, 23));
        ev.push(AuditEvent {
            principal: "t/a".into(),
            action: "coffre.v1.Records/GetRecord".into(),
            outcome: "permission_denied".into(),
            ..Default::default()
        });
        let utc = OfficeHours {
            start: 7,
            end: 20,
            tz: chrono_tz::UTC,
        };
        let r = build(&ev, utc, 3.0);
        assert_eq!(r.reads[0].principal, "t/x");
        assert_eq!(r.reads[0].distinct_records, 50);
        assert_eq!(r.outliers, vec!["t/x"]);
        assert_eq!(r.off_hours_reads.get("t/x"), Some(&1));
        assert_eq!(r.refused.get("t/a permission_denied"), Some(&1));
        assert!(render(&r).contains("t/x"));
    }
}
