//! docs/reliability.md §6, "bad input from every side" (docs/spec.md §5 for the answers): malformed HTTP from the application, written as raw
//! bytes to an in-process sidecar. Each one is refused with a 4xx (by hyper's parser or by the
//! sidecar) or the connection is closed, and the upstream receives nothing. Afterwards the
//! sidecar still serves a normal request.
//!
//! Framing the sidecar cannot forward faithfully is refused and the connection closed
//! (`Transfer-Encoding` other than exactly `chunked`, `Content-Length` together with
//! `Transfer-Encoding`). Header
//! rules in both directions: names in `Connection` go whatever bytes surround them, and an
//! upstream cannot send `token-sidecar-error` to the application. The raw requests say `Host: a`,
//! which the setup's `allowed_hosts` makes local.
//!
//! Every exchange is bounded by a timeout; every test is bounded as a whole.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::faults::{FakeTokenEndpoint, Mode};
use crate::support::upstream::Upstream;
use crate::support::{RouteBuilder, Running, SidecarConfig, fixture};

/// Bound on a whole test.
const TEST_BOUND: Duration = Duration::from_secs(60);
/// Bound on one raw exchange (write, then read the answer).
const EXCHANGE_BOUND: Duration = Duration::from_secs(5);

struct Setup {
    _idp: FakeTokenEndpoint,
    up: Upstream,
    sc: Running,
}

/// A sidecar with small head limits (16 KiB, 20 headers) and one path route `/api/` (stripped)
/// to a recording upstream; ready (its token fetched) when this returns. The raw requests say
/// `Host: a`, which `allowed_hosts` lets path routes answer.
async fn setup() -> Setup {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
            .proxy(|p| {
                p.header_read_timeout = Duration::from_secs(3);
                p.max_header_bytes = 16384;
                p.max_headers = 20;
                p.allowed_hosts = vec!["a".into()];
            })
            .route(RouteBuilder::path("api", "/api/", &up.url()).scope(&["orders:read"])),
    )
    .await;
    sc.wait_ready().await;
    Setup { _idp: idp, up, sc }
}

/// How a raw exchange ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// A whole response (head plus its declared body) arrived.
    Response,
    /// The sidecar closed the connection (FIN) after whatever it sent.
    Closed,
    /// The connection was reset.
    Reset,
    /// Nothing more within the exchange bound.
    TimedOut,
}

#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: Option<u16>,
    pub(crate) head: String,
    pub(crate) body: Vec<u8>,
    pub(crate) end: End,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// Not a success, not an upstream answer, and not a gateway error from forwarding.
    fn assert_refused(&self, what: &str) {
        if let Some(s) = self.status {
            assert!(
                (400..500).contains(&s),
                "{what}: expected a 4xx or a closed connection, got {s}\n{}",
                self.head
            );
        } else {
            assert_ne!(
                self.end,
                End::TimedOut,
                "{what}: no answer and the connection stayed open"
            );
        }
        assert!(
            self.header("x-upstream").is_none(),
            "{what}: the upstream answered\n{}",
            self.head
        );
    }
}

impl Reply {
    /// Refused, or failed with the sidecar's own error response (marked with
    /// `token-sidecar-error`), but never a success and never the upstream's answer.
    fn assert_refused_or_sidecar_error(&self, what: &str) {
        if self.header("token-sidecar-error").is_some() {
            assert!(
                self.status.is_some_and(|s| s >= 400),
                "{what}: {}",
                self.head
            );
            return;
        }
        self.assert_refused(what);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Whether `buf` holds a complete response: a head, and then as many body bytes as
/// `Content-Length` says (or a chunked body's last chunk).
fn complete(buf: &[u8]) -> bool {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let body = &buf[end + 4..];
    if head.starts_with("http/1.1 1") {
        // An interim response; wait for the final one.
        return complete(body);
    }
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= len;
    }
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n");
    }
    false
}

