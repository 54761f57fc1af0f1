//! The MQTT contract between the cameras, the owner, the decryption agent and the cockpit:
//! every topic, built and parsed here and nowhere else, and every payload type. The
//! document of record is docs/asyncapi.yaml; `tests/asyncapi.rs` of this crate holds it to
//! these definitions.
//!
//! | topic | payload | from → to |
//! | --- | --- | --- |
//! | `<edge>/<device>/<camera>/inference` | [`envelope::Envelope`] (binary) | camera → agent |
//! | `<edge>/<device>/<camera>/availability` | [`Availability`] (text, retained) | camera → fleet view |
//! | `<edge>/<device>/<camera>/stats` | [`status::Status`] (JSON, retained) | camera → fleet view |
//! | `<edge>/_deploy/all`, `<edge>/_deploy/<device>` | signed bundle ([`crate::bundle`], retained) | owner → cameras |
//! | `<cockpit>/<device>/<camera>` | [`results::CockpitResult`] (JSON) | agent → cockpit |
//! | the dead-letter topic | [`results::DeadLetter`] (JSON) | agent → operators |
//!
//! The bundle keeps its own module: it is a file first (`fhecam deploy --out`, the drop
//! directory) and travels on the deployment topics byte for byte.

pub mod envelope;
pub mod results;
pub mod status;

pub use results::{CockpitResult, DeadLetter, RefusalCode};
pub use status::{Snapshot, Status};

/// Default first level of the cameras' topics (`[mqtt] topic_prefix`, the agent's
/// `edge_prefix`, `fhecam fleet --prefix`).
pub const DEFAULT_EDGE_PREFIX: &str = "fhecam";
/// Default first level of the results (the agent's `cockpit_prefix`).
pub const DEFAULT_COCKPIT_PREFIX: &str = "cockpit";
/// Default dead-letter topic (the agent's `dead_letter_topic`).
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = "backend/deadletter";

/// The device level under which deployment topics live (`<prefix>/_deploy/...`): no camera
/// may use it as its device id.
pub const DEPLOY_LEVEL: &str = "_deploy";
/// The deployment level that addresses every device: no device may use it as its id either
/// (it could not be addressed alone).
pub const DEPLOY_ALL: &str = "all";

/// The last level of a camera's own topics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Leaf {
    /// Encrypted inferences, QoS 1.
    Inference,
    /// `online` / `offline`, retained; `offline` is also the last will.
    Availability,
    /// The camera's [`Status`], retained.
    Stats,
}

impl Leaf {
    pub const ALL: [Leaf; 3] = [Leaf::Inference, Leaf::Availability, Leaf::Stats];

    pub fn as_str(self) -> &'static str {
        match self {
            Leaf::Inference => "inference",
            Leaf::Availability => "availability",
            Leaf::Stats => "stats",
        }
    }

    fn parse(s: &str) -> Option<Leaf> {
        Leaf::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

/// `<prefix>/<device>/<camera>`: the level every topic of one camera starts with.
pub fn camera_base(prefix: &str, device: &str, camera: &str) -> String {
    format!("{prefix}/{device}/{camera}")
}

/// `<prefix>/<device>/<camera>/<leaf>`.
pub fn camera_topic(prefix: &str, device: &str, camera: &str, leaf: Leaf) -> String {
    format!("{}/{}", camera_base(prefix, device, camera), leaf.as_str())
}

/// `<prefix>/+/+/<leaf>`: that leaf of every camera.
pub fn camera_filter(prefix: &str, leaf: Leaf) -> String {
    format!("{prefix}/+/+/{}", leaf.as_str())
}

/// The agents' subscription: every camera's inferences, split between the agents of
/// `shared_group` (`$share/<group>/...`) when set.
pub fn inference_subscription(prefix: &str, shared_group: Option<&str>) -> String {
    let plain = camera_filter(prefix, Leaf::Inference);
    match shared_group {
        Some(g) => format!("$share/{g}/{plain}"),
        None => plain,
    }
}

/// A camera topic as parsed by [`parse_camera_topic`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CameraTopic<'a> {
    pub device: &'a str,
    pub camera: &'a str,
    pub leaf: Leaf,
}

/// `<prefix>/<device>/<camera>/<leaf>` → its parts; `None` for anything else, including the
/// deployment topics (whose device level is reserved).
pub fn parse_camera_topic<'a>(prefix: &str, topic: &'a str) -> Option<CameraTopic<'a>> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let mut parts = rest.split('/');
    let (device, camera, leaf) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || device == DEPLOY_LEVEL {
        return None;
    }
    Some(CameraTopic {
        device,
        camera,
        leaf: Leaf::parse(leaf)?,
    })
}

/// A device id that would collide with the deployment topics.
pub fn reserved_device_id(id: &str) -> bool {
    id == DEPLOY_LEVEL || id == DEPLOY_ALL
}

