//! Path tricks (docs/spec.md §5 refusals, docs/reliability.md §5): request targets that a server
//! behind the upstream could read as a step out of the route's base path. Each one is sent
//! exactly as written, over raw HTTP/1.1 and over HTTP/2, to a sidecar with one stripped path
//! route `/api/` whose upstream lives under `/base`; each must get 400 with nothing forwarded.
//! Legitimate look-alikes must still pass, unchanged.
//!
//! The attack strings are written for this table, after the families that public
//! path-traversal and proxy-confusion lists made known (Orange Tsai's "Breaking Parser Logic"
//! talk among them): `;params` on dot segments, single, double and triple percent-encoding,
//! overlong UTF-8, backslashes, NUL and other controls, empty segments, IIS `%u` escapes.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::hostile::{bounded, exchange, settle};
use crate::support::faults::{FakeTokenEndpoint, Mode};
use crate::support::upstream::Upstream;
use crate::support::{RouteBuilder, Running, SidecarConfig, fixture};

/// Each one refused with 400 before anything is forwarded.
const ATTACKS: &[&str] = &[
    // Plain and `;params` dot segments (Tomcat, Jetty and Spring read `..;x` as `..`).
    "/api/../admin",
    "/api/./admin",
    "/api/..;/admin",
    "/api/.;/admin",
    "/api/..;jsessionid=1/admin",
    "/api/;/../admin",
    "/api/..",
    // Percent-encoded dots, once.
    "/api/%2e%2e/admin",
    "/api/%2E%2E/admin",
    "/api/.%2e/admin",
    "/api/%2e./admin",
    "/api/%2e/admin",
    "/api/%2e%2e",
    "/api/%2e%2e;/admin",
    "/api/..%3b/admin",
    "/api/%2e%2e%3Bx=y/admin",
    // Twice and three times.
    "/api/%252e%252e/admin",
    "/api/%252E%252E;/admin",
    "/api/%25252e%25252e/admin",
    "/api/%2525252e/admin",
    // Overlong UTF-8 for '.' and '/' (accepted by old decoders).
    "/api/%c0%ae%c0%ae/admin",
    "/api/%e0%80%ae%e0%80%ae/admin",
    "/api/..%c0%afadmin",
    "/api/%c0%2e%c0%2e/admin",
    // Backslashes, raw and encoded (Windows servers and some frameworks split on them).
    "/api/..\\admin",
    "/api/..%5cadmin",
    "/api/%5c..%5cadmin",
    "/api/..%255cadmin",
    // Encoded slashes: the segment hides a separator.
    "/api/..%2fadmin",
    "/api/..%2Fadmin",
    "/api/%2e%2e%2fadmin",
    "/api/..%252fadmin",
    "/api/a/..%2f..%2fadmin",
    // NUL and other controls.
    "/api/..%00/admin",
    "/api/a%00.json",
    "/api/.%00./admin",
    "/api/%2e%2e%09/admin",
    "/api/a%0d%0aX-Injected:1",
    // Empty segments.
    "/api//admin",
    "/api/x//..//admin",
    // Malformed escapes, IIS `%u`, dots that Windows folds to `..`.
    "/api/%zz/admin",
    "/api/%u002e%u002e/admin",
    "/api/.../admin",
    "/api/..%20/admin",
];

/// Look-alikes that are fine, with the path the upstream must receive (prefix stripped, under
/// the upstream's base path, otherwise byte for byte).
const LEGITIMATE: &[(&str, &str)] = &[
    ("/api/a.b", "/base/a.b"),
    ("/api/..foo", "/base/..foo"),
    ("/api/foo..", "/base/foo.."),
    ("/api/.well-known/x", "/base/.well-known/x"),
    ("/api/%20x", "/base/%20x"),
    ("/api/%2ex", "/base/%2ex"),
    ("/api/100%25", "/base/100%25"),
    ("/api/caf%C3%A9", "/base/caf%C3%A9"),
    ("/api/a;v=1/b", "/base/a;v=1/b"),
    ("/api/x/", "/base/x/"),
    ("/api/x?next=/../admin", "/base/x?next=/../admin"),
];

struct Setup {
    _idp: FakeTokenEndpoint,
    up: Upstream,
    sc: Running,
}

async fn setup() -> Setup {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem")).route(
            RouteBuilder::path("api", "/api/", &format!("{}/base", up.url())),
        ),
    )
    .await;
    sc.wait_ready().await;
    Setup { _idp: idp, up, sc }
}

/// The whole table over raw HTTP/1.1, then the look-alikes on the same sidecar.
#[tokio::test]
async fn path_tricks_are_400_and_never_forwarded_over_http1_while_look_alikes_pass() {
    assert!(ATTACKS.len() >= 25, "the table holds {}", ATTACKS.len());
    bounded(async {
        let s = setup().await;
        let mut by_hyper = Vec::new();
        for path in ATTACKS {
            let r = exchange(s.sc.addr, &get(path)).await;
            assert_eq!(r.status, Some(400), "{path}: {r:?}");
            match r.header("token-sidecar-error") {
                Some(code) => assert_eq!(code, "bad_request", "{path}"),
                // hyper's parser refuses some targets before the sidecar sees them.
                None => by_hyper.push(*path),
            }
            assert!(r.header("x-upstream").is_none(), "{path}: forwarded");
        }
        settle().await;
        assert_eq!(s.up.count(), 0, "forwarded: {:?}", s.up.received());
        // Only a raw backslash is left to hyper's parser; everything else is the sidecar's call.
        assert!(
            by_hyper.len() <= 1,
            "refused by hyper, not the sidecar: {by_hyper:?}"
        );

        for (i, (path, want)) in LEGITIMATE.iter().enumerate() {
            let r = exchange(s.sc.addr, &get(path)).await;
            assert_eq!(r.status, Some(200), "{path}: {r:?}");
            let got = s.up.received();
            assert_eq!(got.len(), i + 1, "{path}");
            assert_eq!(got[i].path_and_query, *want, "{path}");
        }
        s.sc.stop().await;
    })
    .await;
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").into_bytes()
}

/// The same table as HTTP/2 `:path` values (those the client can send), then one look-alike.
#[tokio::test]
async fn path_tricks_are_400_and_never_forwarded_over_http2() {
    bounded(async {
        let s = setup().await;
        let h2: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let mut sent = 0;
        for path in ATTACKS {
            // A target the client itself cannot put in `:path` never leaves it.
            let Ok(uri) = format!("http://localhost:{}{path}", s.sc.addr.port()).parse() else {
                continue;
            };
            let resp = h2.get(uri).await.unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(resp.version(), http::Version::HTTP_2);
            assert_eq!(resp.status(), 400, "{path}");
            assert_eq!(
                resp.headers()["token-sidecar-error"],
                "bad_request",
                "{path}"
            );
            sent += 1;
        }
        assert!(sent >= 25, "only {sent} sent over HTTP/2");
        settle().await;
        assert_eq!(s.up.count(), 0, "forwarded: {:?}", s.up.received());

        let uri = format!("http://127.0.0.1:{}/api/..foo", s.sc.addr.port());
        let resp = h2.get(uri.parse().unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.into_body().collect().await;
        assert_eq!(s.up.received()[0].path_and_query, "/base/..foo");
        s.sc.stop().await;
    })
    .await;
}
