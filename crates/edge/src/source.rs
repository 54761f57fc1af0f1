//! The frame source: a GStreamer pipeline ending in an appsink, pulled from a thread of
//! our own (never a GStreamer streaming thread, never tokio's). A stalled or failing camera
//! is restarted with jittered exponential backoff; end of stream ends the source cleanly.

use super::stats::Stats;
use fhecam_proto::retry::backoff;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use opencv::core::{Mat, Scalar, CV_8UC1, CV_8UC3};
use opencv::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("GStreamer could not be initialised: {0}")]
    Init(String),
    #[error("pipeline {pipeline:?}: {msg}")]
    Pipeline { pipeline: String, msg: String },
    #[error("frame: {0}")]
    Frame(String),
}

/// One captured frame, grey or BGR, as OpenCV holds it.
pub struct Frame {
    pub image: Mat,
    /// Capture time, unix milliseconds.
    pub timestamp_ms: u64,
}

/// How the pull loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SourceEnd {
    /// The pipeline reached end of stream (a file source played out).
    Eos,
    /// Shutdown was requested.
    Cancelled,
    /// The consumer went away.
    Closed,
}

pub struct SourceOptions {
    pub pipeline: String,
    /// Back-pressure instead of dropping: the appsink blocks the pipeline while full.
    pub every_frame: bool,
    pub stall_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// Builds the pipeline and returns it with its appsink, set to keep only the newest frame.
fn build(desc: &str, every_frame: bool) -> Result<(gst::Pipeline, gst_app::AppSink), SourceError> {
    let err = |msg: String| SourceError::Pipeline {
        pipeline: desc.into(),
        msg,
    };
    let element = gst::parse::launch(desc).map_err(|e| err(e.to_string()))?;
    let pipeline = match element.downcast::<gst::Pipeline>() {
        Ok(p) => p,
        Err(e) => {
            // a single element: wrap it so it has a bus and a clock like any pipeline
            let p = gst::Pipeline::new();
            p.add(&e).map_err(|e| err(e.to_string()))?;
            p
        }
    };
    let sink = pipeline
        .iterate_sinks()
        .into_iter()
        .flatten()
        .find_map(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or_else(|| err("has no appsink to take frames from".into()))?;
    // Latest frame only: a busy daemon skips frames instead of queueing stale ones.
    sink.set_max_buffers(1);
    sink.set_drop(!every_frame);
    sink.set_property("sync", false);
    let caps = gst::Caps::builder("video/x-raw")
        .field("format", gst::List::new(["GRAY8", "BGR"]))
        .build();
    sink.set_caps(Some(&caps));
    Ok((pipeline, sink))
}

/// Checks that a pipeline description parses and has an appsink (for `fhecam validate`).
pub fn check_pipeline(desc: &str) -> Result<(), SourceError> {
    gst::init().map_err(|e| SourceError::Init(e.to_string()))?;
    build(desc, false).map(|_| ())
}

fn to_mat(sample: &gst::Sample) -> Result<Mat, SourceError> {
    let bad = |m: &str| SourceError::Frame(m.into());
    let caps = sample.caps().ok_or_else(|| bad("sample without caps"))?;
    let s = caps.structure(0).ok_or_else(|| bad("empty caps"))?;
    let w = s
        .get::<i32>("width")
        .map_err(|_| bad("caps without width"))?;
    let h = s
        .get::<i32>("height")
        .map_err(|_| bad("caps without height"))?;
    let format = s
        .get::<&str>("format")
        .map_err(|_| bad("caps without format"))?;
    let (typ, bpp) = match format {
        "GRAY8" => (CV_8UC1, 1usize),
        "BGR" => (CV_8UC3, 3),
        f => return Err(SourceError::Frame(format!("unexpected format {f}"))),
    };
    if w <= 0 || h <= 0 {
        return Err(bad("empty frame"));
    }
    let buffer = sample
        .buffer()
        .ok_or_else(|| bad("sample without buffer"))?;
    let map = buffer
        .map_readable()
        .map_err(|_| bad("unreadable buffer"))?;
    let data = map.as_slice();
    let (w, h) = (w as usize, h as usize);
    // GStreamer pads each row to a multiple of 4 bytes; derive the stride from the size.
    let stride = data.len() / h;
    if stride < w * bpp {
        return Err(SourceError::Frame(format!(
            "buffer of {} bytes too small for {w}x{h} {format}",
            data.len()
        )));
    }
    let mut m = Mat::new_rows_cols_with_default(h as i32, w as i32, typ, Scalar::all(0.0))
        .map_err(|e| SourceError::Frame(e.to_string()))?;
    let out = m
        .data_bytes_mut()
        .map_err(|e| SourceError::Frame(e.to_string()))?;
    for y in 0..h {
        out[y * w * bpp..(y + 1) * w * bpp]
            .copy_from_slice(&data[y * stride..y * stride + w * bpp]);
    }
    Ok(m)
}

/// Why one run of the pipeline stopped.
enum RunEnd {
    End(SourceEnd),
    Restart(String),
}

/// Pulls frames until end of stream, cancellation or a closed consumer; restarts the
/// pipeline on errors and stalls. `deliver` gets each frame and returns false when the
/// consumer is gone.
pub fn run(
    opts: &SourceOptions,
    stats: &Stats,
    cancel: &CancellationToken,
    on_playing: &mut dyn FnMut(),
    deliver: &mut dyn FnMut(Frame) -> bool,
) -> Result<SourceEnd, SourceError> {
    gst::init().map_err(|e| SourceError::Init(e.to_string()))?;
    let mut failures = 0u32;
    let mut ever_played = false;
    loop {
        let outcome = match build(&opts.pipeline, opts.every_frame) {
            // a pipeline that does not even parse will not get better: stop
            Err(e) if !ever_played => return Err(e),
            Err(e) => RunEnd::Restart(e.to_string()),
            Ok((pipeline, sink)) => {
                let mut playing = || {
                    ever_played = true;
                    on_playing();
                };
                let r = run_once(&pipeline, &sink, opts, stats, cancel, &mut playing, deliver);
                let _ = pipeline.set_state(gst::State::Null);
                r
            }
        };
        match outcome {
            RunEnd::End(end) => return Ok(end),
            // a camera that never delivered a frame is missing or misconfigured: say so
            // and stop (systemd restarts the service); one that worked is restarted here
            RunEnd::Restart(why) if !ever_played => {
                return Err(SourceError::Pipeline {
                    pipeline: opts.pipeline.clone(),
                    msg: format!("no frame: {why}"),
                })
            }
            RunEnd::Restart(why) => {
                let wait = backoff(opts.backoff_initial, opts.backoff_max, failures);
                failures += 1;
                stats.source_restarts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "camera: {why}; restarting the pipeline in {:.1} s",
                    wait.as_secs_f64()
                );
                if wait_or_cancel(cancel, wait) {
                    return Ok(SourceEnd::Cancelled);
                }
            }
        }
    }
}

/// Sleeps `d`; true when cancelled meanwhile.
fn wait_or_cancel(cancel: &CancellationToken, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if cancel.is_cancelled() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    cancel.is_cancelled()
}

fn run_once(
    pipeline: &gst::Pipeline,
    sink: &gst_app::AppSink,
    opts: &SourceOptions,
    stats: &Stats,
    cancel: &CancellationToken,
    on_playing: &mut dyn FnMut(),
    deliver: &mut dyn FnMut(Frame) -> bool,
) -> RunEnd {
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        return RunEnd::Restart(format!("cannot start: {e}"));
    }
    let bus = match pipeline.bus() {
        Some(b) => b,
        None => return RunEnd::Restart("pipeline without a bus".into()),
    };
    let mut last_frame = Instant::now();
    let mut playing = false;
    loop {
        if cancel.is_cancelled() {
            return RunEnd::End(SourceEnd::Cancelled);
        }
        while let Some(msg) = bus.pop() {
            use gst::MessageView;
            match msg.view() {
                MessageView::Error(e) => {
                    return RunEnd::Restart(format!(
                        "{} ({})",
                        e.error(),
                        e.debug().map(|d| d.to_string()).unwrap_or_default()
                    ))
                }
                MessageView::Eos(_) => return RunEnd::End(SourceEnd::Eos),
                _ => {}
            }
        }
        match sink.try_pull_sample(gst::ClockTime::from_mseconds(100)) {
            Some(sample) => {
                last_frame = Instant::now();
                if !playing {
                    playing = true;
                    on_playing();
                }
                stats.frames_captured.fetch_add(1, Ordering::Relaxed);
                match to_mat(&sample) {
                    Ok(image) => {
                        let frame = Frame {
                            image,
                            timestamp_ms: fhecam_proto::ids::unix_now_ms(),
                        };
                        if !deliver(frame) {
                            return RunEnd::End(SourceEnd::Closed);
                        }
                    }
                    Err(e) => {
                        stats.frames_bad.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("camera: dropped a frame: {e}");
                    }
                }
            }
            None if sink.is_eos() => return RunEnd::End(SourceEnd::Eos),
            None if last_frame.elapsed() > opts.stall_timeout => {
                return RunEnd::Restart(format!(
                    "no frame for {:.1} s",
                    opts.stall_timeout.as_secs_f64()
                ))
            }
            None => {}
        }
    }
}
