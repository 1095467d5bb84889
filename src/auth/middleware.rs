//! The authentication guard. Each registered resource is wrapped in its own guard,
//! built from the route table with that route's `RouteSpec`, so authorization is
//! decided on the route that actually runs — never on a second match of the path — and
//! a handler cannot be reached without passing its own route's check. Unknown paths go
//! to a fallback guarded as `Access::Authenticated` that answers 404 without a handler.
//!
//! For a guarded route the guard picks the scheme in docs/design.md §4's order, runs the
//! scheme's cheap header checks before any body byte is read, reads the body (bounded
//! in size and time), verifies, checks the route's scope (and, for a job token, that the
//! route is its own job's), puts the `Principal` into the request extensions and writes
//! one audit line whose outcome includes what the handler answered.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, HOST, ORIGIN,
};
use actix_web::middleware::Next;
use actix_web::web::{Bytes, BytesMut};
use actix_web::{Error, HttpMessage, ResponseError};
use futures_util::StreamExt;
use prometheus::IntCounter;

use super::access::{Access, RouteSpec};
use super::audit::{AuditLine, AuditRecord};
use super::client_cert::{self, PeerCertificate};
use super::model::Scheme;
use super::principal::Principal;
use super::throttle::BodyReadRefused;
use super::{api_key, fail, hmac, webhook, AuthContext};
use crate::db::admission;
use crate::db::replay::Deferred;
use crate::error::ApiError;
use crate::metrics::{Metrics, RouteSeries};
use crate::request_id::RequestId;
use crate::telemetry::{LineWritten, MatchedRoute};

/// Which scheme a request uses (docs/design.md §4 order, first match wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Hmac,
    HttpSig,
    Webhook,
    Bearer,
    ApiKey,
}

/// Every header that carries (part of) a credential, in the order of their bits in
/// [`scan_credentials`]' mask ([`credential_index`]; a test holds the two together).
#[cfg(test)]
static CREDENTIAL_HEADERS: [&HeaderName; 12] = [
    &super::names::SIGNATURE,
    &super::names::SIGNATURE_INPUT,
    &super::names::HMAC_CALLER,
    &super::names::HMAC_TIMESTAMP,
    &super::names::HMAC_SIGNATURE,
    &super::names::HMAC_KEY_VERSION,
    &super::names::HMAC_NONCE,
    &super::names::WEBHOOK_ID,
    &super::names::WEBHOOK_TIMESTAMP,
    &super::names::WEBHOOK_SIGNATURE,
    &AUTHORIZATION,
    &super::names::API_KEY,
];

/// The bits of the credential headers in [`scan_credentials`]' mask, by name.
mod bit {
    pub const SIGNATURE: u16 = 1 << 0;
    pub const SIGNATURE_INPUT: u16 = 1 << 1;
    pub const HMAC_CALLER: u16 = 1 << 2;
    pub const HMAC_TIMESTAMP: u16 = 1 << 3;
    pub const HMAC_SIGNATURE: u16 = 1 << 4;
    pub const WEBHOOK_ID: u16 = 1 << 7;
    pub const WEBHOOK_TIMESTAMP: u16 = 1 << 8;
    pub const WEBHOOK_SIGNATURE: u16 = 1 << 9;
    pub const AUTHORIZATION: u16 = 1 << 10;
    pub const API_KEY: u16 = 1 << 11;
}

/// A credential header's bit number in [`scan_credentials`]' mask: one `match` on the (already
/// lower-case) name, which compiles to length checks and a compare or two, instead of
/// an equality test against each of the twelve names.
fn credential_index(name: &HeaderName) -> Option<u32> {
    use super::{api_key, hmac::rfc9421, hmac::wire, webhook::wire as webhook_wire};
    Some(match name.as_str() {
        rfc9421::HEADER_SIGNATURE => 0,
        rfc9421::HEADER_SIGNATURE_INPUT => 1,
        wire::HEADER_CALLER => 2,
        wire::HEADER_TIMESTAMP => 3,
        wire::HEADER_SIGNATURE => 4,
        wire::HEADER_KEY_VERSION => 5,
        wire::HEADER_NONCE => 6,
        webhook_wire::HEADER_ID => 7,
        webhook_wire::HEADER_TIMESTAMP => 8,
        webhook_wire::HEADER_SIGNATURE => 9,
        "authorization" => 10,
        api_key::HEADER => 11,
        _ => return None,
    })
}

/// Pure scheme choice from the headers. A credential header sent twice, or holding
/// anything but visible ASCII, is refused outright. Any HMAC header → HMAC, with no
/// fallback. Otherwise exactly one of webhook (on its routes), bearer, API key; two or
/// none → 401.
pub fn choose_scheme(headers: &HeaderMap, webhook_route: bool) -> Result<Choice, &'static str> {
    scan_credentials(headers, webhook_route).map(|(choice, _)| choice)
}

