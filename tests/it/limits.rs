//! docs/reliability.md §3 (limits; the keys are in docs/spec.md §4): every limit, when hit, gives its documented answer (or cut), nothing is forwarded
//! for the offending request, and the sidecar keeps serving other clients meanwhile.
//!
//! Requests that break the HTTP rules on purpose are written by hand on raw loopback sockets;
//! each test bounds its whole run with a timeout.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

use crate::support::faults::{FakeTokenEndpoint, Mode};
use crate::support::process::free_port;
use crate::support::upstream::Upstream;
use crate::support::{RouteBuilder, Running, SidecarConfig, fixture, http_client};

/// Upper bound on any one test of this file.
const TEST_BOUND: Duration = Duration::from_secs(60);

async fn bounded<F: Future<Output = ()>>(test: F) {
    timeout(TEST_BOUND, test)
        .await
        .expect("the test finished within its time bound");
}

/// The shared test config with a 1 s shutdown grace; each test adds its limits and routes.
fn limits_config(token_url: &str) -> SidecarConfig {
    SidecarConfig::new(token_url, fixture("ec_p256_sec1.pem"))
        .proxy(|p| p.shutdown_grace = Duration::from_secs(1))
}

async fn idp() -> FakeTokenEndpoint {
    FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await
}

// ---- raw HTTP/1.1 on a socket ---------------------------------------------------------------

#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// Status line and headers, as received.
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one response with a `Content-Length` body (all this sidecar and its test upstream send
/// here) from a socket that may stay open afterwards.
async fn read_response(s: &mut TcpStream) -> std::io::Result<RawResponse> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    let mut resp = RawResponse {
        status,
        head,
        body: Vec::new(),
    };
    let len: usize = resp
        .header("content-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    resp.body = buf[head_end..head_end + len].to_vec();
    Ok(resp)
}

/// A keep-alive `GET` request head.
fn get(path: &str, extra_headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra_headers}\r\n").into_bytes()
}

/// One request on a new connection, answer read (bounded).
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    timeout(Duration::from_secs(10), async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        read_response(&mut s).await.unwrap()
    })
    .await
    .expect("an answer within 10 s")
}

/// A normal `GET` on a new connection; the answer (bounded).
async fn raw_get(addr: SocketAddr, path: &str) -> RawResponse {
    raw_exchange(addr, &get(path, "Connection: close\r\n")).await
}

/// Reads until the peer closes (EOF or reset); how long that took, and what was read.
async fn wait_closed(s: &mut TcpStream, within: Duration) -> Option<(Duration, Vec<u8>)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    timeout(within, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return (start.elapsed(), got),
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .ok()
}

// ---- proxy.max_connections ------------------------------------------------------------------

