//! Single sign-on cost: `Auth/LoginOidc` latency with the provider's keys
//! cached (ES256 and RS256 id tokens, each single use), and an honest
//! client's GetRecord p99 while a flood of invalid id tokens (right `kid`,
//! bad signature: the most expensive to refuse) runs from 16 clients — with
//! the default per-address limit of refused calls, and with it lifted (a
//! flood spread over many addresses).
//!
//! `cargo bench --bench identity`; figures go to BENCHMARKS.md by hand.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

mod support;

use coffre::pb::{self, admin_client::AdminClient, auth_client::AuthClient};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use support::{PW, ROOMY_LIMITS, authed, connect};

const ISSUER: &str = "https://sso.bench.example/realms/staff";

struct Signer {
    enc: EncodingKey,
    alg: Algorithm,
    kid: &'static str,
}

impl Signer {
    fn token(&self, n: u64) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.into());
        jsonwebtoken::encode(
            &h,
            &serde_json::json!({
                "iss": ISSUER, "aud": "coffre", "sub": "s1", "iat": now, "exp": now + 300,
                "jti": format!("bench-{n}"),
            }),
            &self.enc,
        )
        .unwrap()
    }
}

fn percentile(v: &mut [u64], p: usize) -> f64 {
    v.sort_unstable();
    v[(v.len() * p / 100).min(v.len() - 1)] as f64 / 1000.0
}

async fn server(jwks: &std::path::Path, refused_limit: bool) -> support::Bench {
    let mut extra = format!(
        "{ROOMY_LIMITS}\n[oidc.bench]\nissuer = {ISSUER:?}\naudience = \"coffre\"\n\
         jwks_file = {jwks:?}\ntenant = \"b\"\n"
    );
    if !refused_limit {
        extra.push_str("[connections]\nrefused_per_second = 1000000.0\nrefused_burst = 1000000\n");
    }
    let b = support::start_with(&extra, |b| b, support::RECORDS).await;
    let ch = connect(&b.addr).await;
    let admin = AuthClient::new(ch.clone())
        .login(pb::LoginRequest {
            tenant: "system".into(),
            username: "admin".into(),
            password: PW.into(),
            otp: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    AdminClient::new(ch)
        .create_principal(authed(
            &admin,
            pb::CreatePrincipalRequest {
                tenant: "b".into(),
                username: "sso".into(),
                password: String::new(),
                role: pb::Role::Clinician as i32,
                oidc: "bench:s1".into(),
            },
        ))
        .await
        .unwrap();
    b
}

/// `n` logins with fresh tokens (jti from `first` on: each token is single use).
async fn login_latency(b: &support::Bench, signer: &Signer, first: u64, n: u64) -> (f64, f64, f64) {
    let tokens: Vec<String> = (first..first + n).map(|i| signer.token(i)).collect();
    let mut c = AuthClient::new(connect(&b.addr).await);
    let mut lat = Vec::new();
    for t in tokens {
        let start = Instant::now();
        c.login_oidc(pb::LoginOidcRequest {
            provider: "bench".into(),
            id_token: t,
        })
        .await
        .unwrap();
        lat.push(start.elapsed().as_micros() as u64);
    }
    (
        percentile(&mut lat, 50),
        percentile(&mut lat, 90),
        percentile(&mut lat, 99),
    )
}

/// The honest client's GetRecord figures alone, then during a flood paced
/// at `per_second` calls (the load generator shares the server's cores:
/// unpaced, it measures itself); and how many flood calls were made.
async fn flood(
    b: &support::Bench,
    signer: &Signer,
    secs: u64,
    per_second: u64,
) -> (support::Load, support::Load, u64) {
    let quiet = b.get_load(1, Duration::from_secs(secs)).await;
    let bad = {
        let t = signer.token(u64::MAX);
        let (body, sig) = t.rsplit_once('.').unwrap();
        let mut s = sig.to_string().into_bytes();
        s[5] = if s[5] == b'A' { b'B' } else { b'A' };
        format!("{body}.{}", String::from_utf8(s).unwrap())
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut flooders = Vec::new();
    for _ in 0..16 {
        let mut c = AuthClient::new(connect(&b.addr).await);
        let (bad, stop, sent) = (bad.clone(), stop.clone(), sent.clone());
        let mut tick = tokio::time::interval(Duration::from_micros(16_000_000 / per_second));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flooders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let _ = c
                    .login_oidc(pb::LoginOidcRequest {
                        provider: "bench".into(),
                        id_token: bad.clone(),
                    })
                    .await;
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = b.get_load(1, Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        let _ = f.await;
    }
    (quiet, during, sent.load(Ordering::Relaxed))
}

fn main() {
    let Some(rt) = support::runtime_if_measuring() else {
        return;
    };
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let kp = rcgen::KeyPair::generate().unwrap();
        let es = Signer {
            enc: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            alg: Algorithm::ES256,
            kid: "k1",
        };
        let rs = {
            use rsa::pkcs8::{EncodePrivateKey, LineEnding};
            let key = rsa::PrivateKey::new(&mut rand_rsa::rng(), 2048).unwrap();
            let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
            Signer {
                enc: EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
                alg: Algorithm::RS256,
                kid: "r1",
            }
        };
        let jwk = |s: &Signer| {
            let mut j = Jwk::from_encoding_key(&s.enc, s.alg).unwrap();
            j.common.key_id = Some(s.kid.into());
            j
        };
        let jwks = dir.path().join("jwks.json");
        std::fs::write(
            &jwks,
            serde_json::json!({ "keys": [jwk(&es), jwk(&rs)] }).to_string(),
        )
        .unwrap();
        let signer = es;

        let b = server(&jwks, true).await;
        // Warm up: keys read, connections open.
        login_latency(&b, &signer, 0, 50).await;
        let (p50, p90, p99) = login_latency(&b, &signer, 1000, 2000).await;
        println!("LoginOidc, ES256, keys cached, 2000 sequential logins: p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms");
        let (p50, p90, p99) = login_latency(&b, &rs, 10_000, 2000).await;
        println!("LoginOidc, RS256 (2048), keys cached, 2000 sequential logins: p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms");
        let (quiet, during, sent) = flood(&b, &signer, 5, 5000).await;
        println!(
            "invalid-token flood at 5,000/s, default refused-call limit: GetRecord p99 {:.2} → {:.2} ms ({:.2}×), p50 {:.2} → {:.2} ms, {} flood calls",
            quiet.p99_ms, during.p99_ms, during.p99_ms / quiet.p99_ms, quiet.p50_ms, during.p50_ms, sent
        );
        b.stop().await;

        let b = server(&jwks, false).await;
        login_latency(&b, &signer, 0, 50).await;
        for (rate, signer, alg) in [(1000, &signer, "ES256"), (5000, &signer, "ES256"), (5000, &rs, "RS256")] {
            let (quiet, during, sent) = flood(&b, signer, 5, rate).await;
            println!(
                "invalid {alg} token flood at {rate}/s, refused-call limit lifted: GetRecord p99 {:.2} → {:.2} ms ({:.2}×), p50 {:.2} → {:.2} ms, {} flood calls",
                quiet.p99_ms, during.p99_ms, during.p99_ms / quiet.p99_ms, quiet.p50_ms, during.p50_ms, sent
            );
        }
        b.stop().await;
    });
}
