//! Per-connection timeouts that hyper does not separate: how long a client may take to send a
//! request's head (`header_read_timeout`, against slow-header attacks) and how long a
//! keep-alive connection may sit idle between requests (`idle_timeout`).
//!
//! hyper's own header-read timer also runs while an HTTP/1.1 connection waits for its next
//! request, so it cannot express a short header timeout with a long idle timeout. Instead, the
//! socket is wrapped in [`TrackedIo`], which notes when bytes move, and the service marks requests
//! in flight; a watchdog per connection decides from those facts alone ([`verdict`], pure) when
//! the connection has to go.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::framing::HeadScan;
use crate::proxy::headers::FramingConflict;

const NONE: u64 = u64::MAX;

/// What the watchdog knows about one connection. Times are milliseconds since `origin`.
#[derive(Debug)]
pub(crate) struct Tracker {
    origin: Instant,
    /// Last time bytes were read or written.
    last_io: AtomicU64,
    /// When the first byte of a request head arrived while no request was in flight.
    head_started: AtomicU64,
    in_flight: AtomicUsize,
    /// HTTP/2 clients send frames (SETTINGS acks, WINDOW_UPDATEs, PINGs) between requests; after
    /// the first request the header clock no longer applies to them, only the idle clock.
    http2: AtomicBool,
    /// The last scanned request head carried both `Content-Length` and `Transfer-Encoding`
    /// ([`super::framing`]); taken by the request it belongs to.
    framing_conflict: AtomicBool,
    /// At least one request has been handed to the service.
    served: AtomicBool,
}

