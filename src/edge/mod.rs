//! The edge daemon (`fhecam run`): GStreamer frames → OpenCV preprocessing → encrypted CNN
//! → MQTT, losing no inference. The engine it calls knows nothing of this module.

pub mod config;
pub mod daemon;
pub mod deploy;
pub mod gate;
pub mod intake;
pub mod outbox;
pub mod publish;
pub mod source;
pub mod stats;

pub use config::EdgeConfig;
pub use daemon::{run, Milestone, RunReport};
