//! Single sign-on against a real OpenID Connect issuer started by the test
//! on loopback: keys generated here, a JWKS endpoint, tokens it signs. Every
//! way a token can be wrong answers like a bad password and is audited with
//! its reason; a key rotation at the issuer is picked up without a restart.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use coffre::pb::{self, auth_client::AuthClient};
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ISSUER: &str = "https://auth.esante.gouv.fr/auth/realms/esante-wallet";
const AUDIENCE: &str = "coffre-clinic";
const SUBJECT: &str = "810001234567";
const BAD: &str = "invalid tenant, username or password";

/// A signing key of the issuer, generated here: ES256 (P-256) or RS256
/// (RSA 2048, as Pro Santé Connect signs).
struct SigningKey {
    kid: String,
    alg: Algorithm,
    enc: EncodingKey,
    public_pem: String,
    jwk: Jwk,
}

impl SigningKey {
    fn new(kid: &str) -> Self {
        let kp = rcgen::KeyPair::generate().unwrap();
        let enc = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
        let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(kid.into());
        Self {
            kid: kid.into(),
            alg: Algorithm::ES256,
            enc,
            public_pem: kp.public_key_pem(),
            jwk,
        }
    }

    fn rsa(kid: &str) -> Self {
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let key = rsa::PrivateKey::new(&mut rand_rsa::rng(), 2048).unwrap();
        let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
        let enc = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
        let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some(kid.into());
        Self {
            kid: kid.into(),
            alg: Algorithm::RS256,
            enc,
            public_pem: key
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.enc).unwrap()
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// The issuer's JWKS endpoint: serves whatever keys it holds now, counting
/// the fetches.
struct Issuer {
    url: String,
    keys: Arc<Mutex<Vec<Jwk>>>,
    fetches: Arc<AtomicUsize>,
}

impl Issuer {
    async fn start(keys: &[&SigningKey]) -> Self {
        Self::serve(keys, None).await
    }

    /// Over HTTPS, with a certificate for `localhost` signed by a CA made
    /// here; returns the CA (PEM) Coffre must trust.
    async fn start_tls(keys: &[&SigningKey]) -> (Self, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        (Self::serve(keys, Some(acceptor)).await, ca.pem())
    }

    async fn serve(keys: &[&SigningKey], tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = match tls {
            Some(_) => format!("https://localhost:{port}/jwks"),
            None => format!("http://127.0.0.1:{port}/jwks"),
        };
        let held = Arc::new(Mutex::new(keys.iter().map(|k| k.jwk.clone()).collect()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (k, f) = (held.clone(), fetches.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (k, f, tls) = (k.clone(), f.clone(), tls.clone());
                tokio::spawn(async move {
                    let mut sock: Box<dyn Stream> = match tls {
                        Some(t) => match t.accept(tcp).await {
                            Ok(s) => Box::new(s),
                            Err(_) => return,
                        },
                        None => Box::new(tcp),
                    };
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    f.fetch_add(1, Ordering::SeqCst);
                    let body = json!({"keys": *k.lock()}).to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                });
            }
        });
        Self {
            url,
            keys: held,
            fetches,
        }
    }

    fn publish(&self, keys: &[&SigningKey]) {
        *self.keys.lock() = keys.iter().map(|k| k.jwk.clone()).collect();
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The claims of a good Pro Santé Connect id token for `sub`.
fn claims(sub: &str) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now() - 5,
        "exp": now() + 300,
        "acr": "eidas3",
        "jti": uuid::Uuid::new_v4().to_string(),
    })
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

fn without(mut c: Value, key: &str) -> Value {
    c.as_object_mut().unwrap().remove(key);
    c
}

/// A server with provider `psc` logging in to tenant `clinic`, where
/// `clinic/dr-house` is bound to the issuer's `SUBJECT` (and has no
/// password).
async fn server(issuer: &Issuer) -> TestServer {
    server_with(issuer, "").await
}

/// [`server`] with `extra` lines in `[oidc.psc]`.
async fn server_with(issuer: &Issuer, extra: &str) -> TestServer {
    let root = tempfile::tempdir().unwrap();
    let config = test_config_with(
        root.path(),
        &format!(
            "{ROOMY_LIMITS}\n[oidc.psc]\nissuer = {ISSUER:?}\naudience = {AUDIENCE:?}\n\
             jwks_url = {:?}\ntenant = \"clinic\"\nrequired_acr = [\"eidas3\"]\n\
             max_age_secs = 120\nleeway_secs = 5\n{extra}",
            issuer.url
        ),
    );
    let s = TestServer::start_with(root, config).await;
    let admin = s.admin_token().await;
    let mut a = s.admin().await;
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
            tenant: "clinic".into(),
            username: "dr-house".into(),
            password: String::new(),
            role: pb::Role::Clinician as i32,
            oidc: format!("psc:{SUBJECT}"),
        },
    ))
    .await
    .unwrap();
    s
}

