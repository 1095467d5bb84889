//! `--tls`: the cost of HTTPS on the service listener (issue 21). One release server
//! with a certificate from a CA generated here and one without, on the same SQLite store,
//! driven by the same hand-written HTTP/1.1 client (a rustls stream or a bare socket, so
//! only TLS differs): signed `GET /coordinator/health` on kept-alive connections, and
//! new connections per second (connect, handshake, one `GET /livez`, close).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use crate::{cpu_ticks, free_port, now_secs, setup_credentials, Creds, Server};

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

fn open(port: u16, tls: Option<&Arc<rustls::ClientConfig>>) -> std::io::Result<Conn> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(match tls {
        None => Conn::Plain(tcp),
        Some(cfg) => {
            let name = ServerName::try_from("localhost").unwrap();
            let conn =
                rustls::ClientConnection::new(cfg.clone(), name).map_err(std::io::Error::other)?;
            let mut s = rustls::StreamOwned::new(conn, tcp);
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock)?;
            }
            Conn::Tls(Box::new(s))
        }
    })
}

/// Send one request and read its response (headers + Content-Length body): the status.
fn roundtrip(conn: &mut Conn, req: &[u8], buf: &mut Vec<u8>) -> std::io::Result<u16> {
    conn.write_all(req)?;
    conn.flush()?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
            return status.ok_or_else(|| std::io::ErrorKind::InvalidData.into());
        }
    }
}

fn signed_health(creds: &Creds) -> Vec<u8> {
    let path = "/coordinator/health";
    let ts = now_secs().to_string();
    let nonce = uuid::Uuid::now_v7().simple().to_string();
    let canonical =
        coordinator::auth::hmac::wire::canonical("GET", path, &creds.caller, &ts, &nonce, b"");
    let sig = coordinator::auth::hmac::wire::sign(&creds.secret, &canonical);
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Coordinator-Caller: {}\r\n\
         X-Coordinator-Timestamp: {ts}\r\nX-Coordinator-Nonce: {nonce}\r\n\
         X-Coordinator-Signature: {sig}\r\n\r\n",
        creds.caller
    )
    .into_bytes()
}

#[derive(Default)]
struct Run {
    per_sec: f64,
    errors: u64,
    server_cpu_us: f64,
}

