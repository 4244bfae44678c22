//! The two real authorization servers the core suite runs against: the npm package
//! `oidc-provider` and the sidecar's own embedded development server. Both are started with the
//! same registration: one client, two resource servers.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use token_sidecar::{DevClient, DevServer, DevServerConfig};

use super::CLIENT_ID;
use super::authz::{AuthzConfig, ClientReg, OidcProvider, ResourceReg};

pub const ORDERS: &str = "https://orders.example.com";
pub const BILLING: &str = "https://billing.example.com";

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    OidcProvider,
    DevServer,
}

pub enum Idp {
    Oidc(Box<OidcProvider>),
    Dev(DevServer),
}

impl Idp {
    /// Registers `CLIENT_ID` with the public key of `key_file` (signing with `alg`), allowed
    /// `orders:read orders:write` for ORDERS and `billing:read` for BILLING; tokens live `ttl`.
    pub async fn start(kind: Kind, key_file: &str, alg: Option<&str>, ttl: Duration) -> Idp {
        let jwks = super::public_jwks(key_file, alg);
        match kind {
            Kind::OidcProvider => Idp::Oidc(Box::new(
                OidcProvider::start(&AuthzConfig {
                    clients: vec![ClientReg {
                        client_id: CLIENT_ID.into(),
                        jwks,
                        scope: "orders:read orders:write billing:read".into(),
                    }],
                    resources: vec![
                        ResourceReg {
                            audience: ORDERS.into(),
                            scope: "orders:read orders:write".into(),
                            ttl_secs: ttl.as_secs(),
                        },
                        ResourceReg {
                            audience: BILLING.into(),
                            scope: "billing:read".into(),
                            ttl_secs: ttl.as_secs(),
                        },
                    ],
                    default_ttl_secs: ttl.as_secs(),
                })
                .await,
            )),
            Kind::DevServer => Idp::Dev(
                DevServer::start(DevServerConfig {
                    listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                    clients: vec![DevClient {
                        client_id: CLIENT_ID.into(),
                        jwks,
                        scopes: ["orders:read", "orders:write", "billing:read"]
                            .map(String::from)
                            .into_iter()
                            .collect::<BTreeSet<_>>(),
                        audiences: [ORDERS, BILLING]
                            .map(String::from)
                            .into_iter()
                            .collect::<BTreeSet<_>>(),
                    }],
                    federations: vec![],
                    token_ttl: ttl,
                })
                .await
                .expect("dev server starts"),
            ),
        }
    }

    pub fn token_url(&self) -> String {
        match self {
            Idp::Oidc(p) => p.token_url.clone(),
            Idp::Dev(d) => d.token_url().to_string(),
        }
    }

    /// Token requests the server received, counted by the server.
    pub async fn token_requests(&self) -> u64 {
        match self {
            Idp::Oidc(p) => p.token_requests().await,
            Idp::Dev(d) => d.token_requests(),
        }
    }

    /// Verifies an access token's signature against the server's JWKS; returns its claims.
    pub async fn verify_access_token(&self, token: &str) -> serde_json::Value {
        match self {
            Idp::Oidc(p) => p.verify_access_token(token).await,
            Idp::Dev(d) => verify_with_jwks(&fetch_jwks(&d.jwks_url()).await, token),
        }
    }
}

/// The JWKS as any relying party would get it: over HTTP from the published URL.
pub async fn fetch_jwks(url: &str) -> serde_json::Value {
    super::http_client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Checks an RFC 9068 access token (`typ: at+jwt`) against a JWK Set; returns its claims.
pub fn verify_with_jwks(jwks: &serde_json::Value, token: &str) -> serde_json::Value {
    let header = jsonwebtoken::decode_header(token).expect("a JWT access token");
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks.clone()).unwrap();
    let jwk = set
        .keys
        .iter()
        .find(|k| k.common.key_id == header.kid)
        .expect("the token's kid is in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.leeway = 0;
    v.validate_aud = false;
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .expect("the access token verifies against the server's JWKS")
        .claims
}

/// Declares one test per authorization server for an `async fn(Kind)`.
#[macro_export]
macro_rules! against_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn oidc_provider() {
                    super::$name($crate::support::idp::Kind::OidcProvider).await
                }
                #[tokio::test]
                async fn dev_server() {
                    super::$name($crate::support::idp::Kind::DevServer).await
                }
            }
        )*
    };
}
