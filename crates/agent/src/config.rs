//! The backend agent's configuration (`backend.toml`, `FHECAM_`-prefixed overrides such as
//! `FHECAM_MQTT__HOST`). Unknown fields are errors.

pub use fhecam_proto::settings::Settings;
use fhecam_proto::wire;
use serde::Deserialize;
use std::path::PathBuf;

/// The agent's configuration errors are the edge's: [`fhecam_proto::settings::ConfigError`].
pub type AgentConfigError = fhecam_proto::settings::ConfigError;

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
    /// `[metrics]`: a Prometheus `/metrics` endpoint (e.g. `listen = "127.0.0.1:9465"`).
    /// Absent: none.
    #[serde(default)]
    pub metrics: Option<fhecam_metrics::MetricsConfig>,
}

/// `[mqtt]`: the broker connection (shared with the edge:
/// [`fhecam_proto::mqtt::Connection`]) and the agent's group and topics.
pub type AgentMqtt = fhecam_proto::mqtt::Section<AgentTopics>;

/// The agent's own fields of `[mqtt]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentTopics {
    /// The agents' group (an id: 1..=64 of A-Z a-z 0-9 . _ : -): part of the default client
    /// id, and with `shared = true` the shared-subscription group.
    pub group: String,
    /// false (default): one agent, a plain subscription `<edge_prefix>/+/+/inference`.
    /// true: the agents of `group` split the inferences (`$share/<group>/...`); needed to
    /// run more than one agent. mosquitto 2.0.11 (Debian 12) does not restore shared
    /// subscriptions when it restarts: inferences published between a broker restart and
    /// the agents' reconnection are dropped by the broker (docs/THREAT_MODEL.md).
    pub shared: bool,
    /// First level of the edge topics (`<prefix>/<device>/<camera>/inference`); an id.
    pub edge_prefix: String,
    /// Results go to `<cockpit_prefix>/<device>/<camera>`; an id, not `edge_prefix`.
    pub cockpit_prefix: String,
    /// Anything refused is reported here with the reason (never with decrypted data). A
    /// plain topic of 1..=1024 bytes: no wildcard, no NUL, no `$` topic, outside the edge
    /// and cockpit prefixes.
    pub dead_letter_topic: String,
}

impl Default for AgentTopics {
    fn default() -> Self {
        AgentTopics {
            group: "fhecam-agents".into(),
            shared: false,
            edge_prefix: wire::DEFAULT_EDGE_PREFIX.into(),
            cockpit_prefix: wire::DEFAULT_COCKPIT_PREFIX.into(),
            dead_letter_topic: wire::DEFAULT_DEAD_LETTER_TOPIC.into(),
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
    /// Most inferences the agent holds unacknowledged in memory (waiting for a rate-limit
    /// token, being decrypted, or their result waiting for the broker), whatever the broker
    /// sends; one device holds at most half of them. What arrives beyond is dropped unread
    /// and unacknowledged: the broker redelivers it when the agent reconnects.
    pub max_held: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: fhecam_proto::wire::envelope::MAX_ENVELOPE_BYTES,
            per_device_per_minute: 60.0,
            burst: 10.0,
            max_held: 64,
        }
    }
}

/// Largest rate and burst per device: beyond, the limiter limits nothing.
pub const MAX_RATE: f64 = 1e6;
/// Largest `limits.max_held`: each held inference costs up to about twice
/// `max_payload_bytes`.
pub const MAX_HELD: usize = 4096;
/// Entries of `logits_for`.
pub const MAX_LOGITS_FOR: usize = 10_000;
/// `fhecam-agent-` and the `-` before the group.
const DEFAULT_ID_FIXED: usize = "fhecam-agent--".len();
/// Hex digits of the default client id's random suffix (64 bits: not guessable by a
/// neighbour that knows the host name and group).
pub const CLIENT_ID_SUFFIX_HEX: usize = 16;

/// This machine's host name (`/proc/sys/kernel/hostname`), or `localhost`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `fhecam-agent-<host>-<group>-<suffix>` with the host name sanitized to A-Z a-z 0-9 . _ : -
/// and the host and group shortened so the id is at most 64 characters.
fn default_client_id(host: &str, group: &str, suffix: &str) -> String {
    let max = fhecam_proto::mqtt::MAX_CLIENT_ID.saturating_sub(suffix.len() + 1);
    let room = max.saturating_sub(DEFAULT_ID_FIXED + group.len());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(room)
        .collect();
    let host = if host.is_empty() && room > 0 {
        "localhost".chars().take(room).collect()
    } else {
        host
    };
    let mut id = format!("fhecam-agent-{host}-{group}");
    // a long group leaves less or no room for the host name; the suffix always fits
    id.truncate(max);
    format!("{id}-{suffix}")
}

/// A plain topic outside every subscription of the system: a `$` topic would be a shared
/// subscription or a broker topic, an edge topic would be read back by the agents, a cockpit
/// topic would look like a result.
const SECTIONS: &[&str] = &[
    "db",
    "passphrase_file",
    "state_db",
    "mqtt",
    "limits",
    "logits_for",
    "metrics",
];

