//! OpenID Connect id tokens (Pro Santé Connect, Keycloak, ADFS, Entra ID):
//! which providers are trusted, their signing keys (JWKS, fetched and
//! cached), and the checks a token passes before it can open a session.
//!
//! Signatures are `jsonwebtoken`'s; this module decides which key and
//! algorithm a token may use and which claims it must carry. A refused
//! token gets one [`Refusal`] naming why, for the trail only: the client
//! hears the bad-password answer. Nothing here stores or logs a token.
//!
//! Keys are looked up by the token's `kid`; an unknown `kid` refetches the
//! JWKS at most once a minute (a key rotation at the provider is picked up
//! without a restart; a flood of made-up `kid`s costs one fetch a minute),
//! and keys older than an hour are refetched on use (a key the provider
//! withdrew stops working).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64URL};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use parking_lot::RwLock;

use crate::{clock::now_ms, config::OidcProviderConfig, crypto, model::TenantName};

/// Unknown `kid`s refetch the JWKS at most this often.
pub const REFETCH_EVERY: Duration = Duration::from_secs(60);
/// Keys fetched longer ago than this are fetched again before use.
const KEYS_MAX_AGE: Duration = Duration::from_secs(3600);
/// A JWKS document larger than this is refused.
const MAX_JWKS_BYTES: usize = 1 << 20;
const MAX_KEYS: usize = 100;
/// An id token longer than this is refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_AGE_SECS: u64 = 300;
const DEFAULT_LEEWAY_SECS: u64 = 30;
const MAX_SUBJECT_BYTES: usize = 255;

/// Why a token was refused: named in the audit event, never told to the
/// client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownProvider,
    Malformed,
    AlgorithmNotAllowed,
    UnknownKey,
    KeysUnavailable,
    BadSignature,
    Expired,
    NotYetValid,
    TooOld,
    IssuedInFuture,
    WrongIssuer,
    WrongAudience,
    MissingClaim,
    AcrNotAccepted,
    NoSubject,
    UnboundSubject,
    Replayed,
    Locked,
}

impl Refusal {
    /// Every reason, for series that exist before the first refusal.
    pub const ALL: [Refusal; 18] = [
        Refusal::UnknownProvider,
        Refusal::Malformed,
        Refusal::AlgorithmNotAllowed,
        Refusal::UnknownKey,
        Refusal::KeysUnavailable,
        Refusal::BadSignature,
        Refusal::Expired,
        Refusal::NotYetValid,
        Refusal::TooOld,
        Refusal::IssuedInFuture,
        Refusal::WrongIssuer,
        Refusal::WrongAudience,
        Refusal::MissingClaim,
        Refusal::AcrNotAccepted,
        Refusal::NoSubject,
        Refusal::UnboundSubject,
        Refusal::Replayed,
        Refusal::Locked,
    ];

    /// The reason as the trail names it (`reason=<this>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownProvider => "unknown_provider",
            Refusal::Malformed => "malformed_token",
            Refusal::AlgorithmNotAllowed => "algorithm_not_allowed",
            Refusal::UnknownKey => "unknown_key",
            Refusal::KeysUnavailable => "keys_unavailable",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::TooOld => "too_old",
            Refusal::IssuedInFuture => "issued_in_future",
            Refusal::WrongIssuer => "wrong_issuer",
            Refusal::WrongAudience => "wrong_audience",
            Refusal::MissingClaim => "missing_claim",
            Refusal::AcrNotAccepted => "acr_not_accepted",
            Refusal::NoSubject => "no_subject",
            Refusal::UnboundSubject => "unbound_subject",
            Refusal::Replayed => "replayed",
            Refusal::Locked => "account_locked",
        }
    }
}

