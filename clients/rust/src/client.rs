//! [`Client`]: one method per route, on a blocking `ureq` agent (keep-alive pool).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::error::{Error, Problem, Result};
use crate::signing::Credentials;

/// Largest answer body read.
const MAX_BODY: u64 = 16 * 1024 * 1024;

/// A job as the server returns it (camelCase members: `id`, `status`, `payload`, …).
pub type Job = Value;

/// A claimed job (RUNNING now) and the job token that acts on it. Its `Debug` never
/// shows the token.
#[derive(Clone)]
pub struct Claim {
    pub job: Job,
    pub token: String,
    pub token_expires_at: String,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("job", &self.job)
            .field("token", &format_args!(".."))
            .field("token_expires_at", &self.token_expires_at)
            .finish()
    }
}

impl Claim {
    pub fn id(&self) -> &str {
        self.job
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// A heartbeat's answer: the new lease (`leaseExpiresAt`, `cancelRequested`, in
/// `answer`) and, when the server renewed the job token, its successor. Its `Debug`
/// never shows the token.
#[derive(Clone)]
pub struct Heartbeat {
    pub answer: Value,
    /// The job token's successor: act with it from now on ([`Client::with_token`]).
    pub token: Option<String>,
    pub token_expires_at: Option<String>,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("answer", &self.answer)
            .field("token", &self.token.as_ref().map(|_| format_args!("..")))
            .field("token_expires_at", &self.token_expires_at)
            .finish()
    }
}

impl Heartbeat {
    /// The token and its expiry are taken out of the answer, so no copy of the token is
    /// left where a `Debug` of the answer would show it.
    fn from_answer(mut answer: Value) -> Heartbeat {
        let mut take = |name: &str| {
            answer
                .as_object_mut()
                .and_then(|o| o.remove(name))
                .and_then(|v| v.as_str().map(str::to_owned))
        };
        let token = take("token");
        let token_expires_at = take("tokenExpiresAt");
        Heartbeat {
            answer,
            token,
            token_expires_at,
        }
    }
}

/// An answer with a success status.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Result<Value> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| Error::Invalid(format!("answer: {e}")))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

type Sleep = Arc<dyn Fn(Duration) + Send + Sync>;

/// How the client connects. `https://` URLs are verified against the webpki roots
/// (Mozilla's list), or against `ca_file` alone when set (a private CA); `http://`
/// stays plain.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Per-request timeout (connect, send and read together).
    pub timeout: Duration,
    /// PEM file of the CA certificate(s) to trust instead of the public roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(30),
            ca_file: None,
        }
    }
}