/// Opens a new connection, writes `request` (a server that refuses early may close or reset
/// while the rest is still being written; that is not an error here), then reads the answer.
pub(crate) async fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut stream = tokio::time::timeout(EXCHANGE_BOUND, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let _ = tokio::time::timeout(EXCHANGE_BOUND, stream.write_all(request)).await;
    let _ = stream.flush().await;

    let deadline = tokio::time::Instant::now() + EXCHANGE_BOUND;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let end = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => break End::TimedOut,
            Ok(Ok(0)) => break End::Closed,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                if complete(&buf) {
                    break End::Response;
                }
            }
            Ok(Err(_)) => break End::Reset,
        }
    };
    let (head, body) = match find(&buf, b"\r\n\r\n") {
        Some(i) => (
            String::from_utf8_lossy(&buf[..i]).into_owned(),
            buf[i + 4..].to_vec(),
        ),
        None => (String::from_utf8_lossy(&buf).into_owned(), Vec::new()),
    };
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok());
    Reply {
        status,
        head,
        body,
        end,
    }
}

/// The upstream records a request once its handler has run; give a forwarded request time to
/// arrive before asserting that none did.
pub(crate) async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

pub(crate) async fn bounded(test: impl std::future::Future<Output = ()>) {
    tokio::time::timeout(TEST_BOUND, test)
        .await
        .expect("test finished in time");
}

/// Invalid bytes in the request head; hyper's parser answers 400 before any routing.
fn malformed_heads() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "header name with a space",
            b"GET /api/x HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n".to_vec(),
        ),
        (
            "space before the colon",
            b"GET /api/x HTTP/1.1\r\nHost : a\r\n\r\n".to_vec(),
        ),
        (
            "control character in a header name",
            b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-\x01Bad: v\r\n\r\n".to_vec(),
        ),
        (
            "NUL in a header value",
            b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Bad: a\x00b\r\n\r\n".to_vec(),
        ),
        (
            "bare CR in a header value",
            b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Bad: a\rb\r\n\r\n".to_vec(),
        ),
        (
            "obsolete line folding",
            b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n".to_vec(),
        ),
        (
            "empty header name",
            b"GET /api/x HTTP/1.1\r\nHost: a\r\n: v\r\n\r\n".to_vec(),
        ),
        (
            "unknown HTTP version",
            b"GET /api/x HTTP/1.7\r\nHost: a\r\n\r\n".to_vec(),
        ),
        (
            "space in the request target",
            b"GET /api/a b HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        ),
        (
            "control character in the request target",
            b"GET /api/a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        ),
    ]
}

/// Bodies whose framing is ambiguous or broken; hyper refuses them at the head.
fn bad_framing() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "two different Content-Length headers",
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(),
        ),
        (
            "a Content-Length list with different values",
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\nhello!".to_vec(),
        ),
        (
            "a negative Content-Length",
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n".to_vec(),
        ),
        (
            "a signed Content-Length",
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello".to_vec(),
        ),
        (
            "a Content-Length beyond u64",
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec(),
        ),
        (
            "Transfer-Encoding without chunked last",
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            b"POST /api/x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
        ),
    ]
}

/// Heads beyond `max_header_bytes` (16 KiB) or `max_headers` (20).
fn oversize_heads() -> Vec<(&'static str, Vec<u8>)> {
    let long_uri = format!(
        "GET /api/{} HTTP/1.1\r\nHost: a\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let long_header = format!(
        "GET /api/x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20 * 1024)
    );
    let many_small = {
        let mut s = String::from("GET /api/x HTTP/1.1\r\nHost: a\r\n");
        for i in 0..1000 {
            s.push_str(&format!("X-H{i}: {}\r\n", "c".repeat(20)));
        }
        s + "\r\n"
    };
    let too_many = {
        let mut s = String::from("GET /api/x HTTP/1.1\r\nHost: a\r\n");
        for i in 0..25 {
            s.push_str(&format!("X-H{i}: v\r\n"));
        }
        s + "\r\n"
    };
    vec![
        ("a 100 KiB request target", long_uri.into_bytes()),
        ("one 20 KiB header", long_header.into_bytes()),
        ("a 30 KiB header block", many_small.into_bytes()),
        ("26 headers (max_headers = 20)", too_many.into_bytes()),
    ]
}

