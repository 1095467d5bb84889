//! Authorization is decided on the route that runs: every route-table path, sent with
//! its characters percent-encoded one at a time (upper- and lower-case hex), with `//`,
//! `/./`, a trailing `/` and `;` parameters, by principals lacking the route's scope or
//! holding a token for another job, is refused (403/404/405), never served. Requests
//! go over a raw TCP socket so no client library normalises the path first.
//!
//! Also here: the other findings of the same review (headers checked before the body,
//! slow bodies, duplicate credential headers, webhook idempotency, lossless bodies).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use coordinator::auth::credentials::{self, SecretKind};
use coordinator::auth::{webhook, Access, Scope};
use coordinator::http::routes::ROUTES;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::backend_tests;
use crate::helpers::{now_secs, spawn_app_with, Backend, Signer, TestApp};

backend_tests!(
    encoded_paths_never_bypass_scopes,
    each_single_scope_key_passes_exactly_the_routes_of_its_scope,
    job_tokens_reach_only_their_own_job,
    random_encodings_agree_with_routing,
    unknown_paths_and_methods_run_no_handler,
    headers_are_checked_before_the_body_is_read,
    slow_bodies_get_408,
    slow_unverified_bodies_hold_no_place_verified_requests_need,
    a_few_addresses_cannot_hold_every_body_place,
    one_address_cannot_hold_every_connection,
    an_upload_that_keeps_arriving_outlasts_stalled_ones,
    a_slow_signed_upload_does_not_use_up_the_request_deadline,
    a_credential_revoked_while_its_body_arrives_is_refused_at_its_end,
    duplicate_or_non_ascii_credential_headers_are_refused,
    webhook_idempotency_key_with_another_body_is_a_conflict,
    bodies_are_json_utf8_without_trailing_bytes_or_nul,
    webhook_deliveries_name_their_sender,
    bogus_delivery_is_answered_before_its_body_is_read,
    blocked_peer_gets_429_for_bogus_deliveries_but_valid_callers_pass,
    a_valid_key_behind_a_blocked_address_is_served,
    a_blocked_address_guessing_credentials_costs_no_lookup,
    authenticated_answers_are_not_cached,
    an_idempotency_key_given_twice_or_to_a_batch_is_refused,
    an_unknown_query_parameter_is_refused_on_every_route,
    a_key_revoked_while_its_body_arrives_is_refused_at_its_end,
    scope_refusals_name_the_scope,
    a_new_key_version_works_at_once_on_a_warm_instance,
);

// ---- a raw HTTP/1.1 client -----------------------------------------------------------

struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

fn port(app: &TestApp) -> u16 {
    app.address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

fn connect(app: &TestApp) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port(app))).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s
}

fn request_head(method: &str, target: &str, headers: &[(&str, &str)], len: usize) -> String {
    let mut head =
        format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
    head
}

fn read_response(mut s: TcpStream) -> Raw {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Raw {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// The headers of a signed `POST /coordinator/jobs` of `body`, `Content-Type` included.
fn signed_create(signer: &crate::helpers::Signer, body: &[u8]) -> Vec<(String, String)> {
    let mut h = signer.headers("POST", "/coordinator/jobs", body, now_secs());
    h.push(("Content-Type".into(), "application/json".into()));
    h
}

fn pairs(h: &[(String, String)]) -> Vec<(&str, &str)> {
    h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Send exactly this request line, headers and body.
fn raw(app: &TestApp, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Raw {
    let mut s = connect(app);
    let mut bytes = request_head(method, target, headers, body.len()).into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).expect("write");
    read_response(s)
}

// ---- path variants -------------------------------------------------------------------

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Every deterministic variant of `path`: each unreserved character percent-encoded in
/// turn (upper- and lower-case hex), `//` for each `/`, `/./` after each `/`, a trailing
/// `/`, and `;p=1` after each segment.
fn variants(path: &str) -> Vec<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::new();
    for (i, b) in bytes.iter().enumerate() {
        if !unreserved(*b) {
            continue;
        }
        for enc in [format!("%{b:02X}"), format!("%{b:02x}")] {
            let mut v = path[..i].to_owned();
            v.push_str(&enc);
            v.push_str(&path[i + 1..]);
            if !out.contains(&v) {
                out.push(v);
            }
        }
    }
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'/' {
            out.push(format!("{}/{}", &path[..i], &path[i..]));
            out.push(format!("{}/.{}", &path[..i], &path[i..]));
        }
    }
    out.push(format!("{path}/"));
    let segments: Vec<usize> = bytes
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, b)| **b == b'/')
        .map(|(i, _)| i)
        .chain([path.len()])
        .collect();
    for end in segments {
        out.push(format!("{};p=1{}", &path[..end], &path[end..]));
    }
    out
}

/// One random variant: a random subset of unreserved characters encoded in random
/// case, and sometimes a doubled slash or a dot segment.
fn random_variant(path: &str, rng: &mut rand::rngs::StdRng) -> String {
    let mut v = String::new();
    for b in path.bytes() {
        if b == b'/' {
            v.push('/');
            match rng.gen_range(0..10) {
                0 => v.push('/'),
                1 => v.push_str("./"),
                _ => {}
            }
        } else if unreserved(b) && rng.gen_bool(0.3) {
            if rng.gen_bool(0.5) {
                v.push_str(&format!("%{b:02X}"));
            } else {
                v.push_str(&format!("%{b:02x}"));
            }
        } else {
            v.push(char::from(b));
        }
    }
    v
}

/// A concrete path for a route pattern.
fn concrete(pattern: &str, job: &str) -> String {
    pattern
        .replace("{id}", job)
        .replace("{queue}", "q")
        .replace("{caller}", "tester")
}

fn body_for(method: &str) -> &'static [u8] {
    if method == "GET" {
        b""
    } else {
        br#"{"status":"CANCELLED","kind":"x","queue":"q","worker":"w","percent":1,"jti":"job:x","expiresAt":"2099-01-01T00:00:00Z"}"#
    }
}

fn assert_refused(r: &Raw, who: &str, method: &str, target: &str) {
    assert!(
        matches!(r.status, 401 | 403 | 404 | 405),
        "{who}: {method} {target} answered {} {}",
        r.status,
        r.body
    );
}

// ---- tests ---------------------------------------------------------------------------

fn app(b: Backend) -> Option<TestApp> {
    spawn_app_with(b, |c| c.auth_failures_per_minute = 1_000_000)
}

