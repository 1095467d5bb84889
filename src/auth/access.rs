//! What a route requires of its caller. Every registered resource carries its
//! `RouteSpec` into its own guard (see `auth::middleware`), so the requirement that is
//! checked is always the one of the route that runs: there is no second, independent
//! match of the path.

use super::Scope;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No authentication (`/livez`, `/readyz`, `/metrics`, `/openapi.json`).
    Open,
    /// Any authenticated principal; only the fallback for unknown paths (which then
    /// answers 404 without running a handler).
    Authenticated,
    /// An authenticated principal holding this scope.
    Scope(Scope),
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
    /// Routes about one job (`{id}` in the path): the only routes a job token may use,
    /// and only for its own job.
    pub fn is_job_route(&self) -> bool {
        self.path.contains("{id}")
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
