//! `token-sidecar dev`: the sidecar wired to the embedded development authorization server.
//!
//! The configuration is layered like every command's (defaults < base < `SIDECAR_*` environment
//! < command-line flags). The base is the user's file, or without one a built-in config whose
//! route `/echo/` goes to the echo upstream (`echo.rs`), which answers with the request it
//! received and the decoded claims of its bearer token.
//!
//! Dev keeps the user's routes and listeners and replaces only what cannot work against the
//! development server, reporting each replacement as one line (`Dev::replacements`):
//! the token endpoint always (and with it `assertion_audience` and `ca_file`, which describe the
//! real server); the key when the client has none that can be read (a throwaway ES256 key,
//! registered with the development server); a `client_secret_*` method (the development server
//! only takes `private_key_jwt`), and `client_assertion_file` unless a federated issuer is
//! trusted (`DevOptions::federation`), in which case the client keeps its assertion file; and a route upstream of `http://echo.dev.local`, which names
//! the echo upstream. Everything else is validated as in production, after the replacements, so
//! a genuine mistake still stops dev with one line per problem naming its key.
//!
//! Invariant: everything binds loopback only; a non-loopback listener is refused.

pub(crate) mod authz;
mod echo;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{AuthMethod, Config, ConfigError, TokenConfig};
use crate::dev::authz::{DevClient, DevFederation, DevServer, DevServerConfig};
use crate::dev::echo::Echo;
use crate::key::{Algorithm, KeySource, SigningKey};
use crate::server::Sidecar;

pub(crate) const DEV_CLIENT_ID: &str = "dev-client";
pub const ECHO_SCOPE: &str = "echo:read";
pub const ECHO_AUDIENCE: &str = "http://echo.dev.local";
/// A route with this upstream is served by the built-in echo upstream (the built-in config's
/// route has it; a user's config may use it too).
pub(crate) const ECHO_UPSTREAM: &str = "http://echo.dev.local";