/// Requests that parse but that the sidecar refuses itself.
fn refused_by_the_sidecar() -> Vec<(&'static str, Vec<u8>, u16, &'static str)> {
    vec![
        (
            "CONNECT",
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_vec(),
            405,
            "method_not_allowed",
        ),
        (
            "absolute-form for an unknown host",
            b"GET http://unknown.example/ HTTP/1.1\r\nHost: unknown.example\r\n\r\n".to_vec(),
            404,
            "no_route",
        ),
        (
            "asterisk-form",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "a dot-dot segment",
            b"GET /api/../admin HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "an encoded dot-dot segment",
            b"GET /api/.%2E/admin HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
    ]
}

/// Request smuggling: both `Content-Length` and `Transfer-Encoding: chunked`. The chunked body
/// is `0\r\n\r\n` (empty); what follows is a second request a desynchronized hop would run.
const CL_AND_TE: &[u8] = b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 42\r\n\
Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: a\r\n\r\n";

/// The same with the headers the other way round.
const TE_AND_CL: &[u8] = b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
Content-Length: 42\r\n\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: a\r\n\r\n";

/// A chunked body whose first chunk size is not hex.
const BAD_CHUNK_SIZE: &[u8] =
    b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";

/// A chunk longer than its declared size.
const BAD_CHUNK_LENGTH: &[u8] =
    b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n";

const NORMAL: &[u8] = b"GET /api/ok?q=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// One table of refusals: malformed header bytes and conflicting or invalid body framing each
/// get 400, and nothing of them reaches the upstream.
#[tokio::test]
async fn malformed_heads_and_body_framing_are_400_and_not_forwarded() {
    bounded(async {
        let s = setup().await;
        for (what, req) in malformed_heads().into_iter().chain(bad_framing()) {
            let r = exchange(s.sc.addr, &req).await;
            r.assert_refused(what);
            assert_eq!(r.status, Some(400), "{what}: {r:?}");
        }
        settle().await;
        assert!(
            s.up.received().iter().all(|r| r.body_len < 5),
            "{:?}",
            s.up.received()
        );
        s.sc.stop().await;
    })
    .await;
}

/// `Content-Length` + `Transfer-Encoding` (request smuggling's classic shape): hyper frames it
/// by `Transfer-Encoding` and hides `Content-Length` from the service; the sidecar, which sees
/// the head's bytes (`server::framing`), refuses it with 400 and `Connection: close`, as Envoy
/// does. Nothing is forwarded and the trailing request is never run. On a keep-alive connection
/// the request with both headers is refused also when it is not the first.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_400_and_closes_the_connection() {
    bounded(async {
        let s = setup().await;
        for (what, req) in [("CL then TE", CL_AND_TE), ("TE then CL", TE_AND_CL)] {
            let (text, closed) = exchange_to_close(s.sc.addr, req).await;
            assert!(text.starts_with("HTTP/1.1 400 "), "{what}: {text}");
            let lower = text.to_ascii_lowercase();
            assert!(
                lower.contains("token-sidecar-error: bad_request"),
                "{what}: {text}"
            );
            assert!(lower.contains("connection: close"), "{what}: {text}");
            assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{what}: {text}");
            assert!(closed, "{what}: the connection stayed open");
        }
        // The conflicting request second on a keep-alive connection.
        let mut stream = TcpStream::connect(s.sc.addr).await.unwrap();
        stream
            .write_all(b"GET /api/first HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(EXCHANGE_BOUND, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200 "),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        stream.write_all(CL_AND_TE).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(EXCHANGE_BOUND, stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the connection stayed open");
        let rest = String::from_utf8_lossy(&rest);
        assert!(rest.starts_with("HTTP/1.1 400 "), "{rest}");
        settle().await;
        let got = s.up.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].path_and_query, "/first");
        s.sc.stop().await;
    })
    .await;
}

