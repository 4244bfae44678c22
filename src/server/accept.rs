//! The one accept loop, shared by the proxy listeners, the admin listener, the development
//! authorization server and the echo upstream.
//!
//! Invariants: every connection runs under the watchdog of [`super::conn`] (header-read and
//! idle timeouts); on `stop` no new connection is accepted and the served ones drain gracefully
//! (HTTP/2 GOAWAY, HTTP/1 close when idle); on `cut` whatever is left is dropped. An accept
//! error (usually EMFILE) pauses the loop for 50 ms instead of spinning.
//!
//! How many connections a listener serves is its [`Admission`]:
//!
//! - [`Admission::Queue`] (the proxy listeners): at most `max_connections` connections at once.
//!   A new connection over the cap closes the oldest one kept alive between requests (an
//!   application's pool of idle keep-alive connections must not keep its newer connections
//!   out); when there is none it waits, and the loop accepts nothing more meanwhile, so the rest wait in the
//!   kernel's backlog. At most as many requests are in flight, HTTP/2 streams each counting as
//!   one, so memory is bounded by requests, not by connections × streams (docs/spec.md §6 has
//!   the arithmetic); a stream over the limit waits for a slot holding only its head.
//! - [`Admission::PerPeer`] (the admin listener): a cap per peer address and a larger one for
//!   the listener, a newcomer making room by evicting an idle connection, or being closed when
//!   none is idle ([`super::peers`]), so idle connections cannot keep probes out.
//!
//! Every buffer a connection can fill is bounded here: HTTP/1 read and write buffers by
//! `max_header_bytes`, HTTP/2 by its flow-control windows and send buffer (below) and by
//! `max_concurrent_streams`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
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
use super::peers::Admissions;
use crate::config::{AdminConfig, ProxyConfig};

/// HTTP/2 flow control on the proxy listeners. The peer is the application on loopback, where
/// 64 KiB per stream and per connection keep a stream at link speed (the round trip is
/// microseconds) while bounding what one connection can make us buffer (hyper's defaults are
/// 1 MiB and 1 MiB).
pub(crate) const H2_STREAM_WINDOW: u32 = 64 * 1024;
pub(crate) const H2_CONNECTION_WINDOW: u32 = 64 * 1024;
/// Response bytes buffered per HTTP/2 stream ahead of the client's window (hyper: 400 KiB).
pub(crate) const H2_MAX_SEND_BUF: usize = 64 * 1024;

/// The admin listener serves small GETs only (no bodies are read): its heads are capped at
/// hyper's smallest buffer, and its HTTP/2 at one stream at a time with small windows (probes and
/// scrapes use HTTP/1.1 and one request per connection anyway).
pub(crate) const ADMIN_MAX_HEADER_BYTES: usize = 8192;
const ADMIN_MAX_HEADERS: usize = 32;
pub(crate) const ADMIN_MAX_STREAMS: u32 = 1;
pub(crate) const ADMIN_H2_WINDOW: u32 = 16 * 1024;
/// HTTP/2 streams at once on one token-endpoint connection (its callers make one request at a
/// time; the listener's request limit bounds the total anyway).
const TOKEN_ENDPOINT_MAX_STREAMS: u32 = 4;

/// The limits one listener applies to each of its connections.
#[derive(Clone, Copy, Debug)]
struct ConnLimits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
    max_headers: usize,
    max_concurrent_streams: u32,
    h2_stream_window: u32,
    h2_connection_window: u32,
    /// Cut a connection whose request has moved no bytes for this long (the admin listener).
    write_stall: Option<Duration>,
}

/// What every connection task of one server shares: the signals to drain and to cut, the
/// tracker the shutdown waits on, and the per-connection limits of the listener it serves.
#[derive(Clone, Debug)]
pub(crate) struct Connections {
    /// Stop accepting; drain connections gracefully.
    pub(crate) stop: CancellationToken,
    /// The grace period is over: drop whatever is left.
    pub(crate) cut: CancellationToken,
    pub(crate) tasks: TaskTracker,
    limits: ConnLimits,
}

impl Connections {
    /// Connections limited as `limits` says, not yet told to stop.
    pub(crate) fn new(limits: &ProxyConfig) -> Connections {
        Connections {
            stop: CancellationToken::new(),
            cut: CancellationToken::new(),
            tasks: TaskTracker::new(),
            limits: ConnLimits {
                header_read_timeout: limits.header_read_timeout,
                idle_timeout: limits.idle_timeout,
                max_header_bytes: limits.max_header_bytes,
                max_headers: limits.max_headers,
                max_concurrent_streams: limits.max_concurrent_streams,
                h2_stream_window: H2_STREAM_WINDOW,
                h2_connection_window: H2_CONNECTION_WINDOW,
                write_stall: None,
            },
        }
    }

