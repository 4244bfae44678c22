//! Discovery (docs/spec.md §2): the token endpoint named by the issuer's metadata, for
//! `token.issuer` instead of `token_url`.
//!
//! The document comes from `{issuer}/.well-known/openid-configuration` (OpenID Connect
//! Discovery §4), else from the RFC 8414 §3 location, where `/.well-known/oauth-authorization-server`
//! is inserted between the host and the issuer's path. It is fetched once at start (a failure
//! stops the start, `server::StartError::Discovery`) and again every
//! `discovery_refresh_interval`; a failed refresh keeps the last good endpoint.
//!
//! Invariants:
//! - An endpoint is only ever published after [`check_document`] accepted it: the document's
//!   `issuer` equals the configured one (ignoring one trailing `/`), and its `token_endpoint`
//!   is `https` (or `http` with `allow_insecure_token_url`), carries no user info or fragment,
//!   and is on the issuer's host (any port) unless `allow_cross_host_endpoint`.
//! - One fetch is bounded: [`MAX_DOCUMENT_BYTES`] of body, `request_timeout` per metadata URL,
//!   two URLs at most, no redirects (the token client's HTTP client).
//! - The request path reads the endpoint lock-free ([`ArcSwapOption`]); the refresher is one
//!   task per process that holds only a weak reference, so it ends with the token client.
//! - URLs appear in errors and logs only through [`redact_url`].

use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use url::Url;

use crate::util::{redact_url, reqwest_error};

/// Largest metadata document read. Hydra's is about 3 KiB, oidc-provider's under 16 KiB.
pub(crate) const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// Why no token endpoint could be discovered.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot fetch {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{url} is not a metadata document: {reason}")]
    Malformed { url: String, reason: String },
    #[error("{url} names issuer {found:?}, not the configured {expected:?}")]
    IssuerMismatch {
        url: String,
        found: String,
        expected: String,
    },
    #[error("{url}: token_endpoint {endpoint} refused: {reason}")]
    Endpoint {
        url: String,
        endpoint: String,
        reason: String,
    },
    #[error("token.issuer {0} is not a valid URL")]
    Issuer(String),
}

/// What a discovered endpoint must satisfy (from `[token]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub(crate) allow_insecure: bool,
    pub(crate) allow_cross_host: bool,
}

/// The metadata URLs to try, in order: OpenID Connect Discovery's (the path appended to the
/// issuer), then RFC 8414's (the well-known segment inserted before the issuer's path).
pub(crate) fn metadata_urls(issuer: &str) -> Result<[Url; 2], DiscoveryError> {
    let bad = || DiscoveryError::Issuer(redact_url(issuer));
    let base = Url::parse(issuer).map_err(|_| bad())?;
    let path = base.path().trim_end_matches('/').to_owned();
    let mut oidc = base.clone();
    oidc.set_query(None);
    oidc.set_path(&format!("{path}/.well-known/openid-configuration"));
    let mut oauth = base;
    oauth.set_query(None);
    oauth.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    Ok([oidc, oauth])
}

/// Checks one metadata document against the configured issuer and returns its token
/// endpoint. Pure: the rules of the module docs, nothing fetched.
pub(crate) fn check_document(
    issuer: &str,
    from: &Url,
    body: &[u8],
    rules: Rules,
) -> Result<String, DiscoveryError> {
    let url = || redact_url(from.as_str());
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| DiscoveryError::Malformed {
            url: url(),
            reason: format!("not JSON ({e})"),
        })?;
    let Some(found) = doc.get("issuer").and_then(|v| v.as_str()) else {
        return Err(DiscoveryError::Malformed {
            url: url(),
            reason: "no \"issuer\" string".into(),
        });
    };
    // RFC 8414 §3.3 and OIDC Discovery §4.3: the document speaks for this issuer only, or a
    // compromised or misrouted server could point the client's credentials anywhere. Only a
    // trailing slash may differ (operators write it either way; servers echo their own form),
    // one, not several.
    let one = |s: &str| s.strip_suffix('/').unwrap_or(s).to_owned();
    if one(found) != one(issuer) {
        return Err(DiscoveryError::IssuerMismatch {
            url: url(),
            found: redact_url(found),
            expected: redact_url(issuer),
        });
    }
    let Some(endpoint) = doc.get("token_endpoint").and_then(|v| v.as_str()) else {
        return Err(DiscoveryError::Malformed {
            url: url(),
            reason: "no \"token_endpoint\" string".into(),
        });
    };
    let refuse = |reason: &str| DiscoveryError::Endpoint {
        url: url(),
        endpoint: redact_url(endpoint),
        reason: reason.into(),
    };
    let e = Url::parse(endpoint).map_err(|_| refuse("not a valid URL"))?;
    match e.scheme() {
        "https" => {}
        "http" if rules.allow_insecure => {}
        "http" => {
            return Err(refuse(
                "plain http:// would send client credentials in clear text (token.allow_insecure_token_url allows it)",
            ));
        }
        _ => return Err(refuse("not an https:// URL")),
    }
    if !e.username().is_empty() || e.password().is_some() || e.fragment().is_some() {
        return Err(refuse("carries user info or a fragment"));
    }
    let issuer_host = Url::parse(issuer)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned));
    if !rules.allow_cross_host && e.host_str().map(str::to_owned) != issuer_host {
        return Err(refuse(
            "not on the issuer's host (token.allow_cross_host_endpoint allows it)",
        ));
    }
    Ok(endpoint.to_owned())
}

