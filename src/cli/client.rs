//! The CLI's side of a connection: the channel (TLS or dev), the token, one-line transport errors.

use super::*;

/// Opens a channel to the server named by `--addr`.
pub(super) async fn connect(g: &Global) -> Result<Channel, CliError> {
    let identity = match (&g.client_cert, &g.client_key) {
        (Some(c), Some(k)) => {
            let read =
                |p: &Path| std::fs::read(p).map_err(|e| err(format!("{}: {e}", p.display())));
            Some(Identity::from_pem(read(c)?, read(k)?))
        }
        _ => None,
    };
    connect_with(&g.addr, g.ca.as_deref(), identity).await
}

pub(crate) async fn connect_to(addr: &str, ca: Option<&Path>) -> Result<Channel, CliError> {
    connect_with(addr, ca, None).await
}

async fn connect_with(
    addr: &str,
    ca: Option<&Path>,
    identity: Option<Identity>,
) -> Result<Channel, CliError> {
    if !addr.contains("://") {
        return Err(err(format!(
            "--addr {addr} needs a scheme: http://{addr} in dev mode, https://{addr} with TLS"
        )));
    }
    let mut ep = Endpoint::from_shared(addr.to_string())
        .map_err(|_| err(format!("--addr {addr} is not a URL")))?
        .connect_timeout(Duration::from_secs(5));
    if addr.starts_with("https://") {
        let ca = ca.ok_or_else(|| err("https needs the server's CA: --ca FILE or COFFRE_CA"))?;
        let pem = std::fs::read(ca).map_err(|e| err(format!("{}: {e}", ca.display())))?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        if let Some(id) = identity {
            tls = tls.identity(id);
        }
        ep = ep.tls_config(tls).map_err(err)?;
    }
    ep.connect().await.map_err(|e| {
        let chain = error_chain(&e);
        match transport_hint(&chain, addr) {
            Some(hint) => err(format!("cannot reach {addr}: {hint}")),
            None => err(format!("cannot reach {addr}: {chain}")),
        }
    })
}

/// An error and its causes, on one line.
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    parts.join(": ")
}

/// What a person can do about a transport failure, from its causes.
pub(super) fn transport_hint(chain: &str, addr: &str) -> Option<String> {
    let plain = addr.starts_with("http://");
    let hint = if chain.contains("UnknownIssuer")
        || chain.contains("unknown issuer")
        || chain.contains("BadSignature")
    {
        "the server's certificate is not signed by the CA given: pass the CA that signed it with --ca FILE (or COFFRE_CA)".to_string()
    } else if chain.contains("NotValidForName") || chain.contains("not valid for name") {
        "the server's certificate does not name this host: use a host name its certificate carries in --addr".to_string()
    } else if chain.contains("Expired") || chain.contains("expired") {
        "the server's certificate has expired (or this machine's clock is wrong): renew it"
            .to_string()
    } else if chain.contains("InvalidContentType")
        || chain.contains("corrupt message")
        || chain.contains("WrongVersion")
    {
        format!(
            "the server does not speak TLS: in dev mode use {}",
            addr.replacen("https://", "http://", 1)
        )
    } else if plain
        && (chain.contains("connection closed")
            || chain.contains("connection was not ready")
            || chain.contains("frame")
            || chain.contains("h2 protocol")
            || chain.contains("broken pipe")
            || chain.contains("reset"))
    {
        format!(
            "the server expects TLS: use {} with --ca FILE",
            addr.replacen("http://", "https://", 1)
        )
    } else if chain.contains("CertificateRequired") {
        "the server requires a client certificate (mTLS): pass --client-cert FILE --client-key FILE (or COFFRE_CLIENT_CERT, COFFRE_CLIENT_KEY)".to_string()
    } else if chain.contains("CertificateRevoked") {
        "the server refused this client certificate: its serial is on the server's deny list"
            .to_string()
    } else if chain.contains("UnknownCA")
        || chain.contains("BadCertificate")
        || chain.contains("CertificateUnknown")
    {
        "the server does not accept this client certificate: it is not signed by the server's client CA (tls.client_ca)".to_string()
    } else if !plain
        && (chain.contains("broken pipe")
            || chain.contains("connection was not ready")
            || chain.contains("connection closed")
            || chain.contains("reset"))
    {
        // TLS 1.3: the client's side of the handshake ends before the
        // server has checked its certificate; a refusal arrives as a close.
        "the server closed the connection after the TLS handshake: it requires a client certificate (--client-cert FILE --client-key FILE) or refuses the one given (not signed by its client CA, or on its deny list)".to_string()
    } else if chain.contains("Connection refused") || chain.contains("connection refused") {
        "nothing listens there: is `coffre serve` running, and is --addr (COFFRE_ADDR) right?"
            .to_string()
    } else if chain.contains("timed out") {
        "no answer within 5 s: check the host, the port and any firewall".to_string()
    } else {
        return None;
    };
    Some(hint)
}

pub(super) fn token_path(g: &Global) -> PathBuf {
    g.token_file.clone().unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".coffre").join("token")
    })
}

pub(super) fn token(g: &Global) -> Result<Zeroizing<String>, CliError> {
    if let Ok(t) = std::env::var("COFFRE_TOKEN") {
        return Ok(Zeroizing::new(t));
    }
    std::fs::read_to_string(token_path(g))
        .map(|t| Zeroizing::new(t.trim().to_string()))
        .map_err(|_| err("not logged in: run `coffre login` or set COFFRE_TOKEN"))
}

pub(super) fn authed<T>(g: &Global, msg: T) -> Result<Request<T>, CliError> {
    with_token(&token(g)?, msg)
}

pub(crate) fn with_token<T>(token: &str, msg: T) -> Result<Request<T>, CliError> {
    let mut req = Request::new(msg);
    // The header's text is a copy of the token: zeroized once parsed.
    let header = Zeroizing::new(format!("Bearer {token}"));
    let value = header.parse().map_err(|_| err("token is malformed"))?;
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

/// A unix-ms time as UTC RFC 3339 to the second (`2026-12-02T13:00:00Z`).
pub(super) fn utc_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Reads a secret from the terminal without echo, or one line of stdin.
pub(super) fn read_secret(prompt: &str, confirm: bool) -> Result<Zeroizing<String>, CliError> {
    if std::io::stdin().is_terminal() {
        let a = Zeroizing::new(rpassword::prompt_password(prompt).map_err(err)?);
        if confirm {
            let b = Zeroizing::new(rpassword::prompt_password("again: ").map_err(err)?);
            if *a != *b {
                return Err(err("the two entries differ"));
            }
        }
        Ok(a)
    } else {
        let mut line = Zeroizing::new(String::new());
        std::io::stdin().lock().read_line(&mut line).map_err(err)?;
        let trimmed = line.trim_end_matches(['\r', '\n']).to_string();
        Ok(Zeroizing::new(trimmed))
    }
}
