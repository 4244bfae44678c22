//! The one accept loop, shared by the proxy listeners, the admin listener, the development
//! authorization server and the echo upstream.
//!
//! Invariants: at most `max_connections` connections are served at once per listener (the rest
//! wait in the kernel's backlog); every connection runs under the watchdog of
//! [`super::conn`] (header-read and idle timeouts); on `stop` no new connection is accepted and
//! the served ones drain gracefully (HTTP/2 GOAWAY, HTTP/1 close when idle); on `cut` whatever is
//! left is dropped. An accept error (usually EMFILE) pauses the loop for 50 ms instead of
//! spinning.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{self, TrackedBody, TrackedIo, Tracker, Verdict};
use crate::config::ProxyConfig;

/// What every connection task of one server shares: the signals to drain and to cut, the
/// tracker the shutdown waits on, and the per-connection limits.
#[derive(Clone, Debug)]
pub(crate) struct Connections {
    /// Stop accepting; drain connections gracefully.
    pub(crate) stop: CancellationToken,
    /// The grace period is over: drop whatever is left.
    pub(crate) cut: CancellationToken,
    pub(crate) tasks: TaskTracker,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
    max_headers: usize,
}

impl Connections {
    /// Connections limited as `limits` says, not yet told to stop.
    pub(crate) fn new(limits: &ProxyConfig) -> Connections {
        Connections {
            stop: CancellationToken::new(),
            cut: CancellationToken::new(),
            tasks: TaskTracker::new(),
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        // hyper's header timer also runs while a keep-alive connection idles; conn.rs enforces
        // both timeouts separately instead.
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(self.max_header_bytes)
            .max_headers(self.max_headers);
        b.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX));
        b
    }
}

/// Accepts on `listener` until `conns.stop`, serving each connection's requests with `handler`.
pub(crate) async fn accept_loop<H, F, B>(
    listener: TcpListener,
    handler: H,
    max_connections: usize,
    conns: Connections,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = conns.builder();
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            _ = conns.stop.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = conns.stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let tracker = Tracker::new();
        let handler = handler.clone();
        let in_service = tracker.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            let in_flight = in_service.request_started(&mut req);
            let resp = handler(req);
            async move {
                let resp = resp.await;
                Ok::<_, Infallible>(resp.map(|b| TrackedBody::new(b, in_flight)))
            }
        });
        let io = TokioIo::new(TrackedIo::new(stream, tracker.clone()));
        let conn = builder.serve_connection(io, service).into_owned();
        let conns = conns.clone();
        conns.tasks.clone().spawn(async move {
            serve(conn, tracker, &conns, peer).await;
            drop(permit);
        });
    }
}

/// Serves `handler` on `listener` with the default limits until the returned task is aborted:
/// for the development servers, which need no drain.
#[cfg(feature = "dev")]
pub(crate) fn spawn_plain<H, F, B>(listener: TcpListener, handler: H) -> tokio::task::JoinHandle<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = ProxyConfig::default();
    let conns = Connections::new(&limits);
    tokio::spawn(accept_loop(
        listener,
        handler,
        limits.max_connections,
        conns,
    ))
}

/// Drives one connection until it ends, its watchdog fires, or shutdown drains or cuts it.
async fn serve<C>(conn: C, tracker: Arc<Tracker>, conns: &Connections, peer: SocketAddr)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let watchdog = conn::watchdog(tracker, conns.header_read_timeout, conns.idle_timeout);
    let mut watchdog = std::pin::pin!(watchdog);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            why = &mut watchdog, if !draining => {
                tracing::debug!(%peer, reason = ?why, "closing connection");
                if why == Verdict::HeaderTimeout {
                    // A client stalling its request head gets no more of our time.
                    return;
                }
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = conns.stop.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = conns.cut.cancelled() => return,
        }
    }
}
