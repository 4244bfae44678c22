//! `token-sidecar dev`: the sidecar wired to the embedded development authorization server.
//!
//! With no config it generates a throwaway key, registers it, and serves the route `/echo/` to a
//! built-in echo upstream that answers with the request it received and the decoded claims of its
//! bearer token. With a config it keeps the user's routes and key and replaces only the token
//! endpoint. Everything binds loopback only.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::{AuthMethod, Config};
use crate::devserver::{DevClient, DevServer, DevServerConfig};
use crate::key::{Algorithm, KeySource, SigningKey};
use crate::server::Sidecar;

pub const DEV_CLIENT_ID: &str = "dev-client";
pub const ECHO_SCOPE: &str = "echo:read";
pub const ECHO_AUDIENCE: &str = "http://echo.dev.local";

/// What `dev` is started with.
#[derive(Debug, Clone, Default)]
pub struct DevOptions {
    /// The user's config; None for the self-contained echo setup.
    pub config: Option<Config>,
    /// Overrides `proxy.listen` (default 127.0.0.1:8080).
    pub listen: Option<SocketAddr>,
    /// Overrides `admin.listen` (default 127.0.0.1:9090).
    pub admin_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("dev mode binds loopback addresses only; {key} = {addr} is not loopback")]
    NotLoopback { key: String, addr: SocketAddr },
    #[error(transparent)]
    Server(#[from] crate::devserver::DevServerError),
    #[error(transparent)]
    Start(#[from] crate::server::StartError),
    #[error("{0}")]
    Setup(String),
}

/// Everything `dev` started; dropping it stops the helpers (the sidecar stops with `run`).
pub struct Dev {
    pub sidecar: Sidecar,
    pub authz: DevServer,
    pub echo: Option<SocketAddr>,
    _echo_task: Option<tokio::task::JoinHandle<()>>,
    /// Holds the throwaway key file; removed on drop.
    _key_dir: Option<tempfile_dir::TempDir>,
}

/// The parts of a [`Dev`] that must outlive the sidecar's `run`.
pub struct DevRest {
    _authz: DevServer,
    _echo_task: Option<tokio::task::JoinHandle<()>>,
    _key_dir: Option<tempfile_dir::TempDir>,
}

impl Drop for DevRest {
    fn drop(&mut self) {
        if let Some(t) = &self._echo_task {
            t.abort();
        }
    }
}

pub const BANNER: &str = "\
**********************************************************************
*  token-sidecar DEVELOPMENT MODE                                    *
*  An embedded authorization server issues tokens signed by a key    *
*  generated at start-up. For local development only: never use it  *
*  in production or expose it beyond this machine.                   *
**********************************************************************";

impl Dev {
    /// Starts the development authorization server, the echo upstream (no config) and binds the sidecar.
    pub async fn start(opts: DevOptions) -> Result<Dev, DevError> {
        let mut key_dir = None;
        let mut echo = None;
        let mut echo_task = None;
        let mut config = match opts.config {
            Some(c) => c,
            None => {
                let (addr, task) = start_echo()
                    .await
                    .map_err(|e| DevError::Setup(format!("echo upstream: {e}")))?;
                echo = Some(addr);
                echo_task = Some(task);
                let (dir, key_path) = throwaway_key()?;
                key_dir = Some(dir);
                echo_config(addr, &key_path)?
            }
        };
        if let Some(l) = opts.listen {
            config.proxy.listen = l;
        }
        if let Some(l) = opts.admin_listen {
            config.admin.listen = l;
        }
        check_loopback(&config)?;

        // The dev server only speaks private_key_jwt: give a client without a usable key a throwaway one.
        let key_source = match (&config.token.auth_method, &config.token.private_key_file) {
            (AuthMethod::PrivateKeyJwt, Some(p)) => {
                KeySource::load(p.clone(), None, config.token.key_id.clone()).ok()
            }
            _ => None,
        };
        let key_source = match key_source {
            Some(k) => k,
            None => {
                let (dir, key_path) = throwaway_key()?;
                key_dir = Some(dir);
                config.token.auth_method = AuthMethod::PrivateKeyJwt;
                config.token.private_key_file = Some(key_path.clone());
                config.token.signing_alg = None;
                config.token.key_id = None;
                KeySource::load(key_path, None, None).map_err(|e| DevError::Setup(e.to_string()))?
            }
        };

        let scopes: BTreeSet<String> = config
            .route
            .iter()
            .flat_map(|r| r.scope.iter().cloned())
            .collect();
        let audiences: BTreeSet<String> = config
            .route
            .iter()
            .flat_map(|r| r.audience.iter().cloned())
            .collect();
        let authz = DevServer::start(DevServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            clients: vec![DevClient {
                client_id: config.token.client_id.clone(),
                jwks: serde_json::json!({ "keys": [key_source.current().public_jwk()] }),
                scopes,
                audiences,
            }],
            token_ttl: Duration::from_secs(3600),
        })
        .await?;

        config.token.token_url = authz.token_url().to_string();
        config.token.allow_insecure_token_url = true;
        config.token.assertion_audience = None;
        config.token.ca_file = None;
        config
            .validate()
            .map_err(|e| DevError::Setup(e.to_string()))?;
        let sidecar = Sidecar::bind(config).await?;
        Ok(Dev {
            sidecar,
            authz,
            echo,
            _echo_task: echo_task,
            _key_dir: key_dir,
        })
    }

    /// Splits off the sidecar so it can `run`; the rest must live as long as it does.
    pub fn into_parts(self) -> (Sidecar, DevRest) {
        (
            self.sidecar,
            DevRest {
                _authz: self.authz,
                _echo_task: self._echo_task,
                _key_dir: self._key_dir,
            },
        )
    }

    /// What to tell the developer after start-up.
    pub fn summary(&self) -> String {
        let proxy = self.sidecar.proxy_addr();
        let mut s = format!(
            "sidecar:         http://{proxy}\n\
             admin:           http://{}/readyz\n\
             token endpoint:  {}\n\
             JWKS (trust dev tokens with this key set): {}\n",
            self.sidecar.admin_addr(),
            self.authz.token_url(),
            self.authz.jwks_url(),
        );
        if self.echo.is_some() {
            s.push_str(&format!(
                "try:             curl -s http://{proxy}/echo/hello\n"
            ));
        }
        s
    }
}

