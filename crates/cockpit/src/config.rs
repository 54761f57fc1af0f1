//! The cockpit's configuration (`cockpit.toml`, `FHECAM_`-prefixed overrides such as
//! `FHECAM_HTTP__LISTEN`). Unknown fields are errors; [`CockpitConfig::check`] bounds every
//! value.

pub use fhecam_proto::settings::Settings;
use fhecam_proto::wire;
use serde::Deserialize;
use std::net::SocketAddr;

/// The cockpit's configuration errors are the edge's and the agent's.
pub type CockpitConfigError = fhecam_proto::settings::ConfigError;

/// The top-level sections that `FHECAM_<SECTION>__<KEY>` variables may override.
const SECTIONS: &[&str] = &["mqtt", "http", "limits"];

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CockpitConfig {
    #[serde(default)]
    pub mqtt: CockpitMqtt,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub limits: CockpitLimits,
}

/// `[mqtt]`: the broker connection (shared with the edge and the agent:
/// [`fhecam_proto::mqtt::Connection`]) and the topics the cockpit reads.
pub type CockpitMqtt = fhecam_proto::mqtt::Section<CockpitTopics>;

/// The cockpit's own fields of `[mqtt]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CockpitTopics {
    /// First level of the cameras' topics (`<prefix>/<device>/<camera>/availability` and
    /// `.../stats`, retained); an id.
    pub edge_prefix: String,
    /// The agent's results: `<cockpit_prefix>/<device>/<camera>`; an id, not `edge_prefix`.
    pub cockpit_prefix: String,
    /// The agent's refusals (`mqtt.dead_letter_topic` of the agent): a plain topic of
    /// 1..=1024 bytes, no wildcard.
    pub dead_letter_topic: String,
}

impl Default for CockpitTopics {
    fn default() -> Self {
        CockpitTopics {
            edge_prefix: wire::DEFAULT_EDGE_PREFIX.into(),
            cockpit_prefix: wire::DEFAULT_COCKPIT_PREFIX.into(),
            dead_letter_topic: wire::DEFAULT_DEAD_LETTER_TOPIC.into(),
        }
    }
}

/// `[http]`: where the page is served.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address and port of the page and `/api/cameras` (port 0: any free port, printed at
    /// start). Default `127.0.0.1:9480`: loopback only.
    pub listen: String,
    /// Needed for a `listen` address other than loopback: the page has no authentication
    /// or TLS of its own; put it behind a reverse proxy that has both (README, "Watching a
    /// fleet").
    pub allow_remote: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9480".into(),
            allow_remote: false,
        }
    }
}

/// What the cockpit holds, whatever the broker sends.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CockpitLimits {
    /// Most cameras shown (1..=100000); messages of further cameras are counted and
    /// ignored, so random device ids cannot exhaust memory.
    pub max_cameras: usize,
    /// Largest message read (bytes, 1024..=16 MiB); a larger one is counted and ignored.
    pub max_payload_bytes: usize,
    /// Most simultaneous live-update streams (browser tabs), 1..=10000.
    pub max_streams: usize,
}

impl Default for CockpitLimits {
    fn default() -> Self {
        CockpitLimits {
            max_cameras: 1000,
            max_payload_bytes: 1 << 20,
            max_streams: 64,
        }
    }
}

impl fhecam_proto::settings::Settings for CockpitConfig {
    const FIELDS: &'static [&'static str] = SECTIONS;

    fn check_fields(&self) -> Result<(), String> {
        fhecam_proto::mqtt::check_connection("mqtt", &self.mqtt.conn)?;
        let t = &self.mqtt.role;
        for (name, v) in [
            ("mqtt.edge_prefix", &t.edge_prefix),
            ("mqtt.cockpit_prefix", &t.cockpit_prefix),
        ] {
            wire::envelope::check_id(name, v).map_err(|e| e.to_string())?;
        }
        if t.cockpit_prefix == t.edge_prefix {
            return Err("mqtt.cockpit_prefix must differ from mqtt.edge_prefix".into());
        }
        wire::check_dead_letter_topic(&t.dead_letter_topic, &t.edge_prefix, &t.cockpit_prefix)?;
        let addr = self.listen_addr()?;
        if !addr.ip().is_loopback() && !self.http.allow_remote {
            return Err(format!(
                "http.listen {addr} is not a loopback address: the page has no authentication or TLS of its own; set http.allow_remote = true and put it behind a reverse proxy with both (README, \"Watching a fleet\")"
            ));
        }
        let l = &self.limits;
        let bounded = |name: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("limits.{name} must be {lo}..={hi}, got {v}"))
            }
        };
        bounded("max_cameras", l.max_cameras, 1, 100_000)?;
        bounded("max_payload_bytes", l.max_payload_bytes, 1024, 16 << 20)?;
        bounded("max_streams", l.max_streams, 1, 10_000)
    }
}

impl CockpitConfig {
    /// `http.listen` as an address.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.http.listen.parse().map_err(|e| {
            format!(
                "http.listen {:?}: {e}; expected ADDRESS:PORT such as 127.0.0.1:9480",
                self.http.listen
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_pass_and_remote_needs_a_choice() {
        let mut c = CockpitConfig::default();
        c.check().unwrap();
        c.http.listen = "0.0.0.0:9480".into();
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("allow_remote"), "{e}");
        c.http.allow_remote = true;
        c.check().unwrap();
        c.http.listen = "localhost:x".into();
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("http.listen"), "{e}");
        c.http.listen = "127.0.0.1:0".into();
        c.limits.max_cameras = 0;
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("limits.max_cameras"), "{e}");
        c.limits.max_cameras = 10;
        c.mqtt.role.dead_letter_topic = "cockpit/x".into();
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("mqtt.dead_letter_topic"), "{e}");
    }

    #[test]
    fn the_example_config_loads_and_states_the_defaults() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/cockpit.example.toml"
        );
        let c = CockpitConfig::load(std::path::Path::new(p)).unwrap();
        let d = CockpitConfig::default();
        assert_eq!(c.http.listen, d.http.listen);
        assert_eq!(c.http.allow_remote, d.http.allow_remote);
        assert_eq!(c.mqtt.role.edge_prefix, d.mqtt.role.edge_prefix);
        assert_eq!(c.mqtt.role.cockpit_prefix, d.mqtt.role.cockpit_prefix);
        assert_eq!(c.mqtt.role.dead_letter_topic, d.mqtt.role.dead_letter_topic);
        assert_eq!(c.limits.max_cameras, d.limits.max_cameras);
        assert_eq!(c.limits.max_payload_bytes, d.limits.max_payload_bytes);
        assert_eq!(c.limits.max_streams, d.limits.max_streams);
        assert_eq!(
            (c.mqtt.conn.host, c.mqtt.conn.port),
            (d.mqtt.conn.host, d.mqtt.conn.port)
        );
    }
}
