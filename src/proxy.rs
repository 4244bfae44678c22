//! The request path, top to bottom. Each downstream request goes through these phases:
//!
//! 1. **route**: pick the route (dedicated port, else host and longest path prefix); refuse
//!    `CONNECT` and paths with dot segments. Nothing is forwarded without a route.
//! 2. **token**: take the route's cached token; wait for the refresher only when none is usable.
//!    No token, no forwarding.
//! 3. **upstream request**: rewrite the URI onto the upstream, drop hop-by-hop headers, set
//!    `Host` to the upstream's authority and replace `Authorization` with the token. A body of
//!    known size up to `retry_body_limit` is buffered so the request can be replayed once;
//!    anything larger or of unknown size streams through untouched.
//! 4. **forward**: send it on the route's pooled client, bounded by the route's `timeout` until
//!    response headers arrive. If the upstream answers 401 with a Bearer `invalid_token`
//!    challenge (any 401 with `retry_on_401`), the token is evicted and a buffered request is
//!    replayed once with a fresh token; otherwise the 401 goes back unchanged.
//! 5. **response**: drop hop-by-hop headers and stream the upstream's answer back unchanged.
//! 6. **logging**: one access-log event and the route's metrics.
//!
//! Any failure leaves through [`crate::respond::error_response`].

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CONNECTION, HOST, HeaderName, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE, WWW_AUTHENTICATE,
};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;

use crate::cache::Lease;
use crate::metrics::RouteMetrics;
use crate::respond::{ProxyError, TokenFailure, error_response};
use crate::routes::{Route, RouteTable, check_path};
use crate::token_client::error_chain;
use crate::upstream::{Upstream, UpstreamBody};

/// What the proxy answers with: the upstream's streamed body, or a small body of its own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Which listener a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Main,
    /// A route's own `listen` port; the index is into the route table.
    Dedicated(usize),
}

/// The routes and their upstream clients; shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    pub table: RouteTable,
    /// Parallel to `table.routes`.
    pub upstreams: Vec<Upstream>,
    /// Bodies up to this size are kept for one replay after a 401.
    pub retry_body_limit: usize,
    /// Whether to emit one access-log event per request.
    pub access_log: bool,
    /// Metrics for requests that matched no route.
    pub unmatched: RouteMetrics,
}

/// What the access log needs from the request itself.
struct AccessFields {
    method: Method,
    path: String,
    host: Option<String>,
}

/// The host a request names: an absolute-form target (HTTP_PROXY clients) or HTTP/2
/// `:authority` first, else the Host header.
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req.headers().get(HOST).and_then(|h| h.to_str().ok()),
    }
}

/// What the access log says about how a request was served.
struct Served {
    route: Option<usize>,
    token_cached: Option<bool>,
    replayed: bool,
}

impl Proxy {
    /// Serves one downstream request. Never fails: errors become SPEC §5 responses.
    pub async fn handle(
        self: Arc<Self>,
        listener: Listener,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let host = request_host(&req);
        let route = self.route(listener, host, &req);
        // Only the access log needs these after the request is handed on; skip the copies
        // when it is off.
        let logged = self.access_log.then(|| AccessFields {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            host: host.map(str::to_owned),
        });
        let mut served = Served {
            route: None,
            token_cached: None,
            replayed: false,
        };

        let resp = match route {
            Err(e) => error_response::<Full<Bytes>>(&e, None).map(Either::Right),
            Ok(idx) => {
                served.route = Some(idx);
                let route = &self.table.routes[idx];
                match self.forward(idx, route, req, &mut served).await {
                    Ok(resp) => resp,
                    Err(e) => {
                        if matches!(e, ProxyError::UpstreamUnavailable(_)) {
                            route.metrics.upstream_error();
                        }
                        tracing::warn!(route = %route.name, error = %e, "request failed");
                        error_response::<Full<Bytes>>(&e, Some(&route.name)).map(Either::Right)
                    }
                }
            }
        };

        // Phase 6: logging.
        let took = started.elapsed();
        let status = resp.status().as_u16();
        let route = served.route.map(|i| &self.table.routes[i]);
        route
            .map_or(&self.unmatched, |r| &r.metrics)
            .request(status, took);
        if let Some(f) = logged {
            tracing::info!(
                target: "token_sidecar::access",
                method = %f.method,
                route = route.map_or("-", |r| &*r.name),
                host = f.host.as_deref().unwrap_or("-"),
                path = %f.path,
                status,
                duration_ms = took.as_secs_f64() * 1000.0,
                token = match served.token_cached {
                    Some(true) => "cached",
                    Some(false) => "fetched",
                    None => "-",
                },
                replayed = served.replayed,
                "request"
            );
        }
        resp
    }

