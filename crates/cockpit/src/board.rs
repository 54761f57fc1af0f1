//! What the cockpit knows, as pure state: MQTT messages in (with the time they arrived),
//! the page's JSON out. No I/O here; the link feeds it and the server reads its views.

use fhecam_owner::fleet::{self, Camera};
use fhecam_proto::wire::{self, CockpitResult, DeadLetter, Leaf};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};

/// Minutes of history kept per camera (the page's chart).
pub const HISTORY_MINUTES: usize = 60;

/// The topics the board reads.
#[derive(Clone, Debug)]
pub struct Topics {
    pub edge_prefix: String,
    pub cockpit_prefix: String,
    pub dead_letter_topic: String,
}

impl Topics {
    /// The subscriptions that feed the board.
    pub fn filters(&self) -> Vec<String> {
        let mut f = fleet::filters(&self.edge_prefix).to_vec();
        f.push(wire::cockpit_filter(&self.cockpit_prefix));
        f.push(self.dead_letter_topic.clone());
        f
    }
}

/// One minute of a camera's activity.
#[derive(Clone, Copy, Debug, Default)]
struct Minute {
    minute: u64,
    results: u32,
    refusals: u32,
}

/// What arrived from the agent for one camera.
#[derive(Clone, Debug, Default)]
struct Activity {
    last_label: Option<u64>,
    last_model_version: Option<u32>,
    last_at_ms: Option<u64>,
    latency_s: Option<f64>,
    minutes: VecDeque<Minute>,
}

impl Activity {
    fn count(&mut self, now_ms: u64, refusal: bool) {
        let minute = now_ms / 60_000;
        if self.minutes.back().is_none_or(|m| m.minute != minute) {
            self.minutes.push_back(Minute {
                minute,
                ..Minute::default()
            });
        }
        while self
            .minutes
            .front()
            .is_some_and(|m| m.minute + (HISTORY_MINUTES as u64) <= minute)
        {
            self.minutes.pop_front();
        }
        if let Some(m) = self.minutes.back_mut() {
            if refusal {
                m.refusals = m.refusals.saturating_add(1);
            } else {
                m.results = m.results.saturating_add(1);
            }
        }
    }

    /// Per-minute counts over the last hour, oldest first, ending at `now_ms`'s minute.
    fn per_minute(&self, now_ms: u64) -> (Vec<u32>, Vec<u32>) {
        let now = now_ms / 60_000;
        let mut results = vec![0; HISTORY_MINUTES];
        let mut refusals = vec![0; HISTORY_MINUTES];
        for m in &self.minutes {
            if let Some(back) = now.checked_sub(m.minute) {
                if (back as usize) < HISTORY_MINUTES {
                    let i = HISTORY_MINUTES - 1 - back as usize;
                    results[i] = m.results;
                    refusals[i] = m.refusals;
                }
            }
        }
        (results, refusals)
    }
}

/// One camera on the page: the fleet view of its retained messages and what the agent
/// published for it.
#[derive(Clone, Debug, Serialize)]
pub struct CameraView {
    #[serde(flatten)]
    pub camera: Camera,
    pub last_label: Option<u64>,
    /// Model version of the last result (the status may already show a newer one).
    pub last_result_model_version: Option<u32>,
    pub last_result_age_s: Option<f64>,
    /// Capture to cockpit: when the result arrived minus the frame's timestamp.
    pub latency_s: Option<f64>,
    pub results_last_hour: u64,
    pub refusals_last_hour: u64,
    /// Results per minute over the last hour, oldest first.
    pub results_per_minute: Vec<u32>,
    /// The agent's refusals per minute over the last hour, oldest first.
    pub refusals_per_minute: Vec<u32>,
}

/// The whole page: `/api/cameras`.
#[derive(Clone, Debug, Serialize)]
pub struct View {
    pub now_unix_ms: u64,
    pub cameras: Vec<CameraView>,
    /// Messages ignored: oversized, unreadable, or of a camera beyond `limits.max_cameras`.
    pub ignored_messages: u64,
    /// Refusals whose topic names no camera (a malformed inference topic).
    pub refusals_unattributed: u64,
    /// Whether the cockpit is connected to the broker now (set by the server).
    pub broker_connected: bool,
}

#[derive(Debug)]
pub struct Board {
    topics: Topics,
    max_cameras: usize,
    max_payload: usize,
    /// The retained availability and stats messages, by topic.
    retained: BTreeMap<String, Vec<u8>>,
    activity: BTreeMap<(String, String), Activity>,
    ignored: u64,
    unattributed: u64,
}

