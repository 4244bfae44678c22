//! The real `oidc-provider` (npm) as a test authorization server: `tests/authz/server.mjs` run
//! with node on a free loopback port, configured for `client_credentials` + `private_key_jwt` +
//! resource indicators. Its npm packages are installed on first use (`ensure_npm_packages`) when
//! `npm ci --prefix tests/authz` has not been run.
//!
//! What the server does (see the header of `tests/authz/server.mjs`):
//! - `POST {issuer}/oauth2/token`; `GET {issuer}/jwks`; `GET {issuer}/.well-known/openid-configuration`;
//!   `GET {issuer}/__test/stats` -> `{"token_requests": N}` (every POST to the token endpoint).
//! - `audience` (space-separated) is mapped to one RFC 8707 `resource` per value; one resource
//!   per request only (two distinct ones: 400 `invalid_target`).
//! - With a known resource: an RS256 JWT access token (`typ: at+jwt`) with `aud` = the resource,
//!   `scope` = the requested scopes, lifetime = the resource's TTL. Without one: an opaque token
//!   living `default_ttl_secs`.
//! - Requested scopes outside the client's `scope` or the resource's `scope`: 400 `invalid_scope`;
//!   unknown resource: 400 `invalid_target`; any client authentication failure (bad signature,
//!   unknown kid, wrong `aud`, reused `jti`, expired): 401 `invalid_client`, with the generic
//!   description "client authentication failed" (run with `DEBUG=oidc-provider:*` to see why).
//! - The response: `{"access_token", "expires_in", "scope" (absent when no scope granted),
//!   "token_type": "Bearer"}`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

/// What the authorization server knows: its clients and resource servers.
#[derive(Clone, Debug)]
pub struct AuthzConfig {
    pub clients: Vec<ClientReg>,
    pub resources: Vec<ResourceReg>,
    /// Lifetime of tokens issued without a resource (opaque tokens).
    pub default_ttl_secs: u64,
}

/// A registered client: its public keys (`{"keys": [...]}`) and the scopes it may ask for
/// (space-separated).
#[derive(Clone, Debug)]
pub struct ClientReg {
    pub client_id: String,
    pub jwks: Value,
    pub scope: String,
}

/// A resource server: the `audience`/`resource` value, the scopes it accepts (space-separated)
/// and the lifetime of its tokens.
#[derive(Clone, Debug)]
pub struct ResourceReg {
    pub audience: String,
    pub scope: String,
    pub ttl_secs: u64,
}

impl AuthzConfig {
    /// The JSON that `tests/authz/server.mjs` reads.
    pub fn to_json(&self) -> Value {
        let clients: Vec<Value> = self
            .clients
            .iter()
            .map(|c| json!({ "client_id": c.client_id, "jwks": c.jwks, "scope": c.scope }))
            .collect();
        let resources: serde_json::Map<String, Value> = self
            .resources
            .iter()
            .map(|r| {
                (
                    r.audience.clone(),
                    json!({ "scope": r.scope, "ttl": r.ttl_secs }),
                )
            })
            .collect();
        json!({ "clients": clients, "resources": resources, "default_ttl": self.default_ttl_secs })
    }
}

/// A running `oidc-provider`; the process ends when this is dropped.
pub struct OidcProvider {
    /// `http://127.0.0.1:PORT`
    pub issuer: String,
    /// `{issuer}/oauth2/token`
    pub token_url: String,
    /// `{issuer}/jwks`
    pub jwks_url: String,
    child: Child,
    // The server exits when this pipe closes, so it cannot outlive the test process.
    _stdin: ChildStdin,
    _config: tempfile::NamedTempFile,
    http: reqwest::Client,
}

/// `tests/authz`, or `$TEST_AUTHZ_DIR` (to try the missing-packages path without touching the
/// real `node_modules`).
fn authz_dir() -> PathBuf {
    match std::env::var_os("TEST_AUTHZ_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/authz"),
    }
}

