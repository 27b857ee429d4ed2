//! The core's error: what a request can fail with, whatever the transport.
//! `service` maps it to `tonic::Status` in one place. Messages are written
//! for clients and never carry a field value, password, token or key.

use crate::{crypto::CryptoError, keys::KeyError, store::StorageError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Missing, expired or revoked token; bad credentials (one message for
    /// an unknown user and a wrong password).
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// Role not allowed, or account locked.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// Missing, or another tenant's: the same answer, so no existence oracle.
    #[error("not found")]
    NotFound,
    /// Bad name, oversize input, missing purpose. The message names the rule
    /// broken and at most a field *name*, never a value.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The two-person rule: a second admin must approve this request (its
    /// id) before the same call succeeds. FAILED_PRECONDITION.
    #[error("approval required: {0}")]
    ApprovalRequired(String),
    /// A read budget is spent: how long until the next read may succeed.
    #[error("read budget exhausted ({limit}); retry in {} s", retry_after_ms.div_ceil(1000))]
    OverBudget {
        limit: &'static str,
        retry_after_ms: u64,
    },
    /// The principal has `connections.max_streams_per_principal` calls in
    /// progress already. Not a budget throttle: it never locks.
    #[error("too many concurrent calls for this account; retry when one ends")]
    TooManyCalls,
    /// The peer made too many refused calls (bad tokens, malformed
    /// requests, failed logins) in too short a time.
    #[error("too many refused calls from this address; slow down")]
    TooManyRefused,
    /// Stored ciphertext or a stored key failed authentication.
    #[error("stored data failed authentication")]
    DataLoss,
    /// Storage cannot write (or read): fail closed.
    #[error("storage unavailable")]
    Unavailable(#[source] StorageError),
    #[error("internal error")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<StorageError> for Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Corrupt(_) => Error::DataLoss,
            // Not a failure of storage: health must not hear of it.
            StorageError::Busy(why) => Error::FailedPrecondition(why.into()),
            other => Error::Unavailable(other),
        }
    }
}

impl From<CryptoError> for Error {
    fn from(_: CryptoError) -> Self {
        Error::DataLoss
    }
}

impl From<KeyError> for Error {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Storage(s) => s.into(),
            KeyError::Tampered => Error::DataLoss,
            KeyError::Shredded => Error::FailedPrecondition(e.to_string()),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<crate::keys::RetireError> for Error {
    fn from(e: crate::keys::RetireError) -> Self {
        use crate::keys::RetireError as R;
        match e {
            R::Key(k) => k.into(),
            R::Unknown => Error::NotFound,
            other => Error::FailedPrecondition(other.to_string()),
        }
    }
}

impl From<crate::ops::OpsError> for Error {
    fn from(e: crate::ops::OpsError) -> Self {
        use crate::ops::OpsError;
        match e {
            OpsError::Core(e) => e,
            OpsError::Store(e) => e.into(),
            OpsError::Keys(e) => e.into(),
            OpsError::Busy(m) | OpsError::Refused(m) => Error::FailedPrecondition(m),
        }
    }
}

impl From<prost::DecodeError> for Error {
    fn from(_: prost::DecodeError) -> Self {
        Error::DataLoss
    }
}
