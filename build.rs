//! Generates the gRPC code from `proto/` with protox, a pure-Rust protobuf
//! compiler, so that a build needs no system `protoc` (nor a vendored binary
//! that must match the host).

use std::{env, path::PathBuf};

/// Keep in step with `redacted_debug!` in src/lib.rs.
const SECRET_MESSAGES: &[&str] = &[
    "LoginRequest",
    "LoginResponse",
    "ChangePasswordRequest",
    "CreatePrincipalRequest",
    "Record",
    "PutRecordRequest",
    "GetRecordResponse",
    "FindRecordsRequest",
    "SetSecretRequest",
    "VerifySecretRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/coffre/v1/auth.proto",
        "proto/coffre/v1/records.proto",
        "proto/coffre/v1/admin.proto",
        "proto/coffre/v1/audit.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Reflection serves the same descriptors the code was generated from.
    std::fs::write(
        out.join("coffre_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Messages that carry passwords, tokens or field values get a
        // redacting Debug (src/lib.rs) instead of the derived one.
        .skip_debug(SECRET_MESSAGES.iter().map(|m| format!(".coffre.v1.{m}")))
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
