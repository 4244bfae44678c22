//! Targets chosen at run time (docs/spec.md §4; docs/reliability.md §5): per-request audience
//! and scope through `token-sidecar-audience` / `token-sidecar-scope` within a route's
//! allow-lists, and wildcard host routes whose hosts each get a token for their own audience.
//! Against the real oidc-provider: every token is verified, every refusal is checked at the
//! authorization server (its token-request count) and at the upstream (nothing forwarded).
//!
//! Requests are raw HTTP/1.1 bytes (and HTTP/2 frames) so the `Host` header and the request
//! target are exactly what a hostile client would write.

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpStream;

use crate::hostile::{Reply, bounded, exchange, settle};
use crate::support::authz::{AuthzConfig, ClientReg, OidcProvider, ResourceReg};
use crate::support::idp::ORDERS;
use crate::support::upstream::Upstream;
use crate::support::{CLIENT_ID, RouteBuilder, Running, SidecarConfig, fixture, public_jwks};

const A: &str = "https://a.svc.cluster.local/";
const B: &str = "https://b.svc.cluster.local/";
const C: &str = "https://c.svc.cluster.local/";
/// An IDN host in its ASCII (punycode) form: `bücher`.
const IDN: &str = "https://xn--bcher-kva.svc.cluster.local/";

/// oidc-provider knowing our client and five resource servers: ORDERS and four in-cluster ones.
async fn provider() -> OidcProvider {
    let resource = |audience: &str| ResourceReg {
        audience: audience.into(),
        scope: "orders:read orders:write".into(),
        ttl_secs: 300,
    };
    OidcProvider::start(&AuthzConfig {
        clients: vec![ClientReg {
            client_id: CLIENT_ID.into(),
            jwks: public_jwks("ec_p256_sec1.pem", None),
            scope: "orders:read orders:write".into(),
        }],
        resources: vec![
            resource(ORDERS),
            resource(A),
            resource(B),
            resource(C),
            resource(IDN),
        ],
        default_ttl_secs: 300,
    })
    .await
}

/// A refused request: path, extra headers, status, error code.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, &'a str);

fn get(target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut s = format!("GET {target} HTTP/1.1\r\n");
    for (n, v) in headers {
        s.push_str(&format!("{n}: {v}\r\n"));
    }
    s.push_str("Connection: close\r\n\r\n");
    s.into_bytes()
}

fn error_code(r: &Reply) -> Option<String> {
    let body: Value = serde_json::from_slice(&r.body).ok()?;
    body["error"].as_str().map(str::to_owned)
}

/// The verified claims of the token the upstream's `i`th request carried.
async fn claims(idp: &OidcProvider, up: &Upstream, i: usize) -> Value {
    let token = up.received()[i].bearer().expect("a bearer token");
    idp.verify_access_token(&token).await
}

