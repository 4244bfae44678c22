//! The command line (SPEC §7). Exit status: 0 on success, 2 for invalid configuration or usage,
//! 1 for anything else that stops the process.
//!
//! Invariant: every problem with the configuration's content exits 2 with one line per problem
//! naming its key, whether validation finds it (the usual case: it loads the key file too) or
//! the server does at start-up.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::server::StartError;
use crate::token::client::ClientBuildError;

#[derive(Debug, Parser)]
#[command(
    name = "token-sidecar",
    version,
    about = "Injects OAuth2 client_credentials tokens into proxied requests"
)]
struct Cli {
    /// Config file (default: $SIDECAR_CONFIG, else ./sidecar.toml).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Run,
    /// Validate the configuration and print it with secrets redacted; exit 0 or 2.
    CheckConfig,
    /// Fetch one token with the configured client and print the response (for debugging a registration).
    Token {
        /// A scope to request; repeat for several.
        #[arg(long = "scope", value_name = "S")]
        scopes: Vec<String>,
        /// An audience to request; repeat for several.
        #[arg(long = "audience", value_name = "A")]
        audiences: Vec<String>,
        /// The client to ask as: a `[[client]]` name (default: `[token]`, named "default").
        #[arg(long = "client", value_name = "NAME", default_value = "default")]
        client: String,
    },
    /// Print the public JWK Set of the configured signing key, ready to register with the authorization server.
    Jwks,
    /// Write a new private key (PEM, mode 0600) and print its public JWK Set.
    Keygen {
        /// One of the supported JOSE algorithms (RS/PS 256/384/512, ES256, ES384, EdDSA).
        #[arg(long, default_value = "ES256")]
        alg: String,
        /// Where to write the private key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Run with an embedded development authorization server (loopback only; never in production).
    ///
    /// Without --config (or SIDECAR_CONFIG) it serves /echo/ to a built-in echo upstream; with
    /// one it keeps your routes and listeners and replaces the token endpoint (and the key or
    /// secret when not usable), printing one line per replaced setting. SIDECAR_* variables
    /// apply either way, as for `run`.
    #[cfg(feature = "dev")]
    Dev {
        /// Main listener; overrides proxy.listen from the config and the environment.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Admin listener; overrides admin.listen from the config and the environment.
        #[arg(long, value_name = "ADDR")]
        admin_listen: Option<std::net::SocketAddr>,
        /// Trust client assertions from this issuer (exact `iss`) for token.client_id, as a
        /// federated credential does; needs auth_method = "client_assertion_file".
        #[arg(long, value_name = "ISS", requires_all = ["federated_subject", "federated_jwks"])]
        federated_issuer: Option<String>,
        /// The exact `sub` accepted from the federated issuer (e.g. system:serviceaccount:ns:name).
        #[arg(long, value_name = "SUB", requires = "federated_issuer")]
        federated_subject: Option<String>,
        /// The federated issuer's JWK Set: a file, or an http(s) URL; read at start.
        #[arg(long, value_name = "FILE|URL", requires = "federated_issuer")]
        federated_jwks: Option<String>,
        /// An `aud` accepted besides the token endpoint URL.
        #[arg(long, value_name = "AUD", requires = "federated_issuer")]
        federated_audience: Option<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = config::resolve_path(cli.config.as_deref());
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&path),
        Command::CheckConfig => check_config(&path),
        Command::Token {
            scopes,
            audiences,
            client,
        } => token(&path, &scopes, &audiences, &client),
        Command::Jwks => jwks(&path),
        Command::Keygen { alg, out, force } => keygen(&alg, &out, force),
        #[cfg(feature = "dev")]
        Command::Dev {
            listen,
            admin_listen,
            federated_issuer,
            federated_subject,
            federated_jwks,
            federated_audience,
        } => {
            // Only an explicitly named config is used: ./sidecar.toml is the production example.
            let explicit = cli.config.clone().or_else(|| {
                std::env::var_os("SIDECAR_CONFIG")
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
            });
            // clap's `requires_all` guarantees subject and jwks come with the issuer.
            let federation = match (federated_issuer, federated_subject, federated_jwks) {
                (Some(issuer), Some(subject), Some(jwks)) => {
                    Some(crate::dev::authz::DevFederation {
                        issuer,
                        subject,
                        client_id: String::new(),
                        jwks,
                        audience: federated_audience,
                    })
                }
                _ => None,
            };
            dev(explicit.as_deref(), listen, admin_listen, federation)
        }
    }
}