/// The topic a bundle is pushed to: every camera (`None`) or one device's cameras.
pub fn deploy_topic(prefix: &str, device: Option<&str>) -> String {
    format!("{prefix}/{DEPLOY_LEVEL}/{}", device.unwrap_or(DEPLOY_ALL))
}

/// The topics a camera of `device` takes pushed bundles from: the fleet's and its device's.
pub fn deploy_topics(prefix: &str, device: &str) -> [String; 2] {
    [
        deploy_topic(prefix, None),
        deploy_topic(prefix, Some(device)),
    ]
}

/// `<cockpit_prefix>/<device>/<camera>`: where the agent publishes a camera's results.
pub fn cockpit_topic(cockpit_prefix: &str, device: &str, camera: &str) -> String {
    camera_base(cockpit_prefix, device, camera)
}

/// `(device, camera)` of a result topic `<cockpit_prefix>/<device>/<camera>`; `None` for
/// anything else.
pub fn parse_cockpit_topic<'a>(cockpit_prefix: &str, topic: &'a str) -> Option<(&'a str, &'a str)> {
    let mut parts = topic
        .strip_prefix(cockpit_prefix)?
        .strip_prefix('/')?
        .split('/');
    let (device, camera) = (parts.next()?, parts.next()?);
    (parts.next().is_none() && !device.is_empty() && !camera.is_empty()).then_some((device, camera))
}

/// `<cockpit_prefix>/#`: every camera's results, for a cockpit.
pub fn cockpit_filter(cockpit_prefix: &str) -> String {
    format!("{cockpit_prefix}/#")
}

/// Longest dead-letter topic.
pub const MAX_DEAD_LETTER_TOPIC: usize = 1024;

/// The agent's dead-letter topic (`mqtt.dead_letter_topic` of the agent and the cockpit): a
/// plain topic, outside the cameras' and the cockpit's prefixes so that no refusal is read
/// back as an inference or a result. The message names the field.
pub fn check_dead_letter_topic(
    t: &str,
    edge_prefix: &str,
    cockpit_prefix: &str,
) -> Result<(), String> {
    let under = |prefix: &str| t == prefix || t.starts_with(&format!("{prefix}/"));
    let why = if t.is_empty() || t.len() > MAX_DEAD_LETTER_TOPIC {
        format!("must be 1..={MAX_DEAD_LETTER_TOPIC} bytes, got {}", t.len())
    } else if t.contains(['+', '#', '\0']) {
        "must not contain +, # or NUL".into()
    } else if t.starts_with('$') {
        "must not start with $ (shared subscriptions, broker topics)".into()
    } else if under(edge_prefix) {
        format!("must be outside the edge prefix {edge_prefix:?}")
    } else if under(cockpit_prefix) {
        format!("must be outside the cockpit prefix {cockpit_prefix:?}")
    } else {
        return Ok(());
    };
    let shown: String = t.chars().take(80).collect();
    Err(format!("mqtt.dead_letter_topic {shown:?} {why}"))
}

/// The payload of the availability topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    Online,
    Offline,
}

impl Availability {
    pub const ALL: [Availability; 2] = [Availability::Online, Availability::Offline];

    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Online => "online",
            Availability::Offline => "offline",
        }
    }

    /// `None` for anything but the two words.
    pub fn parse(payload: &[u8]) -> Option<Availability> {
        Availability::ALL
            .into_iter()
            .find(|a| a.as_str().as_bytes() == payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camera_topics_round_trip_and_nothing_else_parses() {
        for leaf in Leaf::ALL {
            let t = camera_topic("fhecam", "d1", "c:0", leaf);
            let p = parse_camera_topic("fhecam", &t).unwrap();
            assert_eq!((p.device, p.camera, p.leaf), ("d1", "c:0", leaf));
        }
        assert_eq!(
            camera_topic("fhecam", "d1", "c0", Leaf::Inference),
            "fhecam/d1/c0/inference"
        );
        for bad in [
            "fhecam/d1/inference",
            "other/d1/c0/inference",
            "fhecam/d1/c0/inference/x",
            "fhecam/d1/c0/other",
            "fhecamx/d1/c0/stats",
            "fhecam/_deploy/all",
            "fhecam/_deploy/x/stats",
        ] {
            assert_eq!(parse_camera_topic("fhecam", bad), None, "{bad}");
        }
        assert_eq!(deploy_topic("fhecam", None), "fhecam/_deploy/all");
        assert_eq!(
            inference_subscription("p", Some("g")),
            "$share/g/p/+/+/inference"
        );
        assert_eq!(cockpit_filter("cockpit"), "cockpit/#");
        assert_eq!(Availability::parse(b"online"), Some(Availability::Online));
        assert_eq!(Availability::parse(b"Online"), None);
    }
}
