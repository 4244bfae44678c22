//! Shared test plumbing: the authorization servers, the recording upstream, and a sidecar
//! running in-process on free loopback ports.

pub mod authz;
pub mod config;
pub mod faults;
pub mod idp;
pub mod process;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use token_sidecar::Config;
use token_sidecar::Sidecar;
use token_sidecar::SigningKey;
use token_sidecar::TokenCache;

pub use config::{CLIENT_ID, RouteBuilder, SidecarConfig};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/keys")
        .join(name)
}

/// The public JWK Set of a key fixture, as the sidecar's `jwks` command would print it.
pub fn public_jwks(key_file: &str, alg: Option<&str>) -> serde_json::Value {
    let bytes = std::fs::read(fixture(key_file)).unwrap();
    let alg = alg.map(|a| a.parse::<token_sidecar::Algorithm>().unwrap());
    let key = SigningKey::from_bytes(&bytes, alg, None).unwrap();
    serde_json::json!({ "keys": [key.public_jwk()] })
}

/// A sidecar serving in this test's runtime.
pub struct Running {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub cache: Arc<TokenCache>,
    /// The loopback token endpoint, when `token_endpoint.listen` is set.
    pub token_endpoint: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Binds a validated configuration (a [`SidecarConfig`] is validated when it converts).
    pub async fn start(cfg: impl Into<Config>) -> Running {
        let cfg = cfg.into();
        let sidecar = Sidecar::bind(cfg).await.expect("sidecar binds");
        let addr = sidecar.proxy_addr();
        let admin = sidecar.admin_addr();
        let cache = sidecar.cache();
        let token_endpoint = sidecar.token_endpoint_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sidecar.run(async {
            let _ = rx.await;
        }));
        Running {
            addr,
            admin,
            cache,
            token_endpoint,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits (bounded) until /readyz says every route has its token.
    pub async fn wait_ready(&self) {
        let client = http_client();
        let url = format!("http://{}/readyz", self.admin);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(r) = client.get(&url).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sidecar not ready in 15 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The common fixture: one route `/orders/` (scope `orders:read`, audience [`idp::ORDERS`]) to
/// `upstream`, the ES256 key, and `token` applied to `[token]`.
pub fn orders_config(
    token_url: &str,
    upstream: &str,
    token: impl FnOnce(&mut token_sidecar::TokenConfig),
) -> SidecarConfig {
    SidecarConfig::new(token_url, fixture("ec_p256_sec1.pem"))
        .token(token)
        .route(
            RouteBuilder::path("orders", "/orders/", upstream)
                .scope(&["orders:read"])
                .audience(&[idp::ORDERS]),
        )
}

/// A plain client for talking to the sidecar: no proxy from the environment, no redirects.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}
