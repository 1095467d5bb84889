//! The route table: every route once, with its method, path, handler and the access it
//! requires. It is the one list the server registers (each resource wrapped in its own
//! guard), the guard checks, and the OpenAPI document's operations come from
//! ([`RouteDoc`], completed by `http::openapi`).

use std::sync::Arc;

use actix_web::body::BoxBody;
use actix_web::dev::ServiceRequest;
use actix_web::middleware::{self, Next};
use actix_web::{web, HttpResponse};

use super::{admin, health, jobs, openapi, push, stitcher, ui};
use crate::auth::access::UNMATCHED;
use crate::auth::middleware::{guard, Gate};
use crate::auth::{Access, AuthContext, RouteSpec, Scope};
use crate::error::ApiError;
use crate::metrics::Metrics;

macro_rules! route_table {
    ($( $method:ident $path:literal => $($handler:ident)::+ , $access:expr; )*) => {
        /// Every route, its method and the access it requires: the one list from which
        /// routes are registered, each with its own guard.
        pub const ROUTES: &[RouteSpec] = &[
            $( RouteSpec { method: route_table!(@m $method), path: $path, access: $access }, )*
        ];

        /// The operations of the OpenAPI document: the `#[utoipa::path]` of every
        /// handler in the table, in table order. `http::openapi::document` adds the
        /// components and each operation's security and guard answers from `ROUTES`.
        #[derive(utoipa::OpenApi)]
        #[openapi(paths( $( $($handler)::+ ),* ))]
        pub struct RouteDoc;

        /// Register the routes whose access `keep` accepts. Each resource is wrapped
        /// in a guard that carries this route's spec, so what is checked is always the
        /// requirement of the route that runs. A path may carry several methods (one
        /// resource each, selected by method); after them, one resource per path answers
        /// 405 for any other method, behind the guard of the path's first route.
        /// Registered in [`registration_pass`] order, each pass in table order.
        pub fn register(
            cfg: &mut web::ServiceConfig,
            keep: fn(&RouteSpec) -> bool,
            auth: &Arc<AuthContext>,
            metrics: &Arc<Metrics>,
        ) {
            for pass in 0..REGISTRATION_PASSES {
            $(
                let spec = RouteSpec {
                    method: route_table!(@m $method),
                    path: $path,
                    access: $access,
                };
                if keep(&spec) && registration_pass(&spec) == pass {
                    let mut gate = Gate::new(auth.clone(), metrics.clone(), spec);
                    if !takes_query(&spec) {
                        gate = gate.taking_no_query();
                    }
                    let gate = Arc::new(gate);
                    cfg.service(
                        web::resource($path)
                            .guard(method_guard(&spec))
                            .route(web::route().to($($handler)::+))
                            .wrap(middleware::from_fn(
                                move |req: ServiceRequest, next: Next<BoxBody>| {
                                    guard(gate.clone(), req, next)
                                },
                            )),
                    );
                }
            )*
            }
            for (i, spec) in ROUTES.iter().enumerate() {
                if !keep(spec) || ROUTES.iter().take(i).any(|r| r.path == spec.path) {
                    continue;
                }
                let allow = allowed_methods(spec.path);
                let gate = Arc::new(Gate::new(auth.clone(), metrics.clone(), *spec));
                cfg.service(
                    web::resource(spec.path)
                        .default_service(web::to(move || method_not_allowed(allow)))
                        .wrap(middleware::from_fn(
                            move |req: ServiceRequest, next: Next<BoxBody>| {
                                guard(gate.clone(), req, next)
                            },
                        )),
                );
            }
        }
    };
    (@m get) => { "GET" };
    (@m post) => { "POST" };
    (@m patch) => { "PATCH" };
}

