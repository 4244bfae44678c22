//! Listeners and their lifecycle: bind everything, serve until told to stop, then drain.
//!
//! [`Sidecar::bind`] builds one token client per OAuth client (`[token]` and each
//! `[[client]]`, discovered when they name an issuer) and the routes, each owning its upstream
//! pool and its cache slot (one per distinct key of its client; none for a route whose sets are
//! templates), then starts each client's token cache (which prefetches every token at once) and
//! binds all listeners (the loopback token endpoint too, when `token_endpoint.listen` is set),
//! so a caller knows the real addresses before anything is
//! served (tests bind port 0). [`Sidecar::run`] accepts connections until the shutdown future
//! resolves, then stops accepting, lets in-flight requests finish for up to `shutdown_grace`,
//! and returns.

pub(crate) mod accept;
pub(crate) mod admin;
#[cfg(test)]
mod budget;
pub(crate) mod conn;
pub(crate) mod framing;
pub(crate) mod peers;
pub(crate) mod token_endpoint;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use self::accept::{Admission, Connections, accept_loop};
use self::admin::Admin;
use self::token_endpoint::TokenEndpoint;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::routes::{Route, RouteError, RouteTable, fixed_key};
use crate::proxy::{Listener, Proxy};
use crate::token::cache::{CacheBuilder, Policy, TokenCache};
use crate::token::client::{ClientBuildError, Endpoint, TokenClient};
use crate::token::registry::{ClientTokens, Clients, DEFAULT_CLIENT};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The `[token]` client (`default`).
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    /// The `[[client]]` at `index` (its messages name `token.` keys; read them as this
    /// client's).
    #[error("client {name:?} (client[{index}]): {source}")]
    NamedClient {
        index: usize,
        name: String,
        #[source]
        source: ClientBuildError,
    },
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        addr: SocketAddr,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// `[token_endpoint]` names something the built sidecar does not have.
    #[error("{key}: {message}")]
    TokenEndpoint { key: String, message: String },
}

/// A sidecar with its listeners bound and its token cache warming up.
pub struct Sidecar {
    config: Config,
    proxy: Arc<Proxy>,
    cache: Arc<TokenCache>,
    metrics: Arc<Metrics>,
    endpoint: Endpoint,
    main: TcpListener,
    dedicated: Vec<(usize, TcpListener)>,
    admin: TcpListener,
    /// The loopback token endpoint, when `token_endpoint.listen` is set.
    token_endpoint: Option<TcpListener>,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("proxy", &self.main.local_addr().ok())
            .field("admin", &self.admin.local_addr().ok())
            .finish_non_exhaustive()
    }
}

async fn bind(addr: SocketAddr, what: impl Into<String>) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            addr,
            what: what.into(),
            source,
        })
}

/// Binds `token_endpoint.listen` when set, after checking (again, for configs built in code)
/// that it is loopback and that every name in `token_endpoint.clients` is a client.
async fn bind_token_endpoint(
    config: &Config,
    clients: &Clients,
) -> Result<Option<TcpListener>, StartError> {
    let te = &config.token_endpoint;
    let Some(addr) = te.listen else {
        return Ok(None);
    };
    if !addr.ip().is_loopback() {
        return Err(StartError::TokenEndpoint {
            key: "token_endpoint.listen".into(),
            message: format!("must be a loopback address, not {addr}"),
        });
    }
    for (i, name) in te.clients.iter().enumerate() {
        if clients.get(name).is_none() {
            let known: Vec<&str> = clients.iter().map(|c| c.name()).collect();
            return Err(StartError::TokenEndpoint {
                key: format!("token_endpoint.clients[{i}]"),
                message: format!("{name:?} is not a client (clients: {})", known.join(", ")),
            });
        }
    }
    Ok(Some(bind(addr, "token_endpoint.listen").await?))
}