fn encoded_paths_never_bypass_scopes(b: Backend) {
    let Some(app) = app(b) else { return };
    let job = app.create_job(&json!({"kind": "build", "queue": "q"}));
    let key = app.api_key("ro", &[Scope::JobsRead]);
    let mut tried = 0usize;
    for route in ROUTES {
        let Some(scope) = route.access.scope() else {
            continue;
        };
        if scope == Scope::JobsRead {
            continue;
        }
        let path = concrete(route.path, &job);
        // The plain path is refused too (the test can fail: see the sanity check below).
        for target in std::iter::once(path.clone()).chain(variants(&path)) {
            let r = raw(
                &app,
                route.method,
                &target,
                &[("X-API-Key", &key), ("Content-Type", "application/json")],
                body_for(route.method),
            );
            assert_refused(&r, "ro", route.method, &target);
            tried += 1;
        }
    }
    // Sanity: the same client is served where it holds the scope, encoded or not.
    let ok = raw(
        &app,
        "GET",
        &format!("/coordinator/%6Aobs/{job}"),
        &[("X-API-Key", &key)],
        b"",
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    // Nothing changed hands: the job is still PENDING and no token was revoked.
    assert_eq!(
        app.get(&format!("/coordinator/jobs/{job}")).json()["status"],
        "PENDING"
    );
    eprintln!("route x encoding variants tried (jobs:read key): {tried}");
}

/// The matrix of the route table, one scope at a time (fifth security review,
/// 2026-12-07): an API key holding a single scope is refused 403 on every authenticated
/// route that needs another (every write for a read-only key, every read for a
/// write-only one), and is let past the guard (neither 401 nor 403) on each route of
/// its own scope. The encodings of each path are `encoded_paths_never_bypass_scopes`'.
fn each_single_scope_key_passes_exactly_the_routes_of_its_scope(b: Backend) {
    // The table itself, against design.md §6 written out again: a scope moved in the
    // route table fails here, not only in review. `true`: a job token may use it too.
    use Scope::*;
    let design: &[(&str, &str, Option<Scope>, bool)] = &[
        ("GET", "/livez", None, false),
        ("GET", "/readyz", None, false),
        ("GET", "/metrics", None, false),
        ("GET", "/openapi.json", None, false),
        ("GET", "/ui", None, false),
        ("GET", "/ui/", None, false),
        ("GET", "/ui/app.js", None, false),
        ("GET", "/ui/app.css", None, false),
        ("GET", "/coordinator/health", Some(HealthRead), false),
        ("POST", "/coordinator/jobs", Some(JobsCreate), false),
        ("GET", "/coordinator/jobs", Some(JobsRead), false),
        ("POST", "/coordinator/jobs/batch", Some(JobsCreate), false),
        ("GET", "/coordinator/jobs/{id}", Some(JobsRead), true),
        (
            "PATCH",
            "/coordinator/jobs/{id}/status",
            Some(JobsUpdate),
            true,
        ),
        (
            "PATCH",
            "/coordinator/jobs/{id}/progress",
            Some(JobsUpdate),
            true,
        ),
        (
            "POST",
            "/coordinator/jobs/{id}/heartbeat",
            Some(JobsUpdate),
            true,
        ),
        (
            "POST",
            "/coordinator/jobs/{id}/complete",
            Some(JobsUpdate),
            true,
        ),
        (
            "POST",
            "/coordinator/jobs/{id}/fail",
            Some(JobsUpdate),
            true,
        ),
        (
            "POST",
            "/coordinator/jobs/{id}/cancel",
            Some(JobsUpdate),
            false,
        ),
        (
            "POST",
            "/coordinator/jobs/{id}/retry",
            Some(JobsUpdate),
            false,
        ),
        ("GET", "/coordinator/queues", Some(HealthRead), false),
        ("PATCH", "/coordinator/queues/{queue}", Some(Admin), false),
        (
            "POST",
            "/coordinator/queues/{queue}/claim",
            Some(JobsUpdate),
            false,
        ),
        ("GET", "/coordinator/jobs/{id}/events", Some(JobsRead), true),
        (
            "GET",
            "/coordinator/queues/{queue}/events",
            Some(HealthRead),
            false,
        ),
        ("POST", "/stitcher/webhook", Some(StitcherWebhook), false),
        (
            "POST",
            "/stitcher/webhook/{caller}",
            Some(StitcherWebhook),
            false,
        ),
        ("POST", "/stitcher/dispatch", Some(StitcherDispatch), false),
        ("POST", "/admin/tokens/revoke", Some(Admin), false),
    ];
    let table: Vec<(&str, &str, Option<Scope>, bool)> = ROUTES
        .iter()
        .map(|r| (r.method, r.path, r.access.scope(), r.accepts_job_tokens()))
        .collect();
    assert_eq!(
        table, design,
        "the route table no longer says what design.md says"
    );
    let Some(app) = app(b) else { return };
    let job = app.running_job();
    let mut tried = 0usize;
    for scope in Scope::ALL {
        let caller = format!("only-{}", scope.as_str().replace(':', "-"));
        let key = app.api_key(&caller, &[scope]);
        for route in ROUTES {
            let Some(needs) = route.access.scope() else {
                continue;
            };
            // A queue stream stays open once let through: its refusal is what is checked.
            if needs == scope && route.path.ends_with("{queue}/events") {
                continue;
            }
            let target = concrete(route.path, &job).replace("/tester", &format!("/{caller}"));
            let r = raw(
                &app,
                route.method,
                &target,
                &[("X-API-Key", &key), ("Content-Type", "application/json")],
                body_for(route.method),
            );
            if needs == scope {
                assert!(
                    !matches!(r.status, 401 | 403),
                    "{caller}: {} {target} answered {} {}",
                    route.method,
                    r.status,
                    r.body
                );
            } else {
                assert_eq!(
                    r.status, 403,
                    "{caller}: {} {target} answered {}",
                    route.method, r.body
                );
                assert!(r.body.contains(needs.missing()), "{target}: {}", r.body);
            }
            tried += 1;
        }
    }
    // Nothing a refused key sent moved the job.
    assert_eq!(
        app.get(&format!("/coordinator/jobs/{job}")).json()["status"],
        "RUNNING"
    );
    eprintln!("route x single-scope keys tried: {tried}");
}

fn job_tokens_reach_only_their_own_job(b: Backend) {
    let Some(app) = app(b) else { return };
    let own = app.running_job();
    let other = app.running_job();
    let token = app.job_token(&own, "w1", Duration::from_secs(600));
    let auth = format!("Bearer {token}");
    let mut tried = 0usize;
    for route in ROUTES {
        if route.access == Access::Open {
            continue;
        }
        let path = concrete(route.path, &other);
        for target in std::iter::once(path.clone()).chain(variants(&path)) {
            let r = raw(
                &app,
                route.method,
                &target,
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/json"),
                ],
                body_for(route.method),
            );
            assert_refused(&r, "token for another job", route.method, &target);
            tried += 1;
        }
    }
    // On its own job a token reaches only the routes whose access is `Access::Job`
    // (what the document lists as `bearer`): every other route refuses it.
    for route in ROUTES
        .iter()
        .filter(|r| r.access != Access::Open && !r.accepts_job_tokens())
    {
        let target = concrete(route.path, &own);
        let r = raw(
            &app,
            route.method,
            &target,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body_for(route.method),
        );
        assert_eq!(
            r.status, 403,
            "token on its own job: {} {target} answered {}",
            route.method, r.body
        );
        // Its own job's cancel and retry say what is wrong: the credential, not the job.
        if route.path.contains("{id}") {
            assert!(
                r.body.contains("cannot cancel or retry its job"),
                "{target}: {}",
                r.body
            );
        }
        tried += 1;
    }
    // The other job is untouched, and the token still works on its own job (encoded).
    assert_eq!(
        app.get(&format!("/coordinator/jobs/{other}")).json()["status"],
        "RUNNING"
    );
    let r = raw(
        &app,
        "PATCH",
        &format!("/coordinator/jobs/{own}/%70rogress"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        br#"{"percent":5}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    eprintln!("route x encoding variants tried (job token): {tried}");
}

fn random_encodings_agree_with_routing(b: Backend) {
    let Some(app) = app(b) else { return };
    let job = app.create_job(&json!({"kind": "build", "queue": "q"}));
    let key = app.api_key("ro", &[Scope::JobsRead]);
    let seed: u64 = rand::thread_rng().gen();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let guarded: Vec<_> = ROUTES.iter().filter(|r| r.access != Access::Open).collect();
    for _ in 0..600 {
        let route = guarded[rng.gen_range(0..guarded.len())];
        let target = random_variant(&concrete(route.path, &job), &mut rng);
        let r = raw(
            &app,
            route.method,
            &target,
            &[("X-API-Key", &key), ("Content-Type", "application/json")],
            body_for(route.method),
        );
        if route.access.scope() == Some(Scope::JobsRead) {
            // Either routed to the read route (200) or to no route (404): never a 403.
            assert!(
                matches!(r.status, 200 | 404),
                "seed {seed}: GET {target}: {}",
                r.status
            );
        } else {
            assert!(
                matches!(r.status, 403 | 404),
                "seed {seed}: {} {target} answered {} {}",
                route.method,
                r.status,
                r.body
            );
        }
    }
}

fn unknown_paths_and_methods_run_no_handler(b: Backend) {
    let Some(app) = app(b) else { return };
    let key = app.api_key("admin-op", &Scope::ALL);
    // Unknown path: authenticated first, then 404 with a pointer to the route list.
    assert_eq!(raw(&app, "GET", "/nope", &[], b"").status, 401);
    let r = raw(&app, "GET", "/nope", &[("X-API-Key", &key)], b"");
    assert_eq!(r.status, 404);
    assert!(r.json()["detail"]
        .as_str()
        .unwrap_or("")
        .contains("/openapi.json"));
    // Wrong method: 405 with `Allow`, no handler ran (no job was created).
    let r = raw(
        &app,
        "PUT",
        "/coordinator/jobs",
        &[("X-API-Key", &key)],
        b"{}",
    );
    assert_eq!(r.status, 405, "{}", r.body);
    assert!(r.head.contains("\r\nallow: post"), "{}", r.head);
    let r = raw(
        &app,
        "DELETE",
        "/admin/tokens/revoke",
        &[("X-API-Key", &key)],
        b"",
    );
    assert_eq!(r.status, 405);
    // Without the route's scope, the wrong method is a 403 too (deny first).
    let ro = app.api_key("ro", &[Scope::JobsRead]);
    assert_eq!(
        raw(&app, "PUT", "/coordinator/jobs", &[("X-API-Key", &ro)], b"").status,
        403
    );
}

fn headers_are_checked_before_the_body_is_read(b: Backend) {
    let Some(app) = app(b) else { return };
    // Malformed caller, a large declared body that never comes: answered at once.
    let cases: [&[(&str, &str)]; 3] = [
        &[
            ("X-Coordinator-Caller", "no such caller!"),
            ("X-Coordinator-Timestamp", "1"),
            ("X-Coordinator-Signature", "00"),
        ],
        &[
            ("X-Coordinator-Caller", "ghost"),
            ("X-Coordinator-Timestamp", &now_secs().to_string()),
            ("X-Coordinator-Signature", &"0".repeat(64)),
        ],
        &[
            ("X-Coordinator-Caller", "tester"),
            ("X-Coordinator-Timestamp", "1000"),
            ("X-Coordinator-Signature", &"0".repeat(64)),
        ],
    ];
    for headers in cases {
        let mut s = connect(&app);
        s.write_all(request_head("POST", "/coordinator/jobs", headers, 1_000_000).as_bytes())
            .expect("write");
        // No body is sent: the answer must still come (a read timeout would fail here).
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let r = read_response(s);
        assert_eq!(r.status, 401, "{}", r.body);
    }
}

fn slow_bodies_get_408(b: Backend) {
    let Some(app) = spawn_app_with(b, |c| {
        c.body_read_timeout = Duration::from_secs(1);
    }) else {
        return;
    };
    let body = br#"{"kind":"build"}"#;
    let sig = app
        .signer
        .headers("POST", "/coordinator/jobs", body, now_secs());
    let headers: Vec<(&str, &str)> = sig.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut s = connect(&app);
    s.write_all(request_head("POST", "/coordinator/jobs", &headers, body.len()).as_bytes())
        .expect("write");
    s.write_all(&body[..4]).expect("write");
    let started = Instant::now();
    let r = read_response(s);
    assert_eq!(r.status, 408, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(25));
    // Same for an API-key caller whose body stalls.
    let key = app.api_key("slow", &[Scope::JobsCreate]);
    let mut s = connect(&app);
    s.write_all(request_head("POST", "/coordinator/jobs", &[("X-API-Key", &key)], 100).as_bytes())
        .expect("write");
    assert_eq!(read_response(s).status, 408);
}

/// Review finding (2026-12-05): a signed request passes its header checks with no
/// secret (a caller's name, the time, 64 zeros), then waits for its body. Sent slowly,
/// 70 such bodies took every place of the workers' in-flight limit (2 × 32) and every
/// other request was answered 503. Now a request waiting for its body before it is
/// verified holds no place, and such waits are bounded per peer (429 past it).
/// The headers of a signed request that pass every check made before its body is
/// read, with no secret: a known caller, the current time, a signature of zeros.
struct ForgedHead {
    caller: String,
    ts: String,
    signature: String,
}

impl ForgedHead {
    fn new(app: &TestApp) -> Self {
        ForgedHead {
            caller: app.signer.caller.clone(),
            ts: now_secs().to_string(),
            signature: "0".repeat(64),
        }
    }

    fn headers(&self) -> [(&str, &str); 3] {
        [
            ("X-Coordinator-Caller", &self.caller),
            ("X-Coordinator-Timestamp", &self.ts),
            ("X-Coordinator-Signature", &self.signature),
        ]
    }
}

/// A connection to the app from the loopback address `127.0.0.{host}`: another peer.
fn connect_from(app: &TestApp, host: u8) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    let from = std::net::SocketAddr::from(([127, 0, 0, host], 0));
    socket.bind(&from.into()).expect("bind a loopback address");
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], port(app)));
    socket.connect(&to.into()).expect("connect");
    let s = TcpStream::from(socket);
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s
}

