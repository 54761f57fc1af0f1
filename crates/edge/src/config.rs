//! The edge daemon's configuration: a TOML file with `FHECAM_`-prefixed environment
//! overrides (`FHECAM_MQTT__HOST=broker` sets `mqtt.host`). Unknown fields are errors, so a
//! typo never silently falls back to a default.

pub use fhecam_proto::settings::Settings;
use fhecam_proto::wire::{self, Leaf};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Moved to `fhecam_proto::mqtt` (shared with the agent); re-exported for existing users.
pub use fhecam_proto::mqtt::TlsConfig;

/// Loading or checking `edge.toml` (shared with the agent's configuration).
pub use fhecam_proto::settings::ConfigError;

/// Top level of `edge.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// This device's id: the second level of every topic (1..=64 of A-Z a-z 0-9 . _ : -).
    pub device_id: String,
    /// This camera's id on the device: the third level of every topic.
    #[serde(default = "default_camera_id")]
    pub camera_id: String,
    /// The signed deployment bundle (`fhecam deploy`). Paths: 1..=4096 bytes, no NUL.
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
    /// Fleet deployment: bundles pushed over MQTT or dropped into a directory replace the
    /// running model at a frame boundary. Absent: the daemon runs the `bundle` file only
    /// (SIGHUP still re-reads it).
    pub deploy: Option<DeployConfig>,
    /// `[metrics]`: a Prometheus `/metrics` endpoint (e.g. `listen = "127.0.0.1:9464"`).
    /// Absent: none.
    pub metrics: Option<fhecam_metrics::MetricsConfig>,
}

/// Where frames come from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// A gst-launch pipeline ending in an `appsink` (any name). fhecam sets the appsink to
    /// keep only the newest frame and to accept GRAY8 or BGR; put a `videoconvert` before it.
    /// At most 64 KiB, no NUL.
    pub pipeline: String,
    /// Process every frame, pausing the pipeline while inference is busy (for recorded
    /// files). Default false: a live camera keeps only its newest frame and the frames that
    /// arrive while busy are dropped and counted.
    pub every_frame: bool,
    /// A camera that delivers no frame for this long is restarted (0.1..=86400 s).
    pub stall_timeout_s: f64,
    /// First restart delay; doubled on each consecutive failure (with ±25 % jitter).
    /// 0.01..=3600 s, at most `restart_backoff_max_s`.
    pub restart_backoff_initial_s: f64,
    /// Largest restart delay (0.01..=3600 s).
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
    /// Take at most one frame per interval (0 = every frame the pipeline delivers);
    /// 0..=86400 s.
    pub sample_interval_s: f64,
    /// Motion gate: skip a frame whose mean absolute difference from the last frame sent
    /// to inference (both as model input intensities in [0, 1]) is below this. 0 = off;
    /// 0..=1.
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
    /// and counted (`frames_dropped_busy`). 1..=64.
    pub max_in_flight: usize,
    /// FHE worker threads (0 = one per core; at most 1024). They are fhecam's own, never
    /// tokio's.
    pub threads: usize,
    /// On shutdown, how long in-flight inferences may still run before they are abandoned
    /// (nothing published is lost: finished results are already in the outbox). 0..=86400 s.
    pub drain_timeout_s: f64,
    /// How the frame enters the encrypted network: `encrypted` (with the owner's public
    /// key, the default) or `device-clear` (the frame stays in the clear on this device,
    /// which captured it anyway: the first layer's products need no PBS; every value
    /// computed from it and everything published stays encrypted under the owner's key).
    pub input_mode: fhecam_engine::fhe::eval::InputMode,
}

impl Default for InferConfig {
    fn default() -> Self {
        InferConfig {
            max_in_flight: 1,
            threads: 0,
            drain_timeout_s: 120.0,
            input_mode: fhecam_engine::fhe::eval::InputMode::Encrypted,
        }
    }
}

