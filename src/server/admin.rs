//! The admin listener: `/healthz` (the process serves), `/readyz` (every route has a usable
//! token) and `/metrics` (Prometheus text format). Kept apart from the proxy listener so probes
//! and scrapes never compete with application traffic.
//!
//! Invariant: a request body is never read. The body is dropped before answering, so a client
//! that announces one gets its answer at once and hyper closes that HTTP/1 connection instead of
//! waiting for bytes. The connection limits (own head timeout, per-peer admission) are the
//! accept loop's (`accept.rs`, `peers.rs`).

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use serde_json::json;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::proxy::respond::json_response;
use crate::proxy::{Proxy, ProxyBody};
use crate::token::client::Endpoint;

pub(crate) struct Admin {
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    endpoint: Endpoint,
}

impl Admin {
    pub(crate) fn new(proxy: Arc<Proxy>, metrics: Arc<Metrics>, endpoint: Endpoint) -> Admin {
        Admin {
            proxy,
            metrics,
            endpoint,
        }
    }

    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (req, body) = req.into_parts();
        drop(body);
        if req.method != Method::GET && req.method != Method::HEAD {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "method_not_allowed"}),
            )
            .map(Either::Right);
        }
        let resp = match req.uri.path() {
            "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
            "/readyz" => self.readyz(),
            "/metrics" => {
                let mut r = Response::new(http_body_util::Full::new(bytes::Bytes::from(
                    self.metrics.render(),
                )));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
        };
        resp.map(Either::Right)
    }

    /// 200 while every fixed slot (every route's token, whichever client it belongs to) is
    /// usable; otherwise 503 naming each route that waits and its client. Both name the
    /// `[token]` client's endpoint in use (redacted; with `token.issuer`, the discovered one)
    /// and, with `[[client]]`s, every client's under `clients`. Run-time keys are not waited
    /// for: they did not exist at start.
    fn readyz(&self) -> Response<http_body_util::Full<bytes::Bytes>> {
        let endpoint = self.endpoint.current().map(|u| crate::util::redact_url(&u));
        let now = Instant::now();
        let clients = &self.proxy.clients;
        let mut waiting = Vec::new();
        for route in &self.proxy.table.routes {
            // A route whose sets are templates has no fixed token to wait for.
            if let Some(Err(reason)) = route.slot.as_ref().map(|s| s.readiness(now)) {
                waiting.push(json!({
                    "route": &*route.name,
                    "client": route.client.name(),
                    "reason": reason,
                }));
            }
        }
        let mut body = json!({"token_endpoint": endpoint});
        if clients.iter().count() > 1 {
            let all: serde_json::Map<String, serde_json::Value> = clients
                .iter()
                .map(|c| {
                    let url = c
                        .endpoint()
                        .and_then(|e| e.current())
                        .map(|u| crate::util::redact_url(&u));
                    (c.name().to_owned(), json!({ "token_endpoint": url }))
                })
                .collect();
            body["clients"] = all.into();
        }
        if waiting.is_empty() {
            body["status"] = "ready".into();
            json_response(StatusCode::OK, &body)
        } else {
            body["status"] = "not_ready".into();
            body["waiting"] = waiting.into();
            json_response(StatusCode::SERVICE_UNAVAILABLE, &body)
        }
    }
}
