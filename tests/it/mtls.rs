//! mTLS client authentication (RFC 8705) end to end: the real oidc-provider over HTTPS with its
//! mTLS feature (`tls_client_auth` against a test CA, `self_signed_tls_client_auth` against a
//! registered JWK with `x5c`, certificate-bound access tokens), and a TLS upstream that checks
//! the binding the way a resource server does (RFC 8705 §3): the presented client
//! certificate's SHA-256 thumbprint must equal the token's `cnf.x5t#S256`.
//!
//! Every certificate is made at test time with rcgen.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use serde_json::{Value, json};
use token_sidecar::AuthMethod;

use crate::support::authz::OidcProvider;
use crate::support::idp::ORDERS;
use crate::support::{RouteBuilder, Running, SidecarConfig, fixture, http_client};

const TLS_CLIENT: &str = "mtls-client";
const SELF_SIGNED_CLIENT: &str = "self-signed-client";
const CLIENT_DN: &str = "CN=token-sidecar-client";

/// A test CA, a server certificate for 127.0.0.1 and three client identities, written as PEM
/// files into a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    server_cert: CertificateDer<'static>,
    server_key: KeyPair,
    server_pem: String,
}

/// A client certificate and key on disk, with the leaf's `x5t#S256`.
struct ClientFiles {
    cert: PathBuf,
    key: PathBuf,
    pem: String,
    x5t: String,
}

fn x5t(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

impl Pki {
    fn new() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "token-sidecar mTLS test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let pki = Pki {
            dir,
            ca_pem: ca.pem(),
            server_cert: server.der().clone(),
            server_pem: server.pem(),
            server_key,
        };
        // The CA-signed identities need the issuer; write them now.
        pki.write_client("client", CLIENT_DN, Some(&issuer));
        pki.write_client("intruder", "CN=intruder", Some(&issuer));
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A client certificate with the distinguished name `dn` (`CN=…`), signed by the CA or
    /// self-signed, written as `{name}.crt` / `{name}.key`.
    fn write_client(&self, name: &str, dn: &str, issuer: Option<&Issuer<'_, KeyPair>>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, dn.trim_start_matches("CN="));
        let cert = match issuer {
            Some(i) => params.signed_by(&key, i).unwrap(),
            None => params.self_signed(&key).unwrap(),
        };
        std::fs::write(self.dir.path().join(format!("{name}.crt")), cert.pem()).unwrap();
        std::fs::write(
            self.dir.path().join(format!("{name}.key")),
            key.serialize_pem(),
        )
        .unwrap();
    }

    fn client(&self, name: &str) -> ClientFiles {
        let cert = self.dir.path().join(format!("{name}.crt"));
        let pem = std::fs::read_to_string(&cert).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        ClientFiles {
            key: self.dir.path().join(format!("{name}.key")),
            x5t: x5t(der.as_ref()),
            cert,
            pem,
        }
    }
}

use rustls::pki_types::pem::PemObject as _;

/// oidc-provider over HTTPS with mTLS: `mtls-client` authenticates with a CA-signed certificate
/// whose subject is [`CLIENT_DN`]; `self-signed-client` with the registered self-signed
/// certificate `self_signed`. Both get certificate-bound tokens; ORDERS tokens are JWTs.
async fn provider(pki: &Pki, self_signed: &ClientFiles) -> OidcProvider {
    let config = json!({
        "tls": {
            "cert": pki.server_pem,
            "key": pki.server_key.serialize_pem(),
            "client_ca": pki.ca_pem,
        },
        "clients": [
            {
                "client_id": TLS_CLIENT,
                "scope": "orders:read",
                "metadata": {
                    "token_endpoint_auth_method": "tls_client_auth",
                    "tls_client_auth_subject_dn": CLIENT_DN,
                    "tls_client_certificate_bound_access_tokens": true,
                },
            },
            {
                "client_id": SELF_SIGNED_CLIENT,
                "scope": "orders:read",
                "self_signed_cert": self_signed.pem,
                "metadata": {
                    "token_endpoint_auth_method": "self_signed_tls_client_auth",
                    "tls_client_certificate_bound_access_tokens": true,
                },
            },
        ],
        "resources": { ORDERS: { "scope": "orders:read", "ttl": 300 } },
        "default_ttl": 300,
    });
    OidcProvider::start_json(&config, Some(&pki.ca_pem)).await
}

/// What the binding upstream saw on one request.
#[derive(Debug, Clone)]
struct Seen {
    /// `x5t#S256` of the client certificate presented on the connection, if any.
    presented: Option<String>,
    /// The token's `cnf.x5t#S256`, if the bearer token is a JWT carrying one.
    bound_to: Option<String>,
    token: Option<String>,
}

