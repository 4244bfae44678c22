//! A real HTTP(S) upstream for the tests that records what reached it.
//!
//! Behaviour is chosen by the path the upstream receives (after the sidecar's rewrite):
//! - `/slow/{ms}`: waits before sending headers.
//! - `/download/{bytes}`: streams that many bytes; after the first chunk it waits for
//!   [`Upstream::release_download`], so a test can prove the client saw bytes before the last
//!   were sent.
//! - `/status/{code}`: answers with that status.
//! - anything else: reads the whole body (counting it, keeping up to 1 MiB) and answers 200
//!   with a small JSON summary. The first body chunk of every request fires
//!   [`Upstream::first_body_chunk`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body_len: u64,
    /// The body, when it was at most 1 MiB.
    pub body: Option<Bytes>,
    pub version: http::Version,
}

impl Received {
    pub fn bearer(&self) -> Option<String> {
        self.headers
            .get("authorization")?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")
            .map(str::to_owned)
    }
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    first_body_chunk: Notify,
    download_gate: Notify,
    /// Bearer tokens answered with 401 `invalid_token`.
    revoked: Mutex<std::collections::HashSet<String>>,
}

/// A running upstream; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Plain HTTP on a free loopback port.
    pub async fn start() -> Upstream {
        Self::start_with_tls(None).await
    }

    /// HTTPS when `tls` is given.
    pub async fn start_with_tls(tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let task = tokio::spawn(async move {
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(s, req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Upstream { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.received.lock().unwrap().len()
    }

    /// Resolves when the next request's first body bytes arrive.
    pub async fn first_body_chunk(&self) {
        self.shared.first_body_chunk.notified().await
    }

    /// From now on, requests carrying `token` get 401 with a Bearer `invalid_token` challenge.
    pub fn revoke(&self, token: &str) {
        self.shared
            .revoked
            .lock()
            .unwrap()
            .insert(token.to_string());
    }

    /// Lets a `/download/...` response send the rest of its body.
    pub fn release_download(&self) {
        self.shared.download_gate.notify_one();
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

async fn handle(s: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let mut received = Received {
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers.clone(),
        body_len: 0,
        body: None,
        version: parts.version,
    };

    if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap_or(1000);
        s.received.lock().unwrap().push(received);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return full(StatusCode::OK, "slow");
    }
    if let Some(n) = path.strip_prefix("/download/") {
        let total: u64 = n.parse().unwrap_or(0);
        s.received.lock().unwrap().push(received);
        let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(4);
        let shared = s.clone();
        tokio::spawn(async move {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let mut sent = 0u64;
            let mut first = true;
            while sent < total {
                let n = (total - sent).min(chunk.len() as u64) as usize;
                if tx.send(Frame::data(chunk.slice(..n))).await.is_err() {
                    return;
                }
                sent += n as u64;
                if first {
                    first = false;
                    shared.download_gate.notified().await;
                }
            }
        });
        let mut r = Response::new(rx.boxed());
        r.headers_mut()
            .insert("content-length", total.to_string().parse().unwrap());
        return r;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        s.received.lock().unwrap().push(received);
        let code = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        return full(code, format!("status {code}"));
    }

    let mut kept = Vec::new();
    let mut first = true;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            if first && !data.is_empty() {
                first = false;
                s.first_body_chunk.notify_one();
            }
            received.body_len += data.len() as u64;
            if kept.len() + data.len() <= 1 << 20 {
                kept.extend_from_slice(&data);
            }
        }
    }
    if received.body_len <= 1 << 20 {
        received.body = Some(Bytes::from(kept));
    }
    let revoked = received
        .bearer()
        .is_some_and(|t| s.revoked.lock().unwrap().contains(&t));
    if revoked || path == "/always-401" {
        s.received.lock().unwrap().push(received);
        let mut r = full(StatusCode::UNAUTHORIZED, "token rejected");
        r.headers_mut().insert(
            "www-authenticate",
            r#"Bearer realm="test", error="invalid_token", error_description="revoked""#
                .parse()
                .unwrap(),
        );
        return r;
    }
    let summary = serde_json::json!({
        "method": received.method,
        "path": received.path_and_query,
        "body_len": received.body_len,
    });
    s.received.lock().unwrap().push(received);
    let mut r = full(StatusCode::OK, summary.to_string());
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r.headers_mut()
        .insert("x-upstream", "recorder".parse().unwrap());
    r
}

/// A test CA and a server config for `localhost` / 127.0.0.1 signed by it; returns the CA PEM.
pub fn test_tls() -> (Arc<rustls::ServerConfig>, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "token-sidecar test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    (Arc::new(config), ca.pem())
}
