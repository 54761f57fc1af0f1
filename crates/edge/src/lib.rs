//! The edge daemon (`fhecam run`): GStreamer frames → OpenCV preprocessing → encrypted CNN
//! → MQTT, losing no inference, and the deployment of new bundles to a running camera. The
//! engine it calls knows nothing of this crate.

pub mod config;
pub mod daemon;
pub mod deploy;
pub mod files;
pub mod gate;
pub mod health;
pub mod intake;
pub mod outbox;
pub mod preprocess;
pub mod publish;
pub mod source;
pub mod stats;

pub use config::EdgeConfig;
pub use daemon::{run, Milestone, RunReport};
