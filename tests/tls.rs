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
    /// A second client, serial 0x0B0B.
    other_client: (String, String),
}

/// The serial number of `Pki::client`.
const CLIENT_SERIAL: [u8; 3] = [0x00, 0xc1, 0x1e];

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>, serial: Option<&[u8]>| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.serial_number = serial.map(rcgen::SerialNumber::from_slice);
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca.pem(),
        server: leaf(vec!["localhost".into()], None),
        client: leaf(vec!["hospital-app".into()], Some(&CLIENT_SERIAL)),
        other_client: leaf(vec!["lab-app".into()], Some(&[0x0b, 0x0b])),
    }
}

async fn tls_server(mtls: bool) -> (TestServer, Pki) {
    tls_server_with(mtls, "").await
}

/// A TLS server whose config ends with `extra`; its files are
/// `server.pem`, `server.key`, `ca.pem` and `deny.txt` in its root.
async fn tls_server_with(mtls: bool, extra: &str) -> (TestServer, Pki) {
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
        let deny = w("deny.txt", "# client certificates refused\n");
        text.push_str(&format!(
            "client_ca = {ca:?}\ndeny_serials_file = {deny:?}\n"
        ));
    }
    text.push_str("[argon2]\nm_kib = 64\nt = 1\np = 1\n");
    text.push_str(extra);
    let cfg_path = w("coffre.toml", &text);
    // Outside dev mode the key file must exist already.
    coffre::keys::generate_key_file(&root.path().join("master.key")).unwrap();
    let config = Config::load_with_env(Some(&cfg_path), |_| None).unwrap();
    (TestServer::start_with(root, config).await, p)
}

async fn tls_channel(s: &TestServer, p: &Pki, client_cert: bool) -> Result<Channel, String> {
    tls_channel_as(s, &p.ca, client_cert.then_some(&p.client)).await
}

async fn tls_channel_as(
    s: &TestServer,
    ca: &str,
    client: Option<&(String, String)>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
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
            otp: Default::default(),
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

/// Whether a fresh connection as `client` (trusting `ca`) can log in.
async fn admitted(s: &TestServer, ca: &str, client: Option<&(String, String)>) -> bool {
    match tls_channel_as(s, ca, client).await {
        Ok(ch) => try_login(ch).await.is_ok(),
        Err(_) => false,
    }
}

/// Waits (a few reload polls) until `admitted` answers `want`.
async fn until_admitted(s: &TestServer, ca: &str, client: Option<&(String, String)>, want: bool) {
    let deadline = std::time::Instant::now() + coffre::server::TLS_POLL * 5;
    while admitted(s, ca, client).await != want {
        assert!(
            std::time::Instant::now() < deadline,
            "still {} after the files changed",
            if want { "refused" } else { "admitted" }
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_dropping_open_connections() {
    let (s, old) = tls_server(true).await;
    let open = tls_channel(&s, &old, true).await.unwrap();
    let mut auth = pb::auth_client::AuthClient::new(open.clone());
    try_login(open.clone()).await.unwrap();
    // A renewal from a new CA: server certificate, key and client CA.
    let new = pki();
    let root = s.root.path();
    // A half-written certificate is refused and the old files keep serving.
    std::fs::write(
        root.join("server.pem"),
        "-----BEGIN CERTIFICATE-----\ntrunc",
    )
    .unwrap();
    tokio::time::sleep(coffre::server::TLS_POLL * 2).await;
    assert!(
        admitted(&s, &old.ca, Some(&old.client)).await,
        "old files still serve"
    );
    std::fs::write(root.join("server.key"), &new.server.1).unwrap();
    std::fs::write(root.join("ca.pem"), &new.ca).unwrap();
    std::fs::write(root.join("server.pem"), &new.server.0).unwrap();
    until_admitted(&s, &new.ca, Some(&new.client), true).await;
    // The old chain is refused on new connections ...
    assert!(!admitted(&s, &old.ca, Some(&old.client)).await);
    assert!(
        !admitted(&s, &new.ca, Some(&old.client)).await,
        "old client CA gone"
    );
    // ... and the connection opened before the reload still serves calls.
    for _ in 0..3 {
        auth.login(pb::LoginRequest {
            otp: Default::default(),
            tenant: "system".into(),
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        })
        .await
        .expect("an open connection survives the reload");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_on_the_deny_list_is_refused() {
    let (s, p) = tls_server(true).await;
    assert!(admitted(&s, &p.ca, Some(&p.client)).await);
    assert!(admitted(&s, &p.ca, Some(&p.other_client)).await);
    // As `openssl x509 -serial` prints it, with the leading zero byte.
    std::fs::write(
        s.root.path().join("deny.txt"),
        format!(
            "# lost laptop\nserial={}\n",
            hex::encode_upper(CLIENT_SERIAL)
        ),
    )
    .unwrap();
    until_admitted(&s, &p.ca, Some(&p.client), false).await;
    assert!(
        admitted(&s, &p.ca, Some(&p.other_client)).await,
        "others unaffected"
    );
    // Off the list again: admitted again, without a restart.
    std::fs::write(s.root.path().join("deny.txt"), "\n").unwrap();
    until_admitted(&s, &p.ca, Some(&p.client), true).await;
}

#[tokio::test]
async fn probes_need_no_client_certificate_on_the_probe_port() {
    let (s, p) = tls_server_with(true, "[metrics]\nlisten = \"127.0.0.1:0\"\n").await;
    assert!(
        !admitted(&s, &p.ca, None).await,
        "the gRPC port wants a certificate"
    );
    let probe = format!("http://{}", s.metrics_addr.clone().unwrap());
    assert!(serving(&probe, "coffre.v1.Records").await);
}