async fn login_oidc(s: &TestServer, provider: &str, token: &str) -> Result<String, tonic::Status> {
    AuthClient::new(s.channel().await)
        .login_oidc(pb::LoginOidcRequest {
            provider: provider.into(),
            id_token: token.into(),
        })
        .await
        .map(|r| r.into_inner().token)
}

/// The reasons the trail gives for the LoginOidc calls, oldest first
/// (`ok` for a session opened).
async fn reasons(s: &TestServer, auditor: &str) -> Vec<String> {
    events(
        s,
        auditor,
        pb::QueryAuditRequest {
            action: "coffre.v1.Auth/LoginOidc".into(),
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .map(|e| {
        e.fields
            .iter()
            .find_map(|f| f.strip_prefix("reason=").map(str::to_string))
            .unwrap_or_else(|| e.outcome.clone())
    })
    .collect()
}

#[tokio::test]
async fn an_id_token_logs_in_only_when_every_check_passes() {
    let key = SigningKey::new("k1");
    let stranger = SigningKey::new("ghost");
    let issuer = Issuer::start(&[&key]).await;
    let mut s = server(&issuer).await;
    let auditor = system_auditor(&s).await;

    // A good token: a session like a password login's, for the bound
    // principal.
    let good = key.sign(&claims(SUBJECT));
    let token = login_oidc(&s, "psc", &good).await.unwrap();
    s.records()
        .await
        .put_record(authed(&token, put("p1", &[("name", "Jeanne Martin")])))
        .await
        .unwrap();
    let ev = events(
        &s,
        &auditor,
        pb::QueryAuditRequest {
            action: "coffre.v1.Auth/LoginOidc".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ev[0].principal, "clinic/dr-house");
    assert_eq!(ev[0].outcome, "ok");
    assert!(ev[0].fields.contains(&"provider=psc".to_string()));

    // alg none: the claims of a good token, no signature.
    let none = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(claims(SUBJECT).to_string())
    );
    // HS256 keyed with the issuer's public key (algorithm confusion).
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(
        &hs,
        &claims(SUBJECT),
        &EncodingKey::from_secret(key.public_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    // A good token whose signature lost a bit.
    let flipped = {
        let t = key.sign(&claims(SUBJECT));
        let (body, sig) = t.rsplit_once('.').unwrap();
        let mut sig = B64.decode(sig).unwrap();
        sig[10] ^= 1;
        format!("{body}.{}", B64.encode(sig))
    };
    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            key.sign(&with(
                with(claims(SUBJECT), "exp", json!(now() - 60)),
                "iat",
                json!(now() - 100),
            )),
        ),
        (
            "not_yet_valid",
            key.sign(&with(claims(SUBJECT), "nbf", json!(now() + 600))),
        ),
        (
            "too_old",
            key.sign(&with(claims(SUBJECT), "iat", json!(now() - 600))),
        ),
        (
            "wrong_issuer",
            key.sign(&with(claims(SUBJECT), "iss", json!("https://evil.example"))),
        ),
        (
            "wrong_audience",
            key.sign(&with(claims(SUBJECT), "aud", json!("another-app"))),
        ),
        ("algorithm_not_allowed", none),
        ("algorithm_not_allowed", confused),
        ("unknown_key", stranger.sign(&claims(SUBJECT))),
        ("bad_signature", flipped),
        (
            "acr_not_accepted",
            key.sign(&without(claims(SUBJECT), "acr")),
        ),
        (
            "acr_not_accepted",
            key.sign(&with(claims(SUBJECT), "acr", json!("eidas1"))),
        ),
        ("unbound_subject", key.sign(&claims("899999999999"))),
        ("replayed", good.clone()),
        ("unknown_provider", key.sign(&claims(SUBJECT))),
    ];
    for (why, token) in &cases {
        let provider = if *why == "unknown_provider" {
            "keycloak"
        } else {
            "psc"
        };
        let e = login_oidc(&s, provider, token).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{why}");
        assert_eq!(e.message(), BAD, "{why}: the same answer as a bad password");
    }
    let mut want = vec!["ok".to_string()];
    want.extend(cases.iter().map(|(w, _)| w.to_string()));
    assert_eq!(reasons(&s, &auditor).await, want);

    // The trail never holds a token, nor its signature.
    let all = events(&s, &auditor, pb::QueryAuditRequest::default()).await;
    let text = format!("{all:?}");
    let sig = good.rsplit('.').next().unwrap();
    assert!(!text.contains(sig) && !text.contains(&good[..40]));

    // Single use survives a restart.
    s.restart().await;
    let e = login_oidc(&s, "psc", &good).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let auditor = s
        .login("system", "auditor", AUDITOR_PASSWORD)
        .await
        .unwrap();
    assert_eq!(reasons(&s, &auditor).await.last().unwrap(), "replayed");

    // A locked principal's good token opens nothing.
    let admin = s.admin_token().await;
    s.admin()
        .await
        .set_principal_locked(authed(
            &admin,
            pb::SetPrincipalLockedRequest {
                tenant: "clinic".into(),
                username: "dr-house".into(),
                locked: true,
            },
        ))
        .await
        .unwrap();
    let e = login_oidc(&s, "psc", &key.sign(&claims(SUBJECT)))
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.message()), (tonic::Code::Unauthenticated, BAD));
    assert_eq!(
        reasons(&s, &auditor).await.last().unwrap(),
        "account_locked"
    );

    // A principal bound to an identity and without a password cannot log
    // in with an empty password.
    let e = s.login("clinic", "dr-house", "").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
}

