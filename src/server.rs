//! Listeners and their lifecycle: bind everything, serve until told to stop, then drain.
//!
//! [`Sidecar::bind`] builds the token client, starts the token cache (which prefetches every
//! route's token at once) and binds all listeners, so a caller knows the real addresses before
//! anything is served (tests bind port 0). [`Sidecar::run`] accepts connections until the
//! shutdown future resolves, then stops accepting, lets in-flight requests finish for up to
//! `shutdown_grace`, and returns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Admin;
use crate::cache::{Policy, TokenCache};
use crate::config::{Config, ProxyConfig};
use crate::conn::{self, TrackedBody, TrackedIo, Tracker, Verdict};
use crate::metrics::Metrics;
use crate::proxy::{Listener, Proxy, ProxyBody};
use crate::routes::{Route, RouteError, RouteTable};
use crate::tls::TlsError;
use crate::token_client::{ClientBuildError, TokenClient};
use crate::upstream::Upstream;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("route {route}: {source}")]
    Tls {
        route: String,
        #[source]
        source: TlsError,
    },
    #[error("cannot listen on {addr} for {what}: {source}")]
    Bind {
        addr: SocketAddr,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A sidecar with its listeners bound and its token cache warming up.
pub struct Sidecar {
    config: Config,
    proxy: Arc<Proxy>,
    cache: Arc<TokenCache>,
    metrics: Arc<Metrics>,
    main: TcpListener,
    dedicated: Vec<(usize, TcpListener)>,
    admin: TcpListener,
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

impl Sidecar {
    /// Builds everything from a validated config. Must run inside a Tokio runtime.
    pub async fn bind(config: Config) -> Result<Sidecar, StartError> {
        let client = Arc::new(TokenClient::new(&config.token)?);
        Self::bind_with_client(config, client).await
    }

    /// Like [`Sidecar::bind`], with a token client built elsewhere (the `dev` mode builds its own).
    pub async fn bind_with_client(
        config: Config,
        client: Arc<TokenClient>,
    ) -> Result<Sidecar, StartError> {
        let metrics = Arc::new(Metrics::new());
        let mut routes = Vec::with_capacity(config.route.len());
        let mut upstreams = Vec::with_capacity(config.route.len());
        for r in &config.route {
            routes.push(Route::from_config(r, &metrics)?);
            upstreams.push(Upstream::new(r).map_err(|source| StartError::Tls {
                route: r.name.clone(),
                source,
            })?);
        }
        let main = bind(config.proxy.listen, "proxy.listen").await?;
        let admin = bind(config.admin.listen, "admin.listen").await?;
        let mut dedicated = Vec::new();
        for (i, r) in config.route.iter().enumerate() {
            if let Some(addr) = r.listen {
                dedicated.push((i, bind(addr, format!("route {}", r.name)).await?));
            }
        }

        let cache = Arc::new(TokenCache::start(
            routes.iter().map(|r| r.token_key.clone()),
            client,
            Policy::from_config(&config.token),
            metrics.token(),
        ));
        for r in &mut routes {
            r.slot = cache.slot(&r.token_key);
        }
        metrics.watch_routes(
            routes
                .iter()
                .filter_map(|r| Some((r.name.to_string(), r.slot.clone()?)))
                .collect(),
        );
        let is_dedicated: Vec<bool> = config.route.iter().map(|r| r.listen.is_some()).collect();
        let proxy = Arc::new(Proxy {
            table: RouteTable::new(routes, &is_dedicated),
            upstreams,
            retry_body_limit: config.proxy.retry_body_limit,
            access_log: config.log.access_log,
            unmatched: metrics.route("-"),
        });
        Ok(Sidecar {
            config,
            proxy,
            cache,
            metrics,
            main,
            dedicated,
            admin,
        })
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

    /// The address of a route's dedicated listener.
    pub fn route_addr(&self, name: &str) -> Option<SocketAddr> {
        self.dedicated
            .iter()
            .find(|(i, _)| self.config.route[*i].name == name)
            .and_then(|(_, l)| l.local_addr().ok())
    }

    pub fn cache(&self) -> Arc<TokenCache> {
        self.cache.clone()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Serves until `shutdown` resolves, then drains for up to `shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let limits = &self.config.proxy;
        let main_addr = self.proxy_addr();
        let admin = Arc::new(Admin::new(self.proxy.clone(), self.metrics.clone()));
        let conns = Connections {
            stop: CancellationToken::new(),
            cut: CancellationToken::new(),
            tasks: TaskTracker::new(),
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
        };

        let mut listeners = vec![(
            self.main,
            Handler::Proxy(self.proxy.clone(), Listener::Main),
            limits.max_connections,
        )];
        for (i, listener) in self.dedicated {
            listeners.push((
                listener,
                Handler::Proxy(self.proxy.clone(), Listener::Dedicated(i)),
                limits.max_connections,
            ));
        }
        // Probes and scrapes need few connections.
        listeners.push((self.admin, Handler::Admin(admin), 64));
        let loops: Vec<_> = listeners
            .into_iter()
            .map(|(listener, handler, max)| {
                tokio::spawn(accept_loop(
                    listener,
                    handler,
                    builder(limits),
                    max,
                    conns.clone(),
                ))
            })
            .collect();
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

/// What a listener serves.
#[derive(Clone)]
enum Handler {
    Proxy(Arc<Proxy>, Listener),
    Admin(Arc<Admin>),
}

impl Handler {
    async fn call(self, req: Request<Incoming>) -> Response<ProxyBody> {
        match self {
            Handler::Proxy(proxy, listener) => proxy.handle(listener, req).await,
            Handler::Admin(admin) => admin.handle(req).await,
        }
    }
}

fn builder(limits: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper's header timer also runs while a keep-alive connection idles; conn.rs enforces
    // both timeouts separately instead.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes)
        .max_headers(limits.max_headers);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    b
}

/// What every connection task shares: the signals to drain and to cut, and the tracker the
/// shutdown waits on.
#[derive(Clone)]
struct Connections {
    /// Stop accepting; drain connections gracefully (HTTP/2 GOAWAY, HTTP/1 close when idle).
    stop: CancellationToken,
    /// The grace period is over: drop whatever is left.
    cut: CancellationToken,
    tasks: TaskTracker,
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

/// Accepts until `stop`; each connection holds a permit, so at most `max_connections` are served
/// at once and the rest wait in the kernel's backlog.
async fn accept_loop(
    listener: TcpListener,
    handler: Handler,
    builder: auto::Builder<TokioExecutor>,
    max_connections: usize,
    conns: Connections,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            _ = conns.stop.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = conns.stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let tracker = Tracker::new();
        let handler = handler.clone();
        let in_service = tracker.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let handler = handler.clone();
            let in_flight = in_service.request_started(req.version());
            async move {
                let resp = handler.call(req).await;
                Ok::<_, Infallible>(resp.map(|b| TrackedBody::new(b, in_flight)))
            }
        });
        let io = TokioIo::new(TrackedIo::new(stream, tracker.clone()));
        let conn = builder.serve_connection(io, service).into_owned();
        let conns = conns.clone();
        conns.tasks.clone().spawn(async move {
            serve(conn, tracker, &conns, peer).await;
            drop(permit);
        });
    }
}

/// Drives one connection until it ends, its watchdog fires, or shutdown drains or cuts it.
async fn serve<C>(conn: C, tracker: Arc<Tracker>, conns: &Connections, peer: SocketAddr)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let watchdog = conn::watchdog(tracker, conns.header_read_timeout, conns.idle_timeout);
    let mut watchdog = std::pin::pin!(watchdog);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            why = &mut watchdog, if !draining => {
                tracing::debug!(%peer, reason = ?why, "closing connection");
                if why == Verdict::HeaderTimeout {
                    // A client stalling its request head gets no more of our time.
                    return;
                }
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = conns.stop.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = conns.cut.cancelled() => return,
        }
    }
}
