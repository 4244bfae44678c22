//! `auth_method = "client_assertion_file"`: the client assertion is a JWT the platform writes
//! and rotates (a Kubernetes projected service-account token, Azure workload identity's
//! `AZURE_FEDERATED_TOKEN_FILE`, a SPIFFE JWT-SVID from spiffe-helper), so the pod holds no
//! long-lived secret (docs/spec.md §2).
//!
//! The sidecar does not verify the JWT (the authorization server does); it reads only `exp`,
//! unverified, so that it never sends an assertion the server would refuse as expired.
//!
//! Invariants:
//! - The file is checked with one `stat` per token request and re-read when its (mtime, size,
//!   device, inode) stamp changed, symlinks followed (kubelet and spiffe-helper swap a `..data`
//!   symlink, exactly like a Secret volume), and also whenever the JWT held is no longer usable,
//!   since a platform may rewrite the file without changing its stamp at second granularity.
//! - A JWT whose `exp` has passed or is within `clock_skew_tolerance` is never returned: the
//!   file is re-read first, and if it is still expired the error names the file and when the JWT
//!   expired ([`AssertionFileError::Expired`]).
//! - Reads are bounded by [`MAX_FILE_BYTES`]; at most one JWT is held at a time.
//! - The JWT is a secret: it is held as [`Secret`], and no error, log line or `Debug` output
//!   contains any part of it (errors say what is wrong with the file, never what it holds).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::key::FileStamp;
use crate::secret::Secret;
use crate::token::response::jwt_claims;
use crate::util::{MAX_FILE_BYTES, read_bounded};

/// Why the file cannot give a usable assertion now. Each message names the file; none quotes it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AssertionFileError {
    #[error("token.client_assertion_file {path}: missing (the platform has not written it yet?)")]
    Missing { path: String },
    #[error("token.client_assertion_file {path}: unreadable: {reason}")]
    Unreadable { path: String, reason: String },
    #[error(
        "token.client_assertion_file {path}: not a JWT (expected three base64url parts with a JSON payload)"
    )]
    NotJwt { path: String },
    #[error("token.client_assertion_file {path}: the JWT has no numeric exp claim")]
    NoExp { path: String },
    #[error(
        "token.client_assertion_file {path}: the JWT expired at {at} (exp {exp}); not sent within {tolerance_secs} s of exp (clock_skew_tolerance + request_timeout), and the re-read file is no newer"
    )]
    Expired {
        path: String,
        exp: u64,
        at: String,
        tolerance_secs: u64,
    },
}

/// Whether an assertion expiring at `exp` may be sent at `now`: only while `exp` is more than
/// `tolerance` ahead, because a server whose clock runs up to `tolerance` ahead of ours would
/// see it expired. Pure, so the rule is tested without waiting.
pub(crate) fn usable(exp: u64, now: u64, tolerance: Duration) -> bool {
    let tolerance = tolerance.as_secs() + u64::from(tolerance.subsec_nanos() > 0);
    exp > now.saturating_add(tolerance)
}

struct Loaded {
    stamp: FileStamp,
    jwt: Secret<String>,
    exp: u64,
}

/// The assertion file, re-read when it changes or when the JWT held is about to expire.
pub(crate) struct AssertionFile {
    path: PathBuf,
    tolerance: Duration,
    loaded: Mutex<Option<Loaded>>,
}

impl std::fmt::Debug for AssertionFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl AssertionFile {
    /// Nothing is read yet: the platform may write the file after the sidecar starts.
    pub(crate) fn new(path: PathBuf, tolerance: Duration) -> AssertionFile {
        AssertionFile {
            path,
            tolerance,
            loaded: Mutex::new(None),
        }
    }

