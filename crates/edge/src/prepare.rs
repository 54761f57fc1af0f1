//! The preprocess stage: frames from the source → intensities for the running model →
//! the sampling and motion gate → quantized jobs for the infer stage.

use super::deploy::Current;
use super::gate::{Decision, Gate};
use super::infer::Job;
use super::source::Frame;
use super::stats::Stats;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::Instant;

/// Preprocesses each frame for the model running now, lets the gate skip it, and hands
/// it to a free inference slot: dropped (counted) when every slot is busy, unless
/// `every_frame` (a file source) makes it wait.
pub fn run(
    frames: std_mpsc::Receiver<Frame>,
    to_infer: std_mpsc::SyncSender<Job>,
    every_frame: bool,
    current: Arc<Current>,
    mut gate: Gate,
    stats: Arc<Stats>,
) {
    for frame in frames {
        // the frame is bound here to the model it is preprocessed for, until it finishes
        let model = current.get();
        let spec = &model.header.input;
        let x = match crate::preprocess::intensities(&frame.image, spec) {
            Ok(x) => x,
            Err(e) => {
                stats.preprocess_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("preprocess: {e}");
                continue;
            }
        };
        match gate.decide(&x, Instant::now()) {
            Decision::Accept => {}
            Decision::Interval => {
                stats
                    .frames_skipped_interval
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Decision::Static => {
                stats.frames_skipped_static.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        let q = spec.quantize(&x);
        let job = Job {
            model,
            x: q,
            timestamp_ms: frame.timestamp_ms,
        };
        if every_frame {
            if to_infer.send(job).is_err() {
                return;
            }
            continue;
        }
        match to_infer.try_send(job) {
            Ok(()) => {}
            Err(std_mpsc::TrySendError::Full(_)) => {
                stats.frames_dropped_busy.fetch_add(1, Ordering::Relaxed);
                gate.forget();
            }
            Err(std_mpsc::TrySendError::Disconnected(_)) => return,
        }
    }
}
