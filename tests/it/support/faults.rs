//! A small in-process token endpoint for the failures a real server will not produce on demand:
//! 500s, hangs, garbage, refused connections. The normal path is tested against oidc-provider.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// What the fake token endpoint does with the next requests.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Issues opaque token `fake-N` valid for this long.
    Issue(Duration),
    /// Answers 500 with an HTML body.
    Status500,
    /// Accepts the request and never answers.
    Hang,
    /// Answers 200 with a body that is not a token response.
    Garbage,
    /// Answers 400/401 with this RFC 6749 error code.
    Reject(&'static str),
    /// Answers `status` (429, 503) with `Retry-After` `after` seconds from the moment of the
    /// answer: as delta-seconds, or as an HTTP-date when `as_date`.
    Throttle {
        status: u16,
        after: u64,
        as_date: bool,
    },
}

struct Shared {
    mode: Mutex<Mode>,
    requests: AtomicU64,
    issued: AtomicU64,
    forms: Mutex<Vec<String>>,
    /// Bumped to close every open connection.
    closing: tokio::sync::watch::Sender<u64>,
}

/// Accepts connections until aborted; each connection also ends when `closing` changes.
fn serve(listener: TcpListener, s: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let s = s.clone();
            let mut closing = s.closing.subscribe();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let s = s.clone();
                    async move { Ok::<_, Infallible>(handle(s, req).await) }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = closing.changed() => {}
                }
            });
        }
    })
}

pub struct FakeTokenEndpoint {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: Mutex<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeTokenEndpoint {
    fn drop(&mut self) {
        self.task.lock().unwrap().abort();
    }
}

impl FakeTokenEndpoint {
    pub async fn start(mode: Mode) -> FakeTokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            mode: Mutex::new(mode),
            requests: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            forms: Mutex::new(Vec::new()),
            closing: tokio::sync::watch::channel(0).0,
        });
        let task = Mutex::new(serve(listener, shared.clone()));
        FakeTokenEndpoint { addr, shared, task }
    }

    /// Closes the listening socket and every open connection: new connections are refused
    /// until [`Self::resume`].
    pub fn refuse_connections(&self) {
        self.task.lock().unwrap().abort();
        self.shared.closing.send_modify(|g| *g += 1);
    }

    /// Listens again on the same address.
    pub async fn resume(&self) {
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                // The aborted task may not have dropped its socket yet.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        *self.task.lock().unwrap() = serve(listener, self.shared.clone());
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/oauth2/token", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    pub fn last_form(&self) -> String {
        self.shared
            .forms
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }

    /// Every form body received, in order.
    pub fn forms(&self) -> Vec<String> {
        self.shared.forms.lock().unwrap().clone()
    }
}

async fn handle(s: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    s.forms
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&body).into_owned());
    let mode = s.mode.lock().unwrap().clone();
    let (status, ct, body) = match mode.clone() {
        Mode::Issue(ttl) => {
            let n = s.issued.fetch_add(1, Ordering::SeqCst) + 1;
            // Long and random, like real tokens, so a leak in a log is unambiguous.
            let n = format!(
                "{n}-{}{}",
                token_sidecar::new_jti(),
                token_sidecar::new_jti()
            );
            (
                StatusCode::OK,
                "application/json",
                serde_json::json!({
                    "access_token": format!("fake-{n}"),
                    "token_type": "bearer",
                    "expires_in": ttl.as_secs_f64(),
                })
                .to_string(),
            )
        }
        Mode::Status500 => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/html",
            "<html>internal error</html>".into(),
        ),
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            unreachable!()
        }
        Mode::Garbage => (StatusCode::OK, "application/json", "{\"access_tok".into()),
        Mode::Throttle { status, .. } => (
            StatusCode::from_u16(status).unwrap(),
            "text/plain",
            "slow down".into(),
        ),
        Mode::Reject(code) => (
            if code == "invalid_client" {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::BAD_REQUEST
            },
            "application/json",
            serde_json::json!({"error": code, "error_description": format!("fake says {code}")})
                .to_string(),
        ),
    };
    let retry_after = match mode {
        Mode::Throttle {
            after,
            as_date: false,
            ..
        } => Some(after.to_string()),
        Mode::Throttle {
            after,
            as_date: true,
            ..
        } => Some(httpdate::fmt_http_date(
            std::time::SystemTime::now() + Duration::from_secs(after),
        )),
        _ => None,
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Some(v) = retry_after {
        r.headers_mut().insert("retry-after", v.parse().unwrap());
    }
    r.headers_mut().insert("content-type", ct.parse().unwrap());
    r
}