fn check_loopback(config: &Config) -> Result<(), DevError> {
    let mut addrs = vec![
        ("proxy.listen".to_string(), config.proxy.listen),
        ("admin.listen".to_string(), config.admin.listen),
    ];
    for (i, r) in config.route.iter().enumerate() {
        if let Some(l) = r.listen {
            addrs.push((format!("route[{i}].listen"), l));
        }
    }
    for (key, addr) in addrs {
        if !addr.ip().is_loopback() {
            return Err(DevError::NotLoopback { key, addr });
        }
    }
    Ok(())
}

/// A fresh ES256 key in a private temporary directory.
fn throwaway_key() -> Result<(tempfile_dir::TempDir, PathBuf), DevError> {
    let (pem, _) =
        SigningKey::generate(Algorithm::ES256).map_err(|e| DevError::Setup(e.to_string()))?;
    let dir = tempfile_dir::TempDir::new()
        .map_err(|e| DevError::Setup(format!("temporary directory: {e}")))?;
    let path = dir.path().join("dev-key.pem");
    crate::key::write_private(&path, pem.expose().as_bytes(), true)
        .map_err(|e| DevError::Setup(e.to_string()))?;
    Ok((dir, path))
}

fn echo_config(echo: SocketAddr, key: &Path) -> Result<Config, DevError> {
    let text = format!(
        r#"
[token]
token_url = "http://127.0.0.1:1/oauth2/token"
allow_insecure_token_url = true
client_id = "{DEV_CLIENT_ID}"
private_key_file = "{key}"

[[route]]
name = "echo"
path_prefix = "/echo/"
strip_prefix = true
upstream = "http://{echo}"
allow_insecure_upstream = true
scope = ["{ECHO_SCOPE}"]
audience = ["{ECHO_AUDIENCE}"]
"#,
        key = key
            .display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
    );
    crate::config::from_toml_str(&text).map_err(|e| DevError::Setup(e.to_string()))
}

/// The built-in echo upstream: answers with the request it got and the bearer token's claims.
async fn start_echo() -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(echo))
                    .await;
            });
        }
    });
    Ok((addr, task))
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, 1 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let token = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .filter(|(n, _)| *n != http::header::AUTHORIZATION)
        .map(|(n, v)| {
            (
                n.to_string(),
                serde_json::Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let out = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body.len(),
        // A throwaway development token, shown so it can be inspected and verified.
        "token": token,
        "claims": token.as_deref().and_then(crate::token::jwt_claims),
    });
    let mut resp = Response::new(Full::new(Bytes::from(
        serde_json::to_string_pretty(&out).unwrap_or_default(),
    )));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// A minimal temporary directory, removed on drop (keeps `tempfile` a dev-dependency only).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> std::io::Result<TempDir> {
            let name = format!(
                "token-sidecar-dev-{}-{}",
                std::process::id(),
                crate::assertion::new_jti()
            );
            let path = std::env::temp_dir().join(name);
            let mut builder = std::fs::DirBuilder::new();
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder.create(&path)?;
            Ok(TempDir(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
