//! The one error type of the HTTP edge, rendered as RFC 9457 problem+json.
//!
//! Library code returns [`StoreError`] (storage) or module errors; conversion to
//! [`ApiError`] happens at the HTTP edge. Internal causes are logged, never returned:
//! a 500 body says only "internal error".
//!
//! The headers of an error answer are set in one place, `ApiError::error_response`,
//! `Retry-After` included: a 429 carries its own `retry_after_secs` (the time left of
//! a blocked peer's block, `auth::throttle::Throttle::blocked_for` and `record_failure`,
//! in whole seconds rounded up; 1 for a peer at its bound on bodies being read, in
//! `auth::middleware`; 1 at a bound on waiting claims or streams, `http::push`; 1 for
//! a connection past its address's bound, `startup`), and every 503 (`Unavailable`,
//! `Overloaded`, `BodyEvicted`) says 1. Two answers set it themselves: `/readyz`'s
//! own 503 (`http::health`), and the raw 429 written to a plain-HTTP connection past
//! its address's bound before it is closed (`startup`'s `TOO_MANY_CONNECTIONS`).

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde_json::{json, Map, Value};

/// Errors of the storage layer (repositories and the pool).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    /// The job was cancelled: a conflict of its own kind, so a worker can tell it apart.
    #[error("job cancelled")]
    JobCancelled,
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Refused before reaching the database: a queue at its bound, the request's
    /// deadline passed, or its client gone (503, never worth a retry storm).
    #[error("overloaded: {0}")]
    Overloaded(&'static str),
    /// The request's signature was already recorded (its deferred replay record,
    /// `db::replay::Deferred`): nothing of it was written.
    #[error("replayed request")]
    Replayed,
    /// A job token's write found its job on a later attempt (handed back and claimed
    /// again after the token was checked): the token is revoked, nothing was written.
    #[error("job token of an earlier attempt")]
    StaleAttempt,
    #[error(transparent)]
    Db(#[from] diesel::result::Error),
    #[error("internal: {0}")]
    Internal(String),
}

/// A unique or primary-key constraint refused the write (the database settled a race).
pub fn is_unique_violation(e: &diesel::result::Error) -> bool {
    matches!(
        e,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, _)
    )
}

impl StoreError {
    /// The same refusal for another request that shared the failed work (a batch of
    /// replay records, a deferred replay record): an overload stays an overload (503
    /// `overloaded`) and a replay a replay; anything else means the database did not
    /// take the write (503 `unavailable`), its cause kept for the log line.
    pub fn shared(&self) -> StoreError {
        match self {
            StoreError::Overloaded(why) => StoreError::Overloaded(why),
            StoreError::Replayed => StoreError::Replayed,
            StoreError::Unavailable(why) => StoreError::Unavailable(why.clone()),
            e => StoreError::Unavailable(e.to_string()),
        }
    }

    /// See [`is_unique_violation`].
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, StoreError::Db(e) if is_unique_violation(e))
    }

    /// See [`is_write_refused`].
    pub fn is_write_refused(&self) -> bool {
        matches!(self, StoreError::Db(e) if is_write_refused(e))
    }

    /// See [`is_damage`]; also a batch's failure passed on as text.
    pub fn is_damage(&self) -> bool {
        match self {
            StoreError::Db(e) => is_damage(e),
            StoreError::Unavailable(m) | StoreError::Internal(m) => is_damage_message(m),
            _ => false,
        }
    }

    /// True when the error means the connection (or the server behind it) is gone,
    /// so the pooled connection must be discarded and the request answered with 503.
    pub fn is_connection_loss(&self) -> bool {
        match self {
            StoreError::Db(e) => is_connection_loss(e),
            StoreError::Unavailable(_) => true,
            _ => false,
        }
    }
}