/// `conns` threads for `duration` (after a 1 s warm-up), each running `work` in a loop;
/// `work` returns whether its unit succeeded.
fn drive(
    pid: u32,
    conns: usize,
    duration: Duration,
    work: impl Fn(&mut Option<Conn>, &mut Vec<u8>) -> bool + Send + Sync + 'static,
) -> Run {
    let work = Arc::new(work);
    let (ok, err) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (counting, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (work, ok, err, counting, stop) = (
                work.clone(),
                ok.clone(),
                err.clone(),
                counting.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let (mut conn, mut buf) = (None, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let good = work(&mut conn, &mut buf);
                    if counting.load(Ordering::Relaxed) {
                        if good { &ok } else { &err }.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let cpu0 = cpu_ticks(&pid.to_string());
    counting.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(duration);
    counting.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks(&pid.to_string());
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let done = ok.load(Ordering::Relaxed);
    Run {
        per_sec: done as f64 / secs,
        errors: err.load(Ordering::Relaxed),
        server_cpu_us: (cpu1 - cpu0) as f64 / crate::CLK_TCK * 1e6 / done.max(1) as f64,
    }
}

fn keepalive(
    pid: u32,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    creds: &Creds,
    conns: usize,
    duration: Duration,
) -> Run {
    let creds = creds.clone();
    drive(pid, conns, duration, move |conn, buf| {
        if conn.is_none() {
            *conn = open(port, tls.as_ref()).ok();
        }
        let Some(c) = conn.as_mut() else { return false };
        match roundtrip(c, &signed_health(&creds), buf) {
            Ok(200) => true,
            Ok(_) => false,
            Err(_) => {
                *conn = None;
                false
            }
        }
    })
}

fn handshakes(
    pid: u32,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    conns: usize,
    duration: Duration,
) -> Run {
    let req = b"GET /livez HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    drive(pid, conns, duration, move |_, buf| {
        open(port, tls.as_ref())
            .and_then(|mut c| roundtrip(&mut c, req, buf))
            .is_ok_and(|s| s == 200)
    })
}

fn start(
    bin: &str,
    db_url: &str,
    key: &str,
    tls: Option<(&str, &str)>,
    client: &Arc<rustls::ClientConfig>,
) -> (Server, u16) {
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args([
        "serve",
        "--bind",
        &format!("127.0.0.1:{port}"),
        "--database-url",
        db_url,
    ])
    .env("COORDINATOR_MASTER_KEY", key)
    .env("RUST_LOG", "info")
    .env("COORDINATOR_WORKERS", "2")
    // The load generator is one address with up to 512 connections (and streams).
    .env("COORDINATOR_MAX_CONNECTIONS_PER_PEER", "0")
    .env(
        "COORDINATOR_INSECURE_HTTP",
        if tls.is_some() { "false" } else { "true" },
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Some((cert, key)) = tls {
        cmd.env("COORDINATOR_TLS_CERT", cert)
            .env("COORDINATOR_TLS_KEY", key);
    }
    let child = cmd.spawn().expect("start server");
    let deadline = Instant::now() + Duration::from_secs(30);
    let req = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let tls_client = tls.map(|_| client.clone());
    while open(port, tls_client.as_ref())
        .and_then(|mut c| roundtrip(&mut c, req, &mut Vec::new()))
        .map_or(true, |s| s != 200)
    {
        assert!(Instant::now() < deadline, "server did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("http://127.0.0.1:{port}");
    (Server { child, url }, port)
}

pub fn run(bin: &str, out_path: &str, conns: usize, duration: Duration) {
    let store = crate::fresh_sqlite_store("tls");
    let creds = setup_credentials(&store.db, &store.sealer);
    // A CA and a localhost certificate (ECDSA P-256, rcgen's default).
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let (cert_path, key_path) = (store.dir.join("server.crt"), store.dir.join("server.key"));
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, leaf_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );

    let mut rows = Vec::new();
    for tls in [false, true] {
        let paths = (cert_path.to_str().unwrap(), key_path.to_str().unwrap());
        let (server, port) = start(
            bin,
            &store.db_url,
            &store.key_b64,
            tls.then_some(paths),
            &client,
        );
        let pid = server.child.id();
        let c = tls.then(|| client.clone());
        let ka = keepalive(pid, port, c.clone(), &creds, conns, duration);
        let hs = handshakes(pid, port, c, conns, duration);
        eprintln!(
            "{}: {:.0} signed req/s ({} errors), {:.0} new connections/s ({} errors)",
            if tls { "https" } else { "http" },
            ka.per_sec,
            ka.errors,
            hs.per_sec,
            hs.errors
        );
        rows.push((tls, ka, hs));
        drop(server);
    }
    let _ = std::fs::remove_dir_all(&store.dir);

    let mut md = String::new();
    let _ = writeln!(md, "## HTTPS on the service listener (issue 21)\n");
    let _ = writeln!(
        md,
        "`{}` (release build via `bench/run.sh --tls`; SQLite; 2 server workers; {conns} client \
         threads, {}s per row after a 1 s warm-up). The same hand-written HTTP/1.1 client drives \
         both servers, over a bare socket or a rustls (ring) stream, so only TLS differs. Server \
         certificate ECDSA P-256; TLS 1.3 negotiated. Load generator and server share the \
         machine's cores.\n",
        crate::report::command_line(),
        duration.as_secs()
    );
    crate::report::machine_and_date(&mut md);
    let _ = writeln!(
        md,
        "| listener | signed health req/s (keep-alive) | server CPU µs/req | errors | new connections/s (handshake + GET /livez) | server CPU µs/conn | errors |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for (tls, ka, hs) in &rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {} |",
            if *tls { "HTTPS" } else { "plain HTTP" },
            ka.per_sec,
            ka.server_cpu_us,
            ka.errors,
            hs.per_sec,
            hs.server_cpu_us,
            hs.errors
        );
    }
    if let [(_, plain_ka, plain_hs), (_, tls_ka, tls_hs)] = rows.as_slice() {
        let _ = writeln!(
            md,
            "\nHTTPS / plain: {:.2}× the keep-alive rate, {:.2}× the new-connection rate.",
            tls_ka.per_sec / plain_ka.per_sec.max(1.0),
            tls_hs.per_sec / plain_hs.per_sec.max(1.0)
        );
    }
    crate::report::splice(out_path, "tls", &md);
}
