//! [`Client`]: one method per route, on a blocking `ureq` agent (keep-alive pool).

use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::error::{Error, Problem, Result};
use crate::signing::Credentials;

/// Largest answer body read.
const MAX_BODY: u64 = 16 * 1024 * 1024;

/// A job as the server returns it (camelCase members: `id`, `status`, `payload`, …).
pub type Job = Value;

/// A claimed job (RUNNING now) and the job token that acts on it.
#[derive(Clone, Debug)]
pub struct Claim {
    pub job: Job,
    pub token: String,
    pub token_expires_at: String,
}

impl Claim {
    pub fn id(&self) -> &str {
        self.job
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
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

/// A coordinator client. 503 and 429 are retried (`retries` times) waiting
/// `Retry-After` when sent, else an exponential backoff with jitter capped at
/// `max_backoff`; connection errors are retried for GET and requests with an
/// `Idempotency-Key`. Each attempt is signed afresh, so a retry is never a replay.
#[derive(Clone)]
pub struct Client {
    base: String,
    credentials: Credentials,
    agent: ureq::Agent,
    pub retries: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
    sleep: Sleep,
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
    /// A client for `base` (e.g. `http://127.0.0.1:8080`), 30 s timeout, 4 retries.
    pub fn new(base: &str, credentials: Credentials) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build();
        Client {
            base: base.trim_end_matches('/').to_owned(),
            credentials,
            agent,
            retries: 4,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            sleep: Arc::new(std::thread::sleep),
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
    /// `serve --dev` writes to `.coordinator/dev-credentials.env`.
    pub fn from_env() -> Result<Self> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let url = var("COORDINATOR_URL").unwrap_or_else(|| "http://127.0.0.1:8080".to_owned());
        let key_version = match var("COORDINATOR_KEY_VERSION") {
            Some(v) => Some(v.parse::<u32>().map_err(|_| {
                Error::Invalid("COORDINATOR_KEY_VERSION must be a positive integer".into())
            })?),
            None => None,
        };
        match (
            var("COORDINATOR_CALLER"),
            var("COORDINATOR_HMAC_SECRET"),
            var("COORDINATOR_CLIENT_API_KEY"),
        ) {
            (Some(c), Some(s), _) => Ok(Self::v1(&url, &c, &s, key_version)),
            (_, _, Some(k)) => Ok(Self::new(&url, Credentials::ApiKey(k))),
            _ => Err(Error::Invalid(
                "set COORDINATOR_CALLER and COORDINATOR_HMAC_SECRET, or COORDINATOR_CLIENT_API_KEY"
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
        self.sleep = Arc::new(sleep);
        self
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
    /// `body` the exact bytes sent and signed. An error status is an [`Error::Problem`].
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
        credentials: Option<&Credentials>,
    ) -> Result<Response> {
        let creds = credentials.unwrap_or(&self.credentials);
        let method = method.to_ascii_uppercase();
        let may_resend = matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS")
            || headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("idempotency-key"));
        let url = format!("{}{path}", self.base);
        let mut attempt = 0;
        loop {
            let mut req = self.agent.request(&method, &url);
            // Sign what ureq will put on the request line, after its URL parsing.
            let sent = req
                .request_url()
                .map_err(|e| Error::Invalid(format!("{url}: {e}")))?;
            let target = match sent.as_url().query() {
                Some(q) => format!("{}?{q}", sent.path()),
                None => sent.path().to_owned(),
            };
            let full = sent.as_url().as_str().to_owned();
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
                    if may_resend && attempt < self.retries {
                        (self.sleep)(self.delay(attempt, None));
                        attempt += 1;
                        continue;
                    }
                    return Err(Error::Transport(format!("{method} {path}: {t}")));
                }
            };
            let retry_after = retry_after_secs(resp.header("retry-after"));
            let headers: Vec<(String, String)> = resp
                .headers_names()
                .into_iter()
                .filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_owned())))
                .collect();
            let mut bytes = Vec::new();
            resp.into_reader()
                .take(MAX_BODY)
                .read_to_end(&mut bytes)
                .map_err(|e| Error::Transport(format!("{method} {path}: reading: {e}")))?;
            if matches!(status, 429 | 503) && attempt < self.retries {
                (self.sleep)(self.delay(attempt, retry_after));
                attempt += 1;
                continue;
            }
            if status >= 400 {
                let doc = serde_json::from_slice::<Value>(&bytes)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(
                        || json!({"status": status, "detail": String::from_utf8_lossy(&bytes)}),
                    );
                let secs = retry_after.map(|d| d.as_secs());
                return Err(Error::Problem(Problem::new(status, doc, secs)));
            }
            return Ok(Response {
                status,
                headers,
                body: bytes,
            });
        }
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
    /// route answer 404/405.
    pub fn heartbeat(&self, id: &str) -> Result<Value> {
        let path = format!("/coordinator/jobs/{}/heartbeat", encode_segment(id));
        self.call("POST", &path, Some(&json!({})), &[])
    }

    /// `POST /coordinator/queues/{queue}/claim` [jobs:update]: the best QUEUED job, now
    /// RUNNING, with its job token; `None` when the queue is empty (204).
    pub fn claim(&self, queue: &str, worker: &str) -> Result<Option<Claim>> {
        let path = format!("/coordinator/queues/{}/claim", encode_segment(queue));
        let body = compact(&json!({ "worker": worker }));
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