/// Review finding (2026-12-05): eight addresses, each at its bound of 32 bodies that
/// never finish, held all 256 places of the instance, and every signed write with a
/// body from anyone else got 503 until they let go. Now a peer holding fewer places
/// takes the oldest place of the peer holding the most, whose read ends in a 503.
fn a_few_addresses_cannot_hold_every_body_place(b: Backend) {
    use coordinator::auth::throttle::{MAX_BODY_READS, MAX_BODY_READS_PER_PEER};
    let Some(app) = spawn_app_with(b, |c| {
        c.body_read_timeout = Duration::from_secs(60);
        c.auth_failures_per_minute = 1_000_000;
    }) else {
        return;
    };
    let forged = ForgedHead::new(&app);
    let forged = forged.headers();
    let per = usize::try_from(MAX_BODY_READS_PER_PEER).expect("fits");
    let hosts = u8::try_from(MAX_BODY_READS / per).expect("fits");
    // One at a time, each waiting for its body before the next is sent: together
    // they would also meet the door's in-flight limit while their heads are checked.
    let mut stalled = Vec::new();
    for host in 2..2 + hosts {
        for _ in 0..per {
            let mut s = connect_from(&app, host);
            s.write_all(request_head("POST", "/coordinator/jobs", &forged, 100).as_bytes())
                .expect("write");
            s.write_all(b"{").expect("write");
            stalled.push(s);
            let waiting = Instant::now() + Duration::from_secs(10);
            while app.state.auth.throttle.body_reads().0 < stalled.len() {
                assert!(
                    Instant::now() < waiting,
                    "{} sent, {:?} waiting for their bodies",
                    stalled.len(),
                    app.state.auth.throttle.body_reads()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    assert_eq!(app.state.auth.throttle.body_reads().0, MAX_BODY_READS);
    // A signed write sent in one piece, from an address at its bound, takes no place:
    // its body came with it (review, 2026-12-06: actix had not yet decoded it at the
    // first look, and it got 429, or took someone's place).
    let body = serde_json::to_vec(&json!({"kind": "whole"})).expect("json");
    let signed = signed_create(&app.signer, &body);
    let headers = pairs(&signed);
    let mut s = connect_from(&app, 2);
    let mut bytes = request_head("POST", "/coordinator/jobs", &headers, body.len()).into_bytes();
    bytes.extend_from_slice(&body);
    s.write_all(&bytes).expect("write");
    let r = read_response(s);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(app.state.auth.throttle.body_reads(), (MAX_BODY_READS, 0));
    // Every place is held: a signed write from another address, its body sent in two
    // pieces (so it waits for it and needs a place), is still served. A body that comes
    // with its request takes no place at all.
    for _ in 0..3 {
        let body = serde_json::to_vec(&json!({"kind": "k"})).expect("json");
        let signed = signed_create(&app.signer, &body);
        let headers = pairs(&signed);
        let r = split_upload(&app, "/coordinator/jobs", &headers, &body, || {});
        assert_eq!(r.status, 201, "{}", r.body);
    }
    // It took the place of a stalled body (the oldest of a peer holding the most),
    // which was answered 503 and closed.
    let answered = |s: &TcpStream| {
        s.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let ready = matches!(s.peek(&mut byte), Ok(n) if n > 0);
        s.set_nonblocking(false).expect("blocking");
        ready
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let at = loop {
        if let Some(at) = stalled.iter().position(answered) {
            break at;
        }
        assert!(Instant::now() < deadline, "no stalled body was let go");
        std::thread::sleep(Duration::from_millis(20));
    };
    let r = read_response(stalled.remove(at));
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.head.contains("connection: close"), "{}", r.head);
    assert!(r.head.contains("retry-after: 1"), "{}", r.head);
    assert!(r.body.contains("overloaded"), "{}", r.body);
    let metrics = app.raw("GET", "/metrics", &[], b"").body;
    let evicted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("coordinator_unverified_body_reads_evicted_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the eviction counter");
    assert!(evicted >= 1, "{metrics}");
    // A stalled peer gains nothing from it: one that holds as many as the others
    // cannot take their places (its own bound answers first).
    let mut s = connect_from(&app, 3);
    s.write_all(request_head("POST", "/coordinator/jobs", &forged, 100).as_bytes())
        .expect("write");
    let r = read_response(s);
    assert_eq!(r.status, 429, "{}", r.body);
}

/// Send `GET /livez` on an open keep-alive connection and read its answer (the whole
/// of it: `{"status":"ok"}` ends the body), leaving the connection open.
fn livez_keep_alive(s: &mut TcpStream) -> String {
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with('}') {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Review finding (2026-12-06): open connections were bounded by nothing but actix's
/// 25,000 per worker. Under the usual open-file soft limit of 1,024, one address holding
/// 1,000 idle keep-alive connections (a `GET /livez` every 3 s, no credential) took every
/// descriptor: accepting failed ("Too many open files"), SQLite could not open the
/// database and it was marked failing, and every other client timed out for as long as
/// they were held. Now one address holds at most `COORDINATOR_MAX_CONNECTIONS_PER_PEER`;
/// a further connection is closed at once (429 when it can be written), and other
/// addresses are served.
fn one_address_cannot_hold_every_connection(b: Backend) {
    const BOUND: usize = 8;
    let Some(app) = spawn_app_with(b, |c| c.max_connections_per_peer = BOUND) else {
        return;
    };
    let mut held: Vec<TcpStream> = (0..BOUND)
        .map(|_| {
            let mut s = connect_from(&app, 2);
            assert!(livez_keep_alive(&mut s).starts_with("HTTP/1.1 200"));
            s
        })
        .collect();
    let bound = u64::try_from(BOUND).expect("fits");
    assert_eq!(app.state.connections.counts(), (bound, 0));
    // One more from the same address: closed at once, never served.
    for _ in 0..3 {
        let mut s = connect_from(&app, 2);
        let _ = s.write_all(b"GET /livez HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 429"),
            "a connection past the bound was served: {text}"
        );
        if !text.is_empty() {
            assert!(text.contains("open connections for this address"), "{text}");
        }
    }
    // A client that reads before it writes gets the 429 operations.md describes
    // (review, 2026-12-06: tokio's `try_write` had written nothing, every time).
    let mut s = connect_from(&app, 2);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 429") && text.contains("open connections for this address"),
        "a connection past the bound was closed without its 429: {text:?}"
    );
    // The held ones still work, and another address is served.
    assert!(livez_keep_alive(&mut held[0]).starts_with("HTTP/1.1 200"));
    let mut other = connect_from(&app, 3);
    assert!(livez_keep_alive(&mut other).starts_with("HTTP/1.1 200"));
    let metrics = app.raw("GET", "/metrics", &[], b"").body;
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("coordinator_connections_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the refusal counter");
    assert!(refused >= 3, "{metrics}");
    // Closed connections are no longer counted: the address may connect again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.state.connections.counts().0 > 3 {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            app.state.connections.counts()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut again = connect_from(&app, 2);
    assert!(livez_keep_alive(&mut again).starts_with("HTTP/1.1 200"));
}

/// Follow-up review (2026-12-06): when every place was held, the oldest read of the
/// peer holding the most was ended, and an honest upload, older than stalled reads
/// that attackers reopened at once, was cut off mid-body. Now the read whose bytes
/// stopped coming longest ago is ended: an upload that keeps arriving outlasts them.
fn an_upload_that_keeps_arriving_outlasts_stalled_ones(b: Backend) {
    use coordinator::auth::throttle::{MAX_BODY_READS, MAX_BODY_READS_PER_PEER};
    let Some(app) = spawn_app_with(b, |c| {
        c.body_read_timeout = Duration::from_secs(60);
        c.request_deadline = Duration::from_secs(60);
        c.auth_failures_per_minute = 1_000_000;
    }) else {
        return;
    };
    let counted = |n: usize| {
        let waiting = Instant::now() + Duration::from_secs(10);
        while app.state.auth.throttle.body_reads().0 < n {
            assert!(
                Instant::now() < waiting,
                "{:?}",
                app.state.auth.throttle.body_reads()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // The honest upload: signed, its body in 40 pieces 100 ms apart, and the oldest
    // read of all.
    let body = serde_json::to_vec(&json!({"kind": "honest", "payload": {"pad": "x".repeat(3000)}}))
        .expect("json");
    let headers = app
        .signer
        .headers("POST", "/coordinator/jobs", &body, now_secs());
    let mut head_headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    head_headers.push(("Content-Type", "application/json"));
    let head = request_head("POST", "/coordinator/jobs", &head_headers, body.len());
    let mut honest = connect(&app);
    honest.write_all(head.as_bytes()).expect("write");
    let pieces: Vec<Vec<u8>> = body
        .chunks(body.len() / 40 + 1)
        .map(<[u8]>::to_vec)
        .collect();
    honest.write_all(&pieces[0]).expect("write");
    counted(1);
    let uploading = std::thread::spawn(move || {
        for piece in &pieces[1..] {
            std::thread::sleep(Duration::from_millis(100));
            honest.write_all(piece).expect("write");
        }
        read_response(honest)
    });
    // Stalled bodies fill every other place, then fresh addresses take places.
    let forged = ForgedHead::new(&app);
    let forged = forged.headers();
    let stall = |host: u8| {
        let mut s = connect_from(&app, host);
        s.write_all(request_head("POST", "/coordinator/jobs", &forged, 100).as_bytes())
            .expect("write");
        s.write_all(b"{").expect("write");
        s
    };
    let per = usize::try_from(MAX_BODY_READS_PER_PEER).expect("fits");
    let mut stalled = Vec::new();
    let mut host = 2;
    while stalled.len() + 1 < MAX_BODY_READS {
        stalled.push(stall(host));
        counted(stalled.len() + 1);
        if stalled.len() % per == 0 {
            host += 1;
        }
    }
    for fresh in 100..110 {
        stalled.push(stall(fresh));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(app.state.auth.throttle.body_reads().1 >= 10);
    let r = uploading.join().expect("uploader");
    assert_eq!(r.status, 201, "{} {}", r.head, r.body);
}

/// Review finding (2026-12-06): the request deadline (time allowed before the
/// database is reached) counted the time a signed request's body took to arrive, so a
/// 200 KB create at 50 KB/s was always answered 503 `overloaded`, and a client retried
/// it on the same slow link for ever. The body's arrival no longer counts.
fn a_slow_signed_upload_does_not_use_up_the_request_deadline(b: Backend) {
    let Some(app) = spawn_app_with(b, |c| c.request_deadline = Duration::from_millis(500)) else {
        return;
    };
    let body = serde_json::to_vec(&json!({"kind": "slow", "payload": {"pad": "x".repeat(3000)}}))
        .expect("json");
    let headers = app
        .signer
        .headers("POST", "/coordinator/jobs", &body, now_secs());
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([("Content-Type", "application/json")])
        .collect();
    let mut s = connect(&app);
    s.write_all(request_head("POST", "/coordinator/jobs", &headers, body.len()).as_bytes())
        .expect("write");
    // The body in ten pieces over about 1.5 s: three times the deadline.
    for piece in body.chunks(body.len() / 10 + 1) {
        s.write_all(piece).expect("write");
        std::thread::sleep(Duration::from_millis(150));
    }
    let r = read_response(s);
    assert_eq!(r.status, 201, "{}", r.body);
}

fn slow_unverified_bodies_hold_no_place_verified_requests_need(b: Backend) {
    use coordinator::auth::throttle::MAX_BODY_READS_PER_PEER;
    let Some(app) = spawn_app_with(b, |c| {
        c.max_in_flight = 4;
        c.body_read_timeout = Duration::from_secs(60);
        c.auth_failures_per_minute = 1_000_000;
    }) else {
        return;
    };
    let key = app.api_key("operator", &[Scope::HealthRead]);
    let forged = ForgedHead::new(&app);
    let forged = forged.headers();
    let slow = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                let mut s = connect(&app);
                s.write_all(request_head("POST", "/coordinator/jobs", &forged, 100).as_bytes())
                    .expect("write");
                s.write_all(b"{").expect("write");
                // One at a time: each steps out of the door before the next arrives.
                std::thread::sleep(Duration::from_millis(30));
                s
            })
            .collect()
    };
    // Every one of them is waiting for its body, none was answered.
    let unanswered = |streams: &[TcpStream]| {
        for s in streams {
            s.set_nonblocking(true).expect("nonblocking");
            let mut byte = [0u8; 1];
            let r = (&*s).read(&mut byte);
            assert!(
                matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                "a stalled body was answered: {r:?}"
            );
            s.set_nonblocking(false).expect("blocking");
        }
    };
    // Far more stalled bodies than the workers' places (2 workers × 4).
    let stalled = slow(20);
    std::thread::sleep(Duration::from_millis(300));
    unanswered(&stalled);
    for _ in 0..5 {
        let r = app.raw("GET", "/coordinator/health", &[("X-API-Key", &key)], b"");
        assert_eq!(r.status, 200, "an API-key caller is refused: {}", r.body);
        let r = app.get("/coordinator/health");
        assert_eq!(r.status, 200, "a signed caller is refused: {}", r.body);
    }
    // The peer's bound: past it, a further body is refused at once, before it is read.
    let per_peer = usize::try_from(MAX_BODY_READS_PER_PEER).expect("fits");
    let more = slow(per_peer - stalled.len());
    std::thread::sleep(Duration::from_millis(300));
    unanswered(&more);
    let started = Instant::now();
    let mut s = connect(&app);
    s.write_all(request_head("POST", "/coordinator/jobs", &forged, 100).as_bytes())
        .expect("write");
    let r = read_response(s);
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.head.contains("retry-after: 1"), "{}", r.head);
    assert!(r.body.contains("request bodies on their way"), "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(10));
    // Counted and audited as before its detail was made honest: `throttled`, one of
    // the documented reasons, not the catch-all `request refused`.
    let metrics = app.get("/metrics").body;
    let refused = |reason: &str| {
        metrics.lines().any(|l| {
            l.starts_with("coordinator_auth_outcomes_total{")
                && l.contains(r#"outcome="deny""#)
                && l.contains(&format!(r#"reason="{reason}""#))
        })
    };
    assert!(refused("throttled"), "{metrics}");
    assert!(!refused("request refused"), "{metrics}");
    // Requests that read no body before they are verified are not affected: API-key
    // ones, and signed ones without a body, even from the peer at its bound.
    let r = app.raw("GET", "/coordinator/health", &[("X-API-Key", &key)], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = app.get("/coordinator/health");
    assert_eq!(r.status, 200, "a signed GET waits for no body: {}", r.body);
    // Once the stalled connections close, the peer's count is given back.
    drop(stalled);
    drop(more);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = app.get("/coordinator/health");
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still refused: {} {}",
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn duplicate_or_non_ascii_credential_headers_are_refused(b: Backend) {
    let Some(app) = app(b) else { return };
    let key = app.api_key("dup", &Scope::ALL);
    let sig = app
        .signer
        .headers("GET", "/coordinator/health", b"", now_secs());
    let sig: Vec<(&str, &str)> = sig.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let reason = |r: Raw| {
        assert_eq!(r.status, 401, "{}", r.body);
        r.json()["reason"].as_str().unwrap_or("").to_owned()
    };
    let two_keys = [("X-API-Key", key.as_str()), ("X-API-Key", key.as_str())];
    assert_eq!(
        reason(raw(&app, "GET", "/coordinator/health", &two_keys, b"")),
        "duplicate header"
    );
    let two_auth = [("Authorization", "Bearer a"), ("Authorization", "Bearer b")];
    assert_eq!(
        reason(raw(&app, "GET", "/coordinator/health", &two_auth, b"")),
        "duplicate header"
    );
    let mut twice = sig.clone();
    twice.push(sig[2]);
    assert_eq!(
        reason(raw(&app, "GET", "/coordinator/health", &twice, b"")),
        "duplicate header"
    );
    // Not visible ASCII: malformed, never "absent" (which could pick another scheme).
    let mut s = connect(&app);
    let mut bytes = b"GET /coordinator/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-API-Key: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n".to_vec();
    s.write_all(&bytes).expect("write");
    assert_eq!(reason(read_response(s)), "malformed header");
    bytes.clear();
    // The same request with one header is served.
    assert_eq!(
        raw(
            &app,
            "GET",
            "/coordinator/health",
            &[("X-API-Key", &key)],
            b""
        )
        .status,
        200
    );
    assert_eq!(
        raw(&app, "GET", "/coordinator/health", &sig, b"").status,
        200
    );
    // Empty bearer and an API key sent as a bearer token get reasons that say so.
    assert_eq!(
        reason(raw(
            &app,
            "GET",
            "/coordinator/health",
            &[("Authorization", "Bearer ")],
            b""
        )),
        "empty bearer token"
    );
    let as_bearer = format!("Bearer {key}");
    assert_eq!(
        reason(raw(
            &app,
            "GET",
            "/coordinator/health",
            &[("Authorization", &as_bearer)],
            b""
        )),
        "this looks like an API key: send it in X-API-Key"
    );
}

fn webhook_idempotency_key_with_another_body_is_a_conflict(b: Backend) {
    let Some(app) = app(b) else { return };
    let key = app.api_key("hooker", &[Scope::StitcherWebhook, Scope::StitcherDispatch]);
    let body1 = br#"{"issueNumber":1,"repository":"o/r","action":"assigned","comment":"c"}"#;
    let body2 = br#"{"issueNumber":2,"repository":"o/r","action":"assigned","comment":"c"}"#;
    let h = [
        ("X-API-Key", key.as_str()),
        ("Idempotency-Key", "same"),
        ("Content-Type", "application/json"),
    ];
    assert_eq!(
        raw(&app, "POST", "/stitcher/webhook", &h, body1).status,
        202
    );
    let again = raw(&app, "POST", "/stitcher/webhook", &h, body1);
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["duplicate"], true);
    let r = raw(&app, "POST", "/stitcher/webhook", &h, body2);
    assert_eq!(r.status, 409, "{}", r.body);
    // The same rule as dispatch.
    let d1 = br#"{"issueNumber":1,"repository":"o/r"}"#;
    let d2 = br#"{"issueNumber":2,"repository":"o/r"}"#;
    let h = [
        ("X-API-Key", key.as_str()),
        ("Idempotency-Key", "d-same"),
        ("Content-Type", "application/json"),
    ];
    assert_eq!(raw(&app, "POST", "/stitcher/dispatch", &h, d1).status, 202);
    assert_eq!(raw(&app, "POST", "/stitcher/dispatch", &h, d2).status, 409);
}

fn bodies_are_json_utf8_without_trailing_bytes_or_nul(b: Backend) {
    let Some(app) = app(b) else { return };
    let key = app.api_key("bodies", &Scope::ALL);
    let h = [
        ("X-API-Key", key.as_str()),
        ("Content-Type", "application/json"),
    ];
    let bad: [&[u8]; 6] = [
        br#"{"kind":"a"}{"kind":"b"} garbage"#,
        br#"{"kind":"a"} x"#,
        b"{\"kind\":\"a\xff\"}",
        b"{\"kind\":\"a\x00\"}",
        b"{\"kind\":\"a\"}\x00",
        b"\xef\xbb\xbf{\"kind\":\"a\"}",
    ];
    for body in bad {
        let r = raw(&app, "POST", "/coordinator/jobs", &h, body);
        assert_eq!(
            r.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(body),
            r.body
        );
        assert_eq!(r.json()["field"], "body");
        let w = raw(&app, "POST", "/stitcher/webhook", &h, body);
        assert_eq!(
            w.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(body),
            w.body
        );
    }
    // Whitespace after the object is fine; escaped NULs inside the payload are JSON.
    assert_eq!(
        raw(
            &app,
            "POST",
            "/coordinator/jobs",
            &h,
            b"{\"kind\":\"a\"} \r\n"
        )
        .status,
        201
    );
    assert_eq!(
        raw(
            &app,
            "POST",
            "/coordinator/jobs",
            &h,
            br#"{"kind":"a","payload":{"t":"a\\u0000 and \u0000"}}"#
        )
        .status,
        201
    );
    // An escaped NUL in a text column's field is refused by name, on both backends.
    let r = raw(
        &app,
        "POST",
        "/coordinator/jobs",
        &h,
        br#"{"kind":"a\u0000"}"#,
    );
    assert_eq!(r.json()["field"], "kind", "{}", r.body);
    // A delivery whose comment holds an escaped NUL is stored as sent (no 500).
    let hook = br#"{"issueNumber":3,"repository":"o/r","action":"assigned","comment":"a\u0000b"}"#;
    let r = raw(&app, "POST", "/stitcher/webhook", &h, hook);
    assert!(matches!(r.status, 202 | 400), "{}", r.body);
}

/// A caller holding `stitcher:webhook` with a webhook secret; the key bytes.
fn sender(app: &TestApp, name: &str) -> Vec<u8> {
    let _ = credentials::add_caller(&app.state.db, name, &[Scope::StitcherWebhook]);
    let s = credentials::add_secret(
        &app.state.db,
        app.state.auth.store.sealer(),
        name,
        SecretKind::Webhook,
        None,
        None,
    )
    .expect("webhook secret");
    coordinator::crypto::credential::WebhookSecret::parse(&s.plaintext)
        .expect("whsec")
        .key_bytes()
        .to_vec()
}

fn delivery(app: &TestApp, path: &str, key: &[u8], id: &str, ts: i64, body: &[u8]) -> Raw {
    let ts = ts.to_string();
    let sig = webhook::wire::sign(key, id, &ts, body);
    raw(
        app,
        "POST",
        path,
        &[
            ("webhook-id", id),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &sig),
            ("Content-Type", "application/json"),
        ],
        body,
    )
}

const HOOK: &[u8] = br#"{"issueNumber":7,"repository":"o/r","action":"assigned","comment":"c"}"#;

/// Headers and the first bytes of a body sent now, the rest after `between` ran: the
/// answer.
fn split_upload(
    app: &TestApp,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    between: impl FnOnce(),
) -> Raw {
    let mut s = connect(app);
    s.write_all(request_head("POST", target, headers, body.len()).as_bytes())
        .expect("write");
    s.write_all(&body[..5]).expect("write");
    std::thread::sleep(Duration::from_millis(100));
    between();
    s.write_all(&body[5..]).expect("write");
    read_response(s)
}

/// Repeat `probe` until it answers 401, at most 5 s: the credential store picks a
/// change up within its 250 ms poll.
fn until_refused(what: &str, mut probe: impl FnMut() -> u16) {
    let end = Instant::now() + Duration::from_secs(5);
    while probe() != 401 {
        assert!(Instant::now() < end, "{what} was never seen");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Jobs listed (at most 500).
fn job_count(app: &TestApp) -> usize {
    app.get("/coordinator/jobs?limit=500").json()["items"]
        .as_array()
        .map_or(0, Vec::len)
}

/// A request authenticated before its body (API key, job token) is checked again when
/// a slow body has arrived, and the body's arrival does not use up the request deadline
/// (review, 2026-12-06: an API key revoked mid-body still created a job, and a valid
/// API-key create whose body took 4 s got 503).
fn a_key_revoked_while_its_body_arrives_is_refused_at_its_end(b: Backend) {
    let Some(app) = spawn_app_with(b, |c| {
        c.auth_failures_per_minute = 1_000_000;
        c.body_read_timeout = Duration::from_secs(20);
        c.request_deadline = Duration::from_millis(500);
    }) else {
        return;
    };
    let key = app.api_key("slowkey", &[Scope::JobsCreate, Scope::JobsRead]);
    let body = serde_json::to_vec(&json!({"kind": "mid-body"})).expect("json");
    let headers = [
        ("X-API-Key", key.as_str()),
        ("Content-Type", "application/json"),
    ];
    // A valid slow upload: about 1.5 s, three times the deadline.
    let r = split_upload(&app, "/coordinator/jobs", &headers, &body, || {
        std::thread::sleep(Duration::from_millis(1500));
    });
    assert_eq!(r.status, 201, "{}", r.body);
    let before = job_count(&app);
    let r = split_upload(&app, "/coordinator/jobs", &headers, &body, || {
        let rows = credentials::list_keys(&app.state.db, Some("slowkey")).expect("keys");
        credentials::revoke_key(&app.state.db, &rows.first().expect("the key").id).expect("revoke");
        until_refused("the revocation", || {
            raw(
                &app,
                "GET",
                "/coordinator/jobs",
                &[("X-API-Key", &key)],
                b"",
            )
            .status
        });
    });
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(job_count(&app), before, "a job was created");
}

/// A signed request's credential is looked up before its body; one revoked (or its
/// caller disabled) while the body is on its way must not be accepted when the body is
/// complete (review finding, 2026-12-06: a webhook secret revoked mid-body still
/// created a job, and so did an HMAC create of a caller disabled mid-body).
fn a_credential_revoked_while_its_body_arrives_is_refused_at_its_end(b: Backend) {
    let Some(app) = spawn_app_with(b, |c| {
        c.auth_failures_per_minute = 1_000_000;
        c.body_read_timeout = Duration::from_secs(20);
    }) else {
        return;
    };
    // A webhook secret revoked mid-body.
    let key = sender(&app, "hooker");
    let ts = now_secs().to_string();
    let sig = webhook::wire::sign(&key, "mid-1", &ts, HOOK);
    let headers = [
        ("webhook-id", "mid-1"),
        ("webhook-timestamp", ts.as_str()),
        ("webhook-signature", sig.as_str()),
        ("Content-Type", "application/json"),
    ];
    // Counted once the probes below are done (one of them may dispatch a job).
    let before = std::cell::Cell::new(0);
    let r = split_upload(&app, "/stitcher/webhook/hooker", &headers, HOOK, || {
        credentials::revoke_secret(&app.state.db, "hooker", SecretKind::Webhook, 1)
            .expect("revoke");
        // Until a fresh delivery with the secret is refused, this instance has seen it.
        until_refused("the revocation", || {
            delivery(
                &app,
                "/stitcher/webhook/hooker",
                &key,
                "probe",
                now_secs(),
                HOOK,
            )
            .status
        });
        before.set(job_count(&app));
    });
    assert_eq!(r.status, 401, "{}", r.body);
    let before = before.get();
    assert_eq!(job_count(&app), before, "a job was created");

    // An HMAC caller disabled mid-body.
    let signer = app.caller("slowpoke", &[Scope::JobsCreate]);
    let body = serde_json::to_vec(&json!({"kind": "mid-body"})).expect("json");
    let signed = signed_create(&signer, &body);
    let headers = pairs(&signed);
    let r = split_upload(&app, "/coordinator/jobs", &headers, &body, || {
        credentials::disable_caller(&app.state.db, "slowpoke").expect("disable");
        until_refused("the disable", || {
            app.signed_by(&signer, "GET", "/coordinator/health", &[], b"")
                .status
        });
    });
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(job_count(&app), before, "a job was created");
}

fn webhook_deliveries_name_their_sender(b: Backend) {
    let Some(app) = app(b) else { return };
    let first = sender(&app, "sender-0");
    // One sender: the bare route keeps working.
    assert_eq!(
        delivery(&app, "/stitcher/webhook", &first, "m0", now_secs(), HOOK).status,
        202
    );
    let keys: Vec<Vec<u8>> = (1..50)
        .map(|i| sender(&app, &format!("sender-{i}")))
        .collect();
    // This instance wrote the secrets behind the store's back: drop its cache now rather
    // than wait for the generation poll.
    app.state.auth.store.invalidate();
    let k37 = &keys[36];
    let r = delivery(
        &app,
        "/stitcher/webhook/sender-37",
        k37,
        "m37",
        now_secs(),
        HOOK,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    // The same delivery to sender 12's URL is not verified against 37's secret.
    let r = delivery(
        &app,
        "/stitcher/webhook/sender-12",
        k37,
        "m37b",
        now_secs(),
        HOOK,
    );
    assert_eq!(r.status, 401, "{}", r.body);
    // With several senders the bare route says where to deliver.
    let r = delivery(&app, "/stitcher/webhook", k37, "m37c", now_secs(), HOOK);
    assert_eq!(r.status, 401);
    assert!(r.json()["reason"]
        .as_str()
        .unwrap_or("")
        .contains("/stitcher/webhook/{caller}"));
    // Unknown sender: 401 without trying anything.
    assert_eq!(
        delivery(&app, "/stitcher/webhook/nobody", k37, "m", now_secs(), HOOK).status,
        401
    );
    // A caller scheme on another sender's URL is refused.
    let key = app.api_key("sender-12", &[Scope::StitcherWebhook]);
    let h = [
        ("X-API-Key", key.as_str()),
        ("Content-Type", "application/json"),
    ];
    assert_eq!(
        raw(&app, "POST", "/stitcher/webhook/sender-37", &h, HOOK).status,
        403
    );
    assert_eq!(
        raw(&app, "POST", "/stitcher/webhook/sender-12", &h, HOOK).status,
        202
    );
}

fn bogus_delivery_is_answered_before_its_body_is_read(b: Backend) {
    let Some(app) = app(b) else { return };
    let _ = sender(&app, "hook");
    let stale = (now_secs() - 3600).to_string();
    let sig = format!("v1,{}", "A".repeat(43) + "=");
    let headers = [
        ("webhook-id", "bogus"),
        ("webhook-timestamp", stale.as_str()),
        ("webhook-signature", sig.as_str()),
    ];
    let mut s = connect(&app);
    s.write_all(request_head("POST", "/stitcher/webhook/hook", &headers, 1 << 20).as_bytes())
        .expect("write");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Not one body byte sent: the answer comes anyway.
    let r = read_response(s);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["reason"], "timestamp out of range");
}

fn blocked_peer_gets_429_for_bogus_deliveries_but_valid_callers_pass(b: Backend) {
    let Some(app) = spawn_app_with(b, |c| c.auth_failures_per_minute = 3) else {
        return;
    };
    let key = sender(&app, "hook");
    let wrong = b"not the key, not the key, not the key".to_vec();
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = delivery(
            &app,
            "/stitcher/webhook/hook",
            &wrong,
            &format!("b{i}"),
            now_secs(),
            HOOK,
        );
        statuses.push(r.status);
    }
    assert_eq!(&statuses[..3], &[401, 401, 401], "{statuses:?}");
    assert!(statuses[3..].iter().all(|s| *s == 429), "{statuses:?}");
    // A valid HMAC request and a valid delivery from the same address still pass.
    assert_eq!(app.get("/coordinator/health").status, 200);
    assert_eq!(
        delivery(&app, "/stitcher/webhook/hook", &key, "ok", now_secs(), HOOK).status,
        202
    );
}

/// A valid API key behind an address that someone else keeps blocked (unknown keys,
/// each a 401 turned 429) is served, also right after the credential cache was dropped
/// (any credential change anywhere drops it). A version that spent the blocked
/// address's verification budget before each uncached lookup refused it every time
/// (review, 2026-12-06).
fn a_valid_key_behind_a_blocked_address_is_served(b: Backend) {
    let Some(app) = spawn_app_with(b, |c| c.auth_failures_per_minute = 3) else {
        return;
    };
    let key = app.api_key("ops", &[Scope::HealthRead]);
    let health = |k: &str| raw(&app, "GET", "/coordinator/health", &[("X-API-Key", k)], b"");
    let unknown = || coordinator::crypto::credential::ApiKey::generate();
    for _ in 0..5 {
        health(unknown().expose_secret());
    }
    assert_eq!(health(unknown().expose_secret()).status, 429, "blocked");
    for round in 0..20 {
        if round % 5 == 0 {
            app.state.auth.store.invalidate();
        }
        for _ in 0..20 {
            assert_eq!(health(unknown().expose_secret()).status, 429);
        }
        let r = health(&key);
        assert_eq!(r.status, 200, "round {round}: {}", r.body);
    }
}

/// A blocked address sending unknown API keys and caller names is refused without a
/// database read each (the directory of names and key hashes read at the cache's
/// generation says they are unknown), while a valid key from the same address is
/// served, a key issued after the block works once the next poll has read the
/// directory again, and after a cache drop lookups decide until then.
fn a_blocked_address_guessing_credentials_costs_no_lookup(b: Backend) {
    let Some(app) = spawn_app_with(b, |c| c.auth_failures_per_minute = 3) else {
        return;
    };
    let key = app.api_key("ops", &[Scope::HealthRead]);
    let store = &app.state.auth.store;
    let health = |h: &[(&str, &str)]| raw(&app, "GET", "/coordinator/health", h, b"");
    let guess_key = || {
        let k = coordinator::crypto::credential::ApiKey::generate();
        health(&[("X-API-Key", k.expose_secret())]).status
    };
    let guess_caller = || {
        let name = format!("nobody-{}", uuid::Uuid::now_v7().simple());
        let signer = Signer {
            caller: name,
            secret: "x".repeat(43),
            key_version: None,
        };
        let h = signer.headers("GET", "/coordinator/health", b"", now_secs());
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        health(&h).status
    };
    for _ in 0..5 {
        guess_key();
    }
    assert_eq!(guess_key(), 429, "blocked");
    // The directory is read by the poll after the key was issued (every 250 ms).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = store.lookups();
        for _ in 0..5 {
            assert_eq!(guess_key(), 429);
        }
        if store.lookups() == before {
            break;
        }
        assert!(Instant::now() < deadline, "no directory read in 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = store.lookups();
    for _ in 0..50 {
        assert_eq!(guess_key(), 429);
        assert_eq!(guess_caller(), 429);
    }
    assert_eq!(
        store.lookups(),
        before,
        "guesses from a blocked address read the database"
    );
    assert_eq!(health(&[("X-API-Key", &key)]).status, 200);
    // A cache drop takes the directory with it: the valid key is looked up, not refused.
    store.invalidate();
    let r = health(&[("X-API-Key", &key)]);
    assert_eq!(r.status, 200, "{}", r.body);
    // A key or caller created after the directory was read (as the CLI or another
    // instance does) works from the blocked address at once: the generation moved, so
    // a lookup decides (review, 2026-12-06: refused until the next poll).
    for round in 0..10 {
        let late = app.api_key(&format!("late-{round}"), &[Scope::HealthRead]);
        let r = health(&[("X-API-Key", &late)]);
        assert_eq!(r.status, 200, "round {round}: {}", r.body);
        let signer = app.caller(&format!("late-hmac-{round}"), &[Scope::HealthRead]);
        let h = signer.headers("GET", "/coordinator/health", b"", now_secs());
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = health(&h);
        assert_eq!(r.status, 200, "round {round}: {}", r.body);
        // The directory catches up, and guesses cost no lookup again.
        std::thread::sleep(Duration::from_millis(600));
        let before = store.lookups();
        assert_eq!(guess_key(), 429);
        assert_eq!(store.lookups(), before, "round {round}");
    }
}

/// Every answer of a guarded route says `Cache-Control: no-store`: `X-API-Key` is not
/// `Authorization`, so a shared cache in front of the service could otherwise keep
/// one caller's jobs and hand them to the next (review, 2026-12-06).
fn authenticated_answers_are_not_cached(b: Backend) {
    let Some(app) = app(b) else { return };
    let key = app.api_key(
        "reader",
        &[Scope::JobsRead, Scope::JobsCreate, Scope::HealthRead],
    );
    let k = [("X-API-Key", key.as_str())];
    let created = raw(
        &app,
        "POST",
        "/coordinator/jobs",
        &k,
        br#"{"kind":"k","queue":"q"}"#,
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let job = format!("/coordinator/jobs/{id}");
    for r in [
        created,
        raw(&app, "GET", &job, &k, b""),
        raw(&app, "GET", "/coordinator/jobs?limit=5", &k, b""),
        raw(&app, "GET", "/coordinator/queues", &k, b""),
        raw(&app, "GET", "/coordinator/health", &k, b""),
    ] {
        assert!(r.status < 300, "{}", r.body);
        assert!(r.head.contains("cache-control: no-store"), "{}", r.head);
    }
}

/// Two `Idempotency-Key`s (a proxy that appends one) are a 400 naming the header, not
/// first-wins; and a batch, which takes a key per job, refuses the header rather than
/// create its jobs again on a retry (review, 2026-12-06). Nothing is created.
fn an_idempotency_key_given_twice_or_to_a_batch_is_refused(b: Backend) {
    let Some(app) = app(b) else { return };
    let key = app.api_key(
        "twice",
        &[
            Scope::JobsCreate,
            Scope::JobsRead,
            Scope::StitcherWebhook,
            Scope::StitcherDispatch,
        ],
    );
    let before = job_count(&app);
    let k = ("X-API-Key", key.as_str());
    for (target, body) in [
        ("/coordinator/jobs", &br#"{"kind":"k","queue":"q"}"#[..]),
        (
            "/stitcher/dispatch",
            br#"{"issueNumber":1,"repository":"o/r"}"#,
        ),
        (
            "/stitcher/webhook",
            br#"{"issueNumber":1,"repository":"o/r","action":"assigned","comment":"c"}"#,
        ),
    ] {
        for pair in [["a", "b"], ["a", "a"]] {
            let h = [
                k,
                ("Idempotency-Key", pair[0]),
                ("Idempotency-Key", pair[1]),
            ];
            let r = raw(&app, "POST", target, &h, body);
            assert_eq!(r.status, 400, "{target}: {}", r.body);
            assert_eq!(r.json()["field"], "Idempotency-Key", "{}", r.body);
        }
    }
    let batch = br#"{"jobs":[{"kind":"k","queue":"q"}]}"#;
    let r = raw(
        &app,
        "POST",
        "/coordinator/jobs/batch",
        &[k, ("Idempotency-Key", "x")],
        batch,
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["field"], "Idempotency-Key", "{}", r.body);
    assert_eq!(job_count(&app), before, "a refused request created a job");
    assert_eq!(
        raw(&app, "POST", "/coordinator/jobs/batch", &[k], batch).status,
        200
    );
}

/// Every guarded route refuses a query parameter it does not read, with a 400 naming
/// it, before any work (review, 2026-12-06: most routes ignored `?bogus=1` while the
/// list, claims and streams refused it). Nothing is created or changed.
fn an_unknown_query_parameter_is_refused_on_every_route(b: Backend) {
    let Some(app) = app(b) else { return };
    let job = app.create_job(&json!({"kind": "build", "queue": "q"}));
    let key = app.api_key("tester", &Scope::ALL);
    let before = job_count(&app);
    let mut taking = Vec::new();
    for route in ROUTES.iter().filter(|r| r.access != Access::Open) {
        if coordinator::http::routes::takes_query(route) {
            taking.push(format!("{} {}", route.method, route.path));
        }
        let target = format!("{}?bogus=1", concrete(route.path, &job));
        // A claim reads its body before its query: give it a valid one.
        let body = if route.path.ends_with("/claim") {
            &br#"{"worker":"w"}"#[..]
        } else {
            body_for(route.method)
        };
        let r = raw(
            &app,
            route.method,
            &target,
            &[("X-API-Key", &key), ("Content-Type", "application/json")],
            body,
        );
        assert_eq!(r.status, 400, "{} {target}: {}", route.method, r.body);
        assert_eq!(
            r.json()["field"],
            "bogus",
            "{} {target}: {}",
            route.method,
            r.body
        );
    }
    assert_eq!(
        taking,
        [
            "GET /coordinator/jobs",
            "POST /coordinator/queues/{queue}/claim",
            "GET /coordinator/jobs/{id}/events",
        ]
    );
    assert_eq!(job_count(&app), before);
    assert_eq!(
        app.get(&format!("/coordinator/jobs/{job}")).json()["status"],
        "PENDING"
    );
    // An empty query (`/path?`, as some clients send it) is no parameter.
    let r = raw(
        &app,
        "GET",
        "/coordinator/health?",
        &[("X-API-Key", &key)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

fn scope_refusals_name_the_scope(b: Backend) {
    let Some(app) = app(b) else { return };
    let ro = app.api_key("ro", &[Scope::JobsRead]);
    let r = raw(
        &app,
        "POST",
        "/coordinator/jobs",
        &[("X-API-Key", &ro)],
        b"{}",
    );
    assert_eq!(r.status, 403);
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("jobs:create"),
        "{}",
        r.body
    );
    let metrics = app.raw("GET", "/metrics", &[], b"").body;
    assert!(
        metrics.contains("missing scope jobs:create for this route"),
        "the refusal is counted with its reason"
    );
}

fn a_new_key_version_works_at_once_on_a_warm_instance(b: Backend) {
    let Some(app) = app(b) else { return };
    // Warm this instance's cache for `tester` (versions known: 1).
    assert_eq!(app.get("/coordinator/health").status, 200);
    // Rotate behind its back (as another instance would), then use the new version at
    // once, naming it: the instance re-reads the caller instead of answering
    // `unknown key version` until its next generation poll.
    let s = credentials::add_secret(
        &app.state.db,
        app.state.auth.store.sealer(),
        "tester",
        SecretKind::Hmac,
        None,
        None,
    )
    .expect("secret");
    let mut signer = app.signer.clone();
    signer.secret = s.plaintext.to_string();
    signer.key_version = Some(s.version);
    let r = app.signed_by(&signer, "GET", "/coordinator/health", &[], b"");
    assert_eq!(r.status, 200, "{}", r.body);
    // A version that does not exist is still refused, and re-reads are rate-limited.
    signer.key_version = Some(s.version + 5);
    let r = app.signed_by(&signer, "GET", "/coordinator/health", &[], b"");
    assert_eq!(r.problem(401)["reason"], "unknown key version");
}