impl Board {
    pub fn new(topics: Topics, max_cameras: usize, max_payload: usize) -> Self {
        Board {
            topics,
            max_cameras,
            max_payload,
            retained: BTreeMap::new(),
            activity: BTreeMap::new(),
            ignored: 0,
            unattributed: 0,
        }
    }

    /// Takes one message; false if it was ignored (the page shows how many were).
    pub fn apply(&mut self, topic: &str, payload: &[u8], now_ms: u64) -> bool {
        let ok = payload.len() <= self.max_payload && self.route(topic, payload, now_ms);
        if !ok {
            self.ignored += 1;
        }
        ok
    }

    fn route(&mut self, topic: &str, payload: &[u8], now_ms: u64) -> bool {
        if topic == self.topics.dead_letter_topic {
            return self.refusal(payload, now_ms);
        }
        if let Some((d, c)) = wire::parse_cockpit_topic(&self.topics.cockpit_prefix, topic) {
            let Ok(r) = serde_json::from_slice::<CockpitResult>(payload) else {
                return false;
            };
            let Some(a) = self.activity_of(d, c) else {
                return false;
            };
            a.last_label = Some(r.label as u64);
            a.last_model_version = Some(r.model_version);
            a.last_at_ms = Some(now_ms);
            a.latency_s = Some(now_ms.saturating_sub(r.frame_timestamp_ms) as f64 / 1e3);
            a.count(now_ms, false);
            return true;
        }
        let Some((d, c)) = retained_camera(&self.topics.edge_prefix, topic) else {
            return false;
        };
        if !self.retained.contains_key(topic) && !self.room_for(d, c) {
            return false;
        }
        if payload.is_empty() {
            self.retained.remove(topic); // a cleared retained message
        } else {
            self.retained.insert(topic.to_string(), payload.to_vec());
        }
        true
    }

    fn refusal(&mut self, payload: &[u8], now_ms: u64) -> bool {
        let Ok(dl) = serde_json::from_slice::<DeadLetter>(payload) else {
            return false;
        };
        let camera = wire::parse_camera_topic(&self.topics.edge_prefix, &dl.topic)
            .filter(|t| t.leaf == Leaf::Inference);
        match camera {
            Some(t) => match self.activity_of(t.device, t.camera) {
                Some(a) => {
                    a.count(now_ms, true);
                    true
                }
                None => false,
            },
            None => {
                self.unattributed += 1;
                true
            }
        }
    }

    fn cameras(&self) -> std::collections::BTreeSet<(&str, &str)> {
        let mut set = std::collections::BTreeSet::new();
        for t in self.retained.keys() {
            if let Some(dc) = retained_camera(&self.topics.edge_prefix, t) {
                set.insert(dc);
            }
        }
        set.extend(self.activity.keys().map(|(d, c)| (d.as_str(), c.as_str())));
        set
    }

    fn room_for(&self, d: &str, c: &str) -> bool {
        let cams = self.cameras();
        cams.contains(&(d, c)) || cams.len() < self.max_cameras
    }

    fn activity_of(&mut self, d: &str, c: &str) -> Option<&mut Activity> {
        let key = (d.to_string(), c.to_string());
        if !self.activity.contains_key(&key) && !self.room_for(d, c) {
            return None;
        }
        Some(self.activity.entry(key).or_default())
    }

    /// The page's data at `now_ms`.
    pub fn view(&self, now_ms: u64) -> View {
        let msgs: Vec<(String, Vec<u8>)> = self
            .retained
            .iter()
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect();
        let mut fleet: BTreeMap<(String, String), Camera> =
            fleet::view(&self.topics.edge_prefix, &msgs, now_ms)
                .into_iter()
                .map(|c| ((c.device_id.clone(), c.camera_id.clone()), c))
                .collect();
        for (d, c) in self.activity.keys() {
            fleet
                .entry((d.clone(), c.clone()))
                .or_insert_with(|| Camera::new(d, c));
        }
        let cameras = fleet
            .into_iter()
            .map(|(key, camera)| {
                let a = self.activity.get(&key).cloned().unwrap_or_default();
                let (results, refusals) = a.per_minute(now_ms);
                CameraView {
                    camera,
                    last_label: a.last_label,
                    last_result_model_version: a.last_model_version,
                    last_result_age_s: a.last_at_ms.map(|t| now_ms.saturating_sub(t) as f64 / 1e3),
                    latency_s: a.latency_s,
                    results_last_hour: results.iter().map(|&n| n as u64).sum(),
                    refusals_last_hour: refusals.iter().map(|&n| n as u64).sum(),
                    results_per_minute: results,
                    refusals_per_minute: refusals,
                }
            })
            .collect();
        View {
            now_unix_ms: now_ms,
            cameras,
            ignored_messages: self.ignored,
            refusals_unattributed: self.unattributed,
            broker_connected: false,
        }
    }
}

