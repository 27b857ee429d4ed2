//! What a stolen data directory yields (T1), and what tampering with it
//! gets (T4): ciphertext only, and DATA_LOSS rather than wrong plaintext.

mod common;

use std::collections::HashMap;

use base64::Engine;
use coffre::{
    pb,
    store::{Batch, Space},
};
use common::*;
use tonic::Code;

#[tokio::test]
async fn a_copy_of_the_data_directory_holds_no_value_password_token_or_key() {
    let mut s = TestServer::start().await;
    let admin = s.admin_token().await;
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let clin_pw = "Qmarker pw clinician 7731 zebra";
    secrets.push(clin_pw.as_bytes().to_vec());
    secrets.push(common::ADMIN_PASSWORD.as_bytes().to_vec());
    s.admin()
        .await
        .create_tenant(authed(
            &admin,
            pb::CreateTenantRequest {
                name: "clinic".into(),
                indexed_fields: vec!["nir".into(), "family_name".into()],
            },
        ))
        .await
        .unwrap();
    s.principal("clinic", "dr_a", pb::Role::Clinician, clin_pw)
        .await;
    let token = s.login("clinic", "dr_a", clin_pw).await.unwrap();
    secrets.push(token.as_bytes().to_vec());
    secrets.push(admin.as_bytes().to_vec());
    let mut r = s.records().await;
    for i in 0..50 {
        let fields: Vec<(String, String)> = ["family_name", "given_name", "nir", "address", "note"]
            .iter()
            .map(|f| (f.to_string(), format!("MK{i:03}{f}Zq-Éloïse")))
            .collect();
        for (_, v) in &fields {
            secrets.push(v.as_bytes().to_vec());
        }
        let refs: Vec<(&str, &str)> = fields
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        r.put_record(authed(&token, put(&format!("rec-{i}"), &refs)))
            .await
            .unwrap();
        let secret = format!("PortalSecret{i:03}Marker");
        r.set_secret(authed(
            &token,
            pb::SetSecretRequest {
                record_id: format!("rec-{i}"),
                name: "portal".into(),
                secret: secret.clone(),
            },
        ))
        .await
        .unwrap();
        secrets.push(secret.into_bytes());
    }
    let key_text = std::fs::read_to_string(&s.config.master_key_file).unwrap();
    let key_b64 = key_text.trim().split(':').nth(1).unwrap().to_string();
    let raw_key = base64::engine::general_purpose::STANDARD
        .decode(&key_b64)
        .unwrap();
    secrets.push(raw_key);
    secrets.push(key_b64.into_bytes());
    s.stop().await;

    let files = s.stored_files();
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    assert!(
        total > 10_000,
        "the scan reads the real data ({total} bytes)"
    );
    // Positive control: names are stored in clear (T1 allows it), so the
    // scan must find one, or it is not reading what sled wrote.
    assert!(
        files.iter().any(|(_, b)| contains(b, b"given_name")),
        "the scan sees sled's bytes"
    );
    let mut hits = Vec::new();
    for secret in &secrets {
        for form in forms(secret) {
            for (name, bytes) in &files {
                if contains(bytes, &form) {
                    hits.push(format!("{name}: {}", String::from_utf8_lossy(&form)));
                }
            }
        }
    }
    println!(
        "at-rest scan: {} secrets x forms over {} files, {} bytes: {} hits",
        secrets.len(),
        files.len(),
        total,
        hits.len()
    );
    assert!(hits.is_empty(), "found in clear: {hits:?}");
}

/// The stored record layout, as an attacker with the format would edit it.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRecord {
    #[prost(uint64, tag = "1")]
    version: u64,
    #[prost(map = "string, bytes", tag = "2")]
    fields: HashMap<String, Vec<u8>>,
    #[prost(map = "string, bytes", tag = "3")]
    index: HashMap<String, Vec<u8>>,
    #[prost(uint32, tag = "4")]
    format: u32,
    #[prost(bytes = "vec", tag = "5")]
    write_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "6")]
    mac: Vec<u8>,
}

fn rkey(tenant: &str, id: &str) -> Vec<u8> {
    format!("{tenant}\0{id}").into_bytes()
}