pub(crate) fn is_connection_loss(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind as K, Error as E};
    match e {
        E::DatabaseError(K::ClosedConnection | K::UnableToSendCommand, _) => true,
        E::BrokenTransactionManager => true,
        E::DatabaseError(K::Unknown, info) => {
            let m = info.message();
            m.contains("terminating connection")
                || m.contains("server closed the connection")
                || m.contains("connection to server")
                || m.contains("no connection to the server")
                // SQLite: the file itself is unusable (an outage, not a bug).
                || m.contains("disk I/O error")
                || m.contains("unable to open database file")
                || m.contains("database or disk is full")
        }
        _ => false,
    }
}

/// True when the database is up but will not store this write: the disk under it is
/// full (PostgreSQL's "could not extend file …: No space left on device", SQLSTATE
/// 53100, and its other writes that found no space), or it takes reads only (a
/// PostgreSQL standby, or a database with `default_transaction_read_only`: SQLSTATE
/// 25006; a SQLite file this process may not write). Answered 503 with `Retry-After`,
/// as an outage is, but the connection is sound and reads go on, so it neither trips
/// the health state nor discards the connection. (SQLite's own "database or disk is
/// full" is older and counts as a connection loss, see [`is_connection_loss`].) The
/// messages are PostgreSQL's in English (`lc_messages`), as for a connection loss:
/// diesel does not hand over the SQLSTATE but for a few kinds.
pub(crate) fn is_write_refused(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind as K, Error as E};
    match e {
        E::DatabaseError(K::ReadOnlyTransaction, _) => true,
        E::DatabaseError(K::Unknown, info) => {
            let m = info.message();
            m.contains("No space left on device")
                || m.contains("could not extend file")
                || m.contains("attempt to write a readonly database")
        }
        _ => false,
    }
}

/// True when the database reports that its own files are damaged: SQLite's
/// `SQLITE_CORRUPT` ("database disk image is malformed", "malformed database schema")
/// and `SQLITE_NOTADB` ("file is not a database"); PostgreSQL's `data_corrupted`
/// (SQLSTATE XX001: "invalid page in block …", "missing chunk number … for toast
/// value", "found xmin … from before relfrozenxid") and `index_corrupted` (XX002:
/// "index … contains unexpected zero page", "… contains corrupted page"). Answered 503
/// `unavailable` with `Retry-After`, not 500: it is the store that cannot serve, not
/// a bug of this request. What else follows is the storage layer's (`db::damaged`):
/// on SQLite the instance is taken out of service until a restart, on PostgreSQL it
/// is not. As elsewhere, PostgreSQL's messages are matched in English; diesel does not
/// hand over the SQLSTATE for these.
pub(crate) fn is_damage(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind as K, Error as E};
    match e {
        E::DatabaseError(K::Unknown, info) => is_damage_message(info.message()),
        _ => false,
    }
}

/// [`is_damage`] on a message already turned into text (a batch's shared failure).
pub(crate) fn is_damage_message(m: &str) -> bool {
    const DAMAGE: &[&str] = &[
        // SQLite
        "database disk image is malformed",
        "malformed database schema",
        "file is not a database",
        // PostgreSQL, XX001
        "invalid page in block",
        "missing chunk number",
        "unexpected chunk number",
        "from before relfrozenxid",
        "from before relminmxid",
        // PostgreSQL, XX002
        "contains unexpected zero page",
        "contains corrupted page",
    ];
    DAMAGE.iter().any(|d| m.contains(d))
}

/// Say at ERROR that the database is damaged, with `follows` (what the service does
/// about it). How often is the caller's: once a minute per instance
/// (`db::health::DbHealth::damage_line_due`), each request that meets the damage being
/// answered 503 with a WARN line of its own.
pub(crate) fn log_damage(why: &str, follows: Option<&str>) {
    log::error!(
        "the database reports damaged data ({why}){}: check it (SQLite: PRAGMA \
         integrity_check; PostgreSQL: amcheck, REINDEX) and restore what is damaged \
         from a backup",
        follows.unwrap_or_default()
    );
}

