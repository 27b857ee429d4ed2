//! A data directory written by the previous release (records sealed field
//! by field only, format 1) is migrated in place when the vault opens:
//! every record is then sealed as a whole, a migration that fails half-way
//! finishes at the next start, and nothing is misread.

mod common;

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use coffre::{
    pb,
    store::{Backend, FaultyBackend, Space},
    vault::Vault,
};
use common::*;
use tonic::Code;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format1");

/// A copy of the format-1 data directory and its key under `root`.
fn copy_fixture(root: &Path) {
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    for f in ["conf", "db", "keyring"] {
        std::fs::copy(Path::new(FIXTURE).join("data").join(f), data.join(f)).unwrap();
    }
    let keys = root.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let key = keys.join("master.key");
    std::fs::copy(Path::new(FIXTURE).join("master-key"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
}

async fn open(config: &coffre::config::Config) -> Result<(Arc<Vault>, u64), String> {
    for _ in 0..100 {
        match Vault::open(config, None).await {
            Ok((v, report)) => return Ok((v, report.migrated_records)),
            Err(e) if e.to_string().contains("another coffre process") => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("data directory stayed locked".into())
}

#[tokio::test]
async fn a_format_1_data_directory_is_migrated_in_place() {
    if !runs_on(
        &["sled"],
        "format 1 is a sled data directory of an older release",
    ) {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    copy_fixture(root.path());
    let config = test_config(root.path());

    // A first start whose record writes fail: the start is refused, and
    // the directory is left as it was, to migrate next time.
    let failed = Vault::open_with(&config, None, |b: Arc<dyn Backend>| {
        let f = FaultyBackend::new(b);
        f.fail(Space::Records);
        f
    })
    .await;
    assert!(
        failed.is_err(),
        "a migration that cannot write refuses the start"
    );
    drop(failed);

    let (vault, migrated) = open(&config).await.unwrap();
    assert_eq!(migrated, 4, "three records and a honeytoken");
    // The trail moved out of the key-value store into its own encrypted
    // log (format 2), indexed: the old record writes are found by id.
    // (The refused start above moved it already: the trail opens first.)
    assert!(coffre::audit::trail_dir(&config.data_dir).is_dir());
    assert!(vault.store.last(Space::Audit).await.unwrap().is_none());
    let writes = vault
        .audit
        .query(&coffre::audit::Query {
            record_id: "p-001".into(),
            action: "PutRecord".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        writes.len(),
        2,
        "p-001 was written twice by the old release"
    );
    drop(vault);
    let (vault, migrated) = open(&config).await.unwrap();
    assert_eq!(migrated, 0, "done once");
    drop(vault);

    let s = TestServer::start_with(root, config).await;
    let token = s.login("clinic", "dr_a", CLINICIAN_PASSWORD).await.unwrap();
    let mut r = s.records().await;
    let p1 = r
        .get_record(authed(&token, get("p-001")))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(p1.version, 2);
    assert_eq!(p1.fields["blood_group"], "A-");
    assert_eq!(p1.fields["family_name"], "Durand1");
    for id in ["p-002", "p-003"] {
        let rec = r
            .get_record(authed(&token, get(id)))
            .await
            .unwrap()
            .into_inner()
            .record
            .unwrap();
        assert_eq!(rec.version, 1);
    }
    // The honeytoken still locks its reader.
    let canary = std::fs::read_to_string(Path::new(FIXTURE).join("honeytoken")).unwrap();
    let e = r
        .get_record(authed(&token, get(canary.trim())))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // And the trail of the old release still verifies, with this start's
    // events after it.
    s.principal("system", "dpo", pb::Role::Auditor, CLINICIAN_PASSWORD)
        .await;
    let aud = s.login("system", "dpo", CLINICIAN_PASSWORD).await.unwrap();
    let v = pb::audit_client::AuditClient::new(s.channel().await)
        .verify_audit(authed(&aud, pb::VerifyAuditRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{v:?}");
}
