//! The daemon's counters: every frame and every inference is accounted for, and published
//! periodically on the stats topic.

pub use fhecam_proto::wire::status::Snapshot;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Why bundles were refused, as the metrics label them.
pub mod refusal {
    /// Older than a version this camera accepted (rollback).
    pub const ROLLBACK: &str = "rollback";
    /// Same version as one accepted, other bytes.
    pub const CONFLICT: &str = "conflict";
    /// Protected before the newest model accepted.
    pub const STALE: &str = "stale";
    /// Not a bundle signed by the owner, corrupt, or not runnable here.
    pub const INVALID: &str = "invalid";
    /// The intake's queue was full.
    pub const BUSY: &str = "busy";
    /// A dropped file that could not be read.
    pub const UNREADABLE: &str = "unreadable";
    /// Every code: the metrics show each, 0 until it happens.
    pub const ALL: [&str; 6] = [ROLLBACK, CONFLICT, STALE, INVALID, BUSY, UNREADABLE];
}

#[derive(Debug, Default)]
pub struct Stats {
    /// Frames pulled from the appsink.
    pub frames_captured: AtomicU64,
    /// Frames that could not be converted (unexpected format).
    pub frames_bad: AtomicU64,
    /// Frames dropped because preprocessing was still busy with the previous one.
    pub frames_dropped_preprocess: AtomicU64,
    /// Frames skipped by the sampling interval.
    pub frames_skipped_interval: AtomicU64,
    /// Frames skipped by the motion gate (static scene).
    pub frames_skipped_static: AtomicU64,
    /// Frames dropped because `max_in_flight` inferences were running.
    pub frames_dropped_busy: AtomicU64,
    /// Frames that failed preprocessing.
    pub preprocess_errors: AtomicU64,
    /// Encrypted inferences finished (and written to the outbox).
    pub inferences: AtomicU64,
    /// Encrypted inferences that failed.
    pub infer_errors: AtomicU64,
    /// Inferences acknowledged by the broker (PUBACK) and removed from the outbox.
    pub published: AtomicU64,
    /// Outbox entries dropped because the outbox was full (oldest first).
    pub outbox_dropped: AtomicU64,
    /// Entries in the outbox now.
    pub outbox_pending: AtomicU64,
    /// Camera pipeline restarts (errors, stalls).
    pub source_restarts: AtomicU64,
    /// Connections to the broker established (the first one included).
    pub mqtt_connections: AtomicU64,
    /// Lost connections and failed connection attempts.
    pub mqtt_errors: AtomicU64,
    /// Bundles taken while running (pushed, dropped, reloaded) and swapped in.
    pub bundles_accepted: AtomicU64,
    /// Bundles refused while running (bad signature, rollback, unusable).
    pub bundles_refused: AtomicU64,
    /// Outbox writes, reads and removals that failed.
    pub outbox_errors: AtomicU64,
    /// Outbox entries renamed aside as unreadable.
    pub outbox_quarantined: AtomicU64,
    /// Availability and stats messages the MQTT client could not take.
    pub publish_errors: AtomicU64,
    /// Drop-directory and bundle-file errors of the intake.
    pub intake_errors: AtomicU64,
    /// Unix ms when the last inference finished (0: none yet).
    pub last_inference_unix_ms: AtomicU64,
    /// Why the last refused bundle was refused.
    pub last_refusal: Mutex<Option<String>>,
    // For the metrics endpoint only (not on the stats topic):
    /// PBS done by finished inferences.
    pub pbs_done: AtomicU64,
    /// Connected to the broker now.
    pub mqtt_connected: AtomicBool,
    /// Unix ms when the oldest outbox entry was written (0: the outbox is empty).
    pub outbox_oldest_unix_ms: AtomicU64,
    /// Bundles refused, by [`refusal`] code.
    pub refused_by: Mutex<BTreeMap<&'static str, u64>>,
    /// How long each finished inference took.
    pub inference_seconds: fhecam_metrics::Seconds,
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            frames_captured: g(&self.frames_captured),
            frames_bad: g(&self.frames_bad),
            frames_dropped_preprocess: g(&self.frames_dropped_preprocess),
            frames_skipped_interval: g(&self.frames_skipped_interval),
            frames_skipped_static: g(&self.frames_skipped_static),
            frames_dropped_busy: g(&self.frames_dropped_busy),
            preprocess_errors: g(&self.preprocess_errors),
            inferences: g(&self.inferences),
            infer_errors: g(&self.infer_errors),
            published: g(&self.published),
            outbox_dropped: g(&self.outbox_dropped),
            outbox_pending: g(&self.outbox_pending),
            source_restarts: g(&self.source_restarts),
            mqtt_connections: g(&self.mqtt_connections),
            mqtt_errors: g(&self.mqtt_errors),
            bundles_accepted: g(&self.bundles_accepted),
            bundles_refused: g(&self.bundles_refused),
            outbox_errors: g(&self.outbox_errors),
            outbox_quarantined: g(&self.outbox_quarantined),
            publish_errors: g(&self.publish_errors),
            intake_errors: g(&self.intake_errors),
            last_inference_unix_ms: Some(g(&self.last_inference_unix_ms)).filter(|&t| t > 0),
            last_refusal: self.last_refusal.lock().ok().and_then(|r| r.clone()),
        }
    }

    /// Counts a refused bundle (`code`: one of [`refusal`]) and keeps its reason for the
    /// stats topic.
    pub fn refused(&self, code: &'static str, reason: String) {
        self.bundles_refused.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut by) = self.refused_by.lock() {
            *by.entry(code).or_default() += 1;
        }
        if let Ok(mut r) = self.last_refusal.lock() {
            *r = Some(reason);
        }
    }
}