#[tokio::test]
async fn rsa_signed_tokens_as_pro_sante_connect_issues_them() {
    let rsa = SigningKey::rsa("psc-rs");
    let ec = SigningKey::new("k1");
    // A provider that publishes an RSA key without its `alg`.
    let mut bare = SigningKey::rsa("psc-bare");
    bare.jwk.common.key_algorithm = None;
    let issuer = Issuer::start(&[&rsa, &ec, &bare]).await;
    let s = server(&issuer).await;
    let auditor = system_auditor(&s).await;

    let good = rsa.sign(&claims(SUBJECT));
    login_oidc(&s, "psc", &good).await.unwrap();
    // PS256 with the key that names no algorithm: RSA all the same.
    let mut h = Header::new(Algorithm::PS256);
    h.kid = Some("psc-bare".into());
    let pss = jsonwebtoken::encode(&h, &claims(SUBJECT), &bare.enc).unwrap();
    login_oidc(&s, "psc", &pss).await.unwrap();

    let sign_as = |alg: Algorithm, kid: &str, key: &EncodingKey| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims(SUBJECT), key).unwrap()
    };
    let cases: Vec<(&str, String)> = vec![
        // HS256 keyed with the RSA public key: the classic confusion.
        (
            "algorithm_not_allowed",
            sign_as(
                Algorithm::HS256,
                "psc-rs",
                &EncodingKey::from_secret(rsa.public_pem.as_bytes()).unwrap(),
            ),
        ),
        // An RSA signature presented under the EC key's id.
        (
            "algorithm_not_allowed",
            sign_as(Algorithm::RS256, "k1", &rsa.enc),
        ),
        // PS256 under a key published for RS256 only.
        (
            "algorithm_not_allowed",
            sign_as(Algorithm::PS256, "psc-rs", &rsa.enc),
        ),
        // Signed by the bare key, presented as the published RS256 one.
        (
            "bad_signature",
            sign_as(Algorithm::RS256, "psc-rs", &bare.enc),
        ),
        ("replayed", good),
    ];
    for (why, token) in &cases {
        let e = login_oidc(&s, "psc", token).await.unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (tonic::Code::Unauthenticated, BAD),
            "{why}"
        );
    }
    let mut want = vec!["ok".to_string(), "ok".to_string()];
    want.extend(cases.iter().map(|(w, _)| w.to_string()));
    assert_eq!(reasons(&s, &auditor).await, want);
}