/// Bound on the one-time `npm ci`.
const NPM_CI_BOUND: Duration = Duration::from_secs(300);

/// Makes sure the server's npm packages are installed: when `node_modules/oidc-provider` is
/// missing, runs `npm ci --prefix <dir> --no-audit --no-fund` once for the whole test binary
/// (every caller waits for that one run), bounded by [`NPM_CI_BOUND`]. When that is impossible
/// the test process ends at once with one line naming the command to run, instead of every
/// test panicking.
fn ensure_npm_packages(dir: &Path) {
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        if dir.join("node_modules/oidc-provider").is_dir() {
            return Ok(());
        }
        // Straight to stderr: the test harness captures `eprintln!`.
        let _ = writeln!(
            std::io::stderr(),
            "the test authorization server's npm packages are missing; running `npm ci --prefix {}` once",
            dir.display()
        );
        npm_ci(dir)?;
        if dir.join("node_modules/oidc-provider").is_dir() {
            Ok(())
        } else {
            Err("npm ci finished but node_modules/oidc-provider is still missing".to_string())
        }
    });
    if let Err(why) = result {
        let _ = writeln!(
            std::io::stderr(),
            "error: the test authorization server needs its npm packages ({why}); run `npm ci --prefix tests/authz` in the repository root"
        );
        std::process::exit(2);
    }
}

fn npm_ci(dir: &Path) -> Result<(), String> {
    let npm = std::env::var_os("NPM").unwrap_or_else(|| "npm".into());
    let mut child = std::process::Command::new(&npm)
        .arg("ci")
        .arg("--prefix")
        .arg(dir)
        .args(["--no-audit", "--no-fund"])
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {npm:?}: {e}"))?;
    let deadline = std::time::Instant::now() + NPM_CI_BOUND;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("npm ci failed ({status})")),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(None) => {
                // Only the process we started, by its handle.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("npm ci did not finish within {NPM_CI_BOUND:?}"));
            }
            Err(e) => return Err(format!("waiting for npm ci: {e}")),
        }
    }
}

impl OidcProvider {
    /// Starts `tests/authz/server.mjs` with node (`$NODE` or `node` on PATH) and waits (at most
    /// 2 × 30 s) for it to listen.
    pub async fn start(cfg: &AuthzConfig) -> OidcProvider {
        Self::start_json(&cfg.to_json(), None).await
    }