/// [`choose_scheme`], with the `X-API-Key` value when that header came (a cheap clone of
/// the request's bytes), so the API-key path does not look the header up again.
fn scan_credentials(
    headers: &HeaderMap,
    webhook_route: bool,
) -> Result<(Choice, Option<HeaderValue>), &'static str> {
    // One pass over the request's headers (a handful), noting which credential headers
    // came, rather than a lookup per credential header name.
    let mut seen: u16 = 0;
    let mut api_key = None;
    for (name, value) in headers.iter() {
        let Some(i) = credential_index(name) else {
            continue;
        };
        let bit = 1u16 << i;
        if seen & bit != 0 {
            return Err("duplicate header");
        }
        seen |= bit;
        if !value
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_graphic() || *b == b' ')
        {
            return Err("malformed header");
        }
        if bit == bit::API_KEY {
            api_key = Some(value);
        }
    }
    let has = |b: u16| seen & b != 0;
    let v1 = has(bit::HMAC_CALLER | bit::HMAC_TIMESTAMP | bit::HMAC_SIGNATURE);
    let rfc9421 = has(bit::SIGNATURE | bit::SIGNATURE_INPUT);
    let choice = if rfc9421 {
        // Any RFC 9421 header commits the request to that scheme, with no fallback.
        let other = v1 || has(bit::AUTHORIZATION | bit::API_KEY);
        if other {
            return Err("more than one credential scheme");
        }
        Choice::HttpSig
    } else if v1 {
        Choice::Hmac
    } else {
        let webhook =
            webhook_route && has(bit::WEBHOOK_ID | bit::WEBHOOK_TIMESTAMP | bit::WEBHOOK_SIGNATURE);
        let bearer = has(bit::AUTHORIZATION);
        match (webhook, bearer, api_key.is_some()) {
            (false, false, false) => return Err("missing credentials"),
            (true, false, false) => Choice::Webhook,
            (false, true, false) => Choice::Bearer,
            (false, false, true) => Choice::ApiKey,
            _ => return Err("more than one credential scheme"),
        }
    };
    let api_key = match choice {
        Choice::ApiKey => api_key.cloned(),
        _ => None,
    };
    Ok((choice, api_key))
}

/// The body of a request already authenticated (API key, job token, client
/// certificate), put back for the handler; `true` when it had to be waited for. Its
/// arrival time does not count against the request deadline, as for an unverified body
/// (review, 2026-12-06: a valid API-key create whose body took 4 s got 503).
async fn take_verified_body(ctx: &AuthContext, req: &mut ServiceRequest) -> Result<bool, ApiError> {
    let (limit, within) = (ctx.settings.body_limit, ctx.settings.body_read_timeout);
    let mut payload = take_payload(req, limit)?;
    let mut buf = BytesMut::new();
    if arrived_with_the_request(&mut payload, &mut buf, limit).await? {
        put_back(req, buf);
        return Ok(false);
    }
    let arriving = Instant::now();
    read_rest(&mut payload, &mut buf, limit, within, || {}).await?;
    crate::db::load::extend_deadline(arriving.elapsed());
    put_back(req, buf);
    Ok(true)
}

/// [`read_arrived`], after giving the connection one turn if the body was not all
/// there: actix's HTTP/1 dispatcher polls a request once before it decodes the body
/// bytes that came in the same read as the headers (review, 2026-12-06: a POST sent in
/// one write took a body place and could evict a slow upload).
async fn arrived_with_the_request(
    payload: &mut Payload,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<bool, ApiError> {
    if read_arrived(payload, buf, limit)? {
        return Ok(true);
    }
    actix_web::rt::task::yield_now().await;
    read_arrived(payload, buf, limit)
}

/// The request's payload, once its declared length is known to be within `limit`.
fn take_payload(req: &mut ServiceRequest, limit: usize) -> Result<Payload, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::TooLarge);
    }
    Ok(req.take_payload())
}

/// Add one piece of the body to `buf`, or 413 past `limit`.
fn add_piece(
    buf: &mut BytesMut,
    piece: Result<Bytes, actix_web::error::PayloadError>,
    limit: usize,
) -> Result<(), ApiError> {
    let chunk = piece.map_err(|e| {
        ApiError::bad_request("body", format!("could not read the request body: {e}"))
    })?;
    if buf.len().saturating_add(chunk.len()) > limit {
        return Err(ApiError::TooLarge);
    }
    buf.extend_from_slice(&chunk);
    Ok(())
}

/// Take what of the body has already arrived, without waiting. `true` when that is the
/// whole body. Decided by the payload itself, not by the headers: an HTTP/2 request
/// sends a body without `Content-Length` or `Transfer-Encoding` (review finding,
/// 2026-12-06: such bodies, sent slowly, escaped the count of bodies on their way).
fn read_arrived(payload: &mut Payload, buf: &mut BytesMut, limit: usize) -> Result<bool, ApiError> {
    if matches!(payload, Payload::None) {
        // No body at all (HTTP/1 without a length or chunking).
        return Ok(true);
    }
    loop {
        match futures_util::FutureExt::now_or_never(payload.next()) {
            None => return Ok(false),
            Some(None) => return Ok(true),
            Some(Some(piece)) => add_piece(buf, piece, limit)?,
        }
    }
}

