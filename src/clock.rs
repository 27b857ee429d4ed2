//! The wall clock, in one place: every module that stamps a time (the
//! trail, sessions, budgets, lockouts) reads it here.
//!
//! Several nodes on one database follow the database's clock: a node
//! measures its offset from it ([`set_offset_ms`], refreshed every few
//! seconds), so that sessions, budgets and lockouts stamped on different
//! nodes agree however their clocks drift. (The trail's events are stamped
//! by the database itself.) One node alone keeps an offset of zero.

use std::sync::atomic::{AtomicI64, Ordering};

static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Milliseconds since the Unix epoch (0 if the clock is before it), on the
/// shared database's clock when there is one.
pub fn now_ms() -> i64 {
    local_ms() + OFFSET_MS.load(Ordering::Relaxed)
}

/// This machine's own clock.
pub fn local_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Follows a clock `offset_ms` ahead of this machine's.
pub fn set_offset_ms(offset_ms: i64) {
    OFFSET_MS.store(offset_ms, Ordering::Relaxed);
}