route_table! {
    get   "/livez"                             => health::livez,    Access::Open;
    get   "/readyz"                            => health::readyz,   Access::Open;
    get   "/metrics"                           => health::metrics,  Access::Open;
    get   "/openapi.json"                      => openapi::openapi_json, Access::Open;
    get   "/ui"                                => ui::redirect,     Access::Open;
    get   "/ui/"                               => ui::index,        Access::Open;
    get   "/ui/app.js"                         => ui::script,       Access::Open;
    get   "/ui/app.css"                        => ui::style,        Access::Open;
    get   "/coordinator/health"                => health::health,   Access::Scope(Scope::HealthRead);
    post  "/coordinator/jobs"                  => jobs::create,     Access::Scope(Scope::JobsCreate);
    get   "/coordinator/jobs"                  => jobs::list,       Access::Scope(Scope::JobsRead);
    post  "/coordinator/jobs/batch"            => jobs::batch,      Access::Scope(Scope::JobsCreate);
    get   "/coordinator/jobs/{id}"             => jobs::get,        Access::Job(Scope::JobsRead);
    patch "/coordinator/jobs/{id}/status"      => jobs::status,     Access::Job(Scope::JobsUpdate);
    patch "/coordinator/jobs/{id}/progress"    => jobs::progress,   Access::Job(Scope::JobsUpdate);
    post  "/coordinator/jobs/{id}/heartbeat"   => jobs::heartbeat,  Access::Job(Scope::JobsUpdate);
    post  "/coordinator/jobs/{id}/complete"    => jobs::complete,   Access::Job(Scope::JobsUpdate);
    post  "/coordinator/jobs/{id}/fail"        => jobs::fail,       Access::Job(Scope::JobsUpdate);
    post  "/coordinator/jobs/{id}/cancel"      => jobs::cancel,     Access::Scope(Scope::JobsUpdate);
    post  "/coordinator/jobs/{id}/retry"       => jobs::retry,      Access::Scope(Scope::JobsUpdate);
    get   "/coordinator/queues"                => jobs::queues,     Access::Scope(Scope::HealthRead);
    patch "/coordinator/queues/{queue}"        => jobs::patch_queue, Access::Scope(Scope::Admin);
    post  "/coordinator/queues/{queue}/claim"  => jobs::claim,      Access::Scope(Scope::JobsUpdate);
    get   "/coordinator/jobs/{id}/events"      => push::job_events, Access::Job(Scope::JobsRead);
    get   "/coordinator/queues/{queue}/events" => push::queue_events, Access::Scope(Scope::HealthRead);
    post  "/stitcher/webhook"                  => stitcher::webhook, Access::Scope(Scope::StitcherWebhook);
    post  "/stitcher/webhook/{caller}"         => stitcher::webhook_from_sender, Access::Scope(Scope::StitcherWebhook);
    post  "/stitcher/dispatch"                 => stitcher::dispatch, Access::Scope(Scope::StitcherDispatch);
    post  "/admin/tokens/revoke"               => admin::revoke_token, Access::Scope(Scope::Admin);
}

const REGISTRATION_PASSES: u8 = 3;

/// When a route is registered: actix tries resources in registration order, and each
/// one passed over costs a path comparison (about 230 instructions under callgrind),
/// so `/livez` goes first, the API next and the other open routes (the readiness
/// probe, metrics, the OpenAPI document and the dashboard, each of which does far
/// more work than that per request) last. No open path overlaps an API path, so the
/// order changes which resource is tried first, never which one answers.
fn registration_pass(spec: &RouteSpec) -> u8 {
    match spec.access {
        Access::Open if spec.path == "/livez" => 0,
        Access::Open => 2,
        _ => 1,
    }
}

/// The dashboard's routes: open, but served with the API (see `--metrics-bind`).
pub fn is_page(r: &RouteSpec) -> bool {
    r.path == "/ui" || r.path.starts_with("/ui/")
}

/// Which methods select a route: its own, and `HEAD` beside `GET` on the open routes
/// (load balancers probe with `HEAD`; actix sends the head of the `GET` answer without
/// its body). Authenticated `GET` routes keep `GET` alone: a signature covers the
/// method, and a `HEAD` on an event stream would hold a connection for nothing.
fn method_guard(spec: &RouteSpec) -> actix_web::guard::AnyGuard {
    use actix_web::guard;
    match spec.method {
        "GET" if matches!(spec.access, crate::auth::Access::Open) => {
            guard::Any(guard::Get()).or(guard::Head())
        }
        "GET" => guard::Any(guard::Get()),
        "POST" => guard::Any(guard::Post()),
        "PATCH" => guard::Any(guard::Patch()),
        _ => guard::Any(guard::fn_guard(|_| false)),
    }
}

/// What answers when no route matched: authenticated like any route, then 404; no
/// handler runs. On a listener whose routes (those `keep` selects) are all open, the
/// probe listener of `--metrics-bind`, a plain 404: no credential is good for anything
/// there, so none sent to it by mistake (in clear, on that plain-HTTP port) is read,
/// verified or counted against its caller (seventh security review, 2026-12-07, a
/// residual closed on 2026-12-07).
pub fn unmatched(
    keep: fn(&RouteSpec) -> bool,
    auth: Arc<AuthContext>,
    metrics: Arc<Metrics>,
) -> actix_web::Route {
    if ROUTES
        .iter()
        .filter(|r| keep(r))
        .all(|r| matches!(r.access, Access::Open))
    {
        return web::to(not_found);
    }
    let fallback = Arc::new(Gate::new(auth, metrics, UNMATCHED));
    web::to(not_found).wrap(middleware::from_fn(
        move |req: ServiceRequest, next: Next<BoxBody>| guard(fallback.clone(), req, next),
    ))
}