    /// Phase 1: route.
    fn route(
        &self,
        listener: Listener,
        host: Option<&str>,
        req: &Request<Incoming>,
    ) -> Result<usize, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed("CONNECT".into()));
        }
        check_path(req.uri().path()).map_err(ProxyError::BadRequest)?;
        match listener {
            Listener::Dedicated(i) => Ok(i),
            Listener::Main => self
                .table
                .match_main(host, req.uri().path())
                .ok_or(ProxyError::NoRoute),
        }
    }

    async fn forward(
        &self,
        idx: usize,
        route: &Route,
        req: Request<Incoming>,
        served: &mut Served,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // Phase 2: token.
        let slot = route
            .slot
            .as_ref()
            .expect("every route has a cache slot once serving");
        let lease = slot
            .token()
            .await
            .map_err(|e| ProxyError::Token(TokenFailure(e)))?;
        served.token_cached = Some(lease.cached);

        // Phase 3: upstream request.
        let (mut parts, body) = req.into_parts();
        parts.uri = route
            .upstream_uri(parts.uri.path(), parts.uri.query())
            .map_err(|_| {
                ProxyError::BadRequest("the request target cannot be mapped onto the upstream")
            })?;
        // The pooled client speaks HTTP/2 to the upstream when ALPN says so, whatever the
        // downstream used.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(HOST, route.upstream_host.clone());
        let (body, kept) = self.prepare_body(body).await?;
        // Only a request that can be replayed needs its head kept.
        let replay = kept.map(|bytes| (clone_parts(&parts), bytes));

        // Phase 4: forward.
        let upstream = &self.upstreams[idx];
        let resp = send(upstream, parts, body, &lease).await?;
        let resp = if resp.status() == StatusCode::UNAUTHORIZED
            && (route.retry_on_401 || is_invalid_token_challenge(resp.headers()))
        {
            slot.evict(&lease.token);
            match replay {
                Some((parts, bytes)) => {
                    tracing::info!(route = %route.name, "upstream rejected the token; replaying once with a fresh one");
                    drop(resp);
                    let fresh = slot
                        .token()
                        .await
                        .map_err(|e| ProxyError::Token(TokenFailure(e)))?;
                    served.replayed = true;
                    send(upstream, parts, Either::Right(Full::new(bytes)), &fresh).await?
                }
                None => resp,
            }
        } else {
            resp
        };

        // Phase 5: response.
        let mut resp = resp;
        strip_hop_by_hop(resp.headers_mut());
        Ok(resp.map(Either::Left))
    }

    /// A body of known size up to `retry_body_limit` is read into memory (and kept for a
    /// replay); anything else streams.
    async fn prepare_body(
        &self,
        body: Incoming,
    ) -> Result<(UpstreamBody, Option<Bytes>), ProxyError> {
        match body.size_hint().exact() {
            Some(0) => Ok((Either::Right(Full::new(Bytes::new())), Some(Bytes::new()))),
            Some(n) if n <= self.retry_body_limit as u64 => {
                let bytes = Limited::new(body, self.retry_body_limit)
                    .collect()
                    .await
                    .map_err(|_| ProxyError::BadRequest("the request body could not be read"))?
                    .to_bytes();
                Ok((Either::Right(Full::new(bytes.clone())), Some(bytes)))
            }
            _ => Ok((Either::Left(body), None)),
        }
    }
}

