//! The request path, top to bottom (docs/spec.md §4–§5). Each downstream request goes through
//! these phases, one function each, sharing one per-request context ([`Ctx`]):
//!
//! 1. [`Proxy::route`]: refuse transfer codings other than `chunked` and `Content-Length` with
//!    `Transfer-Encoding`, `CONNECT` and `TRACE`, paths with dot segments in any spelling, and
//!    cross-site web pages; then pick the route (dedicated port, else host and longest path
//!    prefix), answering only hosts that are local or named by a host route (exact or wildcard).
//!    Nothing is forwarded without a route. Last, the request's target ([`targets`]): the token
//!    key it chooses with `token-sidecar-audience`/`-scope` within the route's allow-lists, and
//!    a wildcard route's `{host}`/`{label}`; refused (403/400) before anything is fetched.
//! 2. [`upstream_request`]: rewrite the URI onto the upstream (a wildcard route's filled for
//!    this host), drop hop-by-hop headers and the per-request target headers, set `Host` to the
//!    upstream's authority. [`prepare_body`] buffers a body of known size up to
//!    `retry_body_limit` so the request can be replayed once; anything larger or of unknown size
//!    streams through untouched. Either way the body runs under `body_read_timeout`
//!    ([`body`]): a stalled one ends the request with 408.
//! 3. [`token`]: take the route's cached token (a fixed route: its slot, no lookup; a chosen
//!    key: the route client's slot for it), only now that a buffered body is in, so a slow
//!    body never holds a token past its usable life; wait for the refresher only when none is
//!    usable. No token, no forwarding.
//! 4. [`send_with_replay`]: set `Authorization` and send it on the route's pooled client,
//!    bounded by the route's `timeout` until response headers arrive. If the upstream answers
//!    401 with a Bearer `invalid_token` challenge (any 401 with `retry_on_401`), the token is
//!    evicted when the slot's eviction gate is open, and a buffered request is replayed once
//!    with a fresh token; otherwise the 401 goes back unchanged. A response below 400 tells the
//!    slot the token works (which resets the gate after an eviction).
//! 5. [`response`]: drop hop-by-hop headers and an upstream's `token-sidecar-error`, and
//!    stream the upstream's answer back otherwise unchanged.
//! 6. [`Proxy::log`]: the route's metrics and one access-log event.
//!
//! Any failure leaves through [`respond::error_response`], the one place errors become
//! responses. The phase functions are public so the benchmarks measure exactly these.

pub(crate) mod body;
pub(crate) mod headers;
#[cfg(test)]
mod props;
pub(crate) mod respond;
pub(crate) mod routes;
pub(crate) mod targets;
pub(crate) mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST};
use http::request::Parts;
use http::uri::Authority;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use self::body::{BodyError, DeadlineBody};
use self::headers::{
    FramingConflict, cross_site, is_invalid_token_challenge, strip_hop_by_hop,
    transfer_encoding_is_plain_chunked,
};
use self::respond::{ERROR_HEADER, ProxyError, TokenFailure, error_response};
use self::routes::{HostSource, Miss, RequestHost, Route, RouteTable, check_path};
use self::targets::TargetError;
use self::upstream::{UpstreamBody, UpstreamResponseBody};
use crate::config::wildcard::Fill;
use crate::metrics::RouteMetrics;
use crate::token::TokenKey;
use crate::token::cache::{Lease, Rejection, Slot};
use crate::util::error_chain;

/// What the proxy answers with: the upstream's streamed body, or a small body of its own.
pub(crate) type ProxyBody = Either<UpstreamResponseBody, Full<Bytes>>;

/// Which listener a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Main,
    /// A route's own `listen` port; the index is into the route table.
    Dedicated(usize),
}

/// The routes (each with its upstream pool and token slot); shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    pub(crate) table: RouteTable,
    /// Bodies up to this size are kept for one replay after a 401.
    pub(crate) retry_body_limit: usize,
    /// A request body without progress for this long ends the request (408).
    pub(crate) body_read_timeout: Duration,
    /// Whether to emit one access-log event per request.
    pub(crate) access_log: bool,
    /// Metrics for requests that matched no route.
    pub(crate) unmatched: RouteMetrics,
    /// Every OAuth client and its token slots (fixed and run-time).
    pub(crate) clients: Arc<crate::token::registry::Clients>,
}

