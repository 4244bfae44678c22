//! How requests reach one route's upstream.
//!
//! - Plain `http://` upstreams (HTTP/1.1): a connection is checked out of the route's
//!   [`H1Pool`] and driven **in the downstream connection's task**: the exchange future polls
//!   the `hyper::client::conn::http1` connection together with the response future, and the
//!   response body ([`PooledBody`]) keeps polling it while the body streams. No dispatch
//!   channel, no connection task, no cross-task wake-up per request (the legacy pooled client
//!   cost an mpsc hop, a oneshot back and a pool keyed by SipHash; docs/benchmarks.md). A
//!   connection goes back to the pool only when its response body ended cleanly and it is
//!   ready for the next request (not after an error, a cut body or `Connection: close`).
//!   Before a request is written upstream, the other tasks already ready run first
//!   ([`after_ready_tasks`]): requests read together are written together, which keeps an
//!   upstream on the same CPU from waking, and preempting the sidecar, once per request.
//! - `https://` upstreams (HTTP/1.1, or HTTP/2 when the upstream offers it by ALPN): the
//!   hyper-util pooled client, TLS verified against the system and webpki roots plus the
//!   route's `ca_file`, presenting the route's client certificate (mutual TLS, RFC 8705) when it
//!   has one, resolved per handshake so a rotated certificate reaches new connections.
//!
//! Invariants of the plain pool: keyed by authority (one route may reach several concrete
//! upstreams), at most `max_idle` idle connections in all (the most requests the route can have
//! in flight, `proxy.max_connections`: a steady load at any concurrency the sidecar admits never
//! reconnects), none older than [`IDLE_EXPIRY`]; a pooled connection is
//! polled before reuse and dropped if its peer closed it; a request that a pooled connection
//! could not even start sending (closed under our feet) is retried once on a new connection.

use std::collections::VecDeque;
use std::error::Error as _;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::RouteConfig;
use crate::tls::{self, TlsError};
use crate::token::mtls::{IdentitySource, Resolver};

/// A request body to the upstream: streamed from the downstream (under its progress deadline),
/// or buffered (small bodies, kept for a replay after a 401).
pub(crate) type UpstreamBody =
    http_body_util::Either<super::body::DeadlineBody<Incoming>, http_body_util::Full<bytes::Bytes>>;

pub(crate) type UpstreamClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// What one upstream exchange may buffer (docs/spec.md §6, the memory arithmetic): HTTP/1
/// read and write buffers (a response head must fit: 64 KiB, like our own `max_header_bytes`
/// default; hyper's default is ~400 KiB), and HTTP/2 flow-control windows and send buffer
/// (hyper's client defaults are 2 MiB per stream, 5 MiB per connection, 1 MiB send buffer).
pub(crate) const H1_MAX_BUF: usize = 64 * 1024;
pub(crate) const H2_STREAM_WINDOW: u32 = 128 * 1024;
pub(crate) const H2_CONNECTION_WINDOW: u32 = 512 * 1024;
pub(crate) const H2_MAX_SEND_BUF: usize = 64 * 1024;

/// An idle connection older than this is closed instead of reused (the legacy client's 90 s).
pub(crate) const IDLE_EXPIRY: Duration = Duration::from_secs(90);

/// A route's way to its upstream, and its timeouts.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    /// `https://` upstreams.
    client: UpstreamClient,
    /// `http://` upstreams: connections driven by the requesting task.
    plain: Arc<H1Pool>,
    /// Until the upstream's response headers arrive.
    pub(crate) timeout: Duration,
}

/// Why an exchange failed. `Hyper` keeps hyper's error (its `is_user` tells a broken request
/// body from a broken upstream); the chain never holds header values, so no token.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error(transparent)]
    Legacy(#[from] hyper_util::client::legacy::Error),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("connecting to the upstream failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connecting to the upstream timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("the upstream URI has no authority")]
    NoAuthority,
}

