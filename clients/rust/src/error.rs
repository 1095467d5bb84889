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

/// An error answer: its status and problem document.
#[derive(Clone, Debug)]
pub struct Problem {
    pub status: u16,
    pub kind: ProblemKind,
    /// The whole problem+json document (a stand-in when the body was not one).
    pub body: Value,
    /// `Retry-After` in seconds, when sent as a number.
    pub retry_after: Option<u64>,
}

impl Problem {
    pub fn new(status: u16, body: Value, retry_after: Option<u64>) -> Self {
        Problem {
            status,
            kind: ProblemKind::from_status(status),
            body,
            retry_after,
        }
    }

    fn member(&self, name: &str) -> Option<&str> {
        self.body.get(name).and_then(Value::as_str)
    }

    /// `type`, e.g. `urn:coordinator:problem:conflict`.
    pub fn problem_type(&self) -> &str {
        self.member("type").unwrap_or("about:blank")
    }

    pub fn title(&self) -> &str {
        self.member("title").unwrap_or_default()
    }

    pub fn detail(&self) -> &str {
        self.member("detail").unwrap_or_default()
    }

    /// 400: the offending field.
    pub fn field(&self) -> Option<&str> {
        self.member("field")
    }

    /// 401: which rule failed.
    pub fn reason(&self) -> Option<&str> {
        self.member("reason")
    }

    /// 401 for a bad signature: the string the server signed (it holds no secret).
    pub fn canonical(&self) -> Option<&str> {
        self.member("canonical")
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