/// A token that passed every check: who it names, and what makes it
/// single-use.
#[derive(Debug)]
pub struct Identity {
    pub provider: String,
    pub tenant: TenantName,
    pub subject: String,
    /// Names this token (its `jti`, or the whole token) in the replay
    /// cache, keyed so the cache holds no token.
    pub replay_key: [u8; 32],
    /// After this time the token is refused anyway (expiry or age): its
    /// replay entry can go.
    pub replay_until_ms: i64,
}

/// Where bindings are stored (in `Meta`): `oidc\0<provider>\0<subject>`
/// → `<tenant>\0<username>`.
pub const BINDING_PREFIX: &[u8] = b"oidc\0";

/// An identity bound to a principal: `<provider>:<subject>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub provider: String,
    pub subject: String,
}

impl Binding {
    /// `provider:subject`; the provider a config name, the subject 1 to
    /// 255 bytes without control characters.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (p, sub) = s
            .split_once(':')
            .ok_or("oidc identity must be <provider>:<subject>")?;
        if !valid_provider_name(p) {
            return Err("oidc provider name must match [a-z][a-z0-9_-]{0,31}".into());
        }
        if sub.is_empty() || sub.len() > MAX_SUBJECT_BYTES || sub.chars().any(char::is_control) {
            return Err("oidc subject must be 1 to 255 bytes, no control characters".into());
        }
        Ok(Self {
            provider: p.into(),
            subject: sub.into(),
        })
    }

    /// The key of the binding in storage.
    pub fn key(&self) -> Vec<u8> {
        let mut k = BINDING_PREFIX.to_vec();
        k.extend_from_slice(self.provider.as_bytes());
        k.push(0);
        k.extend_from_slice(self.subject.as_bytes());
        k
    }
}

impl std::fmt::Display for Binding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.provider, self.subject)
    }
}

fn valid_provider_name(p: &str) -> bool {
    let b = p.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

fn parse_algorithm(a: &str) -> Option<Algorithm> {
    match a {
        "RS256" => Some(Algorithm::RS256),
        "PS256" => Some(Algorithm::PS256),
        "ES256" => Some(Algorithm::ES256),
        _ => None,
    }
}

/// Checks one `[oidc.<name>]` table; the error is one line for the
/// operator.
pub fn check_config(name: &str, p: &OidcProviderConfig) -> Result<(), String> {
    let at = format!("oidc.{name}");
    if !valid_provider_name(name) {
        return Err(format!("{at}: the name must match [a-z][a-z0-9_-]{{0,31}}"));
    }
    if p.issuer.is_empty() || p.audience.is_empty() {
        return Err(format!("{at}: issuer and audience are required"));
    }
    if TenantName::parse(&p.tenant).is_err() {
        return Err(format!("{at}: tenant must name a tenant"));
    }
    match (&p.jwks_url, &p.jwks_file) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(format!("{at}: set exactly one of jwks_url and jwks_file"));
        }
        (Some(url), None) => {
            let uri: http::Uri = url
                .parse()
                .map_err(|_| format!("{at}: jwks_url is not a URL"))?;
            let host = uri.host().unwrap_or("");
            match uri.scheme_str() {
                Some("https") => {}
                Some("http") if is_loopback(host) => {}
                _ => {
                    return Err(format!(
                        "{at}: jwks_url must be https:// (plain http only to a loopback address)"
                    ));
                }
            }
        }
        (None, Some(_)) => {}
    }
    if let Some(algs) = &p.algorithms {
        if algs.is_empty() {
            return Err(format!("{at}: algorithms may not be empty"));
        }
        for a in algs {
            if parse_algorithm(a).is_none() {
                return Err(format!(
                    "{at}: algorithm {a:?} not allowed (RS256, PS256, ES256 only; never none or HMAC)"
                ));
            }
        }
    }
    if p.max_age_secs == Some(0) {
        return Err(format!("{at}: max_age_secs must be at least 1"));
    }
    Ok(())
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// The trusted providers.
pub struct Oidc {
    providers: HashMap<String, Provider>,
    /// Signatures are checked on the blocking pool, this many at once
    /// (one less than the cores): a flood of forged tokens queues there
    /// instead of taking every core from the other calls.
    verifying: Arc<tokio::sync::Semaphore>,
}