impl Tracker {
    pub(crate) fn new() -> Arc<Tracker> {
        Arc::new(Tracker {
            origin: Instant::now(),
            last_io: AtomicU64::new(0),
            // A new connection owes us a request head: one that connects and stays silent is
            // cut after header_read_timeout, not idle_timeout.
            head_started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            framing_conflict: AtomicBool::new(false),
            served: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn on_read(&self) {
        let now = self.now_ms();
        self.last_io.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0 && !self.http2.load(Ordering::Relaxed) {
            let _ =
                self.head_started
                    .compare_exchange(NONE, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    fn on_write(&self) {
        self.last_io.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A request's head has been parsed and handed to the service. An HTTP/1 request whose
    /// head carried both `Content-Length` and `Transfer-Encoding` is marked with
    /// [`FramingConflict`] for the proxy to refuse.
    pub(crate) fn request_started<B>(self: &Arc<Self>, req: &mut http::Request<B>) -> InFlight {
        let version = req.version();
        if self.framing_conflict.swap(false, Ordering::Relaxed) && version < http::Version::HTTP_2 {
            req.extensions_mut().insert(FramingConflict);
        }
        if version == http::Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.served.store(true, Ordering::Relaxed);
        self.head_started.store(NONE, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// No request in flight: silent, sending a head, or kept alive between requests.
    pub(crate) fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }

    /// Kept alive between requests for at least `quiet`: served at least one, none in flight,
    /// no next head arriving, no bytes moved for `quiet`. Closing it costs the client a
    /// reconnect; `quiet` keeps us from closing a connection the client is reusing right now
    /// (its request would be cut before we read it).
    pub(crate) fn is_kept_alive_idle(&self, quiet: Duration) -> bool {
        self.is_idle()
            && self.served.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == NONE
            && self
                .now_ms()
                .saturating_sub(self.last_io.load(Ordering::Relaxed))
                >= quiet.as_millis() as u64
    }

    fn snapshot(&self) -> Snapshot {
        let head = self.head_started.load(Ordering::Relaxed);
        Snapshot {
            now_ms: self.now_ms(),
            last_io_ms: self.last_io.load(Ordering::Relaxed),
            head_started_ms: (head != NONE).then_some(head),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// Held for as long as a request (and its response body) is in flight.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Tracker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        // Idle time counts from the end of the last exchange.
        self.0.on_write();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) now_ms: u64,
    pub(crate) last_io_ms: u64,
    pub(crate) head_started_ms: Option<u64>,
    pub(crate) in_flight: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Keep,
    /// A request head has been arriving for longer than `header_read_timeout`.
    HeaderTimeout,
    /// No request in flight and no bytes moved for `idle_timeout`.
    Idle,
    /// A request in flight and no bytes moved for the write-stall bound (admin listener only):
    /// a client that stops reading its answer (a zero HTTP/2 window, a full receive buffer).
    Stalled,
}

/// Pure: whether a connection in state `s` must be closed.
pub(crate) fn verdict(
    s: Snapshot,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    write_stall: Option<Duration>,
) -> Verdict {
    if s.in_flight > 0 {
        // A proxy request may be silent for as long as its upstream thinks (route.timeout
        // bounds that); an admin answer is ready at once, so silence means the client stopped
        // reading and holds its slot for nothing.
        return match write_stall {
            Some(bound) if s.now_ms.saturating_sub(s.last_io_ms) >= bound.as_millis() as u64 => {
                Verdict::Stalled
            }
            _ => Verdict::Keep,
        };
    }
    if let Some(started) = s.head_started_ms
        && s.now_ms.saturating_sub(started) >= header_read_timeout.as_millis() as u64
    {
        return Verdict::HeaderTimeout;
    }
    if s.head_started_ms.is_none()
        && s.now_ms.saturating_sub(s.last_io_ms) >= idle_timeout.as_millis() as u64
    {
        return Verdict::Idle;
    }
    Verdict::Keep
}

/// Resolves when the connection must be closed, checking a few times per timeout.
pub(crate) async fn watchdog(
    tracker: Arc<Tracker>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    write_stall: Option<Duration>,
) -> Verdict {
    let tick = (header_read_timeout.min(idle_timeout) / 4).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(tick).await;
        let v = verdict(
            tracker.snapshot(),
            header_read_timeout,
            idle_timeout,
            write_stall,
        );
        if v != Verdict::Keep {
            return v;
        }
    }
}

/// A socket that reports its traffic to a [`Tracker`].
#[derive(Debug)]
pub(crate) struct TrackedIo<T> {
    inner: T,
    tracker: Arc<Tracker>,
    head: HeadScan,
}

impl<T> TrackedIo<T> {
    pub(crate) fn new(inner: T, tracker: Arc<Tracker>) -> Self {
        TrackedIo {
            inner,
            tracker,
            head: HeadScan::default(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.tracker.on_read();
            let t = &self.tracker;
            let between_requests =
                t.in_flight.load(Ordering::Relaxed) == 0 && !t.http2.load(Ordering::Relaxed);
            let this = &mut *self;
            if let Some(conflict) = this.head.feed(&buf.filled()[before..], between_requests) {
                this.tracker
                    .framing_conflict
                    .store(conflict, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.tracker.on_write();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.tracker.on_write();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that keeps its request counted as in flight until it is finished or dropped,
/// so a long download is never mistaken for an idle connection, and holds the request's slot
/// in its listener's request limit (see `accept.rs`) for as long.
#[derive(Debug)]
pub(crate) struct TrackedBody<B> {
    inner: B,
    _in_flight: InFlight,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<B> TrackedBody<B> {
    pub(crate) fn new(
        inner: B,
        in_flight: InFlight,
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Self {
        TrackedBody {
            inner,
            _in_flight: in_flight,
            _slot: slot,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn snap(now: u64, last_io: u64, head: Option<u64>, in_flight: usize) -> Snapshot {
        Snapshot {
            now_ms: now,
            last_io_ms: last_io,
            head_started_ms: head,
            in_flight,
        }
    }

    #[test]
    fn a_request_in_flight_is_never_cut() {
        assert_eq!(
            verdict(snap(999_999, 0, Some(0), 1), S(1), S(1), None),
            Verdict::Keep
        );
    }

    #[test]
    fn a_slow_head_is_cut_after_the_header_timeout_even_while_bytes_trickle() {
        // Bytes arrived 100 ms ago, but the head started 10 s ago.
        assert_eq!(
            verdict(snap(10_000, 9_900, Some(0), 0), S(10), S(60), None),
            Verdict::HeaderTimeout
        );
        assert_eq!(
            verdict(snap(9_999, 9_900, Some(0), 0), S(10), S(60), None),
            Verdict::Keep
        );
    }

    #[test]
    fn an_idle_connection_is_cut_after_the_idle_timeout_not_the_header_timeout() {
        assert_eq!(
            verdict(snap(30_000, 0, None, 0), S(10), S(60), None),
            Verdict::Keep
        );
        assert_eq!(
            verdict(snap(60_000, 0, None, 0), S(10), S(60), None),
            Verdict::Idle
        );
        // And a short idle timeout with a long header timeout works too.
        assert_eq!(
            verdict(snap(2_000, 0, None, 0), S(30), S(2), None),
            Verdict::Idle
        );
    }
}