/// What the phases learn about one request, for the last phase to log.
#[derive(Debug)]
pub struct Ctx<'a> {
    started: Instant,
    route: Option<&'a Route>,
    /// Whether the token came straight from the cache; `None` before the token phase.
    token_cached: Option<bool>,
    replayed: bool,
    /// Copies the access log needs after the request is handed on; `None` when it is off.
    access: Option<AccessFields>,
    /// A wildcard route's upstream authority and `Host` for this request (phase 1 → 2).
    upstream: Option<(Authority, HeaderValue)>,
    /// The token key this request chose (headers, templates), when not the route's fixed one
    /// (phase 1 → 3).
    key: Option<TokenKey>,
    /// The run-time slot phase 3 took for `key` (phase 3 → 4: evictions go to it).
    slot: Option<Arc<Slot>>,
}

/// What the access log needs from the request itself.
#[derive(Debug)]
struct AccessFields {
    method: Method,
    path: String,
    host: Option<String>,
}

impl<'a> Ctx<'a> {
    /// Starts the clock. The field copies are made only when the access log is on.
    pub fn new<B>(req: &Request<B>, access_log: bool) -> Ctx<'a> {
        Ctx {
            started: Instant::now(),
            route: None,
            token_cached: None,
            replayed: false,
            upstream: None,
            key: None,
            slot: None,
            access: access_log.then(|| AccessFields {
                method: req.method().clone(),
                path: req.uri().path().to_owned(),
                // Filled in by phase 1, which reads the host anyway.
                host: None,
            }),
        }
    }
}