/// `[mqtt]`: the broker connection (shared with the agent: [`Connection`]) and the edge's
/// topics.
pub type MqttConfig = fhecam_proto::mqtt::Section<EdgeTopics>;

/// The edge's own fields of `[mqtt]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeTopics {
    /// First topic level (an id: 1..=64 of A-Z a-z 0-9 . _ : -).
    pub topic_prefix: String,
    /// How often counters are published on `<prefix>/<device>/<camera>/stats`
    /// (0.1..=86400 s).
    pub stats_interval_s: f64,
}

impl Default for EdgeTopics {
    fn default() -> Self {
        EdgeTopics {
            topic_prefix: wire::DEFAULT_EDGE_PREFIX.into(),
            stats_interval_s: 60.0,
        }
    }
}

/// The on-disk queue of encrypted inferences not yet acknowledged by the broker.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Directory (systemd: the service's StateDirectory); 1..=4096 bytes.
    pub dir: PathBuf,
    /// When full, the oldest entries are dropped and counted (`outbox_dropped`).
    /// 1..=1000000.
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

/// `[deploy]`: new model versions while the daemon runs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    /// Directory the daemon owns (created 0700): the bundle it runs (`current.bundle`) and
    /// the newest version of every model it ever accepted (`deployed.json`), so a restart
    /// keeps a pushed model and an older bundle is refused even after a restart.
    pub state_dir: PathBuf,
    /// Take bundles pushed to `<mqtt.topic_prefix>/_deploy/all` and
    /// `<mqtt.topic_prefix>/_deploy/<device_id>` (retained, QoS 1). Default true.
    #[serde(default = "default_true")]
    pub push: bool,
    /// A directory watched for `*.bundle` files (created 0700 if missing). A file is taken
    /// once its size and modification time are unchanged over one scan; accepted files are
    /// removed, refused ones renamed `*.bundle.refused`. Default: none.
    pub drop_dir: Option<PathBuf>,
    /// How often `drop_dir` is scanned: 0.1..=3600 s. Default 2.
    #[serde(default = "default_scan_interval")]
    pub scan_interval_s: f64,
    /// Refused files (`*.refused`) kept in `drop_dir` for the operator; past it the oldest
    /// are removed. 0..=10000. Default 16.
    #[serde(default = "default_keep_refused")]
    pub keep_refused: usize,
}

fn default_keep_refused() -> usize {
    16
}

/// Largest `deploy.keep_refused`.
pub const MAX_KEEP_REFUSED: usize = 10_000;

fn default_true() -> bool {
    true
}

fn default_scan_interval() -> f64 {
    2.0
}

/// Top-level fields, so that other `FHECAM_*` variables (the owner's passphrase, the
/// data directory) are not mistaken for unknown configuration fields.
const SECTIONS: &[&str] = &[
    "device_id",
    "camera_id",
    "bundle",
    "owner_key",
    "source",
    "preprocess",
    "infer",
    "mqtt",
    "outbox",
    "deploy",
    "metrics",
];

fn default_camera_id() -> String {
    "cam0".into()
}