/// The issuer's token endpoint, discovered and kept fresh.
pub(crate) struct Discovery {
    issuer: String,
    urls: [Url; 2],
    rules: Rules,
    http: reqwest::Client,
    timeout: Duration,
    interval: Duration,
    current: ArcSwapOption<String>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("issuer", &redact_url(&self.issuer))
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// Nothing is fetched until [`Discovery::start`].
    pub(crate) fn new(
        issuer: &str,
        rules: Rules,
        http: reqwest::Client,
        timeout: Duration,
        interval: Duration,
    ) -> Result<Discovery, DiscoveryError> {
        Ok(Discovery {
            issuer: issuer.to_owned(),
            urls: metadata_urls(issuer)?,
            rules,
            http,
            timeout,
            interval,
            current: ArcSwapOption::empty(),
        })
    }

    /// The last good token endpoint; None before the first successful fetch.
    pub(crate) fn current(&self) -> Option<Arc<String>> {
        self.current.load_full()
    }

    /// Fetches the document now (an error is the start-up failure) and starts the refresher.
    /// Must run inside a Tokio runtime.
    pub(crate) async fn start(self: &Arc<Self>) -> Result<(), DiscoveryError> {
        let endpoint = self.fetch().await?;
        tracing::info!(issuer = %redact_url(&self.issuer), token_endpoint = %redact_url(&endpoint), "token endpoint discovered");
        self.current.store(Some(Arc::new(endpoint)));
        tokio::spawn(refresh(Arc::downgrade(self), self.interval));
        Ok(())
    }

    /// One refresh: on success the endpoint is replaced, on failure the last good one stays.
    pub(crate) async fn refresh_once(&self) -> Result<(), DiscoveryError> {
        match self.fetch().await {
            Ok(endpoint) => {
                if self.current().as_deref() != Some(&endpoint) {
                    tracing::info!(token_endpoint = %redact_url(&endpoint), "discovered token endpoint changed");
                }
                self.current.store(Some(Arc::new(endpoint)));
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "issuer metadata refresh failed; keeping the last good token endpoint");
                Err(e)
            }
        }
    }

    /// Tries the OIDC location, then RFC 8414's when the first answers anything but a
    /// document (a 404 is the usual sign of a plain OAuth server). A document that fails the
    /// checks is final: falling back past a wrong issuer would hide the misconfiguration.
    async fn fetch(&self) -> Result<String, DiscoveryError> {
        let mut first_error = None;
        for url in &self.urls {
            match tokio::time::timeout(self.timeout, self.get(url)).await {
                Ok(Ok(body)) => return check_document(&self.issuer, url, &body, self.rules),
                Ok(Err(e)) => first_error.get_or_insert(e),
                Err(_) => first_error.get_or_insert(DiscoveryError::Fetch {
                    url: redact_url(url.as_str()),
                    reason: format!("timed out after {:?}", self.timeout),
                }),
            };
        }
        Err(first_error.expect("two URLs were tried"))
    }

    async fn get(&self, url: &Url) -> Result<Vec<u8>, DiscoveryError> {
        let fail = |reason: String| DiscoveryError::Fetch {
            url: redact_url(url.as_str()),
            reason,
        };
        let response = self
            .http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| fail(reqwest_error(e)))?;
        if !response.status().is_success() {
            return Err(fail(format!("HTTP {}", response.status().as_u16())));
        }
        crate::util::read_response_bounded(response, MAX_DOCUMENT_BYTES)
            .await
            .map_err(|e| match e {
                crate::util::ResponseReadError::TooLarge => {
                    fail(format!("document larger than {MAX_DOCUMENT_BYTES} bytes"))
                }
                crate::util::ResponseReadError::Transport(t) => fail(t),
            })
    }
}