/// Read the rest of the body into `buf`, within `within` (408), calling `progressed`
/// as each piece arrives.
async fn read_rest(
    payload: &mut Payload,
    buf: &mut BytesMut,
    limit: usize,
    within: Duration,
    progressed: impl Fn(),
) -> Result<(), ApiError> {
    if matches!(payload, Payload::None) {
        // Nothing to read, and no read timer to arm.
        return Ok(());
    }
    let read = async {
        while let Some(piece) = payload.next().await {
            add_piece(buf, piece, limit)?;
            progressed();
        }
        Ok(())
    };
    actix_web::rt::time::timeout(within, read)
        .await
        .map_err(|_elapsed| ApiError::RequestTimeout)?
}

/// Give the request the body it was read of, for the handler's extractors.
fn put_back(req: &mut ServiceRequest, buf: BytesMut) -> Bytes {
    let bytes = buf.freeze();
    let again = bytes.clone();
    let stream = futures_util::stream::once(async move { Ok(again) });
    let boxed: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<Bytes, actix_web::error::PayloadError>>>,
    > = Box::pin(stream);
    req.set_payload(Payload::from(boxed));
    bytes
}

/// The body of a request whose MAC covers it, read before the request is verified, and
/// whether the read had to wait for it. Anyone who knows a caller's name gets this far,
/// so a body still on its way is bounded per peer and per instance
/// (`throttle::begin_body_read`: 429 for a peer at its bound; at the instance's bound a
/// place is taken from a peer holding more, else 503), and the request steps out of its
/// worker's count of requests in progress while it waits (`admission::step_out`): slow
/// bodies hold no place a verified request needs. Once the body is there the request
/// takes a place again, or is refused like any request over the limit. A body that had
/// already arrived with the request (or none at all) takes no place and waits for
/// nothing.
async fn take_unverified_body(
    ctx: &AuthContext,
    req: &mut ServiceRequest,
    peer: &Peer,
) -> Result<(Bytes, bool), ApiError> {
    let (limit, within) = (ctx.settings.body_limit, ctx.settings.body_read_timeout);
    let mut payload = take_payload(req, limit)?;
    let mut buf = BytesMut::new();
    if arrived_with_the_request(&mut payload, &mut buf, limit).await? {
        return Ok((put_back(req, buf), false));
    }
    let reading = ctx.throttle.begin_body_read(peer.ip).map_err(|r| match r {
        BodyReadRefused::Peer => ApiError::Busy {
            what: "request bodies on their way from this address",
            retry_after_secs: 1,
        },
        BodyReadRefused::All => ApiError::Overloaded("too many bodies on their way"),
    })?;
    admission::step_out(req.request());
    let arriving = std::time::Instant::now();
    tokio::select! {
        read = read_rest(&mut payload, &mut buf, limit, within, || reading.progressed()) => read?,
        () = reading.evicted() => return Err(ApiError::BodyEvicted),
    };
    drop(reading);
    crate::db::load::extend_deadline(arriving.elapsed());
    if !admission::back_in(req.request()) {
        return Err(ApiError::Overloaded("server busy"));
    }
    Ok((put_back(req, buf), true))
}

/// What one resource's guard needs, handed over when the route is registered.
pub struct Gate {
    auth: Arc<AuthContext>,
    metrics: Arc<Metrics>,
    /// This route's request series, counted by the access log (`telemetry`).
    series: Arc<RouteSeries>,
    /// `auth_outcomes_total` for an allowed request (`allow`, `ok`), per scheme in
    /// `Scheme` order, looked up on the first such request (see `RouteSeries`).
    allowed: [OnceLock<IntCounter>; 6],
    spec: RouteSpec,
    /// Whether the route reads a query string (else one is a 400 naming its first
    /// parameter, as the routes that read one refuse an unknown parameter).
    takes_query: bool,
}

impl Gate {
    pub fn new(auth: Arc<AuthContext>, metrics: Arc<Metrics>, spec: RouteSpec) -> Self {
        Gate {
            auth,
            series: Arc::new(metrics.route_series(spec.path)),
            metrics,
            allowed: Default::default(),
            spec,
            takes_query: true,
        }
    }

    /// Count an allowed request of `scheme` (`allow`, `ok`).
    fn count_allowed(&self, scheme: Scheme) {
        let i = match scheme {
            Scheme::Hmac => 0,
            Scheme::Rfc9421 => 1,
            Scheme::Webhook => 2,
            Scheme::Token => 3,
            Scheme::ApiKey => 4,
            Scheme::ClientCert => 5,
        };
        match self.allowed.get(i) {
            Some(counter) => counter
                .get_or_init(|| {
                    self.metrics
                        .auth_outcomes
                        .with_label_values(&[scheme.as_str(), "allow", "ok"])
                })
                .inc(),
            None => self.metrics.auth_outcome(scheme.as_str(), "allow", "ok"),
        }
    }

