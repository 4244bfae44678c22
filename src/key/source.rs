//! The key file on disk: [`KeySource`] re-reads it when it changes (Kubernetes Secret rotation),
//! and [`write_private`] writes one safely.
//!
//! Invariants:
//! - A file version is its (mtime, len, dev, inode) stamp, symlinks followed; a new stamp means
//!   one re-read. An unusable new version never replaces a working key, and each distinct
//!   failure is logged once.
//! - A key file is read only up to [`MAX_KEY_FILE_BYTES`] (1 MiB), at start-up and on every
//!   re-read; a larger file is refused like any other unusable one.
//! - Key files are written owner-only (0600), and a replaced file is swapped in by rename, so a
//!   reader never sees half a key.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use zeroize::Zeroizing;

use super::{Algorithm, KeyError, SigningKey};

/// What identifies one version of a file: symlinks followed, so a Kubernetes `..data` swap shows
/// up as a new inode even when size and mtime happen to match.
/// Also used for the client assertion file (`token/assertion_file.rs`), which rotates the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    dev: u64,
    #[cfg(unix)]
    ino: u64,
}

impl FileStamp {
    pub(crate) fn of(path: &Path) -> io::Result<FileStamp> {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path)?;
        Ok(FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            #[cfg(unix)]
            dev: meta.dev(),
            #[cfg(unix)]
            ino: meta.ino(),
        })
    }
}

#[derive(Debug, PartialEq)]
enum Failure {
    Stat(io::ErrorKind),
    Load(FileStamp),
}

struct LoadState {
    key: Arc<SigningKey>,
    /// The file version `key` came from.
    loaded: FileStamp,
    /// The last failure warned about, so a broken file is logged once rather than per request.
    failed: Option<Failure>,
}

/// A key file that is re-read when it changes.
pub(crate) struct KeySource {
    path: PathBuf,
    alg: Option<Algorithm>,
    key_id: Option<String>,
    state: Mutex<LoadState>,
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = Arc::clone(&self.lock().key);
        f.debug_struct("KeySource")
            .field("path", &self.path)
            .field("alg", &key.alg())
            .field("kid", &key.kid())
            .finish_non_exhaustive()
    }
}

impl KeySource {
    /// Reads and parses the key file; fails if it cannot be read or parsed, or `alg` does not fit.
    pub(crate) fn load(
        path: impl Into<PathBuf>,
        alg: Option<Algorithm>,
        key_id: Option<String>,
    ) -> Result<KeySource, KeyError> {
        let path = path.into();
        let in_file = |reason| KeyError::File {
            path: path.clone(),
            reason: Box::new(reason),
        };
        let stamp = FileStamp::of(&path).map_err(|e| in_file(KeyError::Read(e)))?;
        let key = read_key(&path, alg, key_id.as_deref()).map_err(in_file)?;
        Ok(KeySource {
            state: Mutex::new(LoadState {
                key: Arc::new(key),
                loaded: stamp,
                failed: None,
            }),
            path,
            alg,
            key_id,
        })
    }

    /// The key to sign with now. One `stat` when nothing changed. When the file changed it is
    /// re-read; if the new version cannot be used the previous key keeps signing (a half-written
    /// or bad rotation must not break token requests) and the next call tries again.
    pub(crate) fn current(&self) -> Arc<SigningKey> {
        let mut state = self.lock();
        let stamp = match FileStamp::of(&self.path) {
            Ok(stamp) => stamp,
            Err(e) => {
                let failure = Failure::Stat(e.kind());
                if state.failed.as_ref() != Some(&failure) {
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        "cannot stat the signing key file; still signing with the previous key"
                    );
                    state.failed = Some(failure);
                }
                return Arc::clone(&state.key);
            }
        };
        if stamp == state.loaded {
            return Arc::clone(&state.key);
        }
        match read_key(&self.path, self.alg, self.key_id.as_deref()) {
            Ok(key) => {
                tracing::info!(path = %self.path.display(), kid = %key.kid(), "signing key reloaded");
                state.key = Arc::new(key);
                state.loaded = stamp;
                state.failed = None;
            }
            Err(e) => {
                let failure = Failure::Load(stamp);
                if state.failed.as_ref() != Some(&failure) {
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        "signing key file changed but cannot be used; still signing with the previous key"
                    );
                    state.failed = Some(failure);
                } else {
                    tracing::debug!(path = %self.path.display(), error = %e, "signing key file still unusable");
                }
            }
        }
        Arc::clone(&state.key)
    }

    /// The file this source reads (tests check it follows the configured path).
    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LoadState> {
        // The state is replaced whole, so a panic elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The most a key file may hold. A PEM or JWK private key is a few KiB (RSA 4096 as a JWK is
/// about 3.3 KiB); the bound keeps a wrong path (a log file, `/dev/zero`) from being read
/// whole into memory at start-up or on every rotation check.
pub(crate) const MAX_KEY_FILE_BYTES: u64 = crate::util::MAX_FILE_BYTES;

fn read_key(
    path: &Path,
    alg: Option<Algorithm>,
    key_id: Option<&str>,
) -> Result<SigningKey, KeyError> {
    let bytes = read_bounded(path, MAX_KEY_FILE_BYTES)?;
    SigningKey::from_bytes(&bytes, alg, key_id)
}

/// The bounded read, with the size refusal as its own error (it says "not a key").
fn read_bounded(path: &Path, limit: u64) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    crate::util::read_bounded(path, limit).map_err(|e| match e.kind() {
        io::ErrorKind::FileTooLarge => KeyError::TooLarge { limit },
        _ => KeyError::Read(e),
    })
}

