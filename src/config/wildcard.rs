//! Wildcard host routes (docs/spec.md §4): the host pattern grammar, the strict form a
//! request's host must have to match one, and the `{host}` / `{label}` templates of a wildcard
//! route's `upstream`, `audience` and `scope`. Pure, and shared by validation and the proxy.
//!
//! - `host = "*.SUFFIX"` matches exactly one DNS label before `SUFFIX`, `host = "**.SUFFIX"`
//!   one or more labels. The request's host is first reduced to a strict DNS name by
//!   [`dns_name`] (LDH labels of 1–63 bytes, at most 253 bytes, lowercased, the port and one
//!   trailing dot dropped); anything else (IP literals, user info, `#`, `/`, `?`, `_`, raw
//!   UTF-8, empty labels) matches no wildcard at all, so no host outside the pattern can reach
//!   the route.
//! - `{host}` is that DNS name, `{label}` the part the wildcard matched. Both are DNS names, so
//!   substituting them cannot change a URL's structure; in `upstream` they may only stand in
//!   the authority ([`placeholders_only_in_authority`]).
//!
//! Bounded: names are at most [`MAX_NAME`] bytes; matching is one suffix comparison.

/// Longest DNS name (RFC 1035 §2.3.4, without the trailing dot).
pub(crate) const MAX_NAME: usize = 253;
/// Longest DNS label.
pub(crate) const MAX_LABEL: usize = 63;

/// A route's `upstream` as validation checks it: on a wildcard route with a well-formed
/// template, filled with [`SAMPLE`]; otherwise exactly as written.
pub(crate) fn sample_upstream(r: &super::RouteConfig) -> String {
    let wildcard = r
        .host
        .as_deref()
        .and_then(HostPattern::parse)
        .is_some_and(|p| p.is_ok());
    match Template::parse(&r.upstream) {
        Ok(t) if wildcard => t.render(SAMPLE),
        _ => r.upstream.clone(),
    }
}

/// Whether `label` is an LDH label (RFC 1035 / RFC 5891 A-labels included: `xn--…`), any case.
fn is_ldh_label(label: &[u8]) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL
        && label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        && label.first() != Some(&b'-')
        && label.last() != Some(&b'-')
}

/// A host name in the strict form wildcards and templates use: LDH labels, total at most
/// [`MAX_NAME`] bytes, the last label not all digits (so no IPv4 literal, in any spelling).
fn is_dns_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split(|b| *b == b'.').all(is_ldh_label)
        && name
            .rsplit(|b| *b == b'.')
            .next()
            .is_some_and(|last| !last.iter().all(u8::is_ascii_digit))
}

/// The request's host (a `Host` value or an authority) as a lowercase DNS name without port and
/// trailing dot, or `None` when it is not one: user info, IP literals (`127.0.0.1`, `[::1]`),
/// characters outside `[A-Za-z0-9-.]`, empty or over-long labels, more than one trailing dot, a
/// port that is not 1–5 digits. The port is dropped: a wildcard route's upstream URL fixes
/// scheme and port (docs/spec.md §4).
pub(crate) fn dns_name(raw: &str) -> Option<String> {
    let raw = raw.as_bytes();
    let name = match raw.iter().rposition(|b| *b == b':') {
        Some(colon) => {
            let port = &raw[colon + 1..];
            if port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
                return None;
            }
            &raw[..colon]
        }
        None => raw,
    };
    // One trailing dot is the absolute form of the same name; two are not a name.
    let name = name.strip_suffix(b".").unwrap_or(name);
    if !is_dns_name(name) {
        return None;
    }
    // Checked ASCII above.
    Some(String::from_utf8_lossy(name).to_ascii_lowercase())
}

/// A wildcard `host`: `*.SUFFIX` (exactly one label) or `**.SUFFIX` (one or more labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostPattern {
    /// `.SUFFIX`, lowercase.
    suffix: String,
    /// `**.`: any number (≥ 1) of labels before the suffix.
    many: bool,
}