#[tokio::test]
async fn tampered_or_moved_ciphertext_gives_data_loss_never_other_plaintext() {
    let mut s = TestServer::start().await;
    let a = s.tenant_with("clinic_a", "dr_a", pb::Role::Clinician).await;
    let b = s.tenant_with("clinic_b", "dr_b", pb::Role::Clinician).await;
    let mut r = s.records().await;
    for i in 1..=7 {
        r.put_record(authed(
            &a,
            put(
                &format!("p{i}"),
                &[
                    ("nir", &format!("nir-a-{i}")),
                    ("family_name", &format!("fam-{i}")),
                ],
            ),
        ))
        .await
        .unwrap();
    }
    r.put_record(authed(&b, put("q1", &[("nir", "nir-b-1")])))
        .await
        .unwrap();
    s.stop().await;

    {
        let store = s.raw_store().await;
        let load = async |t: &str, id: &str| -> RawRecord {
            prost::Message::decode(
                &store
                    .get(Space::Records, &rkey(t, id))
                    .await
                    .unwrap()
                    .unwrap()[..],
            )
            .unwrap()
        };
        let mut batch = Batch::new();
        let mut save = |t: &str, id: &str, rec: &RawRecord| {
            batch.put(
                Space::Records,
                rkey(t, id),
                prost::Message::encode_to_vec(rec),
            );
        };
        // 1. One flipped byte in the middle of p1's nir ciphertext.
        let mut p1 = load("clinic_a", "p1").await;
        let c = p1.fields.get_mut("nir").unwrap();
        let mid = c.len() / 2;
        c[mid] ^= 0x01;
        save("clinic_a", "p1", &p1);
        // 2. p2's nir ciphertext copied into p3.
        let p2 = load("clinic_a", "p2").await;
        let mut p3 = load("clinic_a", "p3").await;
        p3.fields.insert("nir".into(), p2.fields["nir"].clone());
        save("clinic_a", "p3", &p3);
        // 3. Tenant b's nir ciphertext copied into tenant a's p4.
        let q1 = load("clinic_b", "q1").await;
        let mut p4 = load("clinic_a", "p4").await;
        p4.fields.insert("nir".into(), q1.fields["nir"].clone());
        save("clinic_a", "p4", &p4);
        // 4. A field moved to another field name of the same record.
        let mut p5 = load("clinic_a", "p5").await;
        let fam = p5.fields["family_name"].clone();
        p5.fields.insert("nir".into(), fam);
        save("clinic_a", "p5", &p5);
        // 5. A whole record copied over another id.
        let p6 = load("clinic_a", "p6").await;
        save("clinic_a", "p7", &p6);
        // 6. The header's key version rewritten.
        let mut p6b = p6.clone();
        p6b.fields.get_mut("family_name").unwrap()[4] ^= 0x02;
        save("clinic_a", "p6", &p6b);
        store.apply(batch).await.unwrap();
        store.flush_blocking().unwrap();
    }
    s.restart().await;
    let a = s
        .login("clinic_a", "dr_a", CLINICIAN_PASSWORD)
        .await
        .unwrap();
    let mut r = s.records().await;
    let mut detected = 0;
    for (id, what) in [
        ("p1", "flipped byte"),
        ("p3", "ciphertext from another record"),
        ("p4", "ciphertext from another tenant"),
        ("p5", "ciphertext from another field"),
        ("p7", "record copied over another id"),
        ("p6", "key version in header rewritten"),
    ] {
        match r.get_record(authed(&a, get(id))).await {
            Err(e) => {
                assert_eq!(e.code(), Code::DataLoss, "{what}");
                assert!(!e.message().contains("nir-"), "no plaintext in the error");
                detected += 1;
            }
            Ok(resp) => panic!("{what}: tampering returned {:?}", resp.into_inner().record),
        }
    }
    println!("tamper: {detected}/6 classes answered DATA_LOSS");
    // The untouched field of a tampered record still reads with projection,
    // and untouched records read normally.
    let fam = r
        .get_record(authed(
            &a,
            pb::GetRecordRequest {
                id: "p1".into(),
                fields: vec!["family_name".into()],
                purpose: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(fam.fields["family_name"], "fam-1");
    let p2 = r
        .get_record(authed(&a, get("p2")))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(p2.fields["nir"], "nir-a-2");
    // A bulk read stops at the tampered record with DATA_LOSS.
    let mut stream = r
        .bulk_read(authed(
            &a,
            pb::BulkReadRequest {
                ids: vec!["p2".into(), "p1".into()],
                fields: vec![],
                purpose: "transfer".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().id, "p2");
    assert_eq!(stream.message().await.unwrap_err().code(), Code::DataLoss);
}

#[tokio::test]
async fn a_record_is_bound_as_a_whole_and_a_rollback_shows_against_the_trail() {
    let mut s = TestServer::start().await;
    let a = s.tenant_with("clinic_a", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    let fields = [
        ("nir", "185077512345678"),
        ("allergy", "penicillin"),
        ("blood_group", "O+"),
    ];
    for id in ["p1", "p2", "p3", "p5"] {
        r.put_record(authed(&a, put(id, &fields))).await.unwrap();
    }
    // p3 at version 1, kept by the attacker; then written again.
    s.stop().await;
    let old_p3 = {
        let store = s.raw_store().await;
        store
            .get(Space::Records, &rkey("clinic_a", "p3"))
            .await
            .unwrap()
            .unwrap()
    };
    s.restart().await;
    let a = s
        .login("clinic_a", "dr_a", CLINICIAN_PASSWORD)
        .await
        .unwrap();
    let mut r = s.records().await;
    let newer = [("nir", "185077512345678"), ("allergy", "penicillin, latex")];
    r.put_record(authed(&a, put("p3", &newer))).await.unwrap();
    s.stop().await;
    {
        let store = s.raw_store().await;
        let load = async |id: &str| -> RawRecord {
            prost::Message::decode(
                &store
                    .get(Space::Records, &rkey("clinic_a", id))
                    .await
                    .unwrap()
                    .unwrap()[..],
            )
            .unwrap()
        };
        let mut batch = Batch::new();
        // 1. The allergy dropped from p1.
        let mut p1 = load("p1").await;
        assert!(p1.fields.remove("allergy").is_some());
        batch.put(
            Space::Records,
            rkey("clinic_a", "p1"),
            prost::Message::encode_to_vec(&p1),
        );
        // 2. p2's version edited.
        let mut p2 = load("p2").await;
        p2.version = 99;
        batch.put(
            Space::Records,
            rkey("clinic_a", "p2"),
            prost::Message::encode_to_vec(&p2),
        );
        // 3. p5 passed off as a record of the format before whole-record
        // seals (no MAC to check).
        let mut p5 = load("p5").await;
        p5.format = 1;
        p5.mac.clear();
        batch.put(
            Space::Records,
            rkey("clinic_a", "p5"),
            prost::Message::encode_to_vec(&p5),
        );
        // 4. p3 put back as it was at version 1.
        batch.put(Space::Records, rkey("clinic_a", "p3"), old_p3);
        store.apply(batch).await.unwrap();
        store.flush_blocking().unwrap();
    }
    s.restart().await;
    let a = s
        .login("clinic_a", "dr_a", CLINICIAN_PASSWORD)
        .await
        .unwrap();
    let mut r = s.records().await;
    for (id, what) in [
        ("p1", "a field dropped"),
        ("p2", "the version edited"),
        ("p5", "the format downgraded"),
    ] {
        let e = r.get_record(authed(&a, get(id))).await.unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{what}");
        // Even a projection that leaves out the changed part.
        let mut only_nir = get(id);
        only_nir.fields = vec!["nir".into()];
        let e = r.get_record(authed(&a, only_nir)).await.unwrap_err();
        assert_eq!(e.code(), Code::DataLoss, "{what}, projected");
    }
    // The rolled-back copy seals correctly (it was genuine once): it reads,
    // but the check scrub runs finds it is not the last write.
    let p3 = r
        .get_record(authed(&a, get("p3")))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(p3.version, 1);
    let v = s.vault.as_ref().unwrap();
    let tenant = v
        .tenants
        .get(&coffre::model::TenantName::parse("clinic_a").unwrap())
        .await
        .unwrap();
    let id = |s: &str| coffre::model::RecordId::parse(s).unwrap();
    use coffre::vault::TrailCheck;
    assert_eq!(
        v.check_against_trail(&tenant, &id("p3")).await.unwrap(),
        TrailCheck::RolledBack
    );
    assert!(
        v.check_against_trail(&tenant, &id("p1")).await.is_err(),
        "p1 fails its MAC"
    );
    // An untouched record matches its last write; so does a deleted one.
    r.put_record(authed(&a, put("p4", &fields))).await.unwrap();
    assert_eq!(
        v.check_against_trail(&tenant, &id("p4")).await.unwrap(),
        TrailCheck::Matches
    );
    r.delete_record(authed(
        &a,
        pb::DeleteRecordRequest {
            id: "p4".into(),
            purpose: "erasure".into(),
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        v.check_against_trail(&tenant, &id("p4")).await.unwrap(),
        TrailCheck::Matches
    );
}

/// Everything in the data directory is the vault's alone: the embedded
/// store's files 0600 and its folders 0700, including what was there
/// before the start.
#[tokio::test]
async fn every_file_in_the_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    if test_backend() != "sled" {
        println!("SKIP: the data directory holds the store only with sled");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let config = test_config(root.path());
    let data = config.data_dir.clone();
    std::fs::create_dir_all(data.join("old")).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(data.join("old"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(data.join("old").join("left"), b"x").unwrap();
    std::fs::set_permissions(
        data.join("old").join("left"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let s = TestServer::start_with(root, config).await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    for i in 0..20 {
        r.put_record(authed(&token, put(&format!("p-{i}"), &[("nir", "1")])))
            .await
            .unwrap();
    }
    s.vault.as_ref().unwrap().store.flush_blocking().unwrap();
    let mut todo = vec![data.clone()];
    let mut seen = 0;
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o777;
            if m.is_dir() {
                assert_eq!(mode, 0o700, "{}", p.display());
                todo.push(p);
            } else {
                assert_eq!(mode, 0o600, "{}", p.display());
            }
            seen += 1;
        }
    }
    assert!(seen > 3, "looked at {seen} entries");
}
