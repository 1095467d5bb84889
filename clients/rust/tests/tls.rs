//! HTTPS: a server whose certificate a private CA issued is reached with `ca_file`,
//! refused without it (the public roots do not know that CA), and a CA file that is
//! missing or holds no certificate is an error naming it. The fixtures in tests/tls/
//! are a throw-away CA and a certificate for `localhost` and 127.0.0.1, made for these
//! tests only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use coordinator_client::{Client, ClientOptions, Credentials, Error};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(name)
}

/// An HTTPS server answering every request with `{"ok":true}`; its base URL.
fn serve_tls(host: &str) -> String {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(fixture("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(fixture("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, stream);
            // A client that refuses the certificate ends the handshake: next connection.
            let mut reader = BufReader::new(&mut tls);
            let mut ok = true;
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => {
                        ok = false;
                        break;
                    }
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            if ok {
                let body = r#"{"ok":true}"#;
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
    });
    format!("https://{host}:{port}")
}

fn with_ca(url: &str, ca: Option<PathBuf>) -> Result<Client, Error> {
    let options = ClientOptions {
        ca_file: ca,
        ..ClientOptions::default()
    };
    Client::with_options(url, Credentials::None, &options)
}

#[test]
fn https_with_the_private_ca_succeeds() {
    for host in ["127.0.0.1", "localhost"] {
        let url = serve_tls(host);
        let client = with_ca(&url, Some(fixture("ca.pem"))).unwrap();
        let r = client.open("/livez").unwrap();
        assert_eq!(r.status, 200, "{host}");
        assert_eq!(r.json().unwrap()["ok"], true, "{host}");
    }
}

#[test]
fn https_without_the_ca_is_refused() {
    let url = serve_tls("localhost");
    let mut client = with_ca(&url, None).unwrap();
    client.retries = 0;
    match client.open("/livez") {
        Err(Error::Transport(why)) => assert!(
            why.to_lowercase().contains("certificate") || why.contains("UnknownIssuer"),
            "{why}"
        ),
        other => panic!("expected a certificate error, got {other:?}"),
    }
    // The server certificate is not a CA: trusting it as one verifies nothing.
    let mut client = with_ca(&url, Some(fixture("server.pem"))).unwrap();
    client.retries = 0;
    assert!(matches!(client.open("/livez"), Err(Error::Transport(_))));
}

#[test]
fn a_bad_ca_file_is_an_error_naming_it() {
    let missing = fixture("no-such-ca.pem");
    match with_ca("https://localhost:1", Some(missing)) {
        Err(Error::Invalid(why)) => assert!(why.contains("no-such-ca.pem"), "{why}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    let dir = std::env::temp_dir().join(format!("cc-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    match with_ca("https://localhost:1", Some(empty)) {
        Err(Error::Invalid(why)) => assert!(why.contains("no PEM certificate"), "{why}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(dir);
}
