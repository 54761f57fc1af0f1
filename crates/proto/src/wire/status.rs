//! What a camera reports about itself: the retained status on
//! `<prefix>/<device>/<camera>/stats` (written by the edge, read by `fhecam fleet`).

use serde::{Deserialize, Serialize};

/// A camera's counters at one moment (the edge's `stats::Stats`), as JSON on the stats topic.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    pub frames_captured: u64,
    pub frames_bad: u64,
    pub frames_dropped_preprocess: u64,
    pub frames_skipped_interval: u64,
    pub frames_skipped_static: u64,
    pub frames_dropped_busy: u64,
    pub preprocess_errors: u64,
    pub inferences: u64,
    pub infer_errors: u64,
    pub published: u64,
    pub outbox_dropped: u64,
    pub outbox_pending: u64,
    pub source_restarts: u64,
    pub mqtt_connections: u64,
    pub mqtt_errors: u64,
    pub bundles_accepted: u64,
    pub bundles_refused: u64,
    /// Outbox writes, reads and removals that failed (each logged with its cause; absent
    /// in reports of older cameras).
    #[serde(default)]
    pub outbox_errors: u64,
    /// Outbox entries renamed aside (`*.bad`) as unreadable, oversized or not files.
    #[serde(default)]
    pub outbox_quarantined: u64,
    /// Availability and stats messages the MQTT client could not take.
    #[serde(default)]
    pub publish_errors: u64,
    /// Drop-directory and bundle-file errors of the intake (refusals are `bundles_refused`).
    #[serde(default)]
    pub intake_errors: u64,
    /// Unix ms when the last inference finished (absent: none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_inference_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refusal: Option<String>,
}

/// The retained message on `<prefix>/<device>/<camera>/stats`: the counters and the model
/// running now, what `fhecam fleet` shows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    #[serde(flatten)]
    pub counters: Snapshot,
    pub model_id: String,
    pub model_name: String,
    pub model_version: u32,
    pub input_mode: String,
    /// When this message was made (unix ms), for the age of the other times.
    pub sent_unix_ms: u64,
}