struct Provider {
    name: String,
    issuer: String,
    audience: String,
    tenant: TenantName,
    subject_claim: String,
    algorithms: Vec<Algorithm>,
    required_acr: Vec<String>,
    max_age_secs: u64,
    leeway_secs: u64,
    source: Source,
    keys: RwLock<Arc<Keys>>,
    /// Held while fetching: concurrent misses wait for one fetch.
    fetching: tokio::sync::Mutex<Fetches>,
}

/// When keys were last asked for, and why.
#[derive(Default)]
struct Fetches {
    /// Any attempt, successful or not.
    attempt: Option<Instant>,
    /// The last attempt an unknown `kid` caused.
    unknown_kid: Option<Instant>,
}

/// Why keys are fetched.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    /// At start-up.
    Start,
    /// They are older than [`KEYS_MAX_AGE`] (or were never fetched).
    Stale,
    /// A token names a key not among them.
    UnknownKid,
}

enum Source {
    Url {
        uri: http::Uri,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
    File(PathBuf),
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, (DecodingKey, Option<Algorithm>)>,
    fetched: Option<Instant>,
}

impl Oidc {
    /// The providers of the config (already checked by `check_config`).
    pub fn new(
        config: &std::collections::BTreeMap<String, OidcProviderConfig>,
    ) -> Result<Self, String> {
        let mut providers = HashMap::new();
        for (name, p) in config {
            check_config(name, p)?;
            let source = match (&p.jwks_url, &p.jwks_file) {
                (Some(url), _) => {
                    let uri: http::Uri =
                        url.parse().map_err(|_| format!("oidc.{name}: jwks_url"))?;
                    let tls = if uri.scheme_str() == Some("https") {
                        Some(Arc::new(
                            client_tls(p.ca_file.as_deref())
                                .map_err(|e| format!("oidc.{name}: {e}"))?,
                        ))
                    } else {
                        None
                    };
                    Source::Url { uri, tls }
                }
                (None, Some(f)) => Source::File(f.clone()),
                (None, None) => return Err(format!("oidc.{name}: set jwks_url or jwks_file")),
            };
            let algorithms = match &p.algorithms {
                Some(a) => a.iter().filter_map(|a| parse_algorithm(a)).collect(),
                None => vec![Algorithm::RS256, Algorithm::PS256, Algorithm::ES256],
            };
            providers.insert(
                name.clone(),
                Provider {
                    name: name.clone(),
                    issuer: p.issuer.clone(),
                    audience: p.audience.clone(),
                    tenant: TenantName::parse(&p.tenant)
                        .map_err(|_| format!("oidc.{name}: tenant"))?,
                    subject_claim: p.subject_claim.clone().unwrap_or_else(|| "sub".into()),
                    algorithms,
                    required_acr: p.required_acr.clone(),
                    max_age_secs: p.max_age_secs.unwrap_or(DEFAULT_MAX_AGE_SECS),
                    leeway_secs: p.leeway_secs.unwrap_or(DEFAULT_LEEWAY_SECS),
                    source,
                    keys: RwLock::new(Arc::new(Keys::default())),
                    fetching: tokio::sync::Mutex::new(Fetches::default()),
                },
            );
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self {
            providers,
            verifying: Arc::new(tokio::sync::Semaphore::new(cores.saturating_sub(1).max(1))),
        })
    }

    /// The tenant a provider logs in to, if the provider is configured.
    pub fn tenant_of(&self, provider: &str) -> Option<&TenantName> {
        self.providers.get(provider).map(|p| &p.tenant)
    }

    /// Whether a provider asks for an `acr` (an authentication context,
    /// which stands for the second factor its logins skip).
    pub fn requires_acr(&self, provider: &str) -> bool {
        self.providers
            .get(provider)
            .is_some_and(|p| !p.required_acr.is_empty())
    }