/// The refresher: one fetch per `interval` while the discovery is alive.
async fn refresh(weak: Weak<Discovery>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(d) = weak.upgrade() else { return };
        let _ = d.refresh_once().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: Rules = Rules {
        allow_insecure: false,
        allow_cross_host: false,
    };

    fn doc(issuer: &str, endpoint: &str) -> Vec<u8> {
        serde_json::json!({"issuer": issuer, "token_endpoint": endpoint})
            .to_string()
            .into_bytes()
    }

    fn from() -> Url {
        Url::parse("https://idp.example.com/.well-known/openid-configuration").unwrap()
    }

    #[test]
    fn metadata_urls_follow_oidc_then_rfc8414_path_insertion() {
        let [oidc, oauth] = metadata_urls("https://hydra.example.com/").unwrap();
        assert_eq!(
            oidc.as_str(),
            "https://hydra.example.com/.well-known/openid-configuration"
        );
        assert_eq!(
            oauth.as_str(),
            "https://hydra.example.com/.well-known/oauth-authorization-server"
        );
        // An issuer with a path (Keycloak's realms, Entra's tenants).
        let [oidc, oauth] = metadata_urls("https://kc.example.com/realms/prod").unwrap();
        assert_eq!(
            oidc.as_str(),
            "https://kc.example.com/realms/prod/.well-known/openid-configuration"
        );
        assert_eq!(
            oauth.as_str(),
            "https://kc.example.com/.well-known/oauth-authorization-server/realms/prod"
        );
    }

    #[test]
    fn a_document_for_another_issuer_is_refused() {
        let body = doc("https://evil.example.com", "https://evil.example.com/token");
        let err = check_document("https://idp.example.com", &from(), &body, STRICT).unwrap_err();
        assert!(
            matches!(err, DiscoveryError::IssuerMismatch { .. }),
            "{err}"
        );
        // A trailing slash is the only difference tolerated.
        let body = doc("https://idp.example.com/", "https://idp.example.com/token");
        assert_eq!(
            check_document("https://idp.example.com", &from(), &body, STRICT).unwrap(),
            "https://idp.example.com/token"
        );
    }

    #[test]
    fn the_endpoint_must_be_https_and_on_the_issuers_host_unless_allowed() {
        let issuer = "https://idp.example.com";
        let cross = doc(issuer, "https://other.example.com/token");
        let err = check_document(issuer, &from(), &cross, STRICT).unwrap_err();
        assert!(
            err.to_string().contains("allow_cross_host_endpoint"),
            "{err}"
        );
        let rules = Rules {
            allow_cross_host: true,
            ..STRICT
        };
        assert!(check_document(issuer, &from(), &cross, rules).is_ok());

        let plain = doc(issuer, "http://idp.example.com/token");
        let err = check_document(issuer, &from(), &plain, STRICT).unwrap_err();
        assert!(
            err.to_string().contains("allow_insecure_token_url"),
            "{err}"
        );
        let rules = Rules {
            allow_insecure: true,
            ..STRICT
        };
        assert!(check_document(issuer, &from(), &plain, rules).is_ok());

        // Another port on the same host is the same machine: accepted.
        let port = doc(issuer, "https://idp.example.com:8443/token");
        assert!(check_document(issuer, &from(), &port, STRICT).is_ok());
        for bad in [
            "https://user:pw@idp.example.com/token",
            "https://idp.example.com/token#x",
            "ftp://idp.example.com/token",
        ] {
            let err = check_document(issuer, &from(), &doc(issuer, bad), STRICT).unwrap_err();
            assert!(!err.to_string().contains("pw@"), "{err}");
        }
        let missing = br#"{"issuer": "https://idp.example.com"}"#;
        assert!(check_document(issuer, &from(), missing, STRICT).is_err());
    }
}