/// Loads the config or prints one line per problem and returns exit status 2.
fn load(path: &Path) -> Result<Config, ExitCode> {
    config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// The runtime for `proxy.worker_threads` (0 = one per available CPU, cgroup quota included).
/// One thread gets the single-threaded scheduler: no work stealing, no cross-thread wake-ups,
/// about a third less CPU per request on one CPU (docs/benchmarks.md).
fn runtime(worker_threads: usize) -> tokio::runtime::Runtime {
    let threads = match worker_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder
        .enable_all()
        .build()
        .expect("cannot start the Tokio runtime")
}

fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _log = crate::telemetry::init(config.log.format);
    let routes: Vec<String> = config.route.iter().map(|r| r.name.clone()).collect();
    runtime(config.proxy.worker_threads).block_on(async move {
        let sidecar = match crate::server::Sidecar::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                return start_failure(&e, &routes);
            }
        };
        sidecar.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// Prints a start-up error and picks its exit status. What the configuration's content caused
/// (the key file or a CA file, unusable when the server read it, e.g. replaced since validation
/// read it) exits 2 with one `invalid config: <key>: <message>` line, like validation's
/// problems; a bind failure or anything else about the environment exits 1.
fn start_failure(e: &StartError, routes: &[String]) -> ExitCode {
    let problem = |key: &str, message: String| config::ConfigError {
        problems: vec![config::Problem {
            key: key.to_owned(),
            message,
        }],
    };
    // A `[[client]]`'s keys are `client[i].KEY` where `[token]`'s are `token.KEY`.
    let client_problem = |prefix: &str, c: &ClientBuildError| match c {
        ClientBuildError::Key(k) => {
            Some(problem(&format!("{prefix}private_key_file"), k.to_string()))
        }
        ClientBuildError::Ca(m) => Some(problem(&format!("{prefix}ca_file"), m.clone())),
        ClientBuildError::ClientCert { key, message } => Some(problem(
            &format!("{prefix}{}", key.trim_start_matches("token.")),
            message.clone(),
        )),
        // Discovery failing is the issuer's or the network's state, not a typo (docs/spec.md §7).
        ClientBuildError::Http(_) | ClientBuildError::Discovery(_) => None,
    };
    let invalid = match e {
        StartError::Client(c) => client_problem("token.", c),
        StartError::NamedClient { index, source, .. } => {
            client_problem(&format!("client[{index}]."), source)
        }
        StartError::Route(r) => Some(match routes.iter().position(|n| *n == r.route) {
            Some(i) => problem(&format!("route[{i}]"), r.message.clone()),
            None => problem("route", r.to_string()),
        }),
        StartError::TokenEndpoint { key, message } => Some(problem(key, message.clone())),
        StartError::Bind { .. } => None,
    };
    match invalid {
        // Printed alone, not logged as well: one line per problem, as for validation.
        Some(problems) => {
            eprintln!("{problems}");
            ExitCode::from(2)
        }
        None => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("token-sidecar: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn check_config(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Loading each client's key proves the file parses and fits signing_alg, which validation
    // alone cannot. With an issuer, check-config fetches the metadata as `run` would
    // (docs/spec.md §7): the discovered endpoint is what an operator needs to see. A failure is
    // not a typo: exit 1.
    let mut discovered = Vec::new();
    for (i, (name, cfg)) in config.clients().into_iter().enumerate() {
        let at = client_prefix(i);
        let client = match crate::token::client::TokenClient::new(cfg) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("invalid config: {at}{e}");
                return ExitCode::from(2);
            }
        };
        if client.endpoint().is_discovered() {
            match runtime(1).block_on(client.discover()) {
                Ok(()) => discovered.extend(client.endpoint().current().map(|u| (name, u))),
                Err(e) => {
                    eprintln!("token-sidecar: {at}token.issuer: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let clients = config.clients();
    for r in &config.route {
        let name = r
            .client
            .as_deref()
            .unwrap_or(crate::token::registry::DEFAULT_CLIENT);
        let token_config = clients
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(&config.token, |(_, t)| *t);
        let identity = match crate::token::mtls::load_route_identity(r, token_config) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("invalid config: route {}: client certificate: {e}", r.name);
                return ExitCode::from(2);
            }
        };
        if let Err(e) =
            crate::proxy::upstream::Upstream::new(r, identity, config.proxy.max_connections)
        {
            eprintln!("invalid config: route {}: {e}", r.name);
            return ExitCode::from(2);
        }
    }
    println!("# {}: valid", path.display());
    for (name, url) in discovered {
        let from = match name {
            crate::token::registry::DEFAULT_CLIENT => "token.issuer".to_owned(),
            n => format!("the issuer of client {n:?}"),
        };
        println!(
            "# token endpoint discovered from {from}: {}",
            crate::util::redact_url(&url)
        );
    }
    print!("{}", config.to_redacted_toml());
    ExitCode::SUCCESS
}

/// How errors of the `i`-th client (of [`Config::clients`]) are introduced: nothing for
/// `[token]`, whose messages name `token.` keys already.
fn client_prefix(i: usize) -> String {
    match i {
        0 => String::new(),
        i => format!("client[{}]: ", i - 1),
    }
}

fn token(path: &Path, scopes: &[String], audiences: &[String], client: &str) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let clients = config.clients();
    let Some(i) = clients.iter().position(|(n, _)| *n == client) else {
        let names: Vec<&str> = clients.iter().map(|(n, _)| *n).collect();
        eprintln!("token: no client named {client:?}; one of {names:?}");
        return ExitCode::from(2);
    };
    let (at, token_config) = (client_prefix(i), clients[i].1.clone());
    let _log = crate::telemetry::init(config.log.format);
    runtime(1).block_on(async move {
        let client = match crate::token::client::TokenClient::new(&token_config) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("invalid config: {at}{e}");
                return ExitCode::from(2);
            }
        };
        if let Err(e) = client.discover().await {
            eprintln!("token-sidecar: {at}token.issuer: {e}");
            return ExitCode::FAILURE;
        }
        let key = crate::token::TokenKey::new(scopes, audiences);
        match client.fetch(&key).await {
            Ok(t) => {
                let out = serde_json::json!({
                    "token_type": "Bearer",
                    "expires_in": t.lifetime.as_secs(),
                    "scope": t.scope,
                    "access_token": t.secret().expose(),
                    "claims": crate::token::jwt_claims(t.secret().expose()),
                });
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("token request failed: {e}");
                if let Some(code) = e.oauth_code() {
                    eprintln!("error: {code}");
                }
                ExitCode::FAILURE
            }
        }
    })
}

fn jwks(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match crate::token::client::TokenClient::new(&config.token) {
        Ok(client) => match client.key_source() {
            Some(source) => {
                let set = serde_json::json!({ "keys": [source.current().public_jwk()] });
                println!("{}", serde_json::to_string_pretty(&set).unwrap_or_default());
                ExitCode::SUCCESS
            }
            None => {
                eprintln!(
                    "invalid config: token.auth_method: jwks needs auth_method = \"private_key_jwt\""
                );
                ExitCode::from(2)
            }
        },
        Err(e) => {
            eprintln!("invalid config: {e}");
            ExitCode::from(2)
        }
    }
}

fn keygen(alg: &str, out: &Path, force: bool) -> ExitCode {
    let Some(alg) = crate::key::parse_alg(alg) else {
        eprintln!(
            "keygen: unsupported --alg {alg:?}; one of {}",
            crate::key::supported_list()
        );
        return ExitCode::from(2);
    };
    let (pem, key) = match crate::key::SigningKey::generate(alg) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("keygen: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = crate::key::write_private(out, pem.expose().as_bytes(), force) {
        eprintln!("keygen: {e}");
        return ExitCode::FAILURE;
    }
    let name = crate::key::alg_name(alg);
    eprintln!("wrote {} ({name}, kid {})", out.display(), key.kid());
    if !crate::key::is_implied_by_key(alg) {
        eprintln!("set token.signing_alg = \"{name}\" in sidecar.toml to sign with {name}");
    }
    let set = serde_json::json!({ "keys": [key.public_jwk()] });
    println!("{}", serde_json::to_string_pretty(&set).unwrap_or_default());
    ExitCode::SUCCESS
}

/// `dev`: the same layering as `run` (defaults < the file, or the built-in echo config without
/// one < `SIDECAR_*` < the flags), but validated only after dev has replaced what it must.
#[cfg(feature = "dev")]
fn dev(
    config_path: Option<&Path>,
    listen: Option<std::net::SocketAddr>,
    admin_listen: Option<std::net::SocketAddr>,
    federation: Option<crate::dev::authz::DevFederation>,
) -> ExitCode {
    let builtin = crate::dev::builtin_config();
    let base = match config_path {
        Some(p) => config::Base::File(p),
        None => config::Base::Builtin(&builtin),
    };
    let config = match config::layered(base) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let _log = crate::telemetry::init(config.log.format);
    let workers = config.proxy.worker_threads;
    eprintln!("{}", crate::dev::BANNER);
    runtime(workers).block_on(async move {
        let dev = match crate::dev::Dev::start(crate::dev::DevOptions {
            config: Some(config),
            listen,
            admin_listen,
            federation,
        })
        .await
        {
            Ok(d) => d,
            Err(crate::dev::DevError::Config(e)) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("token-sidecar dev: {e}");
                return match e {
                    crate::dev::DevError::NotLoopback { .. }
                    | crate::dev::DevError::ClientNotSupported { .. } => ExitCode::from(2),
                    _ => ExitCode::FAILURE,
                };
            }
        };
        for line in dev.replacements() {
            eprintln!("dev: {line}");
        }
        println!("{}", dev.summary());
        let (sidecar, rest) = dev.into_parts();
        sidecar.run(shutdown_signal()).await;
        drop(rest);
        ExitCode::SUCCESS
    })
}
