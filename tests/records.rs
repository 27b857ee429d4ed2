//! Records through the real server: round trips, projection, blind-index
//! search, replace, delete, bulk read, secrets, and the input limits.

mod common;

use coffre::{pb, sample::sample_fields};
use common::*;
use tonic::Code;

#[tokio::test]
async fn two_hundred_ten_field_records_round_trip_with_projection_and_find() {
    let s = TestServer::start().await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;

    let mut ids = Vec::new();
    for i in 0..200u64 {
        let resp = r
            .put_record(authed(
                &token,
                pb::PutRecordRequest {
                    record: Some(pb::Record {
                        id: String::new(),
                        fields: sample_fields(i),
                        version: 0,
                    }),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.version, 1);
        assert!(uuid::Uuid::parse_str(&resp.id).is_ok(), "server-made UUID");
        ids.push(resp.id);
    }
    for (i, id) in ids.iter().enumerate() {
        let want = sample_fields(i as u64);
        let full = r
            .get_record(authed(&token, get(id)))
            .await
            .unwrap()
            .into_inner()
            .record
            .unwrap();
        assert_eq!(full.fields, want, "record {i}");
        let proj = r
            .get_record(authed(
                &token,
                pb::GetRecordRequest {
                    id: id.clone(),
                    fields: vec!["nir".into(), "blood_group".into()],
                    purpose: "care".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .record
            .unwrap();
        assert_eq!(proj.fields.len(), 2);
        assert_eq!(proj.fields["nir"], want["nir"]);
        assert_eq!(proj.fields["blood_group"], want["blood_group"]);
    }
    let mut found = 0;
    for (i, id) in ids.iter().enumerate().step_by(17) {
        let nir = sample_fields(i as u64)["nir"].clone();
        // Search normalises: surrounding space does not matter.
        let got = r
            .find_records(authed(
                &token,
                pb::FindRecordsRequest {
                    field: "nir".into(),
                    value: format!("  {nir} "),
                    purpose: "care".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .ids;
        assert_eq!(got, vec![id.clone()]);
        found += 1;
    }
    println!("round trip: 200 records, 10 fields each; find by nir matched {found}/{found}");
    // A non-indexed field cannot be searched.
    let e = r
        .find_records(authed(
            &token,
            pb::FindRecordsRequest {
                field: "family_name".into(),
                value: "Martin".into(),
                purpose: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn replace_delete_bulk_read_and_secrets() {
    let s = TestServer::start().await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Service).await;
    let mut r = s.records().await;

    let v1 = r
        .put_record(authed(&token, put("p-1", &[("nir", "111"), ("note", "a")])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((v1.id.as_str(), v1.version), ("p-1", 1));
    let v2 = r
        .put_record(authed(&token, put("p-1", &[("nir", "222")])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.version, 2);
    let rec = r
        .get_record(authed(&token, get("p-1")))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert_eq!(rec.version, 2);
    assert_eq!(rec.fields.len(), 1, "a put replaces the whole record");
    let find = |v: &str| pb::FindRecordsRequest {
        field: "nir".into(),
        value: v.into(),
        purpose: String::new(),
    };
    assert!(
        r.find_records(authed(&token, find("111")))
            .await
            .unwrap()
            .into_inner()
            .ids
            .is_empty(),
        "old index entry removed on replace"
    );
    assert_eq!(
        r.find_records(authed(&token, find("222")))
            .await
            .unwrap()
            .into_inner()
            .ids,
        vec!["p-1"]
    );

    r.put_record(authed(&token, put("p-2", &[("nir", "333")])))
        .await
        .unwrap();
    let e = r
        .bulk_read(authed(
            &token,
            pb::BulkReadRequest {
                ids: vec!["p-1".into()],
                fields: vec![],
                purpose: String::new(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "purpose required");
    let mut stream = r
        .bulk_read(authed(
            &token,
            pb::BulkReadRequest {
                ids: vec!["p-1".into(), "missing".into(), "p-2".into()],
                fields: vec!["nir".into()],
                purpose: "transfer".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(rec) = stream.message().await.unwrap() {
        got.push((rec.id, rec.fields["nir"].clone()));
    }
    assert_eq!(
        got,
        vec![("p-1".into(), "222".into()), ("p-2".into(), "333".into())]
    );
    let e = r
        .bulk_read(authed(
            &token,
            pb::BulkReadRequest {
                ids: (0..1001).map(|i| format!("id{i}")).collect(),
                fields: vec![],
                purpose: "x".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let set = |secret: &str| pb::SetSecretRequest {
        record_id: "p-1".into(),
        name: "portal_password".into(),
        secret: secret.into(),
    };
    let verify = |c: &str| pb::VerifySecretRequest {
        record_id: "p-1".into(),
        name: "portal_password".into(),
        candidate: c.into(),
    };
    let e = r
        .verify_secret(authed(&token, verify("x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "no secret yet");
    r.set_secret(authed(&token, set("s3cret portal pass")))
        .await
        .unwrap();
    assert!(
        r.verify_secret(authed(&token, verify("s3cret portal pass")))
            .await
            .unwrap()
            .into_inner()
            .ok
    );
    assert!(
        !r.verify_secret(authed(&token, verify("wrong")))
            .await
            .unwrap()
            .into_inner()
            .ok
    );
    let rec = r
        .get_record(authed(&token, get("p-1")))
        .await
        .unwrap()
        .into_inner()
        .record
        .unwrap();
    assert!(
        !rec.fields.contains_key("portal_password"),
        "never readable back"
    );
    let e = r
        .set_secret(authed(
            &token,
            pb::SetSecretRequest {
                record_id: "nope".into(),
                name: "pw".into(),
                secret: "x".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    r.delete_record(authed(
        &token,
        pb::DeleteRecordRequest {
            id: "p-1".into(),
            purpose: String::new(),
        },
    ))
    .await
    .unwrap();
    assert_eq!(
        r.get_record(authed(&token, get("p-1")))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        r.verify_secret(authed(&token, verify("s3cret portal pass")))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "secrets go with their record"
    );
    assert!(
        r.find_records(authed(&token, find("222")))
            .await
            .unwrap()
            .into_inner()
            .ids
            .is_empty()
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_stored() {
    let s = TestServer::start().await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    let big = "x".repeat(64 * 1024 + 1);
    let many: Vec<(String, String)> = (0..257).map(|i| (format!("f{i}"), "v".into())).collect();
    let many_ref: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let heavy_vals: Vec<(String, String)> = (0..17)
        .map(|i| (format!("f{i}"), "y".repeat(63 * 1024)))
        .collect();
    let heavy: Vec<(&str, &str)> = heavy_vals
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let long_id = "i".repeat(129);
    let cases: Vec<(&str, pb::PutRecordRequest)> = vec![
        ("value over 64 KiB", put("r1", &[("nir", &big)])),
        ("field name with capital", put("r1", &[("Nir", "1")])),
        ("field name with dash", put("r1", &[("blood-group", "1")])),
        ("field name too long", put("r1", &[(&"a".repeat(65), "1")])),
        ("257 fields", put("r1", &many_ref)),
        ("record over 1 MiB", put("r1", &heavy)),
        ("id over 128 bytes", put(&long_id, &[("nir", "1")])),
        ("id with newline", put("r\n1", &[("nir", "1")])),
    ];
    for (what, req) in cases {
        let e = r.put_record(authed(&token, req)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(
            !e.message().contains("xxxx"),
            "{what}: message echoes no value"
        );
    }
    assert_eq!(
        r.get_record(authed(&token, get("r1")))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "nothing stored"
    );
    let e = r
        .get_record(authed(
            &token,
            pb::GetRecordRequest {
                id: "r1".into(),
                fields: vec![],
                purpose: "p".repeat(257),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "purpose over 256 bytes");
    // Still serving.
    r.put_record(authed(&token, put("r1", &[("nir", "1")])))
        .await
        .unwrap();
}
