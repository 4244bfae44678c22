//! The built-in echo upstream of `token-sidecar dev`: answers every request with a JSON picture
//! of what arrived (method, path, query, headers, body size) and the bearer token with its
//! decoded claims, so a developer sees exactly what the sidecar injected.
//!
//! It binds an ephemeral loopback port only and stops when its [`Echo`] handle is dropped. The
//! token it shows is a throwaway development token; the `Authorization` header itself is left out
//! of the header list so the token appears once, where it is labelled.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::server::accept::spawn_plain;

/// A running echo upstream; dropping it stops the accept loop.
pub(crate) struct Echo {
    pub(crate) addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    /// Binds 127.0.0.1 on an ephemeral port and starts serving.
    pub(crate) async fn start() -> std::io::Result<Echo> {
        let (addr, task) = start_echo().await?;
        Ok(Echo { addr, task })
    }
}

async fn start_echo() -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let task = spawn_plain(listener, echo);
    Ok((addr, task))
}

async fn echo(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, 1 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let token = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .filter(|(n, _)| *n != http::header::AUTHORIZATION)
        .map(|(n, v)| {
            (
                n.to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let out = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body.len(),
        // A throwaway development token, shown so it can be inspected and verified.
        "token": token,
        "claims": token.as_deref().and_then(crate::token::jwt_claims),
    });
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    )));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