    /// The route reads no query string: a request that sends one is refused.
    #[must_use]
    pub fn taking_no_query(mut self) -> Self {
        self.takes_query = false;
        self
    }
}

/// A query string sent to a route that reads none: 400 naming its first parameter
/// (review, 2026-12-06: `?bogus=1` was ignored on most routes, refused on the others).
fn no_query(req: &ServiceRequest) -> Result<(), ApiError> {
    let query = req.query_string();
    if query.is_empty() {
        return Ok(());
    }
    let first = actix_web::web::Query::<Vec<(String, String)>>::from_query(query)
        .ok()
        .and_then(|q| q.into_inner().into_iter().next())
        .map(|(k, _)| k)
        .filter(|k| !k.is_empty())
        .map_or_else(|| "query".to_owned(), |k| k.chars().take(64).collect());
    Err(ApiError::bad_request(
        first,
        "unknown query parameter (this route takes none)",
    ))
}

/// Where a request stands with its peer's failure budget.
struct Peer {
    ip: Option<IpAddr>,
    /// Seconds still to wait when the peer is over its budget.
    blocked: Option<u64>,
}

/// A request that needs a MAC over its body from a blocked peer is refused before that
/// work once the peer's verification budget is spent.
fn spend_verification(ctx: &AuthContext, peer: &Peer) -> Result<(), ApiError> {
    match (peer.ip, peer.blocked) {
        (Some(ip), Some(wait)) if !ctx.throttle.may_verify(ip) => Err(ApiError::TooManyRequests {
            retry_after_secs: wait,
        }),
        _ => Ok(()),
    }
}

/// Authenticate. A client certificate verified in the TLS handshake (mutual TLS) is
/// checked first and must name a known, enabled caller — if it does not, the request is
/// refused whatever else it carries. Without credential headers it is the credential;
/// with them, the headers are verified as always (a bad signature is refused, never
/// downgraded to the certificate) and must name the same caller, and the header
/// scheme's principal (its scopes, a job token's one job) is the one used, with the
/// certificate's end of validity, which its later checks ([`Principal::recheck`]) cover.
async fn authenticate(
    gate: &Gate,
    req: &mut ServiceRequest,
    peer: &Peer,
    audit: &mut AuditRecord,
) -> Result<(Principal, bool), ApiError> {
    let ctx = &*gate.auth;
    let cert = req.conn_data::<PeerCertificate>().cloned();
    let (Some(identity), Some(cert)) = (&ctx.settings.client_identity, cert) else {
        let (choice, api_key) =
            scan_credentials(req.headers(), gate.spec.accepts_webhooks()).map_err(fail)?;
        return authenticate_with(gate, choice, api_key, req, peer, audit).await;
    };
    let by_cert = client_cert::verify(ctx, identity, &cert, audit).await?;
    let (choice, api_key) = match scan_credentials(req.headers(), gate.spec.accepts_webhooks()) {
        Err("missing credentials") => {
            not_from_another_site(req)?;
            return Ok((by_cert, false));
        }
        other => other.map_err(fail)?,
    };
    let (mut p, body_read) = authenticate_with(gate, choice, api_key, req, peer, audit).await?;
    if p.caller != by_cert.caller {
        return Err(fail("client certificate names another caller"));
    }
    // The certificate stays part of the credential: what outlives this request (a
    // stream, a waiting claim) checks it again with the header credential.
    p.client_cert_until = Some(cert.not_after);
    Ok((p, body_read))
}

/// A client certificate is an ambient credential: a browser that holds one presents it
/// for any page's request, a foreign page's form post included (the headers schemes are
/// not: a page cannot set them on another site's request without a preflight, which
/// fails). So a certificate alone is refused for a request a browser made for another
/// site: `Sec-Fetch-Site` other than `none` or `same-origin`, or an `Origin` other
/// than this service's own (`https://` and the `Host` header). Other clients send
/// neither header. 403, not counted as a failed attempt: the address is the victim's.
fn not_from_another_site(req: &ServiceRequest) -> Result<(), ApiError> {
    const REFUSED: ApiError =
        ApiError::Forbidden("a client certificate alone is not accepted from another site");
    let headers = req.headers();
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"none" | b"same-origin") {
            return Err(REFUSED);
        }
    }
    if let Some(origin) = headers.get(ORIGIN) {
        // HTTP/2 carries the authority in `:authority` (the URI), not in `Host`. Never
        // `X-Forwarded-Host`: whoever sends the request sets it.
        let host = headers
            .get(HOST)
            .map(HeaderValue::as_bytes)
            .or_else(|| req.uri().authority().map(|a| a.as_str().as_bytes()));
        let own =
            host.is_some_and(|host| origin.as_bytes().strip_prefix(b"https://") == Some(host));
        if !own {
            return Err(REFUSED);
        }
    }
    Ok(())
}