pub(crate) fn is_busy(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind as K, Error as E};
    match e {
        E::DatabaseError(K::Unknown, info) => {
            let m = info.message();
            m.contains("database is locked")
                || m.contains("database table is locked")
                // PostgreSQL broke a lock cycle by failing this transaction: transient.
                || m.contains("deadlock detected")
                // PostgreSQL ended the statement: `lock_timeout`, `statement_timeout`
                // (57014, 55P03; a database or role may set them), `pg_cancel_backend`.
                || m.contains("canceling statement due to")
        }
        E::DatabaseError(K::SerializationFailure, _) => true,
        _ => false,
    }
}

/// Why an authentication attempt failed: a short public reason plus optional
/// extension members (`server_time`, `canonical`) that hold no secret.
#[derive(Debug, Clone)]
pub struct AuthFailure {
    pub reason: &'static str,
    pub extra: Map<String, Value>,
}

impl AuthFailure {
    pub fn new(reason: &'static str) -> Self {
        AuthFailure {
            reason,
            extra: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }
}

/// The error type of every handler and of the middleware.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400, naming the offending field (`body` when the JSON itself is malformed).
    #[error("bad request: {field}: {detail}")]
    BadRequest { field: String, detail: String },
    #[error("unauthorized: {}", .0.reason)]
    Unauthorized(Box<AuthFailure>),
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    #[error("not found")]
    NotFound,
    /// 405, with the methods the resource does allow (the `Allow` header).
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    /// 408: the body did not arrive within the configured time.
    #[error("request timeout")]
    RequestTimeout,
    #[error("conflict: {0}")]
    Conflict(String),
    /// 409 of type `job-cancelled`: the job was cancelled; stop working on it.
    #[error("job cancelled")]
    JobCancelled,
    #[error("payload too large")]
    TooLarge,
    #[error("too many requests")]
    TooManyRequests { retry_after_secs: u64 },
    /// 429: a bound on open streams or waiting claims (this caller's or the instance's)
    /// is reached; `what` names it for the detail.
    #[error("busy: {what}")]
    Busy {
        what: &'static str,
        retry_after_secs: u64,
    },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// 503: shed before reaching the database (queue full, deadline passed).
    #[error("overloaded: {0}")]
    Overloaded(&'static str),
    /// 503 with `Connection: close`: a body read before its request was verified, whose
    /// place went to a peer holding fewer (`auth::throttle::Throttle::begin_body_read`).
    #[error("overloaded: body read ended for another peer")]
    BodyEvicted,
    #[error("internal error: {0:#}")]
    Internal(anyhow::Error),
}

impl ApiError {
    pub fn bad_request(field: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError::BadRequest {
            field: field.into(),
            detail: detail.into(),
        }
    }