    /// Starts the server with `config` as `tests/authz/server.mjs` reads it (for what
    /// [`AuthzConfig`] does not express, e.g. its `"tls"` mTLS mode); `ca_pem` is the CA the
    /// helper's own requests trust when the server speaks HTTPS.
    pub async fn start_json(config_json: &Value, ca_pem: Option<&str>) -> OidcProvider {
        let dir = authz_dir();
        ensure_npm_packages(&dir);

        let mut config = tempfile::Builder::new()
            .prefix("authz-config-")
            .suffix(".json")
            .tempfile()
            .expect("create authz config file");
        serde_json::to_writer_pretty(&mut config, config_json).expect("write authz config");
        std::io::Write::flush(&mut config).expect("flush authz config");

        // Node loads oidc-provider in ~1 s. Twice in full CI-style runs a start printed nothing
        // for over 60 s and then passed alone, so a start that stays silent for START_BOUND is
        // killed (our own child, by its handle) and tried once more before the test fails.
        const START_BOUND: Duration = Duration::from_secs(30);
        const ATTEMPTS: u32 = 2;
        let node = std::env::var_os("NODE").unwrap_or_else(|| "node".into());
        let mut attempt = 0;
        let (child, stdin, mut lines, issuer) = loop {
            attempt += 1;
            let mut child = Command::new(&node)
                .arg(dir.join("server.mjs"))
                .arg(config.path())
                .current_dir(&dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run {node:?} for the test authorization server (is Node.js installed?): {e}")
                });
            let stdin = child.stdin.take().expect("child stdin");
            let stdout = child.stdout.take().expect("child stdout");
            let mut lines = BufReader::new(stdout).lines();
            let waited = tokio::time::timeout(START_BOUND, async {
                while let Some(line) = lines.next_line().await.expect("read authz server stdout") {
                    if let Some(url) = line.strip_prefix("LISTENING ") {
                        return Some(url.trim().to_string());
                    }
                    eprintln!("authz server: {line}");
                }
                None
            })
            .await;
            match waited {
                Ok(Some(issuer)) => break (child, stdin, lines, issuer),
                Ok(None) => {
                    let status = child.wait().await;
                    panic!(
                        "the test authorization server exited before listening ({status:?}); its stderr is above"
                    )
                }
                Err(_) if attempt < ATTEMPTS => {
                    eprintln!(
                        "the test authorization server printed nothing within {START_BOUND:?}; starting it again"
                    );
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
                Err(_) => {
                    let _ = child.start_kill();
                    panic!(
                        "the test authorization server did not print LISTENING within {START_BOUND:?}, {ATTEMPTS} times"
                    )
                }
            }
        };

        // Keep draining stdout so the child can never block on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("authz server: {line}");
            }
        });

        let mut http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10));
        if let Some(ca) = ca_pem {
            http = http.tls_certs_merge(
                reqwest::Certificate::from_pem_bundle(ca.as_bytes()).expect("CA PEM"),
            );
        }
        let http = http.build().expect("reqwest client");

        OidcProvider {
            token_url: format!("{issuer}/oauth2/token"),
            jwks_url: format!("{issuer}/jwks"),
            issuer,
            child,
            _stdin: stdin,
            _config: config,
            http,
        }
    }

    async fn get_json(&self, url: &str) -> Value {
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = resp.status();
        assert!(status.is_success(), "GET {url}: HTTP {status}");
        resp.json()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
    }

    /// Token requests received so far: every POST to the token endpoint, whatever its outcome.
    pub async fn token_requests(&self) -> u64 {
        let stats = self
            .get_json(&format!("{}/__test/stats", self.issuer))
            .await;
        stats["token_requests"]
            .as_u64()
            .unwrap_or_else(|| panic!("unexpected stats: {stats}"))
    }

    /// The provider's public JWK Set (its access-token signing key).
    pub async fn jwks(&self) -> Value {
        self.get_json(&self.jwks_url).await
    }

    /// Verifies a JWT access token's RS256 signature against the provider's JWKS, its `iss` and
    /// its `exp` (no leeway), and returns the claims. `aud` and `scope` are left to the caller.
    /// Panics when the token is opaque or invalid.
    pub async fn verify_access_token(&self, token: &str) -> Value {
        use jsonwebtoken::{
            Algorithm, DecodingKey, Validation, decode, decode_header, jwk::JwkSet,
        };

        let header = decode_header(token)
            .unwrap_or_else(|e| panic!("access token is not a JWT ({e}): {token}"));
        assert_eq!(header.typ.as_deref(), Some("at+jwt"), "access token typ");
        let jwks: JwkSet = serde_json::from_value(self.jwks().await).expect("provider JWKS parses");
        let kid = header
            .kid
            .as_deref()
            .expect("access token header has a kid");
        let jwk = jwks
            .find(kid)
            .unwrap_or_else(|| panic!("kid {kid} not in the provider's JWKS"));
        let key = DecodingKey::from_jwk(jwk).expect("provider JWK usable");

        let mut validation = Validation::new(Algorithm::RS256);
        validation.validate_aud = false;
        validation.leeway = 0;
        validation.set_issuer(&[&self.issuer]);
        decode::<Value>(token, &key, &validation)
            .unwrap_or_else(|e| panic!("access token does not verify: {e}"))
            .claims
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        // Only the process we started, by its pid; closing its stdin would end it as well.
        let _ = self.child.start_kill();
    }
}
