//! `Application::build(config)` → a bound server (tests use the same): the shared state,
//! the listeners (routes from `http::routes`), the background tasks and the shutdown.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::body::BoxBody;
use actix_web::dev::{Server, ServerHandle, ServiceRequest};
use actix_web::middleware::{self, Next};
use actix_web::{web, App, HttpServer};

use crate::auth::credentials::check_master_keys;
use crate::auth::revocation::Revocations;
use crate::auth::store::CredentialStore;
use crate::auth::throttle::Throttle;
use crate::auth::token::ensure_signing_key;
use crate::auth::{Access, AuthContext, AuthSettings, RouteSpec};
use crate::config::Config;
use crate::crypto::seal::Sealer;
use crate::db::{migrate, Db};
use crate::health::HealthCache;
use crate::http::routes;
use crate::state::AppState;

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
        let listener = TcpListener::bind(config.bind).map_err(|e| bind_error(config.bind, e))?;
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
        crate::jobs::notify::start_listener(&notifier, &db, &config.db.url);
        let state = web::Data::new(AppState {
            db: db.clone(),
            config: config.clone(),
            health: HealthCache::default(),
            queue_list: Default::default(),
            progress: crate::jobs::progress::ProgressLog::start(db.clone()),
            creates: crate::jobs::creates::CreateLog::start(&db),
            ingests: crate::stitcher::ingest::IngestLog::start(&db),
            metrics: Arc::new(crate::metrics::Metrics::new()?),
            estimates: Default::default(),
            notifier,
            connections: crate::auth::throttle::Connections::new(
                u32::try_from(config.max_connections_per_peer).unwrap_or(u32::MAX),
            ),
            door: crate::db::admission::DoorStats::new(
                config.overload_target,
                config.max_in_flight,
            ),
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
                let probe_listener = TcpListener::bind(addr).map_err(|e| bind_error(addr, e))?;
                let probe_port = probe_listener.local_addr()?.port();
                let api = run(listener, api_tls, state.clone(), &config, |r| {
                    r.access != Access::Open || routes::is_page(r)
                })?;
                // The probe listener stays plain HTTP (kubelet and Prometheus scrape it
                // on a private address; it serves no credentials).
                let open = run(probe_listener, None, state.clone(), &config, |r| {
                    r.access == Access::Open && !routes::is_page(r)
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
        // Flush: the batching threads (PostgreSQL's replay records, progress reports,
        // creates and deliveries) and the database's writes (on SQLite the group-commit writer) finish
        // what they were handed before the process ends.
        // One shutdown timeout for the whole flush, not one per queue.
        let until = std::time::Instant::now() + self.state.config.shutdown_timeout;
        let left = || until.saturating_duration_since(std::time::Instant::now());
        if !self.state.auth.replays.drain(left()).await {
            log::warn!("replay log: records still unwritten at exit");
        }
        if !self.state.progress.drain(left()).await {
            log::warn!("progress log: reports still unwritten at exit");
        }
        if !self.state.creates.drain(left()).await {
            log::warn!("create log: creates still unwritten at exit");
        }
        if !self.state.ingests.drain(left()).await {
            log::warn!("ingest log: deliveries still unwritten at exit");
        }
        if !self.state.db.drain_writes(left()).await {
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

/// Open files kept for the database and the process itself when the connection bound
/// is derived from the open-file limit: every pooled connection (SQLite opens the
/// database, its WAL and its index for each) and the writer, notifier and backfill
/// connections, the log, the certificate reloads, each worker's event loop.
fn reserved_files(config: &Config) -> u64 {
    u64::from(config.db.pool_size)
        .saturating_mul(8)
        .saturating_add(128)
}

/// The open-file limit after raising the soft limit to the hard one (what a service
/// manager such as systemd usually leaves at 1,024 while allowing far more). Every
/// connection is a descriptor; when they run out, accepting fails and so does opening
/// a database connection: with the soft limit of 1,024, 1,000 idle connections from
/// one address marked the database failing (review finding, 2026-12-06).
#[allow(
    unsafe_code,
    reason = "getrlimit/setrlimit have no safe wrapper in std"
)]
pub fn open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit; raising the soft limit up to the hard one
        // needs no privilege and changes nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    lim.rlim_cur
}

/// The instance's connection bound: `COORDINATOR_MAX_CONNECTIONS`, or the open-file
/// limit less [`reserved_files`] (at least 64, at most actix's own 25,000 per worker).
pub fn connection_bound(config: &Config, workers: usize) -> usize {
    if config.max_connections > 0 {
        return config.max_connections;
    }
    let free = open_file_limit().saturating_sub(reserved_files(config));
    let most = workers.max(1).saturating_mul(25_000);
    usize::try_from(free).unwrap_or(usize::MAX).clamp(64, most)
}

/// `on_connect` of the plain-HTTP listeners: count the connection against its peer's
/// bound; past it, close it at once (a 429 is attempted first) and mark it so that
/// nothing it may still carry runs ([`refuse_marked`]). HTTPS connections are counted
/// before their handshake, by `tls::serve_connection`.
fn count_connection(
    connections: &Arc<crate::auth::throttle::Connections>,
    conn: &dyn std::any::Any,
    ext: &mut actix_web::dev::Extensions,
) {
    let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() else {
        return;
    };
    let Ok(peer) = tcp.peer_addr() else {
        return;
    };
    match connections.open(peer.ip()) {
        Some(held) => {
            ext.insert(held);
        }
        None => {
            let sock = socket2::SockRef::from(tcp);
            // Straight to the socket: tokio's `try_write` answers `WouldBlock` on a
            // connection whose first readiness event has not been polled yet, which
            // is every connection here, so nothing was ever written.
            let _ = sock.send(&TOO_MANY_CONNECTIONS);
            let _ = sock.shutdown(std::net::Shutdown::Both);
            ext.insert(OverPeerBound);
        }
    }
}

/// The refusal of a connection past its peer's bound: the problem document any other
/// 429 of the service would carry.
fn over_peer_bound() -> crate::error::ApiError {
    crate::error::ApiError::Busy {
        what: "open connections for this address",
        retry_after_secs: 1,
    }
}

/// [`over_peer_bound`] as the raw HTTP/1.1 response written before the connection is
/// closed (plain HTTP only), made once.
static TOO_MANY_CONNECTIONS: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = over_peer_bound().problem().to_string();
    format!(
        "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nConnection: close\r\n\
         Content-Type: application/problem+json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// Marks a connection closed for being past its peer's bound.
struct OverPeerBound;

/// Outermost middleware: a request on a connection past its peer's bound (one that
/// arrived with the connection, before it was closed) is answered 429 without running.
async fn refuse_marked(
    req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<actix_web::dev::ServiceResponse<BoxBody>, actix_web::Error> {
    if req.conn_data::<OverPeerBound>().is_some() {
        return Ok(req.error_response(over_peer_bound()));
    }
    next.call(req).await
}

/// The application a worker serves: the routes `keep` selects, behind the door, the
/// request deadline and the access log, with the refusal of a marked connection
/// outermost.
fn app(
    state: &web::Data<AppState>,
    keep: fn(&RouteSpec) -> bool,
) -> App<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<BoxBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let (auth, metrics) = (state.auth.clone(), state.metrics.clone());
    let deadline = state.config.request_deadline;
    // One door per worker (it measures that worker's event-loop lag).
    let door = crate::db::admission::Door::new(state.door.clone());
    App::new()
        .app_data(state.clone())
        .app_data(web::PayloadConfig::new(state.config.body_limit))
        .configure(|cfg| routes::register(cfg, keep, &auth, &metrics))
        .default_service(routes::unmatched(keep, auth.clone(), metrics.clone()))
        .wrap(middleware::from_fn(
            move |req: ServiceRequest, next: Next<BoxBody>| {
                crate::telemetry::access_log(metrics.clone(), req, next)
            },
        ))
        // The request's database deadline counts from its arrival.
        .wrap(middleware::from_fn(
            move |req: ServiceRequest, next: Next<BoxBody>| {
                crate::db::load::deadline(deadline, req, next)
            },
        ))
        // Outermost, before routing, authentication and the access line: a refusal
        // under CPU overload costs no MAC, no body read, no log write (it is counted).
        .wrap(middleware::from_fn(
            move |req: ServiceRequest, next: Next<_>| {
                crate::db::admission::door(door.clone(), req, next)
            },
        ))
        .wrap(middleware::from_fn(refuse_marked))
}

fn run(
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
    state: web::Data<AppState>,
    config: &Config,
    keep: fn(&RouteSpec) -> bool,
) -> anyhow::Result<Server> {
    let workers = if config.workers > 0 {
        config.workers
    } else {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    };
    let bound = connection_bound(config, workers);
    if let Some(tls) = tls {
        return https(
            listener,
            tls,
            state,
            config,
            keep,
            bound.div_ceil(workers).max(1),
        );
    }
    let connections = state.connections.clone();
    let mut server = HttpServer::new(move || app(&state, keep))
        .shutdown_timeout(config.shutdown_timeout.as_secs())
        // A client that closes its connection ends its request: the handler is dropped,
        // so a long-poll claim stops waiting (see `http::push`).
        .h1_allow_half_closed(false)
        // Database work is the only blocking work a worker runs, and no more of it runs
        // at once than the pool has turns (`db::load`), so a worker never needs more
        // threads.
        .worker_max_blocking_threads(usize::try_from(config.db.pool_size).unwrap_or(16).max(1))
        // Per worker: actix counts each worker's connections; past the bound a worker
        // accepts no more until one closes (they wait in the kernel's accept queue), so
        // descriptors stay for the database.
        .max_connections(bound.div_ceil(workers).max(1))
        .on_connect(move |conn, ext| count_connection(&connections, conn, ext))
        .listen(listener)?;
    if config.workers > 0 {
        server = server.workers(config.workers);
    }
    Ok(server.run())
}

/// The HTTPS listener, put together as actix-web's `HttpServer` puts it (the same HTTP
/// settings, h2 and HTTP/1.1 by ALPN), except for the handshake: each connection is
/// counted against its address from its accept, and only then handed to its handshake
/// (`tls::serve_connection`). `HttpServer` counted it after the handshake, and its
/// acceptor holds at most 256 handshakes per worker at once, each for up to 3 s, so one
/// address that opened sockets and sent nothing held every place and no other client
/// got through (seventh security review, 2026-12-07).
fn https(
    listener: TcpListener,
    mut tls: rustls::ServerConfig,
    state: web::Data<AppState>,
    config: &Config,
    keep: fn(&RouteSpec) -> bool,
    per_worker: usize,
) -> anyhow::Result<Server> {
    let addr = listener.local_addr()?;
    // As actix offers them: h2 first, then HTTP/1.1.
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let mut builder = actix_server::Server::build();
    // Tells open connections to finish once a graceful stop begins, as `HttpServer` does.
    let stopping = builder.graceful_shutdown_signal();
    let factory = move || {
        let (state, acceptor, stopping) = (state.clone(), acceptor.clone(), stopping.clone());
        actix_service::fn_factory(move || {
            let stopping = stopping.clone();
            let http = actix_http::HttpService::build()
                .graceful_shutdown_signal(move || {
                    let stopping = stopping.clone();
                    async move { stopping.notified().await }
                })
                .keep_alive(actix_http::KeepAlive::default())
                .client_request_timeout(std::time::Duration::from_secs(5))
                .client_disconnect_timeout(std::time::Duration::from_secs(1))
                // As on the plain listener: a client that closes ends its request.
                .h1_allow_half_closed(false)
                .on_connect_ext(
                    |io: &crate::tls::Stream, ext: &mut actix_http::Extensions| {
                        crate::tls::on_connect(io, ext);
                    },
                )
                // What `HttpServer` gives an HTTPS app: secure, its address as the host.
                // actix-web has no other public constructor for it (this one is
                // `doc(hidden)` and semver-exempt, kept for actix-test): an actix-web
                // update that drops it fails to compile here, never silently.
                // `AppConfig::default()` would compile but call the connection plain
                // HTTP (`ConnectionInfo::scheme`).
                .finish(actix_service::map_config(app(&state, keep), move |()| {
                    actix_web::dev::AppConfig::__priv_test_new(true, addr.to_string(), addr)
                }));
            let made = actix_service::ServiceFactory::new_service(&http, ());
            let (acceptor, connections) = (acceptor.clone(), state.connections.clone());
            async move {
                let http = std::rc::Rc::new(made.await?);
                Ok::<_, ()>(actix_service::fn_service(
                    move |tcp: actix_web::rt::net::TcpStream| {
                        crate::tls::serve_connection(
                            tcp,
                            acceptor.clone(),
                            connections.clone(),
                            http.clone(),
                        )
                    },
                ))
            }
        })
    };
    builder = builder
        .shutdown_timeout(config.shutdown_timeout.as_secs())
        .worker_max_blocking_threads(usize::try_from(config.db.pool_size).unwrap_or(16).max(1))
        .max_concurrent_connections(per_worker)
        .listen("coordinator-https", listener, factory)?;
    if config.workers > 0 {
        builder = builder.workers(config.workers);
    }
    Ok(builder.run())
}

/// A listen address that cannot be bound, and what to do when it is taken.
fn bind_error(addr: std::net::SocketAddr, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!(
            "cannot bind {addr}: {e}; another process listens there (another `coordinator \
             serve`?): stop it, or choose another address (--bind / COORDINATOR_BIND, \
             --metrics-bind / COORDINATOR_METRICS_BIND)"
        )
    } else {
        anyhow::anyhow!("cannot bind {addr}: {e}")
    }
}
