//! `Application::build(config)` → a bound server (tests use the same), and the one
//! route table: every route with the access it requires, registered from one list.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::body::BoxBody;
use actix_web::dev::{Server, ServerHandle, ServiceRequest};
use actix_web::middleware::{self, Next};
use actix_web::{web, App, HttpServer};

use crate::auth::access::UNMATCHED;
use crate::auth::admin::check_master_keys;
use crate::auth::middleware::{guard, Gate};
use crate::auth::revocation::Revocations;
use crate::auth::store::CredentialStore;
use crate::auth::throttle::Throttle;
use crate::auth::token::ensure_signing_key;
use crate::auth::{Access, AuthContext, AuthSettings, RouteSpec, Scope};
use crate::config::Config;
use crate::crypto::seal::Sealer;
use crate::db::{migrate, Db};
use crate::error::ApiError;
use crate::health::HealthCache;
use crate::http::{health, jobs};
use crate::state::AppState;

macro_rules! route_table {
    ($( $method:ident $path:literal => $handler:path, $access:expr; )*) => {
        /// Every route, its method and the access it requires: the one list from which
        /// routes are registered, each with its own guard.
        pub const ROUTES: &[RouteSpec] = &[
            $( RouteSpec { method: route_table!(@m $method), path: $path, access: $access }, )*
        ];

        /// Register the routes whose access `keep` accepts. Each resource is wrapped
        /// in a guard that carries this route's spec, so what is checked is always the
        /// requirement of the route that runs. A path may carry several methods (one
        /// resource each, selected by method); after them, one resource per path answers
        /// 405 for any other method, behind the guard of the path's first route.
        fn register(
            cfg: &mut web::ServiceConfig,
            keep: fn(&RouteSpec) -> bool,
            auth: &Arc<AuthContext>,
            metrics: &Arc<crate::metrics::Metrics>,
        ) {
            $(
                let spec = RouteSpec {
                    method: route_table!(@m $method),
                    path: $path,
                    access: $access,
                };
                if keep(&spec) {
                    let gate = Arc::new(Gate::new(auth.clone(), metrics.clone(), spec));
                    cfg.service(
                        web::resource($path)
                            .guard(route_table!(@g $method))
                            .route(web::$method().to($handler))
                            .wrap(middleware::from_fn(
                                move |req: ServiceRequest, next: Next<BoxBody>| {
                                    guard(gate.clone(), req, next)
                                },
                            )),
                    );
                }
            )*
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
    (@g get) => { actix_web::guard::Get() };
    (@g post) => { actix_web::guard::Post() };
    (@g patch) => { actix_web::guard::Patch() };
}

route_table! {
    get   "/livez"                            => health::livez,    Access::Open;
    get   "/readyz"                           => health::readyz,   Access::Open;
    get   "/metrics"                          => health::metrics,  Access::Open;
    get   "/openapi.json"                     => crate::http::openapi::openapi_json, Access::Open;
    get   "/ui/"                              => crate::http::ui::index,  Access::Open;
    get   "/ui/app.js"                        => crate::http::ui::script, Access::Open;
    get   "/ui/app.css"                       => crate::http::ui::style,  Access::Open;
    get   "/coordinator/health"               => health::health,   Access::Scope(Scope::HealthRead);
    post  "/coordinator/jobs"                 => jobs::create,     Access::Scope(Scope::JobsCreate);
    get   "/coordinator/jobs"                 => jobs::list,       Access::Scope(Scope::JobsRead);
    post  "/coordinator/jobs/batch"           => jobs::batch,      Access::Scope(Scope::JobsCreate);
    get   "/coordinator/jobs/{id}"            => jobs::get,        Access::Scope(Scope::JobsRead);
    patch "/coordinator/jobs/{id}/status"     => jobs::status,     Access::Scope(Scope::JobsUpdate);
    patch "/coordinator/jobs/{id}/progress"   => jobs::progress,   Access::Scope(Scope::JobsUpdate);
    post  "/coordinator/jobs/{id}/heartbeat"  => jobs::heartbeat,  Access::Scope(Scope::JobsUpdate);
    post  "/coordinator/jobs/{id}/complete"   => jobs::complete,   Access::Scope(Scope::JobsUpdate);
    post  "/coordinator/jobs/{id}/fail"       => jobs::fail,       Access::Scope(Scope::JobsUpdate);
    post  "/coordinator/jobs/{id}/cancel"     => jobs::cancel,     Access::Scope(Scope::JobsUpdate);
    post  "/coordinator/jobs/{id}/retry"      => jobs::retry,      Access::Scope(Scope::JobsUpdate);
    get   "/coordinator/queues"               => jobs::queues,     Access::Scope(Scope::HealthRead);
    patch "/coordinator/queues/{queue}"       => jobs::patch_queue, Access::Scope(Scope::Admin);
    post  "/coordinator/queues/{queue}/claim" => jobs::claim,      Access::Scope(Scope::JobsUpdate);
    get   "/coordinator/jobs/{id}/events"     => crate::http::push::job_events, Access::Scope(Scope::JobsRead);
    get   "/coordinator/queues/{queue}/events" => crate::http::push::queue_events, Access::Scope(Scope::HealthRead);
    post  "/stitcher/webhook"                 => crate::http::stitcher::webhook,  Access::Scope(Scope::StitcherWebhook);
    post  "/stitcher/webhook/{caller}"        => crate::http::stitcher::webhook_from_sender, Access::Scope(Scope::StitcherWebhook);
    post  "/stitcher/dispatch"                => crate::http::stitcher::dispatch, Access::Scope(Scope::StitcherDispatch);
    post  "/admin/tokens/revoke"              => crate::http::admin::revoke_token, Access::Scope(Scope::Admin);
}

/// The dashboard's routes: open, but served with the API (see `--metrics-bind`).
pub fn is_page(r: &RouteSpec) -> bool {
    r.path.starts_with("/ui/")
}

/// The registered route with this method and pattern (`None`: not a registered route).
pub fn access_for(method: &str, path_pattern: &str) -> Option<&'static RouteSpec> {
    ROUTES
        .iter()
        .find(|r| r.method == method && r.path == path_pattern)
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
            let methods: Vec<&str> = ROUTES
                .iter()
                .filter(|x| x.path == r.path)
                .map(|x| x.method)
                .collect();
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

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed(allow: &'static str) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed(allow))
}

/// A built, bound, not yet running application.
pub struct Application {
    port: u16,
    server: Server,
    /// With `--metrics-bind`: the listener serving the four open routes instead.
    probes: Option<(u16, Server)>,
    state: web::Data<AppState>,
}

impl Application {
    /// Migrate the database, bind the listener (port 0 picks a free port) and build
    /// the server. Must run inside an actix system.
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        // The certificate first: a bad pair stops the start before the database is touched.
        let tls = match &config.tls {
            Some(t) => {
                let certs = crate::tls::CertReloader::load(&t.cert, &t.key)?;
                let server = crate::tls::server_config(t, certs.clone())?;
                log::info!(
                    "TLS: serving HTTPS with {}{}",
                    t.cert.display(),
                    if t.client_ca.is_some() {
                        " (client certificates accepted)"
                    } else {
                        ""
                    }
                );
                Some((server, certs, t.reload_every))
            }
            None => None,
        };
        let db_cfg = config.db.clone();
        let ran = actix_web::rt::task::spawn_blocking(move || migrate::run_pending(&db_cfg))
            .await
            .map_err(|e| anyhow::anyhow!("migration task failed: {e}"))??;
        if ran > 0 {
            log::info!("applied {ran} migration(s)");
        }
        let listener = TcpListener::bind(config.bind)
            .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", config.bind))?;
        if tls.is_none() && !config.dev && !config.insecure_http {
            log::warn!(
                "serving plain HTTP on {}: API keys, job tokens and payloads cross the network \
                 readable; set COORDINATOR_TLS_CERT and COORDINATOR_TLS_KEY, or \
                 COORDINATOR_INSECURE_HTTP=true when TLS is terminated in front",
                config.bind
            );
        }
        let port = listener.local_addr()?.port();
        let config = Arc::new(config);
        let db = Db::new(&config.db);
        let sealer = Arc::new(Sealer::new(
            (*config.master_key).clone(),
            config.master_key_previous.as_deref().cloned(),
        )?);
        let check_db = db.clone();
        let check_sealer = sealer.clone();
        actix_web::rt::task::spawn_blocking(move || check_master_keys(&check_db, &check_sealer))
            .await
            .map_err(|e| anyhow::anyhow!("startup check failed: {e}"))?
            .map_err(|line| anyhow::anyhow!(line))?;
        let key_db = db.clone();
        let key_sealer = sealer.clone();
        actix_web::rt::task::spawn_blocking(move || ensure_signing_key(&key_db, &key_sealer))
            .await
            .map_err(|e| anyhow::anyhow!("startup task failed: {e}"))??;
        let store = Arc::new(CredentialStore::new(db.clone(), sealer));
        let revocations = Arc::new(Revocations::new(db.clone()));
        revocations.poll().await?;
        let notifier = crate::jobs::notify::Notifier::new(config.push);
        crate::jobs::notify::start_listener(&notifier, &config.db.url);
        let state = web::Data::new(AppState {
            db: db.clone(),
            config: config.clone(),
            health: HealthCache::default(),
            metrics: Arc::new(crate::metrics::Metrics::new()?),
            estimates: Default::default(),
            notifier,
            auth: Arc::new(AuthContext {
                store: store.clone(),
                replays: crate::auth::replay::ReplayLog::start(db.clone()),
                revocations: revocations.clone(),
                throttle: Throttle::new(config.auth_failures_per_minute),
                settings: AuthSettings {
                    skew_secs: config.signature_skew_secs,
                    require_signature: config.require_signature,
                    bootstrap_key_hash: config.bootstrap_api_key,
                    body_limit: config.body_limit,
                    body_read_timeout: config.body_read_timeout,
                    client_identity: config
                        .tls
                        .as_ref()
                        .filter(|t| t.client_ca.is_some())
                        .map(|t| t.client_identity.clone()),
                },
            }),
        });
        actix_web::rt::spawn(store.run_poller());
        actix_web::rt::spawn(revocations.run_poller());
        actix_web::rt::spawn(crate::housekeeping::run(
            state.clone(),
            config.housekeeping_interval,
        ));
        let api_tls = tls.map(|(server, certs, every)| {
            actix_web::rt::spawn(certs.watch(every));
            server
        });
        let (server, probes) = match config.metrics_bind {
            None => (
                run(listener, api_tls, state.clone(), &config, |_| true)?,
                None,
            ),
            // The dashboard stays with the API it calls (same origin, `connect-src 'self'`).
            Some(addr) => {
                let probe_listener = TcpListener::bind(addr)
                    .map_err(|e| anyhow::anyhow!("cannot bind {addr}: {e}"))?;
                let probe_port = probe_listener.local_addr()?.port();
                let api = run(listener, api_tls, state.clone(), &config, |r| {
                    r.access != Access::Open || is_page(r)
                })?;
                // The probe listener stays plain HTTP (kubelet and Prometheus scrape it
                // on a private address; it serves no credentials).
                let open = run(probe_listener, None, state.clone(), &config, |r| {
                    r.access == Access::Open && !is_page(r)
                })?;
                (api, Some((probe_port, open)))
            }
        };
        Ok(Application {
            port,
            server,
            probes,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of the separate probe listener (`--metrics-bind`), if any.
    pub fn probe_port(&self) -> Option<u16> {
        self.probes.as_ref().map(|(p, _)| *p)
    }

    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Stops the server the way SIGTERM does: waiting claims and streams end first.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            server: self.server.handle(),
            notifier: self.state.notifier.clone(),
        }
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Serve until SIGTERM (graceful: in-flight requests finish; waiting claims answer
    /// 204 and streams end at once), SIGINT (forced) or `stop`; then let the replay log
    /// and the database's writer finish what they were handed before returning.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let notifier = self.state.notifier.clone();
        let signals = actix_web::rt::spawn(close_on_signal(notifier.clone()));
        let r = match self.probes {
            None => self.server.await,
            Some((_, probes)) => {
                let probe_handle = probes.handle();
                let probe_task = actix_web::rt::spawn(probes);
                let r = self.server.await;
                probe_handle.stop(true).await;
                let _ = probe_task.await;
                r
            }
        };
        signals.abort();
        notifier.close();
        // Flush: the replay batchers (PostgreSQL) and the database's writes (on SQLite
        // the group-commit writer) finish what they were handed before the process ends.
        let within = self.state.config.shutdown_timeout;
        if !self.state.auth.replays.drain(within).await {
            log::warn!("replay log: records still unwritten at exit");
        }
        if !self.state.db.drain_writes(within).await {
            log::warn!("database writes still under way at exit");
        }
        r
    }
}

/// Stops an [`Application`] from outside (tests, embedding).
#[derive(Clone)]
pub struct Stopper {
    server: ServerHandle,
    notifier: Arc<crate::jobs::notify::Notifier>,
}

impl Stopper {
    /// End waiting claims and streams, then stop the server (`graceful`: in-flight
    /// requests get the shutdown timeout to finish).
    pub async fn stop(&self, graceful: bool) {
        self.notifier.close();
        self.server.stop(graceful).await;
    }
}

/// On SIGTERM or SIGINT, end waiting claims and streams (actix stops the server on
/// the same signal; without this a stream would hold a graceful stop for the whole
/// shutdown timeout).
async fn close_on_signal(notifier: Arc<crate::jobs::notify::Notifier>) {
    use actix_web::rt::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        log::warn!("cannot watch SIGTERM/SIGINT: streams end at the shutdown timeout");
        return;
    };
    futures_util::future::select(Box::pin(term.recv()), Box::pin(int.recv())).await;
    log::info!("shutting down: ending waiting claims and event streams");
    notifier.close();
}

fn run(
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
    state: web::Data<AppState>,
    config: &Config,
    keep: fn(&RouteSpec) -> bool,
) -> anyhow::Result<Server> {
    let body_limit = config.body_limit;
    let mut server = HttpServer::new(move || {
        let (auth, metrics) = (state.auth.clone(), state.metrics.clone());
        let deadline = state.config.request_deadline;
        let fallback = Arc::new(Gate::new(auth.clone(), metrics.clone(), UNMATCHED));
        App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(body_limit))
            .configure(|cfg| register(cfg, keep, &auth, &metrics))
            // No route matched: authenticate like any route, then 404; no handler runs.
            .default_service(web::to(not_found).wrap(middleware::from_fn(
                move |req: ServiceRequest, next: Next<BoxBody>| guard(fallback.clone(), req, next),
            )))
            .wrap(middleware::from_fn(
                move |req: ServiceRequest, next: Next<BoxBody>| {
                    crate::telemetry::access_log(metrics.clone(), req, next)
                },
            ))
            // Outermost: the request's database deadline counts from its arrival.
            .wrap(middleware::from_fn(
                move |req: ServiceRequest, next: Next<BoxBody>| {
                    crate::db::load::deadline(deadline, req, next)
                },
            ))
    })
    .shutdown_timeout(config.shutdown_timeout.as_secs())
    // A client that closes its connection ends its request: the handler is dropped, so
    // a long-poll claim stops waiting (see `http::push`).
    .h1_allow_half_closed(false)
    .on_connect(crate::tls::on_connect);
    server = match tls {
        Some(tls) => server.listen_rustls_0_23(listener, tls)?,
        None => server.listen(listener)?,
    };
    if config.workers > 0 {
        server = server.workers(config.workers);
    }
    Ok(server.run())
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
            assert_eq!(access_for(r.method, r.path), Some(r));
        }
        assert_eq!(allowed_methods("/coordinator/jobs"), "POST, GET");
        assert_eq!(allowed_methods("/coordinator/jobs/{id}"), "GET");
    }

    #[test]
    fn only_probes_are_open() {
        for r in ROUTES {
            let open = matches!(r.access, Access::Open);
            assert_eq!(
                open,
                [
                    "/livez",
                    "/readyz",
                    "/metrics",
                    "/openapi.json",
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

/// The OpenAPI document against the route table, without a server: it lists exactly the
/// routes of `ROUTES` (method + pattern, both directions) with the access each requires.
#[cfg(test)]
mod openapi_document {
    #![allow(
        clippy::indexing_slicing,
        clippy::expect_used,
        reason = "test code: a missing key is the failed assertion"
    )]
    use std::collections::BTreeSet;

    use serde_json::{json, Value};
    use utoipa::OpenApi;

    use super::ROUTES;
    use crate::auth::{Access, Scope};

    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];

    fn document() -> Value {
        serde_json::to_value(crate::http::openapi::ApiDoc::openapi()).expect("document")
    }

    /// (METHOD, path pattern) of every operation in the document.
    fn documented(doc: &Value) -> BTreeSet<(String, String)> {
        let paths = doc["paths"].as_object().expect("paths");
        let mut out = BTreeSet::new();
        for (path, item) in paths {
            for method in METHODS {
                if item.get(method).is_some() {
                    out.insert((method.to_ascii_uppercase(), path.clone()));
                }
            }
        }
        out
    }

    fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
        let op = &doc["paths"][path][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {path} is not documented");
        op
    }

    /// Follow a local `$ref` (`#/components/...`).
    fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.strip_prefix('#').expect("local $ref");
                let target = doc
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling {r}"));
                resolve(doc, target)
            }
            None => v,
        }
    }

    #[test]
    fn document_lists_every_registered_route() {
        let doc = document();
        let registered: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_owned(), r.path.to_owned()))
            .collect();
        let documented = documented(&doc);
        let undocumented: Vec<_> = registered.difference(&documented).collect();
        let unregistered: Vec<_> = documented.difference(&registered).collect();
        assert!(
            undocumented.is_empty(),
            "registered routes missing from the document: {undocumented:?}"
        );
        assert!(
            unregistered.is_empty(),
            "documented operations that no route serves: {unregistered:?}"
        );
        // Operation ids are unique, and every `{param}` of a pattern is a path parameter.
        let mut ids = BTreeSet::new();
        for r in ROUTES {
            let op = operation(&doc, r.method, r.path);
            let id = op["operationId"].as_str().expect("operationId");
            assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
            let params: BTreeSet<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| resolve(&doc, p))
                .filter(|p| p["in"] == "path")
                .filter_map(|p| p["name"].as_str())
                .collect();
            let in_pattern: BTreeSet<&str> = r
                .path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            assert_eq!(
                params, in_pattern,
                "path parameters of {} {}",
                r.method, r.path
            );
        }
    }

    #[test]
    fn operations_require_the_routes_access() {
        let doc = document();
        assert!(
            doc.get("security").is_none(),
            "no document-wide requirement"
        );
        let schemes = doc["components"]["securitySchemes"]
            .as_object()
            .expect("securitySchemes");
        for name in ["hmac", "apiKey", "bearer", "standardWebhooks", "mutualTLS"] {
            assert!(schemes.contains_key(name), "security scheme {name}");
        }
        assert_eq!(schemes["hmac"]["in"], "header");
        assert_eq!(schemes["hmac"]["name"], "X-Coordinator-Signature");
        assert_eq!(schemes["apiKey"]["name"], "X-API-Key");
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(schemes["standardWebhooks"]["name"], "webhook-signature");
        assert_eq!(schemes["mutualTLS"]["type"], "mutualTLS");

        for r in ROUTES {
            let op = operation(&doc, r.method, r.path);
            let requirements = op["security"].as_array().cloned().unwrap_or_default();
            let Access::Scope(scope) = r.access else {
                assert!(
                    requirements.is_empty(),
                    "open route {} {} lists security",
                    r.method,
                    r.path
                );
                continue;
            };
            let mut names = BTreeSet::new();
            for req in &requirements {
                let req = req.as_object().expect("requirement");
                assert_eq!(req.len(), 1, "one scheme per alternative: {req:?}");
                for (name, scopes) in req {
                    assert!(schemes.contains_key(name), "unknown scheme {name}");
                    assert_eq!(
                        scopes,
                        &json!([scope.as_str()]),
                        "{} {} requires {}",
                        r.method,
                        r.path,
                        scope.as_str()
                    );
                    names.insert(name.as_str());
                }
            }
            assert!(
                names.contains("hmac") && names.contains("apiKey") && names.contains("mutualTLS"),
                "{}",
                r.path
            );
            // Job tokens carry jobs:read / jobs:update only; Standard Webhooks is accepted
            // on the webhook route only.
            if names.contains("bearer") {
                assert!(
                    matches!(scope, Scope::JobsRead | Scope::JobsUpdate),
                    "{}",
                    r.path
                );
            }
            assert_eq!(
                names.contains("standardWebhooks"),
                r.accepts_webhooks(),
                "{}",
                r.path
            );
            let responses = op["responses"].as_object().expect("responses");
            for status in ["401", "403", "429", "503"] {
                assert!(
                    responses.contains_key(status),
                    "{} {} documents no {status}",
                    r.method,
                    r.path
                );
            }
        }
    }
}
