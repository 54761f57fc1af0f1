//! The backend decryption agent (`fhecam agent`): encrypted inferences in, labels for the
//! city cockpit out, refusals to a dead-letter topic. See docs/THREAT_MODEL.md.

#[allow(clippy::module_inception)]
pub mod agent;
pub mod config;
pub mod guard;
pub mod processor;
pub mod session;

pub use agent::{run, AgentStats};
pub use config::AgentConfig;
pub use processor::{AgentError, Processor};