/// What `dev` is started with.
#[derive(Debug, Clone, Default)]
pub struct DevOptions {
    /// The user's config, as loaded (it need not be valid yet: dev validates it after its
    /// replacements). None for the built-in echo config, layered with the `SIDECAR_*`
    /// environment as a command's config file would be.
    pub config: Option<Config>,
    /// Overrides `proxy.listen` (a command-line flag: above every other layer).
    pub listen: Option<SocketAddr>,
    /// Overrides `admin.listen` (a command-line flag: above every other layer).
    pub admin_listen: Option<SocketAddr>,
    /// Trust this federated issuer for the configured client (`--federated-*` flags): the
    /// client keeps `auth_method = "client_assertion_file"` and its file; `client_id` is set to
    /// `token.client_id`.
    pub federation: Option<DevFederation>,
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("dev mode binds loopback addresses only; {key} = {addr} is not loopback")]
    NotLoopback { key: String, addr: SocketAddr },
    /// Dev registers one client (`[token]`) with its server; a `[[client]]` would silently
    /// keep asking its real authorization server, so it is refused (exit 2) instead.
    #[error(
        "dev mode serves only the [token] client; {key} (name = {name:?}) is not supported: remove the [[client]] blocks and the routes' `client =` for dev, or run against a real authorization server"
    )]
    ClientNotSupported { key: String, name: String },
    /// The configuration is wrong in a part dev keeps; one line per problem.
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Server(#[from] crate::dev::authz::DevServerError),
    #[error(transparent)]
    Start(#[from] crate::server::StartError),
    #[error("{0}")]
    Setup(String),
}

/// Everything `dev` started; dropping it stops the helpers (the sidecar stops with `run`).
pub struct Dev {
    pub sidecar: Sidecar,
    pub authz: DevServer,
    /// The echo upstream's address, when a route uses it.
    pub echo: Option<SocketAddr>,
    replaced: Vec<String>,
    _echo: Option<Echo>,
    /// Holds the throwaway key file; removed on drop.
    _key_dir: Option<tempfile_dir::TempDir>,
}

/// The parts of a [`Dev`] that must outlive the sidecar's `run`.
pub struct DevRest {
    _authz: DevServer,
    _echo: Option<Echo>,
    _key_dir: Option<tempfile_dir::TempDir>,
}

pub(crate) const BANNER: &str = "\
**********************************************************************
*  token-sidecar DEVELOPMENT MODE                                    *
*  An embedded authorization server issues tokens signed by a key    *
*  generated at start-up. For local development only: never use it  *
*  in production or expose it beyond this machine.                   *
**********************************************************************";

impl Dev {
    /// Starts the development authorization server (and the echo upstream when a route uses
    /// it), makes the replacements described in the module documentation, validates the result
    /// and binds the sidecar.
    pub async fn start(opts: DevOptions) -> Result<Dev, DevError> {
        let mut config = match opts.config {
            Some(c) => c,
            None => crate::config::layered(crate::config::Base::Builtin(&builtin_config()))?,
        };
        if let Some(l) = opts.listen {
            config.proxy.listen = l;
        }
        if let Some(l) = opts.admin_listen {
            config.admin.listen = l;
        }
        check_loopback(&config)?;
        if let Some(c) = config.client.first() {
            return Err(DevError::ClientNotSupported {
                key: "client[0]".into(),
                name: c.name.clone(),
            });
        }
        let mut replaced = Vec::new();

        let echo = if config.route.iter().any(|r| r.upstream == ECHO_UPSTREAM) {
            let echo = Echo::start()
                .await
                .map_err(|e| DevError::Setup(format!("echo upstream: {e}")))?;
            for (i, r) in config.route.iter_mut().enumerate() {
                if r.upstream == ECHO_UPSTREAM {
                    r.upstream = format!("http://{}", echo.addr);
                    r.allow_insecure_upstream = true;
                    replaced.push(format!(
                        "route[{i}].upstream {ECHO_UPSTREAM} is the built-in echo upstream at {}",
                        r.upstream
                    ));
                }
            }
            Some(echo)
        } else {
            None
        };

        // A federated client has no key here: the platform's JWT authenticates it.
        let (client_jwks, key_dir) = if opts.federation.is_some() {
            if config.token.auth_method != AuthMethod::ClientAssertionFile {
                return Err(DevError::Setup(
                    "a federated issuer needs token.auth_method = \"client_assertion_file\" and token.client_assertion_file".into(),
                ));
            }
            (serde_json::json!({ "keys": [] }), None)
        } else {
            let (key_source, key_dir) = usable_key(&mut config.token, &mut replaced)?;
            let jwks = serde_json::json!({ "keys": [key_source.current().public_jwk()] });
            (jwks, key_dir)
        };
        let federations = opts
            .federation
            .map(|mut f| {
                f.client_id = config.token.client_id.clone();
                f
            })
            .into_iter()
            .collect();

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
                jwks: client_jwks,
                scopes,
                audiences,
            }],
            federations,
            token_ttl: Duration::from_secs(3600),
        })
        .await?;
        use_token_endpoint(&mut config.token, authz.token_url(), &mut replaced);

        // Everything dev kept is checked as strictly as `run` would check it.
        config.validate()?;
        let sidecar = Sidecar::bind(config).await?;
        Ok(Dev {
            sidecar,
            authz,
            echo: echo.as_ref().map(|e| e.addr),
            replaced,
            _echo: echo,
            _key_dir: key_dir,
        })
    }

    /// One line per setting dev replaced, saying what replaced it (the command prints them).
    pub(crate) fn replacements(&self) -> &[String] {
        &self.replaced
    }

    /// Splits off the sidecar so it can `run`; the rest must live as long as it does.
    pub fn into_parts(self) -> (Sidecar, DevRest) {
        (
            self.sidecar,
            DevRest {
                _authz: self.authz,
                _echo: self._echo,
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

/// The base layer of `dev` without a config file. It has no key (dev makes a throwaway one) and
/// a placeholder token endpoint (dev's own replaces it), so only dev can run it.
pub(crate) fn builtin_config() -> String {
    format!(
        r#"
[token]
token_url = "http://127.0.0.1/oauth2/token"
allow_insecure_token_url = true
client_id = "{DEV_CLIENT_ID}"

[[route]]
name = "echo"
path_prefix = "/echo/"
strip_prefix = true
upstream = "{ECHO_UPSTREAM}"
allow_insecure_upstream = true
scope = ["{ECHO_SCOPE}"]
audience = ["{ECHO_AUDIENCE}"]
"#
    )
}

/// The client's own key if it can sign; otherwise a throwaway one, reported in `replaced`. The
/// development server only takes `private_key_jwt`, so a `client_secret_*` client gets one too.
fn usable_key(
    t: &mut TokenConfig,
    replaced: &mut Vec<String>,
) -> Result<(KeySource, Option<tempfile_dir::TempDir>), DevError> {
    let why = match (t.auth_method, &t.private_key_file) {
        (AuthMethod::PrivateKeyJwt, Some(path)) => {
            // An unknown signing_alg is left for validation to report: it is the user's mistake
            // with a key dev keeps, not something dev replaces.
            let alg = t.signing_alg.as_deref().and_then(crate::key::parse_alg);
            match KeySource::load(path.clone(), alg, t.key_id.clone()) {
                Ok(k) => return Ok((k, None)),
                Err(_) if std::fs::File::open(path).is_err() => {
                    format!("token.private_key_file {} not readable", path.display())
                }
                Err(e) => format!("token.private_key_file {} not usable ({e})", path.display()),
            }
        }
        (AuthMethod::PrivateKeyJwt, None) => "token.private_key_file not set".to_string(),
        (AuthMethod::ClientAssertionFile, _) => {
            if let Some(f) = t.client_assertion_file.take() {
                replaced.push(format!(
                    "token.client_assertion_file {} dropped (pass --federated-issuer, --federated-subject and --federated-jwks to have it trusted)",
                    f.display()
                ));
            }
            "token.auth_method client_assertion_file replaced by private_key_jwt (no federated issuer is trusted)".to_string()
        }
        (method, _) => format!(
            "token.auth_method {} replaced by private_key_jwt (the development server takes no other)",
            match method {
                AuthMethod::ClientSecretBasic => "client_secret_basic",
                AuthMethod::TlsClientAuth => "tls_client_auth",
                AuthMethod::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
                _ => "client_secret_post",
            }
        ),
    };
    let (dir, key_path) = throwaway_key()?;
    replaced.push(format!("{why}; using a throwaway ES256 key"));
    // Both described the replaced key; the throwaway one has its own.
    for (key, was) in [
        ("token.key_id", t.key_id.take()),
        ("token.signing_alg", t.signing_alg.take()),
    ] {
        if let Some(v) = was {
            replaced.push(format!("{key} {v} dropped with the key it described"));
        }
    }
    t.auth_method = AuthMethod::PrivateKeyJwt;
    t.private_key_file = Some(key_path.clone());
    let source =
        KeySource::load(key_path, None, None).map_err(|e| DevError::Setup(e.to_string()))?;
    Ok((source, Some(dir)))
}

/// Points the client at the development server. `assertion_audience` and `ca_file` describe
/// the real server, so they go too.
fn use_token_endpoint(t: &mut TokenConfig, url: &str, replaced: &mut Vec<String>) {
    t.token_url = Some(url.to_string());
    t.allow_insecure_token_url = true;
    replaced.push(format!("token.token_url replaced by {url}"));
    if let Some(i) = t.issuer.take() {
        replaced.push(format!(
            "token.issuer {} dropped (the development server is the token endpoint)",
            crate::util::redact_url(&i)
        ));
    }
    if let Some(a) = t.assertion_audience.take() {
        replaced.push(format!(
            "token.assertion_audience {a} dropped (the development server expects its token_url)"
        ));
    }
    // ca_only pins ca_file, which goes: it cannot stay without it.
    t.ca_only = false;
    if let Some(ca) = t.ca_file.take() {
        replaced.push(format!(
            "token.ca_file {} dropped (the development token endpoint is plain HTTP on loopback)",
            ca.display()
        ));
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

/// A minimal temporary directory, removed on drop (keeps `tempfile` a dev-dependency only).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new() -> std::io::Result<TempDir> {
            let name = format!(
                "token-sidecar-dev-{}-{}",
                std::process::id(),
                crate::token::assertion::new_jti()
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

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