#[tokio::test]
async fn max_connections_leaves_further_clients_waiting_until_a_slot_frees() {
    bounded(async {
        let idp = idp().await;
        let up = Upstream::start().await;
        // A route with its own port: the limit is per listener, so that port keeps serving.
        let dedicated = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let routes = [
            RouteBuilder::path("orders", "/orders/", &up.url()),
            RouteBuilder::dedicated("own-port", dedicated, &up.url()),
        ];
        let sc = Running::start(
            limits_config(&idp.token_url())
                .proxy(|p| {
                    p.max_connections = 2;
                    p.header_read_timeout = Duration::from_secs(10);
                })
                .routes(routes),
        )
        .await;
        sc.wait_ready().await;

        // Two clients each have a 1.5 s request in flight: both slots are busy.
        let mut held = Vec::new();
        for i in 0..2 {
            let mut s = TcpStream::connect(sc.addr).await.unwrap();
            s.write_all(&get(&format!("/orders/slow/1500?held={i}"), ""))
                .await
                .unwrap();
            held.push(s);
        }
        while up.count() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // A third client: the kernel completes its handshake, but the sidecar does not serve
        // it while both connections are busy.
        let mut third = TcpStream::connect(sc.addr).await.unwrap();
        third.write_all(&get("/orders/third", "")).await.unwrap();
        let mut waiting = tokio::spawn(async move {
            let r = read_response(&mut third).await;
            (r, third)
        });
        assert!(
            timeout(Duration::from_millis(500), &mut waiting)
                .await
                .is_err(),
            "the third connection was served while max_connections = 2 were busy"
        );
        assert_eq!(up.count(), 2, "the third request was not forwarded");

        // Meanwhile other listeners keep serving: the route's own port and the admin port.
        let r = raw_get(dedicated, "/other").await;
        assert_eq!(r.status, 200, "{}", r.head);
        let health = http_client()
            .get(format!("http://{}/healthz", sc.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), 200);

        // The held requests finish and their connections idle (kept alive): the waiting client
        // takes the slot of the older one at once.
        let mut done = Vec::new();
        for s in &mut held {
            let r = timeout(Duration::from_secs(5), read_response(s))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.head);
            done.push(Instant::now());
        }
        let (r, third) = timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting client is served once a connection idles")
            .unwrap();
        let r = r.unwrap();
        assert_eq!(r.status, 200, "{}", r.head);
        let served_after = done[1].elapsed();
        eprintln!("max_connections: third client served {served_after:?} after the slots idled");
        assert!(up.received().iter().any(|r| r.path_and_query == "/third"));
        assert!(
            wait_closed(&mut held[0], Duration::from_secs(2))
                .await
                .is_some(),
            "the oldest idle keep-alive connection made room"
        );

        // Idle keep-alive connections never keep a newcomer out: both slots are idle now, and
        // a fourth client is served at once.
        let t = Instant::now();
        let r = raw_get(sc.addr, "/orders/fourth").await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        drop((held, third));
        sc.stop().await;
    })
    .await
}

// ---- proxy.max_header_bytes -----------------------------------------------------------------

#[tokio::test]
async fn a_request_head_over_max_header_bytes_is_431_and_not_forwarded() {
    bounded(async {
        let idp = idp().await;
        let up = Upstream::start().await;
        let sc = Running::start(
            limits_config(&idp.token_url())
                .proxy(|p| p.max_header_bytes = 16384)
                .route(RouteBuilder::path("orders", "/orders/", &up.url())),
        )
        .await;
        sc.wait_ready().await;

        // Under the limit: an 8 KiB header passes.
        let pad = "a".repeat(8 * 1024);
        let r = raw_exchange(
            sc.addr,
            &get(
                "/orders/small",
                &format!("X-Pad: {pad}\r\nConnection: close\r\n"),
            ),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.head);

        // Over it: a 20 KiB header, while another client is served at the same time.
        let pad = "a".repeat(20 * 1024);
        let big = get("/orders/big", &format!("X-Pad: {pad}\r\n"));
        let (big, normal) = tokio::join!(raw_exchange(sc.addr, &big), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            raw_get(sc.addr, "/orders/normal").await
        });
        assert_eq!(big.status, 431, "{}", big.head);
        assert_eq!(normal.status, 200, "{}", normal.head);

        let paths: Vec<String> = up
            .received()
            .into_iter()
            .map(|r| r.path_and_query)
            .collect();
        assert_eq!(paths.len(), 2, "{paths:?}");
        assert!(!paths.contains(&"/big".to_string()), "{paths:?}");
        // Still serving afterwards.
        assert_eq!(raw_get(sc.addr, "/orders/after").await.status, 200);
        sc.stop().await;
    })
    .await
}

// ---- proxy.max_headers ----------------------------------------------------------------------