    pub fn unauthorized(failure: AuthFailure) -> Self {
        ApiError::Unauthorized(Box::new(failure))
    }

    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(e.into())
    }

    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ApiError::BadRequest { .. } => ("bad-request", "Bad Request"),
            ApiError::Unauthorized(_) => ("unauthorized", "Unauthorized"),
            ApiError::Forbidden(_) => ("forbidden", "Forbidden"),
            ApiError::NotFound => ("not-found", "Not Found"),
            ApiError::MethodNotAllowed(_) => ("method-not-allowed", "Method Not Allowed"),
            ApiError::RequestTimeout => ("request-timeout", "Request Timeout"),
            ApiError::Conflict(_) => ("conflict", "Conflict"),
            ApiError::JobCancelled => ("job-cancelled", "Conflict"),
            ApiError::TooLarge => ("payload-too-large", "Payload Too Large"),
            ApiError::TooManyRequests { .. } | ApiError::Busy { .. } => {
                ("too-many-requests", "Too Many Requests")
            }
            ApiError::Unavailable(_) => ("unavailable", "Service Unavailable"),
            ApiError::Overloaded(_) | ApiError::BodyEvicted => {
                ("overloaded", "Service Unavailable")
            }
            ApiError::Internal(_) => ("internal", "Internal Server Error"),
        }
    }

    /// The public detail: never a cause chain, SQL, path or config name.
    fn detail(&self) -> String {
        match self {
            ApiError::BadRequest { field, detail } => format!("{field}: {detail}"),
            ApiError::Unauthorized(f) => f.reason.to_owned(),
            ApiError::Forbidden(why) => (*why).to_owned(),
            ApiError::NotFound => {
                "no such resource: no such job or queue, or no such route (every route is \
                 listed in /openapi.json)"
                    .to_owned()
            }
            ApiError::MethodNotAllowed(allow) => {
                format!("method not allowed for this resource (allowed: {allow})")
            }
            ApiError::RequestTimeout => {
                "the request body did not arrive within the configured time".to_owned()
            }
            ApiError::Conflict(why) => why.clone(),
            ApiError::JobCancelled => "the job was cancelled; stop working on it".to_owned(),
            ApiError::TooLarge => "request body exceeds the configured limit".to_owned(),
            ApiError::TooManyRequests { .. } => "too many failed attempts; retry later".to_owned(),
            ApiError::Busy { what, .. } => format!("too many {what}; retry later"),
            ApiError::Unavailable(_) => {
                "the service cannot reach its database; retry later".to_owned()
            }
            ApiError::Overloaded(_) | ApiError::BodyEvicted => {
                "the service is overloaded; retry later".to_owned()
            }
            ApiError::Internal(_) => "internal error".to_owned(),
        }
    }

    /// The problem+json document for this error.
    pub fn problem(&self) -> Value {
        let (kind, title) = self.kind();
        let mut body = json!({
            "type": format!("urn:coordinator:problem:{kind}"),
            "title": title,
            "status": self.status_code().as_u16(),
            "detail": self.detail(),
        });
        if let Some(obj) = body.as_object_mut() {
            match self {
                ApiError::BadRequest { field, .. } => {
                    obj.insert("field".into(), Value::String(field.clone()));
                }
                ApiError::Unauthorized(f) => {
                    obj.insert("reason".into(), Value::String(f.reason.to_owned()));
                    for (k, v) in &f.extra {
                        obj.insert(k.clone(), v.clone());
                    }
                }
                _ => {}
            }
        }
        body
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(_) | ApiError::JobCancelled => StatusCode::CONFLICT,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } | ApiError::Busy { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable(_) | ApiError::Overloaded(_) | ApiError::BodyEvicted => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            ApiError::Internal(e) => log::error!("internal error: {e:#}"),
            // A damaged database is said at ERROR too, by the storage layer
            // (`db::damaged`), which knows how long ago it last said so.
            ApiError::Unavailable(why) => log::warn!("database unavailable: {why}"),
            // Counted in `coordinator_db_shed_total`; a line per refusal would add
            // to the overload.
            ApiError::Overloaded(why) => log::debug!("request shed: {why}"),
            _ => {}
        }
        let mut resp = HttpResponse::build(self.status_code());
        resp.insert_header((header::CONTENT_TYPE, "application/problem+json"));
        resp.insert_header((header::CACHE_CONTROL, "no-store"));
        match self {
            ApiError::TooManyRequests { retry_after_secs }
            | ApiError::Busy {
                retry_after_secs, ..
            } => {
                resp.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            ApiError::Unavailable(_) | ApiError::Overloaded(_) => {
                resp.insert_header((header::RETRY_AFTER, "1"));
            }
            ApiError::Unauthorized(_) => {
                resp.insert_header((header::WWW_AUTHENTICATE, "Coordinator-HMAC-SHA256"));
            }
            ApiError::MethodNotAllowed(allow) => {
                resp.insert_header((header::ALLOW, *allow));
            }
            ApiError::RequestTimeout => {
                resp.insert_header((header::CONNECTION, "close"));
            }
            // The rest of its body is not read: the connection cannot be reused.
            ApiError::BodyEvicted => {
                resp.insert_header((header::RETRY_AFTER, "1"));
                resp.insert_header((header::CONNECTION, "close"));
            }
            _ => {}
        }
        resp.body(self.problem().to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound,
            StoreError::Conflict(why) => ApiError::Conflict(why),
            StoreError::JobCancelled => ApiError::JobCancelled,
            StoreError::Unavailable(why) => ApiError::Unavailable(why),
            StoreError::Overloaded(why) => ApiError::Overloaded(why),
            StoreError::Replayed => ApiError::unauthorized(AuthFailure::new("replayed request")),
            StoreError::StaleAttempt => ApiError::unauthorized(AuthFailure::new("revoked")),
            StoreError::Db(diesel::result::Error::NotFound) => ApiError::NotFound,
            StoreError::Db(ref d)
                if is_connection_loss(d) || is_busy(d) || is_write_refused(d) || is_damage(d) =>
            {
                ApiError::Unavailable(d.to_string())
            }
            StoreError::Db(d) => ApiError::Internal(d.into()),
            // A damaged database met by work that words its errors itself (the health
            // report, the readiness check's migration look-up).
            StoreError::Internal(why) if is_damage_message(&why) => ApiError::Unavailable(why),
            StoreError::Internal(why) => ApiError::Internal(anyhow::anyhow!(why)),
        }
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ApiError::Internal(anyhow::anyhow!("blocking task failed: {e}"))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

// The shape of `ApiError::problem` for the OpenAPI document (the body is built there).
/// An RFC 9457 problem document, the body of every error response
/// (`application/problem+json`). The optional members appear only where they apply
/// and are never `null`.
#[derive(Debug, utoipa::ToSchema)]
#[schema(example = json!({
    "type": "urn:coordinator:problem:bad-request",
    "title": "Bad Request",
    "status": 400,
    "detail": "priority: must be between -1000 and 1000",
    "field": "priority"
}))]
pub struct Problem {
    /// `urn:coordinator:problem:` and the kind, e.g. `bad-request`, `unauthorized`.
    #[schema(rename = "type", pattern = "^urn:coordinator:problem:[a-z-]+$")]
    pub kind: String,
    /// The status's reason phrase, e.g. `Not Found`.
    pub title: String,
    /// The HTTP status code, repeated.
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    /// What went wrong, for people; never internals (SQL, paths, causes).
    pub detail: String,
    /// 400: the offending field (`body` when the JSON itself is malformed).
    #[schema(nullable = false)]
    pub field: Option<String>,
    /// 401: the short public reason (`missing credentials`, `signature mismatch`, ...).
    #[schema(nullable = false)]
    pub reason: Option<String>,
    /// 401 `timestamp out of range`: the server's clock, unix seconds.
    #[schema(nullable = false)]
    pub server_time: Option<i64>,
    /// 401 `signature mismatch`: the string the server signed (it holds no secret), to
    /// compare with the client's.
    #[schema(nullable = false)]
    pub canonical: Option<String>,
    /// 401 `signature mismatch` (RFC 9421): the signature base the server built (it
    /// holds no secret).
    #[schema(nullable = false)]
    pub signature_base: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal passed on to the other requests of a failed batch keeps its kind: an
    /// overload is still answered `overloaded`, not as an outage.
    #[test]
    fn a_shared_refusal_keeps_its_kind() {
        let kind = |e: StoreError| ApiError::from(e.shared()).problem()["type"].clone();
        assert_eq!(
            kind(StoreError::Overloaded("database queue too slow")),
            "urn:coordinator:problem:overloaded"
        );
        assert_eq!(
            kind(StoreError::Unavailable("connection refused".into())),
            "urn:coordinator:problem:unavailable"
        );
        assert_eq!(
            kind(StoreError::Db(diesel::result::Error::RollbackTransaction)),
            "urn:coordinator:problem:unavailable"
        );
        assert!(matches!(
            StoreError::Replayed.shared(),
            StoreError::Replayed
        ));
    }