/// A broken chunked body, as the sidecar handles it today. It streams bodies of unknown length,
/// so the request is on its way upstream before the broken chunk is decoded: the application
/// gets the sidecar's own error (never a success, never the upstream's answer), and the
/// upstream never sees a complete request — nothing at all when the very first chunk is
/// broken (hyper's client sends the head with the first body bytes), the head and the valid
/// bytes before the break, then an aborted body, otherwise.
#[tokio::test]
async fn invalid_chunked_body_never_reaches_the_upstream_whole() {
    bounded(async {
        let s = setup().await;

        let r = exchange(s.sc.addr, BAD_CHUNK_SIZE).await;
        r.assert_refused_or_sidecar_error("chunk size not hex");
        settle().await;
        assert_eq!(s.up.count(), 0, "{:?}", s.up.received());

        let r = exchange(s.sc.addr, BAD_CHUNK_LENGTH).await;
        r.assert_refused_or_sidecar_error("chunk longer than its size");
        settle().await;
        for got in s.up.received() {
            assert!(
                got.body_len < 5,
                "the upstream got the whole broken body: {got:?}"
            );
        }
        s.sc.stop().await;
    })
    .await;
}

/// A client's broken chunked body is the client's fault: 400 `bad_request`, not a 502. A chunked
/// body streams, so a chunk that breaks after valid bytes has already sent the head and those
/// bytes; the upstream sees the request aborted, never complete (see the test above).
#[tokio::test]
async fn invalid_chunked_body_is_400() {
    bounded(async {
        let s = setup().await;
        for (what, req) in [
            ("chunk size not hex", BAD_CHUNK_SIZE),
            ("chunk longer than its size", BAD_CHUNK_LENGTH),
        ] {
            let r = exchange(s.sc.addr, req).await;
            r.assert_refused(what);
            assert_eq!(r.status, Some(400), "{what}: {r:?}");
        }
        settle().await;
        assert!(
            s.up.received().iter().all(|r| r.body_len < 5),
            "{:?}",
            s.up.received()
        );
        s.sc.stop().await;
    })
    .await;
}

#[tokio::test]
async fn oversize_heads_are_refused_and_not_forwarded() {
    bounded(async {
        let s = setup().await;
        for (what, req) in oversize_heads() {
            let r = exchange(s.sc.addr, &req).await;
            r.assert_refused(what);
            // hyper answers 431 (head too large) unless the close races the answer.
            assert!(
                r.status == Some(431) || (r.status.is_none() && r.end != End::TimedOut),
                "{what}: {r:?}"
            );
        }
        settle().await;
        assert_eq!(s.up.count(), 0, "{:?}", s.up.received());
        s.sc.stop().await;
    })
    .await;
}

#[tokio::test]
async fn connect_absolute_form_and_dot_segments_are_refused_by_the_sidecar() {
    bounded(async {
        let s = setup().await;
        for (what, req, status, code) in refused_by_the_sidecar() {
            let r = exchange(s.sc.addr, &req).await;
            r.assert_refused(what);
            assert_eq!(r.status, Some(status), "{what}: {r:?}");
            assert_eq!(r.header("token-sidecar-error"), Some(code), "{what}: {r:?}");
            let body: serde_json::Value = serde_json::from_slice(&r.body)
                .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {r:?}"));
            assert_eq!(body["error"], code, "{what}");
        }
        settle().await;
        assert_eq!(s.up.count(), 0, "{:?}", s.up.received());
        s.sc.stop().await;
    })
    .await;
}