/// The host a request names and how (docs/spec.md §4): an HTTP/1 absolute-form target
/// (`HTTP_PROXY` clients) or HTTP/2 `:authority` first, else the `Host` header. A `Host` header
/// that is not visible ASCII, or more than one, is refused: either could make two readers
/// disagree about the host (RFC 9112 §3.2 asks for 400).
fn request_host<B>(req: &Request<B>) -> Result<RequestHost<'_>, ProxyError> {
    if let Some(a) = req.uri().authority() {
        let source = if req.version() == Version::HTTP_2 {
            HostSource::Authority
        } else {
            HostSource::AbsoluteForm
        };
        return Ok(RequestHost {
            value: Some(a.as_str()),
            source,
        });
    }
    let mut lines = req.headers().get_all(HOST).iter();
    let Some(value) = lines.next() else {
        return Ok(RequestHost {
            value: None,
            source: HostSource::Absent,
        });
    };
    if lines.next().is_some() {
        return Err(ProxyError::BadRequest(
            "the request has more than one Host header",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| ProxyError::BadRequest("the Host header is not valid"))?;
    Ok(RequestHost {
        // `Host:` with an empty value (allowed for targets without an authority) names nothing.
        value: Some(value).filter(|v| !v.trim().is_empty()),
        source: HostSource::Header,
    })
}

impl Proxy {
    /// Serves one downstream request. Never fails: errors become docs/spec.md §5 responses.
    pub(crate) async fn handle(
        self: Arc<Self>,
        listener: Listener,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let mut ctx = Ctx::new(&req, self.access_log);
        let resp = match self.serve(listener, req, &mut ctx).await {
            Ok(resp) => resp,
            Err(e) => {
                if let Some(route) = ctx.route {
                    if matches!(e, ProxyError::UpstreamUnavailable(_)) {
                        route.metrics.upstream_error();
                    }
                    tracing::warn!(route = %route.name, error = %e, "request failed");
                }
                error_response::<Full<Bytes>>(&e, ctx.route.map(|r| &*r.name)).map(Either::Right)
            }
        };
        self.log(&ctx, resp.status());
        resp
    }

    /// Phases 1–5 in order; the first failure ends the request.
    async fn serve<'a>(
        &'a self,
        listener: Listener,
        req: Request<Incoming>,
        ctx: &mut Ctx<'a>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let route = self.route(listener, &req, ctx)?;
        let (mut parts, body) = req.into_parts();
        upstream_request(route, &mut parts, ctx)?;
        let body = DeadlineBody::new(body, self.body_read_timeout);
        let (body, kept) = prepare_body(body, self.retry_body_limit).await?;
        let lease = token(route, ctx).await?;
        let resp = send_with_replay(route, parts, body, kept, lease, ctx).await?;
        Ok(response(resp))
    }

    /// Phase 1: the route for a request, or why there is none. Checks, in order, on every
    /// listener: body framing, the Host header's form, the method (`CONNECT`, `TRACE`), the
    /// path, cross-site web pages; then the route (docs/spec.md §4, §5), and last the target
    /// the request chooses (per-request headers, a wildcard route's templates): refused here,
    /// before any body is read or any token fetched.
    pub fn route<'a, B>(
        &'a self,
        listener: Listener,
        req: &Request<B>,
        ctx: &mut Ctx<'a>,
    ) -> Result<&'a Route, ProxyError> {
        let host = request_host(req);
        if let (Some(access), Ok(h)) = (&mut ctx.access, &host) {
            access.host = h.value.map(str::to_owned);
        }
        // Framing first: its refusal is the one that must close the connection, whatever else
        // is wrong with the request.
        if req.extensions().get::<FramingConflict>().is_some() {
            return Err(ProxyError::BadFraming(
                "Content-Length together with Transfer-Encoding is refused",
            ));
        }
        if !transfer_encoding_is_plain_chunked(req.headers()) {
            return Err(ProxyError::BadFraming(
                "Transfer-Encoding other than exactly \"chunked\" is not supported",
            ));
        }
        let host = host?;
        if req.method() == Method::CONNECT || req.method() == Method::TRACE {
            // TRACE would have an echoing upstream reflect the bearer token to the caller.
            return Err(ProxyError::MethodNotAllowed(req.method().to_string()));
        }
        check_path(req.uri().path()).map_err(ProxyError::BadRequest)?;
        if let Some(why) = cross_site(req.headers(), host.value, &self.table.local) {
            return Err(ProxyError::Forbidden(why));
        }
        let dedicated = match listener {
            Listener::Dedicated(i) => Some(i),
            Listener::Main => None,
        };
        let i = self
            .table
            .resolve(dedicated, host, req.uri().path())
            .map_err(|miss| match miss {
                Miss::NoRoute => ProxyError::NoRoute,
                Miss::Misdirected => ProxyError::Misdirected,
            })?;
        let route = &self.table.routes[i];
        ctx.route = Some(route);
        choose_target(route, host.value, req.headers(), ctx)?;
        Ok(route)
    }

    /// Phase 6: the route's (or the unmatched) metrics, and one access-log event when enabled.
    pub fn log(&self, ctx: &Ctx<'_>, status: StatusCode) {
        let took = ctx.started.elapsed();
        let status = status.as_u16();
        ctx.route
            .map_or(&self.unmatched, |r| &r.metrics)
            .request(status, took);
        if let Some(f) = &ctx.access {
            tracing::info!(
                target: "token_sidecar::access",
                method = %f.method,
                route = ctx.route.map_or("-", |r| &*r.name),
                host = f.host.as_deref().unwrap_or("-"),
                path = %f.path,
                status,
                // Whole microseconds: `1.284`, not `1.2839189999999998`.
                duration_ms = took.as_micros() as f64 / 1000.0,
                token = match ctx.token_cached {
                    Some(true) => "cached",
                    Some(false) => "fetched",
                    None => "-",
                },
                replayed = ctx.replayed,
                "request"
            );
        }
    }
}

