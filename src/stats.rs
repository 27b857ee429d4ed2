//! What the core counts as it works: audit appends, throttles, locks,
//! honeytoken hits, failed writes to the mirror and alert files. The
//! components update these as events happen; `metrics` registers them and
//! serves them to Prometheus. Labels are closed sets (a role, a reason, a
//! file): never a record id, a principal or a value.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
};

/// Upper bounds of the audit append latency histogram, in seconds: a group
/// commit is one fdatasync (sub-millisecond to tens of ms) or one database
/// round trip.
pub const APPEND_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Upper bounds of the group-commit size histogram, in events.
pub const GROUP_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Role {
    clinician,
    service,
    admin,
    auditor,
    other,
}

impl Role {
    const ALL: [Role; 5] = [
        Role::clinician,
        Role::service,
        Role::admin,
        Role::auditor,
        Role::other,
    ];

    pub fn of(role: &str) -> Self {
        match role {
            "clinician" => Role::clinician,
            "service" => Role::service,
            "admin" => Role::admin,
            "auditor" => Role::auditor,
            _ => Role::other,
        }
    }
}

/// Why an account was locked.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LockReason {
    /// Too many throttled reads (the read budget).
    budget,
    /// Too many failed logins.
    login,
    /// A honeytoken was read.
    honeytoken,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LineFile {
    mirror,
    alert,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: Role,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LockLabels {
    pub reason: LockReason,
    pub role: Role,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabels {
    pub file: LineFile,
}

/// Why an OpenID Connect token was refused (`reason=` in the trail).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// A step of a two-person request: `requested`, `granted`, `denied`,
/// `used`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub step: &'static str,
}

/// The steps of a two-person request, as counted.
pub const APPROVAL_STEPS: [&str; 4] = ["requested", "granted", "denied", "used"];

/// The core's counters. Cheap to update (atomics); cloned handles share
/// their values.
pub struct Stats {
    /// From an event handed to the trail to its durable answer.
    pub audit_append_seconds: Histogram,
    /// Appends answered with an error (the call fails closed).
    pub audit_append_failures: Counter,
    /// Events per group commit (one write and one sync each).
    pub audit_group_commit_events: Histogram,
    /// Lines the mirror or alert file did not take.
    pub line_write_failures: Family<FileLabels, Counter>,
    pub budget_throttles: Family<RoleLabels, Counter>,
    pub locks: Family<LockLabels, Counter>,
    pub login_failures: Counter,
    pub honeytoken_hits: Counter,
    /// Id tokens refused, by reason.
    pub oidc_refusals: Family<ReasonLabels, Counter>,
    /// Two-person requests, by step.
    pub approvals: Family<StepLabels, Counter>,
    /// Records read (or reserved) beyond a budget under an export grant.
    pub export_grant_records: Counter,
}

impl Default for Stats {
    fn default() -> Self {
        let s = Self {
            audit_append_seconds: Histogram::new(APPEND_BUCKETS),
            audit_append_failures: Counter::default(),
            audit_group_commit_events: Histogram::new(GROUP_BUCKETS),
            line_write_failures: Family::default(),
            budget_throttles: Family::default(),
            locks: Family::default(),
            login_failures: Counter::default(),
            honeytoken_hits: Counter::default(),
            oidc_refusals: Family::default(),
            approvals: Family::default(),
            export_grant_records: Counter::default(),
        };
        // Every series of the closed label sets exists from the start at 0,
        // so that a rule's rate() or increase() sees the first event.
        for role in Role::ALL {
            let _ = s
                .budget_throttles
                .get_or_create(&RoleLabels { role: role.clone() });
            for reason in [
                LockReason::budget,
                LockReason::login,
                LockReason::honeytoken,
            ] {
                let _ = s.locks.get_or_create(&LockLabels {
                    reason,
                    role: role.clone(),
                });
            }
        }
        for file in [LineFile::mirror, LineFile::alert] {
            let _ = s.line_write_failures.get_or_create(&FileLabels { file });
        }
        for r in crate::oidc::Refusal::ALL {
            let _ = s
                .oidc_refusals
                .get_or_create(&ReasonLabels { reason: r.as_str() });
        }
        for step in APPROVAL_STEPS {
            let _ = s.approvals.get_or_create(&StepLabels { step });
        }
        s
    }
}

impl Stats {
    pub fn lock(&self, reason: LockReason, role: &str) {
        self.locks
            .get_or_create(&LockLabels {
                reason,
                role: Role::of(role),
            })
            .inc();
    }

    pub fn throttle(&self, role: &str) {
        self.budget_throttles
            .get_or_create(&RoleLabels {
                role: Role::of(role),
            })
            .inc();
    }

    pub fn oidc_refused(&self, reason: crate::oidc::Refusal) {
        self.oidc_refusals
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a two-person step; `step` is one of [`APPROVAL_STEPS`].
    pub fn approval(&self, step: &'static str) {
        self.approvals.get_or_create(&StepLabels { step }).inc();
    }

    pub fn line_failed(&self, file: LineFile) {
        self.line_write_failures
            .get_or_create(&FileLabels { file })
            .inc();
    }

    /// Failed mirror and alert writes so far.
    pub fn line_failures(&self) -> u64 {
        [LineFile::mirror, LineFile::alert]
            .into_iter()
            .map(|file| {
                self.line_write_failures
                    .get_or_create(&FileLabels { file })
                    .get()
            })
            .sum()
    }
}
