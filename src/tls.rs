//! HTTPS on the service listener (rustls, ring): TLS 1.3 and 1.2 with rustls' AEAD-only
//! suites, ALPN `h2` and `http/1.1`, a certificate that is reloaded
//! from its files without a restart, and optional client certificates (mutual TLS).
//!
//! Reload: [`CertReloader`] is the listener's certificate resolver. Every handshake asks
//! it for the current certificate, so installing a new one affects new handshakes only;
//! established connections keep theirs and are never dropped. The files are re-read every
//! `COORDINATOR_TLS_RELOAD_SECS` and at once on SIGHUP; a new pair is installed only when
//! the files changed, the key matches the certificate and the certificate is valid now,
//! otherwise the old one stays and a warning is logged (a half-written file, or one
//! issued for later, is picked up on a later check).
//!
//! Accept: each connection is counted against its address before its handshake
//! ([`serve_connection`]), which then has 3 s; the listener itself is put together in
//! `startup` with actix's HTTP service.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use actix_http::Extensions;
use actix_web::rt::net::TcpStream;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::auth::client_cert::{validity_of, PeerCertificate};
use crate::auth::throttle::Connections;
use crate::config::TlsConfig;

/// The listener's certificate, replaceable while the server runs.
#[derive(Debug)]
pub struct CertReloader {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// SHA-256 of the certificate and key files as last loaded (never the key itself).
    loaded: Mutex<[u8; 32]>,
}

impl CertReloader {
    /// Load the pair once; an unreadable or mismatched pair is a start-up error.
    pub fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<Arc<CertReloader>> {
        let (key, digest) = read_pair(cert_path, key_path).map_err(|e| anyhow::anyhow!(e))?;
        Ok(Arc::new(CertReloader {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new(Arc::new(key)),
            loaded: Mutex::new(digest),
        }))
    }

    /// Re-read the files: `Ok(true)` when a new certificate was installed, `Ok(false)`
    /// when they are unchanged.
    pub fn reload(&self) -> Result<bool, String> {
        let (key, digest) = read_pair(&self.cert_path, &self.key_path)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if *loaded == digest {
            return Ok(false);
        }
        // Not installed unless valid now: every new handshake would fail with it. A
        // validity this reader cannot read is left to the clients, as before.
        let now = crate::db::now_millis() / 1000;
        match key.cert.first().and_then(|leaf| validity_of(leaf)) {
            Some((_, until)) if now > until => {
                return Err(format!(
                    "{}: the certificate expired",
                    self.cert_path.display()
                ))
            }
            Some((from, _)) if now < from => {
                return Err(format!(
                    "{}: the certificate is not valid yet",
                    self.cert_path.display()
                ))
            }
            _ => {}
        }
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        *loaded = digest;
        Ok(true)
    }

    /// Check the files every `every` and on SIGHUP, for as long as the server runs.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut hangup =
            match actix_rt::signal::unix::signal(actix_rt::signal::unix::SignalKind::hangup()) {
                Ok(s) => Some(s),
                Err(e) => {
                    log::warn!("TLS: cannot listen for SIGHUP ({e}); reloading on a timer only");
                    None
                }
            };
        let mut tick = actix_web::rt::time::interval(every);
        tick.tick().await;
        loop {
            let by_signal = match hangup.as_mut() {
                Some(h) => tokio::select! {
                    _ = tick.tick() => false,
                    _ = h.recv() => true,
                },
                None => {
                    tick.tick().await;
                    false
                }
            };
            match self.reload() {
                Ok(true) => log::info!(
                    "TLS: loaded a new certificate from {}",
                    self.cert_path.display()
                ),
                Ok(false) if by_signal => log::info!("TLS: SIGHUP: certificate unchanged"),
                Ok(false) => {}
                Err(e) => log::warn!("TLS: keeping the current certificate: {e}"),
            }
        }
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The certificate chain and key from their PEM files, checked to belong together.
fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(CertifiedKey, [u8; 32]), String> {
    let cert_pem = std::fs::read(cert_path)
        .map_err(|e| format!("cannot read {}: {e}", cert_path.display()))?;
    let mut key_pem =
        std::fs::read(key_path).map_err(|e| format!("cannot read {}: {e}", key_path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain ({e})", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no CERTIFICATE in it", cert_path.display()));
    }
    #[expect(
        clippy::map_err_ignore,
        reason = "the key file's parse error could quote key material; only its path is shown"
    )]
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| format!("{}: no PEM private key in it", key_path.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: unsupported private key ({e})", key_path.display()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        format!(
            "{} and {} do not belong together ({e})",
            cert_path.display(),
            key_path.display()
        )
    })?;
    let mut both = cert_pem;
    both.extend_from_slice(&key_pem);
    let digest = crate::crypto::sha256(&both);
    zeroize::Zeroize::zeroize(&mut both);
    zeroize::Zeroize::zeroize(&mut key_pem);
    Ok((certified, digest))
}