/// One header scheme: its cheap checks, then (for schemes that sign the body) the body
/// and the MAC. Returns whether the body was already read. `api_key` is the
/// `X-API-Key` value [`scan_credentials`] found for [`Choice::ApiKey`].
async fn authenticate_with(
    gate: &Gate,
    choice: Choice,
    api_key: Option<HeaderValue>,
    req: &mut ServiceRequest,
    peer: &Peer,
    audit: &mut AuditRecord,
) -> Result<(Principal, bool), ApiError> {
    let ctx = &*gate.auth;
    // A blocked peer's verification budget is spent after the scheme's cheap checks,
    // before the body and its MAC. Spending it before the lookups (to bound the
    // database reads that unknown names and keys cause) was tried and reverted: after
    // any cache drop a valid client behind the address then competed for the same 10
    // a second with whoever kept it blocked, and lost (review, 2026-12-06). Those
    // reads are bounded by the credential directory instead: a blocked peer's caller
    // name or key that it lacks is refused unread (`CredentialStore::surely_unknown`).
    let (principal, waited) = match choice {
        Choice::Hmac => {
            let pending = hmac::precheck(ctx, req, peer.blocked.is_some(), audit).await?;
            spend_verification(ctx, peer)?;
            let (body, waited) = take_unverified_body(ctx, req, peer).await?;
            (hmac::finish(ctx, req, pending, &body, audit).await?, waited)
        }
        Choice::HttpSig => {
            let pending = hmac::precheck_http_sig(ctx, req, peer.blocked.is_some(), audit).await?;
            spend_verification(ctx, peer)?;
            let (body, waited) = take_unverified_body(ctx, req, peer).await?;
            let p = hmac::finish_http_sig(ctx, req, pending, &body, audit).await?;
            (p, waited)
        }
        Choice::Webhook => {
            let pending = webhook::precheck(ctx, req, audit).await?;
            spend_verification(ctx, peer)?;
            let (body, waited) = take_unverified_body(ctx, req, peer).await?;
            (webhook::finish(ctx, pending, &body, audit)?, waited)
        }
        Choice::Bearer => {
            let value = super::header(req, &AUTHORIZATION).unwrap_or("");
            bearer_hints(value)?;
            let route_job = gate
                .spec
                .accepts_job_tokens()
                .then(|| req.match_info().get("id"))
                .flatten();
            let p = super::token::verify_header(ctx, value, route_job, audit).await?;
            return Ok((p, false));
        }
        Choice::ApiKey => {
            // Visible ASCII (checked by the scan), so UTF-8.
            let value = api_key
                .as_ref()
                .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
                .unwrap_or("");
            return Ok((
                api_key::verify(ctx, value, peer.blocked.is_some(), audit).await?,
                false,
            ));
        }
    };
    if waited {
        // The credential was looked up before the body; while the body was on its way
        // (up to the body-read timeout) it may have been revoked or its caller
        // disabled. Checked again as a stream checks it (review finding, 2026-12-06: a
        // webhook secret revoked mid-body still created a job).
        principal.recheck(ctx).await?;
    }
    Ok((principal, true))
}

/// Clear reasons for the two bearer mistakes people make (an empty token from a script
/// whose variable was empty, an API key in the wrong header).
fn bearer_hints(value: &str) -> Result<(), ApiError> {
    let token = value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match token {
        None if value.trim().eq_ignore_ascii_case("bearer") => Err(fail("empty bearer token")),
        Some("") => Err(fail("empty bearer token")),
        Some(t) if t.starts_with(crate::crypto::credential::API_KEY_PREFIX) => {
            Err(fail("this looks like an API key: send it in X-API-Key"))
        }
        _ => Ok(()),
    }
}

/// 401 is who-you-are, 403 is what-you-may: the scope of the route that runs, and for a
/// job token, that this route is about its own job. Anything not explicitly allowed is
/// refused.
fn authorize(p: &Principal, spec: &RouteSpec, req: &ServiceRequest) -> Result<(), ApiError> {
    match spec.access {
        Access::Open | Access::Authenticated => {}
        Access::Scope(scope) | Access::Job(scope) if p.has_scope(scope) => {}
        Access::Scope(scope) | Access::Job(scope) => {
            return Err(ApiError::Forbidden(scope.missing()))
        }
    }
    if let Some(own) = &p.job_id {
        if matches!(spec.access, Access::Authenticated) {
            return Ok(());
        }
        let id = req.match_info().get("id");
        let same = id
            .and_then(|id| crate::jobs::JobId::parse(id, "id").ok())
            .is_some_and(|id| &id == own);
        if !spec.accepts_job_tokens() {
            // Its own job's cancel or retry says so, rather than "its own job's routes"
            // (review, 2026-12-06: that read as if the job were another).
            return Err(ApiError::Forbidden(if same {
                "a job token cannot cancel or retry its job: that needs a caller credential"
            } else {
                "a job token may only be used on its own job's routes"
            }));
        }
        if !same {
            return Err(ApiError::Forbidden("this token is for another job"));
        }
    }
    if let Some(named) = req.match_info().get(webhook::SENDER_PARAM) {
        if named != p.caller {
            return Err(ApiError::Forbidden(
                "this webhook URL is for another sender",
            ));
        }
    }
    Ok(())
}