/// Phase 1, the target: on a fixed route (no allow-lists, no wildcard) only a check that the
/// request names none; otherwise the key the request chose and, on a wildcard route with a
/// templated upstream, the upstream's authority for this host.
fn choose_target(
    route: &Route,
    host: Option<&str>,
    headers: &http::HeaderMap,
    ctx: &mut Ctx<'_>,
) -> Result<(), ProxyError> {
    let Some(t) = &route.targets else {
        return match targets::has_target_headers(headers) {
            true => Err(ProxyError::TargetNotAllowed(
                "this route takes no token-sidecar-audience or token-sidecar-scope header",
            )),
            false => Ok(()),
        };
    };
    let fill = routes::wildcard_fill(route, host);
    if route.wildcard.is_some() && fill.is_none() {
        // Routing chose the route for this host, so it matches; kept as a guard.
        return Err(ProxyError::NoRoute);
    }
    let fill = fill.as_ref().map(|(name, label_len)| Fill {
        host: name,
        label: &name[..*label_len],
    });
    ctx.key = targets::choose_key(t, headers, fill).map_err(|e| match e {
        TargetError::BadRequest(why) => ProxyError::BadRequest(why),
        TargetError::NotAllowed(why) => ProxyError::TargetNotAllowed(why),
    })?;
    ctx.upstream = match (fill, &route.upstream_template) {
        (Some(fill), Some(template)) => {
            let text = template.render(fill);
            // A DNS name in a validated authority template: always parses; refused otherwise.
            let bad =
                || ProxyError::BadRequest("the request host cannot be mapped onto the upstream");
            let authority = Authority::try_from(text.as_str()).map_err(|_| bad())?;
            let host = HeaderValue::from_str(&text).map_err(|_| bad())?;
            Some((authority, host))
        }
        // A fixed upstream behind a wildcard (a gateway routing by name) is sent the name.
        (Some(fill), None) => Some((
            route.upstream_authority.clone(),
            HeaderValue::from_str(fill.host).map_err(|_| {
                ProxyError::BadRequest("the request host cannot be mapped onto the upstream")
            })?,
        )),
        (None, _) => None,
    };
    Ok(())
}

/// Phase 3: the token, straight from the cache when one is usable: the route's fixed slot, or
/// for a key the request chose, its client's slot for that key.
pub async fn token(route: &Route, ctx: &mut Ctx<'_>) -> Result<Lease, ProxyError> {
    let lease = match (ctx.key.take(), &route.slot) {
        (None, Some(slot)) => slot.token().await,
        (Some(key), _) => {
            let slot = route.client.slot(key);
            ctx.slot = Some(slot.clone());
            slot.token().await
        }
        (None, None) => {
            // Templated routes always choose a key in phase 1.
            return Err(ProxyError::BadRequest("no token key for this request"));
        }
    }
    .map_err(token_failure)?;
    ctx.token_cached = Some(lease.cached);
    Ok(lease)
}

fn token_failure(e: crate::token::cache::TokenError) -> ProxyError {
    ProxyError::Token(TokenFailure(e))
}

/// Phase 2: turns the downstream request head into the upstream's: URI onto the upstream's base
/// path, HTTP/1.1 (the pooled client speaks HTTP/2 to the upstream when ALPN says so, whatever
/// the downstream used), hop-by-hop headers and the per-request target headers dropped, `Host`
/// set to the upstream's authority (a wildcard route's: the one phase 1 chose for this host).
pub fn upstream_request(route: &Route, parts: &mut Parts, ctx: &Ctx<'_>) -> Result<(), ProxyError> {
    let (authority, host) = match &ctx.upstream {
        Some((a, h)) => (a.clone(), h.clone()),
        None => (
            route.upstream_authority.clone(),
            route.upstream_host.clone(),
        ),
    };
    parts.uri = route
        .upstream_uri_at(authority, parts.uri.path_and_query())
        .map_err(|_| {
            ProxyError::BadRequest("the request target cannot be mapped onto the upstream")
        })?;
    parts.version = Version::HTTP_11;
    // The target headers on every route: the choice is the sidecar's business, never the
    // upstream's.
    strip_hop_by_hop(
        &mut parts.headers,
        &[targets::AUDIENCE_HEADER, targets::SCOPE_HEADER],
    );
    parts.headers.insert(HOST, host);
    Ok(())
}

/// Phase 2, the body: a body of known size up to `limit` is read into memory and also returned
/// for a replay; anything else streams. Both under the body's progress deadline.
pub(crate) async fn prepare_body(
    body: DeadlineBody<Incoming>,
    limit: usize,
) -> Result<(UpstreamBody, Option<Bytes>), ProxyError> {
    match body.size_hint().exact() {
        Some(0) => Ok((Either::Right(Full::new(Bytes::new())), Some(Bytes::new()))),
        Some(n) if n <= limit as u64 => {
            let bytes = body::read_to_bytes(body, limit)
                .await
                .map_err(|e| match e {
                    BodyError::Stalled(d) => ProxyError::RequestTimeout(d),
                    BodyError::TooLarge | BodyError::Read(_) => {
                        ProxyError::BadRequest("the request body could not be read")
                    }
                })?;
            Ok((Either::Right(Full::new(bytes.clone())), Some(bytes)))
        }
        _ => Ok((Either::Left(body), None)),
    }
}