/// Writes a private key file readable by its owner only (0600 on unix). With `overwrite`, an
/// existing file is replaced by rename, so a reader (a [`KeySource`]) never sees half a key.
pub(crate) fn write_private(path: &Path, contents: &[u8], overwrite: bool) -> Result<(), KeyError> {
    let write_err = |error| KeyError::Write {
        path: path.to_owned(),
        error,
    };
    if !overwrite {
        return match create_private(path).and_then(|f| fill(f, contents)) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(KeyError::Exists(path.to_owned()))
            }
            other => other.map_err(write_err),
        };
    }
    let name = path.file_name().ok_or_else(|| {
        write_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file name",
        ))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", random_suffix().map_err(write_err)?));
    let tmp = path.with_file_name(tmp_name);
    let result = create_private(&tmp)
        .and_then(|f| fill(f, contents))
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(write_err)
}

/// 96 random bits in hex: a temporary name no concurrent writer (or attacker guessing names in a
/// shared directory) will pick; `create_new` refuses a collision anyway.
fn random_suffix() -> io::Result<String> {
    let mut bytes = [0u8; 12];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| io::Error::other("the system random number generator failed"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn create_private(path: &Path) -> io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

fn fill(mut file: std::fs::File, contents: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::test_support::*;

    /// Lays out a directory the way the kubelet does for a Secret volume:
    /// `key.pem -> ..data/key.pem`, `..data -> ..<version>`.
    #[cfg(unix)]
    struct SecretVolume {
        dir: tempfile::TempDir,
        version: u32,
    }

    #[cfg(unix)]
    impl SecretVolume {
        fn new(contents: &[u8]) -> SecretVolume {
            let mut volume = SecretVolume {
                dir: tempfile::tempdir().unwrap(),
                version: 0,
            };
            volume.publish(contents);
            std::os::unix::fs::symlink("..data/key.pem", volume.key_path()).unwrap();
            volume
        }

        fn key_path(&self) -> PathBuf {
            self.dir.path().join("key.pem")
        }

        /// Writes a new version directory and swaps `..data` to it with one rename.
        fn publish(&mut self, contents: &[u8]) {
            self.version += 1;
            let version = format!("..v{}", self.version);
            let version_dir = self.dir.path().join(&version);
            std::fs::create_dir(&version_dir).unwrap();
            std::fs::write(version_dir.join("key.pem"), contents).unwrap();
            let tmp = self.dir.path().join("..data_tmp");
            std::os::unix::fs::symlink(&version, &tmp).unwrap();
            std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
        }
    }

    #[cfg(unix)]
    #[test]
    fn key_source_follows_a_kubernetes_secret_update() {
        let mut volume = SecretVolume::new(&fixture("ec_p256_sec1.pem"));
        let source = KeySource::load(volume.key_path(), None, None).unwrap();
        let first = source.current();
        assert_eq!(first.alg(), Algorithm::ES256);
        assert_eq!(source.path(), volume.key_path());
        // Nothing changed: the very same key.
        assert!(Arc::ptr_eq(&first, &source.current()));

        volume.publish(&fixture("ed25519_pkcs8.pem"));
        let second = source.current();
        assert_ne!(second.kid(), first.kid());
        assert_eq!(second.alg(), Algorithm::EdDSA);
        assert!(Arc::ptr_eq(&second, &source.current()));

        // A broken update keeps the previous key, on this call and the next.
        volume.publish(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n");
        assert!(Arc::ptr_eq(&second, &source.current()));
        assert!(Arc::ptr_eq(&second, &source.current()));

        // The fix after it is picked up.
        volume.publish(&fixture("rsa_pkcs8.pem"));
        let third = source.current();
        assert_eq!(third.alg(), Algorithm::RS256);
        assert_ne!(third.kid(), second.kid());
    }

    #[test]
    fn key_source_rereads_a_file_rewritten_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        std::fs::write(&path, fixture("ec_p256.jwk.json")).unwrap();
        let source = KeySource::load(&path, None, Some("pinned".into())).unwrap();
        assert_eq!(source.current().kid(), "pinned");
        let before = source.current().public_jwk();

        // Garbage of a different length: noticed, refused, old key kept.
        std::fs::write(&path, b"{").unwrap();
        assert_eq!(source.current().public_jwk(), before);
        // Removed: old key kept.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(source.current().public_jwk(), before);

        std::fs::write(&path, fixture("ec_p256_pkcs8.pem")).unwrap();
        let after = source.current();
        // The same EC key in another form: same public key; the configured kid still applies.
        assert_eq!(after.kid(), "pinned");
        assert_eq!(after.public_jwk(), before);

        std::fs::write(&path, fixture("ed25519.jwk.json")).unwrap();
        assert_eq!(source.current().alg(), Algorithm::EdDSA);
        std::fs::write(&path, fixture("ec_p256_pkcs8.pem")).unwrap();

        // A configured alg applies to reloads: an Ed25519 key does not fit ES256.
        let typed = KeySource::load(&path, Some(Algorithm::ES256), None).unwrap();
        let kept = typed.current();
        std::fs::write(&path, fixture("ed25519_pkcs8.pem")).unwrap();
        assert!(Arc::ptr_eq(&kept, &typed.current()));
    }

    #[test]
    fn key_source_load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = KeySource::load(&missing, None, None).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        assert!(e.to_string().contains("cannot read"), "{e}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, b"not a key").unwrap();
        let e = KeySource::load(&garbage, None, None).unwrap_err();
        assert!(e.to_string().contains("garbage.pem"), "{e}");
        assert!(e.to_string().contains("not a private key"), "{e}");

        let e = KeySource::load(
            fixture_path("ec_p256_sec1.pem"),
            Some(Algorithm::RS256),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(&e, KeyError::File { reason, .. } if matches!(**reason, KeyError::AlgMismatch { .. }))
        );
    }

    #[test]
    fn an_oversized_key_file_is_refused_at_load_and_on_rotation() {
        let limit = usize::try_from(MAX_KEY_FILE_BYTES).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        // A usable key followed by blank lines: only its size is wrong.
        let mut padded = fixture("ed25519_pkcs8.pem");
        padded.resize(limit, b'\n');
        assert!(SigningKey::from_bytes(&padded, None, None).is_ok());
        std::fs::write(&path, &padded).unwrap();
        assert_eq!(
            KeySource::load(&path, None, None).unwrap().current().alg(),
            Algorithm::EdDSA,
            "exactly at the bound is fine"
        );
        padded.push(b'\n');
        assert!(SigningKey::from_bytes(&padded, None, None).is_ok());
        std::fs::write(&path, &padded).unwrap();
        let e = KeySource::load(&path, None, None).unwrap_err();
        assert!(
            matches!(&e, KeyError::File { reason, .. } if matches!(**reason, KeyError::TooLarge { .. })),
            "{e:?}"
        );
        assert!(e.to_string().contains("larger than 1048576 bytes"), "{e}");

        // Rotation to the oversized file keeps the key that works.
        std::fs::write(&path, fixture("ec_p256_sec1.pem")).unwrap();
        let source = KeySource::load(&path, None, None).unwrap();
        let first = source.current();
        std::fs::write(&path, &padded).unwrap();
        assert!(Arc::ptr_eq(&first, &source.current()));
        assert_eq!(source.current().alg(), Algorithm::ES256);

        // A device that never ends (metadata says 0 bytes) is cut off at the bound too.
        #[cfg(unix)]
        {
            let e = KeySource::load("/dev/zero", None, None).unwrap_err();
            assert!(e.to_string().contains("larger than"), "{e}");
        }
    }

    #[test]
    fn write_private_is_owner_only_and_refuses_to_clobber() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_private(&path, b"one", false).unwrap();
        assert!(matches!(
            write_private(&path, b"two", false),
            Err(KeyError::Exists(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        write_private(&path, b"three", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left behind"
        );
    }
}
