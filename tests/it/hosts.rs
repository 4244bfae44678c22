//! Which hosts, origins and methods the sidecar answers (docs/spec.md §4 matching, §5 errors;
//! docs/reliability.md §5): path routes and dedicated listeners answer only local hosts
//! (loopback names, `proxy.allowed_hosts`) and a host route's own; an absolute-form request or
//! HTTP/2 `:authority` for a host nothing names is 404; a foreign `Host` header is 421; a
//! cross-site web page is 403; `TRACE` is 405. Nothing refused reaches the upstream.
//!
//! Requests are raw bytes or HTTP/2 frames with the host written as a hostile page or client
//! would write it (reqwest would put the address it connects to in `Host`).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::hostile::{Reply, bounded, exchange, settle};
use crate::support::faults::{FakeTokenEndpoint, Mode};
use crate::support::upstream::Upstream;
use crate::support::{RouteBuilder, Running, SidecarConfig, fixture};

struct Setup {
    _idp: FakeTokenEndpoint,
    up: Upstream,
    sc: Running,
    /// The dedicated route's listener.
    dedicated: SocketAddr,
}

/// One stripped path route `/api/`, one host route `billing.internal`, and one dedicated route
/// with `host = "ded.internal"`, all to one recording upstream; `allowed_hosts` names
/// `client.internal` (any port) and `pinned.internal:8080`.
async fn setup() -> Setup {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let dedicated_port = crate::support::process::free_port();
    let dedicated = SocketAddr::from(([127, 0, 0, 1], dedicated_port));
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
            .proxy(|p| {
                p.allowed_hosts = vec!["client.internal".into(), "pinned.internal:8080".into()];
            })
            .routes([
                RouteBuilder::path("api", "/api/", &up.url()),
                RouteBuilder::host("billing", "billing.internal", &up.url()),
                RouteBuilder::dedicated("ded", dedicated, &up.url())
                    .with(|r| r.host = Some("ded.internal".into())),
            ]),
    )
    .await;
    sc.wait_ready().await;
    Setup {
        _idp: idp,
        up,
        sc,
        dedicated,
    }
}

fn request(method: &str, target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut s = format!("{method} {target} HTTP/1.1\r\n");
    for (n, v) in headers {
        s.push_str(&format!("{n}: {v}\r\n"));
    }
    s.push_str("Connection: close\r\n\r\n");
    s.into_bytes()
}

/// The reply is the sidecar's own JSON error with this status and code.
fn assert_sidecar_error(r: &Reply, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, Some(status), "{what}: {r:?}");
    assert_eq!(r.header("token-sidecar-error"), Some(code), "{what}: {r:?}");
    let body: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {r:?}"));
    assert_eq!(body["error"], code, "{what}");
    assert!(r.header("x-upstream").is_none(), "{what}: forwarded");
}

/// Path routes answer loopback names on any port and `allowed_hosts` (case-insensitively, an
/// entry's port pinned when it has one); a `Host` header naming anything else gets 421, also
/// the DNS-rebinding shape of issue 10 (`Host` and `Origin` both `evil.example`).
#[tokio::test]
async fn path_routes_answer_local_hosts_and_foreign_hosts_get_421() {
    bounded(async {
        let s = setup().await;
        let local = [
            "localhost",
            "LocalHost:8080",
            "127.0.0.1",
            &s.sc.addr.to_string(),
            "[::1]:9",
            "localhost.",
            "client.internal",
            "Client.Internal:1234",
            "pinned.internal:8080",
        ];
        for (i, host) in local.iter().enumerate() {
            let r = exchange(s.sc.addr, &request("GET", "/api/x", &[("Host", host)])).await;
            assert_eq!(r.status, Some(200), "{host}: {r:?}");
            assert_eq!(s.up.count(), i + 1, "{host}");
        }
        let foreign = [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.2",
            "pinned.internal",
            "pinned.internal:8081",
            "client.internal.evil.example",
        ];
        for host in foreign {
            let r = exchange(s.sc.addr, &request("GET", "/api/x", &[("Host", host)])).await;
            assert_sidecar_error(&r, 421, "misdirected_request", host);
        }
        let rebinding = request(
            "GET",
            "/api/x",
            &[("Host", "evil.example"), ("Origin", "http://evil.example")],
        );
        let r = exchange(s.sc.addr, &rebinding).await;
        assert_sidecar_error(&r, 421, "misdirected_request", "rebinding");
        // A host route's own host is not misdirected: its host route answers.
        let r = exchange(
            s.sc.addr,
            &request("GET", "/api/x", &[("Host", "billing.internal")]),
        )
        .await;
        assert_eq!(r.status, Some(200), "{r:?}");
        // Two Host headers, or a Host that is not ASCII: 400 before any routing.
        for (what, req) in [
            (
                "two Host headers",
                b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n".to_vec(),
            ),
            (
                "non-ASCII Host",
                b"GET /api/x HTTP/1.1\r\nHost: localhost\xff\r\n\r\n".to_vec(),
            ),
        ] {
            let r = exchange(s.sc.addr, &req).await;
            assert_eq!(r.status, Some(400), "{what}: {r:?}");
        }
        settle().await;
        assert_eq!(s.up.count(), local.len() + 1, "{:?}", s.up.received());
        s.sc.stop().await;
    })
    .await;
}

