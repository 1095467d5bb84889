//! Request authentication: the schemes of DESIGN §3, the principal handlers receive,
//! and the scopes routes require.
pub mod scope;
pub mod signing;
pub mod webhook_sig;

pub use scope::Scope;

use actix_web::{HttpMessage, HttpRequest};

/// The authenticated caller of a request, put into the request extensions by the
/// authentication middleware.
#[derive(Debug, Clone)]
pub struct Principal {
    pub caller: String,
    pub scopes: Vec<Scope>,
}

/// The caller's name for records such as `jobs.created_by` (`anonymous` on open routes).
pub fn caller_name(req: &HttpRequest) -> String {
    req.extensions()
        .get::<Principal>()
        .map(|p| p.caller.clone())
        .unwrap_or_else(|| "anonymous".to_owned())
}