#[tokio::test]
async fn more_headers_than_max_headers_is_431_and_not_forwarded() {
    bounded(async {
        let idp = idp().await;
        let up = Upstream::start().await;
        let sc = Running::start(
            limits_config(&idp.token_url())
                .proxy(|p| p.max_headers = 20)
                .route(RouteBuilder::path("orders", "/orders/", &up.url())),
        )
        .await;
        sc.wait_ready().await;
        let headers = |n: usize| -> String { (0..n).map(|i| format!("X-H{i}: v\r\n")).collect() };

        // 15 headers (+ Host, Connection) fit.
        let r = raw_exchange(
            sc.addr,
            &get(
                "/orders/fifteen",
                &format!("{}Connection: close\r\n", headers(15)),
            ),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.head);

        // 40 do not; another client is served at the same time.
        let many = get("/orders/forty", &headers(40));
        let (many, normal) = tokio::join!(raw_exchange(sc.addr, &many), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            raw_get(sc.addr, "/orders/normal").await
        });
        assert!((400..500).contains(&many.status), "{}", many.head);
        assert_eq!(many.status, 431, "{}", many.head);
        assert_eq!(normal.status, 200, "{}", normal.head);

        let paths: Vec<String> = up
            .received()
            .into_iter()
            .map(|r| r.path_and_query)
            .collect();
        assert_eq!(paths, ["/fifteen", "/normal"]);
        sc.stop().await;
    })
    .await
}

// ---- proxy.header_read_timeout --------------------------------------------------------------

async fn timeout_sidecar(up: &Upstream, idp: &FakeTokenEndpoint) -> Running {
    let sc = Running::start(
        limits_config(&idp.token_url())
            .proxy(|p| p.header_read_timeout = Duration::from_secs(1))
            .route(RouteBuilder::path("orders", "/orders/", &up.url())),
    )
    .await;
    sc.wait_ready().await;
    sc
}

#[tokio::test]
async fn a_client_sending_its_head_byte_by_byte_is_cut_after_header_read_timeout() {
    bounded(async {
        let idp = idp().await;
        let up = Upstream::start().await;
        let sc = timeout_sidecar(&up, &idp).await;

        // One byte every 300 ms: the 60-byte head would take 18 s.
        let head = get("/orders/slowloris", "X-Slow: aaaaaaaaaaaaaaaaaaaa\r\n");
        let stream = TcpStream::connect(sc.addr).await.unwrap();
        let started = Instant::now();
        let (mut rd, mut wr) = stream.into_split();
        let writer = tokio::spawn(async move {
            for b in head {
                if wr.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            loop {
                match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => return (started.elapsed(), got),
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        });

        // Meanwhile another client is served normally.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let t = Instant::now();
        let r = raw_get(sc.addr, "/orders/normal").await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );

        let (closed_after, got) = timeout(Duration::from_secs(3), reader)
            .await
            .expect("the slow client was cut off within 3 s")
            .unwrap();
        writer.abort();
        assert!(
            closed_after >= Duration::from_millis(800),
            "cut after {closed_after:?}, before the 1 s timeout"
        );
        let answer = String::from_utf8_lossy(&got);
        eprintln!("header_read_timeout: slow client cut after {closed_after:?}, answer {answer:?}");
        assert!(
            got.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "closed, or 408: {answer:?}"
        );
        let paths: Vec<String> = up
            .received()
            .into_iter()
            .map(|r| r.path_and_query)
            .collect();
        assert_eq!(paths, ["/normal"]);
        sc.stop().await;
    })
    .await
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    bounded(async {
        let idp = idp().await;
        let up = Upstream::start().await;
        // `idle_timeout` (2 s here) bounds an idle keep-alive connection, not
        // header_read_timeout (1 s).
        let bound = Duration::from_secs(2);
        let sc = Running::start(
            limits_config(&idp.token_url())
                .proxy(|p| {
                    p.header_read_timeout = Duration::from_secs(1);
                    p.idle_timeout = bound;
                })
                .route(RouteBuilder::path("orders", "/orders/", &up.url())),
        )
        .await;
        sc.wait_ready().await;

        let mut s = TcpStream::connect(sc.addr).await.unwrap();
        s.write_all(&get("/orders/once", "")).await.unwrap();
        let r = timeout(Duration::from_secs(5), read_response(&mut s))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status, 200);
        assert_ne!(r.header("connection"), Some("close"), "kept alive");

        let (idle, got) = wait_closed(&mut s, bound + Duration::from_secs(2))
            .await
            .unwrap_or_else(|| {
                panic!("the idle keep-alive connection was still open {bound:?} + 2 s later")
            });
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
        eprintln!("idle keep-alive connection closed after {idle:?} (idle_timeout {bound:?})");
        assert!(
            idle >= bound - Duration::from_millis(300),
            "closed after {idle:?}: before the {bound:?} idle bound"
        );
        sc.stop().await;
    })
    .await
}

