//! `token-sidecar dev` builds its configuration like every other command: defaults < the
//! built-in echo config or the user's file < `SIDECAR_*` < flags; it replaces only what cannot
//! work locally, says so, and still refuses a genuinely broken config with exit status 2.
//!
//! Each test runs the real binary on free loopback ports, bounded in time, and kills only the
//! child it started (by its handle, on drop).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use token_sidecar::ECHO_SCOPE;

use crate::support::http_client;
use crate::support::process::{free_port, wait_ready};

/// The repository's own example config, as a newcomer would pass it.
const SHIPPED_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sidecar.toml");

/// A running `token-sidecar dev` child; killed by its own handle when dropped.
struct DevChild {
    child: tokio::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl DevChild {
    /// Starts `token-sidecar <args>` in an empty directory with none of the caller's `SIDECAR_*`
    /// or proxy variables, plus `env`.
    fn spawn(args: &[&str], env: &[(&str, String)]) -> DevChild {
        let dir = tempfile::tempdir().unwrap();
        let stdout = dir.path().join("stdout.log");
        let stderr = dir.path().join("stderr.log");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"));
        cmd.args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&stdout).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&stderr).unwrap()))
            .env("RUST_LOG", "info")
            .kill_on_drop(true);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("SIDECAR_") || k.to_ascii_lowercase().ends_with("_proxy") {
                cmd.env_remove(&k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        DevChild {
            child: cmd.spawn().expect("the token-sidecar binary starts"),
            stdout,
            stderr,
            _dir: dir,
        }
    }

    /// Everything written so far, stdout then stderr.
    fn output(&self) -> String {
        output_of(&self.stdout, &self.stderr)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Polls `http://admin/readyz` until 200; `Err(output)` if the process exits or `within`
    /// passes.
    async fn wait_ready(&mut self, admin: SocketAddr, within: Duration) -> Result<(), String> {
        let (stdout, stderr) = (self.stdout.clone(), self.stderr.clone());
        wait_ready(&mut self.child, admin, within, || {
            output_of(&stdout, &stderr)
        })
        .await
    }

    async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .map(|s| s.expect("wait on the child"))
    }
}

/// What a child wrote to its two files, stdout then stderr.
fn output_of(stdout: &Path, stderr: &Path) -> String {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    format!("{}{}", read(stdout), read(stderr))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts `dev` with `make(proxy, admin)` → (args, env) on fresh free ports until it is ready;
/// retries when another process took a port between the probe and the bind.
async fn start_ready(
    make: impl Fn(SocketAddr, SocketAddr) -> (Vec<String>, Vec<(&'static str, String)>),
) -> (DevChild, SocketAddr, SocketAddr) {
    let mut last = String::new();
    for _ in 0..3 {
        let (proxy, admin) = (loopback(free_port()), loopback(free_port()));
        if proxy == admin {
            continue;
        }
        let (args, env) = make(proxy, admin);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut dev = DevChild::spawn(&args, &env);
        match dev.wait_ready(admin, Duration::from_secs(20)).await {
            Ok(()) => return (dev, proxy, admin),
            Err(log) if log.contains("cannot listen") => last = log,
            Err(log) => panic!("dev did not become ready:\n{log}"),
        }
    }
    panic!("dev could not bind free ports in 3 attempts:\n{last}");
}

/// (a) Without a config, `SIDECAR_PROXY__LISTEN` / `SIDECAR_ADMIN__LISTEN` move the listeners,
/// as they do for `run`: the echo route answers on the port the environment named.
#[tokio::test]
async fn dev_without_a_config_honours_the_environment() {
    let (dev, proxy, _) = start_ready(|proxy, admin| {
        (
            vec!["dev".into()],
            vec![
                ("SIDECAR_PROXY__LISTEN", proxy.to_string()),
                ("SIDECAR_ADMIN__LISTEN", admin.to_string()),
            ],
        )
    })
    .await;
    let resp = http_client()
        .get(format!("http://{proxy}/echo/hello"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("echo on {proxy}: {e}\n{}", dev.output()));
    assert_eq!(resp.status(), 200, "{}", dev.output());
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["path"], "/hello");
    assert_eq!(echo["claims"]["scope"], ECHO_SCOPE, "{echo}");
    assert!(
        dev.output().contains(&format!("http://{proxy}")),
        "the summary names the listener:\n{}",
        dev.output()
    );
}

/// (b) The shipped `sidecar.toml` works in dev mode: its in-pod key path and real token endpoint
/// are replaced (one line each), its route stays, and `/readyz` turns 200, i.e. the route's
/// token (scopes orders:read orders:write, audience https://orders.example.com) was issued by
/// the development server. The route's upstream is a real host the test does not call. The
/// proxy listener comes from the flag, the admin one from the environment.
#[tokio::test]
async fn dev_with_the_shipped_config_replaces_the_key_and_token_endpoint_and_gets_ready() {
    let (dev, _, admin) = start_ready(|proxy, admin| {
        (
            vec![
                "dev".into(),
                "--config".into(),
                SHIPPED_CONFIG.into(),
                "--listen".into(),
                proxy.to_string(),
            ],
            vec![("SIDECAR_ADMIN__LISTEN", admin.to_string())],
        )
    })
    .await;
    let err = dev.stderr();
    assert!(
        err.contains("dev: token.token_url replaced by http://127.0.0.1:"),
        "{err}"
    );
    assert!(
        err.contains(
            "dev: token.private_key_file /var/run/secrets/token-sidecar/key.pem not readable; \
             using a throwaway ES256 key"
        ),
        "{err}"
    );
    let replaced: Vec<&str> = err.lines().filter(|l| l.starts_with("dev: ")).collect();
    assert_eq!(replaced.len(), 2, "only the key and endpoint: {replaced:?}");
    let ready: serde_json::Value = http_client()
        .get(format!("http://{admin}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
}

/// (c) Dev replaces the key and the token CA file but nothing else: a genuine mistake elsewhere
/// stops it with status 2 and one line per problem naming its key, and the settings dev replaces
/// are not reported.
#[tokio::test]
async fn dev_still_refuses_a_config_broken_outside_what_it_replaces() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broken.toml");
    let text = std::fs::read_to_string(SHIPPED_CONFIG)
        .unwrap()
        .replace(
            "upstream = \"https://orders.example.com\"",
            "upstream = \"http://orders.example.com\"",
        )
        .replace("# max_attempts = 3", "max_attempts = 0")
        .replace(
            "# ca_file = \"/etc/ssl/idp-ca.pem\"",
            "ca_file = \"/nonexistent/idp-ca.pem\"",
        );
    std::fs::write(&config, text).unwrap();
    let mut dev = DevChild::spawn(
        &[
            "dev",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            &loopback(free_port()).to_string(),
            "--admin-listen",
            &loopback(free_port()).to_string(),
        ],
        &[],
    );
    let status = dev
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("dev kept running:\n{}", dev.output()));
    let err = dev.stderr();
    assert_eq!(status.code(), Some(2), "{err}");
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("invalid config: "))
        .collect();
    let keys: Vec<&str> = problems
        .iter()
        .map(|l| l["invalid config: ".len()..].split(':').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["token.max_attempts", "route[0].upstream"],
        "exactly the genuine problems:\n{err}"
    );
}
