//! Read budgets: what stops a stolen account from copying a
//! tenant. Per principal:
//!
//! - a token bucket (`reads_per_second`, `read_burst`): every record
//!   returned, and every read of a missing id, spends one token;
//! - sliding windows of *distinct* records read in the last hour and the
//!   last day (`distinct_records_per_hour|day`): a record counts once per
//!   window however often it is read, and a slow dump under the hourly rate
//!   meets the daily one;
//! - a token bucket of FindRecords calls (`finds_per_minute`), so the blind
//!   index cannot enumerate the tenant;
//! - `lock_after_throttles` refused calls within an hour lock the account.
//!
//! Purpose `break_glass` doubles every limit for an hour and raises a
//! warning alert. The check and the spend happen under one lock per
//! principal, so parallel clients cannot overspend; each spend is applied to
//! the store before the record leaves, and the RPC's audit event is made
//! durable after it, so a restart never refills a budget.
//!
//! A read of a missing id answers like the read of a new record when the
//! distinct windows are full: the budget is no existence oracle.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use parking_lot::Mutex;
use prost::Message;

use crate::{
    accounts::{Accounts, Caller},
    audit::{Audit, Severity},
    clock::now_ms,
    config::{Config, LimitsConfig},
    crypto::{self, SecretKey},
    error::{Error, Result},
    model::{Purpose, RecordId, Role, TenantName},
    pb,
    store::{Batch, Space, Storage},
};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// How long `break_glass` doubles the budget.
const BREAK_GLASS_MS: i64 = HOUR_MS;
/// The purpose that opens emergency access.
pub const BREAK_GLASS: &str = "break_glass";

/// The budget of one role, as enforced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub reads_per_second: f64,
    pub read_burst: u32,
    pub distinct_records_per_hour: u32,
    pub distinct_records_per_day: u32,
    pub finds_per_minute: u32,
    pub lock_after_throttles: u32,
}

impl Limits {
    /// The built-in budget of a role that reads records; `None` for the
    /// others (they read nothing).
    ///
    /// Clinicians are sized for the busiest honest shift, an emergency
    /// department's (README "Sizing read budgets"): about 30 distinct
    /// patients in a peak hour, 150 over a 12-hour shift, with ×4 and ×3
    /// headroom. Services (integration engines, exports to the lab or the
    /// billing system) legitimately read far more, and are watched by the
    /// same windows at their own scale.
    pub fn default_for(role: Role) -> Option<Self> {
        match role {
            Role::Clinician => Some(Self {
                reads_per_second: 2.0,
                read_burst: 40,
                distinct_records_per_hour: 120,
                distinct_records_per_day: 400,
                finds_per_minute: 30,
                lock_after_throttles: 20,
            }),
            Role::Service => Some(Self {
                reads_per_second: 100.0,
                read_burst: 500,
                distinct_records_per_hour: 20_000,
                distinct_records_per_day: 100_000,
                finds_per_minute: 1_200,
                lock_after_throttles: 100,
            }),
            Role::Admin | Role::Auditor => None,
        }
    }

    fn overlay(mut self, c: &LimitsConfig) -> Self {
        if let Some(v) = c.reads_per_second {
            self.reads_per_second = v;
        }
        if let Some(v) = c.read_burst {
            self.read_burst = v;
        }
        if let Some(v) = c.distinct_records_per_hour {
            self.distinct_records_per_hour = v;
        }
        if let Some(v) = c.distinct_records_per_day {
            self.distinct_records_per_day = v;
        }
        if let Some(v) = c.finds_per_minute {
            self.finds_per_minute = v;
        }
        if let Some(v) = c.lock_after_throttles {
            self.lock_after_throttles = v;
        }
        self
    }

    /// Emergency access: twice every read limit (not the lock threshold).
    fn doubled(self) -> Self {
        Self {
            reads_per_second: self.reads_per_second * 2.0,
            read_burst: self.read_burst.saturating_mul(2),
            distinct_records_per_hour: self.distinct_records_per_hour.saturating_mul(2),
            distinct_records_per_day: self.distinct_records_per_day.saturating_mul(2),
            finds_per_minute: self.finds_per_minute.saturating_mul(2),
            lock_after_throttles: self.lock_after_throttles,
        }
    }
}

/// Limits per role, with per-tenant overrides, resolved from the config.
#[derive(Debug, Clone)]
pub struct Policy {
    roles: HashMap<Role, Limits>,
    tenants: HashMap<(String, Role), Limits>,
}

impl Policy {
    pub fn from_config(config: &Config) -> Self {
        let mut roles = HashMap::new();
        for role in [Role::Clinician, Role::Service] {
            let mut l = Limits::default_for(role).expect("record readers have defaults");
            if let Some(c) = config.limits.get(role.as_str()) {
                l = l.overlay(c);
            }
            roles.insert(role, l);
        }
        let mut tenants = HashMap::new();
        for (tenant, t) in &config.tenants {
            for (role, c) in &t.limits {
                // Config validation admitted only these two roles.
                if let Ok(role) = Role::parse(role) {
                    tenants.insert((tenant.clone(), role), roles[&role].overlay(c));
                }
            }
        }
        Self { roles, tenants }
    }

