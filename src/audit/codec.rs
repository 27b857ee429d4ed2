//! How one event is stored inside a frame: the fields of `AuditEvent`
//! without what the log knows already (its seq comes from the frame, its
//! hashes from the chain), with the words every event repeats (actions,
//! roles, outcomes) as small numbers, and the principal's tenant written
//! once. Part of the trail's on-disk format: the tables only grow, at the
//! end.

use prost::Message;

use crate::pb::AuditEvent;

/// Actions stored as a number (1-based index). Append only.
const ACTIONS: &[&str] = &[
    "coffre.v1.Auth/Login",
    "coffre.v1.Auth/Logout",
    "coffre.v1.Auth/ChangePassword",
    "coffre.v1.Records/PutRecord",
    "coffre.v1.Records/GetRecord",
    "coffre.v1.Records/DeleteRecord",
    "coffre.v1.Records/FindRecords",
    "coffre.v1.Records/BulkRead",
    "coffre.v1.Records/SetSecret",
    "coffre.v1.Records/VerifySecret",
    "coffre.v1.Admin/CreateTenant",
    "coffre.v1.Admin/CreatePrincipal",
    "coffre.v1.Admin/SetPrincipalLocked",
    "coffre.v1.Admin/CreateHoneytoken",
    "coffre.v1.Admin/RotateTenantKey",
    "coffre.v1.Admin/RewrapTenant",
    "coffre.v1.Admin/KeyStatus",
    "coffre.v1.Admin/RetireKeyVersion",
    "coffre.v1.Admin/ShredTenant",
    "coffre.v1.Admin/RotateIndexKey",
    "coffre.v1.Admin/ListPrincipals",
    "coffre.v1.Audit/QueryAudit",
    "coffre.v1.Audit/VerifyAudit",
    "coffre.v1.Audit/ListAlerts",
    "summary/refused_calls",
    "alert/login_lockout",
    "alert/storage_writable",
];

/// Roles stored as a number. Append only.
const ROLES: &[&str] = &["admin", "clinician", "service", "auditor"];

/// Outcomes stored as a number. Append only.
const OUTCOMES: &[&str] = &[
    "ok",
    "invalid_argument",
    "unauthenticated",
    "permission_denied",
    "not_found",
    "resource_exhausted",
    "failed_precondition",
    "unavailable",
    "data_loss",
    "internal",
    "deadline_exceeded",
    "warning",
    "critical",
    "already_exists",
    "cancelled",
];

/// One event as stored. Numbers start at 1 so that an absent word (0)
/// falls back to its string.
#[derive(Clone, PartialEq, Message)]
pub struct Stored {
    /// Milliseconds after the frame's time.
    #[prost(sint64, tag = "1")]
    pub time_delta: i64,
    #[prost(string, tag = "2")]
    pub tenant: String,
    /// The principal without its `tenant/` when it is the event's tenant.
    #[prost(string, tag = "3")]
    pub user: String,
    #[prost(string, tag = "4")]
    pub principal: String,
    #[prost(uint32, tag = "5")]
    pub role_code: u32,
    #[prost(string, tag = "6")]
    pub role: String,
    #[prost(uint32, tag = "7")]
    pub action_code: u32,
    #[prost(string, tag = "8")]
    pub action: String,
    #[prost(string, repeated, tag = "9")]
    pub record_ids: Vec<String>,
    #[prost(string, repeated, tag = "10")]
    pub fields: Vec<String>,
    #[prost(string, tag = "11")]
    pub purpose: String,
    #[prost(uint32, tag = "12")]
    pub outcome_code: u32,
    #[prost(string, tag = "13")]
    pub outcome: String,
    #[prost(string, tag = "14")]
    pub peer: String,
}

/// The plaintext of a frame: the time of its first event and its events.
#[derive(Clone, PartialEq, Message)]
pub struct FrameBody {
    #[prost(int64, tag = "1")]
    pub time: i64,
    #[prost(message, repeated, tag = "2")]
    pub events: Vec<Stored>,
}