impl HostPattern {
    /// `None` when `host` is no wildcard (does not start with `*`), else the pattern or why it
    /// is not one.
    pub(crate) fn parse(host: &str) -> Option<Result<HostPattern, &'static str>> {
        let (rest, many) = if let Some(r) = host.strip_prefix("**") {
            (r, true)
        } else if let Some(r) = host.strip_prefix('*') {
            (r, false)
        } else {
            return None;
        };
        let Some(suffix) = rest.strip_prefix('.') else {
            return Some(Err(
                "a wildcard host is `*.` or `**.` followed by a DNS name",
            ));
        };
        if !is_dns_name(suffix.as_bytes()) {
            return Some(Err(
                "the name after `*.` / `**.` must be a DNS name: labels of a-z, 0-9 and '-', no port, no IP address",
            ));
        }
        Some(Ok(HostPattern {
            suffix: format!(".{}", suffix.to_ascii_lowercase()),
            many,
        }))
    }

    /// The part of `name` (a [`dns_name`]) the wildcard covers, when `name` matches.
    pub(crate) fn matches<'n>(&self, name: &'n str) -> Option<&'n str> {
        let label = name.strip_suffix(self.suffix.as_str())?;
        // `dns_name` guarantees non-empty labels, so `label` is one or more whole labels.
        (!label.is_empty() && (self.many || !label.contains('.'))).then_some(label)
    }

    /// How specific the pattern is: a longer suffix beats a shorter one, `*.` beats `**.`.
    pub(crate) fn rank(&self) -> usize {
        self.suffix.len() * 2 + usize::from(!self.many)
    }
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Host,
    Label,
}

/// A string with `{host}` / `{label}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template(Vec<Piece>);

/// What a wildcard route's request fills its templates with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fill<'a> {
    /// The request's host as [`dns_name`] returns it.
    pub(crate) host: &'a str,
    /// The part the wildcard matched.
    pub(crate) label: &'a str,
}

/// Values that stand in for a request at validation time (a valid host and label).
pub(crate) const SAMPLE: Fill<'static> = Fill {
    host: "sample.example",
    label: "sample",
};

impl Template {
    /// Parses `{host}` and `{label}`; any other `{` or `}` is an error.
    pub(crate) fn parse(s: &str) -> Result<Template, &'static str> {
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err("has a `}` without `{`; the placeholders are {host} and {label}");
            }
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let after = &rest[open..];
            let (piece, len) = if after.starts_with("{host}") {
                (Piece::Host, 6)
            } else if after.starts_with("{label}") {
                (Piece::Label, 7)
            } else {
                return Err("has an unknown placeholder; the placeholders are {host} and {label}");
            };
            pieces.push(piece);
            rest = &after[len..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Template(pieces))
    }

    /// Whether the template has a placeholder.
    pub(crate) fn is_templated(&self) -> bool {
        self.0.iter().any(|p| !matches!(p, Piece::Text(_)))
    }

    pub(crate) fn render(&self, fill: Fill<'_>) -> String {
        let mut out = String::new();
        for p in &self.0 {
            out.push_str(match p {
                Piece::Text(t) => t,
                Piece::Host => fill.host,
                Piece::Label => fill.label,
            });
        }
        out
    }
}

/// Whether `s` holds a placeholder-like brace (config validation: templates need a wildcard).
pub(crate) fn has_braces(s: &str) -> bool {
    s.contains(['{', '}'])
}