#[tokio::test]
async fn silent_connections_are_cut_after_header_read_timeout_and_free_their_slots() {
    bounded(async {
        let idp = idp().await;
        let up = Upstream::start().await;
        let sc = Running::start(
            limits_config(&idp.token_url())
                .proxy(|p| {
                    p.header_read_timeout = Duration::from_secs(1);
                    p.max_connections = 2;
                })
                .route(RouteBuilder::path("orders", "/orders/", &up.url())),
        )
        .await;
        sc.wait_ready().await;

        // Two clients connect and send nothing at all: both slots are taken ...
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(TcpStream::connect(sc.addr).await.unwrap());
        }
        // ... until header_read_timeout cuts them.
        for (i, s) in silent.iter_mut().enumerate() {
            let closed = wait_closed(s, Duration::from_secs(3)).await;
            assert!(
                closed.is_some(),
                "silent connection {i} still open after 3 s (header_read_timeout = 1s)"
            );
        }
        // Then a normal client is served.
        let r = timeout(
            Duration::from_secs(3),
            raw_get(sc.addr, "/orders/after-silent"),
        )
        .await
        .expect("a normal client is served once the silent ones are cut");
        assert_eq!(r.status, 200, "{}", r.head);
        sc.stop().await;
    })
    .await
}

#[tokio::test]
async fn an_http2_client_stalling_its_headers_is_cut_after_header_read_timeout() {
    bounded(async {
        let idp = idp().await;
        let up = Upstream::start().await;
        let sc = timeout_sidecar(&up, &idp).await;

        // The HTTP/2 preface, an empty SETTINGS frame, then a HEADERS frame header announcing a
        // 16-byte header block (stream 1, END_HEADERS) of which nothing follows.
        let mut s = TcpStream::connect(sc.addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap();
        s.write_all(&[0, 0, 16, 0x1, 0x4, 0, 0, 0, 1])
            .await
            .unwrap();
        let closed = wait_closed(&mut s, Duration::from_secs(3)).await;
        assert!(
            closed.is_some(),
            "an HTTP/2 client stalled in its headers was still connected after 3 s \
             (header_read_timeout = 1s)"
        );
        assert_eq!(up.count(), 0);
        sc.stop().await;
    })
    .await
}

#[tokio::test]
async fn an_idle_http2_connection_lasts_until_the_idle_timeout() {
    bounded(async {
        let idp = idp().await;
        let up = Upstream::start().await;
        let sc = Running::start(
            limits_config(&idp.token_url())
                .proxy(|p| {
                    p.header_read_timeout = Duration::from_secs(1);
                    p.idle_timeout = Duration::from_secs(3);
                })
                .route(RouteBuilder::path("orders", "/orders/", &up.url())),
        )
        .await;
        sc.wait_ready().await;

        // HTTP/2 with prior knowledge: one request, then the connection idles.
        let stream = TcpStream::connect(sc.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<Bytes>>(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(stream),
            )
            .await
            .unwrap();
        let closed = tokio::spawn(async move {
            let _ = conn.await;
            Instant::now()
        });
        let req = Request::get(sc.url("/orders/h2"))
            .body(http_body_util::Empty::new())
            .unwrap();
        let resp = timeout(Duration::from_secs(5), sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        let idle_from = Instant::now();

        let closed_at = timeout(Duration::from_secs(6), closed)
            .await
            .expect("the idle HTTP/2 connection was closed within 6 s (idle_timeout = 3s)")
            .unwrap();
        let idle = closed_at - idle_from;
        eprintln!("idle HTTP/2 connection closed after {idle:?}");
        assert!(
            idle >= Duration::from_millis(2500),
            "an idle HTTP/2 connection was closed after {idle:?}; idle_timeout is 3 s \
             (header_read_timeout 1 s)"
        );
        drop(sender);
        sc.stop().await;
    })
    .await
}

// ---- route connect_timeout and timeout ------------------------------------------------------

/// A loopback address whose `connect()` hangs: a listener that never accepts, with its backlog
/// full, so Linux drops further SYNs. `None` if the kernel here answers instead of hanging.
async fn hanging_connect_target() -> Option<(tokio::net::TcpListener, Vec<TcpStream>)> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => {
                eprintln!("connect to a full backlog failed at once ({e}) instead of hanging");
                return None;
            }
            Err(_) => return Some((listener, fillers)),
        }
    }
    eprintln!("8 connects to a listen(1) socket that never accepts all completed");
    None
}