    /// Whether any provider is configured.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Fetches every provider's keys once (at start-up, so the first login
    /// does not wait); failures are logged and retried on use.
    pub async fn warm_up(&self) {
        for p in self.providers.values() {
            if let Err(e) = p.refresh(Why::Start).await {
                tracing::warn!(provider = %p.name, error = %e, "OIDC signing keys not fetched yet");
            }
        }
    }

    /// Checks `token` against `provider`'s keys and rules.
    pub async fn verify(&self, provider: &str, token: &str) -> Result<Identity, Refusal> {
        let p = self
            .providers
            .get(provider)
            .ok_or(Refusal::UnknownProvider)?;
        if token.len() > MAX_TOKEN_BYTES || token.split('.').count() != 3 {
            return Err(Refusal::Malformed);
        }
        let header = match jsonwebtoken::decode_header(token) {
            Ok(h) => h,
            // `none` and unknown algorithms do not parse as a header.
            Err(_) if header_alg(token).is_some() => return Err(Refusal::AlgorithmNotAllowed),
            Err(_) => return Err(Refusal::Malformed),
        };
        if !p.algorithms.contains(&header.alg) {
            return Err(Refusal::AlgorithmNotAllowed);
        }
        let kid = header.kid.clone().unwrap_or_default();
        let stale = p
            .keys
            .read()
            .fetched
            .is_none_or(|t| t.elapsed() > KEYS_MAX_AGE);
        if stale {
            let _ = p.refresh(Why::Stale).await;
        }
        let mut found = p.key(&kid);
        if found.is_none() {
            // A key the provider rotated in since the last fetch.
            let _ = p.refresh(Why::UnknownKid).await;
            found = p.key(&kid);
        }
        let Some((key, key_alg)) = found else {
            return Err(if p.keys.read().fetched.is_none() {
                Refusal::KeysUnavailable
            } else {
                Refusal::UnknownKey
            });
        };
        if key_alg.is_some_and(|a| a != header.alg) {
            return Err(Refusal::AlgorithmNotAllowed);
        }
        let mut v = Validation::new(header.alg);
        v.leeway = p.leeway_secs;
        v.validate_nbf = true;
        v.validate_exp = true;
        v.set_issuer(&[&p.issuer]);
        v.set_audience(&[&p.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = {
            let _permit = self
                .verifying
                .acquire()
                .await
                .map_err(|_| Refusal::KeysUnavailable)?;
            let token = token.to_string();
            tokio::task::spawn_blocking(move || {
                jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(&token, &key, &v)
            })
            .await
            .map_err(|_| Refusal::Malformed)?
        }
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => Refusal::BadSignature,
            ErrorKind::ExpiredSignature => Refusal::Expired,
            ErrorKind::ImmatureSignature => Refusal::NotYetValid,
            ErrorKind::InvalidIssuer => Refusal::WrongIssuer,
            ErrorKind::InvalidAudience => Refusal::WrongAudience,
            ErrorKind::MissingRequiredClaim(_) => Refusal::MissingClaim,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::UnsupportedAlgorithm => Refusal::AlgorithmNotAllowed,
            _ => Refusal::Malformed,
        })?;
        let claims = data.claims;
        let now = now_ms() / 1000;
        let leeway = p.leeway_secs as i64;
        let iat = claims
            .get("iat")
            .and_then(serde_json::Value::as_i64)
            .ok_or(Refusal::MissingClaim)?;
        if iat > now + leeway {
            return Err(Refusal::IssuedInFuture);
        }
        if now - iat > p.max_age_secs as i64 + leeway {
            return Err(Refusal::TooOld);
        }
        if !p.required_acr.is_empty() {
            let acr = claims.get("acr").and_then(serde_json::Value::as_str);
            if !acr.is_some_and(|a| p.required_acr.iter().any(|r| r == a)) {
                return Err(Refusal::AcrNotAccepted);
            }
        }
        let subject = claims
            .get(&p.subject_claim)
            .and_then(serde_json::Value::as_str)
            .filter(|s| {
                !s.is_empty() && s.len() <= MAX_SUBJECT_BYTES && !s.chars().any(char::is_control)
            })
            .ok_or(Refusal::NoSubject)?
            .to_string();
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_i64)
            .ok_or(Refusal::MissingClaim)?;
        // The jti names the token when there is one; otherwise its signed
        // header and payload do. Never the signature: an ECDSA signature
        // `(r, s)` has a twin `(r, n - s)` that verifies too, so a token
        // re-encoded with it would be "new".
        let jti = claims.get("jti").and_then(serde_json::Value::as_str);
        let signed = token.rsplit_once('.').map_or(token, |(signed, _)| signed);
        let replay_key = crypto::sha256(
            crypto::Context::new("coffre/oidc-replay/v2")
                .with(p.name.as_bytes())
                .with(match jti {
                    Some(j) => j.as_bytes(),
                    None => signed.as_bytes(),
                })
                .with(if jti.is_some() { b"jti" } else { b"signed" })
                .as_bytes(),
        );
        let until = exp.min(iat + p.max_age_secs as i64) + leeway;
        Ok(Identity {
            provider: p.name.clone(),
            tenant: p.tenant.clone(),
            subject,
            replay_key,
            replay_until_ms: until.saturating_mul(1000),
        })
    }
}