fn code(table: &[&str], word: &str) -> u32 {
    table
        .iter()
        .position(|w| *w == word)
        .map_or(0, |i| i as u32 + 1)
}

fn word(table: &[&str], code: u32, fallback: String) -> String {
    match code {
        0 => fallback,
        n => table
            .get(n as usize - 1)
            .map_or(fallback, |w| (*w).to_string()),
    }
}

/// Stores `e` (whose time is at least `base`).
pub fn encode(e: &AuditEvent, base: i64) -> Stored {
    let (user, principal) = match e
        .principal
        .strip_prefix(e.tenant.as_str())
        .and_then(|r| r.strip_prefix('/'))
    {
        Some(u) if !e.tenant.is_empty() => (u.to_string(), String::new()),
        _ => (String::new(), e.principal.clone()),
    };
    let (role_code, action_code, outcome_code) = (
        code(ROLES, &e.role),
        code(ACTIONS, &e.action),
        code(OUTCOMES, &e.outcome),
    );
    let keep = |c: u32, s: &String| if c == 0 { s.clone() } else { String::new() };
    Stored {
        time_delta: e.time_unix_ms - base,
        tenant: e.tenant.clone(),
        user,
        principal,
        role_code,
        role: keep(role_code, &e.role),
        action_code,
        action: keep(action_code, &e.action),
        record_ids: e.record_ids.clone(),
        fields: e.fields.clone(),
        purpose: e.purpose.clone(),
        outcome_code,
        outcome: keep(outcome_code, &e.outcome),
        peer: e.peer.clone(),
    }
}

/// The event `s` stored, with its seq; hashes are the chain's to fill.
pub fn decode(s: Stored, base: i64, seq: u64) -> AuditEvent {
    let principal = if s.user.is_empty() && !s.principal.is_empty() {
        s.principal
    } else if s.user.is_empty() {
        String::new()
    } else {
        format!("{}/{}", s.tenant, s.user)
    };
    AuditEvent {
        seq,
        time_unix_ms: base + s.time_delta,
        role: word(ROLES, s.role_code, s.role),
        action: word(ACTIONS, s.action_code, s.action),
        outcome: word(OUTCOMES, s.outcome_code, s.outcome),
        tenant: s.tenant,
        principal,
        record_ids: s.record_ids,
        fields: s.fields,
        purpose: s.purpose,
        peer: s.peer,
        prev_hash: Vec::new(),
        hash: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_shape_round_trips() {
        let cases = [
            AuditEvent {
                seq: 7,
                time_unix_ms: 1_000_123,
                tenant: "clinic".into(),
                principal: "clinic/dr_a".into(),
                role: "clinician".into(),
                action: "coffre.v1.Records/GetRecord".into(),
                record_ids: vec!["p1".into()],
                fields: vec!["nir".into()],
                purpose: "care".into(),
                outcome: "ok".into(),
                peer: "127.0.0.1:5000".into(),
                ..Default::default()
            },
            AuditEvent {
                seq: 8,
                time_unix_ms: 1_000_000,
                tenant: "clinic".into(),
                principal: "other/x".into(),
                role: "weird".into(),
                action: "alert/new_kind".into(),
                outcome: "strange".into(),
                ..Default::default()
            },
            AuditEvent {
                seq: 9,
                time_unix_ms: 1_000_000,
                principal: "system/admin".into(),
                ..Default::default()
            },
        ];
        for e in cases {
            let s = encode(&e, 1_000_000);
            let back = decode(
                Stored::decode(&s.encode_to_vec()[..]).unwrap(),
                1_000_000,
                e.seq,
            );
            assert_eq!(back, e);
        }
        let s = encode(&AuditEvent::default(), 0);
        assert!(s.encode_to_vec().is_empty(), "an empty event costs nothing");
    }
}