/// Phase 4: sends the request with the lease's token; on a rejected-token 401 evicts the token
/// (if the slot's eviction gate allows) and, when the body was kept (`kept`), replays once with
/// a fresh one. While the gate holds a rejected token, the 401 goes back without a replay: the
/// replay would carry the same token.
pub(crate) async fn send_with_replay(
    route: &Route,
    parts: Parts,
    body: UpstreamBody,
    kept: Option<Bytes>,
    lease: Lease,
    ctx: &mut Ctx<'_>,
) -> Result<Response<UpstreamResponseBody>, ProxyError> {
    // Only a request that can be replayed needs its head kept.
    let replay = kept.map(|bytes| (clone_parts(&parts), bytes));
    // The slot phase 3 took the token from: a request's own key's, else the route's.
    let runtime = ctx.slot.clone();
    let Some(slot) = runtime.as_deref().or(route.slot.as_deref()) else {
        return Err(ProxyError::BadRequest("no token key for this request"));
    };
    let resp = send(route, parts, body, &lease).await?;
    let rejected = resp.status() == StatusCode::UNAUTHORIZED
        && (route.retry_on_401 || is_invalid_token_challenge(resp.headers()));
    if !rejected {
        token_worked(slot, &resp, &lease);
        return Ok(resp);
    }
    match slot.reject(&lease.token) {
        Rejection::Held => return Ok(resp),
        Rejection::Evicted => route.metrics.eviction(),
        Rejection::Stale => {}
    }
    let Some((parts, bytes)) = replay else {
        return Ok(resp);
    };
    tracing::info!(route = %route.name, "upstream rejected the token; replaying once with a fresh one");
    drop(resp);
    let fresh = slot.token().await.map_err(token_failure)?;
    ctx.replayed = true;
    let resp = send(route, parts, Either::Right(Full::new(bytes)), &fresh).await?;
    token_worked(slot, &resp, &fresh);
    Ok(resp)
}

/// A response below 400 means the upstream took the token: after an eviction that ends the
/// streak of rejected tokens (docs/spec.md §3). One atomic load when no eviction is pending.
fn token_worked<B>(slot: &Slot, resp: &Response<B>, lease: &Lease) {
    if resp.status().as_u16() < 400 {
        slot.accepted(&lease.token);
    }
}

/// One exchange with the upstream, bounded by the route's timeout.
async fn send(
    route: &Route,
    mut parts: Parts,
    body: UpstreamBody,
    lease: &Lease,
) -> Result<Response<UpstreamResponseBody>, ProxyError> {
    authorize(&mut parts, lease);
    let upstream = &route.upstream;
    let req = Request::from_parts(parts, body);
    match tokio::time::timeout(upstream.timeout, upstream.send(req)).await {
        Err(_) => Err(ProxyError::UpstreamTimeout(upstream.timeout)),
        // A streamed body that stalled reaches us as the upstream exchange's body error (its
        // cause is our `BodyError::Stalled`); the upstream request has been aborted with it.
        Ok(Err(e)) if let Some(d) = e.request_body_stalled() => Err(ProxyError::RequestTimeout(d)),
        Ok(Err(e)) if e.request_body_failed() => Err(ProxyError::BadRequest(
            "the request body could not be read (malformed or cut off)",
        )),
        Ok(Err(e)) => Err(ProxyError::UpstreamUnavailable(error_chain(&e))),
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// Replaces whatever `Authorization` the application sent with the lease's token.
pub fn authorize(parts: &mut Parts, lease: &Lease) {
    parts
        .headers
        .insert(AUTHORIZATION, lease.token.token.authorization().clone());
}

/// Phase 5: the upstream's answer without its hop-by-hop headers, body streamed. An upstream's
/// `token-sidecar-error` header is removed too: the application must be able to trust that
/// header to mean the sidecar itself refused or failed the request (docs/spec.md §5).
pub(crate) fn response(mut resp: Response<UpstreamResponseBody>) -> Response<ProxyBody> {
    strip_hop_by_hop(resp.headers_mut(), &[ERROR_HEADER]);
    resp.map(Either::Left)
}

fn clone_parts(p: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req.into_parts().0
}
