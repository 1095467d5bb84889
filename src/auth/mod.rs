//! Request authentication (docs/design.md §3–§5): the schemes, the credential store, the one
//! middleware, the principal handlers receive, and the scopes routes require.
pub mod access;
pub mod api_key;
pub mod audit;
pub mod client_cert;
pub mod credentials;
pub mod hmac;
pub mod middleware;
pub mod model;
pub mod principal;
pub mod replay;
pub mod repo;
pub mod revocation;
pub mod scope;
pub mod store;
pub mod throttle;
pub mod token;
pub mod webhook;

use std::sync::Arc;

pub use access::{Access, RouteSpec};
pub use model::Scheme;
pub use principal::Principal;
pub use scope::Scope;

use crate::error::{ApiError, AuthFailure};

/// A request header as text (`None` when absent or not visible ASCII). By
/// [`HeaderName`](actix_web::http::header::HeaderName), from [`names`]: a lookup by `&str`
/// parses and lowercases the name first, a dozen times per authenticated request.
pub fn header<'a>(
    req: &'a actix_web::dev::ServiceRequest,
    name: &actix_web::http::header::HeaderName,
) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The credential headers the middleware reads, as header names (the wire modules name
/// them as text, which is what clients and the CLI need).
pub mod names {
    use actix_web::http::header::HeaderName;

    use super::{api_key, hmac, webhook};

    pub static HMAC_CALLER: HeaderName = HeaderName::from_static(hmac::wire::HEADER_CALLER);
    pub static HMAC_TIMESTAMP: HeaderName = HeaderName::from_static(hmac::wire::HEADER_TIMESTAMP);
    pub static HMAC_SIGNATURE: HeaderName = HeaderName::from_static(hmac::wire::HEADER_SIGNATURE);
    pub static HMAC_KEY_VERSION: HeaderName =
        HeaderName::from_static(hmac::wire::HEADER_KEY_VERSION);
    pub static HMAC_NONCE: HeaderName = HeaderName::from_static(hmac::wire::HEADER_NONCE);
    pub static SIGNATURE: HeaderName = HeaderName::from_static(hmac::rfc9421::HEADER_SIGNATURE);
    pub static SIGNATURE_INPUT: HeaderName =
        HeaderName::from_static(hmac::rfc9421::HEADER_SIGNATURE_INPUT);
    pub static CONTENT_DIGEST: HeaderName =
        HeaderName::from_static(hmac::rfc9421::HEADER_CONTENT_DIGEST);
    pub static WEBHOOK_ID: HeaderName = HeaderName::from_static(webhook::wire::HEADER_ID);
    pub static WEBHOOK_TIMESTAMP: HeaderName =
        HeaderName::from_static(webhook::wire::HEADER_TIMESTAMP);
    pub static WEBHOOK_SIGNATURE: HeaderName =
        HeaderName::from_static(webhook::wire::HEADER_SIGNATURE);
    pub static API_KEY: HeaderName = HeaderName::from_static(api_key::HEADER);
}

/// A 401 with a short public reason.
pub fn fail(reason: &'static str) -> ApiError {
    ApiError::unauthorized(AuthFailure::new(reason))
}

/// Settings the middleware needs (from `Config`).
pub struct AuthSettings {
    pub skew_secs: i64,
    pub require_signature: bool,
    /// SHA-256 of `COORDINATOR_API_KEY`, the bootstrap key (never the key itself).
    pub bootstrap_key_hash: Option<[u8; 32]>,
    pub body_limit: usize,
    /// The longest a request body may take to arrive (408 past it).
    pub body_read_timeout: std::time::Duration,
    /// With `COORDINATOR_TLS_CLIENT_CA`: which certificate name names the caller.
    pub client_identity: Option<client_cert::ClientIdentity>,
}

/// Everything authentication needs, shared by the workers of one instance.
pub struct AuthContext {
    pub store: Arc<store::CredentialStore>,
    pub replays: replay::ReplayLog,
    pub revocations: Arc<revocation::Revocations>,
    pub throttle: throttle::Throttle,
    pub settings: AuthSettings,
}
