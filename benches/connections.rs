//! What slow, idle, silent and refused clients cost a running server: RSS
//! with 8 stalled 1,000-item BulkReads, how long silent, preface-only and
//! idle connections live, and an honest client's latency during a flood of
//! garbage calls from one address.
//!
//! `cargo bench --bench connections` measures `target/release/coffre`;
//! `COFFRE_BIN=/path/to/coffre` measures another build (an older release,
//! for before/after figures). Results go to BENCHMARKS.md by hand.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

mod support;

use coffre::pb::{self, admin_client::AdminClient, auth_client::AuthClient};
use support::{PW as ADMIN, ROOMY_LIMITS, authed, connect as chan};
use tokio::io::AsyncWriteExt;

const CLIN: &str = "harbor lantern 5521 cobalt fern";

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &str, root: &Path, connections: bool) -> Option<Server> {
    let mut text = format!(
        "dev = true\nlisten = \"127.0.0.1:0\"\ndata_dir = {:?}\nmaster_key_file = {:?}\n\
         [argon2]\nm_kib = 64\nt = 1\np = 1\n{ROOMY_LIMITS}",
        root.join("data"),
        root.join("master.key"),
    );
    if connections {
        // Shorter than the defaults (300 s idle) so the bench sees them act.
        text.push_str("[connections]\nidle_secs = 20\n");
    }
    let cfg = root.join("coffre.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("COFFRE_BOOTSTRAP_ADMIN_PASSWORD", ADMIN)
        .env("COFFRE_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines.next().and_then(Result::ok).and_then(|l| {
        l.split("listening on ")
            .nth(1)
            .map(|a| a.trim().to_string())
    });
    let Some(addr) = addr else {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    };
    std::thread::spawn(move || for _ in lines {});
    Some(Server { child, addr })
}

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn login(addr: &str, t: &str, u: &str, pw: &str) -> String {
    AuthClient::new(chan(addr).await)
        .login(pb::LoginRequest {
            otp: Default::default(),
            tenant: t.into(),
            username: u.into(),
            password: pw.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

async fn setup(addr: &str) -> String {
    let admin = login(addr, "system", "admin", ADMIN).await;
    let mut a = AdminClient::new(chan(addr).await);
    a.create_tenant(authed(
        &admin,
        pb::CreateTenantRequest {
            name: "clinic".into(),
            indexed_fields: vec![],
        },
    ))
    .await
    .unwrap();
    a.create_principal(authed(
        &admin,
        pb::CreatePrincipalRequest {
            oidc: Default::default(),
            tenant: "clinic".into(),
            username: "dr".into(),
            password: CLIN.into(),
            role: pb::Role::Clinician as i32,
        },
    ))
    .await
    .unwrap();
    login(addr, "clinic", "dr", CLIN).await
}

/// 100 records of 16 fields × 60 KB (~960 KB each).
async fn seed(addr: &str, token: &str) {
    let mut r = pb::records_client::RecordsClient::new(chan(addr).await);
    let value = "v".repeat(60 * 1024);
    for i in 0..100 {
        let fields = (0..16).map(|f| (format!("f{f}"), value.clone())).collect();
        r.put_record(authed(
            token,
            pb::PutRecordRequest {
                record: Some(pb::Record {
                    id: format!("r{i}"),
                    fields,
                    version: 0,
                }),
            },
        ))
        .await
        .unwrap();
    }
}

async fn stalled_bulk_reads(s: &Server, token: &str) {
    let pid = s.child.id();
    let idle = rss_mib(pid);
    let ids: Vec<String> = (0..1000).map(|i| format!("r{}", i % 100)).collect();
    let mut held = Vec::new();
    for _ in 0..8 {
        let ch = tonic::transport::Endpoint::from_shared(s.addr.clone())
            .unwrap()
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .unwrap();
        let mut r = pb::records_client::RecordsClient::new(ch).max_decoding_message_size(4 << 20);
        let st = r
            .bulk_read(authed(
                token,
                pb::BulkReadRequest {
                    ids: ids.clone(),
                    fields: vec![],
                    purpose: "bench".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        held.push(st);
    }
    let mut line = format!("stalled BulkReads: RSS idle {idle:.0} MiB");
    for at in [5u64, 20, 40] {
        let since = Instant::now();
        tokio::time::sleep(Duration::from_secs(at).saturating_sub(since.elapsed())).await;
        line.push_str(&format!(", {at} s: {:.0} MiB", rss_mib(pid)));
    }
    // A dropped stream ends short: read what is left of each, 10 s at most.
    let mut outcome = Vec::new();
    for st in &mut held {
        let mut got = 0;
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(_)) = st.message().await {
                got += 1;
            }
        })
        .await;
        outcome.push(match end {
            Err(_) => format!("still sending ({got}+ read)"),
            Ok(()) if got < 1000 => format!("dropped ({got} of 1000)"),
            Ok(()) => "complete".to_string(),
        });
    }
    println!("{line}; then: {}", outcome.join(", "));
}

/// Sockets the server process holds open.
fn server_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Opens `n` connections that never speak and `n` that send only the
/// HTTP/2 preface, keeps them open on this side, and samples how many
/// sockets the server holds over a minute.
async fn silent_connections(s: &Server, n: usize) {
    let pid = s.child.id();
    let host = s.addr.trim_start_matches("http://").to_string();
    let base = server_sockets(pid);
    let mut held = Vec::new();
    for i in 0..2 * n {
        let Ok(mut c) = tokio::net::TcpStream::connect(&host).await else {
            continue;
        };
        if i % 2 == 1 {
            let _ = c
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .await;
        }
        held.push(c);
    }
    let t = Instant::now();
    let mut line = format!(
        "{} silent or preface-only connections: server sockets beyond its {base} idle ones",
        held.len()
    );
    for at in [1u64, 5, 10, 15, 30, 60] {
        tokio::time::sleep(Duration::from_secs(at).saturating_sub(t.elapsed())).await;
        line.push_str(&format!(
            ", {at} s: {}",
            server_sockets(pid).saturating_sub(base)
        ));
    }
    println!("{line}");
    drop(held);
}

async fn idle_after_a_call(addr: &str, cap: Duration) -> Option<f64> {
    let host = addr.trim_start_matches("http://").to_string();
    let tcp = tokio::net::TcpStream::connect(&host).await.ok()?;
    let (client, conn) = h2::client::handshake(tcp).await.ok()?;
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.ok()?;
    let req = http::Request::post(format!("http://{host}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut body) = client.send_request(req, false).ok()?;
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .ok()?;
    let mut rb = resp.await.ok()?.into_body();
    while rb.data().await.is_some() {}
    let _ = rb.trailers().await;
    let t = Instant::now();
    tokio::time::timeout(cap, conn)
        .await
        .ok()
        .map(|_| t.elapsed().as_secs_f64())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn honest_latencies(addr: &str, token: &str, for_: Duration) -> Vec<f64> {
    let mut r = pb::records_client::RecordsClient::new(chan(addr).await);
    let mut lat = Vec::new();
    let end = Instant::now() + for_;
    let mut i = 0;
    while Instant::now() < end {
        let t = Instant::now();
        r.get_record(authed(
            token,
            pb::GetRecordRequest {
                id: format!("r{}", i % 100),
                fields: vec!["f0".into()],
                purpose: "care".into(),
            },
        ))
        .await
        .unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        i += 1;
    }
    lat
}

async fn flood(addr: &str, token: &str, root: &Path) {
    let size = |p: &Path| -> u64 {
        let mut total = 0;
        let mut stack = vec![p.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    total += e.metadata().map_or(0, |m| m.len());
                }
            }
        }
        total
    };
    let mut quiet = honest_latencies(addr, token, Duration::from_secs(3)).await;
    let before = size(&root.join("data"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // The attacker's rate is fixed (8 x 625 = 5,000 calls/s for 10 s), so
    // that a server refusing faster does not just let the flood spin faster
    // on the same two cores as the honest client.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let ch = chan(addr).await;
        let stop = stop.clone();
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = pb::records_client::RecordsClient::new(ch);
            let mut tick = tokio::time::interval(Duration::from_micros(1600));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 6250 {
                tick.tick().await;
                let _ = r
                    .get_record(authed(
                        &format!("cf1.bogus-{w}-{i}"),
                        pb::GetRecordRequest::default(),
                    ))
                    .await;
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let mut busy = honest_latencies(addr, token, Duration::from_secs(8)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    tokio::time::sleep(Duration::from_secs(12)).await;
    let grown = size(&root.join("data")).saturating_sub(before);
    let (q50, q99) = (pct(&mut quiet, 0.5), pct(&mut quiet, 0.99));
    let (b50, b99) = (pct(&mut busy, 0.5), pct(&mut busy, 0.99));
    println!(
        "garbage flood: {} bad-token calls; honest GetRecord p50 {q50:.2} -> {b50:.2} ms, p99 {q99:.2} -> {b99:.2} ms ({:.2}x); data directory grew {:.2} MiB",
        sent.load(std::sync::atomic::Ordering::Relaxed),
        b99 / q99,
        grown as f64 / (1024.0 * 1024.0)
    );
}

fn main() {
    let bin = std::env::var("COFFRE_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/coffre").to_string()
    });
    // `cargo test --benches` runs this without `--bench`: measure nothing.
    let Some(rt) = support::runtime_if_measuring() else {
        return;
    };
    rt.block_on(async {
        let root = tempfile::tempdir().unwrap();
        // An older release refuses the [connections] table.
        let s = start(&bin, root.path(), true)
            .or_else(|| {
                let _ = std::fs::remove_dir_all(root.path().join("data"));
                start(&bin, root.path(), false)
            })
            .expect("server starts");
        println!("measuring {bin}");
        let token = setup(&s.addr).await;
        seed(&s.addr, &token).await;
        stalled_bulk_reads(&s, &token).await;
        let cap = Duration::from_secs(60);
        silent_connections(&s, 1000).await;
        match idle_after_a_call(&s.addr, cap).await {
            Some(t) => println!("idle after one call: closed after {t:.1} s"),
            None => println!("idle after one call: still open after {} s", cap.as_secs()),
        }
        let token = login(&s.addr, "clinic", "dr", CLIN).await;
        flood(&s.addr, &token, root.path()).await;
    });
}
