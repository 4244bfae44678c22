//! The pooled client that carries requests to one route's upstream: HTTP/1.1, or HTTP/2 when
//! the upstream offers it by ALPN; TLS verified against the system and webpki roots plus the
//! route's `ca_file`; presenting the route's client certificate (mutual TLS, RFC 8705) when it
//! has one, resolved per handshake so a rotated certificate reaches new connections.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

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

/// A route's upstream connection pool and its timeouts.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pub(crate) client: UpstreamClient,
    /// Until the upstream's response headers arrive.
    pub(crate) timeout: Duration,
}

impl Upstream {
    /// `identity`: the certificate to present (the route's own, or the token client's with
    /// `use_token_client_cert`), loaded and checked by the caller.
    pub(crate) fn new(
        cfg: &RouteConfig,
        identity: Option<Arc<IdentitySource>>,
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
            .pool_idle_timeout(Duration::from_secs(90))
            .http1_max_buf_size(H1_MAX_BUF)
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
            .http2_max_send_buf_size(H2_MAX_SEND_BUF)
            .build(https);
        Ok(Upstream {
            client,
            timeout: cfg.timeout,
        })
    }
}