impl Sidecar {
    /// Builds everything from a validated config. Must run inside a Tokio runtime.
    pub async fn bind(config: Config) -> Result<Sidecar, StartError> {
        // Every client: `[token]` as `default`, then each `[[client]]` (docs/spec.md §2), each
        // with its own token client. A client that cannot be built or whose issuer cannot be
        // discovered stops the start, named.
        let mut configs = vec![(DEFAULT_CLIENT, &config.token)];
        configs.extend(config.client.iter().map(|c| (c.name.as_str(), &c.token)));
        let named = |i: usize, source: ClientBuildError| match i {
            0 => StartError::Client(source),
            _ => StartError::NamedClient {
                index: i - 1,
                name: configs[i].0.to_owned(),
                source,
            },
        };
        let mut fetchers = Vec::with_capacity(configs.len());
        for (i, (_, cfg)) in configs.iter().enumerate() {
            let client = Arc::new(TokenClient::new(cfg).map_err(|e| named(i, e))?);
            // With token.issuer, no token is asked for before the endpoint is known and checked.
            client
                .discover()
                .await
                .map_err(|e| named(i, ClientBuildError::from(e)))?;
            fetchers.push(client);
        }
        let endpoint = fetchers[0].endpoint().clone();
        // Each route takes its slot from its client's builder (shared by equal sets) and its
        // metrics; the refreshers start once every route has built, so a route that fails to
        // build has fetched nothing. One fetch-duration histogram for all clients. A route whose
        // sets hold `{host}`/`{label}` templates has no fixed slot: each request fills them and
        // takes a run-time slot of its client.
        let mut builders: Vec<CacheBuilder> = Vec::with_capacity(configs.len());
        for (_, cfg) in &configs {
            let policy = Policy::from_config(cfg);
            builders.push(match builders.first() {
                Some(first) => CacheBuilder::sharing(policy, first.fetch_duration().clone()),
                None => CacheBuilder::new(policy),
            });
        }
        let metrics = Arc::new(Metrics::new(builders[0].fetch_duration()));
        let fixed: Vec<_> = config
            .route
            .iter()
            .map(|r| {
                // Validation guarantees the name exists; an unknown one would be the default.
                let i = r
                    .client
                    .as_deref()
                    .and_then(|n| configs.iter().position(|(c, _)| *c == n))
                    .unwrap_or(0);
                let slot = fixed_key(r).map(|k| builders[i].slot(k));
                let m = metrics.route(&r.name, slot.as_ref());
                (i, slot, m)
            })
            .collect();
        let fetch_duration = builders[0].fetch_duration().clone();
        let list: Vec<_> = configs
            .iter()
            .zip(&fetchers)
            .zip(&builders)
            .map(|(((name, cfg), fetcher), builder)| {
                Arc::new(ClientTokens::new(
                    name,
                    (*cfg).clone(),
                    fetcher.clone(),
                    fetch_duration.clone(),
                    builder.slots().to_vec(),
                ))
            })
            .collect();
        let routes = config
            .route
            .iter()
            .zip(fixed)
            .map(|(r, (i, slot, m))| {
                let max_idle = config.proxy.max_connections;
                Route::from_config(r, configs[i].1, slot, list[i].clone(), m, max_idle)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let caches = builders
            .into_iter()
            .zip(fetchers)
            .map(|(builder, fetcher)| builder.start(fetcher))
            .collect();
        let cache = Arc::new(TokenCache::join(caches));
        let clients = Arc::new(Clients::new(list));
        metrics.clients(clients.clone());

        let main = bind(config.proxy.listen, "proxy.listen").await?;
        let admin = bind(config.admin.listen, "admin.listen").await?;
        let mut dedicated = Vec::new();
        for (i, r) in config.route.iter().enumerate() {
            if let Some(addr) = r.listen {
                dedicated.push((i, bind(addr, format!("route {}", r.name)).await?));
            }
        }
        let token_endpoint = bind_token_endpoint(&config, &clients).await?;
        let proxy = Arc::new(Proxy {
            table: RouteTable::new(routes, &config.proxy.allowed_hosts),
            retry_body_limit: config.proxy.retry_body_limit,
            body_read_timeout: config.proxy.body_read_timeout,
            access_log: config.log.access_log,
            unmatched: metrics.route("-", None),
            clients,
        });
        Ok(Sidecar {
            config,
            proxy,
            cache,
            metrics,
            endpoint,
            main,
            dedicated,
            admin,
            token_endpoint,
        })
    }

    /// The loopback token endpoint's address, when it is on.
    pub fn token_endpoint_addr(&self) -> Option<SocketAddr> {
        self.token_endpoint
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener has an address"))
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.main
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("bound listener has an address")
    }

    /// The request path, for benchmarks that call its phases directly.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.proxy.clone()
    }

    /// The token cache, for tests that count fetches and look at slots.
    pub fn cache(&self) -> Arc<TokenCache> {
        self.cache.clone()
    }

    /// Serves until `shutdown` resolves, then drains for up to `shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let limits = &self.config.proxy;
        let main_addr = self.proxy_addr();
        let conns = Connections::new(limits);
        let mut loops = Vec::new();
        let mut serve_proxy = |listener, which| {
            let proxy = self.proxy.clone();
            let handler = move |req| proxy.clone().handle(which, req);
            loops.push(tokio::spawn(accept_loop(
                listener,
                handler,
                Admission::Queue {
                    max_connections: limits.max_connections,
                },
                conns.clone(),
            )));
        };
        serve_proxy(self.main, Listener::Main);
        for (i, listener) in self.dedicated {
            serve_proxy(listener, Listener::Dedicated(i));
        }
        let admin = Arc::new(Admin::new(
            self.proxy.clone(),
            self.metrics.clone(),
            self.endpoint.clone(),
        ));
        let admin_limits = &self.config.admin;
        loops.push(tokio::spawn(accept_loop(
            self.admin,
            move |req| {
                let admin = admin.clone();
                async move { admin.handle(req).await }
            },
            // The port the cluster can reach: idle connections must not keep probes out.
            Admission::PerPeer {
                max_connections: admin_limits.max_connections,
                per_peer: admin_limits.max_connections_per_peer,
            },
            conns.admin(admin_limits),
        )));
        if let Some(listener) = self.token_endpoint {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "token endpoint serving POST /oauth2/token");
            }
            let endpoint = Arc::new(TokenEndpoint::new(
                self.proxy.clients.clone(),
                &self.config.token_endpoint,
                self.config.log.access_log,
            ));
            loops.push(tokio::spawn(accept_loop(
                listener,
                move |req| {
                    let endpoint = endpoint.clone();
                    async move { endpoint.handle(req).await }
                },
                Admission::Queue {
                    max_connections: self.config.token_endpoint.max_connections,
                },
                // Same stop/cut signals and tracker: drained with the other listeners.
                conns.token_endpoint(),
            )));
        }
        tracing::info!(proxy = %main_addr, routes = self.config.route.len(), "token-sidecar serving");

        shutdown.await;
        tracing::info!(grace = ?limits.shutdown_grace, "shutting down: no new connections, draining in-flight requests");
        conns.stop.cancel();
        for l in loops {
            let _ = l.await;
        }
        conns.tasks.close();
        tokio::select! {
            _ = conns.tasks.wait() => tracing::info!("all connections drained"),
            _ = tokio::time::sleep(limits.shutdown_grace) => {
                tracing::warn!("shutdown grace period over; cutting the remaining connections");
                conns.cut.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(1), conns.tasks.wait()).await;
            }
        }
        // Dropping the cache stops the refreshers.
        drop(self.cache);
    }
}
