//! What an attacker found and the fixes hold against: parallel guesses,
//! stale write-backs undoing a lock, locked accounts that answer
//! differently, oversize requests stored whole in the trail, undecodable
//! requests left unaudited, revoked tokens whose calls lose their author,
//! floods of refused calls, stalled streams and silent connections.

mod common;

use std::time::Duration;

use bytes::{Buf, BufMut};
use coffre::pb::{self, auth_client::AuthClient};
use common::*;
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

const AUDITOR_PASSWORD: &str = "quartz meadow 7741 ember finch";

async fn auditor(s: &TestServer) -> String {
    s.principal("system", "dpo", pb::Role::Auditor, AUDITOR_PASSWORD)
        .await;
    s.login("system", "dpo", AUDITOR_PASSWORD).await.unwrap()
}

async fn list(s: &TestServer, tenant: &str) -> Vec<pb::PrincipalInfo> {
    let admin = s.admin_token().await;
    s.admin()
        .await
        .list_principals(authed(
            &admin,
            pb::ListPrincipalsRequest {
                tenant: tenant.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .principals
}

async fn locked(s: &TestServer, tenant: &str, user: &str) -> bool {
    list(s, tenant)
        .await
        .into_iter()
        .find(|p| p.username == user)
        .expect("principal listed")
        .locked
}

/// `n` logins to clinic/dr_a with `password`, all at once; their codes.
async fn parallel_logins(s: &TestServer, n: usize, password: &str) -> Vec<Code> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let ch = s.channel().await;
        let pw = password.to_string();
        tasks.push(tokio::spawn(async move {
            AuthClient::new(ch)
                .login(pb::LoginRequest {
                    otp: Default::default(),
                    tenant: "clinic".into(),
                    username: "dr_a".into(),
                    password: pw,
                })
                .await
                .map(|_| Code::Ok)
                .unwrap_or_else(|e| e.code())
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    codes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_guesses_lock_the_account_like_sequential_ones() {
    // The production Argon2id cost: a cheap hash leaves the race (read the
    // failure count, hash, write it back) too short a window to show.
    let root = tempfile::tempdir().unwrap();
    let mut config = test_config(root.path());
    config.argon2 = Default::default();
    let s = TestServer::start_with(root, config).await;
    s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    for round in 0..2 {
        let codes = parallel_logins(&s, 30, "wrong password guess").await;
        assert!(
            codes.iter().all(|c| *c == Code::Unauthenticated),
            "round {round}: every guess answers as bad credentials: {codes:?}"
        );
    }
    let e = s
        .login("clinic", "dr_a", CLINICIAN_PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "the right password after 60 guesses"
    );
    let me = list(&s, "clinic").await;
    assert!(me[0].locked, "listed as locked: {:?}", me[0]);
    assert!(me[0].failed_logins >= 5);
    assert!(
        me[0].lock_reason.contains("failed logins"),
        "{}",
        me[0].lock_reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_honeytoken_lock_survives_concurrent_logins() {
    let s = TestServer::start().await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let canary = s.honeytoken("clinic").await;
    // Failed logins on record: every successful login writes the principal
    // back (resetting them), which used to carry a stale, unlocked copy.
    for _ in 0..3 {
        s.login("clinic", "dr_a", "wrong password guess")
            .await
            .unwrap_err();
    }
    let logins = {
        let chans = futures::future::join_all((0..16).map(|_| s.channel())).await;
        chans
            .into_iter()
            .map(|ch| {
                tokio::spawn(async move {
                    AuthClient::new(ch)
                        .login(pb::LoginRequest {
                            otp: Default::default(),
                            tenant: "clinic".into(),
                            username: "dr_a".into(),
                            password: CLINICIAN_PASSWORD.into(),
                        })
                        .await
                })
            })
            .collect::<Vec<_>>()
    };
    let read = s
        .records()
        .await
        .get_record(authed(&token, get(&canary)))
        .await;
    assert_eq!(
        read.unwrap_err().code(),
        Code::PermissionDenied,
        "the canary locks"
    );
    let mut tokens = Vec::new();
    for l in logins {
        if let Ok(r) = l.await.unwrap() {
            tokens.push(r.into_inner().token);
        }
    }
    assert!(locked(&s, "clinic", "dr_a").await, "the lock stays");
    let e = s
        .login("clinic", "dr_a", CLINICIAN_PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // A token issued by a login that raced the lock does not work either.
    let mut r = s.records().await;
    for t in tokens.iter().chain([&token]) {
        let e = r.get_record(authed(t, get("p-1"))).await.unwrap_err();
        assert!(
            matches!(e.code(), Code::PermissionDenied | Code::Unauthenticated),
            "{e:?}"
        );
    }
}

#[tokio::test]
async fn a_locked_account_answers_like_bad_credentials_and_is_listed() {
    let s = TestServer::start().await;
    s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let admin = s.admin_token().await;
    let unknown = s
        .login("clinic", "nobody", "wrong password guess")
        .await
        .unwrap_err();
    s.admin()
        .await
        .set_principal_locked(authed(
            &admin,
            pb::SetPrincipalLockedRequest {
                tenant: "clinic".into(),
                username: "dr_a".into(),
                locked: true,
            },
        ))
        .await
        .unwrap();
    for pw in ["wrong password guess", CLINICIAN_PASSWORD] {
        let e = s.login("clinic", "dr_a", pw).await.unwrap_err();
        assert_eq!((e.code(), e.message()), (unknown.code(), unknown.message()));
    }
    let l = list(&s, "clinic").await;
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].role, "clinician");
    assert!(l[0].locked);
    assert_eq!(l[0].lock_reason, "locked by an administrator");
    // An auditor of the tenant may list it; a clinician may not.
    s.principal("clinic", "dpo", pb::Role::Auditor, AUDITOR_PASSWORD)
        .await;
    let aud = s.login("clinic", "dpo", AUDITOR_PASSWORD).await.unwrap();
    let mut a = s.admin().await;
    let seen = a
        .list_principals(authed(
            &aud,
            pb::ListPrincipalsRequest {
                tenant: "clinic".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .principals;
    assert_eq!(seen.len(), 2);
    let other = a
        .list_principals(authed(
            &aud,
            pb::ListPrincipalsRequest {
                tenant: "system".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn calls_with_a_revoked_token_are_attributed() {
    let s = TestServer::start().await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let auditor = auditor(&s).await;
    let admin = s.admin_token().await;
    let lock = |locked| pb::SetPrincipalLockedRequest {
        tenant: "clinic".into(),
        username: "dr_a".into(),
        locked,
    };
    let mut a = s.admin().await;
    a.set_principal_locked(authed(&admin, lock(true)))
        .await
        .unwrap();
    let mut r = s.records().await;
    let locked = r.get_record(authed(&token, get("p-9"))).await.unwrap_err();
    a.set_principal_locked(authed(&admin, lock(false)))
        .await
        .unwrap();
    let revoked = r.get_record(authed(&token, get("p-9"))).await.unwrap_err();
    assert_eq!(locked.code(), Code::PermissionDenied);
    assert_eq!(
        revoked.code(),
        Code::Unauthenticated,
        "the lock revoked the token"
    );
    let evs = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            action: "coffre.v1.Records/GetRecord".into(),
            ..Default::default()
        },
    )
    .await;
    let outcomes: Vec<_> = evs
        .iter()
        .map(|e| (e.principal.as_str(), e.role.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("clinic/dr_a", "clinician", "permission_denied"),
            ("clinic/dr_a", "clinician", "unauthenticated"),
        ]
    );
    // And it stays revoked after a restart.
    let mut s = s;
    s.restart().await;
    let e = s
        .records()
        .await
        .get_record(authed(&token, get("p-9")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn an_oversize_request_is_cut_in_the_trail() {
    let s = TestServer::start().await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let auditor = auditor(&s).await;
    s.vault.as_ref().unwrap().store.flush_blocking().unwrap();
    let before = s.stored_size();
    let mut r = s.records().await;
    let purpose = "p".repeat(2 * 1024 * 1024 - 100);
    for _ in 0..20 {
        let mut req = get("p-1");
        req.purpose = purpose.clone();
        let e = r.get_record(authed(&token, req)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
    }
    s.vault.as_ref().unwrap().store.flush_blocking().unwrap();
    let grown = s.stored_size().saturating_sub(before);
    println!("20 calls with a 2 MB purpose grew the data directory by {grown} bytes");
    assert!(grown < 1024 * 1024, "grew by {grown} bytes");
    let evs = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            outcome: "invalid_argument".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(evs.len(), 20);
    for e in evs {
        assert!(e.purpose.len() <= 256 + coffre::audit::CUT_MARK.len());
        assert!(e.purpose.ends_with(coffre::audit::CUT_MARK));
    }
}

/// Sends raw bytes as the request message of any method.
#[derive(Clone, Default)]
struct Raw;

struct RawEnc;
struct RawDec;

impl Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

async fn raw_call(
    ch: Channel,
    path: &'static str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    let req = match token {
        Some(t) => authed(t, body),
        None => Request::new(body),
    };
    g.unary(req, http::uri::PathAndQuery::from_static(path), Raw)
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn undecodable_requests_are_invalid_argument_and_audited() {
    let s = TestServer::start().await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let admin = s.admin_token().await;
    let auditor = auditor(&s).await;
    const PUT: &str = "/coffre.v1.Records/PutRecord";
    let garbage: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0xA5).collect();
    // PutRecordRequest { record: Record { id: <invalid UTF-8> } }
    let bad_utf8 = vec![0x0a, 0x04, 0x0a, 0x02, 0xff, 0xfe];
    let huge = vec![0x0a; 10 * 1024 * 1024];
    for body in [garbage.clone(), bad_utf8, huge] {
        let e = raw_call(s.channel().await, PUT, Some(&token), body)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    // Authentication and authorization come first.
    let e = raw_call(s.channel().await, PUT, None, garbage.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = raw_call(s.channel().await, PUT, Some(&admin), garbage)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let evs = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            action: "coffre.v1.Records/PutRecord".into(),
            ..Default::default()
        },
    )
    .await;
    let seen: Vec<_> = evs
        .iter()
        .map(|e| (e.principal.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("clinic/dr_a", "invalid_argument"),
            ("clinic/dr_a", "invalid_argument"),
            ("clinic/dr_a", "invalid_argument"),
            ("", "unauthenticated"),
            ("system/admin", "permission_denied"),
        ]
    );
    // A well-formed call still works through the same path.
    let ok = pb::PutRecordRequest {
        record: Some(pb::Record {
            id: "p-1".into(),
            fields: [("nir".to_string(), "1".to_string())].into(),
            version: 0,
        }),
    };
    raw_call(
        s.channel().await,
        PUT,
        Some(&token),
        prost::Message::encode_to_vec(&ok),
    )
    .await
    .unwrap();
}

/// A probe for methods the server does not have leaves a trace: the
/// path (bounded) and whoever the token names.
#[tokio::test]
async fn unknown_methods_are_audited() {
    let s = TestServer::start().await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let auditor = auditor(&s).await;
    const NOPE: &str = "/coffre.v1.Records/ExportEverything";
    let long: &'static str = Box::leak(format!("/x.Y/{}", "z".repeat(5000)).into_boxed_str());
    for (path, tok) in [(NOPE, Some(token.as_str())), (long, None)] {
        let e = raw_call(s.channel().await, path, tok, vec![])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    }
    let evs = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            action: "unknown".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert_eq!(evs[0].principal, "clinic/dr_a");
    assert_eq!(evs[0].outcome, "unimplemented");
    assert_eq!(evs[0].fields, vec![format!("path={NOPE}")]);
    assert_eq!(evs[1].principal, "");
    assert!(
        evs[1].fields[0].len() <= 128 + "…[cut]".len(),
        "{:?}",
        evs[1].fields
    );
    assert!(evs[1].fields[0].ends_with("…[cut]"));
}

/// Two `authorization` headers: which one counts would depend on who
/// reads them; neither does.
#[tokio::test]
async fn two_authorization_headers_authenticate_nobody() {
    let s = TestServer::start().await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let mut r = s.records().await;
    let mut req = authed(&token, get("x"));
    req.metadata_mut()
        .append("authorization", format!("Bearer {token}").parse().unwrap());
    let e = r.get_record(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // One header still works.
    let e = r.get_record(authed(&token, get("x"))).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Undecodable requests go through the same rule.
    let mut g = tonic::client::Grpc::new(s.channel().await);
    g.ready().await.unwrap();
    let mut req = authed(&token, vec![0xffu8; 8]);
    req.metadata_mut()
        .append("authorization", format!("Bearer {token}").parse().unwrap());
    let e = g
        .unary(
            req,
            http::uri::PathAndQuery::from_static("/coffre.v1.Records/PutRecord"),
            Raw,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_refused_calls_is_summed_up_not_stored_each() {
    let root = tempfile::tempdir().unwrap();
    let mut config = test_config(root.path());
    config.connections.refused_per_second = 5.0;
    config.connections.refused_burst = 50;
    config.connections.refused_summary_secs = 1;
    let s = TestServer::start_with(root, config).await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let auditor = auditor(&s).await;
    s.vault.as_ref().unwrap().store.flush_blocking().unwrap();
    let before = s.stored_size();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let ch = s.channel().await;
        tasks.push(tokio::spawn(async move {
            let mut codes = std::collections::BTreeMap::<String, u32>::new();
            for i in 0..6250u32 {
                let bogus = format!("cf1.bogus-{w}-{i}");
                let r = raw_call(
                    ch.clone(),
                    "/coffre.v1.Records/GetRecord",
                    Some(&bogus),
                    vec![0xff; 16],
                )
                .await;
                *codes
                    .entry(format!("{:?}", r.unwrap_err().code()))
                    .or_default() += 1;
            }
            codes
        }));
    }
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *codes.entry(k).or_default() += v;
        }
    }
    println!("50,000 garbage calls answered: {codes:?}");
    assert_eq!(codes.values().sum::<u32>(), 50_000);
    assert!(codes.get("ResourceExhausted").copied().unwrap_or(0) > 40_000);
    // Honest clients are unaffected.
    s.records()
        .await
        .put_record(authed(&token, put("p-1", &[("nir", "1")])))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.vault.as_ref().unwrap().store.flush_blocking().unwrap();
    let grown = s.stored_size().saturating_sub(before);
    println!("the trail grew by {grown} bytes");
    assert!(grown < 1024 * 1024, "grew by {grown} bytes");
    let summaries = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            action: "summary/refused_calls".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(!summaries.is_empty());
    let counted: u64 = summaries
        .iter()
        .map(|e| {
            e.purpose
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    let single = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            action: "coffre.v1.Records/GetRecord".into(),
            ..Default::default()
        },
    )
    .await
    .len() as u64;
    assert_eq!(counted + single, 50_000, "every call is accounted for");
}

/// A client whose HTTP/2 windows are the protocol's minimum, so a reader
/// that stops reading stalls the server after 64 KiB.
async fn narrow_channel(s: &TestServer) -> Channel {
    tonic::transport::Endpoint::from_shared(s.addr.clone())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap()
}

async fn seed_big(s: &TestServer, token: &str, n: usize) -> Vec<String> {
    let mut r = s.records().await;
    let value = "x".repeat(16 * 1024);
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("big-{i}");
        r.put_record(authed(token, put(&id, &[("nir", "1"), ("notes", &value)])))
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

fn bulk(ids: &[String]) -> pb::BulkReadRequest {
    pb::BulkReadRequest {
        ids: ids.to_vec(),
        fields: vec![],
        purpose: "transfer".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_dropped_and_audited() {
    let root = tempfile::tempdir().unwrap();
    let mut config = test_config(root.path());
    config.connections.stream_send_timeout_secs = 1;
    let s = TestServer::start_with(root, config).await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let auditor = auditor(&s).await;
    let ids = seed_big(&s, &token, 64).await;
    let mut r = pb::records_client::RecordsClient::new(narrow_channel(&s).await);
    let mut stream = r
        .bulk_read(authed(&token, bulk(&ids)))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let evs = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            outcome: "deadline_exceeded".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(evs.len(), 1, "one event for the dropped stream");
    assert_eq!(evs[0].action, "coffre.v1.Records/BulkRead");
    assert_eq!(evs[0].principal, "clinic/dr_a");
    assert!(
        evs[0].purpose.starts_with("stream dropped"),
        "{}",
        evs[0].purpose
    );
    // The reader wakes up to what was buffered, then to a status that
    // says the stream was cut: never a silent OK on a short stream.
    let mut got = 0;
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    assert!(got < ids.len(), "got {got} of {}", ids.len());
    let e = end.expect("a dropped stream must not end OK");
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("stopped reading"), "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_per_principal_are_capped_without_locking() {
    let root = tempfile::tempdir().unwrap();
    let mut config = test_config(root.path());
    config.connections.max_streams_per_principal = 2;
    let s = TestServer::start_with(root, config).await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let ids = seed_big(&s, &token, 64).await;
    // Eight streams asked for at once: exactly the cap get through.
    let chans = futures::future::join_all((0..8).map(|_| narrow_channel(&s))).await;
    let tries = chans.into_iter().map(|ch| {
        let (token, ids) = (token.clone(), ids.clone());
        tokio::spawn(async move {
            pb::records_client::RecordsClient::new(ch)
                .bulk_read(authed(&token, bulk(&ids)))
                .await
        })
    });
    let mut held = Vec::new();
    let mut refused = 0;
    for t in futures::future::join_all(tries).await {
        match t.unwrap() {
            Ok(st) => held.push(st.into_inner()),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                refused += 1;
            }
        }
    }
    assert_eq!((held.len(), refused), (2, 6));
    let mut r = s.records().await;
    for _ in 0..10 {
        let e = r
            .get_record(authed(&token, get("big-1")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
    }
    assert!(
        !locked(&s, "clinic", "dr_a").await,
        "a stream cap is no throttle"
    );
    drop(held);
    // The permits come back once the streams are gone.
    let mut ok = false;
    for _ in 0..50 {
        if r.get_record(authed(&token, get("big-1"))).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "reads work again once the streams end");
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let root = tempfile::tempdir().unwrap();
    let mut config = test_config(root.path());
    config.connections.handshake_secs = 1;
    config.connections.idle_secs = 1;
    let s = TestServer::start_with(root, config).await;
    let addr = s.addr.trim_start_matches("http://").to_string();
    let closed_within = |mut c: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(Duration::from_secs(10), async move {
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    };
    // Never speaks.
    let silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // Sends the HTTP/2 preface and nothing more.
    let mut preface = tokio::net::TcpStream::connect(&addr).await.unwrap();
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    assert!(closed_within(silent).await, "a silent connection is closed");
    assert!(
        closed_within(preface).await,
        "a preface-only connection is closed"
    );
    // A connection that made a call, then idles.
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut body) = client.send_request(req, false).unwrap();
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut rb = resp.into_body();
    while let Some(chunk) = rb.data().await {
        let _ = chunk.unwrap();
    }
    let _ = rb.trailers().await;
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(ended.is_ok(), "an idle connection is closed");
}

/// An auditor's export piped into a reader that stalls (`| (sleep; cat)`)
/// must not look complete: the stream is dropped with DEADLINE_EXCEEDED
/// and the command exits non-zero, naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_export_exits_non_zero() {
    use std::io::Read;
    let root = tempfile::tempdir().unwrap();
    let mut config = test_config(root.path());
    config.connections.stream_send_timeout_secs = 1;
    let s = TestServer::start_with(root, config).await;
    let token = s.tenant_with("clinic", "dr_a", pb::Role::Clinician).await;
    let auditor = auditor(&s).await;
    // Enough events that the pipe and the HTTP/2 windows (megabytes) fill
    // up: each PutRecord event names its 200 fields.
    let names: Vec<String> = (0..200)
        .map(|j| format!("f{j:03}_{}", "x".repeat(56)))
        .collect();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let ch = s.channel().await;
        let token = token.clone();
        let names = names.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = pb::records_client::RecordsClient::new(ch);
            let fields: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
            for i in 0..100 {
                r.put_record(authed(&token, put(&format!("p-{w}-{i}"), &fields)))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut child = std::process::Command::new(bin())
        .args([
            "--addr", &s.addr, "audit", "export", "--format", "jsonl", "--since", "30d",
        ])
        .env("COFFRE_TOKEN", &auditor)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader sleeps, then reads everything.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    let lines = out.iter().filter(|b| **b == b'\n').count();
    assert!(
        lines < 800,
        "the export was not cut ({lines} lines): make it bigger"
    );
    assert!(!status.success(), "{lines} lines and exit 0");
    assert!(err.contains("DeadlineExceeded"), "{err}");
    assert!(err.contains("stopped reading"), "{err}");
    assert!(!err.contains("expects TLS"), "{err}");
}
