//! `token-sidecar dev` and the command-line toolbox (`keygen`, `jwks`, `token`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use token_sidecar::{Dev, DevError, DevOptions, ECHO_AUDIENCE, ECHO_SCOPE};

use crate::support::authz::{AuthzConfig, ClientReg, OidcProvider, ResourceReg};
use crate::support::idp::{ORDERS, fetch_jwks, verify_with_jwks};
use crate::support::upstream::Upstream;
use crate::support::{CLIENT_ID, fixture, http_client};

fn loopback0() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Starts `dev` in-process; returns the proxy address, the JWKS URL and a stopper.
async fn start_dev(
    opts: DevOptions,
) -> (
    SocketAddr,
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let dev = Dev::start(opts).await.expect("dev starts");
    let addr = dev.sidecar.proxy_addr();
    let jwks_url = dev.authz.jwks_url();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (sidecar, rest) = dev.into_parts();
        sidecar
            .run(async {
                let _ = rx.await;
            })
            .await;
        drop(rest);
    });
    (addr, jwks_url, tx, task)
}

#[tokio::test]
async fn dev_with_no_config_echoes_a_valid_token() {
    let (addr, jwks_url, stop, task) = start_dev(DevOptions {
        config: None,
        listen: loopback0(),
        admin_listen: loopback0(),
        federation: None,
    })
    .await;
    let resp = http_client()
        .get(format!("http://{addr}/echo/x?y=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["path"], "/x");
    assert_eq!(echo["query"], "y=1");
    let token = echo["token"]
        .as_str()
        .expect("the echo shows the bearer token");
    let claims = verify_with_jwks(&fetch_jwks(&jwks_url).await, token);
    assert_eq!(claims["scope"], ECHO_SCOPE);
    assert_eq!(claims["aud"], ECHO_AUDIENCE);
    assert_eq!(echo["claims"], claims);
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn dev_with_a_config_keeps_its_routes_and_replaces_the_token_endpoint() {
    let up = Upstream::start().await;
    let toml = format!(
        r#"
[token]
token_url = "https://hydra.example.com/oauth2/token"
client_id = "{CLIENT_ID}"
private_key_file = "{key}"

[[route]]
name = "orders"
path_prefix = "/orders/"
strip_prefix = true
upstream = "{up}"
allow_insecure_upstream = true
scope = ["orders:read"]
audience = ["{ORDERS}"]
"#,
        key = fixture("ec_p256_sec1.pem").display(),
        up = up.url()
    );
    let config = token_sidecar::from_toml_str(&toml).unwrap();
    let (addr, jwks_url, stop, task) = start_dev(DevOptions {
        config: Some(config),
        listen: loopback0(),
        admin_listen: loopback0(),
        federation: None,
    })
    .await;
    let resp = http_client()
        .get(format!("http://{addr}/orders/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let token = up.received()[0].bearer().unwrap();
    let claims = verify_with_jwks(&fetch_jwks(&jwks_url).await, &token);
    assert_eq!(claims["aud"], ORDERS);
    assert_eq!(claims["client_id"], CLIENT_ID);
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test]
async fn dev_refuses_non_loopback_addresses() {
    let err = Dev::start(DevOptions {
        config: None,
        listen: Some("0.0.0.0:0".parse().unwrap()),
        admin_listen: loopback0(),
        federation: None,
    })
    .await
    .err()
    .expect("refused");
    assert!(matches!(err, DevError::NotLoopback { .. }), "{err}");
    assert!(err.to_string().contains("proxy.listen"));

    let out = Command::new(env!("CARGO_BIN_EXE_token-sidecar"))
        .args(["dev", "--listen", "0.0.0.0:18080"])
        .env_remove("SIDECAR_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEVELOPMENT MODE"), "{err}");
    assert!(err.contains("loopback"), "{err}");
}

fn bin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_token-sidecar"))
        .args(args)
        .env_remove("SIDECAR_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_config(dir: &Path, token_url: &str, key: &Path, alg: &str) -> std::path::PathBuf {
    let path = dir.join("sidecar.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[token]
token_url = "{token_url}"
allow_insecure_token_url = true
client_id = "{CLIENT_ID}"
private_key_file = "{key}"
signing_alg = "{alg}"

[[route]]
name = "orders"
path_prefix = "/orders/"
upstream = "https://orders.example.com"
scope = ["orders:read"]
audience = ["{ORDERS}"]
"#,
            key = key.display()
        ),
    )
    .unwrap();
    path
}

/// keygen → jwks round trip for each algorithm family; the printed JWKS registered at
/// oidc-provider lets `token` succeed, and a refused scope makes it fail with the server's code.
#[tokio::test]
async fn keygen_jwks_and_token_round_trip_with_oidc_provider() {
    for alg in ["ES256", "ES384", "RS256", "PS256", "EdDSA"] {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let key_s = key.to_str().unwrap();
        let (code, jwks_out, err) = bin(&["keygen", "--alg", alg, "--out", key_s]);
        assert_eq!(code, 0, "{alg}: {err}");
        if alg == "PS256" {
            // A PEM cannot say which RSA algorithm it is for: keygen says what to configure.
            assert!(err.contains("signing_alg = \"PS256\""), "{err}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{alg}");
        }
        let jwks: serde_json::Value = serde_json::from_str(&jwks_out).unwrap();
        let jwk = &jwks["keys"][0];
        assert_eq!(jwk["alg"], alg);
        assert_eq!(jwk["use"], "sig");
        assert!(jwk["kid"].is_string());
        assert!(jwk.get("d").is_none(), "public members only");

        // Refuses to overwrite without --force.
        let (code, _, err) = bin(&["keygen", "--alg", alg, "--out", key_s]);
        assert_ne!(code, 0);
        assert!(err.contains("exists"), "{err}");

        let idp = OidcProvider::start(&AuthzConfig {
            clients: vec![ClientReg {
                client_id: CLIENT_ID.into(),
                jwks: jwks.clone(),
                scope: "orders:read orders:write".into(),
            }],
            resources: vec![ResourceReg {
                audience: ORDERS.into(),
                scope: "orders:read".into(),
                ttl_secs: 300,
            }],
            default_ttl_secs: 300,
        })
        .await;
        let cfg = write_config(dir.path(), &idp.token_url, &key, alg);
        let cfg_s = cfg.to_str().unwrap();

        let (code, printed, err) = bin(&["jwks", "--config", cfg_s]);
        assert_eq!(code, 0, "{err}");
        let printed: serde_json::Value = serde_json::from_str(&printed).unwrap();
        assert_eq!(printed, jwks, "jwks prints what keygen printed");

        let (code, out, err) = tokio::task::spawn_blocking({
            let cfg_s = cfg_s.to_string();
            move || {
                bin(&[
                    "token",
                    "--config",
                    &cfg_s,
                    "--scope",
                    "orders:read",
                    "--audience",
                    ORDERS,
                ])
            }
        })
        .await
        .unwrap();
        assert_eq!(code, 0, "{alg}: {err}");
        let resp: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(resp["claims"]["aud"], ORDERS);
        assert_eq!(resp["claims"]["scope"], "orders:read");
        assert!(err.is_empty() || !err.contains(resp["access_token"].as_str().unwrap()));

        if alg == "ES256" {
            let (code, _, err) = tokio::task::spawn_blocking({
                let cfg_s = cfg_s.to_string();
                move || {
                    bin(&[
                        "token",
                        "--config",
                        &cfg_s,
                        "--scope",
                        "orders:write",
                        "--audience",
                        ORDERS,
                    ])
                }
            })
            .await
            .unwrap();
            assert_eq!(code, 1);
            assert!(err.contains("invalid_scope"), "{err}");
        }
    }
}