/// Accepts any client certificate (and none): a resource server checks the binding, not the
/// chain (RFC 8705 §3; a self-signed certificate is as good as a CA-signed one here). The
/// handshake signature is still verified, so the client proves it holds the key.
#[derive(Debug)]
struct AnyClientCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::server::danger::ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An HTTPS resource server that honours certificate-bound tokens: 200 when the token's
/// `cnf.x5t#S256` equals the thumbprint of the certificate presented on the connection, else
/// 401 `invalid_token` (RFC 8705 §3). Records what it saw.
struct BindingUpstream {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BindingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn bound_to(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims["cnf"]["x5t#S256"].as_str().map(str::to_owned)
}

impl BindingUpstream {
    async fn start(pki: &Pki) -> BindingUpstream {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(Arc::new(AnyClientCert(provider)))
            .with_single_cert(
                vec![pki.server_cert.clone()],
                PrivateKeyDer::Pkcs8(pki.server_key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let s = s.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let presented = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| x5t(c.as_ref()));
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let s = s.clone();
                        let presented = presented.clone();
                        async move {
                            let token = req
                                .headers()
                                .get("authorization")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.strip_prefix("Bearer "))
                                .map(str::to_owned);
                            let bound = token.as_deref().and_then(bound_to);
                            let ok = bound.is_some() && bound == presented;
                            s.lock().unwrap().push(Seen {
                                presented,
                                bound_to: bound,
                                token,
                            });
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
                            if !ok {
                                *resp.status_mut() = StatusCode::UNAUTHORIZED;
                                resp.headers_mut().insert(
                                    "www-authenticate",
                                    "Bearer error=\"invalid_token\"".parse().unwrap(),
                                );
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        BindingUpstream { port, seen, task }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A sidecar authenticating as `client_id` with `method` and the certificate `cert`, with one
/// route `/orders/` (ORDERS, `orders:read`) to `upstream`, trusting the test CA everywhere.
fn sidecar(
    idp: &OidcProvider,
    pki: &Pki,
    method: AuthMethod,
    client_id: &str,
    cert: &ClientFiles,
    upstream: &str,
    route: impl FnOnce(&mut token_sidecar::RouteConfig),
) -> SidecarConfig {
    let (c, k, ca) = (cert.cert.clone(), cert.key.clone(), pki.ca_file());
    let client_id = client_id.to_owned();
    SidecarConfig::new(&idp.token_url, fixture("ec_p256_sec1.pem"))
        .token(move |t| {
            t.auth_method = method;
            t.client_id = client_id;
            t.private_key_file = None;
            t.client_cert_file = Some(c);
            t.client_key_file = Some(k);
            t.ca_file = Some(ca.clone());
            t.retry_backoff_initial = Duration::from_millis(100);
            t.retry_backoff_max = Duration::from_millis(300);
        })
        .route(
            RouteBuilder::path("orders", "/orders/", upstream)
                .scope(&["orders:read"])
                .audience(&[ORDERS])
                .with(|r| {
                    r.ca_file = Some(pki.ca_file());
                    route(r);
                }),
        )
}

async fn get(sc: &Running) -> reqwest::Response {
    http_client().get(sc.url("/orders/1")).send().await.unwrap()
}

/// tls_client_auth: oidc-provider authenticates the CA-signed certificate by its subject and
/// binds the token to it (`cnf.x5t#S256` = the certificate's thumbprint, in a token whose
/// signature verifies); the route presents the same certificate, so the binding upstream
/// accepts the request.
#[tokio::test]
async fn tls_client_auth_gets_a_bound_token_that_the_binding_upstream_accepts() {
    let pki = Pki::new();
    pki.write_client("self", "CN=self-signed", None);
    let idp = provider(&pki, &pki.client("self")).await;
    let up = BindingUpstream::start(&pki).await;
    let client = pki.client("client");
    let sc = Running::start(sidecar(
        &idp,
        &pki,
        AuthMethod::TlsClientAuth,
        TLS_CLIENT,
        &client,
        &up.url(),
        |r| r.use_token_client_cert = true,
    ))
    .await;

    let resp = get(&sc).await;
    assert_eq!(resp.status(), 200, "{:?}", up.seen());
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].bound_to.as_deref(), Some(client.x5t.as_str()));
    assert_eq!(seen[0].presented.as_deref(), Some(client.x5t.as_str()));
    let claims = idp
        .verify_access_token(seen[0].token.as_deref().unwrap())
        .await;
    assert_eq!(claims["cnf"]["x5t#S256"], client.x5t.as_str());
    assert_eq!(claims["client_id"], TLS_CLIENT);
    sc.stop().await;
}

/// The same bound token sent without the certificate is refused by the resource server: the
/// route does not present one, the upstream's 401 reaches the application.
#[tokio::test]
async fn a_bound_token_without_its_certificate_is_refused_by_the_upstream() {
    let pki = Pki::new();
    pki.write_client("self", "CN=self-signed", None);
    let idp = provider(&pki, &pki.client("self")).await;
    let up = BindingUpstream::start(&pki).await;
    let client = pki.client("client");
    let sc = Running::start(sidecar(
        &idp,
        &pki,
        AuthMethod::TlsClientAuth,
        TLS_CLIENT,
        &client,
        &up.url(),
        |_| {},
    ))
    .await;

    let resp = get(&sc).await;
    assert_eq!(resp.status(), 401);
    let seen = up.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        assert_eq!(s.presented, None, "{seen:?}");
        assert_eq!(s.bound_to.as_deref(), Some(client.x5t.as_str()));
    }
    sc.stop().await;
}

/// self_signed_tls_client_auth: the registered self-signed certificate (a JWK with x5c)
/// authenticates; the route presents it from its own client_cert_file/client_key_file.
#[tokio::test]
async fn self_signed_tls_client_auth_gets_a_bound_token_the_route_presents_its_certificate_for() {
    let pki = Pki::new();
    pki.write_client("self", "CN=self-signed", None);
    let me = pki.client("self");
    let idp = provider(&pki, &me).await;
    let up = BindingUpstream::start(&pki).await;
    let (c, k) = (me.cert.clone(), me.key.clone());
    let sc = Running::start(sidecar(
        &idp,
        &pki,
        AuthMethod::SelfSignedTlsClientAuth,
        SELF_SIGNED_CLIENT,
        &me,
        &up.url(),
        move |r| {
            r.client_cert_file = Some(c);
            r.client_key_file = Some(k);
        },
    ))
    .await;

    let resp = get(&sc).await;
    assert_eq!(resp.status(), 200, "{:?}", up.seen());
    let seen = up.seen();
    assert_eq!(seen[0].bound_to.as_deref(), Some(me.x5t.as_str()));
    assert_eq!(seen[0].presented.as_deref(), Some(me.x5t.as_str()));
    sc.stop().await;
}

/// A certificate the server does not accept for the client (CA-signed, wrong subject) is a
/// configuration problem: 502 `token_rejected` naming `invalid_client`, nothing forwarded.
/// Replacing the files with the right pair fixes it without a restart (rotation).
#[tokio::test]
async fn a_wrong_client_certificate_is_502_token_rejected_until_the_right_one_is_rotated_in() {
    let pki = Pki::new();
    pki.write_client("self", "CN=self-signed", None);
    let idp = provider(&pki, &pki.client("self")).await;
    let up = BindingUpstream::start(&pki).await;
    // The sidecar reads the pair from paths that are later swapped by rename.
    let live = ClientFiles {
        cert: pki.dir.path().join("live.crt"),
        key: pki.dir.path().join("live.key"),
        pem: String::new(),
        x5t: String::new(),
    };
    let intruder = pki.client("intruder");
    std::fs::copy(&intruder.cert, &live.cert).unwrap();
    std::fs::copy(&intruder.key, &live.key).unwrap();
    let sc = Running::start(sidecar(
        &idp,
        &pki,
        AuthMethod::TlsClientAuth,
        TLS_CLIENT,
        &live,
        &up.url(),
        |r| r.use_token_client_cert = true,
    ))
    .await;

    let resp = get(&sc).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["token-sidecar-error"], "token_rejected");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("invalid_client"),
        "{body}"
    );
    assert!(up.seen().is_empty());