impl SendError {
    /// The progress deadline of the request body fired, and for how long it had waited.
    pub(crate) fn request_body_stalled(&self) -> Option<Duration> {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = current {
            if let Some(super::body::BodyError::Stalled(d)) = err.downcast_ref() {
                return Some(*d);
            }
            // `Hyper` is transparent: its own source() skips the hyper error.
            current = match err.downcast_ref::<SendError>() {
                Some(SendError::Hyper(h)) => h.source(),
                _ => err.source(),
            };
        }
        None
    }

    /// Whether the exchange failed because the application's request body broke (a malformed
    /// chunk, a connection cut mid-body, the progress deadline) rather than because of the
    /// upstream: hyper reports an error of the body it was sending as a "user" error.
    pub(crate) fn request_body_failed(&self) -> bool {
        let mut current: Option<&(dyn std::error::Error + 'static)> = match self {
            SendError::Hyper(h) => return h.is_user(),
            SendError::Legacy(e) => Some(e),
            _ => None,
        };
        while let Some(err) = current {
            if let Some(h) = err.downcast_ref::<hyper::Error>() {
                return h.is_user();
            }
            current = err.source();
        }
        false
    }
}

impl Upstream {
    /// `identity`: the certificate to present (the route's own, or the token client's with
    /// `use_token_client_cert`), loaded and checked by the caller.
    ///
    /// `max_idle`: idle connections kept per route (plain) and per authority (TLS). The caller
    /// passes `proxy.max_connections`, the most requests a listener has in flight: a smaller
    /// bound would close, at every peak above it, connections that the next requests reopen
    /// (measured: 64 connections against a bound of 32 cost 37 % of the throughput, one TCP
    /// handshake for every other request). Each idle connection holds at most hyper's buffers,
    /// `2 × H1_MAX_BUF` (plus TLS records): docs/spec.md §6 counts them.
    pub(crate) fn new(
        cfg: &RouteConfig,
        identity: Option<Arc<IdentitySource>>,
        max_idle: usize,
    ) -> Result<Upstream, TlsError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let mut tls = tls::client_config(cfg.ca_file.as_deref(), cfg.ca_only)?;
        if let Some(identity) = identity {
            tls.client_auth_cert_resolver = Arc::new(Resolver(identity));
        }
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_EXPIRY)
            .pool_max_idle_per_host(max_idle)
            .http1_max_buf_size(H1_MAX_BUF)
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
            .http2_max_send_buf_size(H2_MAX_SEND_BUF)
            .build(https);
        Ok(Upstream {
            client,
            plain: Arc::new(H1Pool::new(cfg.connect_timeout, max_idle)),
            timeout: cfg.timeout,
        })
    }

    /// One exchange: the request's URI is absolute (`upstream_request` built it). Resolves
    /// with the response head; the body streams (and, for a plain upstream, drives its
    /// connection).
    pub(crate) async fn send(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<UpstreamResponseBody>, SendError> {
        if req.uri().scheme() == Some(&Scheme::HTTP) {
            let resp = self.plain.send(req).await?;
            Ok(resp.map(UpstreamResponseBody::Pooled))
        } else {
            let resp = self.client.request(req).await?;
            Ok(resp.map(UpstreamResponseBody::Legacy))
        }
    }
}

type Conn = http1::Connection<TokioIo<TcpStream>, UpstreamBody>;

/// An idle plain connection: the sending half and the connection it drives.
struct Idle {
    authority: Authority,
    sender: http1::SendRequest<UpstreamBody>,
    conn: Box<Conn>,
    since: Instant,
}

/// The plain-HTTP/1.1 connections of one route that are between requests (see the module
/// docs), grouped by authority so that a lookup compares authorities once per group, not once
/// per connection (a route usually has one authority).
pub(crate) struct H1Pool {
    idle: Mutex<Idles>,
    /// Idle connections kept in all groups (≥ 1).
    max_idle: usize,
    connect_timeout: Duration,
    builder: http1::Builder,
}