fn scopes(claims: &Value) -> Vec<String> {
    let mut v: Vec<String> = claims["scope"]
        .as_str()
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// The headers choose the token within the allow-lists; absent headers mean the route's sets;
/// a chosen key is fetched once and then served from the cache; the headers never reach the
/// upstream.
#[tokio::test]
async fn headers_choose_audience_and_scope_within_the_allow_lists() {
    bounded(async {
        let idp = provider().await;
        let up = Upstream::start().await;
        let sc = Running::start(
            SidecarConfig::new(&idp.token_url, fixture("ec_p256_sec1.pem")).route(
                RouteBuilder::path("orders", "/orders/", &up.url())
                    .scope(&["orders:read"])
                    .audience(&[ORDERS])
                    .with(|r| {
                        r.allow_audiences = vec!["https://*.svc.cluster.local/".into()];
                        r.allow_scopes = vec!["orders:*".into()];
                    }),
            ),
        )
        .await;
        sc.wait_ready().await;
        let host = ("Host", "localhost");

        // No header: the route's own sets.
        let r = exchange(sc.addr, &get("/orders/1", &[host])).await;
        assert_eq!(r.status, Some(200), "{r:?}");
        let c = claims(&idp, &up, 0).await;
        assert_eq!(c["aud"], ORDERS);
        assert_eq!(scopes(&c), ["orders:read"]);

        // An allowed audience: a token for it, the route's scope.
        let before = idp.token_requests().await;
        let r = exchange(
            sc.addr,
            &get("/orders/2", &[host, ("token-sidecar-audience", A)]),
        )
        .await;
        assert_eq!(r.status, Some(200), "{r:?}");
        assert_eq!(idp.token_requests().await, before + 1);
        let c = claims(&idp, &up, 1).await;
        assert_eq!(c["aud"], A);
        assert_eq!(scopes(&c), ["orders:read"]);

        // Allowed scopes (several, repeated, tab-separated) with an allowed audience.
        let r = exchange(
            sc.addr,
            &get(
                "/orders/3",
                &[
                    host,
                    ("token-sidecar-audience", B),
                    (
                        "token-sidecar-scope",
                        "orders:write\torders:read orders:write",
                    ),
                ],
            ),
        )
        .await;
        assert_eq!(r.status, Some(200), "{r:?}");
        let c = claims(&idp, &up, 2).await;
        assert_eq!(c["aud"], B);
        assert_eq!(scopes(&c), ["orders:read", "orders:write"]);

        // The same choice again: served from the cache, nothing fetched.
        let before = idp.token_requests().await;
        for i in 0..3 {
            let r = exchange(
                sc.addr,
                &get(
                    &format!("/orders/again{i}"),
                    &[host, ("token-sidecar-audience", A)],
                ),
            )
            .await;
            assert_eq!(r.status, Some(200), "{r:?}");
        }
        assert_eq!(idp.token_requests().await, before);

        // The choice is the sidecar's business: no upstream request carried the headers.
        settle().await;
        for rec in up.received() {
            assert!(
                rec.headers.get("token-sidecar-audience").is_none(),
                "{rec:?}"
            );
            assert!(rec.headers.get("token-sidecar-scope").is_none(), "{rec:?}");
        }
        sc.stop().await;
    })
    .await;
}

/// Values outside the allow-lists are 403 `target_not_allowed`, malformed headers 400; either
/// way nothing is fetched (counted at the authorization server) and nothing is forwarded.
#[tokio::test]
async fn values_outside_the_allow_lists_are_403_and_fetch_nothing() {
    bounded(async {
        let idp = provider().await;
        let up = Upstream::start().await;
        let sc = Running::start(
            SidecarConfig::new(&idp.token_url, fixture("ec_p256_sec1.pem")).routes([
                RouteBuilder::path("orders", "/orders/", &up.url())
                    .scope(&["orders:read"])
                    .audience(&[ORDERS])
                    .with(|r| {
                        r.allow_audiences = vec!["https://*.svc.cluster.local/".into()];
                        r.allow_scopes = vec!["orders:read".into()];
                    }),
                // No allow-lists: the route takes no header at all.
                RouteBuilder::path("fixed", "/fixed/", &up.url())
                    .scope(&["orders:read"])
                    .audience(&[ORDERS]),
            ]),
        )
        .await;
        sc.wait_ready().await;
        let before = idp.token_requests().await;
        let host = ("Host", "localhost");
        let many = (0..17)
            .map(|i| format!("https://s{i}.svc.cluster.local/"))
            .collect::<Vec<_>>()
            .join(" ");
        let long = format!("https://{}.svc.cluster.local/", "a".repeat(4100));
        let mixed = format!("{A} https://evil.com/");
        let cases: Vec<Case<'_>> = vec![
            (
                "/orders/x",
                vec![(
                    "token-sidecar-audience",
                    "https://evil.com/.svc.cluster.local/",
                )],
                403,
                "target_not_allowed",
            ),
            (
                "/orders/x",
                vec![(
                    "token-sidecar-audience",
                    "https://evil.com#.svc.cluster.local/",
                )],
                403,
                "target_not_allowed",
            ),
            (
                "/orders/x",
                vec![("token-sidecar-audience", &mixed)],
                403,
                "target_not_allowed",
            ),
            (
                "/orders/x",
                vec![("token-sidecar-audience", ORDERS)],
                403,
                "target_not_allowed",
            ),
            (
                "/orders/x",
                vec![("token-sidecar-scope", "orders:write")],
                403,
                "target_not_allowed",
            ),
            (
                "/fixed/x",
                vec![("token-sidecar-audience", A)],
                403,
                "target_not_allowed",
            ),
            (
                "/fixed/x",
                vec![("token-sidecar-scope", "orders:read")],
                403,
                "target_not_allowed",
            ),
            (
                "/orders/x",
                vec![("token-sidecar-audience", A), ("token-sidecar-audience", B)],
                400,
                "bad_request",
            ),
            (
                "/orders/x",
                vec![("token-sidecar-scope", "")],
                400,
                "bad_request",
            ),
            (
                "/orders/x",
                vec![("token-sidecar-audience", &many)],
                400,
                "bad_request",
            ),
            (
                "/orders/x",
                vec![("token-sidecar-audience", &long)],
                400,
                "bad_request",
            ),
        ];
        for (path, headers, status, code) in &cases {
            let mut all = vec![host];
            all.extend(headers.iter().copied());
            let r = exchange(sc.addr, &get(path, &all)).await;
            assert_eq!(r.status, Some(*status), "{path} {headers:?}: {r:?}");
            assert_eq!(r.header("token-sidecar-error"), Some(*code), "{headers:?}");
            assert_eq!(error_code(&r).as_deref(), Some(*code), "{headers:?}");
        }
        settle().await;
        assert_eq!(up.count(), 0, "forwarded: {:?}", up.received());
        assert_eq!(
            idp.token_requests().await,
            before,
            "a refusal fetched a token"
        );
        sc.stop().await;
    })
    .await;
}

