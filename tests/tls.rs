//! Outside dev mode the server speaks TLS only (T5), and with
//! `tls.client_ca` it requires a client certificate (mTLS).

mod common;

use coffre::{config::Config, pb};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca.pem(),
        server: leaf(vec!["localhost".into()]),
        client: leaf(vec!["hospital-app".into()]),
    }
}

async fn tls_server(mtls: bool) -> (TestServer, Pki) {
    let root = tempfile::tempdir().unwrap();
    let p = pki();
    let w = |name: &str, text: &str| {
        let path = root.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let cert = w("server.pem", &p.server.0);
    let key = w("server.key", &p.server.1);
    let ca = w("ca.pem", &p.ca);
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nmaster_key_file = {:?}\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\n",
        root.path().join("data"),
        root.path().join("master.key"),
    );
    if mtls {
        text.push_str(&format!("client_ca = {ca:?}\n"));
    }
    text.push_str("[argon2]\nm_kib = 64\nt = 1\np = 1\n");
    let cfg_path = w("coffre.toml", &text);
    // Outside dev mode the key file must exist already.
    coffre::keys::generate_key_file(&root.path().join("master.key")).unwrap();
    let config = Config::load_with_env(Some(&cfg_path), |_| None).unwrap();
    (TestServer::start_with(root, config).await, p)
}

async fn tls_channel(s: &TestServer, p: &Pki, client_cert: bool) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&p.ca))
        .domain_name("localhost");
    if client_cert {
        tls = tls.identity(Identity::from_pem(&p.client.0, &p.client.1));
    }
    Channel::from_shared(s.addr.clone())
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())
}

async fn try_login(ch: Channel) -> Result<String, tonic::Status> {
    pb::auth_client::AuthClient::new(ch)
        .login(pb::LoginRequest {
            tenant: "system".into(),
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .map(|r| r.into_inner().token)
}

#[tokio::test]
async fn tls_is_required_outside_dev_mode() {
    let (s, p) = tls_server(false).await;
    assert!(s.addr.starts_with("https://"));
    let token = try_login(tls_channel(&s, &p, false).await.unwrap())
        .await
        .unwrap();
    assert!(!token.is_empty());
    // A plaintext client gets nothing.
    let plain = s.addr.replace("https://", "http://");
    let ch = Channel::from_shared(plain).unwrap().connect().await;
    let refused = match ch {
        Err(_) => true,
        Ok(ch) => try_login(ch).await.is_err(),
    };
    assert!(refused, "plaintext refused");
}

#[tokio::test]
async fn mtls_requires_a_client_certificate() {
    let (s, p) = tls_server(true).await;
    try_login(tls_channel(&s, &p, true).await.unwrap())
        .await
        .unwrap();
    let without = match tls_channel(&s, &p, false).await {
        Err(_) => true,
        Ok(ch) => try_login(ch).await.is_err(),
    };
    assert!(without, "no client certificate, no service");
}