/// Where the placeholders of an upstream URL template sit: they must be in the authority
/// (between `://` and the next `/`, `?` or `#`), so a request can choose the host but never the
/// scheme or the path.
pub(crate) fn placeholders_only_in_authority(upstream: &str) -> bool {
    let Some((scheme, rest)) = upstream.split_once("://") else {
        return !has_braces(upstream);
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    !has_braces(scheme) && !has_braces(&rest[end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap().unwrap()
    }

    fn host_match(p: &HostPattern, raw: &str) -> Option<String> {
        let name = dns_name(raw)?;
        p.matches(&name).map(str::to_owned)
    }

    #[test]
    fn one_label_and_many_label_wildcards() {
        let one = pat("*.svc.cluster.local");
        let many = pat("**.svc.cluster.local");
        assert_eq!(
            host_match(&one, "orders.svc.cluster.local").as_deref(),
            Some("orders")
        );
        assert_eq!(host_match(&one, "a.b.svc.cluster.local"), None);
        assert_eq!(
            host_match(&many, "a.b.svc.cluster.local").as_deref(),
            Some("a.b")
        );
        assert_eq!(
            host_match(&one, "Orders.SVC.cluster.local:8443").as_deref(),
            Some("orders")
        );
        assert_eq!(
            host_match(&one, "orders.svc.cluster.local.").as_deref(),
            Some("orders")
        );
        assert_eq!(
            host_match(&one, "xn--bcher-kva.svc.cluster.local").as_deref(),
            Some("xn--bcher-kva")
        );
        assert!(one.rank() > many.rank());
        assert!(pat("*.a.svc.cluster.local").rank() > one.rank());
    }

    #[test]
    fn hostile_hosts_match_no_wildcard() {
        let p = pat("**.svc.cluster.local");
        for bad in [
            "evil.com#.svc.cluster.local",
            "evil.com/.svc.cluster.local",
            "evil.com?.svc.cluster.local",
            "a@evil.com.svc.cluster.local",
            "evil.com\\.svc.cluster.local",
            "x.svc.cluster.local..",
            "..svc.cluster.local",
            ".svc.cluster.local",
            "svc.cluster.local",
            "127.0.0.1",
            "[::1]",
            "[::1]:80",
            "x_y.svc.cluster.local",
            "bücher.svc.cluster.local",
            "-x.svc.cluster.local",
            "x-.svc.cluster.local",
            "x.svc.cluster.local:99999x",
            "x.svc.cluster.local:123456",
            "x.svc.cluster.local.evil.com",
            "x.svc.cluster.localhost",
            "xsvc.cluster.local",
            " x.svc.cluster.local",
            "",
        ] {
            assert_eq!(host_match(&p, bad), None, "{bad:?}");
        }
        let long_label = format!("{}.svc.cluster.local", "a".repeat(64));
        assert_eq!(host_match(&p, &long_label), None);
        let long_name = format!("{}svc.cluster.local", "abcdefghi.".repeat(24));
        assert!(long_name.len() > MAX_NAME);
        assert_eq!(host_match(&p, &long_name), None);
        // An empty port (`name:`, RFC 3986 §3.2.3) is no port.
        assert_eq!(host_match(&p, "x.svc.cluster.local:").as_deref(), Some("x"));
    }

    #[test]
    fn wildcard_patterns_are_checked() {
        for bad in [
            "*",
            "*.",
            "*evil.com",
            "*.*.local",
            "*.local:8080",
            "*.127.0.0.1",
            "***.local",
            "*.a_b.local",
        ] {
            assert!(matches!(HostPattern::parse(bad), Some(Err(_))), "{bad:?}");
        }
        assert_eq!(HostPattern::parse("orders.local"), None);
        assert!(matches!(HostPattern::parse("*.localhost"), Some(Ok(_))));
    }

    #[test]
    fn templates_fill_host_and_label() {
        let t = Template::parse("https://{host}/{label}").unwrap();
        assert!(t.is_templated());
        let fill = Fill {
            host: "a.svc",
            label: "a",
        };
        assert_eq!(t.render(fill), "https://a.svc/a");
        assert!(!Template::parse("plain").unwrap().is_templated());
        for bad in ["{hostx}", "{", "}", "{port}", "a{host"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
        assert!(placeholders_only_in_authority(
            "https://{label}.svc:8443/base"
        ));
        assert!(!placeholders_only_in_authority("https://x/{label}"));
        assert!(!placeholders_only_in_authority("{label}://x"));
        assert!(!placeholders_only_in_authority("https://x?{host}"));
    }
}