/// The `alg` a token's header names, read without trusting it (to tell
/// `none` from garbage in the trail).
fn header_alg(token: &str) -> Option<String> {
    let raw = B64URL.decode(token.split('.').next()?).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    v.get("alg")?.as_str().map(str::to_string)
}

impl Provider {
    fn key(&self, kid: &str) -> Option<(DecodingKey, Option<Algorithm>)> {
        let keys = self.keys.read();
        match keys.by_kid.get(kid) {
            Some(k) => Some(k.clone()),
            // No kid in the token: acceptable only when there is one key.
            None if kid.is_empty() && keys.by_kid.len() == 1 => {
                keys.by_kid.values().next().cloned()
            }
            None => None,
        }
    }

    /// Fetches the keys, unless `why` is already answered: an unknown
    /// `kid` fetches at most once per [`REFETCH_EVERY`] (a flood of made-up
    /// `kid`s costs one fetch a minute), stale keys are retried at most as
    /// often, and callers that waited for a fetch in progress use its
    /// result.
    async fn refresh(&self, why: Why) -> Result<(), String> {
        let seen = self.keys.read().fetched;
        let mut f = self.fetching.lock().await;
        if why != Why::Start && self.keys.read().fetched != seen {
            // Fetched while this caller waited.
            return Ok(());
        }
        let recent = |t: Option<Instant>| t.is_some_and(|t| t.elapsed() < REFETCH_EVERY);
        match why {
            Why::Start => {}
            Why::Stale if recent(f.attempt) => return Ok(()),
            Why::UnknownKid if recent(f.unknown_kid) => return Ok(()),
            Why::UnknownKid => f.unknown_kid = Some(Instant::now()),
            Why::Stale => {}
        }
        f.attempt = Some(Instant::now());
        let raw = match &self.source {
            Source::Url { uri, tls } => fetch(uri, tls.clone()).await?,
            Source::File(path) => {
                let meta =
                    std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
                if meta.len() as usize > MAX_JWKS_BYTES {
                    return Err(format!("{}: larger than 1 MiB", path.display()));
                }
                std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?
            }
        };
        let set: JwkSet = serde_json::from_slice(&raw)
            .map_err(|_| "the JWKS is not a JSON key set".to_string())?;
        let mut by_kid = HashMap::new();
        for jwk in set.keys.iter().take(MAX_KEYS) {
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                continue;
            }
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| parse_algorithm(&format!("{a:?}")));
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            // HMAC keys ("oct") never verify here, whatever they claim.
            if matches!(key.family(), jsonwebtoken::AlgorithmFamily::Hmac) {
                continue;
            }
            by_kid.insert(jwk.common.key_id.clone().unwrap_or_default(), (key, alg));
        }
        tracing::info!(provider = %self.name, keys = by_kid.len(), "OIDC signing keys fetched");
        *self.keys.write() = Arc::new(Keys {
            by_kid,
            fetched: Some(Instant::now()),
        });
        Ok(())
    }
}

