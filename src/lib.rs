//! Coffre: an encrypted-at-rest gRPC vault for patient records.
//!
//! Every field is sealed on its own under per-tenant keys, every password is
//! an Argon2id hash, and no role but `clinician` and `service` reads a
//! record. `README.md` says how to run it; `docs/` holds the threat model,
//! the API and status codes, and how to operate it.
//!
//! # Layout
//!
//! - [`crypto`]: primitives — keys that zeroize and never print, AES-256-GCM
//!   sealing with bound context, the field ciphertext format, HMAC, HKDF.
//! - [`keys`]: the key hierarchy — master key file, the key store file of
//!   wrapped keys, tenant key versions and their encryption counts,
//!   rotation, retirement, shredding, master-key rotation.
//! - [`shredlist`]: the tenants shredded under a master key, kept beside it
//!   and checked at every open and restore.
//! - [`store`]: the storage interface (key spaces, atomic batches, group
//!   commit, streaming scans, the consistent cut, conditional batches) and
//!   one file per backend (`sled` the embedded default, `postgres` for
//!   several nodes); its docs list the state each node keeps in memory and
//!   how it is shared across nodes.
//! - [`clock`]: the wall clock, a leaf every module may use (following the
//!   database's when nodes share one).
//! - [`cluster`]: nodes sharing one PostgreSQL database — heartbeats, one
//!   policy of limits, key-job leases, following what other nodes changed.
//! - [`model`]: parsed input — names, ids, purposes, records within the
//!   limits; roles; password policy.
//! - [`accounts`]: principals, Argon2id hashing off the runtime, login with
//!   lockout and second factor, sessions and bearer tokens, OIDC bindings.
//! - [`oidc`]: trusted OpenID Connect providers, their cached signing keys
//!   (JWKS), and the checks an id token passes.
//! - [`totp`]: the TOTP second factor (RFC 6238) and recovery codes.
//! - [`approvals`]: the two-person rule — requests, approvals, expiry.
//! - [`grants`]: export grants — reads beyond a budget for one purpose.
//! - [`tenants`], [`records`]: the record core — field encryption, blind
//!   index, secrets.
//! - [`budgets`]: read budgets per principal — token bucket, distinct-record
//!   windows, find rate, throttle lockout, break-glass.
//! - [`honeytokens`]: canary records whose read locks the reader.
//! - [`audit`]: the HMAC-chained, fail-closed audit trail — its own
//!   encrypted, segmented log with keyed-hash indexes (`audit/log.rs`), the
//!   compact event codec, format-1 migration, retention — and its mirror.
//! - [`backup`]: the backup file format — a clear manifest, encrypted
//!   frames of entries, one MAC over the whole file; written and read in
//!   constant memory.
//! - [`vault`]: opens everything, bootstraps an empty data directory, and
//!   holds the operations that join several components (a read under its
//!   budget, an unlock that clears throttles, a key rotation made durable).
//! - [`ops`]: administrative operations run from the CLI (master-key
//!   rotation), later shared with RPCs.
//! - [`api`]: the gRPC services, one file each and thin; the gate in
//!   `mod.rs` (authorization, audit, stream caps, refused-call limits, the
//!   one error→status mapping); the front layer that audits requests tonic
//!   cannot decode (`front.rs`).
//! - [`server`]: `run(vault, options, listener, shutdown)` — health,
//!   reflection, the accept loop (TLS handshakes off it), the watchers.
//! - [`tls`]: the gRPC port's TLS (rustls): certificate, key, client CA and
//!   a deny list of client serials, swapped whole on reload.
//! - [`stats`]: what the core counts as it works (appends, throttles,
//!   locks, honeytoken hits, failed line writes), updated where it happens.
//! - [`metrics`]: the Prometheus registry (gRPC series recorded by the
//!   front layer, the core's stats, gauges read at scrape) and the probe
//!   listener serving `/metrics` and health.
//! - [`connections`]: what a slow, idle or silent client may hold: idle and
//!   handshake timeouts per connection, calls counted per connection.
//! - [`config`]: the TOML file and its `COFFRE_*` overrides.
//! - [`report`]: the auditors' period report, computed from audit events.
//! - [`cli`]: the `coffre` command line, one file per command group and a
//!   client helper; the load generator is private to it (the binary only
//!   parses and calls).
//! - [`sample`]: synthetic patient records for the load generator, the
//!   benchmarks and the tests.
//! - [`error`]: the core's error type.

#![forbid(unsafe_code)]

pub mod accounts;
pub mod api;
pub mod approvals;
pub mod audit;
pub mod backup;
pub mod budgets;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod crypto;
pub mod error;
pub mod grants;
pub mod honeytokens;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod oidc;
pub mod ops;
pub mod records;
pub mod report;
pub mod sample;
pub mod server;
pub mod shredlist;
pub mod stats;
pub mod store;
pub mod tenants;
pub mod tls;
pub mod totp;
pub mod vault;

/// Code generated from `proto/coffre/v1/*.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("coffre.v1");
    /// The encoded descriptors, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("coffre_descriptor");

    /// These messages carry passwords, tokens or field values: their Debug
    /// names the type only (build.rs skips the derived one).
    macro_rules! redacted_debug {
        ($($t:ident),* $(,)?) => {$(
            impl std::fmt::Debug for $t {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str(concat!(stringify!($t), " { [redacted] }"))
                }
            }
        )*};
    }
    redacted_debug!(
        LoginRequest,
        LoginResponse,
        ChangePasswordRequest,
        CreatePrincipalRequest,
        Record,
        PutRecordRequest,
        GetRecordResponse,
        FindRecordsRequest,
        SetSecretRequest,
        VerifySecretRequest,
    );
}
