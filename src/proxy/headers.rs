//! Header rules of the request path (docs/spec.md §4–§5): which headers belong to one hop only,
//! whether an upstream's 401 says the token itself was refused, whether a request comes from a
//! cross-site web page, and whether its body framing is one the sidecar forwards faithfully.
//! Pure functions over a header map, no allocation in the common case.
//!
//! Header values are read as bytes, never through `to_str`: a value with one non-ASCII byte
//! must not make a rule skip the rest of it (a `Connection` list that hid its hop-by-hop names
//! that way would let them through).

use http::HeaderMap;
use http::header::{
    CONNECTION, HeaderName, ORIGIN, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE, WWW_AUTHENTICATE,
};

use super::routes::{LocalHosts, host_without_port};

/// RFC 6750 §3.1: `WWW-Authenticate: Bearer error="invalid_token"` says the token itself was
/// refused (expired, revoked), as opposed to `insufficient_scope` or a missing token.
///
/// Read from the value's bytes (a `realm` or `error_description` with non-ASCII bytes must not
/// hide the error), and in any challenge of the list (RFC 9110 §11.6.1: `Basic realm="x",
/// Bearer error="invalid_token"`): an element `scheme param` starts a challenge, an element
/// `name=value` continues the current one.
pub(crate) fn is_invalid_token_challenge(headers: &HeaderMap) -> bool {
    headers.get_all(WWW_AUTHENTICATE).iter().any(|v| {
        let mut in_bearer = false;
        for element in v.as_bytes().split(|b| *b == b',') {
            let element = element.trim_ascii();
            let eq = element.iter().position(|b| *b == b'=');
            let space = element.iter().position(|b| *b == b' ');
            let param = match space {
                // `Scheme rest`: a new challenge whose first parameter is `rest`.
                // (`name = value` is a parameter with blanks around `=`, not a scheme.)
                Some(sp)
                    if eq.is_none_or(|e| sp < e)
                        && !element[sp..].trim_ascii_start().starts_with(b"=") =>
                {
                    in_bearer = element[..sp].eq_ignore_ascii_case(b"bearer");
                    element[sp..].trim_ascii()
                }
                // A lone token: a challenge without parameters.
                None if eq.is_none() => {
                    in_bearer = element.eq_ignore_ascii_case(b"bearer");
                    continue;
                }
                _ => element,
            };
            if in_bearer && is_error_invalid_token(param) {
                return true;
            }
        }
        false
    })
}

/// `error="invalid_token"` or `error=invalid_token`, blanks around `=` allowed.
fn is_error_invalid_token(param: &[u8]) -> bool {
    let Some(eq) = param.iter().position(|b| *b == b'=') else {
        return false;
    };
    let name = param[..eq].trim_ascii();
    let value = param[eq + 1..].trim_ascii();
    let value = value
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(value);
    name.eq_ignore_ascii_case(b"error") && value == b"invalid_token"
}