impl fhecam_proto::settings::Settings for EdgeConfig {
    const FIELDS: &'static [&'static str] = SECTIONS;

    fn check_fields(&self) -> Result<(), String> {
        use fhecam_proto::mqtt::{check_path, check_range};
        let id = |name: &'static str, v: &str| {
            fhecam_proto::wire::envelope::check_id(name, v).map_err(|e| e.to_string())
        };
        id("device_id", &self.device_id)?;
        if wire::reserved_device_id(&self.device_id) {
            return Err(format!(
                "device_id {:?} is reserved for deployment topics; choose another",
                self.device_id
            ));
        }
        id("camera_id", &self.camera_id)?;
        check_path("bundle", &self.bundle)?;
        check_path("owner_key", &self.owner_key)?;

        self.source.check()?;

        let p = &self.preprocess;
        check_range(
            "preprocess.sample_interval_s",
            p.sample_interval_s,
            0.0..=MAX_S,
        )?;
        check_range("preprocess.motion_threshold", p.motion_threshold, 0.0..=1.0)?;

        self.infer.check()?;

        fhecam_proto::mqtt::check_connection("mqtt", &self.mqtt.conn)?;
        let m = &self.mqtt.role;
        if !fhecam_proto::mqtt::valid_client_id(&self.client_id()) {
            // the default id is built from two 64-character ids
            return Err(format!(
                "mqtt.client_id: the default {:?} is over {} characters; set mqtt.client_id",
                self.client_id(),
                fhecam_proto::mqtt::MAX_CLIENT_ID
            ));
        }
        id("mqtt.topic_prefix", &m.topic_prefix)?;
        if let Some(mc) = &self.metrics {
            mc.addr()?;
        }
        check_range(
            "mqtt.stats_interval_s",
            m.stats_interval_s,
            STATS_INTERVAL_S,
        )?;

        let o = &self.outbox;
        check_path("outbox.dir", &o.dir)?;
        if !(1..=MAX_OUTBOX_ENTRIES).contains(&o.max_entries) {
            return Err(format!(
                "outbox.max_entries must be 1..={MAX_OUTBOX_ENTRIES}, got {}",
                o.max_entries
            ));
        }
        if let Some(d) = &self.deploy {
            d.check()?;
        }
        self.check_dirs()
    }
}

impl EdgeConfig {
    /// The directories the daemon writes into (it deletes and renames files there) must be
    /// its own: not a system directory, not one inside another, and not holding the
    /// configured bundle.
    fn check_dirs(&self) -> Result<(), String> {
        let mut dirs = vec![("outbox.dir", normal(&self.outbox.dir))];
        if let Some(d) = &self.deploy {
            dirs.push(("deploy.state_dir", normal(&d.state_dir)));
            if let Some(p) = &d.drop_dir {
                dirs.push(("deploy.drop_dir", normal(p)));
            }
        }
        for (name, d) in &dirs {
            if let Some(sys) = SYSTEM_DIRS
                .iter()
                .find(|s| d == Path::new(s))
                .or_else(|| KERNEL_DIRS.iter().find(|s| d.starts_with(s)))
            {
                return Err(format!(
                    "{name} {} is the system directory {sys} (or inside it): give the daemon a directory of its own, e.g. /var/lib/fhecam/...",
                    d.display()
                ));
            }
        }
        for (i, (a, da)) in dirs.iter().enumerate() {
            for (b, db) in &dirs[i + 1..] {
                if da.starts_with(db) || db.starts_with(da) {
                    return Err(format!(
                        "{a} {} and {b} {} overlap: each must be a directory of its own",
                        da.display(),
                        db.display()
                    ));
                }
            }
        }
        let bundle = normal(&self.bundle);
        for (name, d) in &dirs {
            if *name != "deploy.state_dir" && bundle.starts_with(d) {
                return Err(format!(
                    "bundle {} is inside {name} {}, where the daemon removes and renames files: keep it elsewhere",
                    bundle.display(),
                    d.display()
                ));
            }
        }
        Ok(())
    }

    /// The topics a camera takes pushed bundles from: the whole fleet's and its device's.
    pub fn deploy_topics(&self) -> [String; 2] {
        wire::deploy_topics(&self.mqtt.role.topic_prefix, &self.device_id)
    }

    pub fn client_id(&self) -> String {
        self.mqtt
            .conn
            .client_id
            .clone()
            .unwrap_or_else(|| format!("fhecam-{}-{}", self.device_id, self.camera_id))
    }

    /// This camera's topic `leaf`.
    pub fn topic(&self, leaf: Leaf) -> String {
        wire::camera_topic(
            &self.mqtt.role.topic_prefix,
            &self.device_id,
            &self.camera_id,
            leaf,
        )
    }

