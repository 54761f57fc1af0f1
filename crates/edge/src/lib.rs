//! The edge daemon (`fhecam run`): GStreamer frames → OpenCV preprocessing → encrypted CNN
//! → MQTT, losing no inference, and the deployment of new bundles to a running camera. The
//! engine it calls knows nothing of this crate.
//!
//! The stages, in frame order: [`source`] (GStreamer capture), [`prepare`] (preprocessing
//! and the [`gate`]), [`infer`] (the encrypted model, the drain), [`link`] (the outbox and
//! MQTT, [`inflight`] its bookkeeping). Bundles enter through [`intake`] (dropped files,
//! SIGHUP, and [`push`]: the deployment topics the link subscribes to) and are judged by
//! [`deploy`]. [`daemon`] wires the stages and shuts them down.

pub mod config;
pub mod daemon;
pub mod deploy;
pub mod files;
pub mod gate;
pub mod health;
pub mod infer;
pub mod inflight;
pub mod intake;
pub mod link;
pub mod metrics;
pub mod outbox;
pub mod prepare;
pub mod preprocess;
pub mod push;
pub mod source;
pub mod stats;

pub use config::EdgeConfig;
pub use daemon::{run, Milestone, RunReport};
