//! The camera's Prometheus metrics: read on each scrape from the daemon's own counters
//! ([`Stats`]), so they equal what the stats topic reports, plus the inference duration
//! histogram and the model running now.

use super::deploy::Current;
use super::stats::{Snapshot, Stats};
use fhecam_metrics::{Emit, Exporter};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub fn exporter(stats: Arc<Stats>, current: Arc<Current>, input_mode: &'static str) -> Exporter {
    let histograms = stats.clone();
    let x = Exporter::new("fhecam_camera", move |e: &mut Emit| {
        let s = stats.snapshot();
        frames(e, &s);
        work(e, &s, &stats);
        bundles(e, &s, &stats);
        model(e, &current, input_mode);
    });
    x.histogram(
        &histograms.inference_seconds,
        "inference_duration_seconds",
        "Duration of an encrypted inference, frame in to ciphertext out",
    );
    x
}

/// What happened to the frames before inference.
fn frames(e: &mut Emit, s: &Snapshot) {
    e.counter(
        "frames_captured",
        "Frames pulled from the camera pipeline",
        s.frames_captured,
    );
    e.counters_by(
        "frames_gated",
        "Frames skipped on purpose: the sampling interval, or a static scene (motion gate)",
        "reason",
        &[
            ("interval", s.frames_skipped_interval),
            ("static", s.frames_skipped_static),
        ],
    );
    e.counters_by(
        "frames_dropped",
        "Frames lost before inference, by reason",
        "reason",
        &[
            ("bad_format", s.frames_bad),
            ("preprocess_busy", s.frames_dropped_preprocess),
            ("preprocess_error", s.preprocess_errors),
            ("infer_busy", s.frames_dropped_busy),
        ],
    );
}

/// Inferences, their PBS, the outbox and the broker link.
fn work(e: &mut Emit, s: &Snapshot, stats: &Stats) {
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    e.counter(
        "inferences",
        "Encrypted inferences finished and written to the outbox",
        s.inferences,
    );
    e.counter(
        "inference_errors",
        "Encrypted inferences that failed",
        s.infer_errors,
    );
    e.counter(
        "pbs",
        "Programmable bootstraps done by finished inferences",
        g(&stats.pbs_done),
    );
    e.counter(
        "published",
        "Inferences the broker acknowledged",
        s.published,
    );
    e.counter(
        "outbox_dropped",
        "Inferences dropped because the outbox was full",
        s.outbox_dropped,
    );
    e.counter(
        "outbox_quarantined",
        "Outbox entries set aside as unreadable",
        s.outbox_quarantined,
    );
    e.gauge(
        "outbox_entries",
        "Inferences waiting in the outbox",
        s.outbox_pending as f64,
    );
    let oldest = g(&stats.outbox_oldest_unix_ms);
    let age = match oldest {
        0 => 0.0,
        t => fhecam_proto::ids::unix_now_ms().saturating_sub(t) as f64 / 1e3,
    };
    e.gauge(
        "outbox_oldest_age_seconds",
        "Age of the oldest waiting inference (0: none waits)",
        age,
    );
    e.mqtt_connected(stats.mqtt_connected.load(Ordering::Relaxed));
    e.counter(
        "mqtt_connections",
        "Connections to the broker established",
        s.mqtt_connections,
    );
    e.counter(
        "source_restarts",
        "Camera pipeline restarts",
        s.source_restarts,
    );
}

/// Bundles taken and refused while running.
fn bundles(e: &mut Emit, s: &Snapshot, stats: &Stats) {
    e.counter(
        "bundles_accepted",
        "Bundles taken while running and swapped in",
        s.bundles_accepted,
    );
    e.counters_in(
        "bundles_refused",
        "Bundles refused while running, by reason",
        "reason",
        &stats.refused_by,
        &super::stats::refusal::ALL,
    );
}

/// The model running now.
fn model(e: &mut Emit, current: &Current, input_mode: &str) {
    let m = current.get();
    e.info(
        "model",
        "The model running now",
        vec![
            ("model_id", m.header.model_id.to_string()),
            ("model_name", m.header.name.clone()),
            ("model_version", m.header.version.to_string()),
            ("input_mode", input_mode.into()),
        ],
    );
}
