//! Targets chosen at run time (docs/spec.md §4, "Per-request audience and scope" and "Wildcard
//! host routes"): what a request may change about the token it gets and the upstream it reaches.
//!
//! - Wildcard host routes (config::wildcard): a request's `{host}` and `{label}` fill the
//!   route's templated `scope` and `audience`, so each host gets a token for its own audience.
//! - Per-request headers: `token-sidecar-audience` and `token-sidecar-scope`, each one line of
//!   at most [`MAX_HEADER_BYTES`] bytes holding 1–[`MAX_VALUES`] space-separated values, every
//!   value allowed by the route's `allow_audiences` / `allow_scopes` (config::pattern).
//!
//! Everything here is pure and bounded; the proxy calls it in phase 1 (`Proxy::route`), before
//! any body is read or any token fetched.

use http::HeaderMap;
use http::header::HeaderName;

use crate::config::pattern::{Pattern, allowed};
use crate::config::wildcard::{Fill, SAMPLE, Template};
use crate::token::TokenKey;

/// The request header naming the audiences the application wants for this request.
pub(crate) const AUDIENCE_HEADER: HeaderName = HeaderName::from_static("token-sidecar-audience");
/// The request header naming the scopes the application wants for this request.
pub(crate) const SCOPE_HEADER: HeaderName = HeaderName::from_static("token-sidecar-scope");
/// Most values in one per-request header.
pub(crate) const MAX_VALUES: usize = 16;
/// Longest per-request header value, in bytes.
pub(crate) const MAX_HEADER_BYTES: usize = 4096;

/// Why a request's target is refused; fixed texts, so nothing of the request is echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TargetError {
    /// 400: the header is malformed (several lines, empty, too long, too many values).
    BadRequest(&'static str),
    /// 403 `target_not_allowed`: the route takes no such value.
    NotAllowed(&'static str),
}
/// A route's allow-lists and templated defaults: everything that makes its token key a
/// per-request choice.
#[derive(Debug)]
pub(crate) struct RouteTargets {
    pub(crate) allow_audiences: Vec<Pattern>,
    pub(crate) allow_scopes: Vec<Pattern>,
    /// The route's `scope`, templates parsed.
    pub(crate) scope: Vec<Template>,
    /// The route's `audience`, templates parsed.
    pub(crate) audience: Vec<Template>,
    /// Whether `scope` or `audience` has a placeholder (then every request has its own key).
    pub(crate) templated: bool,
}

/// The values of one per-request header: `None` when absent, else 1..=[`MAX_VALUES`] distinct
/// values in request order.
pub(crate) fn header_values<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> Result<Option<Vec<&'h str>>, TargetError> {
    let mut lines = headers.get_all(name).iter();
    let Some(line) = lines.next() else {
        return Ok(None);
    };
    if lines.next().is_some() {
        // Joining could mix what two parts of the application meant; refuse instead.
        return Err(TargetError::BadRequest(
            "a token-sidecar-audience or token-sidecar-scope header appears more than once; send one line with space-separated values",
        ));
    }
    if line.len() > MAX_HEADER_BYTES {
        return Err(TargetError::BadRequest(
            "a token-sidecar-audience or token-sidecar-scope header is longer than 4096 bytes",
        ));
    }
    let text = line
        .to_str()
        .ok()
        .filter(|t| {
            t.bytes()
                .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
        })
        .ok_or(TargetError::BadRequest(
            "a token-sidecar-audience or token-sidecar-scope header is not printable ASCII",
        ))?;
    let mut values: Vec<&str> = Vec::new();
    for v in text.split([' ', '\t']).filter(|v| !v.is_empty()) {
        if values.contains(&v) {
            continue;
        }
        if values.len() == MAX_VALUES {
            return Err(TargetError::BadRequest(
                "a token-sidecar-audience or token-sidecar-scope header has more than 16 values",
            ));
        }
        values.push(v);
    }
    if values.is_empty() {
        // An explicit "nothing" must not silently become the route's default.
        return Err(TargetError::BadRequest(
            "a token-sidecar-audience or token-sidecar-scope header is empty; leave it out for the route's default",
        ));
    }
    Ok(Some(values))
}

/// Whether a request carries either per-request header (a route without allow-lists refuses it).
pub(crate) fn has_target_headers(headers: &HeaderMap) -> bool {
    headers.contains_key(AUDIENCE_HEADER) || headers.contains_key(SCOPE_HEADER)
}

const AUDIENCE_NOT_ALLOWED: &str =
    "this route does not allow the audience the token-sidecar-audience header asks for";
const SCOPE_NOT_ALLOWED: &str =
    "this route does not allow the scope the token-sidecar-scope header asks for";