#[tokio::test]
async fn a_hanging_upstream_connect_is_502_after_connect_timeout_and_a_slow_one_504() {
    bounded(async {
        let Some((stuck, _fillers)) = hanging_connect_target().await else {
            eprintln!("SKIPPED: this kernel does not make connect() hang on a full backlog");
            return;
        };
        let stuck = format!("http://{}", stuck.local_addr().unwrap());
        let idp = idp().await;
        let up = Upstream::start().await;
        let routes = [
            RouteBuilder::path("orders", "/orders/", &up.url()),
            RouteBuilder::path("stuck", "/stuck/", &stuck).with(|r| {
                r.strip_prefix = false;
                r.connect_timeout = Duration::from_millis(500);
                r.timeout = Duration::from_secs(10);
            }),
            RouteBuilder::path("slow", "/slow/", &up.url()).with(|r| {
                r.strip_prefix = false;
                r.timeout = Duration::from_secs(1);
            }),
        ];
        let sc = Running::start(limits_config(&idp.token_url()).routes(routes)).await;
        sc.wait_ready().await;

        let t = Instant::now();
        let (stuck_resp, normal) = tokio::join!(raw_get(sc.addr, "/stuck/x"), async {
            // Served while the other request's connect hangs.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let r = raw_get(sc.addr, "/orders/normal").await;
            (r, t.elapsed())
        });
        let took = t.elapsed();
        assert_eq!(stuck_resp.status, 502, "{}", stuck_resp.head);
        assert_eq!(
            stuck_resp.header("token-sidecar-error"),
            Some("upstream_unavailable")
        );
        let body: serde_json::Value = serde_json::from_slice(&stuck_resp.body).unwrap();
        assert_eq!(body["error"], "upstream_unavailable");
        assert_eq!(body["route"], "stuck");
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(2),
            "502 after {took:?}; connect_timeout is 500 ms"
        );
        assert_eq!(normal.0.status, 200, "{}", normal.0.head);
        eprintln!(
            "connect_timeout: 502 after {took:?}; other request 200 at {:?}",
            normal.1
        );
        assert!(normal.1 < Duration::from_millis(400), "{:?}", normal.1);

        // The response timeout (covered in routing.rs): 1 s route timeout, 3 s upstream.
        let r = raw_get(sc.addr, "/slow/slow/3000").await;
        assert_eq!(
            (r.status, r.header("token-sidecar-error")),
            (504, Some("upstream_timeout"))
        );
        sc.stop().await;
    })
    .await
}

// ---- token.max_response_bytes ---------------------------------------------------------------