/// Connection-level headers (RFC 9110 §7.6.1) apply to one hop only, and so do the
/// proxy-authentication headers: the sidecar is that hop.
static HOP_BY_HOP: [HeaderName; N_HOP_BY_HOP] = [
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

/// The elements of a comma-separated header list (RFC 9110 §5.6.1), OWS trimmed, empty ones
/// skipped; bytes, so no element is lost to a non-ASCII neighbour.
fn list_elements(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers, including every header named in `Connection`, and the `also`
/// headers (the per-request target headers on the way up, `token-sidecar-error` on the way
/// down). Each element of every `Connection` line is read from its bytes; an element that is
/// not a valid header name names no header and is skipped, without affecting the others.
///
/// One pass over the names present finds which of the fixed names to remove, and only those
/// are removed: most messages carry none or one of them. A hashed `remove` per fixed name
/// (9 + `also` per message, twice per request) cost 2,928 instructions a request under
/// callgrind, the one pass 1,582 (`bench/counts.sh`, a `wrk`-like request and an nginx
/// answer). At most `N_HOP_BY_HOP + MAX_ALSO` names are tracked.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, also: &[HeaderName]) {
    // Names beyond the tracked ones (no caller passes any) are removed the plain way.
    let (also, untracked) = also.split_at(also.len().min(MAX_ALSO));
    for n in untracked {
        headers.remove(n);
    }
    let mut found = [false; N_HOP_BY_HOP + MAX_ALSO];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().chain(also).position(|n| n == name) {
            found[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    // `Connection: keep-alive` / `close` name nothing beyond the fixed list; only other
    // elements need collecting (the common case allocates nothing).
    let names_others = found[0] // HOP_BY_HOP[0] is `Connection`.
        && list_elements(headers, CONNECTION)
            .any(|t| !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"close"));
    if names_others {
        // Bounded by the header block, itself bounded by `proxy.max_header_bytes`.
        let named: Vec<HeaderName> = list_elements(headers, CONNECTION)
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for (n, _) in HOP_BY_HOP
        .iter()
        .chain(also)
        .zip(found)
        .filter(|(_, found)| *found)
    {
        headers.remove(n);
    }
}

/// The most extra names [`strip_hop_by_hop`] tracks in its one pass.
const MAX_ALSO: usize = 2;
const N_HOP_BY_HOP: usize = 9;

/// Marks a request whose HTTP/1 head carried both `Content-Length` and `Transfer-Encoding`.
/// hyper removes `Content-Length` from such a request, so the server layer, which sees the
/// head's bytes, sets this (`server::framing`) and phase 1 refuses the request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FramingConflict;

/// Whether the request's `Transfer-Encoding`, all its lines together, is absent or exactly one
/// `chunked` coding (case-insensitive). hyper frames a body by the last coding only; a coding
/// before it (`gzip, chunked`) would be dropped with the header on the way upstream, so the
/// upstream would take compressed bytes for plain ones. Refused rather than re-encoded.
pub(crate) fn transfer_encoding_is_plain_chunked(headers: &HeaderMap) -> bool {
    if !headers.contains_key(TRANSFER_ENCODING) {
        return true;
    }
    let mut codings = list_elements(headers, TRANSFER_ENCODING);
    matches!(codings.next(), Some(c) if c.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// Why a request counts as coming from a cross-site web page (docs/spec.md §5, 403), or `None`.
///
/// Cross-site means `Sec-Fetch-Site: cross-site`, or an `Origin` that is `null`, not an
/// `http`/`https` origin, or whose host (port and trailing dot ignored, case-insensitive) is
/// neither the request's own host name, nor a loopback name, nor an `allowed_hosts` name.
/// Browsers send `Origin` with CORS and non-GET/HEAD requests but not with simple GET/HEAD
/// loads, which `Sec-Fetch-Site` covers (docs/spec.md §5 states the limit); ordinary HTTP
/// clients send neither header, so applications are not affected.
pub(crate) fn cross_site(
    headers: &HeaderMap,
    request_host: Option<&str>,
    local: &LocalHosts,
) -> Option<&'static str> {
    if list_elements(headers, HeaderName::from_static("sec-fetch-site"))
        .any(|v| v.eq_ignore_ascii_case(b"cross-site"))
    {
        return Some("cross-site requests from web pages are refused (Sec-Fetch-Site)");
    }
    let own = request_host.map(host_without_port);
    for origin in headers.get_all(ORIGIN) {
        let same_site = origin_host(origin.as_bytes()).is_some_and(|h| {
            let name = host_without_port(h);
            own.is_some_and(|o| o.eq_ignore_ascii_case(name)) || local.contains_name(name)
        });
        if !same_site {
            return Some("cross-site requests from web pages are refused (Origin)");
        }
    }
    None
}

/// The `host[:port]` of a serialized `http`/`https` origin (RFC 6454 §6.2), or `None` for
/// `null`, other schemes and anything malformed.
fn origin_host(value: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let scheme_end = s.find("://")?;
    let scheme = &s[..scheme_end];
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return None;
    }
    let authority = &s[scheme_end + 3..];
    let clean = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b));
    clean.then_some(authority)
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
        strip_hop_by_hop(&mut h, &[]);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
    }

    #[test]
    fn extra_names_go_with_the_hop_by_hop_ones_and_nothing_else_is_touched() {
        let also = [
            HeaderName::from_static("token-sidecar-audience"),
            HeaderName::from_static("token-sidecar-scope"),
        ];
        // None present: the map is left exactly as it was, order and duplicates included.
        let mut h = HeaderMap::new();
        h.append("x-a", "1".parse().unwrap());
        h.append("x-a", "2".parse().unwrap());
        h.insert(http::header::HOST, "api".parse().unwrap());
        let before = h.clone();
        strip_hop_by_hop(&mut h, &also);
        assert_eq!(h, before);
        // Each kind alone, and all together with repeated lines.
        for name in HOP_BY_HOP.iter().chain(&also) {
            let mut h = before.clone();
            h.append(name, "x".parse().unwrap());
            h.append(name, "y".parse().unwrap());
            strip_hop_by_hop(&mut h, &also);
            assert_eq!(h, before, "{name} was not removed");
        }
        let mut h = before.clone();
        for name in HOP_BY_HOP.iter().chain(&also) {
            h.append(name, "x".parse().unwrap());
        }
        strip_hop_by_hop(&mut h, &also);
        assert_eq!(h, before);
        // More extra names than are tracked: removed all the same.
        let mut h = before.clone();
        let third = HeaderName::from_static("x-third");
        h.insert(&third, "1".parse().unwrap());
        h.insert(&also[1], "1".parse().unwrap());
        strip_hop_by_hop(&mut h, &[also[0].clone(), also[1].clone(), third]);
        assert_eq!(h, before);
        // Without `also`, those names are end-to-end.
        let mut h = before.clone();
        h.insert(&also[0], "https://a/".parse().unwrap());
        strip_hop_by_hop(&mut h, &[]);
        assert_eq!(h.len(), before.len() + 1);
    }

    #[test]
    fn connection_names_are_read_from_bytes() {
        // Today's code gave up on the whole list at the first non-ASCII byte and stripped none
        // of the names in it.
        let mut h = HeaderMap::new();
        h.append(
            CONNECTION,
            http::HeaderValue::from_bytes(b"X-Secret-Hop, caf\xc3\xa9, \xff").unwrap(),
        );
        h.append(
            CONNECTION,
            http::HeaderValue::from_bytes(b"\tX-Other ,").unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
        strip_hop_by_hop(&mut h, &[]);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
    }

    #[test]
    fn only_a_single_chunked_coding_is_accepted() {
        let with = |lines: &[&[u8]]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(TRANSFER_ENCODING, http::HeaderValue::from_bytes(l).unwrap());
            }
            transfer_encoding_is_plain_chunked(&h)
        };
        assert!(with(&[]));
        assert!(with(&[b"chunked"]));
        assert!(with(&[b"Chunked"]));
        assert!(with(&[b" chunked ,"]));
        for bad in [
            &[&b"gzip, chunked"[..]][..],
            &[b"chunked, chunked"],
            &[b"chunked", b"chunked"],
            &[b"gzip", b"chunked"],
            &[b"identity"],
            &[b""],
            &[b"chunked;x=1"],
            &[b"\xffchunked"],
        ] {
            assert!(!with(bad), "{bad:?}");
        }
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        let local = LocalHosts::new(&["client.internal:8080".to_string()]);
        let check = |host: Option<&str>, pairs: &[(&str, &[u8])]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    http::HeaderValue::from_bytes(v).unwrap(),
                );
            }
            cross_site(&h, host, &local).is_some()
        };
        let lh = Some("localhost:8080");
        assert!(!check(lh, &[]));
        assert!(!check(lh, &[("origin", b"http://localhost:8080")]));
        assert!(!check(lh, &[("origin", b"http://127.0.0.1:3000")]));
        assert!(!check(lh, &[("origin", b"https://[::1]")]));
        assert!(!check(lh, &[("origin", b"http://client.internal:1")]));
        assert!(!check(
            Some("billing.example.com"),
            &[("origin", b"https://Billing.Example.com")]
        ));
        assert!(!check(lh, &[("sec-fetch-site", b"same-origin")]));
        assert!(!check(lh, &[("sec-fetch-site", b"none")]));
        assert!(check(lh, &[("sec-fetch-site", b"cross-site")]));
        assert!(check(lh, &[("sec-fetch-site", b"Cross-Site")]));
        for bad in [
            &b"http://evil.example"[..],
            b"null",
            b"http://localhost.evil.example",
            b"http://evil.example#@localhost",
            b"http://user@localhost",
            b"file://",
            b"chrome-extension://abc",
            b"localhost",
            b"http://",
            b"http://localhost/path",
            b"http://\xfflocalhost",
        ] {
            assert!(check(lh, &[("origin", bad)]), "{bad:?}");
        }
        // One good Origin line does not excuse a bad one.
        assert!(check(
            lh,
            &[
                ("origin", b"http://localhost"),
                ("origin", b"http://evil.example")
            ]
        ));
        // The request's own host counts only when it is the request's.
        assert!(check(
            Some("evil.example"),
            &[("origin", b"http://other.example")]
        ));
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
        assert!(!with(r#"Basic error="invalid_token""#));
        assert!(!is_invalid_token_challenge(&HeaderMap::new()));
        // Bearer after another challenge in the same list; Bearer without parameters first.
        assert!(with(r#"Basic realm="x", Bearer error="invalid_token""#));
        assert!(with(r#"Bearer, Bearer realm="a", error="invalid_token""#));
        assert!(!with(r#"Bearer realm="a", Basic error="invalid_token""#));
        // Blanks around `=`, any case of the name.
        assert!(with(r#"Bearer realm="a", Error = "invalid_token""#));
        // Non-ASCII bytes elsewhere in the value do not hide the error.
        let mut h = HeaderMap::new();
        h.append(
            WWW_AUTHENTICATE,
            http::HeaderValue::from_bytes(b"Bearer realm=\"caf\xe9\", error=\"invalid_token\"")
                .unwrap(),
        );
        assert!(is_invalid_token_challenge(&h));
    }
}
