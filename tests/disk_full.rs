//! A full disk: every write fails closed and promptly (UNAVAILABLE, never a
//! hang), health says NOT_SERVING, and once space is back the server serves
//! again by itself, its audit chain intact. On a real (small tmpfs) disk
//! when the test may mount one, and always through the fault-injecting
//! backend.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use coffre::{pb, store::Space};
use common::*;
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A tmpfs of `size` mounted at `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .ok()?
            .success();
        ok.then(|| Self(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn health(ch: Channel) -> ServingStatus {
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

async fn wait_health(ch: &Channel, want: ServingStatus, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if health(ch.clone()).await == want {
            return t.elapsed();
        }
        assert!(t.elapsed() < within, "health never became {want:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn big_put(i: usize) -> Request<pb::PutRecordRequest> {
    let v = "x".repeat(60 * 1024);
    let mut r = Request::new(put(&format!("big-{i}"), &[("nir", "1"), ("notes", &v)]));
    r.set_timeout(Duration::from_secs(8));
    r
}

/// A server whose data directory is a 6 MiB tmpfs (`None` where no tmpfs
/// can be mounted), with `min_free_mib`; then 60 KiB puts by a clinician
/// until one fails: which, with what code, after how long.
async fn full_disk(
    min_free_mib: u64,
) -> Option<(Tmpfs, TestServer, Channel, (usize, Code, Duration))> {
    let root = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&root.path().join("data"), "6m")?;
    let mut config = test_config(root.path());
    config.storage.min_free_mib = min_free_mib;
    let s = TestServer::start_with(root, config).await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let ch = s.channel().await;
    let mut r = pb::records_client::RecordsClient::new(ch.clone());
    for i in 0..400 {
        let mut req = big_put(i);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let t = Instant::now();
        if let Err(e) = r.put_record(req).await {
            return Some((fs, s, ch, (i, e.code(), t.elapsed())));
        }
    }
    panic!("the disk never filled up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_closed_promptly_and_recovers_without_restart() {
    if !runs_on(
        &["sled"],
        "the free-space guard watches sled's filesystem; a database that cannot write is tested as PostgreSQL stopped under load",
    ) {
        return;
    }
    let Some((fs, s, ch, (n, code, took))) = full_disk(2).await else {
        println!(
            "skipped: cannot mount a tmpfs here (not root?); the faulty-backend test covers the logic"
        );
        return;
    };
    println!("write {n} failed with {code:?} after {took:?}");
    assert_eq!(code, Code::Unavailable, "fails closed, not a hang");
    let down = wait_health(&ch, ServingStatus::NotServing, Duration::from_secs(10)).await;
    println!("NOT_SERVING after {down:?}");
    fs.resize("64m");
    let up = wait_health(&ch, ServingStatus::Serving, Duration::from_secs(15)).await;
    println!("SERVING again {up:?} after space came back");
    let token = s.login("clinic", "dr_a", CLINICIAN_PASSWORD).await.unwrap();
    let mut r = pb::records_client::RecordsClient::new(s.channel().await);
    r.put_record(authed(&token, put("after", &[("nir", "2")])))
        .await
        .unwrap();
    let got = r.get_record(authed(&token, get("after"))).await.unwrap();
    assert_eq!(got.into_inner().record.unwrap().fields["nir"], "2");
    let v = s.vault.as_ref().unwrap().audit.verify(None).unwrap();
    assert!(v.ok, "the chain holds across the outage: {v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_storage_says_not_serving_and_heals_by_itself() {
    let s = TestServer::start_faulty().await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let ch = s.channel().await;
    assert_eq!(health(ch.clone()).await, ServingStatus::Serving);
    let faults = s.faults.clone().unwrap();
    faults.fail(Space::Audit);
    let mut r = pb::records_client::RecordsClient::new(ch.clone());
    let e = r
        .put_record(authed(&token, put("p-1", &[("nir", "1")])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    wait_health(&ch, ServingStatus::NotServing, Duration::from_secs(10)).await;
    faults.heal();
    let up = wait_health(&ch, ServingStatus::Serving, Duration::from_secs(10)).await;
    println!("SERVING again {up:?} after the fault healed");
    r.put_record(authed(&token, put("p-1", &[("nir", "1")])))
        .await
        .unwrap();
    let v = s.vault.as_ref().unwrap().audit.verify(None).unwrap();
    assert!(v.ok, "{v:?}");
}

/// Without the free-space margin the engine meets a full disk itself: the
/// write still answers UNAVAILABLE within seconds (its flush times out)
/// rather than hanging to the client's deadline, and health says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_margin_a_write_still_answers_promptly() {
    if !runs_on(&["sled"], "the free-space guard watches sled's filesystem") {
        return;
    }
    let Some((_fs, _s, ch, (_, code, _))) = full_disk(0).await else {
        println!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    };
    assert_eq!(code, Code::Unavailable, "not the client's deadline");
    wait_health(&ch, ServingStatus::NotServing, Duration::from_secs(10)).await;
}
