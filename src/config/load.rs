//! Loading: which file, and the layers a configuration is built from.
//!
//! Every command builds its configuration the same way: built-in defaults (the schema's serde
//! defaults, see `defaults.rs`) < a base layer < `SIDECAR_<SECTION>__<KEY>` environment
//! variables, deserialized strictly (unknown keys are errors). The base is the TOML file, or for
//! `dev` without one its built-in echo config. Command-line flags, where a command has them, are
//! applied on top by the command.
//!
//! Invariant: nothing here validates beyond what serde expresses except [`load`] and
//! [`from_toml_str`], which call [`Config::validate`]; [`layered`] returns an unvalidated config
//! for a caller (`dev`) that replaces parts of it first and must validate it afterwards.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};

use super::{Config, ConfigError, Problem};

/// Where the config file is looked for when neither `--config` nor `SIDECAR_CONFIG` names one.
pub(crate) const DEFAULT_CONFIG_PATH: &str = "sidecar.toml";

/// Which file to read: `--config`, else `SIDECAR_CONFIG`, else `./sidecar.toml`.
pub(crate) fn resolve_path(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    match std::env::var_os("SIDECAR_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

/// The layer the environment is applied over.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Base<'a> {
    /// A TOML file; it must exist.
    File(&'a Path),
    /// TOML text built into the binary.
    #[cfg_attr(not(feature = "dev"), allow(dead_code))]
    Builtin(&'a str),
}

/// Defaults < `base` < the process environment, deserialized strictly but not validated.
pub(crate) fn layered(base: Base<'_>) -> Result<Config, ConfigError> {
    let figment = match base {
        Base::File(path) => {
            if !path.exists() {
                return Err(ConfigError::single(
                    "config",
                    format!(
                        "file {} not found (pass --config PATH or set SIDECAR_CONFIG)",
                        path.display()
                    ),
                ));
            }
            Figment::new().merge(Toml::file_exact(path))
        }
        Base::Builtin(text) => Figment::new().merge(Toml::string(text)),
    };
    extract(figment.merge(env()))
}

/// Loads and validates the configuration from `path` and the process environment.
pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
    let config = layered(Base::File(path))?;
    config.validate()?;
    Ok(config)
}

/// `SIDECAR_<SECTION>__<KEY>` variables. Only names with the `__` separator are config keys:
/// Kubernetes injects `<SERVICE>_PORT`, `<SERVICE>_SERVICE_HOST`, … for every Service in the
/// namespace, so a Service called `sidecar…` must not become an unknown config key that stops
/// every pod. `SIDECAR_CONFIG` (the file's path) has no separator either.
fn env() -> Env {
    Env::prefixed("SIDECAR_")
        .filter(|k| k.as_str().contains("__"))
        .split("__")
}

/// Parses and validates configuration text (no environment), for tests and embedders.
pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
    let config = parse_unvalidated(text)?;
    config.validate()?;
    Ok(config)
}

/// Defaults < `text`, no environment, not validated.
pub(crate) fn parse_unvalidated(text: &str) -> Result<Config, ConfigError> {
    extract(Figment::new().merge(Toml::string(text)))
}

fn extract(figment: Figment) -> Result<Config, ConfigError> {
    figment.extract().map_err(figment_problems)
}

fn figment_problems(err: figment::Error) -> ConfigError {
    let problems = err
        .into_iter()
        .map(|e| {
            let key = match e.path.join(".") {
                k if k.is_empty() => "config".to_string(),
                k => k,
            };
            // figment's Display repeats the key and the source; the kind alone reads best after the key.
            let mut message = e.kind.to_string();
            if let Some(src) = e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                message.push_str(&format!(" (from {src})"));
            }
            Problem { key, message }
        })
        .collect();
    ConfigError { problems }
}

#[cfg(test)]
mod tests {
    use super::super::MINIMAL;
    use super::*;

    #[test]
    fn unknown_keys_and_bad_durations_name_the_key() {
        let err = from_toml_str(&format!(
            "{MINIMAL}\n[log]\nformat = \"text\"\ncolour = true\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("log"), "{err}");
        assert!(err.to_string().contains("colour"), "{err}");

        let text = MINIMAL.replace("[token]", "[token]\nrequest_timeout = \"ten seconds\"");
        let err = from_toml_str(&text).unwrap_err();
        assert_eq!(err.problems[0].key, "token.request_timeout", "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn only_section_separated_env_vars_are_config() {
        figment::Jail::expect_with(|jail| {
            let dir = jail.directory().to_path_buf();
            std::fs::write(dir.join("s.toml"), MINIMAL).unwrap();
            // What Kubernetes injects for a Service named "sidecar": not config, not an error.
            jail.set_env("SIDECAR_PORT", "tcp://10.0.0.1:80");
            jail.set_env("SIDECAR_SERVICE_HOST", "10.0.0.1");
            jail.set_env("SIDECAR_CONFIG", dir.join("s.toml").display().to_string());
            jail.set_env("SIDECAR_TOKEN__CLIENT_ID", "from-env");
            let c = load(&dir.join("s.toml")).map_err(|e| e.to_string())?;
            assert_eq!(c.token.client_id, "from-env");
            jail.set_env("SIDECAR_TOKEN__NOPE", "1");
            let err = load(&dir.join("s.toml")).unwrap_err();
            assert!(err.to_string().contains("nope"), "{err}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn a_builtin_base_gets_the_same_env_layer_and_is_not_validated() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SIDECAR_PROXY__LISTEN", "127.0.0.1:18080");
            // No route and no key: invalid, but `layered` leaves validation to its caller.
            let base = "[token]\ntoken_url = \"http://x\"\nclient_id = \"c\"\n";
            let c = layered(Base::Builtin(base)).map_err(|e| e.to_string())?;
            assert_eq!(c.proxy.listen, "127.0.0.1:18080".parse().unwrap());
            assert!(c.validate().is_err());
            jail.set_env("SIDECAR_PROXY__LISTENN", "1");
            let err = layered(Base::Builtin(base)).unwrap_err();
            assert!(err.to_string().contains("listenn"), "{err}");
            Ok(())
        });
    }
}