#[derive(Default)]
struct Idles {
    /// At most `max_idle` groups are kept (empty ones beyond that are dropped).
    groups: Vec<Group>,
    /// Connections in all groups, at most `max_idle`.
    total: usize,
}

struct Group {
    authority: Authority,
    /// Oldest first.
    conns: VecDeque<Idle>,
}

/// The group of `authority`. Byte equality: our own URIs spell an authority one way; a second
/// spelling would only make a second group.
fn group<'a>(groups: &'a mut [Group], authority: &Authority) -> Option<&'a mut Group> {
    groups
        .iter_mut()
        .find(|g| g.authority.as_str() == authority.as_str())
}

impl Idles {
    /// Drops connections idle for longer than [`IDLE_EXPIRY`], in every group.
    fn expire(&mut self, now: Instant) {
        for g in &mut self.groups {
            while g
                .conns
                .front()
                .is_some_and(|i| now.saturating_duration_since(i.since) >= IDLE_EXPIRY)
            {
                g.conns.pop_front();
                self.total -= 1;
            }
        }
    }

    /// Drops the connection idle the longest, whatever its authority.
    fn drop_oldest(&mut self) {
        let oldest = self
            .groups
            .iter_mut()
            .filter(|g| !g.conns.is_empty())
            .min_by_key(|g| g.conns.front().map(|i| i.since));
        if let Some(g) = oldest {
            g.conns.pop_front();
            self.total -= 1;
        }
    }
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool").finish_non_exhaustive()
    }
}

impl H1Pool {
    fn new(connect_timeout: Duration, max_idle: usize) -> H1Pool {
        let mut builder = http1::Builder::new();
        // One flat buffer per write, like the server side (server/accept.rs `h1_builder`):
        // measured cheaper for the small heads and bodies a proxied API call carries.
        builder.max_buf_size(H1_MAX_BUF).writev(false);
        H1Pool {
            idle: Mutex::new(Idles::default()),
            max_idle: max_idle.max(1),
            connect_timeout,
            builder,
        }
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    /// The most recently used idle connection to `authority`, if any; the group's connections
    /// past [`IDLE_EXPIRY`] are dropped on the way.
    fn checkout(&self, authority: &Authority, now: Instant) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let idle = &mut *idle;
        let g = group(&mut idle.groups, authority)?;
        let mut dropped = 0;
        while g
            .conns
            .front()
            .is_some_and(|i| now.saturating_duration_since(i.since) >= IDLE_EXPIRY)
        {
            g.conns.pop_front();
            dropped += 1;
        }
        let got = g.conns.pop_back();
        idle.total -= dropped + usize::from(got.is_some());
        got
    }