    /// The budget of `role` in `tenant`; `None` for roles that read nothing.
    pub fn limits(&self, tenant: &TenantName, role: Role) -> Option<Limits> {
        self.tenants
            .get(&(tenant.to_string(), role))
            .or_else(|| self.roles.get(&role))
            .copied()
    }
}

/// The budgets' time: the system clock plus an offset that only code in
/// the process can move (tests simulate a day in seconds); no RPC reaches
/// it.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    pub fn now_ms(&self) -> i64 {
        now_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// Moves this clock forward.
    pub fn advance(&self, by: std::time::Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as i64, Ordering::Relaxed);
    }
}

/// What a read spends budget on.
#[derive(Clone, Copy)]
pub enum Read<'a> {
    /// A record about to be returned.
    Record(&'a RecordId),
    /// An id that does not exist (or is another tenant's).
    Missing,
}

/// Why a spend was refused.
#[derive(Debug, Clone, Copy)]
pub enum Refused {
    /// Over a limit.
    Over(Over),
    /// The budget locked the account earlier (calls already in flight).
    Locked,
}

const LOCKED: &str = "account locked";

/// A limit that refused a spend, and when to retry.
#[derive(Debug, Clone, Copy)]
pub struct Over {
    pub limit: &'static str,
    pub retry_after_ms: u64,
}

/// The stored scalars of a principal's budget; written when they change
/// (a throttle, break-glass, an unlock), never per read.
#[derive(Clone, PartialEq, Message)]
struct StoredBudget {
    #[prost(int64, repeated, tag = "1")]
    throttles_ms: Vec<i64>,
    #[prost(int64, tag = "2")]
    break_glass_until_ms: i64,
}

/// A principal's budget as the nodes of one database share it: the
/// scalars, and how many reads were logged (one row each, `l` ‖ number,
/// from `log_from` on: the reads of the last day). Every spend is a
/// conditional write of this row, so spends on different nodes are
/// serialised; a node whose copy is behind rebuilds it from the row and
/// the log before it checks anything.
#[derive(Clone, PartialEq, Message)]
struct SharedBudget {
    #[prost(uint64, tag = "1")]
    version: u64,
    #[prost(uint64, tag = "2")]
    log_from: u64,
    #[prost(double, tag = "3")]
    tokens: f64,
    #[prost(int64, tag = "4")]
    tokens_at_ms: i64,
    #[prost(double, tag = "5")]
    find_tokens: f64,
    #[prost(int64, tag = "6")]
    finds_at_ms: i64,
    #[prost(int64, tag = "7")]
    now_ms: i64,
    #[prost(message, optional, tag = "8")]
    b: Option<StoredBudget>,
    #[prost(bool, tag = "9")]
    locked: bool,
}

/// One logged read of a shared budget: when, and which record (keyed MAC).
#[derive(Clone, PartialEq, Message)]
struct LoggedRead {
    #[prost(int64, tag = "1")]
    t: i64,
    #[prost(bytes = "vec", tag = "2")]
    tag: Vec<u8>,
}

type RecordTag = [u8; 16];

/// One principal's budget, in memory. A read writes nothing for it: what
/// a restart needs comes back from the audit trail, whose event every read
/// writes durably before its response leaves — the principal's Get, Bulk
/// and Find events of the last day give the distinct records read (`tag`,
/// a keyed MAC of the id) and the last spends. Only the rare scalars
/// (throttle times, break-glass) are stored, in `Space::Budgets` under
/// `tenant\0user\0s`. A crash can lose only spends whose event was not
/// yet durable, that is reads whose response never left.
///
/// The token buckets are not stored: after a restart each is taken as empty
/// at the last spend on it and refilled at its rate since, so a restart
/// never gives a burst that the bucket had not earned. A BulkRead counts,
/// after a restart, as if every id it asked for was returned.
struct State {
    prefix: Vec<u8>,
    b: StoredBudget,
    tokens: f64,
    tokens_at_ms: i64,
    find_tokens: f64,
    finds_at_ms: i64,
    /// The latest time seen: the windows never move backwards.
    now_ms: i64,
    /// Distinct records of the last day, oldest first, by sequence number.
    reads: BTreeMap<u64, (i64, RecordTag)>,
    by_record: HashMap<RecordTag, u64>,
    next_seq: u64,
    /// Reads with a sequence number at or above this may be within the
    /// hour; `hour_count` counts those that are.
    hour_from: u64,
    hour_count: u32,
    /// Set when the budget locked the account; cleared by an unlock.
    locked: bool,
    throttles: VecDeque<i64>,
    /// Shared budgets only: the version of the row this copy is at, the
    /// logged reads still in the day's window (number, time), and the row's
    /// bytes as this node last wrote or read them (the next write expects
    /// them, so a copy still current costs no read).
    version: u64,
    log: VecDeque<(u64, i64)>,
    row: Option<Vec<u8>>,
}

