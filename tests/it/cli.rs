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
