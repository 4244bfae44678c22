//! docs/reliability.md §3 (docs/spec.md §6): the admin listener cannot be starved. Idle
//! connections, from one peer or from many, never keep `/healthz` from answering; a silent
//! client is cut after the admin's own (short) head timeout; no request body is read.
//!
//! All of 127.0.0.0/8 is loopback on Linux, so a client bound to 127.0.0.2 is a second peer.
//! Each test bounds its whole run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};

use crate::support::faults::{FakeTokenEndpoint, Mode};
use crate::support::upstream::Upstream;
use crate::support::{RouteBuilder, Running, SidecarConfig, fixture};

const TEST_BOUND: Duration = Duration::from_secs(60);

/// The bound the issue sets for `/healthz` under attack.
const HEALTHZ_BOUND: Duration = Duration::from_millis(500);

/// A sidecar with one route, ready, with `admin` applied to `[admin]`; the token endpoint and
/// upstream are returned to keep them alive.
async fn sidecar(
    admin: impl FnOnce(&mut token_sidecar::AdminConfig),
) -> (Running, (FakeTokenEndpoint, Upstream)) {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let mut cfg: token_sidecar::Config =
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
            .route(RouteBuilder::path("orders", "/orders/", &up.url()))
            .build();
    admin(&mut cfg.admin);
    cfg.validate().expect("valid admin limits");
    let sc = Running::start(cfg).await;
    sc.wait_ready().await;
    (sc, (idp, up))
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    socket.connect(to).await
}

/// `GET /healthz` from `from` on a new connection: the status and how long the answer took.
async fn healthz_from(from: Ipv4Addr, admin: SocketAddr) -> (u16, Duration) {
    let t = Instant::now();
    let answer = timeout(Duration::from_secs(5), async {
        let mut s = connect_from(from, admin).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        got
    })
    .await
    .unwrap_or_default();
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, took)
}

/// Opens `n` connections from `from` that never send a byte; the ones that could be opened.
async fn idle_connections(from: Ipv4Addr, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(Ok(s)) = timeout(Duration::from_secs(2), connect_from(from, to)).await {
            held.push(s);
        }
    }
    held
}

/// How many of `conns` the server has closed (EOF or reset), without waiting.
async fn closed_count(conns: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for s in conns {
        let mut b = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = timeout(Duration::from_millis(1), s.read(&mut b)).await {
            closed += 1;
        }
    }
    closed
}

#[tokio::test]
async fn five_hundred_idle_connections_from_one_peer_do_not_keep_healthz_out() {
    timeout(TEST_BOUND, async {
        // The defaults (per peer 32, listener 256, head timeout 2 s), except a head timeout
        // long enough that it cannot be what frees the slots during the test.
        let (sc, _keep) = sidecar(|a| a.header_read_timeout = Duration::from_secs(30)).await;
        let attacker = Ipv4Addr::new(127, 0, 0, 2);
        let t = Instant::now();
        let mut held = idle_connections(attacker, sc.admin, 500).await;
        assert_eq!(held.len(), 500, "all 500 connections were opened");
        eprintln!(
            "500 idle connections from {attacker} opened in {:?}",
            t.elapsed()
        );

        // Another peer (kubelet on the node address, Prometheus on its pod address).
        let mut worst = Duration::ZERO;
        for _ in 0..10 {
            let (status, took) = healthz_from(Ipv4Addr::LOCALHOST, sc.admin).await;
            assert_eq!(status, 200, "/healthz from another peer");
            worst = worst.max(took);
        }
        // The same peer as the attacker (a host-network pod shares the node's address with
        // kubelet): its new connection evicts one of its own idle ones.
        let mut worst_same = Duration::ZERO;
        for _ in 0..10 {
            let (status, took) = healthz_from(attacker, sc.admin).await;
            assert_eq!(
                status, 200,
                "/healthz from the attacking peer's own address"
            );
            worst_same = worst_same.max(took);
        }
        eprintln!(
            "admin under 500 idle connections from one peer: /healthz worst {worst:?} from \
             another peer, {worst_same:?} from the same peer"
        );
        assert!(worst < HEALTHZ_BOUND, "{worst:?} from another peer");
        assert!(
            worst_same < HEALTHZ_BOUND,
            "{worst_same:?} from the same peer"
        );

        // The sidecar kept at most max_connections_per_peer (32) of them.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let closed = closed_count(&mut held).await;
        eprintln!("{closed} of the 500 idle connections were closed by the sidecar");
        assert!(closed >= 500 - 32, "only {closed} of 500 closed");
        drop(held);
        sc.stop().await;
    })
    .await
    .expect("the test finished within its bound");
}

