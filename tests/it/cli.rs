//! docs/spec.md §7 (command line): `check-config` on the shipped `sidecar.toml` and on broken ones, through the binary.

use std::path::Path;
use std::process::Command;

use crate::support::fixture;

fn check_config(config: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_token-sidecar"));
    cmd.arg("check-config").arg("--config").arg(config);
    // The shipped example names the key's path in a Kubernetes Secret mount; point it at a fixture.
    cmd.env(
        "SIDECAR_TOKEN__PRIVATE_KEY_FILE",
        fixture("ec_p256_sec1.pem"),
    );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn shipped() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sidecar.toml")
}

#[test]
fn the_shipped_sidecar_toml_is_valid() {
    let (code, out, err) = check_config(&shipped(), &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("token_url"));
    assert!(out.contains("[[route]]"));
}

#[test]
fn a_broken_config_exits_2_naming_each_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[token]
token_url = "http://idp.example.com/token"
client_id = "svc"
refresh_at = 3

[[route]]
name = "x"
upstream = "https://x.example.com"
"#,
    )
    .unwrap();
    let (code, _out, err) = check_config(&bad, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("token.token_url"), "{err}");
    assert!(err.contains("token.refresh_at"), "{err}");
    assert!(err.contains("route[0].listen"), "{err}");
    assert_eq!(err.lines().count(), 3, "one line per problem:\n{err}");

    // Unknown keys are errors, and so is a bad value from the environment.
    std::fs::write(
        &bad,
        "[token]\ntoken_url = \"https://i/t\"\nclient_id = \"c\"\ncolour = 1\n",
    )
    .unwrap();
    let (code, _out, err) = check_config(&bad, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("colour"), "{err}");
    let (code, _out, err) = check_config(&shipped(), &[("SIDECAR_TOKEN__REQUEST_TIMEOUT", "soon")]);
    assert_eq!(code, 2);
    assert!(err.contains("token.request_timeout"), "{err}");

    // A key file that is not a key is reported under its key.
    let not_a_key = dir.path().join("key.pem");
    std::fs::write(&not_a_key, "hello").unwrap();
    let (code, _out, err) = check_config(
        &shipped(),
        &[(
            "SIDECAR_TOKEN__PRIVATE_KEY_FILE",
            not_a_key.to_str().unwrap(),
        )],
    );
    assert_eq!(code, 2);
    assert!(err.contains("token.private_key_file"), "{err}");
}

#[test]
fn a_missing_config_file_exits_2() {
    let (code, _out, err) = check_config(Path::new("/nonexistent/sidecar.toml"), &[]);
    assert_eq!(code, 2);
    assert!(err.contains("not found"), "{err}");
}