impl fhecam_proto::settings::Settings for AgentConfig {
    const FIELDS: &'static [&'static str] = SECTIONS;

    fn check_fields(&self) -> Result<(), String> {
        use fhecam_proto::mqtt::check_path;
        check_path("db", &self.db)?;
        if let Some(p) = &self.passphrase_file {
            check_path("passphrase_file", p)?;
        }
        check_path("state_db", &self.state_db)?;

        let l = &self.limits;
        let max = fhecam_proto::wire::envelope::MAX_ENVELOPE_BYTES;
        if !(1..=max).contains(&l.max_payload_bytes) {
            return Err(format!(
                "limits.max_payload_bytes must be 1..={max}, got {}",
                l.max_payload_bytes
            ));
        }
        if !(l.per_device_per_minute.is_finite()
            && l.per_device_per_minute > 0.0
            && l.per_device_per_minute <= MAX_RATE)
        {
            return Err(format!(
                "limits.per_device_per_minute must be > 0 and ≤ {MAX_RATE}, got {}",
                l.per_device_per_minute
            ));
        }
        fhecam_proto::mqtt::check_range("limits.burst", l.burst, 1.0..=MAX_RATE)?;
        if !(2..=MAX_HELD).contains(&l.max_held) {
            return Err(format!(
                "limits.max_held must be 2..={MAX_HELD}, got {}",
                l.max_held
            ));
        }

        if self.logits_for.len() > MAX_LOGITS_FOR {
            return Err(format!(
                "logits_for has {} entries, at most {MAX_LOGITS_FOR}",
                self.logits_for.len()
            ));
        }
        if let Some(mc) = &self.metrics {
            mc.addr()?;
        }
        for id in &self.logits_for {
            id.parse::<fhecam_proto::ids::ModelId>()
                .map_err(|e| format!("logits_for: {e}"))?;
        }

        fhecam_proto::mqtt::check_connection("mqtt", &self.mqtt.conn)?;
        let m = &self.mqtt.role;
        for (name, v) in [
            ("mqtt.group", &m.group),
            ("mqtt.edge_prefix", &m.edge_prefix),
            ("mqtt.cockpit_prefix", &m.cockpit_prefix),
        ] {
            fhecam_proto::wire::envelope::check_id(name, v).map_err(|e| e.to_string())?;
        }
        if m.cockpit_prefix == m.edge_prefix {
            return Err("mqtt.cockpit_prefix must differ from mqtt.edge_prefix: results never go to edge topics".into());
        }
        if self.mqtt.conn.client_id.is_none()
            && DEFAULT_ID_FIXED + m.group.len() >= fhecam_proto::mqtt::MAX_CLIENT_ID
        {
            return Err(format!(
                "mqtt.client_id: the default fhecam-agent-<hostname>-{} leaves no room for the host name; set mqtt.client_id or a shorter mqtt.group",
                m.group
            ));
        }
        wire::check_dead_letter_topic(&m.dead_letter_topic, &m.edge_prefix, &m.cockpit_prefix)
    }
}

impl AgentConfig {
    pub fn new(db: PathBuf, state_db: PathBuf) -> Self {
        AgentConfig {
            db,
            passphrase_file: None,
            state_db,
            mqtt: AgentMqtt::default(),
            limits: Limits::default(),
            logits_for: Vec::new(),
            metrics: None,
        }
    }

    /// Where the default client id is kept: `<state_db>.client-id`.
    pub fn client_id_file(&self) -> PathBuf {
        let mut p = self.state_db.clone().into_os_string();
        p.push(".client-id");
        p.into()
    }

    /// A new default client id, `fhecam-agent-<hostname>-<group>-<16 random hex digits>`
    /// (at most 64 characters); the agent keeps it in [`Self::client_id_file`] so that its
    /// persistent session survives restarts and host renames.
    pub fn new_client_id(&self) -> String {
        use rand::Rng;
        let n: u64 = rand::rngs::OsRng.gen();
        let suffix = format!("{n:0width$x}", width = CLIENT_ID_SUFFIX_HEX);
        default_client_id(&hostname(), &self.mqtt.role.group, &suffix)
    }

    /// `<prefix>/+/+/inference`, or `$share/<group>/<prefix>/+/+/inference` when shared.
    pub fn subscription(&self) -> String {
        let r = &self.mqtt.role;
        wire::inference_subscription(&r.edge_prefix, r.shared.then_some(r.group.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_client_id_is_sanitized_bounded_and_random() {
        assert_eq!(
            default_client_id("build host", "fhecam-agents", "0123"),
            "fhecam-agent-build-host-fhecam-agents-0123"
        );
        let id = default_client_id(&"h".repeat(300), "g", &"f".repeat(16));
        assert_eq!(id.len(), 64);
        assert!(id.ends_with(&format!("-{}", "f".repeat(16))));
        assert!(fhecam_proto::mqtt::valid_client_id(&id));
        assert_eq!(
            default_client_id("", "g", "1"),
            "fhecam-agent-localhost-g-1"
        );
        let id = default_client_id("h", &"g".repeat(49), &"f".repeat(16));
        assert!(id.len() <= 64 && id.ends_with("-ffffffffffffffff"), "{id}");
        let cfg = AgentConfig::new("db".into(), "state".into());
        let (a, b) = (cfg.new_client_id(), cfg.new_client_id());
        assert_ne!(a, b);
        assert!(fhecam_proto::mqtt::valid_client_id(&a), "{a}");
        assert_eq!(cfg.client_id_file(), PathBuf::from("state.client-id"));
    }

    #[test]
    fn dead_letter_topic_is_plain_and_apart() {
        let mut cfg = AgentConfig::new("db".into(), "state".into());
        assert!(cfg.check().is_ok());
        for t in [
            "",
            "$share/g/x",
            "cockpit/x",
            "fhecam/x",
            "a/+/b",
            "a/#",
            "a\0b",
        ] {
            cfg.mqtt.role.dead_letter_topic = t.into();
            let e = cfg.check().unwrap_err().to_string();
            assert!(e.contains("mqtt.dead_letter_topic"), "{t:?}: {e}");
        }
        cfg.mqtt.role.dead_letter_topic = "x".repeat(2000);
        assert!(cfg.check().is_err());
    }
}