    /// A database that is up but takes no more writes (a full disk, a read-only
    /// database) is a 503 with nothing of the cause in the body, not a 500.
    #[test]
    fn a_write_the_database_refuses_is_503() {
        use diesel::result::{DatabaseErrorKind as K, Error as E};
        let refused = [
            E::DatabaseError(
                K::Unknown,
                Box::new(
                    "could not extend file \"pg_tblspc/16387/PG_15/16388/16389\": \
                     No space left on device"
                        .to_owned(),
                ),
            ),
            E::DatabaseError(
                K::ReadOnlyTransaction,
                Box::new("cannot execute UPDATE in a read-only transaction".to_owned()),
            ),
            E::DatabaseError(
                K::Unknown,
                Box::new("attempt to write a readonly database".to_owned()),
            ),
        ];
        for e in refused {
            assert!(is_write_refused(&e), "{e}");
            assert!(!is_connection_loss(&e), "{e}");
            let api = ApiError::from(StoreError::Db(e));
            assert_eq!(api.status_code(), StatusCode::SERVICE_UNAVAILABLE);
            let body = api.problem().to_string();
            assert!(
                !body.contains("pg_tblspc") && !body.contains("read-only"),
                "{body}"
            );
        }
        let cancelled = E::DatabaseError(
            K::Unknown,
            Box::new("canceling statement due to lock timeout".to_owned()),
        );
        assert!(is_busy(&cancelled) && !is_connection_loss(&cancelled));
        let bug = E::DatabaseError(K::Unknown, Box::new("no such column: x".to_owned()));
        assert!(!is_write_refused(&bug));
        assert_eq!(
            ApiError::from(StoreError::Db(bug)).status_code(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    /// A database that reports its own files damaged (SQLite's `SQLITE_CORRUPT` and
    /// `SQLITE_NOTADB`, PostgreSQL's XX001 and XX002) cannot serve: 503, with nothing of
    /// the cause in the body. It is neither a connection loss nor a refused write.
    #[test]
    fn a_damaged_database_is_503() {
        use diesel::result::{DatabaseErrorKind as K, Error as E};
        let damaged = [
            "database disk image is malformed",
            "malformed database schema (jobs_queue_idx) - invalid rootpage",
            "file is not a database",
            "invalid page in block 7 of relation base/16384/16397",
            "index \"jobs_pkey\" contains unexpected zero page at block 3",
            "index \"jobs_pkey\" contains corrupted page at block 12",
            "missing chunk number 0 for toast value 16411 in pg_toast_16397",
        ];
        for m in damaged {
            let e = E::DatabaseError(K::Unknown, Box::new(m.to_owned()));
            assert!(is_damage(&e), "{m}");
            assert!(!is_connection_loss(&e) && !is_write_refused(&e), "{m}");
            let store = StoreError::Db(e);
            assert!(store.is_damage() && store.shared().is_damage(), "{m}");
            let api = ApiError::from(store);
            assert_eq!(api.status_code(), StatusCode::SERVICE_UNAVAILABLE, "{m}");
            let body = api.problem().to_string();
            assert!(
                !body.contains("malformed") && !body.contains("page") && !body.contains("16397"),
                "{body}"
            );
        }
        let worded = StoreError::Internal("health report: database disk image is malformed".into());
        assert_eq!(
            ApiError::from(worded).status_code(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let bug = E::DatabaseError(K::Unknown, Box::new("no such table: jobs".to_owned()));
        assert!(!is_damage(&bug));
    }

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let e = ApiError::internal(anyhow::anyhow!("SELECT secret FROM /etc/passwd"));
        let body = e.problem().to_string();
        assert!(!body.contains("SELECT"));
        assert!(body.contains("internal error"));
        assert_eq!(e.status_code(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn unavailable_hides_the_cause() {
        let e: ApiError = StoreError::Unavailable("connection refused at 10.0.0.1".into()).into();
        assert_eq!(e.status_code(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!e.problem().to_string().contains("10.0.0.1"));
    }

    #[test]
    fn bad_request_names_the_field() {
        let e = ApiError::bad_request("percent", "must be between 0 and 100");
        let p = e.problem();
        assert_eq!(p["field"], "percent");
        assert_eq!(p["status"], 400);
    }

    #[test]
    fn auth_failure_carries_extension_members() {
        let e = ApiError::unauthorized(
            AuthFailure::new("timestamp out of range").with("server_time", 1700000000),
        );
        let p = e.problem();
        assert_eq!(p["reason"], "timestamp out of range");
        assert_eq!(p["server_time"], 1700000000);
    }
}
