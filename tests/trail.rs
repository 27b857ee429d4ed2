//! The trail's files (format 2): what a crash, a lost index, retention and a
//! copy of the disk do to them, and paging through `QueryAudit`.

mod common;

use std::time::Duration;

use coffre::{pb, vault::TrailCheck};
use common::*;

async fn verify(s: &TestServer, aud: &str) -> pb::VerifyAuditResponse {
    verify_audit(s, aud, None).await
}

fn trail_files(s: &TestServer, ext: &str) -> Vec<std::path::PathBuf> {
    // In PostgreSQL: the files of the trail's tables, their TOAST and
    // indexes (after a checkpoint).
    if let Some((pg, db)) = pg_database(&s.config) {
        if ext != "seg" {
            return Vec::new();
        }
        pg.sql(&db, "CHECKPOINT");
        let rels = pg.sql(
            &db,
            "SELECT pg_relation_filepath(c.oid) FROM pg_class c \
             WHERE c.relname LIKE 'coffre_audit%' AND c.relkind IN ('r', 'i') \
             UNION SELECT pg_relation_filepath(c.reltoastrelid) FROM pg_class c \
             WHERE c.relname LIKE 'coffre_audit%' AND c.reltoastrelid <> 0",
        );
        return rels
            .lines()
            .map(|r| pg.data_dir().join(r))
            .filter(|p| p.exists())
            .collect();
    }
    let mut v: Vec<_> = std::fs::read_dir(coffre::audit::trail_dir(&s.data_dir()))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

/// A crash can leave the last frame half written (the file grew, its bytes
/// did not land): it was never acknowledged, so the next start cuts it off
/// and the chain verifies; every acknowledged event is still there.
#[tokio::test]
async fn a_torn_last_frame_is_cut_at_start_and_nothing_acknowledged_is_lost() {
    if !runs_on(
        &["sled"],
        "a torn frame is a file's tail; PostgreSQL commits a frame whole or not at all",
    ) {
        return;
    }
    for tear in ["garbage", "short"] {
        let mut s = TestServer::start().await;
        let clin = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
        let aud = system_auditor(&s).await;
        let mut r = s.records().await;
        for i in 0..5 {
            r.put_record(authed(&clin, put(&format!("p{i}"), &[("nir", "1")])))
                .await
                .unwrap();
        }
        let before = verify(&s, &aud).await;
        assert!(before.ok);
        s.stop().await;
        let seg = trail_files(&s, "seg").pop().unwrap();
        let mut bytes = std::fs::read(&seg).unwrap();
        match tear {
            // A whole frame's length of zeroes: what a crash leaves when
            // the size was updated but not the data.
            "garbage" => {
                let mut fake = 200u32.to_le_bytes().to_vec();
                fake.extend_from_slice(&(before.head_seq + 1).to_le_bytes());
                fake.extend_from_slice(&1u32.to_le_bytes());
                fake.resize(204, 0);
                bytes.extend_from_slice(&fake);
            }
            // The frame's head only.
            _ => bytes.extend_from_slice(&[9, 0, 0]),
        }
        std::fs::write(&seg, &bytes).unwrap();
        s.restart().await;
        let aud = s
            .login("system", "auditor", AUDITOR_PASSWORD)
            .await
            .unwrap();
        let after = verify(&s, &aud).await;
        assert!(after.ok, "{tear}: {after:?}");
        assert!(
            after.head_seq > before.head_seq,
            "{tear}: the chain goes on"
        );
        let opened = s.vault.as_ref().unwrap().audit.opened().clone();
        assert!(opened.torn_bytes > 0, "{tear}: the torn frame was cut");
        let puts = events(
            &s,
            &aud,
            pb::QueryAuditRequest {
                action: "PutRecord".into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(puts.len(), 5, "{tear}: every acknowledged write's event");
    }
}

/// An index file is derived data: lost or damaged, it is rebuilt from its
/// segment at start, and queries find the same events.
#[tokio::test]
async fn a_lost_or_damaged_index_is_rebuilt() {
    if !runs_on(
        &["sled"],
        "the trail's index files are sled-only; PostgreSQL keeps its indexes itself",
    ) {
        return;
    }
    let mut s = TestServer::start().await;
    let clin = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let aud = system_auditor(&s).await;
    let mut r = s.records().await;
    for i in 0..20 {
        r.put_record(authed(&clin, put(&format!("p{i}"), &[("nir", "1")])))
            .await
            .unwrap();
        if i % 5 == 4 {
            // Close a segment now and then: each gets its index file.
            s.vault.as_ref().unwrap().audit.seal().unwrap();
        }
    }
    let q = || pb::QueryAuditRequest {
        record_id: "p7".into(),
        action: "PutRecord".into(),
        ..Default::default()
    };
    let want = events(&s, &aud, q()).await;
    assert_eq!(want.len(), 1);
    s.stop().await;
    let idx = trail_files(&s, "idx");
    assert!(idx.len() >= 4, "{idx:?}");
    std::fs::remove_file(&idx[0]).unwrap();
    std::fs::write(&idx[1], b"not an index").unwrap();
    s.restart().await;
    assert_eq!(s.vault.as_ref().unwrap().audit.opened().reindexed, 2);
    let aud = s
        .login("system", "auditor", AUDITOR_PASSWORD)
        .await
        .unwrap();
    let got = events(&s, &aud, q()).await;
    assert_eq!(got, want);
    assert!(verify(&s, &aud).await.ok);
}

/// Retention drops whole segments, but what scrub needs stays: a record
/// whose last write left the trail is still checked against that write.
#[tokio::test]
async fn pruning_keeps_each_records_latest_write_for_scrub() {
    let mut s = TestServer::start().await;
    let clin = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let aud = system_auditor(&s).await;
    let mut r = s.records().await;
    r.put_record(authed(&clin, put("kept", &[("nir", "1")])))
        .await
        .unwrap();
    r.put_record(authed(&clin, put("kept", &[("nir", "2")])))
        .await
        .unwrap();
    r.put_record(authed(&clin, put("gone", &[("nir", "1")])))
        .await
        .unwrap();
    r.delete_record(authed(
        &clin,
        pb::DeleteRecordRequest {
            id: "gone".into(),
            purpose: "erasure".into(),
        },
    ))
    .await
    .unwrap();
    // The version-1 copy of "kept", for a rollback later.
    let old_kept = {
        let store = &s.vault.as_ref().unwrap().store;
        let mut k = b"clinic\0".to_vec();
        k.extend_from_slice(b"kept");
        store
            .get(coffre::store::Space::Records, &k)
            .await
            .unwrap()
            .unwrap()
    };
    r.put_record(authed(&clin, put("kept", &[("nir", "3")])))
        .await
        .unwrap();
    let audit = &s.vault.as_ref().unwrap().audit;
    audit.seal().unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cutoff = coffre::clock::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    r.put_record(authed(&clin, put("new", &[("nir", "1")])))
        .await
        .unwrap();
    let pruned = audit.prune(cutoff).await.unwrap();
    assert!(pruned >= 5, "pruned {pruned}");
    assert!(verify(&s, &aud).await.ok);
    let left = events(
        &s,
        &aud,
        pb::QueryAuditRequest {
            record_id: "kept".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(left.is_empty(), "the writes of `kept` left the trail");

    let v = s.vault.as_ref().unwrap();
    let tenant = v
        .tenants
        .get(&coffre::model::TenantName::parse("clinic").unwrap())
        .await
        .unwrap();
    let id = |s: &str| coffre::model::RecordId::parse(s).unwrap();
    assert_eq!(
        v.check_against_trail(&tenant, &id("kept")).await.unwrap(),
        TrailCheck::Matches
    );
    assert_eq!(
        v.check_against_trail(&tenant, &id("gone")).await.unwrap(),
        TrailCheck::Matches,
        "deleted, and absent"
    );
    assert_eq!(
        v.check_against_trail(&tenant, &id("new")).await.unwrap(),
        TrailCheck::Matches
    );
    // Put an older copy back: the kept-aside write still tells.
    s.stop().await;
    {
        let store = s.raw_store().await;
        let mut k = b"clinic\0".to_vec();
        k.extend_from_slice(b"kept");
        let mut b = coffre::store::Batch::new();
        b.put(coffre::store::Space::Records, k, old_kept);
        store.apply(b).await.unwrap();
        store.flush_blocking().unwrap();
    }
    s.restart().await;
    let v = s.vault.as_ref().unwrap();
    let tenant = v
        .tenants
        .get(&coffre::model::TenantName::parse("clinic").unwrap())
        .await
        .unwrap();
    assert_eq!(
        v.check_against_trail(&tenant, &id("kept")).await.unwrap(),
        TrailCheck::RolledBack
    );

    // "kept" deleted on disk: only the kept-aside write says it exists,
    // and scrub's walk of what the trail says exists finds it missing.
    s.stop().await;
    {
        let store = s.raw_store().await;
        let mut k = b"clinic\0".to_vec();
        k.extend_from_slice(b"kept");
        let mut b = coffre::store::Batch::new();
        b.delete(coffre::store::Space::Records, k);
        store.apply(b).await.unwrap();
        store.flush_blocking().unwrap();
    }
    s.restart().await;
    let v = s.vault.as_ref().unwrap();
    let (by_tenant, all) = coffre::ops::scrub::scrub(v, |_| {}).await.unwrap();
    assert_eq!(all.failed, 1, "{by_tenant:?}");
    let aud = s
        .login("system", "auditor", AUDITOR_PASSWORD)
        .await
        .unwrap();
    let ev = events(
        &s,
        &aud,
        pb::QueryAuditRequest {
            action: "alert/scrub_failed".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ev.last().unwrap().record_ids, vec!["kept".to_string()]);
    assert!(ev.last().unwrap().purpose.contains("1 missing"), "{ev:?}");
}

/// A copy of the data directory does not tell who read which record, when
/// or why: no purpose, record id or principal is in the trail's files.
#[tokio::test]
async fn the_trail_on_disk_names_no_one_and_no_record() {
    let mut s = TestServer::start().await;
    let clin = s
        .tenant_with("maternite", "dr_lefebvre", pb::Role::Clinician)
        .await;
    let mut r = s.records().await;
    r.put_record(authed(&clin, put("dossier-7781", &[("nir", "1")])))
        .await
        .unwrap();
    let mut req = get("dossier-7781");
    req.purpose = "suivi grossesse VIH".into();
    r.get_record(authed(&clin, req)).await.unwrap();
    s.stop().await;
    let mut files = trail_files(&s, "seg");
    files.extend(trail_files(&s, "idx"));
    assert!(!files.is_empty());
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        for needle in [
            "suivi grossesse",
            "dossier-7781",
            "dr_lefebvre",
            "maternite",
            "GetRecord",
        ] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} in clear in {}",
                f.display()
            );
        }
    }
}

/// Paging newest first with `before_seq`: pages follow each other without
/// gap or overlap, and a page never includes the query's own event.
#[tokio::test]
async fn query_audit_pages_back_with_before_seq() {
    let s = TestServer::start().await;
    let clin = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let aud = system_auditor(&s).await;
    let mut r = s.records().await;
    for i in 0..25 {
        r.put_record(authed(&clin, put(&format!("p{i}"), &[("nir", "1")])))
            .await
            .unwrap();
    }
    let all = events(&s, &aud, pb::QueryAuditRequest::default()).await;
    let mut paged = Vec::new();
    let mut before = 0;
    loop {
        let page = events(
            &s,
            &aud,
            pb::QueryAuditRequest {
                newest_first: true,
                limit: 7,
                before_seq: before,
                ..Default::default()
            },
        )
        .await;
        assert!(page.windows(2).all(|w| w[0].seq > w[1].seq));
        let Some(last) = page.last() else { break };
        before = last.seq;
        let short = page.len() < 7;
        paged.extend(page);
        if short {
            break;
        }
    }
    // Everything up to the first full listing, newest first, once each.
    let upto = all.last().unwrap().seq;
    let mut from_pages: Vec<u64> = paged.iter().map(|e| e.seq).filter(|&q| q <= upto).collect();
    from_pages.reverse();
    let listed: Vec<u64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(from_pages, listed);
    assert!(
        all.iter()
            .all(|e| e.action != "coffre.v1.Audit/QueryAudit" || e.seq < upto)
    );
}
