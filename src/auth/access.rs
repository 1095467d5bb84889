//! What a route requires of its caller. Every registered resource carries its
//! `RouteSpec` into its own guard (see `auth::middleware`), so the requirement that is
//! checked is always the one of the route that runs: there is no second, independent
//! match of the path.

use super::Scope;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No authentication: `/livez`, `/readyz`, `/metrics`, `/openapi.json` and the
    /// dashboard's `/ui`, `/ui/`, `/ui/app.js`, `/ui/app.css`.
    Open,
    /// Any authenticated principal; only the fallback for unknown paths (which then
    /// answers 404 without running a handler).
    Authenticated,
    /// An authenticated principal holding this scope.
    Scope(Scope),
    /// The same, and also a job token carrying the scope, for the job named by the
    /// route's `{id}` only: the routes a worker uses on the job it holds.
    Job(Scope),
}

impl Access {
    /// The scope a caller must hold (`None`: open, or the unmatched fallback).
    pub fn scope(&self) -> Option<Scope> {
        match self {
            Access::Scope(s) | Access::Job(s) => Some(*s),
            Access::Open | Access::Authenticated => None,
        }
    }
}

/// One registered route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
}

/// The spec of the fallback service (no route matched).
pub const UNMATCHED: RouteSpec = RouteSpec {
    method: "*",
    path: "unmatched",
    access: Access::Authenticated,
};

impl RouteSpec {
    /// The only routes a job token may use, and only for its own job (`Access::Job`).
    pub fn accepts_job_tokens(&self) -> bool {
        matches!(self.access, Access::Job(_))
    }

    /// Routes that also accept Standard Webhooks signatures.
    pub fn accepts_webhooks(&self) -> bool {
        self.path == WEBHOOK_ROUTE || self.path == WEBHOOK_SENDER_ROUTE
    }
}

/// The bare webhook route (only while exactly one caller holds webhook secrets).
pub const WEBHOOK_ROUTE: &str = "/stitcher/webhook";
/// The webhook route that names its sender, so at most that sender's secrets are tried.
pub const WEBHOOK_SENDER_ROUTE: &str = "/stitcher/webhook/{caller}";