/// HTTP/1.0 has no Host header; a path route needs none, so this one is forwarded (as
/// HTTP/1.1, with the upstream's Host and the token) and the connection closes after it.
#[tokio::test]
async fn http10_without_host_reaches_a_path_route() {
    bounded(async {
        let s = setup().await;
        let r = exchange(s.sc.addr, b"GET /api/old?x=1 HTTP/1.0\r\n\r\n").await;
        assert_eq!(r.status, Some(200), "{r:?}");
        assert!(r.head.starts_with("HTTP/1.0 200"), "{r:?}");
        assert_eq!(r.header("x-upstream"), Some("recorder"));
        let got = s.up.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].path_and_query, "/old?x=1");
        assert_eq!(
            got[0].headers["host"].to_str().unwrap(),
            s.up.addr.to_string()
        );
        assert!(got[0].bearer().is_some_and(|b| b.starts_with("fake-")));
        // HTTP/1.0 without keep-alive: the sidecar closes after the answer.
        let again = exchange(s.sc.addr, b"GET /api/old HTTP/1.0\r\n\r\n").await;
        assert_eq!(again.status, Some(200));
        s.sc.stop().await;
    })
    .await;
}

/// Everything above against one sidecar, then a normal request on a new connection: still
/// served, and it is the only request the upstream ever saw.
#[tokio::test]
async fn sidecar_keeps_serving_after_hostile_input() {
    bounded(async {
        let s = setup().await;
        let mut hostile: Vec<(&str, Vec<u8>)> = Vec::new();
        hostile.extend(malformed_heads());
        hostile.extend(bad_framing());
        hostile.extend(oversize_heads());
        hostile.extend(
            refused_by_the_sidecar()
                .into_iter()
                .map(|(what, req, _, _)| (what, req)),
        );
        // Half a request line, then silence: cut off by header_read_timeout (3 s here), and
        // meanwhile the others are served.
        let mut slow = TcpStream::connect(s.sc.addr).await.unwrap();
        slow.write_all(b"GET /api/slow HT").await.unwrap();
        for (what, req) in &hostile {
            exchange(s.sc.addr, req).await.assert_refused(what);
        }
        settle().await;
        assert_eq!(s.up.count(), 0, "{:?}", s.up.received());

        let r = exchange(s.sc.addr, NORMAL).await;
        assert_eq!(r.status, Some(200), "{r:?}");
        assert_eq!(r.end, End::Response);
        let got = s.up.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].path_and_query, "/ok?q=1");
        assert!(got[0].bearer().is_some_and(|b| b.starts_with("fake-")));

        // The slow client is cut off by header_read_timeout (hyper may say 408 first, or just
        // close), and it never reached the upstream.
        let mut rest = Vec::new();
        let cut = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
        assert!(cut.is_ok(), "a half-sent request head was not cut off");
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "slow client got: {rest}"
        );
        assert_eq!(s.up.count(), 1);
        s.sc.stop().await;
    })
    .await;
}

/// Writes `request` on a new connection and reads until the sidecar closes it (bounded): the
/// bytes, and whether it closed within the bound.
async fn exchange_to_close(addr: SocketAddr, request: &[u8]) -> (String, bool) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = tokio::time::timeout(EXCHANGE_BOUND, stream.write_all(request)).await;
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(EXCHANGE_BOUND, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&buf).into_owned(), closed)
}