/// Issue 10 item 4: `curl -x sidecar http://elsewhere.example/api/abs` reached the `/api/`
/// route. An absolute-form target reaches host routes only (a loopback one too: a client with
/// `HTTP_PROXY` set calling another local server must not get a path route), and an HTTP/2
/// `:authority` naming a foreign host is 404 as well.
#[tokio::test]
async fn absolute_form_and_h2_authority_for_unknown_hosts_are_404_whatever_the_path() {
    bounded(async {
        let s = setup().await;
        for target in [
            "http://elsewhere.example/api/abs",
            "http://elsewhere.example/",
            "http://localhost:9999/api/abs",
            "http://127.0.0.1/api/abs",
        ] {
            let r = exchange(s.sc.addr, &request("GET", target, &[("Host", "localhost")])).await;
            assert_sidecar_error(&r, 404, "no_route", target);
        }
        // A host route still takes absolute-form requests for its host.
        let r = exchange(
            s.sc.addr,
            &request(
                "GET",
                "http://billing.internal/v1/x",
                &[("Host", "billing.internal")],
            ),
        )
        .await;
        assert_eq!(r.status, Some(200), "{r:?}");
        settle().await;
        assert_eq!(s.up.count(), 1, "{:?}", s.up.received());
        assert_eq!(s.up.received()[0].path_and_query, "/v1/x");

        // HTTP/2 with prior knowledge, `:authority` as written.
        let stream = TcpStream::connect(s.sc.addr).await.unwrap();
        let (mut h2, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let send = |uri: &str| http::Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
        let resp = h2
            .send_request(send("http://elsewhere.example/api/abs"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.headers()["token-sidecar-error"], "no_route");
        let resp = h2
            .send_request(send(&format!(
                "http://localhost:{}/api/h2",
                s.sc.addr.port()
            )))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        settle().await;
        assert_eq!(s.up.count(), 2, "{:?}", s.up.received());
        assert_eq!(s.up.received()[1].path_and_query, "/h2");
        s.sc.stop().await;
    })
    .await;
}

/// A cross-site web page (an `Origin` that is not local or the request's own host, `null`, or
/// `Sec-Fetch-Site: cross-site`) gets 403 on every listener; local origins pass.
#[tokio::test]
async fn cross_site_pages_get_403_on_every_listener() {
    bounded(async {
        let s = setup().await;
        let refused: [(&str, &str); 6] = [
            ("Origin", "http://evil.example"),
            ("Origin", "https://evil.example:8443"),
            ("Origin", "null"),
            ("Origin", "http://localhost.evil.example"),
            ("Sec-Fetch-Site", "cross-site"),
            ("Origin", "chrome-extension://abcdef"),
        ];
        for addr in [s.sc.addr, s.dedicated] {
            for (name, value) in refused {
                for method in ["GET", "POST"] {
                    let r = exchange(
                        addr,
                        &request(
                            method,
                            "/api/x",
                            &[
                                ("Host", "localhost"),
                                (name, value),
                                ("Content-Length", "0"),
                            ],
                        ),
                    )
                    .await;
                    assert_sidecar_error(&r, 403, "forbidden", &format!("{addr} {method} {value}"));
                }
            }
        }
        settle().await;
        assert_eq!(s.up.count(), 0, "{:?}", s.up.received());
        let allowed: [(&str, &str); 5] = [
            ("Origin", "http://localhost:3000"),
            ("Origin", "http://127.0.0.1"),
            ("Origin", "https://client.internal"),
            ("Sec-Fetch-Site", "same-origin"),
            ("Sec-Fetch-Site", "none"),
        ];
        for (name, value) in allowed {
            let r = exchange(
                s.sc.addr,
                &request(
                    "POST",
                    "/api/x",
                    &[
                        ("Host", "localhost"),
                        (name, value),
                        ("Content-Length", "0"),
                    ],
                ),
            )
            .await;
            assert_eq!(r.status, Some(200), "{value}: {r:?}");
        }
        assert_eq!(s.up.count(), allowed.len());
        s.sc.stop().await;
    })
    .await;
}

/// `TRACE` is 405 on every listener: an upstream that echoes it would reflect the bearer token.
#[tokio::test]
async fn trace_is_405_on_every_listener() {
    bounded(async {
        let s = setup().await;
        for addr in [s.sc.addr, s.dedicated] {
            for target in ["/api/x", "/"] {
                let r = exchange(addr, &request("TRACE", target, &[("Host", "localhost")])).await;
                assert_sidecar_error(&r, 405, "method_not_allowed", &format!("{addr}{target}"));
            }
        }
        let r = exchange(
            s.sc.addr,
            &request("TRACE", "/x", &[("Host", "billing.internal")]),
        )
        .await;
        assert_sidecar_error(&r, 405, "method_not_allowed", "host route");
        settle().await;
        assert_eq!(s.up.count(), 0, "{:?}", s.up.received());
        s.sc.stop().await;
    })
    .await;
}

/// The host rule holds on dedicated listeners too (a loopback port is as reachable by DNS
/// rebinding as the main one): local hosts and the route's own `host` are served, others 421.
#[tokio::test]
async fn dedicated_listeners_answer_local_hosts_and_their_own_host() {
    bounded(async {
        let s = setup().await;
        for host in [
            "127.0.0.1".to_string(),
            s.dedicated.to_string(),
            "localhost".into(),
            "client.internal".into(),
            "ded.internal".into(),
            "DED.internal:1".into(),
        ] {
            let r = exchange(
                s.dedicated,
                &request("GET", "/any/path", &[("Host", &host)]),
            )
            .await;
            assert_eq!(r.status, Some(200), "{host}: {r:?}");
        }
        let n = s.up.count();
        for host in ["evil.example", "billing.internal"] {
            let r = exchange(s.dedicated, &request("GET", "/any", &[("Host", host)])).await;
            assert_sidecar_error(&r, 421, "misdirected_request", host);
        }
        settle().await;
        assert_eq!(s.up.count(), n);
        s.sc.stop().await;
    })
    .await;
}
