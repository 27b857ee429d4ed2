//! Administrative operations that touch several components at once and run
//! from the CLI (offline) or, later, from an RPC: the core of each, apart
//! from how it is asked for and how its result is printed.
//!
//! - [`rotate_master`]: re-wrap every key under a new master key, offline,
//!   and say so in the trail.
//! - [`backup`]: a consistent online backup, streamed (`Admin/Backup`) or
//!   written on a schedule into `backup.dir`.
//! - [`restore`]: offline, with the master key: verify a backup file whole,
//!   restore one into an empty data directory.
//! - [`scrub`]: check every stored record whole and against the trail,
//!   online and paced.

pub mod backup;
pub mod restore;
mod rotate_master;
pub mod scrub;

pub use rotate_master::{MasterRotated, rotate_master};

/// Why an operation did not run. Messages name paths and counts, never a
/// key or a value.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// A server holds the data directory.
    #[error("{0}: stop the server first")]
    Busy(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    #[error(transparent)]
    Store(#[from] crate::store::StorageError),
    #[error(transparent)]
    Core(#[from] crate::error::Error),
}