impl State {
    fn key(&self, kind: u8) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.push(kind);
        k
    }

    /// The state of `principal` from its stored scalars and its events of
    /// the last day in the trail, or a new one (buckets full) with its
    /// scalars in `batch`, so that a restart knows it is not new.
    async fn load(
        (store, trail): (&Storage, &Audit),
        principal: &str,
        tag_of: impl Fn(&str) -> RecordTag,
        prefix: Vec<u8>,
        limits: &Limits,
        now: i64,
        batch: &mut Batch,
    ) -> Result<Self> {
        let mut stored = None;
        let mut reads = Vec::new();
        let (mut last_read, mut last_find) = (i64::MIN, i64::MIN);
        for (k, _) in store
            .scan_prefix(Space::Budgets, &prefix, usize::MAX)
            .await?
        {
            match &k[prefix.len()..] {
                [b's'] => {}
                // Per-read keys of the format before reads came from the
                // trail: the trail has them too.
                _ => batch.delete(Space::Budgets, k),
            }
        }
        let mut skey = prefix.clone();
        skey.push(b's');
        if let Some(v) = store.get(Space::Budgets, &skey).await? {
            stored = Some(StoredBudget::decode(&v[..])?);
        }
        let (tenant, _) = principal.split_once('/').unwrap_or((principal, ""));
        let q = crate::audit::Query {
            tenant: tenant.to_string(),
            principal: principal.to_string(),
            since_unix_ms: now - DAY_MS,
            ..Default::default()
        };
        trail.query_each(&q, |e| {
            let t = e.time_unix_ms;
            // Reads under an export grant spent the grant, not the budget.
            let granted = e
                .fields
                .first()
                .is_some_and(|f| f == crate::grants::GRANT_MARK);
            match (e.action.as_str(), e.outcome.as_str()) {
                ("coffre.v1.Records/GetRecord" | "coffre.v1.Records/BulkRead", "ok") if granted => {
                }
                ("coffre.v1.Records/GetRecord" | "coffre.v1.Records/BulkRead", "ok") => {
                    last_read = last_read.max(t);
                    reads.extend(e.record_ids.iter().map(|id| (t, tag_of(id))));
                }
                ("coffre.v1.Records/GetRecord", "not_found") => last_read = last_read.max(t),
                ("coffre.v1.Records/FindRecords", "ok") => last_find = last_find.max(t),
                _ => {}
            }
            true
        })?;
        // Latest read of each record only.
        reads.sort_unstable_by(|a, b| b.cmp(a));
        let mut seen = std::collections::HashSet::new();
        reads.retain(|(_, tag)| seen.insert(*tag));
        Ok(Self::from_parts(
            prefix,
            stored,
            reads,
            (last_read, last_find),
            limits,
            now,
            batch,
        ))
    }

    /// A state from what a restart knows: the stored scalars (`None`: a new
    /// principal), the distinct records read in the last day (one per
    /// record) and the times of the last read and find.
    fn from_parts(
        prefix: Vec<u8>,
        stored: Option<StoredBudget>,
        mut reads: Vec<(i64, RecordTag)>,
        (last_read, last_find): (i64, i64),
        limits: &Limits,
        now: i64,
        batch: &mut Batch,
    ) -> Self {
        reads.sort_unstable();
        let known = stored.is_some();
        // Empty at the last spend we know of (full for a new principal).
        let bucket = |cap: u32, last: i64| {
            if known && last != i64::MIN {
                (0.0, last.min(now))
            } else {
                (f64::from(cap), now)
            }
        };
        let (tokens, tokens_at_ms) = bucket(limits.read_burst, last_read);
        let (find_tokens, finds_at_ms) = bucket(limits.finds_per_minute, last_find);
        let mut s = Self {
            prefix,
            b: stored.unwrap_or_default(),
            tokens,
            tokens_at_ms,
            find_tokens,
            finds_at_ms,
            now_ms: last_read.max(now),
            reads: BTreeMap::new(),
            by_record: HashMap::new(),
            next_seq: 0,
            hour_from: 0,
            hour_count: 0,
            locked: false,
            throttles: VecDeque::new(),
            version: 0,
            log: VecDeque::new(),
            row: None,
        };
        for (t, tag) in reads {
            s.reads.insert(s.next_seq, (t, tag));
            s.by_record.insert(tag, s.next_seq);
            s.next_seq += 1;
        }
        s.hour_count = s.reads.len() as u32;
        s.throttles = s.b.throttles_ms.iter().copied().collect();
        if !known {
            s.save(batch);
        }
        s
    }

    /// Moves the windows to `now` (never backwards), dropping what left
    /// them.
    fn advance(&mut self, now: i64) -> i64 {
        let now = now.max(self.now_ms);
        self.now_ms = now;
        while let Some((&seq, &(t, _))) = self.reads.range(self.hour_from..).next() {
            if t > now - HOUR_MS {
                break;
            }
            self.hour_count -= 1;
            self.hour_from = seq + 1;
        }
        while let Some((&seq, &(t, tag))) = self.reads.first_key_value() {
            if t > now - DAY_MS {
                break;
            }
            self.reads.remove(&seq);
            self.by_record.remove(&tag);
        }
        while self.throttles.front().is_some_and(|&t| t <= now - HOUR_MS) {
            self.throttles.pop_front();
        }
        now
    }

    fn limits(&self, base: Limits, now: i64) -> Limits {
        if now < self.b.break_glass_until_ms {
            base.doubled()
        } else {
            base
        }
    }

    fn refill(level: &mut f64, at: &mut i64, rate_per_ms: f64, cap: f64, now: i64) {
        let elapsed = (now - *at).max(0) as f64;
        *level = (*level + elapsed * rate_per_ms).min(cap);
        *at = now;
    }

    /// Checks and spends one read (in memory: the read's audit event is
    /// its durable trace).
    fn spend_read(&mut self, l: &Limits, tag: Option<RecordTag>, now: i64) -> Result<(), Over> {
        let rate = l.reads_per_second / 1000.0;
        Self::refill(
            &mut self.tokens,
            &mut self.tokens_at_ms,
            rate,
            f64::from(l.read_burst),
            now,
        );
        if self.tokens < 1.0 {
            return Err(Over {
                limit: "reads_per_second",
                retry_after_ms: ((1.0 - self.tokens) / rate).ceil() as u64,
            });
        }
        let known = tag.and_then(|t| self.by_record.get(&t).copied());
        let in_hour = known.is_some_and(|seq| seq >= self.hour_from);
        if !in_hour && self.hour_count >= l.distinct_records_per_hour {
            let oldest = self
                .reads
                .range(self.hour_from..)
                .next()
                .map_or(now, |(_, (t, _))| *t);
            return Err(Over {
                limit: "distinct_records_per_hour",
                retry_after_ms: (oldest + HOUR_MS - now).max(1) as u64,
            });
        }
        if known.is_none() && self.reads.len() as u64 >= u64::from(l.distinct_records_per_day) {
            let oldest = self.reads.first_key_value().map_or(now, |(_, (t, _))| *t);
            return Err(Over {
                limit: "distinct_records_per_day",
                retry_after_ms: (oldest + DAY_MS - now).max(1) as u64,
            });
        }
        self.tokens -= 1.0;
        let Some(tag) = tag else {
            return Ok(());
        };
        if let Some(old) = known {
            self.reads.remove(&old);
            if in_hour {
                self.hour_count -= 1;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.reads.insert(seq, (now, tag));
        self.by_record.insert(tag, seq);
        self.hour_count += 1;
        Ok(())
    }

    fn spend_find(&mut self, l: &Limits, now: i64) -> Result<(), Over> {
        let rate = f64::from(l.finds_per_minute) / 60_000.0;
        Self::refill(
            &mut self.find_tokens,
            &mut self.finds_at_ms,
            rate,
            f64::from(l.finds_per_minute),
            now,
        );
        if self.find_tokens < 1.0 {
            return Err(Over {
                limit: "finds_per_minute",
                retry_after_ms: ((1.0 - self.find_tokens) / rate).ceil() as u64,
            });
        }
        self.find_tokens -= 1.0;
        Ok(())
    }

    fn save(&mut self, batch: &mut Batch) {
        self.b.throttles_ms = self.throttles.iter().copied().collect();
        batch.put(Space::Budgets, self.key(b's'), self.b.encode_to_vec());
    }

    fn log_key(&self, n: u64) -> Vec<u8> {
        let mut k = self.key(b'l');
        k.extend_from_slice(&n.to_be_bytes());
        k
    }

    /// The shared row as this copy would write it.
    fn to_shared(&self) -> SharedBudget {
        let mut b = self.b.clone();
        b.throttles_ms = self.throttles.iter().copied().collect();
        SharedBudget {
            version: self.version,
            log_from: self.log.front().map_or(self.version + 1, |(n, _)| *n),
            tokens: self.tokens,
            tokens_at_ms: self.tokens_at_ms,
            find_tokens: self.find_tokens,
            finds_at_ms: self.finds_at_ms,
            now_ms: self.now_ms,
            b: Some(b),
            locked: self.locked,
        }
    }

    /// A copy rebuilt from the shared row and its logged reads.
    async fn from_shared(
        store: &Storage,
        prefix: Vec<u8>,
        sh: SharedBudget,
        limits: &Limits,
    ) -> Result<Self> {
        let mut s = Self::from_parts(
            prefix,
            Some(sh.b.clone().unwrap_or_default()),
            Vec::new(),
            (i64::MIN, i64::MIN),
            limits,
            sh.now_ms,
            &mut Batch::new(),
        );
        (s.tokens, s.tokens_at_ms) = (sh.tokens, sh.tokens_at_ms);
        (s.find_tokens, s.finds_at_ms) = (sh.find_tokens, sh.finds_at_ms);
        s.now_ms = sh.now_ms;
        s.locked = sh.locked;
        s.version = sh.version;
        let mut reads = Vec::new();
        let lprefix = s.key(b'l');
        let start = s.log_key(sh.log_from);
        let mut logged = Vec::new();
        store
            .scan_each_from(Space::Budgets, &lprefix, &start, |k, v| {
                logged.push((k.to_vec(), v.to_vec()));
                true
            })
            .await?;
        for (k, v) in logged {
            let n = u64::from_be_bytes(k[lprefix.len()..].try_into().map_err(|_| Error::DataLoss)?);
            if n > sh.version {
                break;
            }
            let r = LoggedRead::decode(&v[..])?;
            let tag: RecordTag = r.tag.as_slice().try_into().map_err(|_| Error::DataLoss)?;
            s.log.push_back((n, r.t));
            reads.push((r.t, tag));
        }
        // Latest read of each record only, oldest first.
        reads.sort_unstable_by(|a, b| b.cmp(a));
        let mut seen = std::collections::HashSet::new();
        reads.retain(|(_, tag)| seen.insert(*tag));
        reads.sort_unstable();
        for (t, tag) in reads {
            s.reads.insert(s.next_seq, (t, tag));
            s.by_record.insert(tag, s.next_seq);
            s.next_seq += 1;
        }
        s.hour_from = 0;
        s.hour_count = s.reads.len() as u32;
        s.advance(sh.now_ms);
        Ok(s)
    }
}

/// The read budgets of every principal.
pub struct Budgets {
    store: Storage,
    audit: Arc<Audit>,
    accounts: Arc<Accounts>,
    tag_key: SecretKey,
    policy: Policy,
    clock: Clock,
    states: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<State>>>>>,
    /// Off only in benchmarks that measure what the check costs.
    enforce: std::sync::atomic::AtomicBool,
}

impl Budgets {
    pub fn new(
        store: Storage,
        audit: Arc<Audit>,
        accounts: Arc<Accounts>,
        tag_key: SecretKey,
        policy: Policy,
    ) -> Self {
        Self {
            store,
            audit,
            accounts,
            tag_key,
            policy,
            clock: Clock::default(),
            states: Mutex::new(HashMap::new()),
            enforce: std::sync::atomic::AtomicBool::new(true),
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Turns the budgets off (or on again), for benchmarks that compare the
    /// read path with and without them. Nothing in the server calls it.
    pub fn set_enforced(&self, on: bool) {
        self.enforce.store(on, Ordering::Relaxed);
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn slot(&self, caller: &Caller) -> Arc<tokio::sync::Mutex<Option<State>>> {
        self.states
            .lock()
            .entry(caller.principal())
            .or_default()
            .clone()
    }

    fn prefix(caller: &Caller) -> Vec<u8> {
        let mut p = caller.tenant.as_str().as_bytes().to_vec();
        p.push(0);
        p.extend_from_slice(caller.username.as_str().as_bytes());
        p.push(0);
        p
    }

    /// Runs `f` on the caller's state, loaded and moved to now, and applies
    /// what it wrote. `None` when the role has no budget (it reads nothing).
    async fn with_state<T>(
        &self,
        caller: &Caller,
        mut f: impl FnMut(&mut State, Limits, i64, &mut Batch) -> T,
    ) -> Result<Option<T>> {
        let Some(base) = self.policy.limits(&caller.tenant, caller.role) else {
            return Ok(None);
        };
        let slot = self.slot(caller);
        let mut guard = slot.lock().await;
        if self.store.is_shared() {
            return self.with_shared_state(caller, base, &mut guard, f).await;
        }
        let now = self.clock.now_ms();
        let mut batch = Batch::new();
        if guard.is_none() {
            let state = State::load(
                (&self.store, &self.audit),
                &caller.principal(),
                |id| self.tag_str(id),
                Self::prefix(caller),
                &base,
                now,
                &mut batch,
            )
            .await?;
            *guard = Some(state);
        }
        let state = guard.as_mut().expect("loaded just above");
        let now = state.advance(now);
        let limits = state.limits(base, now);
        let out = f(state, limits, now, &mut batch);
        // Only the rare scalars (a throttle, break-glass, a first load):
        // applied before the RPC's audit event is flushed, so durable when
        // the response leaves. A read adds nothing here.
        if !batch.is_empty() {
            self.store.apply_each(batch).await?;
        }
        Ok(Some(out))
    }

    /// [`Budgets::with_state`] where several nodes share the budget: the
    /// shared row is read, this copy rebuilt if another node spent since,
    /// `f` runs, and what it changed is written expecting the row as read;
    /// a node that lost the race starts again from the new row. One budget
    /// however many nodes a principal's calls are spread over.
    async fn with_shared_state<T>(
        &self,
        caller: &Caller,
        base: Limits,
        guard: &mut Option<State>,
        mut f: impl FnMut(&mut State, Limits, i64, &mut Batch) -> T,
    ) -> Result<Option<T>> {
        let prefix = Self::prefix(caller);
        let mut vkey = prefix.clone();
        vkey.push(b'v');
        for _ in 0..256 {
            let now = self.clock.now_ms();
            // A copy that wrote last is taken for current: its write says
            // whether it was (a conflict sends it back to the row).
            let cached = guard.as_ref().and_then(|st| st.row.clone());
            let fresh = cached.is_none();
            let raw = match cached {
                Some(row) => Some(row),
                None => self.store.get(Space::Budgets, &vkey).await?,
            };
            if fresh {
                let sh = raw.as_deref().map(SharedBudget::decode).transpose()?;
                *guard = Some(match sh {
                    Some(sh) => {
                        let mut st =
                            State::from_shared(&self.store, prefix.clone(), sh, &base).await?;
                        st.row = raw.clone();
                        st
                    }
                    None => {
                        let mut st = State::from_parts(
                            prefix.clone(),
                            None,
                            Vec::new(),
                            (i64::MIN, i64::MIN),
                            &base,
                            now,
                            &mut Batch::new(),
                        );
                        st.version = 0;
                        st
                    }
                });
            }
            let state = guard.as_mut().expect("loaded just above");
            let now = state.advance(now);
            let limits = state.limits(base, now);
            let before = state.to_shared();
            let first_new = state.next_seq;
            let mut batch = Batch::new();
            let out = f(state, limits, now, &mut batch);
            let new_reads: Vec<(i64, RecordTag)> =
                state.reads.range(first_new..).map(|(_, r)| *r).collect();
            if new_reads.is_empty() && state.to_shared() == before && raw.is_some() {
                return Ok(Some(out));
            }
            // The reads that left the day's window leave the log.
            while state.log.front().is_some_and(|(_, t)| *t <= now - DAY_MS) {
                let (n, _) = state.log.pop_front().expect("checked");
                batch.delete(Space::Budgets, state.log_key(n));
            }
            for (t, tag) in new_reads {
                state.version += 1;
                let n = state.version;
                state.log.push_back((n, t));
                batch.put(
                    Space::Budgets,
                    state.log_key(n),
                    LoggedRead {
                        t,
                        tag: tag.to_vec(),
                    }
                    .encode_to_vec(),
                );
            }
            if state.to_shared().version == before.version {
                // Scalars only: the version still moves, so that other
                // nodes see the change.
                state.version += 1;
            }
            let row = state.to_shared().encode_to_vec();
            batch.expect(Space::Budgets, vkey.clone(), raw);
            batch.put(Space::Budgets, vkey.clone(), row.clone());
            match self.store.apply(batch).await {
                Ok(()) => {
                    state.row = Some(row);
                    return Ok(Some(out));
                }
                Err(crate::store::StorageError::Conflict) => {
                    // Another node went first: this copy is stale.
                    *guard = None;
                }
                Err(e) => {
                    *guard = None;
                    return Err(e.into());
                }
            }
        }
        Err(Error::Unavailable(crate::store::StorageError::Busy(
            "a read budget changed under too many concurrent spends",
        )))
    }

    /// Call once per read RPC with its purpose, before anything else of the
    /// call: `break_glass` opens an hour of doubled budget (and a warning
    /// alert) if none is open.
    pub async fn begin(&self, caller: &Caller, purpose: &Purpose) -> Result<()> {
        if !self.enforce.load(Ordering::Relaxed) {
            return Ok(());
        }
        if purpose.as_str() != BREAK_GLASS {
            // Load the budget now, before this call's own event is in the
            // trail: a state rebuilt from the trail after that event would
            // count this call's reads as already spent.
            self.with_state(caller, |_, _, _, _| ()).await?;
            return Ok(());
        }
        let opened = self
            .with_state(caller, |s, _, now, b| {
                if now < s.b.break_glass_until_ms {
                    false
                } else {
                    s.b.break_glass_until_ms = now + BREAK_GLASS_MS;
                    s.save(b);
                    true
                }
            })
            .await?;
        if opened == Some(true) {
            self.audit
                .alert(
                    Severity::Warning,
                    "break_glass",
                    caller.tenant.as_str(),
                    &caller.principal(),
                    "emergency access: read budget doubled for 1 h; review required".into(),
                )
                .await?;
        }
        Ok(())
    }

    /// Spends one read, or says why not. Cheap (memory only, once the
    /// budget is loaded): the read paths call it per record.
    pub async fn spend_read(&self, caller: &Caller, read: Read<'_>) -> Result<Result<(), Refused>> {
        if !self.enforce.load(Ordering::Relaxed) {
            return Ok(Ok(()));
        }
        let tag = match read {
            Read::Record(id) => Some(self.tag(id)),
            Read::Missing => None,
        };
        Ok(self
            .with_state(caller, |s, l, now, _| {
                if s.locked {
                    return Err(Refused::Locked);
                }
                s.spend_read(&l, tag, now).map_err(Refused::Over)
            })
            .await?
            .unwrap_or(Ok(())))
    }

    /// Spends one FindRecords call.
    pub async fn spend_find(&self, caller: &Caller) -> Result<Result<(), Refused>> {
        if !self.enforce.load(Ordering::Relaxed) {
            return Ok(Ok(()));
        }
        Ok(self
            .with_state(caller, |s, l, now, _| {
                if s.locked {
                    return Err(Refused::Locked);
                }
                s.spend_find(&l, now).map_err(Refused::Over)
            })
            .await?
            .unwrap_or(Ok(())))
    }

    /// Records a refused call: an audit event naming the limit, a warning
    /// alert on the first in the hour, and, at `lock_after_throttles`, the
    /// lock and a critical alert. Returns the error the call answers.
    pub async fn throttled(&self, caller: &Caller, action: &str, refused: Refused) -> Error {
        let over = match refused {
            Refused::Locked => return Error::PermissionDenied(LOCKED),
            Refused::Over(o) => o,
        };
        match self.count_throttle(caller, action, over).await {
            Ok(true) => Error::PermissionDenied(LOCKED),
            Ok(false) => Error::OverBudget {
                limit: over.limit,
                retry_after_ms: over.retry_after_ms,
            },
            Err(e) => e,
        }
    }

    async fn count_throttle(&self, caller: &Caller, action: &str, over: Over) -> Result<bool> {
        let counted = self
            .with_state(caller, |s, l, now, b| {
                s.throttles.push_back(now);
                s.save(b);
                let n = s.throttles.len() as u32;
                let lock = n >= l.lock_after_throttles && !s.locked;
                if lock {
                    s.locked = true;
                }
                (n, lock, l.lock_after_throttles)
            })
            .await?;
        let Some((n, lock, threshold)) = counted else {
            return Ok(false);
        };
        let principal = caller.principal();
        let tenant = caller.tenant.as_str();
        self.audit.stats().throttle(caller.role.as_str());
        self.audit
            .record(pb::AuditEvent {
                tenant: tenant.into(),
                principal: principal.clone(),
                role: caller.role.as_str().into(),
                action: "budget/throttled".into(),
                purpose: format!("{} ({action})", over.limit),
                outcome: "resource_exhausted".into(),
                ..Default::default()
            })
            .await?;
        if n == 1 {
            self.audit
                .alert(
                    Severity::Warning,
                    "budget_exceeded",
                    tenant,
                    &principal,
                    format!("read budget exceeded ({}); throttled", over.limit),
                )
                .await?;
        }
        if lock {
            self.audit
                .stats()
                .lock(crate::stats::LockReason::budget, caller.role.as_str());
            self.lock(
                caller,
                "budget_lockout",
                format!("{n} throttled calls within an hour (limit {threshold}); account locked"),
            )
            .await?;
        }
        Ok(lock)
    }

    /// Locks the caller's account (durably, sessions revoked) and raises a
    /// critical alert: the end of a budget, or a honeytoken read.
    pub async fn lock(&self, caller: &Caller, kind: &str, detail: String) -> Result<()> {
        let _ = self
            .with_state(caller, |s, _, _, _| s.locked = true)
            .await?;
        let newly = self
            .accounts
            .lock_out(&caller.tenant, &caller.username, kind)
            .await?;
        if newly {
            self.audit
                .alert(
                    Severity::Critical,
                    kind,
                    caller.tenant.as_str(),
                    &caller.principal(),
                    detail,
                )
                .await?;
        }
        Ok(())
    }

    /// After an administrator's unlock: the principal may read again, and
    /// its past throttles no longer count towards a new lock. Its windows
    /// stay: an unlock does not refill a budget.
    pub async fn unlocked(&self, tenant: &TenantName, username: &str) -> Result<()> {
        let key = format!("{tenant}/{username}");
        let slot = self.states.lock().get(&key).cloned();
        if self.store.is_shared() {
            return self.unlocked_shared(tenant, username, slot).await;
        }
        if let Some(slot) = slot
            && let Some(s) = slot.lock().await.as_mut()
        {
            s.locked = false;
            s.throttles.clear();
            let mut b = Batch::new();
            s.save(&mut b);
            self.store.apply_each(b).await?;
            return Ok(());
        }
        // Not in memory: clear the stored throttles.
        let mut k = tenant.as_str().as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(username.as_bytes());
        k.extend_from_slice(b"\0s");
        if let Some(v) = self.store.get(Space::Budgets, &k).await? {
            let mut b = StoredBudget::decode(&v[..])?;
            b.throttles_ms.clear();
            let mut batch = Batch::new();
            batch.put(Space::Budgets, k, b.encode_to_vec());
            self.store.apply_each(batch).await?;
        }
        Ok(())
    }

    /// [`Budgets::unlocked`] on a budget the nodes share: the row is
    /// changed (conditionally) and this node's copy dropped.
    async fn unlocked_shared(
        &self,
        tenant: &TenantName,
        username: &str,
        slot: Option<Arc<tokio::sync::Mutex<Option<State>>>>,
    ) -> Result<()> {
        let mut guard = match &slot {
            Some(s) => Some(s.lock().await),
            None => None,
        };
        if let Some(g) = guard.as_mut() {
            **g = None;
        }
        let mut vkey = tenant.as_str().as_bytes().to_vec();
        vkey.push(0);
        vkey.extend_from_slice(username.as_bytes());
        vkey.extend_from_slice(b"\0v");
        for _ in 0..256 {
            let Some(raw) = self.store.get(Space::Budgets, &vkey).await? else {
                return Ok(());
            };
            let mut sh = SharedBudget::decode(&raw[..])?;
            sh.locked = false;
            if let Some(b) = sh.b.as_mut() {
                b.throttles_ms.clear();
            }
            sh.version += 1;
            let mut batch = Batch::new();
            batch.expect(Space::Budgets, vkey.clone(), Some(raw));
            batch.put(Space::Budgets, vkey.clone(), sh.encode_to_vec());
            match self.store.apply(batch).await {
                Ok(()) => return Ok(()),
                Err(crate::store::StorageError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Unavailable(crate::store::StorageError::Busy(
            "a read budget changed under too many concurrent spends",
        )))
    }

    /// Drops the in-memory budgets of a tenant's principals (shredded; the
    /// stored ones are deleted with the tenant's data).
    pub fn forget_tenant(&self, tenant: &TenantName) {
        let prefix = format!("{tenant}/");
        self.states.lock().retain(|k, _| !k.starts_with(&prefix));
    }

    fn tag(&self, id: &RecordId) -> RecordTag {
        self.tag_str(id.as_str())
    }

    fn tag_str(&self, id: &str) -> RecordTag {
        let mac = crypto::hmac_sha256(&self.tag_key, id.as_bytes());
        mac[..16].try_into().expect("16 of 32 bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            reads_per_second: 1.0,
            read_burst: 5,
            distinct_records_per_hour: 3,
            distinct_records_per_day: 5,
            finds_per_minute: 2,
            lock_after_throttles: 3,
        }
    }

    fn state() -> State {
        // A new principal: the state starts full and lives in memory after.
        State::from_parts(
            b"t\0u\0".to_vec(),
            None,
            Vec::new(),
            (i64::MIN, i64::MIN),
            &limits(),
            0,
            &mut Batch::new(),
        )
    }

    fn tag(i: u8) -> Option<RecordTag> {
        Some([i; 16])
    }

    #[test]
    fn rereads_count_once_per_window_and_windows_slide() {
        let mut s = state();
        let l = limits();
        let mut now = s.advance(0);
        for i in 0..3 {
            s.spend_read(&l, tag(i), now).unwrap();
        }
        // A fourth distinct record is over the hour; a re-read is not.
        assert_eq!(
            s.spend_read(&l, tag(3), now).unwrap_err().limit,
            "distinct_records_per_hour"
        );
        s.spend_read(&l, tag(0), now).unwrap();
        now = s.advance(HOUR_MS + 1);
        // Record 0 was re-read at 0, so all three left the hour together.
        assert_eq!(s.hour_count, 0);
        s.spend_read(&l, tag(3), now).unwrap();
        s.spend_read(&l, tag(4), now).unwrap();
        assert_eq!(
            s.spend_read(&l, tag(5), now).unwrap_err().limit,
            "distinct_records_per_day"
        );
        // A missing id is refused like a new record once the day is full.
        assert_eq!(
            s.spend_read(&l, None, now).unwrap_err().limit,
            "distinct_records_per_day"
        );
        now = s.advance(DAY_MS + 1);
        assert_eq!(s.reads.len(), 2);
        s.spend_read(&l, tag(5), now).unwrap();
    }

    #[test]
    fn the_example_config_documents_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/coffre.toml");
        let config = Config::load_with_env(Some(&path), |_| None).unwrap();
        let policy = Policy::from_config(&config);
        let clinic = TenantName::parse("clinic").unwrap();
        for role in [Role::Clinician, Role::Service] {
            assert_eq!(policy.limits(&clinic, role), Limits::default_for(role));
        }
        assert_eq!(policy.limits(&clinic, Role::Admin), None);
        let overridden = Config::load_with_env(Some(&path), |k| {
            (k == "COFFRE_LIMITS_CLINICIAN_READ_BURST").then(|| "7".to_string())
        })
        .unwrap();
        let l = Policy::from_config(&overridden)
            .limits(&clinic, Role::Clinician)
            .unwrap();
        assert_eq!(l.read_burst, 7);
    }

    #[test]
    fn token_bucket_refills_at_the_rate() {
        let mut s = state();
        let l = Limits {
            distinct_records_per_hour: 100,
            distinct_records_per_day: 100,
            ..limits()
        };
        for i in 0..5 {
            s.spend_read(&l, tag(i), 0).unwrap();
        }
        let over = s.spend_read(&l, tag(9), 0).unwrap_err();
        assert_eq!(over.limit, "reads_per_second");
        assert_eq!(over.retry_after_ms, 1000);
        s.spend_read(&l, tag(9), 1000).unwrap();
        assert!(s.spend_find(&l, 1000).is_ok());
        assert!(s.spend_find(&l, 1000).is_ok());
        assert_eq!(
            s.spend_find(&l, 1000).unwrap_err().limit,
            "finds_per_minute"
        );
    }
}
