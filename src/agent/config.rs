//! The backend agent's configuration (`backend.toml`, `FHECAM_`-prefixed overrides such as
//! `FHECAM_MQTT__HOST`). Unknown fields are errors.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentConfigError {
    #[error("configuration {path}: {msg}")]
    Load { path: String, msg: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The owner's protected-model database (`fhecam protect`): maps a model id to its
    /// architecture and sealed secret key.
    pub db: PathBuf,
    /// File holding the passphrase that unseals the secret keys; default: the
    /// FHECAM_OWNER_PASSPHRASE environment variable.
    #[serde(default)]
    pub passphrase_file: Option<PathBuf>,
    /// The agent's own state (SQLite): which (device, camera, sequence) were already
    /// decrypted, so QoS 1 redelivery is counted once. Created 0600.
    pub state_db: PathBuf,
    #[serde(default)]
    pub mqtt: AgentMqtt,
    #[serde(default)]
    pub limits: Limits,
    /// Model ids (32 hex digits) whose results include the logits; every other model
    /// releases the label only.
    #[serde(default)]
    pub logits_for: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentMqtt {
    pub host: String,
    pub port: u16,
    /// Client id; stable across restarts (persistent session). Default `fhecam-agent-<pid>`
    /// is not stable: set it in production.
    pub client_id: Option<String>,
    /// Shared-subscription group: agents in one group split the inferences between them.
    pub group: String,
    /// First level of the edge topics (`<prefix>/<device>/<camera>/inference`).
    pub edge_prefix: String,
    /// Results go to `<cockpit_prefix>/<device>/<camera>`.
    pub cockpit_prefix: String,
    /// Anything refused is reported here with the reason (never with decrypted data).
    pub dead_letter_topic: String,
    pub keep_alive_s: u64,
    pub reconnect_backoff_initial_s: f64,
    pub reconnect_backoff_max_s: f64,
    pub username: Option<String>,
    /// Prefer the FHECAM_MQTT__PASSWORD environment variable.
    pub password: Option<String>,
    /// TLS (rustls) when set.
    pub tls: Option<crate::mqtt::TlsConfig>,
}

impl Default for AgentMqtt {
    fn default() -> Self {
        AgentMqtt {
            host: "localhost".into(),
            port: 1883,
            client_id: None,
            group: "fhecam-agents".into(),
            edge_prefix: "fhecam".into(),
            cockpit_prefix: "cockpit".into(),
            dead_letter_topic: "backend/deadletter".into(),
            keep_alive_s: 30,
            reconnect_backoff_initial_s: 0.5,
            reconnect_backoff_max_s: 30.0,
            username: None,
            password: None,
            tls: None,
        }
    }
}

/// Closing the decryption oracle: what the agent accepts before it decrypts anything.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest payload accepted (bytes); default: the largest valid envelope.
    pub max_payload_bytes: usize,
    /// Sustained decryptions per device per minute.
    pub per_device_per_minute: f64,
    /// Burst allowance per device.
    pub burst: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: crate::envelope::MAX_ENVELOPE_BYTES,
            per_device_per_minute: 60.0,
            burst: 10.0,
        }
    }
}

const FIELDS: &[&str] = &[
    "db",
    "passphrase_file",
    "state_db",
    "mqtt",
    "limits",
    "logits_for",
];

impl AgentConfig {
    pub fn new(db: PathBuf, state_db: PathBuf) -> Self {
        AgentConfig {
            db,
            passphrase_file: None,
            state_db,
            mqtt: AgentMqtt::default(),
            limits: Limits::default(),
            logits_for: Vec::new(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, AgentConfigError> {
        let err = |e: config::ConfigError| AgentConfigError::Load {
            path: path.display().to_string(),
            msg: e.to_string(),
        };
        let cfg: AgentConfig = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("FHECAM")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(crate::edge::config::env_overrides(
                        std::env::vars(),
                        FIELDS,
                    ))),
            )
            .build()
            .map_err(err)?
            .try_deserialize()
            .map_err(err)?;
        cfg.check()?;
        Ok(cfg)
    }

    pub fn check(&self) -> Result<(), AgentConfigError> {
        let bad = |m: String| Err(AgentConfigError::Invalid(m));
        let l = &self.limits;
        if !(l.per_device_per_minute.is_finite() && l.per_device_per_minute > 0.0) {
            return bad("limits.per_device_per_minute must be positive".into());
        }
        if !(l.burst.is_finite() && l.burst >= 1.0) {
            return bad("limits.burst must be at least 1".into());
        }
        if l.max_payload_bytes == 0 || l.max_payload_bytes > crate::envelope::MAX_ENVELOPE_BYTES {
            return bad(format!(
                "limits.max_payload_bytes must be 1..={}",
                crate::envelope::MAX_ENVELOPE_BYTES
            ));
        }
        for id in &self.logits_for {
            id.parse::<crate::ids::ModelId>()
                .map_err(|e| AgentConfigError::Invalid(format!("logits_for: {e}")))?;
        }
        let m = &self.mqtt;
        for (name, v) in [
            ("mqtt.group", &m.group),
            ("mqtt.edge_prefix", &m.edge_prefix),
            ("mqtt.cockpit_prefix", &m.cockpit_prefix),
        ] {
            crate::envelope::check_id(name, v)
                .map_err(|e| AgentConfigError::Invalid(e.to_string()))?;
        }
        if m.dead_letter_topic.is_empty()
            || m.dead_letter_topic.contains(['+', '#'])
            || m.dead_letter_topic
                .starts_with(&format!("{}/", m.edge_prefix))
        {
            return bad(format!(
                "mqtt.dead_letter_topic {:?} must be a plain topic outside the edge prefix {:?}",
                m.dead_letter_topic, m.edge_prefix
            ));
        }
        if m.cockpit_prefix == m.edge_prefix {
            return bad("mqtt.cockpit_prefix must differ from mqtt.edge_prefix: results never go to edge topics".into());
        }
        if m.keep_alive_s < 5 {
            return bad("mqtt.keep_alive_s must be at least 5".into());
        }
        if !(m.reconnect_backoff_initial_s > 0.0 && m.reconnect_backoff_max_s > 0.0) {
            return bad("mqtt reconnect backoffs must be positive".into());
        }
        Ok(())
    }

    pub fn client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("fhecam-agent-{}", self.mqtt.group))
    }

    /// `$share/<group>/<prefix>/+/+/inference`
    pub fn subscription(&self) -> String {
        format!(
            "$share/{}/{}/+/+/inference",
            self.mqtt.group, self.mqtt.edge_prefix
        )
    }
}