/// Everything between the socket and the handler: authenticate, authorize, read the
/// body. Failures are counted against the peer and recorded in `audit`.
async fn admit(
    gate: &Gate,
    req: &mut ServiceRequest,
    peer: &Peer,
    audit: &mut AuditRecord,
) -> Result<Principal, ApiError> {
    let ctx = &*gate.auth;
    let result = async {
        let (principal, body_read) = authenticate(gate, req, peer, audit).await?;
        authorize(&principal, &gate.spec, req)?;
        if !gate.takes_query {
            no_query(req)?;
        }
        if !body_read && take_verified_body(ctx, req).await? {
            // The same as after an unverified body that had to be waited for: the
            // credential may have been revoked while the body arrived (review,
            // 2026-12-06: an API key revoked mid-body still created a job).
            principal.recheck(ctx).await?;
        }
        Ok(principal)
    }
    .await;
    result.map_err(|e| refuse(ctx, peer, e, audit))
}

/// Record why a request is refused; failed attempts count against the peer's budget
/// (over it, 401s and 408s become 429).
fn refuse(ctx: &AuthContext, peer: &Peer, e: ApiError, audit: &mut AuditRecord) -> ApiError {
    let counts = match &e {
        // A job token whose signature holds but that was revoked or has expired is a
        // worker that lost a race with its lease, its job's end or the clock, not a
        // guess: mass lease expiries must not turn a host's workers' answers into 429s.
        ApiError::Unauthorized(f)
            if audit.scheme == Some(Scheme::Token) && matches!(f.reason, "revoked" | "expired") =>
        {
            audit.reason = Some(f.reason);
            false
        }
        ApiError::Unauthorized(f) => {
            audit.reason = Some(f.reason);
            true
        }
        ApiError::RequestTimeout => {
            audit.reason = Some("body read timeout");
            true
        }
        ApiError::Forbidden(why) => {
            audit.reason = Some(why);
            false
        }
        // `Busy` here is the peer's bound on bodies being read: throttled, as it was
        // counted before its detail was made its own.
        ApiError::TooManyRequests { .. } | ApiError::Busy { .. } => {
            audit.reason = Some("throttled");
            false
        }
        ApiError::TooLarge => {
            audit.reason = Some("body too large");
            false
        }
        ApiError::Unavailable(_) => {
            audit.reason = Some("store unavailable");
            false
        }
        ApiError::Overloaded(why) => {
            audit.reason = Some(why);
            false
        }
        _ => {
            audit.reason = Some("request refused");
            false
        }
    };
    if !counts {
        return e;
    }
    let reason = audit.reason.unwrap_or("");
    log::warn!("authentication failed: {reason}");
    let now_blocked = peer.ip.and_then(|ip| ctx.throttle.record_failure(ip));
    match peer.blocked.or(now_blocked) {
        Some(wait) if !matches!(e, ApiError::RequestTimeout) => ApiError::TooManyRequests {
            retry_after_secs: wait,
        },
        _ => e,
    }
}

