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

/// `coffre login` through the real CLI; its stderr and whether it worked.
fn cli_login(addr: &str, ca: Option<&std::path::Path>, dir: &std::path::Path) -> (bool, String) {
    use std::io::Write;
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["--addr", addr, "login"])
        .env("COFFRE_TOKEN_FILE", dir.join("token"))
        .env_remove("COFFRE_CA")
        .env_remove("COFFRE_ADDR")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(ca) = ca {
        cmd.args(["--ca", ca.to_str().unwrap()]);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{ADMIN_PASSWORD}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success() || err.trim().lines().count() == 1,
        "{err}"
    );
    (out.status.success(), err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_name_their_cause_and_the_fix() {
    let (s, p) = tls_server(false).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &p.ca).unwrap();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, pki().ca).unwrap();
    let port = s.addr.rsplit(':').next().unwrap().to_string();
    let by_name = format!("https://localhost:{port}");
    let (ok, err) = cli_login(&by_name, Some(&ca), dir.path());
    assert!(ok, "{err}");
    let d = dir.path();
    let cases = [
        (by_name.clone(), Some(other.as_path()), "--ca"),
        (
            format!("https://127.0.0.1:{port}"),
            Some(ca.as_path()),
            "does not name this host",
        ),
        (format!("http://localhost:{port}"), None, "expects TLS"),
        (format!("127.0.0.1:{port}"), None, "needs a scheme"),
    ];
    for (addr, ca, want) in cases {
        let (ok, err) = cli_login(&addr, ca, d);
        assert!(!ok && err.contains(want), "{addr}: {err}");
    }
    // A plaintext (dev) server reached over https.
    let dev = TestServer::start().await;
    let tls_to_plain = dev.addr.replace("http://", "https://");
    let (ok, err) = cli_login(&tls_to_plain, Some(&ca), d);
    assert!(!ok && err.contains("does not speak TLS"), "{err}");
}
