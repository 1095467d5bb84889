//! `coordinator-bench --webhooks` (issue 22 item 4): server CPU per unauthenticated
//! bogus Standard Webhooks delivery (valid headers and timestamp, wrong signature) sent
//! to the sender's URL `/stitcher/webhook/{caller}`, with 1 and then 1 000 webhook
//! senders and 100 B and 1 MiB bodies; valid-delivery requests/s with both; and, with
//! the default failure budget, what a blocked peer's bogus deliveries get and cost.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use coordinator::auth::credentials::{self, SecretKind};
use coordinator::auth::{webhook, Scope};
use coordinator::crypto::credential::WebhookSecret;
use coordinator::crypto::seal::Sealer;
use coordinator::db::Db;

use crate::drive::{drive, status, Outcome};
use crate::{now_secs, percentile, start_server_env};

const MIB: usize = 1 << 20;
/// Failure budget for the verification runs: the largest the server accepts. Its burst
/// (100 000 failures, refilled at 1 667/s) outlasts a run, so the throttle never answers
/// and what is measured is verification (a 429 would show in the answers column).
const UNTHROTTLED: &str = "100000";

struct Sender {
    name: String,
    key: Vec<u8>,
}

fn add_senders(db: &Db, sealer: &Sealer, from: usize, to: usize) -> Vec<Sender> {
    (from..to)
        .map(|i| {
            let name = format!("wh-{i:04}");
            credentials::add_caller(db, &name, &[Scope::StitcherWebhook]).expect("caller");
            let s = credentials::add_secret(db, sealer, &name, SecretKind::Webhook, None, None)
                .expect("webhook secret");
            let key = WebhookSecret::parse(&s.plaintext)
                .expect("whsec")
                .key_bytes()
                .to_vec();
            Sender { name, key }
        })
        .collect()
}

/// A delivery to `sender`'s URL; signed with its key, or with a wrong signature.
fn deliver(agent: &ureq::Agent, url: &str, sender: &Sender, body: &[u8], valid: bool) -> u16 {
    let id = uuid::Uuid::now_v7().to_string();
    let ts = now_secs().to_string();
    let sig = if valid {
        webhook::wire::sign(&sender.key, &id, &ts, body)
    } else {
        // Well-formed `v1,<base64 of 32 bytes>`, but not the MAC.
        webhook::wire::sign(b"not the sender's key", &id, &ts, b"")
    };
    status(
        agent
            .post(&format!("{url}/stitcher/webhook/{}", sender.name))
            .set("webhook-id", &id)
            .set("webhook-timestamp", &ts)
            .set("webhook-signature", &sig)
            .set("content-type", "application/json")
            .send_bytes(body),
    )
}