/// A wildcard route: each host matching `*.svc.cluster.local` gets a token for its own
/// audience (`https://{host}/`), named by `Host` (any case, a port, one trailing dot), by an
/// absolute-form target or by HTTP/2 `:authority`; the upstream (a gateway at a fixed loopback
/// address) is sent the normalized name as `Host`. Hosts trying to escape the pattern are
/// refused, fetch nothing and reach nothing.
#[tokio::test]
async fn wildcard_hosts_get_their_own_audience_and_nothing_else_gets_through() {
    bounded(async {
        let idp = provider().await;
        let up = Upstream::start().await;
        let sc = Running::start(
            SidecarConfig::new(&idp.token_url, fixture("ec_p256_sec1.pem")).route(
                RouteBuilder::host("cluster", "*.svc.cluster.local", &up.url())
                    .scope(&["orders:read"])
                    .audience(&["https://{host}/"]),
            ),
        )
        .await;
        // Nothing to prefetch for a templated route: ready at once, nothing fetched yet.
        sc.wait_ready().await;
        assert_eq!(idp.token_requests().await, 0);

        for (i, (target, host, want)) in [
            ("/v1/x", "a.svc.cluster.local", A),
            ("/v1/x", "B.SVC.Cluster.Local:8443", B),
            ("/v1/x", "a.svc.cluster.local.", A),
            ("http://c.svc.cluster.local/v1/x", "c.svc.cluster.local", C),
        ]
        .into_iter()
        .enumerate()
        {
            let r = exchange(sc.addr, &get(target, &[("Host", host)])).await;
            assert_eq!(r.status, Some(200), "{host}: {r:?}");
            let c = claims(&idp, &up, i).await;
            assert_eq!(c["aud"], want, "{host}");
            assert_eq!(scopes(&c), ["orders:read"]);
            let rec = &up.received()[i];
            assert_eq!(
                rec.headers["host"],
                want.trim_start_matches("https://").trim_end_matches('/'),
                "{host}"
            );
            assert_eq!(rec.path_and_query, "/v1/x");
        }
        // One fetch per distinct host: a, b, c.
        assert_eq!(idp.token_requests().await, 3);

        // HTTP/2 `:authority`.
        let stream = TcpStream::connect(sc.addr).await.unwrap();
        let (mut h2, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let send = |uri: &str| http::Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
        let resp = h2
            .send_request(send("http://b.svc.cluster.local/h2"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        settle().await;
        let forwarded = up.count();
        assert_eq!(forwarded, 5);
        assert_eq!(up.received()[4].headers["host"], "b.svc.cluster.local");
        assert_eq!(
            idp.token_requests().await,
            3,
            "b's token came from the cache"
        );

        // Hosts that try to escape the pattern.
        let long_label = format!("{}.svc.cluster.local", "a".repeat(64));
        let long_name = format!("{}svc.cluster.local", "abcdefghi.".repeat(24));
        let hostile: Vec<&str> = vec![
            "evil.com#.svc.cluster.local",
            "evil.com/.svc.cluster.local",
            "evil.com?.svc.cluster.local",
            "a@evil.com.svc.cluster.local",
            "evil.com\\.svc.cluster.local",
            "x.svc.cluster.local..",
            "..svc.cluster.local",
            ".svc.cluster.local",
            "svc.cluster.local",
            "a.b.svc.cluster.local",
            "x_y.svc.cluster.local",
            "-x.svc.cluster.local",
            "x.svc.cluster.local.evil.com",
            "127.0.0.1",
            "[::1]",
            "evil.com",
            &long_label,
            &long_name,
        ];
        for host in &hostile {
            let r = exchange(sc.addr, &get("/v1/x", &[("Host", host)])).await;
            let s = r.status.unwrap_or(0);
            assert!(
                [400, 404, 421].contains(&s),
                "Host {host:?} was not refused: {r:?}"
            );
            let r = exchange(
                sc.addr,
                &get(&format!("http://{host}/v1/x"), &[("Host", host)]),
            )
            .await;
            let s = r.status.unwrap_or(0);
            assert!(
                [400, 404, 421].contains(&s),
                "absolute-form {host:?} was not refused: {r:?}"
            );
        }
        // Raw UTF-8 in the Host header.
        let mut raw = b"GET /v1/x HTTP/1.1\r\nHost: b\xc3\xbccher.svc.cluster.local\r\n".to_vec();
        raw.extend_from_slice(b"Connection: close\r\n\r\n");
        let r = exchange(sc.addr, &raw).await;
        assert!([400, 404, 421].contains(&r.status.unwrap_or(0)), "{r:?}");
        // HTTP/2 `:authority` naming hosts outside the pattern.
        for host in ["a.b.svc.cluster.local", "evil.com", "127.0.0.1"] {
            let resp = h2
                .send_request(send(&format!("http://{host}/v1/x")))
                .await
                .unwrap();
            assert_eq!(resp.status(), 404, "{host}");
        }
        settle().await;
        assert_eq!(up.count(), forwarded, "forwarded: {:?}", up.received());
        assert_eq!(
            idp.token_requests().await,
            3,
            "a refused host fetched a token"
        );

        // An IDN in its ASCII form is a DNS name like any other, with its own audience.
        let r = exchange(
            sc.addr,
            &get("/v1/x", &[("Host", "xn--bcher-kva.svc.cluster.local")]),
        )
        .await;
        assert_eq!(r.status, Some(200), "{r:?}");
        assert_eq!(claims(&idp, &up, forwarded).await["aud"], IDN);
        sc.stop().await;
    })
    .await;
}

/// A token chosen per request that the upstream rejects (401 `invalid_token`) is evicted from
/// its own slot and the request replayed once with a fresh token for the same audience: the
/// route's fixed token is neither evicted nor sent instead.
#[tokio::test]
async fn a_rejected_per_request_token_is_replaced_in_its_own_slot() {
    bounded(async {
        let idp = provider().await;
        let up = Upstream::start().await;
        let sc = Running::start(
            SidecarConfig::new(&idp.token_url, fixture("ec_p256_sec1.pem")).route(
                RouteBuilder::path("orders", "/orders/", &up.url())
                    .scope(&["orders:read"])
                    .audience(&[ORDERS])
                    .with(|r| r.allow_audiences = vec!["https://*.svc.cluster.local/".into()]),
            ),
        )
        .await;
        sc.wait_ready().await;
        let chosen = [("Host", "localhost"), ("token-sidecar-audience", A)];
        let r = exchange(sc.addr, &get("/orders/1", &chosen)).await;
        assert_eq!(r.status, Some(200), "{r:?}");
        let first = up.received()[0].bearer().unwrap();
        up.revoke(&first);
        let before = idp.token_requests().await;

        let r = exchange(sc.addr, &get("/orders/2", &chosen)).await;
        assert_eq!(r.status, Some(200), "{r:?}");
        assert_eq!(idp.token_requests().await, before + 1, "one fresh token");
        let got = up.received();
        assert_eq!(got.len(), 3, "the request and its one replay");
        let fresh = got[2].bearer().unwrap();
        assert_ne!(fresh, first);
        assert_eq!(idp.verify_access_token(&fresh).await["aud"], A);

        // The route's own token was not touched.
        let r = exchange(sc.addr, &get("/orders/3", &[("Host", "localhost")])).await;
        assert_eq!(r.status, Some(200), "{r:?}");
        assert_eq!(idp.token_requests().await, before + 1);
        assert_eq!(claims(&idp, &up, 3).await["aud"], ORDERS);
        sc.stop().await;
    })
    .await;
}
