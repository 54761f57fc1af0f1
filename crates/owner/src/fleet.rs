//! The fleet as the broker's retained messages show it: each camera's availability and its
//! last status (the model it runs, its counters). Pure: messages in, rows out; the MQTT
//! client is the binary's (`fhecam fleet`, `fhecam models --broker`).

use fhecam_proto::wire::{self, Availability, CameraTopic, Leaf, Status};
use serde::Serialize;
use std::collections::BTreeMap;

/// Largest status message read: a camera's is a few KB. A larger one is that camera's note.
pub const MAX_STATUS_BYTES: usize = 1 << 20;

/// The topic filters that carry the fleet's retained messages.
pub fn filters(prefix: &str) -> [String; 2] {
    [
        wire::camera_filter(prefix, Leaf::Availability),
        wire::camera_filter(prefix, Leaf::Stats),
    ]
}

/// One camera as the fleet view lists it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Camera {
    pub device_id: String,
    pub camera_id: String,
    /// `online`, `offline` (shut down or lost: the broker published its last will), or
    /// `unknown` (no availability message retained).
    pub availability: String,
    pub model_name: Option<String>,
    pub model_version: Option<u32>,
    pub model_id: Option<String>,
    pub input_mode: Option<String>,
    pub frames_captured: Option<u64>,
    pub inferences: Option<u64>,
    /// Frames dropped before inference (preprocessing busy, every inference slot busy).
    pub frames_dropped: Option<u64>,
    /// Inferences dropped because the outbox was full.
    pub outbox_dropped: Option<u64>,
    /// Inferences waiting in the outbox when the status was sent.
    pub outbox_pending: Option<u64>,
    /// Seconds since the camera finished its last inference (by the two clocks).
    pub last_inference_age_s: Option<f64>,
    /// Seconds since the camera sent the status shown.
    pub status_age_s: Option<f64>,
    pub bundles_refused: Option<u64>,
    pub last_refusal: Option<String>,
    /// Why the status could not be read, if it could not.
    pub note: Option<String>,
}

impl Camera {
    pub fn new(device_id: &str, camera_id: &str) -> Self {
        Camera {
            device_id: device_id.into(),
            camera_id: camera_id.into(),
            availability: "unknown".into(),
            model_name: None,
            model_version: None,
            model_id: None,
            input_mode: None,
            frames_captured: None,
            inferences: None,
            frames_dropped: None,
            outbox_dropped: None,
            outbox_pending: None,
            last_inference_age_s: None,
            status_age_s: None,
            bundles_refused: None,
            last_refusal: None,
            note: None,
        }
    }

    fn set_status(&mut self, s: &Status, now_ms: u64) {
        let c = &s.counters;
        let age = |t: u64| now_ms.saturating_sub(t) as f64 / 1e3;
        self.model_name = Some(s.model_name.clone());
        self.model_version = Some(s.model_version);
        self.model_id = Some(s.model_id.clone());
        self.input_mode = Some(s.input_mode.clone());
        self.frames_captured = Some(c.frames_captured);
        self.inferences = Some(c.inferences);
        self.frames_dropped = Some(c.frames_dropped_preprocess + c.frames_dropped_busy);
        self.outbox_dropped = Some(c.outbox_dropped);
        self.outbox_pending = Some(c.outbox_pending);
        self.last_inference_age_s = c.last_inference_unix_ms.map(age);
        self.status_age_s = Some(age(s.sent_unix_ms));
        self.bundles_refused = Some(c.bundles_refused);
        self.last_refusal = c.last_refusal.clone();
    }
}

/// The cameras seen in `messages` (topic, payload), by device and camera. A message that
/// cannot be read becomes the camera's `note`, never an error: one bad camera must not
/// hide the others.
pub fn view(prefix: &str, messages: &[(String, Vec<u8>)], now_ms: u64) -> Vec<Camera> {
    let mut cams: BTreeMap<(String, String), Camera> = BTreeMap::new();
    for (topic, payload) in messages {
        let Some(CameraTopic {
            device: d,
            camera: c,
            leaf,
        }) = wire::parse_camera_topic(prefix, topic)
        else {
            continue;
        };
        if payload.is_empty() {
            continue; // a cleared retained message
        }
        let cam = cams
            .entry((d.into(), c.into()))
            .or_insert_with(|| Camera::new(d, c));
        match leaf {
            Leaf::Availability => {
                cam.availability = Availability::parse(payload)
                    .map_or("unknown", Availability::as_str)
                    .into()
            }
            Leaf::Stats if payload.len() > MAX_STATUS_BYTES => {
                cam.note = Some(format!(
                    "status of {} bytes, over the {MAX_STATUS_BYTES}-byte limit: skipped",
                    payload.len()
                ))
            }
            Leaf::Stats => match serde_json::from_slice::<Status>(payload) {
                Ok(s) => cam.set_status(&s, now_ms),
                Err(e) => cam.note = Some(format!("status unreadable (an older fhecam?): {e}")),
            },
            Leaf::Inference => {}
        }
    }
    cams.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_status_is_a_note() {
        let msgs = vec![
            (
                "fhecam/d1/cam0/availability".to_string(),
                b"online".to_vec(),
            ),
            ("fhecam/d1/cam0/stats".to_string(), b"{\"x\":1}".to_vec()),
            (
                "fhecam/d2/cam0/availability".to_string(),
                b"offline".to_vec(),
            ),
        ];
        let v = view("fhecam", &msgs, 0);
        assert_eq!(v.len(), 2);
        let big = vec![(
            "fhecam/d3/cam0/stats".to_string(),
            vec![b' '; MAX_STATUS_BYTES + 1],
        )];
        let n = view("fhecam", &big, 0)[0].note.clone().unwrap();
        assert!(n.contains("over the 1048576-byte limit"), "{n}");
        assert_eq!(v[0].availability, "online");
        assert!(v[0].note.as_deref().unwrap().contains("unreadable"));
        assert_eq!(v[1].availability, "offline");
        assert_eq!(v[1].model_version, None);
    }
}