/// Median time of one Standard Webhooks MAC over `len` bytes, computed in this process.
fn one_mac_us(len: usize) -> f64 {
    let body = vec![b'x'; len];
    let mut t: Vec<f64> = (0..31)
        .map(|_| {
            let s = Instant::now();
            std::hint::black_box(webhook::wire::sign(b"key", "msg_1", "1700000000", &body));
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    percentile(&t, 0.5)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bogus,
    Valid,
    Reference,
}

struct Run {
    senders: usize,
    label: &'static str,
    out: Outcome,
}

pub fn run(bin: &str, out_path: &str, duration: Duration) {
    let conns: usize = std::env::var("BENCH_WEBHOOK_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let store = crate::fresh_sqlite_store("wh");
    let tmp = store.dir.clone();
    let crate::FreshStore {
        db_url,
        key_b64,
        db,
        sealer,
        ..
    } = store;

    let small = {
        let mut b = br#"{"issueNumber":7,"repository":"octo/bench","action":"commented","pad":""}"#
            .to_vec();
        b.resize(100, b' ');
        b
    };
    let big = vec![b' '; MIB];
    let valid_body = br#"{"issueNumber":7,"repository":"octo/bench","action":"commented"}"#;

    // Reference: the same 1 MiB read and refused without any MAC (an API-key request whose
    // body is not a job), to tell receiving the body apart from hashing it.
    credentials::add_caller(&db, "ref-api", &Scope::ALL).expect("caller");
    let api_key = credentials::issue_key(&db, "ref-api", None, None)
        .expect("key")
        .key
        .expose_secret()
        .to_owned();
    let mut senders = add_senders(&db, &sealer, 0, 1);
    let mut runs = Vec::new();
    for n in [1usize, 1000] {
        if senders.len() < n {
            let t = Instant::now();
            senders.extend(add_senders(&db, &sealer, senders.len(), n));
            eprintln!(
                "webhooks: {n} senders added in {:.1} s",
                t.elapsed().as_secs_f64()
            );
        }
        let server = start_server_env(
            bin,
            &db_url,
            &key_b64,
            &[("COORDINATOR_AUTH_FAILURES_PER_MINUTE", UNTHROTTLED)],
        );
        let pid = server.child.id();
        let url = server.url.clone();
        let pick = |c: usize, k: u64| &senders[(c + k as usize * conns) % senders.len()];
        let reference = n == 1000;
        for (label, body, kind) in [
            ("bogus, 100 B body", &small, Kind::Bogus),
            ("bogus, 1 MiB body", &big, Kind::Bogus),
            ("valid, 64 B delivery", &valid_body.to_vec(), Kind::Valid),
            (
                "reference: API-key POST /coordinator/jobs, 1 MiB non-job body (no MAC)",
                &big,
                Kind::Reference,
            ),
        ] {
            if kind == Kind::Reference && !reference {
                continue;
            }
            let one = |a: &ureq::Agent, c: usize, k: u64| match kind {
                Kind::Reference => status(
                    a.post(&format!("{url}/coordinator/jobs"))
                        .set("X-API-Key", &api_key)
                        .set("content-type", "application/json")
                        .send_bytes(body),
                ),
                _ => deliver(a, &url, pick(c, k), body, kind == Kind::Valid),
            };
            let _ = drive(conns, Duration::from_secs(1), pid, one);
            let out = drive(conns, duration, pid, one);
            eprintln!(
                "webhooks: {n:>4} senders, {label:22} {:>7.0} req/s  server {:>7.0} µs/req  p50 {:.2} ms  [{}]",
                out.rps,
                out.server_cpu_us,
                out.p50_ms,
                out.statuses()
            );
            runs.push(Run {
                senders: n,
                label,
                out,
            });
        }
    }

    // The default failure budget: one peer sends bogus 1 MiB deliveries until blocked,
    // then keeps going (100 B, then 1 MiB) while blocked.
    let server = start_server_env(bin, &db_url, &key_b64, &[]);
    let pid = server.child.id();
    let url = server.url.clone();
    let target = &senders[senders.len() - 1];
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let mut first = Vec::new();
    while first.len() < 200 {
        let code = deliver(&agent, &url, target, &big, false);
        first.push(code);
        if first.iter().filter(|c| **c == 429).count() >= 5 {
            break;
        }
    }
    let failures_before_429 = first.iter().take_while(|c| **c != 429).count();
    let mut blocked = Vec::new();
    for (label, body) in [
        ("blocked peer, bogus, 100 B body", &small),
        ("blocked peer, bogus, 1 MiB body", &big),
    ] {
        let out = drive(1, duration, pid, |a: &ureq::Agent, _, _| {
            deliver(a, &url, target, body, false)
        });
        eprintln!(
            "webhooks: {label:34} {:>7.0} req/s  server {:>7.0} µs/req  [{}]",
            out.rps,
            out.server_cpu_us,
            out.statuses()
        );
        blocked.push((label, out));
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&tmp);

    let mac_small = one_mac_us(100);
    let mac_big = one_mac_us(MIB);
    let get = |n: usize, label: &str| {
        runs.iter()
            .find(|r| r.senders == n && r.label == label)
            .map(|r| r.out.clone())
            .unwrap_or_default()
    };

    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Webhook deliveries: cost of a bogus delivery (issue 22)\n"
    );
    let _ = writeln!(
        md,
        "`{}` — SQLite, release server, {conns} connections, {} s per row after a 1 s warm-up. \
         Every delivery goes to its sender's URL `/stitcher/webhook/{{caller}}` (senders taken in turn), \
         with well-formed `webhook-id`/`webhook-timestamp`/`webhook-signature` headers and a current \
         timestamp; a *bogus* one carries a well-formed but wrong `v1,` signature. For these rows the \
         failure budget is set to the largest the server accepts \
         (`COORDINATOR_AUTH_FAILURES_PER_MINUTE={UNTHROTTLED}`, a burst of 100 000 failures that one \
         server's runs never use up: no 429 in the answers column), so verification is what is measured. Server CPU = Δ(utime+stime) of the server process from \
         `/proc/PID/stat` over the run ÷ requests answered (10 ms tick resolution).\n",
        crate::report::command_line(),
        duration.as_secs()
    );
    crate::report::machine_and_date(&mut md);
    let _ = writeln!(
        md,
        "| senders | delivery | requests/s | server CPU µs/req | p50 ms | p99 ms | answers |"
    );
    let _ = writeln!(md, "|---:|---|---:|---:|---:|---:|---|");
    for r in &runs {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {} |",
            r.senders,
            r.label,
            r.out.rps,
            r.out.server_cpu_us,
            r.out.p50_ms,
            r.out.p99_ms,
            r.out.statuses()
        );
    }
    let _ = writeln!(md);
    for label in ["bogus, 100 B body", "bogus, 1 MiB body"] {
        let (a, b) = (get(1, label), get(1000, label));
        let _ = writeln!(
            md,
            "- {label}: server CPU with 1 000 senders ÷ with 1 sender = **{:.2}** (target: flat)",
            b.server_cpu_us / a.server_cpu_us.max(1e-9)
        );
    }
    let big1000 = get(1000, "bogus, 1 MiB body");
    let reference = runs
        .iter()
        .find(|r| r.label.starts_with("reference"))
        .map(|r| r.out.clone())
        .unwrap_or_default();
    let _ = writeln!(
        md,
        "- One Standard Webhooks MAC computed in the load generator: {mac_small:.1} µs over 100 B, \
         **{mac_big:.0} µs over 1 MiB**. Server CPU per bogus 1 MiB delivery with 1 000 senders: \
         {:.0} µs. Receiving and refusing the same 1 MiB body with no MAC at all (reference row; it \
         also parses the body as JSON) costs {:.0} µs. Bogus − reference = {:+.0} µs against one MAC \
         of {mac_big:.0} µs: {} (target: at most one body hash per request). Receiving and \
         buffering 1 MiB, not hashing it, is most of the cost.",
        big1000.server_cpu_us,
        reference.server_cpu_us,
        big1000.server_cpu_us - reference.server_cpu_us,
        if big1000.server_cpu_us - reference.server_cpu_us <= 1.5 * mac_big {
            "consistent with at most one MAC per request"
        } else {
            "**more than one MAC's worth of work per request**"
        }
    );
    let (v1, v1000) = (
        get(1, "valid, 64 B delivery"),
        get(1000, "valid, 64 B delivery"),
    );
    let _ = writeln!(
        md,
        "- Valid deliveries: {:.0} req/s with 1 sender, {:.0} req/s with 1 000 senders = **{:.2}** \
         (target: unchanged). Each valid delivery records the delivery and queues a job, so this is \
         bound by the database write, not by verification.",
        v1.rps,
        v1000.rps,
        v1000.rps / v1.rps.max(1e-9)
    );
    let _ = writeln!(
        md,
        "\n### With the default failure budget (`COORDINATOR_AUTH_FAILURES_PER_MINUTE` unset = 30)\n\n\
         One connection sends bogus 1 MiB deliveries to `{}`'s URL: the first **{failures_before_429}** \
         were answered 401 before the first 429 (the first answers: `{}`). Then, still blocked, \
         one connection for {} s each:\n",
        target.name,
        first
            .iter()
            .take(40)
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        duration.as_secs()
    );
    let _ = writeln!(
        md,
        "| while blocked | requests/s | server CPU µs/req | answers |"
    );
    let _ = writeln!(md, "|---|---:|---:|---|");
    for (label, out) in &blocked {
        let _ = writeln!(
            md,
            "| {label} | {:.0} | {:.0} | {} |",
            out.rps,
            out.server_cpu_us,
            out.statuses()
        );
    }
    let blocked_big = blocked.last().map(|(_, o)| o.clone()).unwrap_or_default();
    let _ = writeln!(
        md,
        "\nA blocked peer's delivery for a known sender that passes the cheap checks may still be \
         verified up to 10 times a second (`BLOCKED_VERIFICATIONS_PER_SEC` in `src/auth/throttle.rs`, \
         so that a valid caller behind the same address is not locked out); past that it is answered \
         429 before its body is read or any MAC computed. At {:.0} req/s that bounds the MACs to \
         ≤ 10/s: server CPU per blocked 1 MiB delivery is {:.0} µs against {:.0} µs unthrottled \
         ({}). Every 429 carries `connection: close` (the unread body cannot be skipped on a \
         kept-alive connection), so each refused request also pays a new TCP connection, and the \
         kernel still receives whatever part of the 1 MiB the client sent before the close: that is \
         why a refused 100 B delivery costs the server more than a verified one.",
        blocked_big.rps,
        blocked_big.server_cpu_us,
        big1000.server_cpu_us,
        if blocked_big.count(429) == blocked_big.requests {
            "every one answered 429".to_owned()
        } else {
            format!(
                "{} of {} answered 429",
                blocked_big.count(429),
                blocked_big.requests
            )
        }
    );
    crate::report::splice(out_path, "webhooks", &md);
}