/// The guard of one resource (see the module docs). Use through `Gate`.
pub async fn guard<B: MessageBody>(
    gate: Arc<Gate>,
    mut req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, Error> {
    req.extensions_mut()
        .insert(MatchedRoute(gate.series.clone()));
    if gate.spec.access == Access::Open {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    let started = Instant::now();
    let ip = req.peer_addr().map(|a| a.ip());
    let peer = Peer {
        ip,
        blocked: ip.and_then(|ip| gate.auth.throttle.blocked_for(ip)),
    };
    let mut audit = AuditRecord::default();
    // Boxed: authentication's future (about 3.7 KB, most of it a job token's checks)
    // would otherwise make this one about 4.3 KB, which actix's resource doubles into an
    // 8.6 KB allocation that every request to the route copies, open ones included
    // (`bench/instructions.sh`: about 8 k instructions per request under callgrind).
    let res = match Box::pin(admit(&gate, &mut req, &peer, &mut audit)).await {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            let deferred = req.extensions_mut().remove::<Arc<Deferred>>();
            let called = match &deferred {
                Some(d) => d.scope(next.call(req)).await,
                None => next.call(req).await,
            };
            // A deferred replay record decides last, whatever the handler did: a
            // replay (or a record that could not be written) replaces its answer.
            let verdict = match &deferred {
                Some(d) => settle_replay(&gate.auth, d).await,
                None => Ok(()),
            };
            let res = called?;
            // A record that could not be written because the request's own write was
            // refused (overload, outage): the handler's 5xx already says so.
            let verdict = match verdict {
                Err(ApiError::Unavailable(_) | ApiError::Overloaded(_))
                    if res.status().is_server_error() =>
                {
                    Ok(())
                }
                v => v,
            };
            if let Err(e) = verdict {
                let e = refuse(&gate.auth, &peer, e, &mut audit);
                let (req, _) = res.into_parts();
                let res = ServiceResponse::new(req, e.error_response());
                return Ok(finish(
                    &gate,
                    &audit,
                    res.map_into_right_body(),
                    ip,
                    started,
                ));
            }
            // A handler's own refusal (a job token on another job) is the outcome.
            let handler_error = res
                .response()
                .error()
                .and_then(|e| e.as_error::<ApiError>());
            if let Some(ApiError::Forbidden(why)) = handler_error {
                audit.reason = Some(why);
            }
            res.map_into_left_body()
        }
        Err(e) => {
            // A signature that verified is used even when the request is then refused
            // (scope, query, a credential gone mid-body), as one the handler refuses
            // is: a captured request must not run later, once it would be let through.
            // A replay of it gets the 401; a record that could not be written leaves
            // the refusal as it was.
            let deferred = req.extensions_mut().remove::<Arc<Deferred>>();
            let e = match &deferred {
                Some(d) => match settle_replay(&gate.auth, d).await {
                    Err(replayed @ ApiError::Unauthorized(_)) => {
                        refuse(&gate.auth, &peer, replayed, &mut audit)
                    }
                    _ => e,
                },
                None => e,
            };
            req.into_response(e.error_response()).map_into_right_body()
        }
    };
    Ok(finish(&gate, &audit, res, ip, started))
}

/// The verdict of a deferred replay record, after the handler (`db::replay::Deferred`).
async fn settle_replay(ctx: &AuthContext, deferred: &Deferred) -> Result<(), ApiError> {
    if ctx.replays.settle(deferred).await? {
        Ok(())
    } else {
        Err(fail("replayed request"))
    }
}

/// Count the outcome and write the audit line.
fn finish<B>(
    gate: &Gate,
    audit: &AuditRecord,
    res: ServiceResponse<B>,
    ip: Option<IpAddr>,
    started: Instant,
) -> ServiceResponse<B> {
    let status = res.status().as_u16();
    match (audit.scheme, audit.reason) {
        (Some(scheme), None) => gate.count_allowed(scheme),
        (scheme, reason) => gate.metrics.auth_outcome(
            scheme.map_or("none", |s| s.as_str()),
            if reason.is_some() { "deny" } else { "allow" },
            reason.unwrap_or("ok"),
        ),
    }
    {
        let extensions = res.request().extensions();
        AuditLine {
            record: audit,
            method: res.request().method().as_str(),
            route: gate.spec.path,
            peer: ip,
            status,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            request_id: extensions.get::<RequestId>().map(|r| r.0.as_str()),
        }
        .write();
    }
    res.request().extensions_mut().insert(LineWritten);
    // An authenticated answer is for its caller alone: no shared cache may keep it
    // (`X-API-Key` is not `Authorization`, which caches already treat so).
    let mut res = res;
    let headers = res.headers_mut();
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::names;

    fn payload(
        s: impl futures_util::Stream<Item = Result<Bytes, actix_web::error::PayloadError>> + 'static,
    ) -> Payload {
        let boxed: std::pin::Pin<
            Box<dyn futures_util::Stream<Item = Result<Bytes, actix_web::error::PayloadError>>>,
        > = Box::pin(s);
        Payload::from(boxed)
    }

    /// Whether a body is still on its way is asked of the payload, not of the headers:
    /// an HTTP/2 body needs neither `Content-Length` nor `Transfer-Encoding`, and such
    /// bodies sent slowly escaped the count of bodies on their way (review finding,
    /// 2026-12-06). The payloads here carry no headers at all.
    #[test]
    fn a_body_on_its_way_is_seen_without_length_headers() {
        use futures_util::stream::{iter, pending, StreamExt as _};
        let piece = |b: &'static str| Ok(Bytes::from_static(b.as_bytes()));
        // One piece there, more to come: not all arrived, and what came is kept.
        let mut p = payload(iter([piece("{\"a\":")]).chain(pending()));
        let mut buf = BytesMut::new();
        assert!(!read_arrived(&mut p, &mut buf, 100).expect("within the limit"));
        assert_eq!(&buf[..], b"{\"a\":");
        // Nothing yet at all: on its way.
        let mut p = payload(pending());
        assert!(!read_arrived(&mut p, &mut BytesMut::new(), 100).expect("nothing read"));
        // The whole body came with the request, or none: nothing to wait for.
        let mut p = payload(iter([piece("{\"a\":"), piece("1}")]));
        let mut buf = BytesMut::new();
        assert!(read_arrived(&mut p, &mut buf, 100).expect("within the limit"));
        assert_eq!(&buf[..], b"{\"a\":1}");
        assert!(read_arrived(&mut payload(iter([])), &mut BytesMut::new(), 100).expect("empty"));
        assert!(read_arrived(&mut Payload::None, &mut BytesMut::new(), 100).expect("none"));
        // Past the limit before any wait: 413.
        let mut p = payload(iter([piece("0123456789")]).chain(pending()));
        assert!(matches!(
            read_arrived(&mut p, &mut BytesMut::new(), 5),
            Err(ApiError::TooLarge)
        ));
    }

    fn headers(names: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for n in names {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_static("x"),
            );
        }
        h
    }

    #[test]
    fn scheme_order() {
        use Choice::*;
        let c = |n: &[&str], wh: bool| choose_scheme(&headers(n), wh);
        assert_eq!(c(&["x-coordinator-signature"], false), Ok(Hmac));
        // No fallback once any signature header is present.
        assert_eq!(c(&["x-coordinator-caller", "x-api-key"], false), Ok(Hmac));
        assert_eq!(
            c(&["x-coordinator-timestamp", "authorization"], false),
            Ok(Hmac)
        );
        assert_eq!(c(&["webhook-signature"], true), Ok(Webhook));
        assert!(c(&["webhook-signature"], false).is_err());
        assert_eq!(c(&["authorization"], false), Ok(Bearer));
        assert_eq!(c(&["X-API-KEY"], false), Ok(ApiKey));
        assert!(c(&["authorization", "x-api-key"], false).is_err());
        assert!(c(&["webhook-id", "x-api-key"], true).is_err());
        assert_eq!(c(&[], false), Err("missing credentials"));
        assert_eq!(c(&["signature-input"], false), Ok(HttpSig));
        assert_eq!(c(&["signature", "signature-input"], true), Ok(HttpSig));
        assert!(c(&["signature", "x-coordinator-caller"], false).is_err());
        assert!(c(&["signature-input", "x-api-key"], false).is_err());
        assert!(c(&["signature", "authorization"], false).is_err());
    }

    #[test]
    fn credential_bits_follow_the_header_table() {
        for (i, name) in CREDENTIAL_HEADERS.iter().enumerate() {
            assert_eq!(credential_index(name), u32::try_from(i).ok(), "{name}");
        }
        let bit_of = |n: &HeaderName| credential_index(n).map(|i| 1u16 << i);
        assert_eq!(bit_of(&names::SIGNATURE), Some(bit::SIGNATURE));
        assert_eq!(bit_of(&names::SIGNATURE_INPUT), Some(bit::SIGNATURE_INPUT));
        assert_eq!(bit_of(&names::HMAC_CALLER), Some(bit::HMAC_CALLER));
        assert_eq!(bit_of(&names::HMAC_TIMESTAMP), Some(bit::HMAC_TIMESTAMP));
        assert_eq!(bit_of(&names::HMAC_SIGNATURE), Some(bit::HMAC_SIGNATURE));
        assert_eq!(bit_of(&names::WEBHOOK_ID), Some(bit::WEBHOOK_ID));
        assert_eq!(
            bit_of(&names::WEBHOOK_TIMESTAMP),
            Some(bit::WEBHOOK_TIMESTAMP)
        );
        assert_eq!(
            bit_of(&names::WEBHOOK_SIGNATURE),
            Some(bit::WEBHOOK_SIGNATURE)
        );
        assert_eq!(bit_of(&AUTHORIZATION), Some(bit::AUTHORIZATION));
        assert_eq!(bit_of(&names::API_KEY), Some(bit::API_KEY));
        assert_eq!(credential_index(&actix_web::http::header::HOST), None);
        assert_eq!(credential_index(&names::CONTENT_DIGEST), None);
    }

    #[test]
    fn the_api_key_value_comes_with_its_choice() {
        let mut h = HeaderMap::new();
        h.insert(names::API_KEY.clone(), HeaderValue::from_static("cok_x"));
        let (choice, value) = scan_credentials(&h, false).expect("scan");
        assert_eq!(choice, Choice::ApiKey);
        assert_eq!(
            value.as_ref().map(HeaderValue::as_bytes),
            Some(&b"cok_x"[..])
        );
        h.insert(names::HMAC_CALLER.clone(), HeaderValue::from_static("c"));
        assert_eq!(
            scan_credentials(&h, false).map(|(c, v)| (c, v.is_none())),
            Ok((Choice::Hmac, true))
        );
    }

    #[test]
    fn duplicate_and_non_ascii_credential_headers_are_refused() {
        for name in CREDENTIAL_HEADERS {
            let mut h = HeaderMap::new();
            let n = (*name).clone();
            h.append(n.clone(), HeaderValue::from_static("a"));
            h.append(n.clone(), HeaderValue::from_static("b"));
            assert_eq!(choose_scheme(&h, true), Err("duplicate header"), "{name}");
            let mut h = HeaderMap::new();
            h.insert(n, HeaderValue::from_bytes(b"caf\xc3\xa9").expect("value"));
            assert_eq!(choose_scheme(&h, true), Err("malformed header"), "{name}");
        }
    }

    #[test]
    fn bearer_mistakes_get_clear_reasons() {
        let reason = |v: &str| match bearer_hints(v) {
            Err(ApiError::Unauthorized(f)) => Some(f.reason),
            _ => None,
        };
        assert_eq!(reason("Bearer "), Some("empty bearer token"));
        assert_eq!(reason("Bearer"), Some("empty bearer token"));
        assert_eq!(
            reason("Bearer cok_abc"),
            Some("this looks like an API key: send it in X-API-Key")
        );
        assert_eq!(reason("Bearer eyJ0eXAi"), None);
    }
}