    /// The same shutdown signals and tracker, with the admin listener's limits: its own
    /// (short) head timeout, small heads, few streams.
    pub(crate) fn admin(&self, admin: &AdminConfig) -> Connections {
        Connections {
            limits: ConnLimits {
                header_read_timeout: admin.header_read_timeout,
                max_header_bytes: ADMIN_MAX_HEADER_BYTES,
                max_headers: ADMIN_MAX_HEADERS,
                max_concurrent_streams: ADMIN_MAX_STREAMS,
                h2_stream_window: ADMIN_H2_WINDOW,
                h2_connection_window: ADMIN_H2_WINDOW,
                // Its answers are ready at once: a client not reading them for as long as it
                // may take to send a head is holding a probe's slot.
                write_stall: Some(admin.header_read_timeout),
                ..self.limits
            },
            ..self.clone()
        }
    }

    /// The same shutdown signals and tracker, with the token endpoint's limits: the proxy's
    /// timeouts, small heads, few streams (its requests are small forms answered from the cache).
    pub(crate) fn token_endpoint(&self) -> Connections {
        Connections {
            limits: ConnLimits {
                max_header_bytes: ADMIN_MAX_HEADER_BYTES,
                max_headers: ADMIN_MAX_HEADERS,
                max_concurrent_streams: TOKEN_ENDPOINT_MAX_STREAMS,
                h2_stream_window: ADMIN_H2_WINDOW,
                h2_connection_window: ADMIN_H2_WINDOW,
                // A request may wait for a token fetch (bounded by the token wait) with no bytes
                // moving; its body has its own deadline (token_endpoint.body_read_timeout).
                write_stall: None,
                ..self.limits
            },
            ..self.clone()
        }
    }

    /// HTTP/1 only: what nearly every connection speaks (see [`h2_preface`]).
    ///
    /// `writev(false)`: hyper copies the body into the head's buffer (bounded by
    /// `max_buf_size`) and writes once, instead of queueing buffers for a vectored write.
    /// Measured (docs/benchmarks.md, "writev"): the same system calls per request, 2 % fewer
    /// instructions, 3 % more requests/s; answers here are mostly small. `pipeline_flush`
    /// stays off: it only changes pipelined requests, which applications do not send.
    fn h1_builder(&self) -> http1::Builder {
        let l = &self.limits;
        let mut b = http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(l.max_header_bytes)
            .max_headers(l.max_headers)
            .writev(false);
        b
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let l = &self.limits;
        let mut b = auto::Builder::new(TokioExecutor::new());
        // hyper's header timer also runs while a keep-alive connection idles; conn.rs enforces
        // both timeouts separately instead. max_buf_size bounds the read buffer (so the head)
        // and the write buffer.
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(l.max_header_bytes)
            .max_headers(l.max_headers);
        b.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(l.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(l.max_concurrent_streams)
            .initial_stream_window_size(l.h2_stream_window)
            .initial_connection_window_size(l.h2_connection_window)
            .max_send_buf_size(H2_MAX_SEND_BUF);
        b
    }
}

/// How often a listener waiting for room re-checks whether a busy connection went idle.
const ROOM_POLL: Duration = Duration::from_millis(50);

/// How a listener decides which connections it serves (see the module docs).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Admission {
    /// At most this many connections (newcomers evict idle ones, else wait), and as many
    /// requests in flight.
    Queue { max_connections: usize },
    /// At most `max_connections`, and `per_peer` per peer address; newcomers evict idle ones.
    PerPeer {
        max_connections: usize,
        per_peer: usize,
    },
}

