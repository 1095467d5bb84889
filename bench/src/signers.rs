//! `coordinator-bench --signers` (issue 17): the coordinator-client crate's `v1` signer
//! (the one Rust signer, which the bench now signs with) against the bench's previous
//! signer (the server's own `auth::hmac::wire::canonical` + `sign`, which the server keeps
//! for verifying). Two figures each: µs per signature (a tight loop over the same
//! inputs, release build), and signed `GET /coordinator/health` requests/s on one
//! keep-alive connection against the release server on SQLite, the three ways of
//! sending alternated round by round so drift hits them alike. Prints the figures.

use std::time::{Duration, Instant};

use coordinator::auth::hmac;
use coordinator_client::signing::{v1_headers, V1Params};

use crate::{fresh_sqlite_store, now_secs, setup_credentials, start_server, Creds};

const PATH: &str = "/coordinator/health";

/// The bench's previous signer: the server's signed-string builder and MAC.
fn old_headers(
    creds: &Creds,
    method: &str,
    path: &str,
    ts: &str,
    nonce: &str,
    body: &[u8],
) -> [(&'static str, String); 4] {
    let canonical = hmac::wire::canonical(method, path, &creds.caller, ts, nonce, body);
    [
        ("X-Coordinator-Caller", creds.caller.clone()),
        ("X-Coordinator-Timestamp", ts.to_owned()),
        ("X-Coordinator-Nonce", nonce.to_owned()),
        (
            "X-Coordinator-Signature",
            hmac::wire::sign(&creds.secret, &canonical),
        ),
    ]
}

fn new_headers(
    creds: &Creds,
    method: &str,
    path: &str,
    ts: &str,
    nonce: &str,
    body: &[u8],
) -> Vec<(String, String)> {
    let p = V1Params {
        caller: &creds.caller,
        secret: &creds.secret,
        key_version: None,
        timestamp: ts,
        nonce,
    };
    v1_headers(method, path, body, &p)
}

/// µs per signature over `n` signatures of (method, path, body).
fn per_signature(n: u32, mut f: impl FnMut(u32) -> usize) -> f64 {
    let mut sink = 0usize;
    let started = Instant::now();
    for i in 0..n {
        sink = sink.wrapping_add(f(i));
    }
    let us = started.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    assert!(sink > 0);
    us
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(bin: &str, duration: Duration) {
    let store = fresh_sqlite_store("signers");
    let creds = setup_credentials(&store.db, &store.sealer);
    let server = start_server(bin, &store.db_url, &store.key_b64);
    let url = server.url.clone();

    // ---- µs per signature -----------------------------------------------------------
    let body_1k = vec![b'x'; 1024];
    let ts = now_secs().to_string();
    let nonce = "0123456789abcdef0123456789abcdef";
    let n = 100_000;
    let runs = 15;
    println!(
        "µs per signature, {runs} interleaved runs of {n} each (best / median; the best is \
         the least disturbed by other load):"
    );
    for (label, method, body) in [
        ("GET, no body", "GET", &b""[..]),
        ("POST, 1 KiB body", "POST", &body_1k[..]),
    ] {
        let mut old = Vec::new();
        let mut new = Vec::new();
        for _ in 0..runs {
            old.push(per_signature(n, |i| {
                let h = old_headers(&creds, method, PATH, &ts, nonce, body);
                h[3].1.len() + usize::try_from(i & 1).unwrap()
            }));
            new.push(per_signature(n, |i| {
                let h = new_headers(&creds, method, PATH, &ts, nonce, body);
                h.last().unwrap().1.len() + usize::try_from(i & 1).unwrap()
            }));
        }
        println!(
            "  {label:<17} bench's previous signer {:.3} / {:.3} µs   client crate {:.3} / {:.3} µs",
            best(&old),
            median(old.clone()),
            best(&new),
            median(new.clone())
        );
    }

    // ---- requests/s on one connection -------------------------------------------------
    let agent = ureq::AgentBuilder::new().build();
    let client = coordinator_client::Client::v1(&url, &creds.caller, &creds.secret, None);
    let send = |headers: Vec<(String, String)>| {
        let mut req = agent.get(&format!("{url}{PATH}"));
        for (k, v) in &headers {
            req = req.set(k, v);
        }
        let resp = req.call().expect("signed health");
        let _ = resp.into_string();
    };
    let fresh_nonce = || uuid::Uuid::now_v7().simple().to_string();
    type Way<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let ways: Vec<Way<'_>> = vec![
        (
            "bench's previous signer + ureq",
            Box::new(|| {
                let ts = now_secs().to_string();
                let h = old_headers(&creds, "GET", PATH, &ts, &fresh_nonce(), b"");
                send(
                    h.iter()
                        .map(|(k, v)| ((*k).to_owned(), v.clone()))
                        .collect(),
                );
            }),
        ),
        (
            "client crate signer + ureq (the bench now)",
            Box::new(|| {
                let ts = now_secs().to_string();
                send(new_headers(&creds, "GET", PATH, &ts, &fresh_nonce(), b""));
            }),
        ),
        (
            "coordinator_client::Client::health()",
            Box::new(|| {
                client.health().expect("health");
            }),
        ),
    ];
    let rounds = 5;
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); ways.len()];
    // Warm-up: connections open, caches filled.
    for (_, f) in &ways {
        for _ in 0..50 {
            f();
        }
    }
    for _ in 0..rounds {
        for (i, (_, f)) in ways.iter().enumerate() {
            let started = Instant::now();
            let mut n = 0u64;
            while started.elapsed() < duration {
                f();
                n += 1;
            }
            rates[i].push(n as f64 / started.elapsed().as_secs_f64());
        }
    }
    println!(
        "signed GET {PATH}, one keep-alive connection, SQLite, {rounds} alternated rounds of {}s (median / best):",
        duration.as_secs()
    );
    for ((label, _), r) in ways.iter().zip(rates) {
        let all: Vec<String> = r.iter().map(|x| format!("{x:.0}")).collect();
        let top = r.iter().copied().fold(0.0, f64::max);
        println!(
            "  {label:<44} {:.0} / {top:.0} req/s   (rounds: {})",
            median(r.clone()),
            all.join(", ")
        );
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&store.dir);
}
