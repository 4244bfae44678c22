//! Header rules of the request path: which headers belong to one hop only, and whether an
//! upstream's 401 says the token itself was refused. Pure functions, no allocation in the common
//! case.

use http::HeaderMap;
use http::header::{
    CONNECTION, HeaderName, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE, WWW_AUTHENTICATE,
};

/// RFC 6750 §3.1: `WWW-Authenticate: Bearer error="invalid_token"` says the token itself was
/// refused (expired, revoked), as opposed to `insufficient_scope` or a missing token.
pub(crate) fn is_invalid_token_challenge(headers: &HeaderMap) -> bool {
    headers.get_all(WWW_AUTHENTICATE).iter().any(|v| {
        let Ok(v) = v.to_str() else { return false };
        let lower = v.to_ascii_lowercase();
        let Some(rest) = lower.trim_start().strip_prefix("bearer") else {
            return false;
        };
        rest.split(',').any(|param| {
            let mut kv = param.splitn(2, '=');
            let k = kv.next().unwrap_or("").trim();
            let val = kv.next().unwrap_or("").trim().trim_matches('"');
            k == "error" && val == "invalid_token"
        })
    })
}

/// Connection-level headers (RFC 9110 §7.6.1) apply to one hop only, and so do the
/// proxy-authentication headers: the sidecar is that hop.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes hop-by-hop headers, including those named in `Connection`.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // `Connection: keep-alive` / `close` name nothing beyond the fixed list; only other tokens
    // need collecting (the common case allocates nothing).
    let names_others = headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str().map_or(true, |v| {
            v.split(',').any(|t| {
                let t = t.trim();
                !t.is_empty()
                    && !t.eq_ignore_ascii_case("keep-alive")
                    && !t.eq_ignore_ascii_case("close")
            })
        })
    });
    if names_others {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "keep-alive, X-Custom-Hop".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-custom-hop", "1".parse().unwrap());
        h.insert(TE, "trailers".parse().unwrap());
        h.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(UPGRADE, "websocket".parse().unwrap());
        h.insert(PROXY_AUTHORIZATION, "Basic eA==".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
    }

    #[test]
    fn invalid_token_challenges_are_recognised() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.append(WWW_AUTHENTICATE, v.parse().unwrap());
            is_invalid_token_challenge(&h)
        };
        assert!(with(r#"Bearer error="invalid_token""#));
        assert!(with(
            r#"Bearer realm="api", error="invalid_token", error_description="expired""#
        ));
        assert!(with("bearer error=invalid_token"));
        assert!(!with(r#"Bearer error="insufficient_scope""#));
        assert!(!with(r#"Bearer realm="api""#));
        assert!(!with(r#"Basic realm="invalid_token""#));
        assert!(!is_invalid_token_challenge(&HeaderMap::new()));
    }
}
