//! The real `token-sidecar` binary as a child process: a config file in a temporary directory,
//! loopback listeners on free ports, stderr captured to a file, signals sent by PID.
//!
//! Every process started here is killed (SIGKILL, by its own PID) when its handle is dropped, so
//! a failing test never leaves one behind.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::time::Instant;

/// A free loopback port: bound to port 0, then released. Another process could take it before
/// the sidecar binds it; [`SidecarProcess::start`] retries with new ports when that happens.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `http://{admin}/readyz` until it answers 200 (each poll bounded at 2 s); `Err` with
/// `output()` if `child` exits first or `within` passes.
pub async fn wait_ready(
    child: &mut tokio::process::Child,
    admin: SocketAddr,
    within: Duration,
    output: impl Fn() -> String,
) -> Result<(), String> {
    let client = super::http_client();
    let url = format!("http://{admin}/readyz");
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited with {status}\n{}", output()));
        }
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_secs(2), client.get(&url).send()).await
            && r.status() == 200
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "/readyz on {admin} not 200 within {within:?}\n{}",
                output()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running `token-sidecar` child process.
pub struct SidecarProcess {
    child: tokio::process::Child,
    pid: u32,
    /// The main listener.
    pub proxy: SocketAddr,
    /// The admin listener (`/healthz`, `/readyz`).
    pub admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl SidecarProcess {
    /// Starts the binary with the config `make_config(proxy, admin)` and waits (bounded) until
    /// `/readyz` answers 200. The config must listen on the two addresses it is given.
    pub async fn start(make_config: impl Fn(SocketAddr, SocketAddr) -> String) -> SidecarProcess {
        let mut last_log = String::new();
        for _ in 0..3 {
            let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
            if proxy == admin {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join("sidecar.toml");
            std::fs::write(&config, make_config(proxy, admin)).unwrap();
            let log = dir.path().join("stderr.log");
            let stderr = std::fs::File::create(&log).unwrap();

            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_token-sidecar"));
            cmd.arg("--config")
                .arg(&config)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(stderr))
                .env("RUST_LOG", "info")
                .kill_on_drop(true);
            // Nothing from the developer's environment may change the config or route the
            // sidecar's own requests through a proxy.
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy().into_owned();
                if k.starts_with("SIDECAR_") || k.to_ascii_lowercase().ends_with("_proxy") {
                    cmd.env_remove(&k);
                }
            }
            let child = cmd.spawn().expect("the token-sidecar binary starts");
            let pid = child.id().expect("a running child has a pid");
            let mut p = SidecarProcess {
                child,
                pid,
                proxy,
                admin,
                log,
                _dir: dir,
            };
            match p.wait_ready(Duration::from_secs(15)).await {
                Ok(()) => return p,
                Err(log) if log.contains("cannot listen") => {
                    // Someone took one of the ports between our probe and the bind: try others.
                    last_log = log;
                    continue;
                }
                Err(log) => panic!("token-sidecar did not become ready:\n{log}"),
            }
        }
        panic!("token-sidecar could not bind free ports in 3 attempts:\n{last_log}");
    }

    /// Polls `/readyz` until 200; `Err(stderr)` if the process exits or `within` passes.
    async fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let admin = self.admin;
        let log = self.log.clone();
        wait_ready(&mut self.child, admin, within, || {
            std::fs::read_to_string(&log).unwrap_or_default()
        })
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    /// The child's PID (to read its `/proc/PID/status`).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` ("TERM", "INT", …) to this process only, by its PID.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg("-s")
            .arg(signal)
            .arg(self.pid.to_string())
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -s {signal} {} failed", self.pid);
    }

    /// The exit status if the process ends within `within`; `None` if it is still running.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => Some(status.expect("wait on the child")),
            Err(_) => None,
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