    let client = pki.client("client");
    replace(&client.key, &live.key);
    replace(&client.cert, &live.cert);
    // Bounded: the retry schedule repeats rejected attempts every 300 ms here.
    let mut last = 0;
    for _ in 0..50 {
        let resp = get(&sc).await;
        last = resp.status().as_u16();
        if last == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last, 200, "{:?}", up.seen());
    let seen = up.seen();
    assert_eq!(
        seen.last().unwrap().bound_to.as_deref(),
        Some(client.x5t.as_str())
    );
    sc.stop().await;
}

/// Swaps `to` for a copy of `from` by rename, as a Secret volume update does.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// A certificate and a key that do not belong together are a configuration error at start:
/// `run` and `check-config` exit 2 with one line naming `token.client_key_file` (the key's
/// content never shown).
#[test]
fn a_mismatched_certificate_and_key_exit_2_naming_the_key() {
    let pki = Pki::new();
    let (cert, wrong_key) = (pki.client("client").cert, pki.client("intruder").key);
    let config = pki.dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[token]\n\
             token_url = \"https://127.0.0.1:1/token\"\nclient_id = \"svc\"\n\
             auth_method = \"tls_client_auth\"\nclient_cert_file = {:?}\nclient_key_file = {:?}\n\
             [[route]]\nname = \"orders\"\npath_prefix = \"/orders/\"\nupstream = \"https://127.0.0.1:1\"\n",
            cert.display().to_string(),
            wrong_key.display().to_string()
        ),
    )
    .unwrap();
    let key_body = std::fs::read_to_string(&wrong_key).unwrap();
    let key_line = key_body.lines().nth(1).unwrap();
    for command in ["run", "check-config"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"))
            .args([command, "--config", config.to_str().unwrap()])
            .env_remove("SIDECAR_TOKEN__PRIVATE_KEY_FILE")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Bounded: a sidecar that started anyway is killed (by its handle) after 20 s.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                panic!("{command} kept running");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {err}");
        assert_eq!(err.lines().count(), 1, "{command}: {err}");
        assert!(
            err.starts_with("invalid config: token.client_key_file: "),
            "{command}: {err}"
        );
        assert!(err.contains("does not match"), "{command}: {err}");
        assert!(!err.contains(key_line), "{command}: {err}");
    }
}
