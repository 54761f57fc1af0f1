//! The edge daemon's configuration: a TOML file with `FHECAM_`-prefixed environment
//! overrides (`FHECAM_MQTT__HOST=broker` sets `mqtt.host`). Unknown fields are errors, so a
//! typo never silently falls back to a default.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("configuration {path}: {msg}")]
    Load { path: String, msg: String },
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Top level of `edge.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// This device's id: the second level of every topic (A-Z a-z 0-9 . _ : -).
    pub device_id: String,
    /// This camera's id on the device: the third level of every topic.
    #[serde(default = "default_camera_id")]
    pub camera_id: String,
    /// The signed deployment bundle (`fhecam deploy`).
    pub bundle: PathBuf,
    /// The owner's public key (`owner.pub`): bundles signed by anyone else are refused.
    pub owner_key: PathBuf,
    #[serde(default)]
    pub source: SourceConfig,
    #[serde(default)]
    pub preprocess: PreprocessConfig,
    #[serde(default)]
    pub infer: InferConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
}

/// Where frames come from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// A gst-launch pipeline ending in an `appsink` (any name). fhecam sets the appsink to
    /// keep only the newest frame and to accept GRAY8 or BGR; put a `videoconvert` before it.
    pub pipeline: String,
    /// Process every frame, pausing the pipeline while inference is busy (for recorded
    /// files). Default false: a live camera keeps only its newest frame and the frames that
    /// arrive while busy are dropped and counted.
    pub every_frame: bool,
    /// A camera that delivers no frame for this long is restarted.
    pub stall_timeout_s: f64,
    /// First restart delay; doubled on each consecutive failure (with ±25 % jitter).
    pub restart_backoff_initial_s: f64,
    /// Largest restart delay.
    pub restart_backoff_max_s: f64,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            pipeline: "v4l2src device=/dev/video0 ! videoconvert ! appsink".into(),
            every_frame: false,
            stall_timeout_s: 10.0,
            restart_backoff_initial_s: 1.0,
            restart_backoff_max_s: 60.0,
        }
    }
}

/// Which frames are worth an encrypted inference.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessConfig {
    /// Take at most one frame per interval (0 = every frame the pipeline delivers).
    pub sample_interval_s: f64,
    /// Motion gate: skip a frame whose mean absolute difference from the last frame sent
    /// to inference (both as model input intensities in [0, 1]) is below this. 0 = off.
    pub motion_threshold: f64,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        PreprocessConfig {
            sample_interval_s: 0.0,
            motion_threshold: 0.0,
        }
    }
}

/// The encrypted CNN.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferConfig {
    /// Frames evaluated at the same time; frames arriving while all are busy are dropped
    /// and counted (`frames_dropped_busy`).
    pub max_in_flight: usize,
    /// FHE worker threads (0 = one per core). They are fhecam's own, never tokio's.
    pub threads: usize,
    /// On shutdown, how long in-flight inferences may still run before they are abandoned
    /// (nothing published is lost: finished results are already in the outbox).
    pub drain_timeout_s: f64,
}

impl Default for InferConfig {
    fn default() -> Self {
        InferConfig {
            max_in_flight: 1,
            threads: 0,
            drain_timeout_s: 120.0,
        }
    }
}

/// The MQTT broker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Client id; must be stable across restarts for the persistent session
    /// (default `fhecam-<device_id>-<camera_id>`).
    pub client_id: Option<String>,
    /// First topic level.
    pub topic_prefix: String,
    pub keep_alive_s: u64,
    /// First reconnect delay after a lost connection; doubled per failure, ±25 % jitter.
    pub reconnect_backoff_initial_s: f64,
    pub reconnect_backoff_max_s: f64,
    /// How often counters are published on `<prefix>/<device>/<camera>/stats`.
    pub stats_interval_s: f64,
    pub username: Option<String>,
    /// Password; prefer the `FHECAM_MQTT__PASSWORD` environment variable to the file.
    pub password: Option<String>,
    /// TLS (rustls) when set.
    pub tls: Option<TlsConfig>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "localhost".into(),
            port: 1883,
            client_id: None,
            topic_prefix: "fhecam".into(),
            keep_alive_s: 30,
            reconnect_backoff_initial_s: 0.5,
            reconnect_backoff_max_s: 30.0,
            stats_interval_s: 60.0,
            username: None,
            password: None,
            tls: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA that signed the broker's certificate.
    pub ca: PathBuf,
    /// PEM client certificate and key, for brokers that authenticate devices by certificate.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// The on-disk queue of encrypted inferences not yet acknowledged by the broker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Directory (systemd: the service's StateDirectory).
    pub dir: PathBuf,
    /// When full, the oldest entries are dropped and counted (`outbox_dropped`).
    pub max_entries: usize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            dir: "/var/lib/fhecam/outbox".into(),
            max_entries: 10_000,
        }
    }
}

/// Top-level fields, so that other `FHECAM_*` variables (the owner's passphrase, the
/// data directory) are not mistaken for unknown configuration fields.
const FIELDS: &[&str] = &[
    "device_id",
    "camera_id",
    "bundle",
    "owner_key",
    "source",
    "preprocess",
    "infer",
    "mqtt",
    "outbox",
];

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

fn default_camera_id() -> String {
    "cam0".into()
}

impl EdgeConfig {
    /// Reads `path` (TOML) with `FHECAM_*` environment overrides and checks it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let load_err = |e: config::ConfigError| ConfigError::Load {
            path: path.display().to_string(),
            msg: e.to_string(),
        };
        let cfg: EdgeConfig = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("FHECAM")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env_overrides(std::env::vars(), FIELDS))),
            )
            .build()
            .map_err(load_err)?
            .try_deserialize()
            .map_err(load_err)?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Value checks serde cannot express.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        crate::envelope::check_id("device_id", &self.device_id)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        crate::envelope::check_id("camera_id", &self.camera_id)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let positive = [
            ("source.stall_timeout_s", self.source.stall_timeout_s),
            (
                "source.restart_backoff_initial_s",
                self.source.restart_backoff_initial_s,
            ),
            (
                "source.restart_backoff_max_s",
                self.source.restart_backoff_max_s,
            ),
            (
                "mqtt.reconnect_backoff_initial_s",
                self.mqtt.reconnect_backoff_initial_s,
            ),
            (
                "mqtt.reconnect_backoff_max_s",
                self.mqtt.reconnect_backoff_max_s,
            ),
            ("mqtt.stats_interval_s", self.mqtt.stats_interval_s),
        ];
        for (name, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!(
                    "{name} must be a positive number of seconds, got {v}"
                ));
            }
        }
        let non_negative = [
            (
                "preprocess.sample_interval_s",
                self.preprocess.sample_interval_s,
            ),
            (
                "preprocess.motion_threshold",
                self.preprocess.motion_threshold,
            ),
            ("infer.drain_timeout_s", self.infer.drain_timeout_s),
        ];
        for (name, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} must be ≥ 0, got {v}"));
            }
        }
        if self.infer.max_in_flight == 0 {
            return bad("infer.max_in_flight must be at least 1".into());
        }
        if self.outbox.max_entries == 0 {
            return bad("outbox.max_entries must be at least 1".into());
        }
        if self.mqtt.host.is_empty() {
            return bad("mqtt.host is empty".into());
        }
        if self.mqtt.keep_alive_s < 5 {
            return bad("mqtt.keep_alive_s must be at least 5".into());
        }
        if !self.source.pipeline.contains("appsink") {
            return bad(format!(
                "source.pipeline must end in an appsink, got {:?}",
                self.source.pipeline
            ));
        }
        crate::envelope::check_id("mqtt.topic_prefix", &self.mqtt.topic_prefix)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(t) = &self.mqtt.tls {
            if t.client_cert.is_some() != t.client_key.is_some() {
                return bad("mqtt.tls: client_cert and client_key go together".into());
            }
        }
        Ok(())
    }

    pub fn client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("fhecam-{}-{}", self.device_id, self.camera_id))
    }

    pub fn topic(&self, leaf: &str) -> String {
        format!(
            "{}/{}/{}/{leaf}",
            self.mqtt.topic_prefix, self.device_id, self.camera_id
        )
    }
}

pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("edge.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    const MINIMAL: &str =
        "device_id = \"dev1\"\nbundle = \"m.bundle\"\nowner_key = \"owner.pub\"\n";

    #[test]
    fn minimal_file_gets_defaults() {
        let d = tempfile::tempdir().unwrap();
        let c = EdgeConfig::load(&write(d.path(), MINIMAL)).unwrap();
        assert_eq!(c.camera_id, "cam0");
        assert_eq!(c.infer.max_in_flight, 1);
        assert_eq!(c.topic("inference"), "fhecam/dev1/cam0/inference");
        assert_eq!(c.client_id(), "fhecam-dev1-cam0");
    }

    #[test]
    fn only_variables_naming_a_field_override() {
        let vars = [
            ("FHECAM_MQTT__HOST", "b"),
            ("FHECAM_OWNER_PASSPHRASE", "secret"),
            ("FHECAM_DEVICE_ID", "d"),
            ("OTHER", "x"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let mut got: Vec<_> = env_overrides(vars.into_iter(), FIELDS)
            .into_keys()
            .collect();
        got.sort();
        assert_eq!(got, vec!["FHECAM_DEVICE_ID", "FHECAM_MQTT__HOST"]);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = EdgeConfig::load(&write(
            d.path(),
            &format!("{MINIMAL}[mqtt]\nhots = \"x\"\n"),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("hots"), "{e}");
        let e = EdgeConfig::load(&write(
            d.path(),
            &format!("{MINIMAL}[infer]\nmax_in_flight = 0\n"),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("max_in_flight"), "{e}");
        let e = EdgeConfig::load(&write(
            d.path(),
            "device_id = \"a b\"\nbundle = \"x\"\nowner_key = \"y\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("device_id"), "{e}");
    }
}
