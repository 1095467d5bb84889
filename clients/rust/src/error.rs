//! Errors: RFC 9457 problem+json answers, typed by status, and transport failures.

use serde_json::Value;

/// What kind of error answer the server gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    Conflict,
    PayloadTooLarge,
    TooManyRequests,
    Unavailable,
    Server,
    Other,
}

impl ProblemKind {
    pub fn from_status(status: u16) -> Self {
        match status {
            400 => Self::BadRequest,
            401 => Self::Unauthorized,
            403 => Self::Forbidden,
            404 => Self::NotFound,
            405 => Self::MethodNotAllowed,
            408 => Self::RequestTimeout,
            409 => Self::Conflict,
            413 => Self::PayloadTooLarge,
            429 => Self::TooManyRequests,
            503 => Self::Unavailable,
            500..=599 => Self::Server,
            _ => Self::Other,
        }
    }
}

/// An error answer: its status, problem document and headers (as the Python client's
/// `ProblemError`: `.status`, `.problem`, `.headers`, `.type`, `.title`, `.detail`).
#[derive(Clone, Debug)]
pub struct Problem {
    pub status: u16,
    pub kind: ProblemKind,
    /// The whole problem+json document, every member kept (`type`, `title`, `status`,
    /// `detail`, and `field`, `reason`, … as the server sent them); `status` added when
    /// it was missing. When the body was not a JSON object, a stand-in:
    /// `{"status", "title": the reason phrase, "detail": the body's first 500
    /// characters}`.
    pub body: Value,
    /// `Retry-After` in seconds (sent as a number or an HTTP date).
    pub retry_after: Option<u64>,
    /// The answer's headers (e.g. a 3xx's `Location`).
    pub headers: Vec<(String, String)>,
}

impl Problem {
    pub fn new(status: u16, body: Value, retry_after: Option<u64>) -> Self {
        Problem {
            status,
            kind: ProblemKind::from_status(status),
            body,
            retry_after,
            headers: Vec::new(),
        }
    }

    /// From an answer: `body` is read as the problem document (see [`Problem::body`]).
    pub(crate) fn from_answer(
        status: u16,
        reason: &str,
        headers: Vec<(String, String)>,
        body: &[u8],
        retry_after: Option<u64>,
    ) -> Self {
        let mut doc = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(doc)) => doc,
            _ => {
                let text: String = String::from_utf8_lossy(body).chars().take(500).collect();
                let mut doc = serde_json::Map::new();
                doc.insert("title".into(), reason.into());
                doc.insert("detail".into(), text.into());
                doc
            }
        };
        doc.entry("status").or_insert_with(|| status.into());
        Problem {
            headers,
            ..Problem::new(status, Value::Object(doc), retry_after)
        }
    }

    /// A member of the problem document, e.g. `field` of a 400.
    pub fn member(&self, name: &str) -> Option<&Value> {
        self.body.get(name)
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.member(name).and_then(Value::as_str)
    }

    /// An answer header (the first of that name, case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `type`, e.g. `urn:coordinator:problem:conflict`.
    pub fn problem_type(&self) -> &str {
        self.text("type").unwrap_or("about:blank")
    }

    pub fn title(&self) -> &str {
        self.text("title").unwrap_or_default()
    }

    pub fn detail(&self) -> &str {
        self.text("detail").unwrap_or_default()
    }

    /// 400: the offending field.
    pub fn field(&self) -> Option<&str> {
        self.text("field")
    }

    /// 401: which rule failed.
    pub fn reason(&self) -> Option<&str> {
        self.text("reason")
    }

    /// 401 for a bad signature: the string the server signed (it holds no secret).
    pub fn canonical(&self) -> Option<&str> {
        self.text("canonical")
    }

    /// 401 for a timestamp out of the window: the server's clock (unix seconds).
    pub fn server_time(&self) -> Option<i64> {
        self.member("server_time").and_then(Value::as_i64)
    }
}

/// Every error of this crate.
#[derive(Debug)]
pub enum Error {
    /// The server answered with an error status.
    Problem(Problem),
    /// No HTTP answer: connection refused, reset, timed out.
    Transport(String),
    /// An answer this client cannot read, or a request it cannot build.
    Invalid(String),
}

impl Error {
    /// The problem, when the server answered.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Error::Problem(p) => Some(p),
            _ => None,
        }
    }

    /// The problem kind, when the server answered.
    pub fn kind(&self) -> Option<ProblemKind> {
        self.problem().map(|p| p.kind)
    }

    pub fn status(&self) -> Option<u16> {
        self.problem().map(|p| p.status)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Problem(p) => write!(f, "{} {}: {}", p.status, p.title(), p.detail()),
            Error::Transport(e) => write!(f, "transport: {e}"),
            Error::Invalid(e) => write!(f, "invalid: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<crate::signing::SigningError> for Error {
    fn from(e: crate::signing::SigningError) -> Self {
        Error::Invalid(e.0)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
