//! The request path, top to bottom. Each downstream request goes through these phases:
//!
//! 1. **route**: pick the route (dedicated port, else host and longest path prefix); refuse
//!    `CONNECT` and paths with dot segments. Nothing is forwarded without a route.
//! 2. **token**: take the route's cached token; wait for the refresher only when none is usable.
//!    No token, no forwarding.
//! 3. **upstream request**: rewrite the URI onto the upstream, drop hop-by-hop headers, set
//!    `Host` to the upstream's authority and replace `Authorization` with the token.
//! 4. **forward**: send it on the route's pooled client, bounded by the route's `timeout` until
//!    response headers arrive; the request body streams through untouched.
//! 5. **response**: drop hop-by-hop headers and stream the upstream's answer back unchanged.
//!
//! Any failure leaves through [`crate::respond::error_response`].

use std::sync::Arc;

use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CONNECTION, HOST, HeaderName, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Method, Request, Response, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::respond::{ProxyError, TokenFailure, error_response};
use crate::routes::{Route, RouteTable, check_path};
use crate::token_client::error_chain;
use crate::upstream::Upstream;

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
}

impl Proxy {
    /// Serves one downstream request. Never fails: errors become SPEC §5 responses.
    pub async fn handle(
        self: Arc<Self>,
        listener: Listener,
        req: Request<Incoming>,
    ) -> Response<ProxyBody> {
        // Phase 1: route.
        let idx = match self.route(listener, &req) {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(method = %req.method(), path = req.uri().path(), error = %e, "request refused");
                return error_response::<Full<Bytes>>(&e, None).map(Either::Right);
            }
        };
        let route = &self.table.routes[idx];
        match self.forward(idx, route, req).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::warn!(route = %route.name, error = %e, "request failed");
                error_response::<Full<Bytes>>(&e, Some(&route.name)).map(Either::Right)
            }
        }
    }

    fn route(&self, listener: Listener, req: &Request<Incoming>) -> Result<usize, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed("CONNECT".into()));
        }
        check_path(req.uri().path()).map_err(ProxyError::BadRequest)?;
        match listener {
            Listener::Dedicated(i) => Ok(i),
            Listener::Main => {
                // An absolute-form target (HTTP_PROXY clients) or HTTP/2 :authority names the
                // host; otherwise the Host header does.
                let host = match req.uri().authority() {
                    Some(a) => Some(a.as_str()),
                    None => req.headers().get(HOST).and_then(|h| h.to_str().ok()),
                };
                self.table
                    .match_main(host, req.uri().path())
                    .ok_or(ProxyError::NoRoute)
            }
        }
    }

    async fn forward(
        &self,
        idx: usize,
        route: &Route,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // Phase 2: token.
        let slot = route
            .slot
            .as_ref()
            .expect("every route has a cache slot once serving");
        let token = slot
            .token()
            .await
            .map_err(|e| ProxyError::Token(TokenFailure(e)))?;

        // Phase 3: upstream request.
        let (mut parts, body) = req.into_parts();
        parts.uri = route
            .upstream_uri(parts.uri.path(), parts.uri.query())
            .map_err(|_| {
                ProxyError::BadRequest("the request target cannot be mapped onto the upstream")
            })?;
        // The pooled client speaks HTTP/2 to the upstream when ALPN says so, whatever the downstream used.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(HOST, route.upstream_host.clone());
        parts
            .headers
            .insert(AUTHORIZATION, token.token.authorization().clone());
        let upstream_req = Request::from_parts(parts, body);

        // Phase 4: forward.
        let upstream = &self.upstreams[idx];
        let mut resp =
            match tokio::time::timeout(upstream.timeout, upstream.client.request(upstream_req))
                .await
            {
                Err(_) => return Err(ProxyError::UpstreamTimeout(upstream.timeout)),
                Ok(Err(e)) => return Err(ProxyError::UpstreamUnavailable(error_chain(&e))),
                Ok(Ok(resp)) => resp,
            };

        // Phase 5: response.
        strip_hop_by_hop(resp.headers_mut());
        Ok(resp.map(Either::Left))
    }
}

/// Connection-level headers (RFC 9110 §7.6.1) apply to one hop only, and so do the
/// proxy-authentication headers: the sidecar is that hop.
const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(conn) = headers.get(CONNECTION) {
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
    headers.remove(UPGRADE);
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
}