#[tokio::test]
async fn a_key_rotation_at_the_issuer_is_picked_up_and_unknown_kids_fetch_once_a_minute() {
    let old = SigningKey::new("2026-11");
    let issuer = Issuer::start(&[&old]).await;
    let s = server(&issuer).await;
    login_oidc(&s, "psc", &old.sign(&claims(SUBJECT)))
        .await
        .unwrap();
    let before = issuer.fetches.load(Ordering::SeqCst);
    assert!(before >= 1);

    // The issuer rotates: new key published, old one withdrawn. The first
    // token under the new key is accepted, without a restart.
    let new = SigningKey::new("2026-12");
    issuer.publish(&[&new]);
    login_oidc(&s, "psc", &new.sign(&claims(SUBJECT)))
        .await
        .unwrap();
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), before + 1);

    // A flood of tokens naming keys the issuer never had, in parallel:
    // refused, and no further fetch within the minute.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let k = SigningKey::new(&format!("made-up-{i}"));
        let t = k.sign(&claims(SUBJECT));
        let ch = s.channel().await;
        tasks.push(tokio::spawn(async move {
            AuthClient::new(ch)
                .login_oidc(pb::LoginOidcRequest {
                    provider: "psc".into(),
                    id_token: t,
                })
                .await
                .unwrap_err()
                .code()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), tonic::Code::Unauthenticated);
    }
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), before + 1);
    // Keys still cached: the current key keeps working meanwhile.
    login_oidc(&s, "psc", &new.sign(&claims(SUBJECT)))
        .await
        .unwrap();
}

