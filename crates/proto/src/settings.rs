//! What the edge's and the agent's configuration files share: loading TOML with
//! `FHECAM_*` environment overrides of their sections, and the error that names the file.

use serde::de::DeserializeOwned;
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("configuration {path}: {msg}")]
    Load { path: String, msg: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

/// A configuration file of fhecam's (edge, agent, cockpit): loaded with environment
/// overrides of its sections, then every field bounded before anything uses it.
pub trait Settings: DeserializeOwned {
    /// The top-level sections that `FHECAM_<SECTION>__<KEY>` variables may override.
    const FIELDS: &'static [&'static str];

    /// Value checks serde cannot express: every field is bounded (the message names it),
    /// so no value that passes can panic or misbehave where it is used.
    fn check_fields(&self) -> Result<(), String>;

    /// Reads `path` (TOML) with `FHECAM_*` environment overrides and checks it.
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = load(path, Self::FIELDS)?;
        cfg.check()?;
        Ok(cfg)
    }

    /// [`Settings::check_fields`] as the configuration error the commands report.
    fn check(&self) -> Result<(), ConfigError> {
        self.check_fields().map_err(ConfigError::Invalid)
    }
}

/// Reads `path` (TOML) with `FHECAM_<FIELD>__<KEY>` environment overrides of the top-level
/// `fields` (other `FHECAM_*` variables, such as the owner's passphrase, are not config).
/// Values from the environment are parsed as numbers or booleans where they look like one.
pub fn load<T: DeserializeOwned>(path: &Path, fields: &[&str]) -> Result<T, ConfigError> {
    let err = |e: config::ConfigError| ConfigError::Load {
        path: path.display().to_string(),
        msg: e.to_string(),
    };
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("FHECAM")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(env_overrides(std::env::vars(), fields))),
        )
        .build()
        .map_err(err)?
        .try_deserialize()
        .map_err(err)
}

/// The `FHECAM_<FIELD>...` variables that address one of `fields`.
pub fn env_overrides(
    vars: impl Iterator<Item = (String, String)>,
    fields: &[&str],
) -> std::collections::HashMap<String, String> {
    vars.filter(|(k, _)| {
        k.strip_prefix("FHECAM_").is_some_and(|rest| {
            let first = rest.split("__").next().unwrap_or("").to_ascii_lowercase();
            fields.contains(&first.as_str())
        })
    })
    .collect()
}