    /// `<prefix>/<device>/<camera>`, the level all of this camera's topics start with.
    pub fn topic_base(&self) -> String {
        wire::camera_base(
            &self.mqtt.role.topic_prefix,
            &self.device_id,
            &self.camera_id,
        )
    }
}

impl SourceConfig {
    /// `[source]`: the pipeline and the restart timing.
    fn check(&self) -> Result<(), String> {
        use fhecam_proto::mqtt::{check_backoff, check_range};
        let s = self;
        if s.pipeline.len() > MAX_PIPELINE || s.pipeline.contains('\0') {
            return Err(format!(
                "source.pipeline must be at most {MAX_PIPELINE} bytes without NUL, got {} bytes",
                s.pipeline.len()
            ));
        }
        if !s.pipeline.contains("appsink") {
            return Err(format!(
                "source.pipeline must end in an appsink, got {:?}",
                s.pipeline
            ));
        }
        check_range("source.stall_timeout_s", s.stall_timeout_s, STALL_TIMEOUT_S)?;
        check_backoff(
            (
                "source.restart_backoff_initial_s",
                s.restart_backoff_initial_s,
            ),
            ("source.restart_backoff_max_s", s.restart_backoff_max_s),
        )?;
        Ok(())
    }
}

impl InferConfig {
    /// `[infer]`: slots, threads and the drain floor.
    fn check(&self) -> Result<(), String> {
        use fhecam_proto::mqtt::check_range;
        let i = self;
        if !(1..=MAX_IN_FLIGHT).contains(&i.max_in_flight) {
            return Err(format!(
                "infer.max_in_flight must be 1..={MAX_IN_FLIGHT}, got {}",
                i.max_in_flight
            ));
        }
        if i.threads > MAX_THREADS {
            return Err(format!(
                "infer.threads must be 0..={MAX_THREADS} (0 = one per core), got {}",
                i.threads
            ));
        }
        check_range("infer.drain_timeout_s", i.drain_timeout_s, 0.0..=MAX_S)?;
        Ok(())
    }
}

impl DeployConfig {
    /// `[deploy]`: the state and drop directories, the scan and the refused files kept.
    fn check(&self) -> Result<(), String> {
        use fhecam_proto::mqtt::{check_path, check_range};
        let d = self;
        check_path("deploy.state_dir", &d.state_dir)?;
        if let Some(p) = &d.drop_dir {
            check_path("deploy.drop_dir", p)?;
            if *p == d.state_dir {
                return Err("deploy.drop_dir must not be deploy.state_dir".into());
            }
        }
        check_range("deploy.scan_interval_s", d.scan_interval_s, 0.1..=3600.0)?;
        if d.keep_refused > MAX_KEEP_REFUSED {
            return Err(format!(
                "deploy.keep_refused must be 0..={MAX_KEEP_REFUSED}, got {}",
                d.keep_refused
            ));
        }
        Ok(())
    }
}

/// Longest duration setting (one day): `Duration` and `Instant` arithmetic on it cannot
/// overflow.
pub const MAX_S: f64 = 86400.0;
/// Stall timeout bounds: under 0.1 s a working camera would be restarted between frames.
pub const STALL_TIMEOUT_S: std::ops::RangeInclusive<f64> = 0.1..=MAX_S;
/// Stats period bounds: tokio's interval panics on a zero period.
pub const STATS_INTERVAL_S: std::ops::RangeInclusive<f64> = 0.1..=MAX_S;
/// Frames evaluated at once: each holds a ciphertext set of ~1 MB plus FHE scratch.
pub const MAX_IN_FLIGHT: usize = 64;
/// FHE worker threads.
pub const MAX_THREADS: usize = 1024;
/// Outbox entries (~1 MB each).
pub const MAX_OUTBOX_ENTRIES: usize = 1_000_000;
/// Longest GStreamer pipeline description.
pub const MAX_PIPELINE: usize = 64 << 10;