/// `(device, camera)` of a camera's retained availability or stats topic.
fn retained_camera<'a>(edge_prefix: &str, topic: &'a str) -> Option<(&'a str, &'a str)> {
    wire::parse_camera_topic(edge_prefix, topic)
        .filter(|t| matches!(t.leaf, Leaf::Availability | Leaf::Stats))
        .map(|t| (t.device, t.camera))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board() -> Board {
        Board::new(
            Topics {
                edge_prefix: "fhecam".into(),
                cockpit_prefix: "cockpit".into(),
                dead_letter_topic: "backend/deadletter".into(),
            },
            2,
            4096,
        )
    }

    fn result(label: usize, frame_timestamp_ms: u64) -> Vec<u8> {
        serde_json::to_vec(&CockpitResult {
            device_id: "d1".into(),
            camera_id: "cam0".into(),
            model_id: "00".repeat(16),
            model_version: 2,
            epoch: 0,
            sequence: 0,
            label,
            frame_timestamp_ms,
            frame_time: String::new(),
            decrypt_ms: 1.0,
            logits: None,
        })
        .unwrap()
    }

    #[test]
    fn results_refusals_and_status_meet_on_one_camera() {
        let mut b = board();
        let t0 = 10 * 60_000;
        assert!(b.apply("fhecam/d1/cam0/availability", b"online", t0));
        assert!(b.apply("cockpit/d1/cam0", &result(7, 598_500), t0));
        assert!(b.apply(
            "backend/deadletter",
            br#"{"code":"malformed_envelope","reason":"x","topic":"fhecam/d1/cam0/inference","payload_bytes":3,"time":"t"}"#,
            t0 + 61_000
        ));
        let v = b.view(t0 + 61_000);
        assert_eq!(v.cameras.len(), 1);
        let c = &v.cameras[0];
        assert_eq!(c.camera.availability, "online");
        assert_eq!(c.last_label, Some(7));
        assert_eq!(c.latency_s, Some(1.5));
        assert_eq!((c.results_last_hour, c.refusals_last_hour), (1, 1));
        assert_eq!(c.results_per_minute[HISTORY_MINUTES - 2], 1);
        assert_eq!(c.refusals_per_minute[HISTORY_MINUTES - 1], 1);
        // an hour later the counts have aged out, the last label stays
        let v = b.view(t0 + 61 * 60_000);
        assert_eq!(v.cameras[0].results_last_hour, 0);
        assert_eq!(v.cameras[0].last_label, Some(7));
    }

    #[test]
    fn bounded_and_unreadable_messages_are_counted_not_kept() {
        let mut b = board();
        assert!(b.apply("fhecam/d1/cam0/availability", b"online", 0));
        assert!(b.apply("fhecam/d2/cam0/stats", b"{}", 0));
        // a third camera is beyond max_cameras
        assert!(!b.apply("cockpit/d3/cam0", &result(1, 0), 0));
        assert!(!b.apply("fhecam/d3/cam0/availability", b"online", 0));
        assert!(!b.apply("cockpit/d1/cam0", b"not json", 0));
        assert!(!b.apply("fhecam/d1/cam0/stats", &[b' '; 5000], 0));
        assert!(!b.apply("fhecam/_deploy/all/x", b"x", 0));
        let v = b.view(0);
        assert_eq!(v.cameras.len(), 2);
        assert_eq!(v.ignored_messages, 5);
        // a cleared retained message frees nothing it did not hold, and is taken
        assert!(b.apply("fhecam/d2/cam0/stats", b"", 0));
    }

    #[test]
    fn filters_cover_every_source() {
        let f = board().topics.filters();
        assert_eq!(
            f,
            [
                "fhecam/+/+/availability",
                "fhecam/+/+/stats",
                "cockpit/#",
                "backend/deadletter"
            ]
        );
    }
}