/// Phase 4 proper: one exchange with the upstream, bounded by the route's timeout.
async fn send(
    upstream: &Upstream,
    mut parts: Parts,
    body: UpstreamBody,
    lease: &Lease,
) -> Result<Response<Incoming>, ProxyError> {
    parts
        .headers
        .insert(AUTHORIZATION, lease.token.token.authorization().clone());
    let req = Request::from_parts(parts, body);
    match tokio::time::timeout(upstream.timeout, upstream.client.request(req)).await {
        Err(_) => Err(ProxyError::UpstreamTimeout(upstream.timeout)),
        Ok(Err(e)) if downstream_body_failed(&e) => Err(ProxyError::BadRequest(
            "the request body could not be read (malformed or cut off)",
        )),
        Ok(Err(e)) => Err(ProxyError::UpstreamUnavailable(error_chain(&e))),
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// Whether forwarding failed because the application's request body broke (a malformed chunk,
/// a connection cut mid-body) rather than because of the upstream: hyper reports an error of
/// the body it was sending as a "user" error.
fn downstream_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            return h.is_user();
        }
        current = err.source();
    }
    false
}

fn clone_parts(p: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req.into_parts().0
}

/// RFC 6750 §3.1: `WWW-Authenticate: Bearer error="invalid_token"` says the token itself was
/// refused (expired, revoked), as opposed to `insufficient_scope` or a missing token.
pub fn is_invalid_token_challenge(headers: &HeaderMap) -> bool {
    headers.get_all(WWW_AUTHENTICATE).iter().any(|v| {
        let Ok(v) = v.to_str() else { return false };
        let lower = v.to_ascii_lowercase();
        let Some(rest) = lower.trim_start().strip_prefix("bearer") else {
            return false;
        };
        rest.split(',').any(|param| {
            let mut kv = param.splitn(2, '=');
            let k = kv.next().unwrap_or("").trim();
            let val = kv.next().unwrap_or("").trim().trim_matches('"');
            k == "error" && val == "invalid_token"
        })
    })
}

/// Connection-level headers (RFC 9110 §7.6.1) apply to one hop only, and so do the
/// proxy-authentication headers: the sidecar is that hop.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // `Connection: keep-alive` / `close` name nothing beyond the fixed list; only other tokens
    // need collecting (the common case allocates nothing).
    let names_others = headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str().map_or(true, |v| {
            v.split(',').any(|t| {
                let t = t.trim();
                !t.is_empty()
                    && !t.eq_ignore_ascii_case("keep-alive")
                    && !t.eq_ignore_ascii_case("close")
            })
        })
    });
    if names_others {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "keep-alive, X-Custom-Hop".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-custom-hop", "1".parse().unwrap());
        h.insert(TE, "trailers".parse().unwrap());
        h.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(UPGRADE, "websocket".parse().unwrap());
        h.insert(PROXY_AUTHORIZATION, "Basic eA==".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
    }

    #[test]
    fn invalid_token_challenges_are_recognised() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.append(WWW_AUTHENTICATE, v.parse().unwrap());
            is_invalid_token_challenge(&h)
        };
        assert!(with(r#"Bearer error="invalid_token""#));
        assert!(with(
            r#"Bearer realm="api", error="invalid_token", error_description="expired""#
        ));
        assert!(with("bearer error=invalid_token"));
        assert!(!with(r#"Bearer error="insufficient_scope""#));
        assert!(!with(r#"Bearer realm="api""#));
        assert!(!with(r#"Basic realm="invalid_token""#));
        assert!(!is_invalid_token_challenge(&HeaderMap::new()));
    }
}