/// Accepts on `listener` until `conns.stop`, serving each connection's requests with `handler`.
pub(crate) async fn accept_loop<H, F, B>(
    listener: TcpListener,
    handler: H,
    admission: Admission,
    conns: Connections,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = conns.builder();
    let h1 = conns.h1_builder();
    let (admissions, requests, wait_for_room) = match admission {
        Admission::Queue { max_connections } => (
            Admissions::new(max_connections, max_connections, false, &conns.stop),
            Some(Arc::new(Semaphore::new(max_connections))),
            true,
        ),
        Admission::PerPeer {
            max_connections,
            per_peer,
        } => (
            Admissions::new(max_connections, per_peer, true, &conns.stop),
            None,
            false,
        ),
    };
    'accept: loop {
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
        // Bounded by the connections it waits for: each ends, goes idle, or is cut at shutdown.
        let (ticket, tracker) = loop {
            // A new tracker per attempt: the head timeout counts from admission, not from accept.
            let tracker = Tracker::new();
            match admissions.admit(peer.ip(), tracker.clone()) {
                Ok(t) => break (t, tracker),
                Err(why) if !wait_for_room => {
                    tracing::debug!(%peer, reason = ?why, "connection refused");
                    continue 'accept;
                }
                Err(_) => tokio::select! {
                    _ = conns.stop.cancelled() => break 'accept,
                    _ = admissions.room(ROOM_POLL) => {}
                },
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let in_service = tracker.clone();
        let requests = requests.clone();
        let service = service_fn(move |mut req: Request<Incoming>| {
            let in_flight = in_service.request_started(&mut req);
            let handler = handler.clone();
            let requests = requests.clone();
            async move {
                // The request's slot: waited for with only its head in memory.
                let slot = match requests {
                    Some(r) => Some(r.acquire_owned().await.expect("semaphore is never closed")),
                    None => None,
                };
                let resp = handler(req).await;
                Ok::<_, Infallible>(resp.map(|b| TrackedBody::new(b, in_flight, slot)))
            }
        });
        let builder = builder.clone();
        let h1 = h1.clone();
        let conns = conns.clone();
        conns.tasks.clone().spawn(async move {
            let evicted = ticket.evict.clone();
            // Which protocol, from the first bytes; waited for under the same bounds as a head.
            let h2 = tokio::select! {
                h2 = h2_preface(&stream) => match h2 {
                    Some(h2) => h2,
                    None => return,
                },
                _ = tokio::time::sleep(conns.limits.header_read_timeout) => return,
                // Eviction, or the server's stop (its parent).
                _ = evicted.cancelled() => return,
            };
            let io = TokioIo::new(TrackedIo::new(stream, tracker.clone()));
            if h2 {
                // Boxed: the HTTP/2-capable connection is several times the size of the
                // HTTP/1 one, and a task is as large as its largest state.
                let conn = builder.serve_connection(io, service).into_owned();
                Box::pin(serve(conn, tracker, &conns, peer, evicted)).await;
            } else {
                let conn = h1.serve_connection(io, service);
                serve(conn, tracker, &conns, peer, evicted).await;
            }
            drop(ticket);
        });
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4), which an h2c prior-knowledge client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the connection may be HTTP/2: `Some(false)` once its first bytes differ from the
/// preface (HTTP/1, served by hyper's HTTP/1 connection alone), `Some(true)` when they match
/// as far as they go (served by the auto-detecting connection, which reads the rest), `None`
/// when the client closed or failed before sending anything. Only peeks: hyper reads every
/// byte itself.
pub(crate) async fn h2_preface(stream: &tokio::net::TcpStream) -> Option<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    match stream.peek(&mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(buf[..n] == H2_PREFACE[..n]),
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
        Admission::Queue {
            max_connections: limits.max_connections,
        },
        conns,
    ))
}

/// Drives one connection until it ends, its watchdog fires, it is evicted to make room for a
/// newer one, or shutdown drains or cuts it.
async fn serve<C>(
    conn: C,
    tracker: Arc<Tracker>,
    conns: &Connections,
    peer: SocketAddr,
    evicted: CancellationToken,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let limits = &conns.limits;
    let watchdog = conn::watchdog(
        tracker.clone(),
        limits.header_read_timeout,
        limits.idle_timeout,
        limits.write_stall,
    );
    let mut watchdog = std::pin::pin!(watchdog);
    let mut draining = false;
    // Every branch is polled on every wake-up of this task (several per request): `evicted`
    // also fires on the server's stop (a child token, see `peers`), and `cut` only comes
    // after stop, so two signals are waited on, not three.
    loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            why = &mut watchdog, if !draining => {
                tracing::debug!(%peer, reason = ?why, "closing connection");
                if matches!(why, Verdict::HeaderTimeout | Verdict::Stalled) {
                    // A client stalling its request head, or not reading its answer, gets no
                    // more of our time (a graceful drain would wait on it).
                    return;
                }
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = evicted.cancelled(), if !draining => {
                // Chosen because it was idle, but the admission decision and this task run on
                // different workers: a request may have started in between. Cutting it could
                // drop a request the upstream already acted on, so a busy connection drains.
                // On the server's stop, every connection drains.
                if !conns.stop.is_cancelled() && tracker.is_idle() {
                    tracing::debug!(%peer, "closing an idle connection to make room for a newer one");
                    return;
                }
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = conns.cut.cancelled(), if draining => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    /// What the server decides from a client's first bytes.
    async fn decide(first: &[u8]) -> Option<bool> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        if first.is_empty() {
            drop(client);
        } else {
            client.write_all(first).await.unwrap();
        }
        let decided = h2_preface(&server).await;
        // Peeking leaves the bytes for hyper.
        if !first.is_empty() {
            let mut buf = vec![0u8; first.len()];
            server.peek(&mut buf).await.unwrap();
            assert_eq!(&buf[..], first);
        }
        decided
    }

    #[tokio::test]
    async fn http1_clients_get_the_http1_connection_and_h2c_clients_the_auto_one() {
        assert_eq!(decide(b"GET / HTTP/1.1\r\n").await, Some(false));
        // Shares its first letter with the preface.
        assert_eq!(decide(b"POST /x HTTP/1.1\r\n").await, Some(false));
        assert_eq!(decide(H2_PREFACE).await, Some(true));
        // A preface cut short cannot be told from HTTP/2 yet: the auto connection reads on.
        assert_eq!(decide(b"PRI * HT").await, Some(true));
        assert_eq!(decide(b"").await, None);
    }
}
