//! docs/spec.md §1 and §4: 50 MB each way streams through (the first bytes arrive before the
//! last are sent); an HTTPS upstream verified with a test CA given as `ca_file`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::support::faults::{FakeTokenEndpoint, Mode};
use crate::support::upstream::{Upstream, test_tls};
use crate::support::{RouteBuilder, Running, SidecarConfig, fixture, http_client};

const FIFTY_MB: u64 = 50 * 1024 * 1024;

async fn setup() -> (FakeTokenEndpoint, Upstream, Running) {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let up = Upstream::start().await;
    // The route timeout bounds only the wait for response headers, not the transfer.
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
            .route(RouteBuilder::path("files", "/files/", &up.url()).scope(&["files"])),
    )
    .await;
    sc.wait_ready().await;
    (idp, up, sc)
}

#[tokio::test]
async fn a_50_mb_upload_streams_through() {
    let (_idp, up, sc) = setup().await;
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::io::Error>::new(2);
    let client: Client<_, _> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(sc.url("/files/upload"))
        .header("content-length", FIFTY_MB.to_string())
        .body(body)
        .unwrap();
    let response = tokio::spawn(client.request(req));

    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    tx.send(Frame::data(chunk.clone())).await.unwrap();
    // The upstream must see bytes while 49.75 MB are still unsent: a sidecar that buffered the
    // whole body would never get here and the timeout would fail the test.
    tokio::time::timeout(Duration::from_secs(10), up.first_body_chunk())
        .await
        .expect("the first bytes reached the upstream before the rest was sent");
    let mut sent = chunk.len() as u64;
    while sent < FIFTY_MB {
        tx.send(Frame::data(chunk.clone())).await.unwrap();
        sent += chunk.len() as u64;
    }
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(30), response)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let got = up.received();
    assert_eq!(got.last().unwrap().body_len, FIFTY_MB);
    assert!(got.last().unwrap().bearer().is_some());
    sc.stop().await;
}

#[tokio::test]
async fn a_50_mb_download_streams_through() {
    let (_idp, up, sc) = setup().await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .get(
            sc.url(&format!("/files/download/{FIFTY_MB}"))
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The upstream holds everything after its first chunk until we release it: the client can
    // only see bytes now if the sidecar forwards them as they come.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("first bytes arrived before the upstream sent the rest")
        .unwrap()
        .unwrap();
    let mut received = first.into_data().map(|d| d.len() as u64).unwrap_or(0);
    assert!(received > 0 && received < FIFTY_MB);
    up.release_download();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .unwrap()
    {
        if let Ok(d) = frame.unwrap().into_data() {
            received += d.len() as u64;
        }
    }
    assert_eq!(received, FIFTY_MB);
    sc.stop().await;
}

#[tokio::test]
async fn an_https_upstream_is_verified_with_the_route_ca_file() {
    let idp = FakeTokenEndpoint::start(Mode::Issue(Duration::from_secs(300))).await;
    let (tls, ca_pem) = test_tls();
    let up = Upstream::start_with_tls(Some(tls)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let https = format!("https://localhost:{}", up.addr.port());
    let https_route = |name: &str, prefix: &str| {
        RouteBuilder::path(name, prefix, &https).with(|r| {
            // The defaults of a real file: HTTPS only, 60 s and 5 s timeouts.
            r.allow_insecure_upstream = false;
            r.timeout = Duration::from_secs(60);
            r.connect_timeout = Duration::from_secs(5);
        })
    };
    let routes = [
        https_route("trusted", "/trusted/").with(|r| r.ca_file = Some(ca_file.clone())),
        https_route("untrusted", "/untrusted/"),
    ];
    let sc = Running::start(
        SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem")).routes(routes),
    )
    .await;
    sc.wait_ready().await;
    let client = http_client();

    let resp = client
        .get(sc.url("/trusted/secure?a=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "{}",
        resp.text().await.unwrap_or_default()
    );
    let got = up.received();
    assert_eq!(got[0].path_and_query, "/secure?a=1");
    assert!(got[0].bearer().is_some());
    // ALPN picked HTTP/2 with an upstream that offers it.
    assert_eq!(got[0].version, http::Version::HTTP_2);

    // Without the CA the certificate is not trusted: 502, and the token never left.
    let resp = client
        .get(sc.url("/untrusted/secure"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(
        resp.headers()["token-sidecar-error"],
        "upstream_unavailable"
    );
    assert_eq!(up.count(), 1);
    sc.stop().await;
}