    /// Takes back a connection whose exchange ended cleanly, within the bound: at the bound,
    /// the route's oldest idle connection makes room.
    fn checkin(&self, entry: Idle) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let idle = &mut *idle;
        if idle.total >= self.max_idle {
            idle.expire(entry.since);
            if idle.total >= self.max_idle {
                idle.drop_oldest();
            }
            if idle.groups.len() > self.max_idle {
                idle.groups.retain(|g| !g.conns.is_empty());
            }
        }
        let g = match group(&mut idle.groups, &entry.authority) {
            Some(g) => g,
            None => {
                idle.groups.push(Group {
                    authority: entry.authority.clone(),
                    conns: VecDeque::new(),
                });
                idle.groups.last_mut().expect("just pushed")
            }
        };
        g.conns.push_back(entry);
        idle.total += 1;
    }

    async fn connect(
        &self,
        authority: &Authority,
    ) -> Result<(http1::SendRequest<UpstreamBody>, Box<Conn>), SendError> {
        let port = authority.port_u16().unwrap_or(80);
        // `host()` keeps IPv6 brackets; the resolver wants the bare address.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| SendError::ConnectTimeout(self.connect_timeout))?
            .map_err(SendError::Connect)?;
        let _ = stream.set_nodelay(true);
        // The handshake only builds the state machine: no I/O until the connection is polled.
        let (sender, conn) = self.builder.handshake(TokioIo::new(stream)).await?;
        Ok((sender, Box::new(conn)))
    }

    async fn send(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let authority = req
            .uri()
            .authority()
            .cloned()
            .ok_or(SendError::NoAuthority)?;
        // On a connection of our own the request target is origin-form (RFC 9112 §3.2.1).
        let target = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(target);
        after_ready_tasks().await;
        // Pooled connections first; each either proves alive at once or is dropped. Bounded
        // by the pool's size.
        let now = Instant::now();
        while let Some(mut idle) = self.checkout(&authority, now) {
            if !alive(&mut idle).await {
                continue;
            }
            match exchange(&mut idle.sender, &mut idle.conn, req).await {
                Ok(resp) => return Ok(self.body(resp, authority, idle.sender, idle.conn)),
                // Closed before a byte of the request went out: safe to send on another one.
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let (mut sender, mut conn) = self.connect(&authority).await?;
        match exchange(&mut sender, &mut conn, req).await {
            Ok(resp) => Ok(self.body(resp, authority, sender, conn)),
            Err(e) => Err(e.into_error().into()),
        }
    }

    fn body(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        authority: Authority,
        sender: http1::SendRequest<UpstreamBody>,
        conn: Box<Conn>,
    ) -> Response<PooledBody> {
        // hyper closes after such a response anyway; saying so here keeps it out of the pool
        // without relying on that.
        let reusable = !resp
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        resp.map(|body| PooledBody {
            body,
            link: Some(Link {
                pool: self.clone(),
                authority,
                sender,
                conn,
            }),
            reusable,
        })
    }
}

/// Whether a pooled connection can take a request now: polled once (reading a close from its
/// peer ends it), then asked whether it is ready. Never waits.
async fn alive(idle: &mut Idle) -> bool {
    poll_fn(|cx| {
        if Pin::new(&mut idle.conn).poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        Poll::Ready(matches!(idle.sender.poll_ready(cx), Poll::Ready(Ok(()))))
    })
    .await
}

/// Lets the tasks that are ready now run before this request goes upstream: returns `Pending`
/// once, having woken itself, so the runtime polls it again after the tasks already queued
/// (Tokio puts a task that wakes itself at the back of its worker's queue). No timer, no
/// system call; one more poll of the request's future.
///
/// Why: the downstream connection drives its upstream connection in the same task, so without
/// this each request was written upstream in the poll that read it. An upstream on the same
/// CPU (the benchmark's; any pod with one CPU) woke on that write and preempted the sidecar,
/// and served one request per wake-up. Reading every ready request first and then writing
/// them, as the legacy client's hop to its connection tasks happened to do, restores nginx's
/// batching: on one CPU, involuntary context switches per request fell from 0.85 to 0.49,
/// nginx's level, and throughput rose about 9 % at 64 connections and 14–17 % at 32
/// (docs/benchmarks.md, "Issue 11, second pass").
async fn after_ready_tasks() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Sends `req` and waits for the response head, polling the connection in this task.
async fn exchange(
    sender: &mut http1::SendRequest<UpstreamBody>,
    conn: &mut Conn,
    req: Request<UpstreamBody>,
) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<UpstreamBody>>> {
    let mut response = std::pin::pin!(sender.try_send_request(req));
    let mut conn_done = false;
    poll_fn(|cx| {
        // The connection first: it writes the request and reads the answer into the response
        // future's channel, so one poll of each usually completes the step.
        if !conn_done && Pin::new(&mut *conn).poll(cx).is_ready() {
            // Ended (closed or failed): the response future now resolves with its error.
            conn_done = true;
        }
        response.as_mut().poll(cx)
    })
    .await
}

/// What a plain response body needs to drive its connection and give it back.
struct Link {
    pool: Arc<H1Pool>,
    authority: Authority,
    sender: http1::SendRequest<UpstreamBody>,
    /// Boxed once per connection (it is ~800 bytes): moving it per request would cost more.
    conn: Box<Conn>,
}

/// A plain upstream's response body: polls its connection (which feeds it) and returns the
/// connection to the pool when the body has ended cleanly.
pub(crate) struct PooledBody {
    body: Incoming,
    /// `None` once the connection ended or was given back.
    link: Option<Link>,
    reusable: bool,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

impl PooledBody {
    /// The body ended cleanly: one more poll lets the connection finish the exchange and say
    /// whether it wants the next request; only then is it pooled.
    fn release(&mut self, cx: &mut Context<'_>) {
        let Some(mut link) = self.link.take() else {
            return;
        };
        if !self.reusable || Pin::new(&mut link.conn).poll(cx).is_ready() {
            return;
        }
        if link.sender.is_ready() {
            link.pool.checkin(Idle {
                authority: link.authority,
                sender: link.sender,
                conn: link.conn,
                since: Instant::now(),
            });
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(link) = &mut this.link
            && Pin::new(&mut link.conn).poll(cx).is_ready()
        {
            // Ended: whatever it delivered is still in the body's channel; not reusable.
            this.link = None;
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.release(cx),
            Poll::Ready(Some(Err(_))) => this.link = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    /// hyper's server drops a body of known length after its last byte without polling it to
    /// the end (and never polls a HEAD answer's): a body that has seen all its bytes still
    /// gives its connection back. Anything cut short closes it.
    fn drop(&mut self) {
        if self.link.is_some() && self.body.is_end_stream() {
            self.release(&mut Context::from_waker(std::task::Waker::noop()));
        }
    }
}

/// The upstream's response body: a plain connection's, or the pooled client's.
#[derive(Debug)]
pub(crate) enum UpstreamResponseBody {
    Pooled(PooledBody),
    Legacy(Incoming),
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamResponseBody::Pooled(b) => Pin::new(b).poll_frame(cx),
            UpstreamResponseBody::Legacy(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamResponseBody::Pooled(b) => b.is_end_stream(),
            UpstreamResponseBody::Legacy(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamResponseBody::Pooled(b) => b.size_hint(),
            UpstreamResponseBody::Legacy(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// On one CPU (the single-threaded scheduler) a request goes upstream only after the other
    /// connections' requests that were ready with it have been read.
    #[tokio::test(flavor = "current_thread")]
    async fn a_request_goes_upstream_after_the_requests_already_ready() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|name| {
                let order = order.clone();
                tokio::spawn(async move {
                    order.lock().unwrap().push(format!("{name} read"));
                    super::after_ready_tasks().await;
                    order.lock().unwrap().push(format!("{name} upstream"));
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            [
                "a read",
                "b read",
                "c read",
                "a upstream",
                "b upstream",
                "c upstream"
            ]
        );
    }

    fn upstream(addr: std::net::SocketAddr) -> Upstream {
        let cfg: RouteConfig = toml::from_str(&format!(
            "name = \"r\"\npath_prefix = \"/\"\nupstream = \"http://{addr}\"\nallow_insecure_upstream = true\n"
        ))
        .unwrap();
        Upstream::new(&cfg, None, MAX_IDLE).unwrap()
    }

    /// The idle bound the tests build their upstreams with (`proxy.max_connections` in the
    /// product).
    const MAX_IDLE: usize = 16;

    /// A loopback upstream answering every request head with `answer`; counts connections.
    /// With `close_after_one`, it closes each connection after one answer (silently, without
    /// `Connection: close`). Answers only once `hold` connections have arrived.
    async fn serve(
        answer: &'static [u8],
        close_after_one: bool,
        hold: usize,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                if count.fetch_add(1, Ordering::SeqCst) + 1 == hold {
                    gate.add_permits(1_000);
                }
                let gate = gate.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            drop(gate.acquire().await.unwrap());
                            if s.write_all(answer).await.is_err() || close_after_one {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn get(addr: std::net::SocketAddr) -> Request<UpstreamBody> {
        Request::get(format!("http://{addr}/x"))
            .header(http::header::HOST, addr.to_string())
            .body(http_body_util::Either::Right(http_body_util::Full::new(
                Bytes::new(),
            )))
            .unwrap()
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    fn idle(u: &Upstream) -> usize {
        u.plain.idle_count()
    }

    #[tokio::test]
    async fn a_plain_exchange_runs_in_the_callers_task_and_reuses_its_connection() {
        let (addr, accepted) = serve(OK, false, 1).await;
        let u = upstream(addr);
        let metrics = tokio::runtime::Handle::current().metrics();
        let tasks = metrics.num_alive_tasks();
        for _ in 0..3 {
            let resp = u.send(get(addr)).await.unwrap();
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            // The legacy client keeps a spawned task per upstream connection; here the
            // connection is driven by whoever polls the exchange and its body.
            // (The test upstream's own task per connection is counted.)
            assert_eq!(
                metrics.num_alive_tasks(),
                tasks + accepted.load(Ordering::SeqCst),
                "no task per upstream connection"
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");
        assert_eq!(idle(&u), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_reused() {
        let (addr, accepted) = serve(OK, true, 1).await;
        let u = upstream(addr);
        for _ in 0..3 {
            let resp = u.send(get(addr)).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            // Let the close arrive before the next checkout.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_close_answer_or_a_body_cut_short_is_not_pooled() {
        let (addr, _) = serve(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            false,
            1,
        )
        .await;
        let u = upstream(addr);
        let resp = u.send(get(addr)).await.unwrap();
        resp.into_body().collect().await.unwrap();
        assert_eq!(idle(&u), 0);

        let (addr, _) = serve(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nok", false, 1).await;
        let u = upstream(addr);
        let resp = u.send(get(addr)).await.unwrap();
        drop(resp); // the downstream went away before the body ended
        assert_eq!(idle(&u), 0);
    }

    /// `n` requests at once to each of `addrs`; each upstream answers only once all `n` of
    /// its connections are open, so `n` connections per address are needed at once.
    async fn at_once(u: &Upstream, addrs: &[std::net::SocketAddr], n: usize) {
        let all = addrs.iter().flat_map(|&addr| {
            let u = u.clone();
            (0..n).map(move |_| {
                let u = u.clone();
                async move {
                    let resp = u.send(get(addr)).await.unwrap();
                    resp.into_body().collect().await.unwrap();
                }
            })
        });
        futures_join_all(all).await;
    }

    #[tokio::test]
    async fn a_peak_up_to_the_bound_is_kept_and_served_again_without_reconnecting() {
        // The upstream's gate opens once MAX_IDLE connections are open, then stays open.
        let (addr, accepted) = serve(OK, false, MAX_IDLE).await;
        let u = upstream(addr);
        at_once(&u, &[addr], MAX_IDLE).await;
        assert_eq!(idle(&u), MAX_IDLE, "every connection of the peak is kept");
        for _ in 0..3 {
            at_once(&u, &[addr], MAX_IDLE).await;
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            MAX_IDLE,
            "the same peak again reuses them: no new connection"
        );
    }

    #[tokio::test]
    async fn the_idle_pool_is_bounded_per_route_across_authorities() {
        // One route reaching three authorities (as a wildcard host route does), each with
        // MAX_IDLE + 4 connections at once: 60 connections, MAX_IDLE kept.
        let mut addrs = Vec::new();
        for _ in 0..3 {
            addrs.push(serve(OK, false, MAX_IDLE + 4).await.0);
        }
        let u = upstream(addrs[0]);
        at_once(&u, &addrs, MAX_IDLE + 4).await;
        assert_eq!(idle(&u), MAX_IDLE);
    }

    async fn futures_join_all<F: Future<Output = ()> + Send + 'static>(
        all: impl Iterator<Item = F>,
    ) {
        let mut set = tokio::task::JoinSet::new();
        for f in all {
            set.spawn(f);
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    }
}