#[tokio::test]
async fn idle_connections_from_many_peers_filling_the_admin_cap_do_not_keep_a_new_peer_out() {
    timeout(TEST_BOUND, async {
        let (sc, _keep) = sidecar(|a| {
            a.max_connections = 64;
            a.max_connections_per_peer = 16;
            a.header_read_timeout = Duration::from_secs(30);
        })
        .await;
        // Eight peers with 16 idle connections each: twice the listener's cap.
        let mut held = Vec::new();
        for last in 10..18 {
            held.extend(idle_connections(Ipv4Addr::new(127, 0, 0, last), sc.admin, 16).await);
        }
        assert_eq!(held.len(), 128);
        let mut worst = Duration::ZERO;
        for _ in 0..10 {
            let (status, took) = healthz_from(Ipv4Addr::LOCALHOST, sc.admin).await;
            assert_eq!(status, 200);
            worst = worst.max(took);
        }
        eprintln!("admin cap filled by 8 peers: /healthz from a new peer, worst {worst:?}");
        assert!(worst < HEALTHZ_BOUND, "{worst:?}");
        drop(held);
        sc.stop().await;
    })
    .await
    .expect("the test finished within its bound");
}

#[tokio::test]
async fn the_admin_listener_cuts_silent_clients_after_its_own_head_timeout_and_reads_no_body() {
    timeout(TEST_BOUND, async {
        // The proxy's head timeout is 10 s; the admin's 1 s.
        let (sc, _keep) = sidecar(|a| a.header_read_timeout = Duration::from_secs(1)).await;
        let mut silent = TcpStream::connect(sc.admin).await.unwrap();
        let t = Instant::now();
        let mut b = [0u8; 64];
        let n = timeout(Duration::from_secs(4), silent.read(&mut b))
            .await
            .expect("a silent admin client was cut within 4 s (admin.header_read_timeout = 1s)")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
        let took = t.elapsed();
        eprintln!("silent admin client cut after {took:?}");
        assert!(took >= Duration::from_millis(800), "cut after {took:?}");

        // A request announcing a body it never sends is answered at once, and its connection
        // closed: the admin listener never waits for a body.
        let mut s = TcpStream::connect(sc.admin).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nContent-Length: 100000\r\n\r\n")
            .await
            .unwrap();
        let t = Instant::now();
        let mut got = Vec::new();
        timeout(Duration::from_millis(900), s.read_to_end(&mut got))
            .await
            .expect("answered and closed before the head timeout")
            .unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        eprintln!(
            "admin request with an unsent body: answered and closed in {:?}",
            t.elapsed()
        );
        sc.stop().await;
    })
    .await
    .expect("the test finished within its bound");
}

/// Clients that ask and then never read the answer (HTTP/2 with a zero stream window: the
/// headers come back, the body cannot) hold requests in flight, which no eviction may touch.
/// Filling the admin listener with them must not keep probes out: the admin listener cuts a
/// connection whose request moved no bytes for its head timeout.
#[tokio::test]
async fn clients_that_never_read_their_answers_do_not_keep_healthz_out() {
    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    timeout(TEST_BOUND, async {
        let (sc, _keep) = sidecar(|a| {
            a.max_connections = 8;
            a.max_connections_per_peer = 8;
            a.header_read_timeout = Duration::from_secs(1);
        })
        .await;
        let mut stuck = Vec::new();
        for _ in 0..8 {
            let stream = connect_from(Ipv4Addr::new(127, 0, 0, 3), sc.admin)
                .await
                .unwrap();
            let (mut h2, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(0)
                .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .unwrap();
            let driver = tokio::spawn(conn);
            let req = http::Request::get("http://admin/healthz")
                .body(Empty::<Bytes>::new())
                .unwrap();
            // The head arrives; the body never can. Kept, so the stream stays open.
            let resp = h2.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            stuck.push((h2, resp, driver));
        }
        // Longer than the head timeout (1 s) plus the watchdog's tick.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let (status, took) = healthz_from(Ipv4Addr::LOCALHOST, sc.admin).await;
        eprintln!(
            "8 non-reading HTTP/2 clients filled the admin cap: /healthz {status} in {took:?}"
        );
        assert_eq!(status, 200);
        assert!(took < HEALTHZ_BOUND, "{took:?}");
        let cut = stuck.iter().filter(|(_, _, d)| d.is_finished()).count();
        assert_eq!(cut, 8, "every stalled connection was closed");
        drop(stuck);
        sc.stop().await;
    })
    .await
    .expect("the test finished within its bound");
}