/// The token key for a request on a route with [`RouteTargets`]: each header's values when
/// present (every one allowed), else the route's own `scope` / `audience` with the wildcard's
/// `fill`. `None` when neither header is present and nothing is templated: the route's fixed
/// slot serves it.
pub(crate) fn choose_key(
    t: &RouteTargets,
    headers: &HeaderMap,
    fill: Option<Fill<'_>>,
) -> Result<Option<TokenKey>, TargetError> {
    let audiences = header_values(headers, &AUDIENCE_HEADER)?;
    let scopes = header_values(headers, &SCOPE_HEADER)?;
    if audiences.is_none() && scopes.is_none() && !t.templated {
        return Ok(None);
    }
    if let Some(a) = &audiences
        && !a.iter().all(|v| allowed(&t.allow_audiences, v))
    {
        return Err(TargetError::NotAllowed(AUDIENCE_NOT_ALLOWED));
    }
    if let Some(s) = &scopes
        && !s
            .iter()
            .all(|v| is_scope_token(v) && allowed(&t.allow_scopes, v))
    {
        return Err(TargetError::NotAllowed(SCOPE_NOT_ALLOWED));
    }
    let fill = fill.unwrap_or(SAMPLE);
    let defaults =
        |list: &[Template]| -> Vec<String> { list.iter().map(|x| x.render(fill)).collect() };
    let scopes = match scopes {
        Some(s) => s.iter().map(|v| v.to_string()).collect(),
        None => defaults(&t.scope),
    };
    let audiences = match audiences {
        Some(a) => a.iter().map(|v| v.to_string()).collect(),
        None => defaults(&t.audience),
    };
    Ok(Some(TokenKey::new(&scopes, &audiences)))
}

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
pub(crate) fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(aud: &[&str], scope: &[&str]) -> RouteTargets {
        RouteTargets {
            allow_audiences: aud.iter().map(|p| Pattern::parse(p).unwrap()).collect(),
            allow_scopes: scope.iter().map(|p| Pattern::parse(p).unwrap()).collect(),
            scope: vec![Template::parse("orders:read").unwrap()],
            audience: vec![Template::parse("https://orders/").unwrap()],
            templated: false,
        }
    }

    fn with(pairs: &[(&HeaderName, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append((*n).clone(), http::HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn headers_choose_within_the_allow_lists() {
        let t = targets(&["https://*.svc/"], &["orders:*"]);
        assert_eq!(choose_key(&t, &HeaderMap::new(), None), Ok(None));
        let key = choose_key(&t, &with(&[(&AUDIENCE_HEADER, b"https://a.svc/")]), None)
            .unwrap()
            .unwrap();
        assert_eq!(key, TokenKey::new(&["orders:read"], &["https://a.svc/"]));
        let key = choose_key(
            &t,
            &with(&[(&SCOPE_HEADER, b" orders:write  orders:read orders:write")]),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            key,
            TokenKey::new(&["orders:read", "orders:write"], &["https://orders/"])
        );
        for (name, value) in [
            (&AUDIENCE_HEADER, &b"https://evil.com/.svc/"[..]),
            (&AUDIENCE_HEADER, b"https://a.svc/ https://evil/"),
            (&SCOPE_HEADER, b"admin"),
            (&SCOPE_HEADER, b"orders:\"x"),
        ] {
            assert!(
                matches!(
                    choose_key(&t, &with(&[(name, value)]), None),
                    Err(TargetError::NotAllowed(_))
                ),
                "{value:?}"
            );
        }
        let many: String = (0..17).map(|i| format!("orders:s{i} ")).collect();
        let long = "orders:x ".repeat(500);
        for pairs in [
            vec![(&SCOPE_HEADER, &b""[..])],
            vec![(&SCOPE_HEADER, b"   ")],
            vec![(&SCOPE_HEADER, many.as_bytes())],
            vec![(&SCOPE_HEADER, long.as_bytes())],
            vec![(&SCOPE_HEADER, b"orders:\xff")],
            vec![(&SCOPE_HEADER, b"orders:a"), (&SCOPE_HEADER, b"orders:b")],
        ] {
            assert!(
                matches!(
                    choose_key(&t, &with(&pairs), None),
                    Err(TargetError::BadRequest(_))
                ),
                "{pairs:?}"
            );
        }
        // A route with empty allow-lists takes no header at all.
        let none = targets(&[], &[]);
        assert!(matches!(
            choose_key(&none, &with(&[(&SCOPE_HEADER, b"orders:read")]), None),
            Err(TargetError::NotAllowed(_))
        ));
    }

    #[test]
    fn templated_defaults_give_each_host_its_key() {
        let t = RouteTargets {
            allow_audiences: vec![],
            allow_scopes: vec![],
            scope: vec![],
            audience: vec![Template::parse("https://{host}/").unwrap()],
            templated: true,
        };
        let fill = Fill {
            host: "a.svc.cluster.local",
            label: "a",
        };
        assert_eq!(
            choose_key(&t, &HeaderMap::new(), Some(fill)),
            Ok(Some(TokenKey::new::<&str, &str>(
                &[],
                &["https://a.svc.cluster.local/"]
            )))
        );
    }
}