#[tokio::test]
async fn one_token_opens_one_session_under_parallel_replays() {
    let key = SigningKey::new("k1");
    let issuer = Issuer::start(&[&key]).await;
    let s = server(&issuer).await;
    let token = key.sign(&claims(SUBJECT));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let ch = s.channel().await;
        let t = token.clone();
        tasks.push(tokio::spawn(async move {
            AuthClient::new(ch)
                .login_oidc(pb::LoginOidcRequest {
                    provider: "psc".into(),
                    id_token: t,
                })
                .await
                .is_ok()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    assert_eq!(ok, 1, "a token is single use whatever the concurrency");
}

/// The ECDSA twin of an ES256 token: the same header and payload, the
/// signature `(r, n - s)`, which verifies as well as `(r, s)`.
fn ecdsa_twin(token: &str) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    // The order of P-256's base point.
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let mut sig = B64.decode(sig).unwrap();
    assert_eq!(sig.len(), 64);
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = N[i] as i16 - sig[32 + i] as i16 - borrow;
        borrow = i16::from(d < 0);
        sig[32 + i] = d.rem_euclid(256) as u8;
    }
    assert_eq!(borrow, 0, "s < n");
    format!("{signed}.{}", B64.encode(sig))
}

#[tokio::test]
async fn an_es256_token_without_jti_is_single_use_whatever_its_signature_encoding() {
    let key = SigningKey::new("k1");
    let issuer = Issuer::start(&[&key]).await;
    let s = server(&issuer).await;
    let token = key.sign(&without(claims(SUBJECT), "jti"));
    let twin = ecdsa_twin(&token);
    assert_ne!(twin, token);
    // The twin is a valid signature: it logs in when it comes first.
    let other = key.sign(&with(
        without(claims(SUBJECT), "jti"),
        "iat",
        json!(now() - 6),
    ));
    login_oidc(&s, "psc", &ecdsa_twin(&other))
        .await
        .expect("a high-s ECDSA signature is legitimate");
    login_oidc(&s, "psc", &token).await.unwrap();
    let e = login_oidc(&s, "psc", &twin).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(e.message(), BAD);
    let auditor = system_auditor(&s).await;
    assert_eq!(reasons(&s, &auditor).await.last().unwrap(), "replayed");
}

#[tokio::test]
async fn bindings_name_a_configured_provider_of_the_tenant_and_one_principal_each() {
    let key = SigningKey::new("k1");
    let issuer = Issuer::start(&[&key]).await;
    let s = server(&issuer).await;
    let admin = s.admin_token().await;
    let create = |tenant: &str, user: &str, oidc: &str| pb::CreatePrincipalRequest {
        tenant: tenant.into(),
        username: user.into(),
        password: String::new(),
        role: pb::Role::Clinician as i32,
        oidc: oidc.into(),
    };
    let mut a = s.admin().await;
    for (req, why) in [
        (create("clinic", "x1", "keycloak:1"), "no such provider"),
        (create("clinic", "x2", "psc"), "no subject"),
        (create("clinic", "x3", ""), "no password and no identity"),
    ] {
        let e = a.create_principal(authed(&admin, req)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{why}");
    }
    // The subject already bound to dr-house, bound again in parallel:
    // refused every time; a new subject bound in parallel: exactly once.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut a = s.admin().await;
        let admin = admin.clone();
        tasks.push(tokio::spawn(async move {
            let mut bind = async |user: String, oidc: &str| {
                a.create_principal(authed(
                    &admin,
                    pb::CreatePrincipalRequest {
                        tenant: "clinic".into(),
                        username: user,
                        password: String::new(),
                        role: pb::Role::Clinician as i32,
                        oidc: oidc.into(),
                    },
                ))
                .await
                .is_ok()
            };
            let taken = bind(format!("dup{i}"), &format!("psc:{SUBJECT}")).await;
            let fresh = bind(format!("new{i}"), "psc:700000000001").await;
            (taken, fresh)
        }));
    }
    let (mut taken, mut fresh) = (0, 0);
    for t in tasks {
        let (a, b) = t.await.unwrap();
        taken += usize::from(a);
        fresh += usize::from(b);
    }
    assert_eq!((taken, fresh), (0, 1));
    // The loser's principal was not left behind without its binding.
    let list = s
        .admin()
        .await
        .list_principals(authed(
            &admin,
            pb::ListPrincipalsRequest {
                tenant: "clinic".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .principals;
    let names: Vec<_> = list.iter().map(|p| p.username.as_str()).collect();
    assert_eq!(names.iter().filter(|n| n.starts_with("new")).count(), 1);
    assert!(!names.iter().any(|n| n.starts_with("dup")));
    // The list shows each binding.
    let bound: Vec<_> = list
        .iter()
        .filter(|p| p.username.starts_with("new") || p.username == "dr-house")
        .map(|p| p.oidc.as_str())
        .collect();
    assert_eq!(bound.len(), 2, "{list:?}");
    assert!(bound.contains(&"psc:700000000001"), "{list:?}");
    assert!(
        bound.contains(&format!("psc:{SUBJECT}").as_str()),
        "{list:?}"
    );

    // A shredded tenant leaves no binding behind (they name its
    // principals), and its identities open nothing.
    s.admin()
        .await
        .shred_tenant(authed(
            &admin,
            pb::ShredTenantRequest {
                tenant: "clinic".into(),
                confirm: "clinic".into(),
            },
        ))
        .await
        .unwrap();
    let e = login_oidc(&s, "psc", &key.sign(&claims(SUBJECT)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let left = s
        .vault
        .as_ref()
        .unwrap()
        .store
        .scan_prefix(coffre::store::Space::Meta, b"oidc\0", usize::MAX)
        .await
        .unwrap();
    assert!(left.is_empty(), "{} bindings left", left.len());
}

#[tokio::test]
async fn keys_come_over_https_from_a_provider_signed_by_the_configured_ca() {
    let key = SigningKey::new("k1");
    let (issuer, ca) = Issuer::start_tls(&[&key]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("idp-ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let s = server_with(&issuer, &format!("ca_file = {ca_file:?}\n")).await;
    login_oidc(&s, "psc", &key.sign(&claims(SUBJECT)))
        .await
        .unwrap();
    assert!(issuer.fetches.load(Ordering::SeqCst) >= 1);

    // Without the CA, the provider's certificate is not trusted: no keys,
    // no login (and the trail says why).
    let key2 = SigningKey::new("k1");
    let (issuer2, _) = Issuer::start_tls(&[&key2]).await;
    let s2 = server(&issuer2).await;
    let e = login_oidc(&s2, "psc", &key2.sign(&claims(SUBJECT)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(issuer2.fetches.load(Ordering::SeqCst), 0);
    let auditor = system_auditor(&s2).await;
    assert_eq!(reasons(&s2, &auditor).await, vec!["keys_unavailable"]);
}