/// Whether a route reads a query string: its operation in the OpenAPI document declares
/// a query parameter (the handlers that read one document it; built once per process).
pub fn takes_query(spec: &RouteSpec) -> bool {
    static TAKING: std::sync::OnceLock<Vec<(&'static str, &'static str)>> =
        std::sync::OnceLock::new();
    let table = TAKING.get_or_init(|| {
        use utoipa::openapi::path::ParameterIn;
        use utoipa::OpenApi;
        let doc = RouteDoc::openapi();
        ROUTES
            .iter()
            .filter(|r| {
                let Some(item) = doc.paths.paths.get(r.path) else {
                    return false;
                };
                let op = match r.method {
                    "GET" => item.get.as_ref(),
                    "POST" => item.post.as_ref(),
                    "PATCH" => item.patch.as_ref(),
                    _ => None,
                };
                op.and_then(|o| o.parameters.as_ref())
                    .is_some_and(|ps| ps.iter().any(|p| p.parameter_in == ParameterIn::Query))
            })
            .map(|r| (r.method, r.path))
            .collect()
    });
    table
        .iter()
        .any(|(m, p)| *m == spec.method && *p == spec.path)
}

/// The `Allow` value of a path: its methods in table order (built once per process).
fn allowed_methods(path: &str) -> &'static str {
    static ALLOW: std::sync::OnceLock<Vec<(&'static str, &'static str)>> =
        std::sync::OnceLock::new();
    let table = ALLOW.get_or_init(|| {
        let mut out: Vec<(&'static str, &'static str)> = Vec::new();
        for r in ROUTES {
            if out.iter().any(|(p, _)| *p == r.path) {
                continue;
            }
            let mut methods: Vec<&str> = ROUTES
                .iter()
                .filter(|x| x.path == r.path)
                .map(|x| x.method)
                .collect();
            if matches!(r.access, Access::Open) && methods.contains(&"GET") {
                methods.push("HEAD");
            }
            let allow: &'static str = match methods.as_slice() {
                [one] => one,
                many => Box::leak(many.join(", ").into_boxed_str()),
            };
            out.push((r.path, allow));
        }
        out
    });
    table
        .iter()
        .find(|(p, _)| *p == path)
        .map_or("", |(_, a)| *a)
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed(allow: &'static str) -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed(allow))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_in_the_table_once() {
        let mut seen = std::collections::HashSet::new();
        for r in ROUTES {
            assert!(
                seen.insert((r.method, r.path)),
                "duplicate {} {}",
                r.method,
                r.path
            );
        }
        assert_eq!(allowed_methods("/coordinator/jobs"), "POST, GET");
        assert_eq!(allowed_methods("/coordinator/jobs/{id}"), "GET");
        assert_eq!(allowed_methods("/livez"), "GET, HEAD");
        assert_eq!(allowed_methods("/nowhere"), "");
    }

    #[test]
    fn registration_order_cannot_change_which_route_answers() {
        // Resources are registered out of table order (`registration_pass`): that is
        // only sound while no open path shares a prefix with an API path.
        for open in ROUTES.iter().filter(|r| matches!(r.access, Access::Open)) {
            let top = open.path.split('/').nth(1).unwrap_or("");
            assert!(
                ROUTES
                    .iter()
                    .filter(|r| !matches!(r.access, Access::Open))
                    .all(|r| r.path.split('/').nth(1) != Some(top)),
                "{}",
                open.path
            );
        }
        assert_eq!(
            ROUTES.iter().filter(|r| registration_pass(r) == 0).count(),
            1
        );
        assert!(ROUTES
            .iter()
            .all(|r| registration_pass(r) < REGISTRATION_PASSES));
    }

    #[test]
    fn only_probes_and_pages_are_open() {
        for r in ROUTES {
            let open = matches!(r.access, Access::Open);
            assert_eq!(
                open,
                [
                    "/livez",
                    "/readyz",
                    "/metrics",
                    "/openapi.json",
                    "/ui",
                    "/ui/",
                    "/ui/app.js",
                    "/ui/app.css"
                ]
                .contains(&r.path),
                "{}",
                r.path
            );
        }
    }
}