/// Transfer codings other than exactly `chunked` are refused with 400 and the connection is
/// closed, so the body bytes that follow are never read as a next request. `gzip, chunked` and
/// repeated `chunked` reach the sidecar (hyper frames by the last coding) and it refuses them
/// itself with `Connection: close`; a last coding other than `chunked`, and any coding in
/// HTTP/1.0, hyper's parser refuses before the sidecar sees the request, also closing.
#[tokio::test]
async fn transfer_codings_other_than_chunked_are_400_and_close_the_connection() {
    bounded(async {
        let s = setup().await;
        let body_then_next = "5\r\nhello\r\n0\r\n\r\nGET /api/next HTTP/1.1\r\nHost: a\r\n\r\n";
        let by_sidecar = [
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: identity, chunked\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        ];
        let by_hyper = [
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: \r\n",
        ];
        for (te, ours) in by_sidecar
            .iter()
            .map(|t| (t, true))
            .chain(by_hyper.iter().map(|t| (t, false)))
        {
            let req = format!("POST /api/x HTTP/1.1\r\nHost: a\r\n{te}\r\n{body_then_next}");
            let (text, closed) = exchange_to_close(s.sc.addr, req.as_bytes()).await;
            assert!(text.starts_with("HTTP/1.1 400 "), "{te:?}: {text}");
            assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{te:?}: {text}");
            assert!(closed, "{te:?}: the connection stayed open");
            let lower = text.to_ascii_lowercase();
            if ours {
                assert!(lower.contains("token-sidecar-error: bad_request"), "{te:?}: {text}");
                assert!(lower.contains("connection: close"), "{te:?}: {text}");
            }
        }
        // The framing refusal wins over every other one, so the connection is always closed.
        let req = format!(
            "TRACE /api/../x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\
Transfer-Encoding: gzip, chunked\r\n\r\n{body_then_next}"
        );
        let (text, closed) = exchange_to_close(s.sc.addr, req.as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
        assert!(closed, "the connection stayed open");
        settle().await;
        assert_eq!(s.up.count(), 0, "{:?}", s.up.received());
        // Plain `chunked`, in any case, still streams through.
        let req = b"POST /api/ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let r = exchange(s.sc.addr, req).await;
        assert_eq!(r.status, Some(200), "{r:?}");
        assert_eq!(s.up.received()[0].body.as_deref(), Some(&b"hello"[..]));
        s.sc.stop().await;
    })
    .await;
}

/// Every header the application names in `Connection` is dropped, even when the list also
/// holds bytes that are not ASCII (which used to make the sidecar ignore the whole list).
#[tokio::test]
async fn connection_names_with_non_ascii_neighbours_are_still_stripped() {
    bounded(async {
        let s = setup().await;
        let req =
            b"GET /api/hop HTTP/1.1\r\nHost: a\r\nConnection: X-Secret-Hop, caf\xc3\xa9, \xff\r\n\
X-Secret-Hop: for-the-sidecar-only\r\nX-Kept: 1\r\nConnection: close\r\n\r\n";
        let r = exchange(s.sc.addr, req).await;
        assert_eq!(r.status, Some(200), "{r:?}");
        let got = s.up.received();
        assert_eq!(got.len(), 1);
        assert!(
            got[0].headers.get("x-secret-hop").is_none(),
            "{:?}",
            got[0].headers
        );
        assert_eq!(got[0].headers["x-kept"], "1");
        s.sc.stop().await;
    })
    .await;
}

/// An upstream on loopback that answers every request with `response` and closes; counts them.
async fn raw_upstream(
    response: &'static [u8],
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while find(&head, b"\r\n\r\n").is_none() && head.len() < 65536 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = stream.write_all(response).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, count, task)
}

/// The application sees `token-sidecar-error` only when the sidecar itself made the error: an
/// upstream's copy is removed (the upstream's status and body pass unchanged), and so are the
/// headers the upstream names in `Connection`, non-ASCII bytes in that list notwithstanding.
#[tokio::test]
async fn an_upstream_cannot_speak_for_the_sidecar_or_hide_its_hop_by_hop_headers() {
    bounded(async {
        let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
        let (up, count, task) = raw_upstream(
            b"HTTP/1.1 502 Bad Gateway\r\nToken-Sidecar-Error: token_rejected\r\n\
Connection: X-Up-Hop, \xff\xfe\r\nX-Up-Hop: upstream-only\r\nX-Kept: 1\r\nContent-Length: 2\r\n\r\nno",
        )
        .await;
        let sc = Running::start(
            SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
                .route(RouteBuilder::path("api", "/api/", &format!("http://{up}"))),
        )
        .await;
        sc.wait_ready().await;
        let r = exchange(
            sc.addr,
            b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(r.status, Some(502), "{r:?}");
        assert_eq!(r.body, b"no");
        assert_eq!(r.header("x-kept"), Some("1"), "{r:?}");
        assert!(r.header("token-sidecar-error").is_none(), "{r:?}");
        assert!(r.header("x-up-hop").is_none(), "{r:?}");
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
        task.abort();
        sc.stop().await;
    })
    .await;
}