/// Runs the binary with `args` and the test's environment scrubbed of `SIDECAR_*` and proxy
/// variables; waits at most `within`, then kills it (by its own PID) and returns `None`.
fn run_bounded(
    args: &[&str],
    env: &[(&str, &str)],
    within: std::time::Duration,
) -> Option<(i32, String, String)> {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_token-sidecar"));
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("SIDECAR_") || k.to_ascii_lowercase().ends_with("_proxy") {
            cmd.env_remove(&k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    status.map(|s| (s.code().unwrap_or(-1), read(&out), read(&err)))
}

/// A config with port-0 listeners, `private_key_jwt` with `key`, and `extra` under `[token]`.
/// The token endpoint is never reached by the tests that use it.
fn key_config(dir: &Path, key: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("sidecar.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[proxy]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[token]
token_url = "https://127.0.0.1:1/token"
client_id = "svc"
private_key_file = {key:?}
{extra}
[[route]]
name = "orders"
path_prefix = "/orders/"
upstream = "https://127.0.0.1:1"
"#,
            key = key.display().to_string()
        ),
    )
    .unwrap();
    path
}

/// docs/spec.md §7: a key file that is readable but not a usable key is a configuration
/// problem: `run` and `check-config` both exit 2 with one line naming `token.private_key_file`
/// (run used to exit 1). An oversized file is refused by its size, not read whole.
#[test]
fn an_unusable_key_exits_2_from_run_and_check_config_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let cases: [(&str, Vec<u8>, &str, &str); 5] = [
        ("garbage", b"hello".to_vec(), "", "not a private key"),
        (
            "an encrypted PEM",
            b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n".to_vec(),
            "",
            "encrypted",
        ),
        (
            "a public key, not a private one",
            b"-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n".to_vec(),
            "",
            "no private key",
        ),
        (
            "a P-256 key with signing_alg RS256",
            std::fs::read(fixture("ec_p256_sec1.pem")).unwrap(),
            "signing_alg = \"RS256\"",
            "does not fit",
        ),
        ("a 64 MiB file", Vec::new(), "", "larger than 1048576 bytes"),
    ];
    for (what, contents, extra, says) in cases {
        std::fs::write(&key, &contents).unwrap();
        if contents.is_empty() {
            // Sparse: costs no disk, and a reader that is not bounded would take it whole.
            std::fs::File::options()
                .write(true)
                .open(&key)
                .unwrap()
                .set_len(64 << 20)
                .unwrap();
        }
        let config = key_config(dir.path(), &key, extra);
        let config = config.to_str().unwrap();
        for command in ["run", "check-config"] {
            let (code, _out, err) = run_bounded(
                &[command, "--config", config],
                &[("RUST_LOG", "info")],
                std::time::Duration::from_secs(20),
            )
            .unwrap_or_else(|| panic!("{what}: {command} kept running"));
            assert_eq!(code, 2, "{what}: {command}:\n{err}");
            assert_eq!(
                err.lines().count(),
                1,
                "{what}: {command}: one line:\n{err}"
            );
            assert!(
                err.starts_with("invalid config: token.private_key_file: "),
                "{what}: {command}:\n{err}"
            );
            assert!(err.contains(says), "{what}: {command}:\n{err}");
        }
    }
}

/// The keys of `config`'s effective TOML whose values are durations, as validation names them.
fn duration_keys(config: &token_sidecar::Config) -> Vec<(String, String)> {
    let effective: toml::Table = toml::from_str(&config.to_redacted_toml()).unwrap();
    let mut keys = Vec::new();
    for (section, value) in &effective {
        let table = match value {
            toml::Value::Table(t) => t,
            toml::Value::Array(a) => a[0].as_table().unwrap(),
            _ => continue,
        };
        for (k, v) in table {
            if v.as_str()
                .is_some_and(|s| humantime::parse_duration(s).is_ok())
            {
                keys.push((section.clone(), k.clone()));
            }
        }
    }
    keys
}

/// docs/spec.md §4: every duration has an upper bound. Set to u64::MAX seconds (which parses,
/// and used to overflow `Instant + Duration` in the running process), each duration key makes
/// `check-config` exit 2 with the key named.
#[test]
fn a_huge_duration_in_any_key_makes_check_config_exit_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = fixture("ec_p256_sec1.pem");
    let base_path = key_config(dir.path(), &key, "");
    let base_text = std::fs::read_to_string(&base_path).unwrap();
    let base = token_sidecar::from_toml_str(&base_text).unwrap();
    let keys = duration_keys(&base);
    assert!(keys.len() >= 16, "too few duration keys found: {keys:?}");
    let bad = dir.path().join("bad.toml");
    for (section, k) in keys {
        let mut table: toml::Table = toml::from_str(&base_text).unwrap();
        // A section the base leaves out (all its keys defaulted) is written when set.
        let target = match table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Array(a) => a[0].as_table_mut().unwrap(),
            other => other.as_table_mut().unwrap(),
        };
        target.insert(k.clone(), "18446744073709551615s".into());
        std::fs::write(&bad, toml::to_string(&table).unwrap()).unwrap();
        let named = match section.as_str() {
            "route" => format!("route[0].{k}"),
            s => format!("{s}.{k}"),
        };
        let (code, _out, err) = check_config(&bad, &[]);
        assert_eq!(code, 2, "{named}:\n{err}");
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("invalid config: {named}: must be at most"))),
            "{named}:\n{err}"
        );
    }
}