/// A token endpoint that answers scope `big` with a 100 KB JSON token response (with a
/// Content-Length), scope `big-chunked` with the same chunked (no length), and anything else
/// with a small normal one.
struct BigTokenEndpoint {
    addr: SocketAddr,
    scopes: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BigTokenEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type TokenBody = BoxBody<Bytes, Infallible>;

impl BigTokenEndpoint {
    async fn start() -> BigTokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scopes = Arc::new(Mutex::new(Vec::new()));
        let seen = scopes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let seen = seen.clone();
                        async move { Ok::<_, Infallible>(Self::handle(seen, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        BigTokenEndpoint { addr, scopes, task }
    }

    fn token_url(&self) -> String {
        format!("http://{}/oauth2/token", self.addr)
    }

    fn requests_for(&self, scope: &str) -> usize {
        self.scopes
            .lock()
            .unwrap()
            .iter()
            .filter(|s| *s == scope)
            .count()
    }

    async fn handle(seen: Arc<Mutex<Vec<String>>>, req: Request<Incoming>) -> Response<TokenBody> {
        let form = req.into_body().collect().await.unwrap().to_bytes();
        let scope = url::form_urlencoded::parse(&form)
            .find(|(k, _)| k == "scope")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        seen.lock().unwrap().push(scope.clone());
        // A valid token response: only its size is wrong.
        let big = serde_json::json!({
            "access_token": "big-token",
            "token_type": "bearer",
            "expires_in": 300,
            "padding": "p".repeat(100 * 1024),
        })
        .to_string();
        let body: TokenBody = match scope.as_str() {
            "big" => Full::new(Bytes::from(big)).boxed(),
            "big-chunked" => {
                let chunks: Vec<Result<Frame<Bytes>, Infallible>> = Bytes::from(big)
                    .chunks(8 * 1024)
                    .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                    .collect();
                StreamBody::new(futures_util::stream::iter(chunks)).boxed()
            }
            _ => Full::new(Bytes::from(
                serde_json::json!({
                    "access_token": format!("token-for-{scope}"),
                    "token_type": "bearer",
                    "expires_in": 300,
                })
                .to_string(),
            ))
            .boxed(),
        };
        let mut r = Response::new(body);
        *r.status_mut() = StatusCode::OK;
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        r
    }
}

#[tokio::test]
async fn a_token_response_over_max_response_bytes_is_503_and_nothing_is_forwarded() {
    bounded(async {
        let idp = BigTokenEndpoint::start().await;
        let up = Upstream::start().await;
        let routes = [
            RouteBuilder::path("big", "/big/", &up.url()).scope(&["big"]),
            RouteBuilder::path("chunked", "/chunked/", &up.url()).scope(&["big-chunked"]),
            RouteBuilder::path("ok", "/ok/", &up.url()).scope(&["ok"]),
        ];
        let sc = Running::start(
            limits_config(&idp.token_url())
                .token(|t| {
                    t.max_response_bytes = 2048;
                    t.request_timeout = Duration::from_secs(2);
                    t.retry_backoff_initial = Duration::from_millis(100);
                })
                .routes(routes),
        )
        .await;
        let client = http_client();

        // The route with a normally sized token is served (readyz never turns 200 here).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = client.get(sc.url("/ok/x")).send().await.unwrap();
            if r.status() == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "the ok route never served");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        for path in ["/big/x", "/chunked/x"] {
            let t = Instant::now();
            let resp = client.get(sc.url(path)).send().await.unwrap();
            assert!(
                t.elapsed() < Duration::from_secs(4),
                "{path}: {:?}",
                t.elapsed()
            );
            assert_eq!(resp.status(), 503, "{path}");
            assert_eq!(resp.headers()["token-sidecar-error"], "token_unavailable");
            assert!(resp.headers().contains_key("retry-after"), "{path}");
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["error"], "token_unavailable");
            let description = body["error_description"].as_str().unwrap_or_default();
            assert!(description.contains("2048"), "{path}: {description}");
            eprintln!(
                "max_response_bytes: {path} -> 503 in {:?}: {description}",
                t.elapsed()
            );

            // Meanwhile the other route keeps being served.
            let r = client.get(sc.url("/ok/y")).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
        assert!(idp.requests_for("big") >= 1);
        assert!(idp.requests_for("big-chunked") >= 1);
        let got = up.received();
        assert!(
            got.iter()
                .all(|r| r.bearer().as_deref() == Some("token-for-ok")),
            "only the ok route forwarded: {:?}",
            got.iter().map(|r| &r.path_and_query).collect::<Vec<_>>()
        );
        sc.stop().await;
    })
    .await
}

// ---- proxy.body_read_timeout ----------------------------------------------------------------

#[tokio::test]
async fn a_stalled_request_body_is_408_and_its_connection_closed_before_any_token_is_taken() {
    bounded(async {
        let idp = idp().await;
        let up = Upstream::start().await;
        let bound = Duration::from_secs(1);
        let sc = Running::start(
            limits_config(&idp.token_url())
                .proxy(|p| p.body_read_timeout = bound)
                .route(RouteBuilder::path("orders", "/orders/", &up.url())),
        )
        .await;
        sc.wait_ready().await;

        // Content-Length: 10, then 3 bytes and silence.
        let stalled =
            b"POST /orders/stalled HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nabc";
        let mut s = TcpStream::connect(sc.addr).await.unwrap();
        s.write_all(stalled).await.unwrap();
        let t = Instant::now();
        // Meanwhile another client is served.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(raw_get(sc.addr, "/orders/normal").await.status, 200);
        let r = timeout(Duration::from_secs(5), read_response(&mut s))
            .await
            .expect("an answer within 5 s (body_read_timeout = 1s)")
            .unwrap();
        let took = t.elapsed();
        assert_eq!(r.status, 408, "{}", r.head);
        assert_eq!(r.header("token-sidecar-error"), Some("request_timeout"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"], "request_timeout");
        assert!(
            took >= bound - Duration::from_millis(200),
            "408 after {took:?}"
        );
        let closed = wait_closed(&mut s, Duration::from_secs(2)).await;
        assert!(closed.is_some(), "the connection stayed open after the 408");
        eprintln!("body_read_timeout: stalled body -> 408 after {took:?}, connection closed");
        let paths: Vec<String> = up
            .received()
            .into_iter()
            .map(|r| r.path_and_query)
            .collect();
        assert_eq!(paths, ["/normal"], "the stalled request was not forwarded");
        sc.stop().await;

        // The body is read before the token is taken: with no token to be had at all (the
        // token endpoint refuses connections), the stalled body still gets 408, not 503.
        let nowhere = format!("http://127.0.0.1:{}/token", free_port());
        let sc = Running::start(
            limits_config(&nowhere)
                .proxy(|p| p.body_read_timeout = bound)
                .route(RouteBuilder::path("orders", "/orders/", &up.url())),
        )
        .await;
        let mut s = TcpStream::connect(sc.addr).await.unwrap();
        s.write_all(stalled).await.unwrap();
        let r = timeout(Duration::from_secs(5), read_response(&mut s))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert_eq!(r.status, 408, "{}", r.head);
        sc.stop().await;
    })
    .await
}

/// An upstream that reads each request body to its end and reports how many bytes came and
/// whether the body ended cleanly or broke off (the request was aborted).
async fn body_reporting_upstream() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(u64, bool)>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let mut body = req.into_body();
                        let mut n = 0u64;
                        let complete = loop {
                            match body.frame().await {
                                None => break true,
                                Some(Err(_)) => break false,
                                Some(Ok(f)) => {
                                    n += f.data_ref().map_or(0, |d| d.len() as u64);
                                }
                            }
                        };
                        let _ = tx.send((n, complete));
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, rx, task)
}

#[tokio::test]
async fn a_streamed_body_that_stalls_midway_aborts_the_upstream_request_and_frees_the_connection() {
    bounded(async {
        let idp = idp().await;
        let (up, mut reports, up_task) = body_reporting_upstream().await;
        let bound = Duration::from_secs(1);
        let sc = Running::start(
            limits_config(&idp.token_url())
                .proxy(|p| p.body_read_timeout = bound)
                .route(
                    RouteBuilder::path("orders", "/orders/", &format!("http://{up}"))
                        // Long enough that only the body deadline can end the exchange.
                        .with(|r| r.timeout = Duration::from_secs(30)),
                ),
        )
        .await;
        sc.wait_ready().await;

        // Two bodies too large to buffer (retry_body_limit is 64 KiB): chunked, and with a
        // Content-Length of 1 MiB; each sends 100 KiB and goes silent.
        let sent = 100 * 1024;
        let chunked = format!(
            "POST /orders/up HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{sent:x}\r\n"
        );
        let sized = "POST /orders/up HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1048576\r\n\r\n"
            .to_string();
        for (what, head) in [("chunked", chunked), ("1 MiB Content-Length", sized)] {
            let mut s = TcpStream::connect(sc.addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(&vec![b'x'; sent]).await.unwrap();
            let t = Instant::now();
            let (got, complete) = timeout(Duration::from_secs(5), reports.recv())
                .await
                .unwrap_or_else(|_| panic!("{what}: the upstream request still open after 5 s"))
                .unwrap();
            let aborted_after = t.elapsed();
            assert!(!complete, "{what}: the upstream saw a complete body");
            assert_eq!(got, sent as u64, "{what}: the upstream got what was sent");
            // The downstream hears 408 (no response had started) and is disconnected.
            let r = timeout(Duration::from_secs(2), read_response(&mut s))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer"))
                .unwrap();
            assert_eq!(r.status, 408, "{what}: {}", r.head);
            let closed = wait_closed(&mut s, Duration::from_secs(2)).await;
            assert!(closed.is_some(), "{what}: the downstream connection stayed open");
            eprintln!("body_read_timeout: {what} body stalled after 100 KiB -> upstream request aborted after {aborted_after:?}, 408, connection closed");
            assert!(aborted_after >= bound - Duration::from_millis(200));
        }
        up_task.abort();
        sc.stop().await;
    })
    .await
}

// ---- proxy.max_concurrent_streams -----------------------------------------------------------

/// `n` concurrent `GET path` on one HTTP/2 connection, started after one warm-up request
/// (`/orders/warm`) has been answered, so the client knows the server's SETTINGS; the statuses,
/// once all are answered. (A client that opens streams before it has the SETTINGS gets the
/// excess ones refused with `REFUSED_STREAM`.)
async fn h2_burst(addr: SocketAddr, path: &str, n: usize) -> tokio::task::JoinHandle<Vec<u16>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .unwrap();
    tokio::spawn(conn);
    let warm = Request::get(format!("http://localhost:{}/orders/warm", addr.port()))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = sender.clone().send_request(warm).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let uri = format!("http://localhost:{}{path}", addr.port());
    tokio::spawn(async move {
        let requests = (0..n).map(|_| {
            let mut sender = sender.clone();
            let req = Request::get(&uri)
                .body(http_body_util::Empty::new())
                .unwrap();
            async move {
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status().as_u16();
                resp.into_body().collect().await.unwrap();
                status
            }
        });
        futures_util::future::join_all(requests).await
    })
}

#[tokio::test]
async fn an_http2_client_opening_more_streams_than_allowed_has_them_limited() {
    bounded(async {
        let idp = idp().await;
        let up = Upstream::start().await;
        let sc = Running::start(
            limits_config(&idp.token_url())
                .proxy(|p| p.max_concurrent_streams = 2)
                .route(RouteBuilder::path("orders", "/orders/", &up.url())),
        )
        .await;
        sc.wait_ready().await;

        // Six 1-second requests on one connection: two at a time reach the upstream.
        let burst = h2_burst(sc.addr, "/orders/slow/1000", 6).await;
        let t = Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            up.count(),
            1 + 2,
            "streams in flight at once (after the warm-up)"
        );
        let statuses = timeout(Duration::from_secs(10), burst)
            .await
            .unwrap()
            .unwrap();
        let took = t.elapsed();
        assert_eq!(statuses, [200; 6]);
        eprintln!("max_concurrent_streams = 2: six 1 s requests on one connection took {took:?}");
        assert!(
            took >= Duration::from_millis(2900),
            "{took:?}: not three waves"
        );
        sc.stop().await;
    })
    .await
}

#[tokio::test]
async fn http2_streams_count_against_the_listeners_request_limit() {
    bounded(async {
        let idp = idp().await;
        let up = Upstream::start().await;
        // Two requests in flight per listener at most, whatever the streams per connection.
        let sc = Running::start(
            limits_config(&idp.token_url())
                .proxy(|p| {
                    p.max_connections = 2;
                    p.max_concurrent_streams = 8;
                })
                .route(RouteBuilder::path("orders", "/orders/", &up.url())),
        )
        .await;
        sc.wait_ready().await;
        let burst = h2_burst(sc.addr, "/orders/slow/1000", 4).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            up.count(),
            1 + 2,
            "requests in flight on the listener (after the warm-up)"
        );
        let statuses = timeout(Duration::from_secs(10), burst)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(statuses, [200; 4]);
        sc.stop().await;
    })
    .await
}