/// A TLS client config with the system's roots and `ca_file`'s.
fn client_tls(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
            let cert: rustls::pki_types::CertificateDer<'static> =
                cert.map_err(|_| format!("{}: not PEM certificates", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// GET `uri` (HTTP/1.1, over TLS when `tls`), at most [`MAX_JWKS_BYTES`].
async fn fetch(uri: &http::Uri, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Vec<u8>, String> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(uri, tls))
        .await
        .map_err(|_| format!("{uri}: timed out"))?
}

async fn fetch_inner(
    uri: &http::Uri,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt;
    let host = uri.host().ok_or("no host")?.to_string();
    // An IPv6 literal without its brackets, for the socket and TLS.
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri
        .port_u16()
        .unwrap_or(if tls.is_some() { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(|e| format!("{uri}: {e}"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let req = http::Request::get(path)
        .header(
            http::header::HOST,
            uri.authority().map_or(host.clone(), |a| a.to_string()),
        )
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "coffre")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    macro_rules! send {
        ($io:expr) => {{
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new($io))
                    .await
                    .map_err(|e| format!("{uri}: {e}"))?;
            tokio::spawn(conn);
            send.send_request(req)
                .await
                .map_err(|e| format!("{uri}: {e}"))?
        }};
    }
    let resp = match tls {
        Some(cfg) => {
            let name = rustls::pki_types::ServerName::try_from(bare)
                .map_err(|_| format!("{uri}: bad host name"))?;
            let stream = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("{uri}: TLS: {e}"))?;
            send!(stream)
        }
        None => send!(tcp),
    };
    if resp.status() != http::StatusCode::OK {
        return Err(format!("{uri}: HTTP {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|_| format!("{uri}: body unreadable or larger than 1 MiB"))?;
    Ok(body.to_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_parse_strictly() {
        let b = Binding::parse("psc:8100000123").unwrap();
        assert_eq!(
            (b.provider.as_str(), b.subject.as_str()),
            ("psc", "8100000123")
        );
        assert_eq!(b.to_string(), "psc:8100000123");
        // Subjects may hold colons (URNs); only the first splits.
        assert_eq!(Binding::parse("kc:urn:a:b").unwrap().subject, "urn:a:b");
        for bad in ["psc", ":x", "PSC:x", "psc:", "psc:a\nb"] {
            assert!(Binding::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn provider_configs_refuse_weak_settings() {
        let ok = OidcProviderConfig {
            issuer: "https://auth.esante.gouv.fr/auth/realms/esante-wallet".into(),
            audience: "coffre".into(),
            jwks_url: Some("https://auth.esante.gouv.fr/jwks".into()),
            tenant: "clinic".into(),
            ..Default::default()
        };
        assert!(check_config("psc", &ok).is_ok());
        let mut http = ok.clone();
        http.jwks_url = Some("http://idp.example/jwks".into());
        assert!(check_config("psc", &http).unwrap_err().contains("https"));
        http.jwks_url = Some("http://127.0.0.1:8080/jwks".into());
        assert!(check_config("psc", &http).is_ok());
        for alg in ["HS256", "none", "RS512"] {
            let mut c = ok.clone();
            c.algorithms = Some(vec![alg.into()]);
            assert!(check_config("psc", &c).is_err(), "{alg}");
        }
        let mut both = ok.clone();
        both.jwks_file = Some("/x".into());
        assert!(check_config("psc", &both).is_err());
    }
}
