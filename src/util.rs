//! Small facts every layer needs exactly once: the wall clock as Unix seconds, an error's whole
//! cause chain as one line, a URL as logs and error texts may show it, and a credential or CA
//! file read with a size bound.
//!
//! Invariant: a URL reaches a log line, an error text, `/readyz` or `check-config` output only
//! through [`redact_url`] (or [`reqwest_error`] for reqwest's errors, whose `Display` embeds the
//! full URL): scheme, host, port and path, never userinfo, query or fragment, which is where
//! credentials and API keys sit (`https://user:pass@…`, `…?api_key=…`).

use std::io::{self, Read as _};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

use url::Url;

/// Seconds since the Unix epoch, floored. A clock before 1970 is broken beyond what any server
/// would accept; 0 keeps derived `iat` values in the past rather than failing.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The most any file the sidecar reads (key, client secret, CA bundle) may hold. A private key
/// or a secret is a few KiB and a large CA bundle a few hundred; the bound keeps a wrong path
/// (a log file, `/dev/zero`) from being read whole into memory at start-up or on every re-read.
pub(crate) const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Reads at most `limit` bytes of `path`; a file with more is refused (`io::ErrorKind::
/// FileTooLarge`), whatever its metadata claims (device files report size 0). The buffer is
/// wiped when dropped, as the contents may be a key or a secret.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> io::Result<Zeroizing<Vec<u8>>> {
    let file = std::fs::File::open(path)?;
    // Sized up front from the metadata so the buffer is not reallocated while it fills: a
    // reallocation would leave a copy of a key in freed memory that `Zeroizing` cannot wipe.
    let expected = file.metadata().map_or(0, |m| m.len()).min(limit) + 1;
    let mut bytes = Zeroizing::new(Vec::with_capacity(
        usize::try_from(expected).unwrap_or(usize::MAX),
    ));
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("larger than {limit} bytes: is this the right file?"),
        ));
    }
    Ok(bytes)
}

/// Why an HTTP response body was not read whole.
#[derive(Debug)]
pub(crate) enum ResponseReadError {
    /// More than the limit (announced by `Content-Length`, or counted while reading).
    TooLarge,
    /// The connection failed mid-body; the text is [`reqwest_error`]'s (URL redacted).
    Transport(String),
}

/// Reads a response body chunk by chunk up to `limit` bytes, so an endless or huge answer is
/// cut at the bound instead of being buffered first. The one bounded reader for every HTTP
/// body the sidecar takes in (token responses, discovery documents, the dev server's JWKS).
pub(crate) async fn read_response_bounded(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, ResponseReadError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ResponseReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ResponseReadError::Transport(reqwest_error(e)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(ResponseReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An error and its causes on one line. Top-level messages of reqwest and hyper are vague
/// ("error sending request"); the causes say what happened. Causes already contained in the
/// text so far are skipped.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    chain_onto(e.to_string(), e.source())
}

fn chain_onto(mut out: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `url` reduced to scheme, host, port and path: no userinfo, no query, no fragment. Text that
/// does not parse as a URL is not shown at all (it could be anything, a secret included).
pub(crate) fn redact_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(u) => redact_parsed(&u),
        Err(_) => "[unparsable URL]".to_owned(),
    }
}

fn redact_parsed(u: &Url) -> String {
    // A URL without a host (`mailto:`, `data:`) is all "path"; nothing of it is safe to show.
    let Some(host) = u.host_str() else {
        return format!("{}:[redacted]", u.scheme());
    };
    let mut out = format!("{}://{host}", u.scheme());
    if let Some(port) = u.port() {
        out.push_str(&format!(":{port}"));
    }
    out.push_str(u.path());
    out
}

/// A reqwest error on one line with its causes, its URL redacted. reqwest's own `Display`
/// appends `for url (<the full URL>)`, query and all.
pub(crate) fn reqwest_error(e: reqwest::Error) -> String {
    let url = e.url().map(redact_parsed);
    let e = e.without_url();
    let mut top = e.to_string();
    if let Some(url) = url {
        top.push_str(&format!(" for url ({url})"));
    }
    chain_onto(top, std::error::Error::source(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_bounded_refuses_one_byte_more_and_endless_files() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("f");
        std::fs::write(&at, vec![b'x'; 10]).unwrap();
        assert_eq!(read_bounded(&at, 10).unwrap().len(), 10);
        let e = read_bounded(&at, 9).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
        // A device reports size 0 and never ends: the bound, not the metadata, stops the read.
        let e = read_bounded(Path::new("/dev/zero"), 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge);
    }

    #[test]
    fn a_ca_file_past_the_bound_is_refused_before_parsing() {
        let e = crate::tls::load_certs(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    #[test]
    fn redact_url_keeps_scheme_host_port_and_path_only() {
        for (url, shown) in [
            (
                "https://user:pass@idp.example.com:8443/oauth2/token?api_key=SECRET#frag",
                "https://idp.example.com:8443/oauth2/token",
            ),
            (
                "http://127.0.0.1:9/token?p=SECRET",
                "http://127.0.0.1:9/token",
            ),
            ("https://[::1]/t", "https://[::1]/t"),
            ("https://user@h.example/", "https://h.example/"),
            ("https://h.example:443/x", "https://h.example/x"),
            ("mailto:SECRET@example.com", "mailto:[redacted]"),
            ("not a url SECRET", "[unparsable URL]"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[tokio::test]
    async fn reqwest_errors_lose_userinfo_and_query() {
        // A loopback port just released: the connect is refused at once, and reqwest's error
        // carries the URL.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = format!("http://user:pass@127.0.0.1:{port}/token?api_key=SECRET#frag");
        let e = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(&url)
            .send()
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("SECRET"),
            "reqwest shows the query: {e}"
        );
        let text = reqwest_error(e);
        assert!(!text.contains("SECRET"), "{text}");
        assert!(!text.contains("pass"), "{text}");
        assert!(
            text.contains(&format!("for url (http://127.0.0.1:{port}/token)")),
            "{text}"
        );
        assert!(text.contains("error sending request"), "{text}");
    }
}