/// Directories no daemon directory may be.
const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/media",
    "/mnt",
    "/opt",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/tmp",
    "/usr",
    "/usr/bin",
    "/usr/lib",
    "/usr/local",
    "/usr/sbin",
    "/usr/share",
    "/var",
    "/var/cache",
    "/var/lib",
    "/var/log",
    "/var/tmp",
];
/// Kernel interfaces: nothing below them either.
const KERNEL_DIRS: &[&str] = &["/dev", "/proc", "/sys"];

/// `p` made absolute (against the working directory) with `.` and `..` resolved
/// lexically, so that two spellings of one directory compare equal.
fn normal(p: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Seconds from a checked configuration value (finite, ≥ 0, ≤ `MAX_S`).
pub fn secs(s: f64) -> Duration {
    // saturating: a configuration built in code without `check` must not panic either
    Duration::try_from_secs_f64(s.clamp(0.0, MAX_S)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhecam_proto::settings::env_overrides;

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
        assert_eq!(c.topic(Leaf::Inference), "fhecam/dev1/cam0/inference");
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
        let mut got: Vec<_> = env_overrides(vars.into_iter(), SECTIONS)
            .into_keys()
            .collect();
        got.sort();
        assert_eq!(got, vec!["FHECAM_DEVICE_ID", "FHECAM_MQTT__HOST"]);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let refused = |toml: &str| {
            EdgeConfig::load(&write(d.path(), toml))
                .unwrap_err()
                .to_string()
        };
        for (toml, field) in [
            (format!("{MINIMAL}[mqtt]\nhots = \"x\"\n"), "hots"),
            (
                format!("{MINIMAL}[infer]\nmax_in_flight = 0\n"),
                "max_in_flight",
            ),
            (
                "device_id = \"a b\"\nbundle = \"x\"\nowner_key = \"y\"\n".to_string(),
                "device_id",
            ),
        ] {
            let e = refused(&toml);
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn system_and_overlapping_directories_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let load = |extra: &str| {
            EdgeConfig::load(&write(d.path(), &format!("{MINIMAL}{extra}")))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let deploy = |state: &str, drop: &str| {
            format!("[deploy]\nstate_dir = \"{state}\"\ndrop_dir = \"{drop}\"\n")
        };
        for dir in ["/", "/etc", "/usr/", "/proc/self", "/var/lib/../lib"] {
            let e = load(&format!("[outbox]\ndir = \"{dir}\"\n")).unwrap_err();
            assert!(
                e.contains("outbox.dir") && e.contains("system directory"),
                "{e}"
            );
        }
        let e = load(&format!(
            "[outbox]\ndir = \"/srv/f/o\"\n{}",
            deploy("/srv/f/o/state", "/srv/f/drop")
        ))
        .unwrap_err();
        assert!(e.contains("overlap"), "{e}");
        let e = load(&format!(
            "[outbox]\ndir = \"/srv/f/o\"\n{}",
            deploy("/srv/f/s", "/srv/f/o/")
        ))
        .unwrap_err();
        assert!(e.contains("overlap"), "{e}");
        // the drop directory is where the bundle lives (MINIMAL's bundle is relative)
        let cwd = std::env::current_dir().unwrap();
        let e = load(&format!(
            "[outbox]\ndir = \"/srv/f/o\"\n{}",
            deploy("/srv/f/s", cwd.to_str().unwrap())
        ))
        .unwrap_err();
        assert!(e.contains("bundle") && e.contains("deploy.drop_dir"), "{e}");
        load(&format!(
            "[outbox]\ndir = \"/srv/f/o\"\n{}keep_refused = 3\n",
            deploy("/srv/f/s", "/srv/f/drop")
        ))
        .unwrap();
        let e = load(&format!(
            "[outbox]\ndir = \"/srv/f/o\"\n{}keep_refused = 10001\n",
            deploy("/srv/f/s", "/srv/f/drop")
        ))
        .unwrap_err();
        assert!(e.contains("keep_refused"), "{e}");
    }
}