/// The listener's rustls configuration: TLS 1.3 and 1.2 only, the ring provider's
/// suites (ECDHE with AES-GCM or ChaCha20-Poly1305), the reloading certificate, and —
/// with a client CA — client certificates that are optional but, when presented, must
/// chain to that CA (or the handshake fails).
pub fn server_config(tls: &TlsConfig, certs: Arc<CertReloader>) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let read = CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            for cert in read {
                let cert =
                    cert.map_err(|e| anyhow::anyhow!("{}: not PEM ({e})", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| anyhow::anyhow!("{}: unusable CA ({e})", path.display()))?;
            }
            if roots.is_empty() {
                anyhow::bail!("{}: no CERTIFICATE in it", path.display());
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| anyhow::anyhow!("client CA {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    Ok(builder.with_cert_resolver(certs))
}

/// An HTTPS connection once its handshake is done.
pub type Stream = actix_tls::accept::rustls_0_23::TlsStream<TcpStream>;

/// Longest a client has for its handshake (what actix's own acceptor allows).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// One HTTPS connection, from its accept to its end: counted against its address first
/// (past the address's bound it is closed at once, before any handshake work), then its
/// handshake within [`HANDSHAKE_TIMEOUT`], then HTTP as actix serves it (`http`: h2 or
/// HTTP/1.1 as ALPN chose). The count drops when the connection ends.
///
/// There is no shared pool of handshake places: actix's acceptor allowed 256 handshakes
/// per worker at once and stopped accepting at that number, so sockets that never sent
/// a ClientHello, from one address, kept every other client out (seventh security
/// review, 2026-12-07). Now what a connection waiting for its handshake holds is its
/// place under its address's bound and the instance's, as any other connection.
pub async fn serve_connection<H>(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    connections: Arc<Connections>,
    http: Rc<H>,
) -> Result<(), ()>
where
    H: actix_service::Service<(Stream, actix_http::Protocol, Option<SocketAddr>), Response = ()>,
{
    let peer = tcp.peer_addr().ok();
    let _held = match peer {
        Some(peer) => match connections.open(peer.ip()) {
            Some(held) => Some(held),
            // Nothing can be answered before a handshake: the socket is closed.
            None => return Ok(()),
        },
        None => None,
    };
    let tls = match actix_web::rt::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        // A failed or slow handshake: closed, as actix's acceptor does.
        Ok(Err(_)) | Err(_) => return Ok(()),
    };
    let protocol = match tls.get_ref().1.alpn_protocol() {
        Some(p) if p == b"h2" => actix_http::Protocol::Http2,
        _ => actix_http::Protocol::Http1,
    };
    // The dispatcher's own errors (a client that went away) end the connection only.
    let _ = http.call((Stream::from(tls), protocol, peer)).await;
    Ok(())
}

/// The HTTPS listener's `on_connect`: the names and validity of a client certificate
/// the handshake verified (or a resumed session restored), for every request of this
/// connection. A verified certificate whose names cannot be read still attaches (with
/// no names), so it is refused rather than ignored.
pub fn on_connect(tls: &Stream, ext: &mut Extensions) {
    let (_, session) = tls.get_ref();
    if let Some(chain) = session.peer_certificates().filter(|c| !c.is_empty()) {
        let now = crate::db::now_millis() / 1000;
        ext.insert(PeerCertificate::from_chain(
            chain.iter().map(|c| c.as_ref()),
            now,
        ));
    }
}
