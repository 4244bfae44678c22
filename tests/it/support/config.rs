//! A typed builder for the sidecar's configuration in tests and benchmarks: loopback port-0
//! listeners, the given token endpoint and key, and routes built in Rust rather than TOML text
//! (docs/spec.md §4 for the keys).
//!
//! Self-contained on purpose (only `token_sidecar`, std and external crates): the benchmark
//! shares this file with `#[path = "../tests/it/support/config.rs"] mod config;`.
//!
//! ```ignore
//! let cfg = SidecarConfig::new(&idp.token_url(), fixture("ec_p256_sec1.pem"))
//!     .token(|t| t.expiry_skew = Duration::from_secs(1))
//!     .route(RouteBuilder::path("orders", "/orders/", &up.url()).scope(&["orders:read"]))
//!     .build();
//! ```

#![allow(dead_code)] // each includer uses its own part of the builder

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use token_sidecar::TokenEndpointConfig;
use token_sidecar::{Config, LogConfig, ProxyConfig, RouteConfig, TokenConfig};

/// The client id every test registers at its authorization server.
pub const CLIENT_ID: &str = "orders-service";

/// `127.0.0.1:0`: a free loopback port chosen at bind time.
pub const LOOPBACK_ANY: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A whole sidecar configuration under construction.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    cfg: Config,
}

impl SidecarConfig {
    /// Loopback port-0 listeners, a 2 s shutdown grace, `private_key_jwt` as [`CLIENT_ID`] with
    /// `key_file` at `token_url` (plain `http://` allowed), every other key at its default, and
    /// no routes yet.
    pub fn new(token_url: &str, key_file: impl AsRef<Path>) -> SidecarConfig {
        // The required keys only; serde fills in the documented defaults of the rest.
        let mut token: TokenConfig = serde_json::from_value(serde_json::json!({
            "token_url": token_url,
            "client_id": CLIENT_ID,
        }))
        .expect("a [token] section with its required keys deserializes");
        token.allow_insecure_token_url = true;
        token.private_key_file = Some(key_file.as_ref().to_path_buf());
        let cfg = Config {
            proxy: ProxyConfig {
                listen: LOOPBACK_ANY,
                shutdown_grace: Duration::from_secs(2),
                ..ProxyConfig::default()
            },
            admin: token_sidecar::AdminConfig {
                listen: LOOPBACK_ANY,
                ..token_sidecar::AdminConfig::default()
            },
            token,
            route: Vec::new(),
            client: Vec::new(),
            log: LogConfig::default(),
            token_endpoint: TokenEndpointConfig::default(),
        };
        SidecarConfig { cfg }
    }

    /// Changes `[proxy]`.
    pub fn proxy(mut self, f: impl FnOnce(&mut ProxyConfig)) -> SidecarConfig {
        f(&mut self.cfg.proxy);
        self
    }

    /// Changes `[token]`.
    pub fn token(mut self, f: impl FnOnce(&mut TokenConfig)) -> SidecarConfig {
        f(&mut self.cfg.token);
        self
    }

    /// Adds a `[[client]]` called `name`: a copy of `[token]` as it is now, changed by `f`.
    pub fn client(mut self, name: &str, f: impl FnOnce(&mut TokenConfig)) -> SidecarConfig {
        let mut token = self.cfg.token.clone();
        f(&mut token);
        self.cfg.client.push(token_sidecar::ClientConfig {
            name: name.to_string(),
            token,
        });
        self
    }

    /// Changes `[log]`.
    pub fn log(mut self, f: impl FnOnce(&mut LogConfig)) -> SidecarConfig {
        f(&mut self.cfg.log);
        self
    }

    /// Changes `[token_endpoint]`.
    pub fn token_endpoint(mut self, f: impl FnOnce(&mut TokenEndpointConfig)) -> SidecarConfig {
        f(&mut self.cfg.token_endpoint);
        self
    }

    /// The main and admin listeners on these addresses instead of port 0.
    pub fn listen(mut self, proxy: SocketAddr, admin: SocketAddr) -> SidecarConfig {
        self.cfg.proxy.listen = proxy;
        self.cfg.admin.listen = admin;
        self
    }

    /// Adds a `[[route]]`.
    pub fn route(mut self, route: RouteBuilder) -> SidecarConfig {
        self.cfg.route.push(route.0);
        self
    }

    /// Adds several `[[route]]`s, in order.
    pub fn routes(self, routes: impl IntoIterator<Item = RouteBuilder>) -> SidecarConfig {
        routes.into_iter().fold(self, SidecarConfig::route)
    }

    /// The configuration, validated as a loaded file would be; panics with every problem.
    pub fn build(self) -> Config {
        if let Err(e) = self.cfg.validate() {
            panic!(
                "test config invalid: {e}\n{}",
                toml::to_string(&self.cfg).unwrap_or_default()
            );
        }
        self.cfg
    }

    /// The configuration as `sidecar.toml` text (for the binary), validated first by reading
    /// it back the way the binary will.
    pub fn to_toml(&self) -> String {
        let text = toml::to_string(&self.cfg).expect("the config serializes to TOML");
        if let Err(e) = token_sidecar::from_toml_str(&text) {
            panic!("test config invalid: {e}\n{text}");
        }
        text
    }
}

impl From<SidecarConfig> for Config {
    fn from(b: SidecarConfig) -> Config {
        b.build()
    }
}

/// One `[[route]]` under construction. Every constructor allows a plain-HTTP upstream and sets
/// a 2 s response timeout and a 1 s connect timeout (loopback upstreams answer at once).
#[derive(Clone, Debug)]
pub struct RouteBuilder(RouteConfig);

impl RouteBuilder {
    fn new(name: &str, upstream: &str) -> RouteBuilder {
        let mut r: RouteConfig = serde_json::from_value(serde_json::json!({
            "name": name,
            "upstream": upstream,
        }))
        .expect("a [[route]] with its required keys deserializes");
        r.allow_insecure_upstream = true;
        r.timeout = Duration::from_secs(2);
        r.connect_timeout = Duration::from_secs(1);
        RouteBuilder(r)
    }

    /// A route on the main listener for `prefix`, stripped before forwarding.
    pub fn path(name: &str, prefix: &str, upstream: &str) -> RouteBuilder {
        let mut b = RouteBuilder::new(name, upstream);
        b.0.path_prefix = Some(prefix.to_string());
        b.0.strip_prefix = true;
        b
    }

    /// A route on the main listener for requests naming `host`.
    pub fn host(name: &str, host: &str, upstream: &str) -> RouteBuilder {
        let mut b = RouteBuilder::new(name, upstream);
        b.0.host = Some(host.to_string());
        b
    }

    /// A route with its own listener on `listen` (port 0: any free one).
    pub fn dedicated(name: &str, listen: SocketAddr, upstream: &str) -> RouteBuilder {
        let mut b = RouteBuilder::new(name, upstream);
        b.0.listen = Some(listen);
        b
    }

    /// The token's scopes.
    pub fn scope(mut self, scopes: &[&str]) -> RouteBuilder {
        self.0.scope = scopes.iter().map(|s| s.to_string()).collect();
        self
    }

    /// The token's audiences.
    pub fn audience(mut self, audiences: &[&str]) -> RouteBuilder {
        self.0.audience = audiences.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Any other change.
    pub fn with(mut self, f: impl FnOnce(&mut RouteConfig)) -> RouteBuilder {
        f(&mut self.0);
        self
    }
}