    /// The JWT to send at `now` (Unix seconds): the one held when the file is unchanged and
    /// the JWT still usable, else the file's current content, if usable.
    pub(crate) fn current(&self, now: u64) -> Result<Secret<String>, AssertionFileError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let stamp = FileStamp::of(&self.path).map_err(|e| self.io_error(&e))?;
        if let Some(l) = loaded.as_ref()
            && l.stamp == stamp
            && usable(l.exp, now, self.tolerance)
        {
            return Ok(l.jwt.clone());
        }
        let (jwt, exp) = self.read()?;
        if loaded.as_ref().is_none_or(|l| l.stamp != stamp) {
            tracing::info!(path = %self.path.display(), exp, "client assertion file (re)read");
        }
        *loaded = Some(Loaded {
            stamp,
            jwt: jwt.clone(),
            exp,
        });
        if !usable(exp, now, self.tolerance) {
            return Err(AssertionFileError::Expired {
                path: self.shown(),
                exp,
                at: rfc3339(exp),
                tolerance_secs: self.tolerance.as_secs(),
            });
        }
        Ok(jwt)
    }

    fn read(&self) -> Result<(Secret<String>, u64), AssertionFileError> {
        let bytes = read_bounded(&self.path, MAX_FILE_BYTES).map_err(|e| self.io_error(&e))?;
        let not_jwt = || AssertionFileError::NotJwt { path: self.shown() };
        let text = std::str::from_utf8(&bytes).map_err(|_| not_jwt())?.trim();
        // Only base64url and dots: anything else is not a compact JWS, and the check also keeps
        // the form body free of anything that needs more than percent-encoding.
        if text.is_empty()
            || !text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(not_jwt());
        }
        let claims = jwt_claims(text).ok_or_else(not_jwt)?;
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| AssertionFileError::NoExp { path: self.shown() })?;
        Ok((Secret::new(text.to_string()), exp))
    }

    fn io_error(&self, e: &io::Error) -> AssertionFileError {
        match e.kind() {
            io::ErrorKind::NotFound => AssertionFileError::Missing { path: self.shown() },
            // io errors carry the OS reason or read_bounded's size message, never file content.
            _ => AssertionFileError::Unreadable {
                path: self.shown(),
                reason: e.to_string(),
            },
        }
    }

    fn shown(&self) -> String {
        shown(&self.path)
    }
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// `exp` as an RFC 3339 UTC time, for the error an operator reads.
fn rfc3339(exp: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(exp.min(253_402_300_799));
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    const NOW: u64 = 1_800_000_000;
    const SKEW: Duration = Duration::from_secs(30);

    /// A JWT-shaped text (the signature is not checked here) with a recognisable marker.
    fn jwt(exp: u64, marker: &str) -> String {
        let enc = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.c2ln",
            enc(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
            enc(serde_json::json!({"exp": exp, "sub": marker}))
        )
    }

    #[test]
    fn usable_only_beyond_the_tolerance() {
        assert!(usable(NOW + 31, NOW, SKEW));
        assert!(!usable(NOW + 30, NOW, SKEW));
        assert!(!usable(NOW, NOW, SKEW));
        assert!(!usable(NOW - 1, NOW, SKEW));
        // A fraction of a second of tolerance counts as a whole one (never optimistic).
        assert!(!usable(NOW + 1, NOW, Duration::from_millis(500)));
        assert!(usable(u64::MAX, u64::MAX - 1, Duration::ZERO));
        assert!(!usable(u64::MAX, u64::MAX, SKEW));
    }

    #[test]
    fn a_rotated_file_is_read_again_through_a_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
        std::fs::write(&v1, jwt(NOW + 600, "one")).unwrap();
        std::fs::write(&v2, format!("{}\n", jwt(NOW + 600, "two"))).unwrap();
        let link = dir.path().join("token");
        std::os::unix::fs::symlink(&v1, &link).unwrap();
        let file = AssertionFile::new(link.clone(), SKEW);
        assert_eq!(file.current(NOW).unwrap().expose(), &jwt(NOW + 600, "one"));
        // kubelet's swap: a new symlink renamed over the old one.
        let tmp = dir.path().join("token.tmp");
        std::os::unix::fs::symlink(&v2, &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        assert_eq!(file.current(NOW).unwrap().expose(), &jwt(NOW + 600, "two"));
    }

    #[test]
    fn an_expiring_jwt_is_read_again_and_never_returned_expired() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("token");
        std::fs::write(&at, jwt(NOW + 100, "old")).unwrap();
        let file = AssertionFile::new(at.clone(), SKEW);
        assert!(file.current(NOW).is_ok());
        // Later, within the tolerance of exp, and the file not rewritten: refused, naming the
        // file and the time, never quoting the JWT.
        let err = file.current(NOW + 75).unwrap_err().to_string();
        assert!(err.contains(&at.display().to_string()), "{err}");
        assert!(err.contains("expired at 2027-01-15T08:01:40Z"), "{err}");
        assert!(
            !err.contains(&jwt(NOW + 100, "old")) && !err.contains("old"),
            "{err}"
        );
        // The platform writes a new one in place (same inode, maybe the same mtime second):
        // it is picked up because the held JWT is no longer usable.
        std::fs::write(&at, jwt(NOW + 700, "new")).unwrap();
        assert_eq!(
            file.current(NOW + 75).unwrap().expose(),
            &jwt(NOW + 700, "new")
        );
    }

    #[test]
    fn each_unusable_file_says_why_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("token");
        let file = AssertionFile::new(at.clone(), SKEW);
        let missing = file.current(NOW).unwrap_err();
        assert!(matches!(missing, AssertionFileError::Missing { .. }));
        assert!(missing.to_string().contains(&at.display().to_string()));

        for (content, want) in [
            ("hunter2-not-a-jwt".to_string(), "not a JWT"),
            (
                format!(
                    "{}.{}.sig",
                    URL_SAFE_NO_PAD.encode("{}"),
                    URL_SAFE_NO_PAD.encode(r#"{"sub":"hunter2"}"#)
                ),
                "no numeric exp",
            ),
        ] {
            std::fs::write(&at, &content).unwrap();
            let e = file.current(NOW).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let endless = AssertionFile::new(PathBuf::from("/dev/zero"), SKEW);
        let e = endless.current(NOW).unwrap_err().to_string();
        assert!(e.contains("unreadable") && e.contains("larger than"), "{e}");
        assert!(!format!("{file:?}").contains("hunter2"));
    }
}
