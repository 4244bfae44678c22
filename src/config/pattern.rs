//! Allow-list patterns for targets chosen at run time (docs/spec.md, run-time targets): the
//! audiences and scopes a route lets an application ask for per request, and what the loopback
//! token endpoint hands out.
//!
//! A pattern is an exact string, or a string with one or more `*`. A `*` stands for one or more
//! characters, none of which is `/`, `:`, `?`, `#`, `@`, `\`, whitespace or a control character,
//! so a `*` can fill one host label run (`a`, `a.b`) or one scope word, but can never step over
//! a URL's scheme, authority, path or query boundary: `https://*.svc.cluster.local/` matches
//! `https://orders.shop.svc.cluster.local/` and not `https://evil.com/.svc.cluster.local/`.
//! Matching is case-sensitive and byte-exact (audiences and scopes are opaque strings to OAuth).
//!
//! Bounded: patterns and values are at most [`MAX_LEN`] bytes (longer values never match), and
//! matching is a dynamic program in O(pattern × value) with no recursion.

use std::fmt;

/// The longest pattern, and the longest value that can match one.
pub(crate) const MAX_LEN: usize = 512;

/// A validated allow-list entry.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Pattern(String);

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Why a string is not a usable pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PatternError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("contains whitespace or a control character")]
    Whitespace,
    #[error("is only `*`s: it would allow anything")]
    OnlyWildcard,
}

/// Whether `c` may be covered by a `*`.
fn wildcard_may_cover(c: u8) -> bool {
    !(matches!(c, b'/' | b':' | b'?' | b'#' | b'@' | b'\\')
        || c.is_ascii_whitespace()
        || c.is_ascii_control())
}

impl Pattern {
    pub(crate) fn parse(s: &str) -> Result<Pattern, PatternError> {
        if s.is_empty() {
            return Err(PatternError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(PatternError::TooLong);
        }
        if s.bytes()
            .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
        {
            return Err(PatternError::Whitespace);
        }
        if s.bytes().all(|c| c == b'*') {
            return Err(PatternError::OnlyWildcard);
        }
        Ok(Pattern(s.to_owned()))
    }

    /// Whether `value` is allowed by this pattern.
    pub(crate) fn matches(&self, value: &str) -> bool {
        let (p, v) = (self.0.as_bytes(), value.as_bytes());
        if v.len() > MAX_LEN {
            return false;
        }
        if !p.contains(&b'*') {
            return p == v;
        }
        // ok[j]: p[..i] matches v[..j]; `star_run[j]` tracks a `*` that has covered ≥ 1 byte.
        let mut ok = vec![false; v.len() + 1];
        ok[0] = true;
        for &pc in p {
            let mut next = vec![false; v.len() + 1];
            if pc == b'*' {
                // One or more coverable bytes: next[j] = ∃k<j: ok[k] ∧ v[k..j] all coverable.
                let mut run = false;
                for j in 1..=v.len() {
                    let c = v[j - 1];
                    run = wildcard_may_cover(c) && (run || ok[j - 1]);
                    next[j] = run;
                }
            } else {
                for j in 1..=v.len() {
                    next[j] = ok[j - 1] && v[j - 1] == pc;
                }
            }
            ok = next;
        }
        ok[v.len()]
    }
}

/// Whether any pattern of `list` allows `value`.
pub(crate) fn allowed(list: &[Pattern], value: &str) -> bool {
    list.iter().any(|p| p.matches(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, v: &str) -> bool {
        Pattern::parse(p).unwrap().matches(v)
    }

    #[test]
    fn exact_strings_match_only_themselves() {
        assert!(m("api://orders", "api://orders"));
        assert!(!m("api://orders", "api://orders2"));
        assert!(!m("api://orders", "API://orders"));
        assert!(!m("api://orders", ""));
    }

    #[test]
    fn a_star_covers_labels_and_words_but_no_url_boundary() {
        let p = "https://*.svc.cluster.local/";
        assert!(m(p, "https://orders.svc.cluster.local/"));
        assert!(m(p, "https://orders.shop.svc.cluster.local/"));
        assert!(!m(p, "https://.svc.cluster.local/"));
        assert!(!m(p, "https://evil.com/.svc.cluster.local/"));
        assert!(!m(p, "https://evil.com#.svc.cluster.local/"));
        assert!(!m(p, "https://user@evil.com?.svc.cluster.local/"));
        assert!(!m(p, "https://evil.com:443.svc.cluster.local/"));
        assert!(!m(p, "https://orders.svc.cluster.local/x"));
        assert!(m("orders:*", "orders:read"));
        assert!(!m("orders:*", "orders:"));
        assert!(!m("orders:*", "orders:read:all"));
        assert!(!m("orders:*", "orders:read write"));
        assert!(m("api://*/read", "api://x/read"));
        assert!(m("*-reader", "orders-reader"));
        assert!(m("a*b*c", "a1b2c"));
        assert!(!m("a*b*c", "abc"));
    }

    #[test]
    fn bad_patterns_are_refused_and_long_values_never_match() {
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert_eq!(Pattern::parse("**"), Err(PatternError::OnlyWildcard));
        assert_eq!(Pattern::parse("a b"), Err(PatternError::Whitespace));
        assert_eq!(
            Pattern::parse(&"a".repeat(MAX_LEN + 1)),
            Err(PatternError::TooLong)
        );
        let long = format!("x{}", "a".repeat(MAX_LEN));
        assert!(!m("x*", &long));
    }
}