/// A token endpoint that fails every request at the transport level: connections alternately
/// get a response cut off mid-body and are closed without an answer. Both surface as reqwest
/// errors, whose `Display` carries the full request URL. Returns its port and a connection count.
async fn broken_token_endpoint() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // Take the request (head and form body) until the client pauses, bounded.
                let mut buf = [0u8; 16384];
                for _ in 0..64 {
                    match tokio::time::timeout(
                        std::time::Duration::from_millis(100),
                        stream.read(&mut buf),
                    )
                    .await
                    {
                        Ok(Ok(n)) if n > 0 => continue,
                        _ => break,
                    }
                }
                if n.is_multiple_of(2) {
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                              Content-Length: 100\r\n\r\n{\"access",
                        )
                        .await;
                }
            });
        }
    });
    (port, seen)
}

/// docs/spec.md §6: a URL is never shown with its user info or query. A token_url whose query
/// holds an API key, against an endpoint that fails at the transport level (reqwest's errors
/// embed the full URL): the key appears in no log line (trace level), no /readyz body and no
/// 503 body, while the redacted URL still tells the operator which endpoint failed. A token_url
/// with user info is refused by check-config without echoing the password; one with a query
/// is printed with the query redacted.
#[tokio::test]
async fn a_token_url_query_or_user_info_is_never_shown() {
    use crate::support::process::free_port;
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().unwrap();
    let (port, seen) = broken_token_endpoint().await;
    let (proxy, admin) = (free_port(), free_port());
    let config = dir.path().join("sidecar.toml");
    let write_config = |token_url: &str| {
        std::fs::write(
            &config,
            format!(
                r#"
[proxy]
listen = "127.0.0.1:{proxy}"
[admin]
listen = "127.0.0.1:{admin}"
[token]
token_url = "{token_url}"
allow_insecure_token_url = true
client_id = "svc"
private_key_file = {key:?}
request_timeout = "2s"
retry_backoff_initial = "50ms"
retry_backoff_max = "200ms"
[[route]]
name = "orders"
path_prefix = "/orders/"
upstream = "http://127.0.0.1:1"
allow_insecure_upstream = true
"#,
                key = fixture("ec_p256_sec1.pem").display().to_string()
            ),
        )
        .unwrap()
    };
    let shown = format!("127.0.0.1:{port}/token");

    // check-config: user info refused, without echoing it; a query printed redacted.
    write_config(&format!("http://user:hunter2pass@127.0.0.1:{port}/token"));
    let (code, out, err) = check_config(&config, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("token.token_url"), "{err}");
    assert!(!format!("{out}{err}").contains("hunter2pass"), "{out}{err}");
    write_config(&format!("http://127.0.0.1:{port}/token?api_key=SECRET"));
    let (code, out, err) = check_config(&config, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!format!("{out}{err}").contains("SECRET"), "{out}{err}");
    assert!(out.contains(&shown), "{out}");

    // run, at trace level, against the failing endpoint.
    let log_path = dir.path().join("stderr.log");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"));
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .env("RUST_LOG", "trace")
        .kill_on_drop(true);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("SIDECAR_") || k.to_ascii_lowercase().ends_with("_proxy") {
            cmd.env_remove(&k);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let client = crate::support::http_client();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // /readyz until the endpoint has failed both ways a few times and a reason names it.
    let mut readyz = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        assert!(child.try_wait().unwrap().is_none(), "exited:\n{}", log());
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
        {
            assert_eq!(r.status(), 503);
            readyz.push(r.text().await.unwrap());
        }
        // The closed connection's error is the one that names the URL.
        if seen.load(Ordering::SeqCst) >= 6 && readyz.iter().any(|r| r.contains(&shown)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "endpoint saw {} requests; /readyz: {readyz:?}\n{}",
            seen.load(Ordering::SeqCst),
            log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let resp = client
        .get(format!("http://127.0.0.1:{proxy}/orders/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body = resp.text().await.unwrap();
    child.start_kill().unwrap();
    let _ = child.wait().await;
    let log = log();

    assert!(
        log.contains("unreachable"),
        "the failures are logged:\n{log}"
    );
    assert!(
        log.contains(&shown),
        "the failures name the endpoint:\n{log}"
    );
    for (what, text) in [("/readyz", readyz.join("\n")), ("503", body), ("log", log)] {
        for secret in ["SECRET", "api_key"] {
            assert!(!text.contains(secret), "{what} shows {secret}:\n{text}");
        }
    }
}