/// A rustls configuration that trusts only the certificates in `path` (PEM).
fn private_ca(path: &Path) -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::CertificateDer;
    let bad = |why: String| Error::Invalid(format!("CA file {}: {why}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One listing filter for [`Client::list_jobs`]; empty members are left out.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub queue: Option<String>,
    pub statuses: Vec<String>,
    pub kind: Option<String>,
    /// RFC 3339.
    pub created_after: Option<String>,
    /// RFC 3339.
    pub created_before: Option<String>,
    /// 1–500 (the server's default is 50).
    pub limit: Option<u32>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
fn encode_query(s: &str) -> String {
    encode_segment(s)
}

impl JobFilter {
    /// `?queue=…&status=…` (or `""`).
    pub fn query(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut add = |k: &str, v: &str| parts.push(format!("{k}={}", encode_query(v)));
        if let Some(q) = &self.queue {
            add("queue", q);
        }
        for st in &self.statuses {
            add("status", st);
        }
        if let Some(k) = &self.kind {
            add("kind", k);
        }
        if let Some(t) = &self.created_after {
            add("createdAfter", t);
        }
        if let Some(t) = &self.created_before {
            add("createdBefore", t);
        }
        if let Some(n) = self.limit {
            add("limit", &n.to_string());
        }
        if let Some(c) = &self.cursor {
            add("cursor", c);
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("?{}", parts.join("&"))
        }
    }
}

/// A coordinator client. 503 and 429 are retried (`retries` times) waiting
/// `Retry-After` when sent, else an exponential backoff with jitter capped at
/// `max_backoff` — a POST or PATCH without an `Idempotency-Key` only when the answer is
/// the server's own refusal (`application/problem+json`, not a proxy's page, which may
/// come after the server acted); connection errors are retried for GET and requests
/// with an `Idempotency-Key`. Each attempt is signed afresh, so a retry is never a
/// replay.
#[derive(Clone)]
pub struct Client {
    base: String,
    credentials: Credentials,
    agent: ureq::Agent,
    /// For event streams ([`Client::watch`]): no overall deadline, a read timeout of
    /// [`crate::watch::STREAM_IDLE`] (or the client's timeout, if longer) instead.
    stream_agent: ureq::Agent,
    timeout: Duration,
    pub retries: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// `None`: a sleep that ends early when `stop` is set.
    sleep: Option<Sleep>,
    stop: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn compact(v: &Value) -> Vec<u8> {
    // serde_json writes compact JSON; serialising a Value cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// The absolute URL and the request target as ureq will send them (after its URL
/// parsing): what a signature must cover.
/// A `.` or `..` path segment (also percent-encoded): URL normalisation drops it, so
/// the request would reach another route than the one named (`queues pause ..` would
/// patch `/coordinator/queues`).
fn dot_segment(path: &str) -> Option<&str> {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    path.split('/').find(|s| {
        let plain = s.to_ascii_lowercase().replace("%2e", ".");
        plain == "." || plain == ".."
    })
}

/// `url` without the `user:password@` of its authority: what a message may show of it.
pub fn without_user_info(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://{host}{tail}"),
        None => url.to_owned(),
    }
}

fn sent_target(req: &ureq::Request, url: &str) -> Result<(String, String)> {
    let sent = req
        .request_url()
        .map_err(|e| Error::Invalid(format!("{}: {e}", without_user_info(url))))?;
    // ureq writes `?query` only when the query is not empty: `/path?` goes out as
    // `/path`, and is signed so.
    let target = match sent.as_url().query() {
        Some(q) if !q.is_empty() => format!("{}?{q}", sent.path()),
        _ => sent.path().to_owned(),
    };
    Ok((sent.as_url().as_str().to_owned(), target))
}

/// A request that got no answer: ureq's error kind, message and cause, but never its
/// URL (with any `user:password@` of the base) nor, for a header it refused, the
/// message (it holds the whole header line, credential and all).
fn transport(method: &str, path: &str, t: &ureq::Transport) -> Error {
    let mut text = format!("{method} {path}: {}", t.kind());
    if t.kind() != ureq::ErrorKind::BadHeader {
        if let Some(m) = t.message() {
            text.push_str(&format!(": {m}"));
        }
    }
    if let Some(cause) = std::error::Error::source(t) {
        text.push_str(&format!(": {cause}"));
    }
    Error::Transport(text)
}

/// Status, headers and the body, at most [`MAX_BODY`] bytes: reading a longer one
/// fails (an [`Error::Transport`], as a body cut off does; the Python client's
/// `ResponseTooLarge`) with its rest unread, never its first 16 MiB passed off as the
/// whole answer.
fn read_response(method: &str, path: &str, resp: ureq::Response) -> Result<Response> {
    let status = resp.status();
    let headers: Vec<(String, String)> = resp
        .headers_names()
        .into_iter()
        .filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_owned())))
        .collect();
    let mut body = Vec::new();
    resp.into_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| Error::Transport(format!("{method} {path}: reading: {e}")))?;
    if u64::try_from(body.len()).unwrap_or(u64::MAX) > MAX_BODY {
        return Err(Error::Transport(format!(
            "{method} {path}: reading: the answer ({status}) is larger than {} MiB",
            MAX_BODY / (1024 * 1024)
        )));
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// `COORDINATOR_KEY_VERSION`: a positive integer (versions start at 1), when set.
fn key_version(value: Option<&str>) -> Result<Option<u32>> {
    match value.map(str::parse::<u32>) {
        None => Ok(None),
        Some(Ok(v)) if v > 0 => Ok(Some(v)),
        Some(_) => Err(Error::Invalid(
            "COORDINATOR_KEY_VERSION must be a positive integer".into(),
        )),
    }
}

fn retry_after_secs(value: Option<&str>) -> Option<Duration> {
    let v = value?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`), 30 s timeout, 4 retries,
    /// the public roots for `https://`.
    pub fn new(base: &str, credentials: Credentials) -> Self {
        let options = ClientOptions::default();
        Self::with_agent(base, credentials, &options, None)
    }

    /// A client with [`ClientOptions`] (a private CA, another timeout). Fails when the
    /// CA file cannot be read or holds no certificate.
    pub fn with_options(
        base: &str,
        credentials: Credentials,
        options: &ClientOptions,
    ) -> Result<Self> {
        let tls = match &options.ca_file {
            Some(path) => Some(private_ca(path)?),
            None => None,
        };
        Ok(Self::with_agent(base, credentials, options, tls))
    }

    fn with_agent(
        base: &str,
        credentials: Credentials,
        options: &ClientOptions,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        // A redirect would carry a signature made for another target.
        let mut builder = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout(options.timeout);
        // A stream lives as long as its job: bounded by silence, not by a deadline.
        let mut stream_builder = ureq::AgentBuilder::new()
            .redirects(0)
            .timeout_connect(options.timeout)
            .timeout_write(options.timeout)
            .timeout_read(options.timeout.max(crate::watch::STREAM_IDLE));
        if let Some(tls) = tls {
            builder = builder.tls_config(tls.clone());
            stream_builder = stream_builder.tls_config(tls);
        }
        Client {
            timeout: options.timeout,
            base: base.trim_end_matches('/').to_owned(),
            credentials,
            agent: builder.build(),
            stream_agent: stream_builder.build(),
            retries: 4,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            sleep: None,
            stop: None,
        }
    }

    /// `v1`-signed requests.
    pub fn v1(base: &str, caller: &str, secret: &str, key_version: Option<u32>) -> Self {
        Self::new(
            base,
            Credentials::V1 {
                caller: caller.to_owned(),
                secret: secret.to_owned(),
                key_version,
            },
        )
    }

    /// From `COORDINATOR_URL` and `COORDINATOR_CALLER` + `COORDINATOR_HMAC_SECRET`
    /// (+ `COORDINATOR_KEY_VERSION`), else `COORDINATOR_CLIENT_API_KEY`: the variables
    /// `serve --dev` writes to `.coordinator/dev-credentials.env`; `COORDINATOR_CA_FILE`
    /// names a private CA for `https://`.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|n| std::env::var(n).ok())
    }

    /// [`Client::from_env`] with `lookup` for the environment.
    fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |n: &str| lookup(n).filter(|v| !v.is_empty());
        let url = var("COORDINATOR_URL").unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
        let options = ClientOptions {
            ca_file: var("COORDINATOR_CA_FILE").map(PathBuf::from),
            ..ClientOptions::default()
        };
        let key_version = key_version(var("COORDINATOR_KEY_VERSION").as_deref())?;
        match (
            var("COORDINATOR_CALLER"),
            var("COORDINATOR_HMAC_SECRET"),
            var("COORDINATOR_CLIENT_API_KEY"),
        ) {
            (Some(caller), Some(secret), _) => Self::with_options(
                &url,
                Credentials::V1 {
                    caller,
                    secret,
                    key_version,
                },
                &options,
            ),
            (_, _, Some(k)) => Self::with_options(&url, Credentials::ApiKey(k), &options),
            _ => Err(Error::Invalid(
                "set COORDINATOR_CALLER and COORDINATOR_HMAC_SECRET, or \
                 COORDINATOR_CLIENT_API_KEY (for `coordinator serve --dev`, run in its \
                 directory: `set -a; . .coordinator/dev-credentials.env; set +a`)"
                    .into(),
            )),
        }
    }

    /// The same client with other credentials, sharing the connection pool.
    pub fn with_credentials(&self, credentials: Credentials) -> Self {
        Client {
            credentials,
            ..self.clone()
        }
    }

    /// A client acting with a job token.
    pub fn with_token(&self, token: &str) -> Self {
        self.with_credentials(Credentials::Bearer(token.to_owned()))
    }

    /// Replace the sleep used between retries (tests).
    pub fn with_sleep(mut self, sleep: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        self.sleep = Some(Arc::new(sleep));
        self
    }

    /// Once `stop` is set, no retry is started and a pause between retries ends at
    /// once (the [`crate::Worker`] passes its stop flag). Kept by
    /// [`Client::with_token`] and [`Client::with_credentials`].
    pub fn with_stop(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    fn stopping(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping()
    }

    /// The pause before a watch's reconnect; `false` when stopped.
    pub(crate) fn pause_for_watch(&self, d: Duration) -> bool {
        self.pause(d)
    }

    /// The backoff before a watch's `attempt`-th reconnect (from 0).
    pub(crate) fn reconnect_delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        self.delay(attempt, retry_after)
    }

    /// Open a job's event stream (`path`) after `last`: one attempt, signed afresh; a
    /// 2xx answer's body is left unread for the caller, any other is an
    /// [`Error::Problem`].
    pub(crate) fn open_stream(&self, path: &str, last: i64) -> Result<crate::watch::Reader> {
        if let Some(seg) = dot_segment(path) {
            return Err(Error::Invalid(format!(
                "{path}: a path segment `{seg}` would be dropped by URL normalisation \
                 (a job id cannot be only dots)"
            )));
        }
        let url = format!("{}{path}", self.base);
        let last = last.to_string();
        let mut resigned = false;
        loop {
            let mut req = self.stream_agent.request("GET", &url);
            let (full, target) = sent_target(&req, &url)?;
            for (k, v) in self.credentials.headers("GET", &full, &target, &[])? {
                req = req.set(&k, &v);
            }
            req = req
                .set("Accept", "text/event-stream")
                .set("Last-Event-ID", &last);
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(ureq::Error::Transport(t)) => return Err(transport("GET", path, &t)),
            };
            let status = resp.status();
            if (200..300).contains(&status) {
                let ctype = resp.content_type();
                if !ctype.eq_ignore_ascii_case("text/event-stream") {
                    return Err(Error::Invalid(format!(
                        "GET {path}: the answer ({ctype}) is not an event stream"
                    )));
                }
                return Ok(crate::watch::reader(resp));
            }
            let retry_after = retry_after_secs(resp.header("retry-after")).map(|d| d.as_secs());
            let reason = resp.status_text().to_owned();
            let Response { headers, body, .. } = read_response("GET", path, resp)?;
            let problem = Problem::from_answer(status, &reason, headers, &body, retry_after);
            // As `send`: ureq's own resend of a GET on a failed reused connection
            // carries the headers already signed, refused as a replay.
            if status == 401 && !resigned && problem.reason() == Some("replayed request") {
                resigned = true;
                continue;
            }
            return Err(Error::Problem(problem));
        }
    }

    /// Wait before a retry; `false` when stopped (then no retry is sent).
    fn pause(&self, d: Duration) -> bool {
        if self.stopping() {
            return false;
        }
        match &self.sleep {
            Some(sleep) => sleep(d),
            None => {
                let until = Instant::now() + d;
                loop {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() || self.stopping() {
                        break;
                    }
                    std::thread::sleep(left.min(Duration::from_millis(50)));
                }
            }
        }
        !self.stopping()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(d) = retry_after {
            return d.min(self.max_backoff);
        }
        let base = self
            .backoff
            .saturating_mul(2u32.saturating_pow(attempt))
            .min(self.max_backoff);
        base.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    /// One request (retrying 503/429). `path` is the path and `?query`, percent-encoded;
    /// `body` the exact bytes sent and signed. Any status but 2xx is an
    /// [`Error::Problem`]: a 3xx too, as redirects are not followed.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
        credentials: Option<&Credentials>,
    ) -> Result<Response> {
        self.send(method, path, body, headers, credentials, self.retries, None)
    }

    /// [`Client::request`] with at most `retries` retries and, when given, `timeout`
    /// instead of the client's.
    #[allow(clippy::too_many_arguments, reason = "the private core of `request`")]
    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
        credentials: Option<&Credentials>,
        retries: u32,
        timeout: Option<Duration>,
    ) -> Result<Response> {
        if let Some(seg) = dot_segment(path) {
            return Err(Error::Invalid(format!(
                "{path}: a path segment `{seg}` would be dropped by URL normalisation \
                 (a queue or job name cannot be only dots)"
            )));
        }
        let creds = credentials.unwrap_or(&self.credentials);
        let method = method.to_ascii_uppercase();
        let may_resend = matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS")
            || headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("idempotency-key"));
        let safe = matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS");
        let url = format!("{}{path}", self.base);
        let mut attempt = 0;
        let mut resigned = false;
        loop {
            let mut req = self.agent.request(&method, &url);
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            let (full, target) = sent_target(&req, &url)?;
            for (k, v) in creds.headers(&method, &full, &target, body.unwrap_or_default())? {
                req = req.set(&k, &v);
            }
            for (k, v) in headers {
                req = req.set(k, v);
            }
            let result = match body {
                Some(b) => req.send_bytes(b),
                None => req.call(),
            };
            let (status, resp) = match result {
                Ok(r) => (r.status(), r),
                Err(ureq::Error::Status(code, r)) => (code, r),
                Err(ureq::Error::Transport(t)) => {
                    if may_resend && attempt < retries && self.pause(self.delay(attempt, None)) {
                        attempt += 1;
                        continue;
                    }
                    return Err(transport(&method, path, &t));
                }
            };
            let retry_after = retry_after_secs(resp.header("retry-after"));
            // The server's own refusal, sent before it does any work (a proxy's 503 may
            // come after the server acted).
            let refused = resp
                .content_type()
                .eq_ignore_ascii_case("application/problem+json");
            let reason = resp.status_text().to_owned();
            let Response {
                headers,
                body: bytes,
                ..
            } = read_response(&method, path, resp)?;
            if matches!(status, 429 | 503)
                && attempt < retries
                && (may_resend || refused)
                && self.pause(self.delay(attempt, retry_after))
            {
                attempt += 1;
                continue;
            }
            if !(200..300).contains(&status) {
                let secs = retry_after.map(|d| d.as_secs());
                let problem = Problem::from_answer(status, &reason, headers, &bytes, secs);
                // ureq sends a safe request again by itself when a reused connection
                // fails, with the headers already signed: the server refuses that copy
                // as a replay. Sign it afresh and send it once more.
                if status == 401
                    && safe
                    && !resigned
                    && problem.reason() == Some("replayed request")
                {
                    resigned = true;
                    continue;
                }
                return Err(Error::Problem(problem));
            }
            return Ok(Response {
                status,
                headers,
                body: bytes,
            });
        }
    }

    /// One attempt, no retry, every status answered as a [`Response`] (4xx and 5xx
    /// too): for tools that show an answer as it came. `sign` receives the absolute URL
    /// and the request target exactly as they are sent and returns the headers that
    /// authenticate the request.
    pub fn send_once<F>(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&str, &str)],
        sign: F,
    ) -> Result<Response>
    where
        F: FnOnce(&str, &str) -> Result<Vec<crate::signing::Header>>,
    {
        let method = method.to_ascii_uppercase();
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.request(&method, &url);
        let (full, target) = sent_target(&req, &url)?;
        for (k, v) in sign(&full, &target)? {
            req = req.set(&k, &v);
        }
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let result = if body.is_empty() {
            req.call()
        } else {
            req.send_bytes(body)
        };
        let resp = match result {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(transport(&method, path, &t)),
        };
        read_response(&method, path, resp)
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Value> {
        let bytes = body.map(compact);
        let mut h: Vec<(&str, &str)> = headers.to_vec();
        if bytes.is_some() {
            h.push(("Content-Type", "application/json"));
        }
        self.request(method, path, bytes.as_deref(), &h, None)?
            .json()
    }

    // ---- open routes ----------------------------------------------------------------

    /// `GET /livez`, `/readyz`, `/metrics` or `/openapi.json` (no credential).
    pub fn open(&self, path: &str) -> Result<Response> {
        self.request("GET", path, None, &[], Some(&Credentials::None))
    }

    pub fn openapi(&self) -> Result<Value> {
        self.open("/openapi.json")?.json()
    }

    // ---- jobs -------------------------------------------------------------------------

    /// `GET /coordinator/health` [health:read].
    pub fn health(&self) -> Result<Value> {
        self.call("GET", "/coordinator/health", None, &[])
    }

    /// `POST /coordinator/jobs` [jobs:create]: a PENDING job. `spec` holds `kind` and
    /// optionally `queue`, `priority`, `payload`, `maxAttempts`.
    pub fn create_job(&self, spec: &Value, idempotency_key: Option<&str>) -> Result<Job> {
        let h: Vec<(&str, &str)> = idempotency_key
            .map(|k| vec![("Idempotency-Key", k)])
            .unwrap_or_default();
        self.call("POST", "/coordinator/jobs", Some(spec), &h)
    }

    /// `GET /coordinator/jobs/{id}` [jobs:read]: the job with its events.
    pub fn get_job(&self, id: &str) -> Result<Job> {
        let path = format!("/coordinator/jobs/{}", encode_segment(id));
        self.call("GET", &path, None, &[])
    }

    /// `PATCH /coordinator/jobs/{id}/status` [jobs:update].
    pub fn set_status(&self, id: &str, status: &str, message: Option<&str>) -> Result<Job> {
        let mut body = Map::new();
        body.insert("status".into(), status.into());
        if let Some(m) = message {
            body.insert("message".into(), m.into());
        }
        let path = format!("/coordinator/jobs/{}/status", encode_segment(id));
        self.call("PATCH", &path, Some(&Value::Object(body)), &[])
    }

    /// `PATCH /coordinator/jobs/{id}/progress` [jobs:update]; renews the lease.
    pub fn report_progress(&self, id: &str, percent: u8, message: Option<&str>) -> Result<Job> {
        let mut body = Map::new();
        body.insert("percent".into(), percent.into());
        if let Some(m) = message {
            body.insert("message".into(), m.into());
        }
        let path = format!("/coordinator/jobs/{}/progress", encode_segment(id));
        self.call("PATCH", &path, Some(&Value::Object(body)), &[])
    }

    /// `POST /coordinator/jobs/{id}/complete` [jobs:update].
    pub fn complete_job(&self, id: &str, result: Option<&Value>) -> Result<Job> {
        let body = match result {
            Some(r) => json!({ "result": r }),
            None => json!({}),
        };
        let path = format!("/coordinator/jobs/{}/complete", encode_segment(id));
        self.call("POST", &path, Some(&body), &[])
    }

    /// `POST /coordinator/jobs/{id}/fail` [jobs:update]: RUNNING → FAILED.
    pub fn fail_job(&self, id: &str, error: &str, gate_results: Option<&Value>) -> Result<Job> {
        let mut body = json!({ "error": error });
        if let (Some(g), Some(obj)) = (gate_results, body.as_object_mut()) {
            obj.insert("gateResults".into(), g.clone());
        }
        let path = format!("/coordinator/jobs/{}/fail", encode_segment(id));
        self.call("POST", &path, Some(&body), &[])
    }

    /// `POST /coordinator/jobs/{id}/heartbeat`: renews the lease. Servers without the
    /// route answer 404/405. Sent with a job token in the second half of its life, the
    /// answer carries the token's successor ([`Heartbeat::token`]): act with it from
    /// then on ([`Client::with_token`]; the [`crate::Worker`] does).
    pub fn heartbeat(&self, id: &str) -> Result<Heartbeat> {
        let path = format!("/coordinator/jobs/{}/heartbeat", encode_segment(id));
        self.call("POST", &path, Some(&json!({})), &[])
            .map(Heartbeat::from_answer)
    }

    /// [`Client::heartbeat`] as one attempt, no retry, within `timeout`: what the
    /// [`crate::Worker`] sends, bounded by the time left on the lease.
    pub fn heartbeat_once(&self, id: &str, timeout: Duration) -> Result<Heartbeat> {
        let path = format!("/coordinator/jobs/{}/heartbeat", encode_segment(id));
        self.once("POST", &path, &json!({}), timeout)
            .map(Heartbeat::from_answer)
    }

    /// [`Client::report_progress`] (without a message) as one attempt within `timeout`.
    pub(crate) fn report_progress_once(
        &self,
        id: &str,
        percent: u8,
        timeout: Duration,
    ) -> Result<Job> {
        let path = format!("/coordinator/jobs/{}/progress", encode_segment(id));
        self.once("PATCH", &path, &json!({ "percent": percent }), timeout)
    }

    fn once(&self, method: &str, path: &str, body: &Value, timeout: Duration) -> Result<Value> {
        let bytes = compact(body);
        let h = [("Content-Type", "application/json")];
        self.send(method, path, Some(&bytes), &h, None, 0, Some(timeout))?
            .json()
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `POST /coordinator/queues/{queue}/claim` [jobs:update]: the best QUEUED job, now
    /// RUNNING, with its job token; `None` when the queue is empty (204).
    pub fn claim(&self, queue: &str, worker: &str) -> Result<Option<Claim>> {
        self.claim_with(queue, &json!({ "worker": worker }))
    }

    fn claim_with(&self, queue: &str, request: &Value) -> Result<Option<Claim>> {
        let path = format!("/coordinator/queues/{}/claim", encode_segment(queue));
        let body = compact(request);
        let resp = self.request(
            "POST",
            &path,
            Some(&body),
            &[("Content-Type", "application/json")],
            None,
        )?;
        if resp.status == 204 {
            return Ok(None);
        }
        let mut job = resp.json()?;
        let obj = job
            .as_object_mut()
            .ok_or_else(|| Error::Invalid("claim: not an object".into()))?;
        let token = match obj.remove("token") {
            Some(Value::String(t)) => t,
            _ => return Err(Error::Invalid("claim: no token".into())),
        };
        let token_expires_at = match obj.remove("tokenExpiresAt") {
            Some(Value::String(t)) => t,
            _ => String::new(),
        };
        Ok(Some(Claim {
            job,
            token,
            token_expires_at,
        }))
    }

    /// The longest one claim request of a client with a stop flag waits on the
    /// server: its long poll is made of such claims, the flag looked at between them,
    /// so a stop ends a waiting claim within this (as the Python client's
    /// `STOP_POLL`).
    pub const STOP_POLL: Duration = Duration::from_secs(2);

    /// `POST /coordinator/queues/{queue}/claim` with a long poll: waits up to `wait`
    /// (at most 60 s, whole and fractional seconds) for a job before answering `None`.
    /// The wait is cut to leave 5 s of the client's timeout for the answer.
    ///
    /// A client with a stop flag ([`Client::with_stop`], as every
    /// [`crate::Worker`]'s) asks in claims that wait at most [`Client::STOP_POLL`]
    /// each, and ends the wait with `None` once the flag is set: a request in flight
    /// cannot be called back without losing a job the server may just have handed
    /// out, so it is let finish — a job it brings is returned (the worker hands it
    /// back).
    pub fn claim_wait(&self, queue: &str, worker: &str, wait: Duration) -> Result<Option<Claim>> {
        let room = self.timeout.saturating_sub(Duration::from_secs(5));
        let wait = wait.min(room).min(Duration::from_secs(60));
        if self.stop.is_none() {
            return self.claim_waiting(queue, worker, wait);
        }
        let deadline = Instant::now() + wait;
        while !self.stopping() {
            let part = deadline
                .saturating_duration_since(Instant::now())
                .min(Self::STOP_POLL);
            let sent = Instant::now();
            let claim = self.claim_waiting(queue, worker, part)?;
            let now = Instant::now();
            // Answered well before its wait: the server did not hold the claim (say, it
            // is shutting down); the caller pauses rather than this asking again.
            if claim.is_some() || now >= deadline || now - sent < part / 2 {
                return Ok(claim);
            }
        }
        Ok(None)
    }

    /// One claim request, waiting up to `wait` on the server.
    fn claim_waiting(&self, queue: &str, worker: &str, wait: Duration) -> Result<Option<Claim>> {
        let secs = wait.as_secs_f64();
        self.claim_with(queue, &json!({ "worker": worker, "wait": secs }))
    }

    /// `GET /coordinator/jobs` [jobs:read]: one page, newest first (`items`,
    /// `nextCursor`).
    pub fn list_jobs(&self, filter: &JobFilter) -> Result<Value> {
        let path = format!("/coordinator/jobs{}", filter.query());
        self.call("GET", &path, None, &[])
    }

    /// `POST /coordinator/jobs/{id}/cancel` [jobs:update, not a job token]: any job that
    /// has not ended → CANCELLED, its tokens revoked.
    pub fn cancel_job(&self, id: &str, reason: Option<&str>) -> Result<Job> {
        let body = match reason {
            Some(r) => json!({ "reason": r }),
            None => json!({}),
        };
        let path = format!("/coordinator/jobs/{}/cancel", encode_segment(id));
        self.call("POST", &path, Some(&body), &[])
    }

    /// `POST /coordinator/jobs/{id}/retry` [jobs:update, not a job token]: a FAILED or
    /// CANCELLED job back to QUEUED with a fresh attempt budget (redrive).
    pub fn retry_job(&self, id: &str) -> Result<Job> {
        let path = format!("/coordinator/jobs/{}/retry", encode_segment(id));
        self.call("POST", &path, Some(&json!({})), &[])
    }

    /// `GET /coordinator/queues` [health:read]: `{"queues": [...]}`.
    pub fn list_queues(&self) -> Result<Value> {
        self.call("GET", "/coordinator/queues", None, &[])
    }

    /// `PATCH /coordinator/queues/{queue}` [admin]: `paused`, and `max_running`
    /// (`Some(None)` removes the limit); members left `None` stay as they are.
    pub fn patch_queue(
        &self,
        queue: &str,
        paused: Option<bool>,
        max_running: Option<Option<u32>>,
    ) -> Result<Value> {
        let mut body = Map::new();
        if let Some(p) = paused {
            body.insert("paused".into(), p.into());
        }
        if let Some(m) = max_running {
            body.insert("maxRunning".into(), m.map_or(Value::Null, Value::from));
        }
        let path = format!("/coordinator/queues/{}", encode_segment(queue));
        self.call("PATCH", &path, Some(&Value::Object(body)), &[])
    }

    // ---- stitcher and admin -------------------------------------------------------------

    /// `POST /stitcher/webhook/{sender}` signed with Standard Webhooks (`whsec_…`)
    /// instead of the client's credential.
    pub fn stitcher_webhook(
        &self,
        sender: &str,
        payload: &Value,
        webhook_secret: &str,
        webhook_id: &str,
    ) -> Result<Value> {
        let body = compact(payload);
        let ts = crate::signing::now_secs().to_string();
        let signed = crate::webhooks::sign_webhook(webhook_secret, webhook_id, &ts, &body)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let mut h: Vec<(&str, &str)> = signed
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        h.push(("Content-Type", "application/json"));
        let path = format!("/stitcher/webhook/{}", encode_segment(sender));
        self.request("POST", &path, Some(&body), &h, Some(&Credentials::None))?
            .json()
    }

    /// `POST /stitcher/dispatch` [stitcher:dispatch]: `spec` holds `issueNumber`,
    /// `repository` and optionally `queue`, `priority`, `payload`.
    pub fn dispatch(&self, spec: &Value, idempotency_key: Option<&str>) -> Result<Value> {
        let h: Vec<(&str, &str)> = idempotency_key
            .map(|k| vec![("Idempotency-Key", k)])
            .unwrap_or_default();
        self.call("POST", "/stitcher/dispatch", Some(spec), &h)
    }

    /// `POST /admin/tokens/revoke` [admin].
    pub fn revoke_token(&self, jti: &str, expires_at: Option<&str>) -> Result<Value> {
        let mut body = json!({ "jti": jti });
        if let (Some(e), Some(obj)) = (expires_at, body.as_object_mut()) {
            obj.insert("expiresAt".into(), e.into());
        }
        self.call("POST", "/admin/tokens/revoke", Some(&body), &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_filter_query_encodes_every_value() {
        assert_eq!(JobFilter::default().query(), "");
        let f = JobFilter {
            queue: Some("ci".into()),
            statuses: vec!["QUEUED".into(), "RUNNING".into()],
            kind: Some("a b".into()),
            created_after: Some("2026-01-01T00:00:00+01:00".into()),
            created_before: None,
            limit: Some(10),
            cursor: Some("x/y=".into()),
        };
        assert_eq!(
            f.query(),
            "?queue=ci&status=QUEUED&status=RUNNING&kind=a%20b\
             &createdAfter=2026-01-01T00%3A00%3A00%2B01%3A00&limit=10&cursor=x%2Fy%3D"
        );
    }

    #[test]
    fn a_dot_segment_is_refused_before_anything_is_sent() {
        // Port 9 (discard): were anything sent, the error would be a transport one.
        let c = Client::new("http://127.0.0.1:9", Credentials::ApiKey("k".into()));
        for queue in ["..", ".", "%2e%2E"] {
            match c.request(
                "PATCH",
                &format!("/coordinator/queues/{queue}"),
                None,
                &[],
                None,
            ) {
                Err(Error::Invalid(why)) => assert!(why.contains("dropped"), "{why}"),
                other => panic!("{queue}: {other:?}"),
            }
        }
        assert!(matches!(
            c.patch_queue("..", Some(true), None),
            Err(Error::Invalid(_))
        ));
        assert_eq!(dot_segment("/a/b..c/.d/?x=/../"), None);
        assert_eq!(dot_segment("/a/./b"), Some("."));
    }

    #[test]
    fn the_signed_target_is_the_one_sent() {
        let agent = ureq::AgentBuilder::new().build();
        for (url, target) in [
            ("http://h/a/b?", "/a/b"),
            ("http://h/a/b?x=1", "/a/b?x=1"),
            ("http://h/a/b", "/a/b"),
            ("http://h/?", "/"),
        ] {
            let req = agent.request("GET", url);
            let (_, t) = sent_target(&req, url).unwrap_or_default();
            assert_eq!(t, target, "{url}");
        }
    }

    #[test]
    fn a_key_version_is_a_positive_integer() {
        assert!(matches!(key_version(None), Ok(None)));
        assert!(matches!(key_version(Some("3")), Ok(Some(3))));
        for bad in ["0", "00", "-1", "3x", " 3", "\u{b2}"] {
            assert!(
                matches!(key_version(Some(bad)), Err(Error::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn from_env_without_credentials_says_how_to_load_the_dev_ones() {
        let vars = |set: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                set.iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        for set in [
            &[][..],
            &[("COORDINATOR_CALLER", "dev")][..],
            &[("COORDINATOR_CLIENT_API_KEY", "")][..],
        ] {
            match Client::from_vars(vars(set)) {
                Err(Error::Invalid(m)) => {
                    assert!(m.contains(". .coordinator/dev-credentials.env"), "{m}")
                }
                other => panic!("{set:?}: {other:?}"),
            }
        }
        let c = Client::from_vars(vars(&[
            ("COORDINATOR_URL", "http://127.0.0.1:1"),
            ("COORDINATOR_CLIENT_API_KEY", "cok_x"),
        ]));
        assert!(c.is_ok());
    }

    #[test]
    fn a_url_is_shown_without_its_password() {
        for (url, shown) in [
            ("http://u:pw@h:1/a?b=c@d", "http://h:1/a?b=c@d"),
            ("https://u@h", "https://h"),
            ("http://h:1/a@b", "http://h:1/a@b"),
            ("http://a@b@h?x", "http://h?x"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(without_user_info(url), shown, "{url}");
        }
        let c = Client::new("http://u:LEAKPW7@127.0.0.1:99999", Credentials::None);
        match c.open("/livez") {
            Err(Error::Invalid(why)) => {
                assert!(
                    !why.contains("LEAKPW7") && why.contains("127.0.0.1"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_claims_debug_never_shows_its_token() {
        let claim = Claim {
            job: json!({"id": "j1", "status": "RUNNING"}),
            token: "tok_SECRET".into(),
            token_expires_at: "2026-01-01T00:00:00Z".into(),
        };
        for shown in [
            format!("{claim:?}"),
            format!("{claim:#?}"),
            format!("{:?}", Some(&claim)),
        ] {
            assert!(!shown.contains("tok_SECRET"), "{shown}");
            assert!(shown.contains("token: .."), "{shown}");
            assert!(
                shown.contains("\"j1\"") && shown.contains("2026-01-01"),
                "{shown}"
            );
        }
    }
}
