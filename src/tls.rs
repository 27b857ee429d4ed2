//! TLS for the gRPC port: the server's certificate and key, the client CA
//! (mTLS) and a deny list of client certificate serial numbers, all
//! reloadable while serving.
//!
//! [`Tls::reload`] (on SIGHUP, or when a file's modification time or size
//! changes) builds a whole new configuration and swaps it in only if every
//! file parsed: a half-written certificate keeps the old one serving.
//! Connections already open keep the session they negotiated; every new
//! handshake uses the new files.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::RwLock;
use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: {0}")]
    Load(String),
}

/// The files TLS is made of, from `[tls]`.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    deny_serials: Option<PathBuf>,
}

impl Files {
    fn all(&self) -> impl Iterator<Item = &PathBuf> {
        [Some(&self.cert), Some(&self.key)]
            .into_iter()
            .chain([self.client_ca.as_ref(), self.deny_serials.as_ref()])
            .flatten()
    }

    /// Modification time and size of each file, to notice a change.
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.all()
            .map(|p| {
                let m = std::fs::metadata(p).ok()?;
                Some((m.modified().ok()?, m.len()))
            })
            .collect()
    }
}

/// What a reload loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// Serial numbers on the deny list.
    pub denied: usize,
    pub mtls: bool,
}

/// The server's TLS, swapped whole on reload.
pub struct Tls {
    files: Files,
    current: RwLock<Arc<rustls::ServerConfig>>,
    stamp: parking_lot::Mutex<Vec<Option<(SystemTime, u64)>>>,
    pub handshake_timeout: Duration,
}

impl Tls {
    /// The TLS of `config` (`None` in dev mode), or a one-line error naming
    /// the file at fault.
    pub fn load(config: &Config) -> Result<Option<Arc<Tls>>, TlsError> {
        if config.dev {
            return Ok(None);
        }
        let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
            return Err(TlsError::Load("tls.cert and tls.key are required".into()));
        };
        let files = Files {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: config.tls.client_ca.clone(),
            deny_serials: config.tls.deny_serials_file.clone(),
        };
        let stamp = files.stamp();
        let (server, _) = build(&files)?;
        Ok(Some(Arc::new(Tls {
            files,
            current: RwLock::new(server),
            stamp: parking_lot::Mutex::new(stamp),
            handshake_timeout: Duration::from_secs(config.connections.handshake_secs),
        })))
    }

    /// Reads every file again and, if all parse, serves new handshakes with
    /// them; otherwise the old configuration stays and the error names the
    /// file.
    pub fn reload(&self) -> Result<Loaded, TlsError> {
        let stamp = self.files.stamp();
        let (server, loaded) = build(&self.files)?;
        *self.current.write() = server;
        *self.stamp.lock() = stamp;
        Ok(loaded)
    }

    /// Reloads if a file changed since the last load (for mounted secrets,
    /// which no one signals). `None`: nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<Loaded, TlsError>> {
        if *self.stamp.lock() == self.files.stamp() {
            return None;
        }
        Some(self.reload())
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().clone())
    }
}

fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|e| TlsError::Load(format!("{}: {e}", p.display())))
}

fn certs(p: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(p)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Load(format!("{}: {e}", p.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Load(format!(
            "{}: no PEM certificate in it",
            p.display()
        )));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A whole server configuration from the files.
fn build(files: &Files) -> Result<(Arc<rustls::ServerConfig>, Loaded), TlsError> {
    let chain = certs(&files.cert)?;
    let key_pem = zeroize::Zeroizing::new(read(&files.key)?);
    // The key's parse error could quote nothing secret, but it names only
    // the file anyway.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        TlsError::Load(format!("{}: no PEM private key in it", files.key.display()))
    })?;
    let denied = match &files.deny_serials {
        Some(p) => parse_serials(&String::from_utf8_lossy(&read(p)?))
            .map_err(|e| TlsError::Load(format!("{}: {e}", p.display())))?,
        None => HashSet::new(),
    };
    let loaded = Loaded {
        denied: denied.len(),
        mtls: files.client_ca.is_some(),
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Load(e.to_string()))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError::Load(format!("{}: {e}", ca.display())))?;
            }
            let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Load(format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(Arc::new(DenyList { inner, denied }))
        }
        None => {
            if !denied.is_empty() {
                return Err(TlsError::Load(
                    "tls.deny_serials_file needs tls.client_ca (it refuses client certificates)"
                        .into(),
                ));
            }
            builder.with_no_client_auth()
        }
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Load(format!("{}: {e}", files.cert.display())))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(server), loaded))
}

/// Serial numbers, one per line in hex (`serial=…` as `openssl x509
/// -serial` prints it, colons allowed); `#` starts a comment.
pub fn parse_serials(text: &str) -> Result<HashSet<Vec<u8>>, String> {
    let mut out = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let hex: String = line
            .strip_prefix("serial=")
            .unwrap_or(line)
            .chars()
            .filter(|c| *c != ':')
            .collect();
        let hex = if hex.len() % 2 == 1 {
            format!("0{hex}")
        } else {
            hex
        };
        let bytes =
            hex::decode(&hex).map_err(|_| format!("line {}: not a hex serial number", n + 1))?;
        out.insert(canonical_serial(&bytes));
    }
    Ok(out)
}

/// A serial without leading zero bytes (DER may add one to keep it
/// positive; `openssl` prints it either way).
fn canonical_serial(b: &[u8]) -> Vec<u8> {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    b[start..].to_vec()
}

/// The CA's verifier, after a look at the deny list.
#[derive(Debug)]
struct DenyList {
    inner: Arc<dyn ClientCertVerifier>,
    denied: HashSet<Vec<u8>>,
}

impl ClientCertVerifier for DenyList {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let serial = x509_parser::parse_x509_certificate(end_entity)
            .map(|(_, c)| canonical_serial(c.raw_serial()))
            .map_err(|_| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
            })?;
        if self.denied.contains(&serial) {
            tracing::warn!(serial = %hex::encode(&serial), "client certificate on the deny list refused");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_parse_as_openssl_prints_them() {
        let s = parse_serials("# revoked 2026-11\nserial=0A1B\n00:0a:1b\n  ff # lost badge\n\n")
            .unwrap();
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s.contains(&vec![0x0a, 0x1b]));
        assert!(s.contains(&vec![0xff]));
        let e = parse_serials("ok\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }
}
