//! What the owner, the cameras and the backend agree on: ids, envelopes, signed bundles,
//! size-limited file reads, the MQTT connection settings (with TLS) and reconnect backoff,
//! the configuration files' environment overrides, and the cameras' retained status.

pub mod bundle;
pub mod envelope;
pub mod files;
pub mod ids;
pub mod mqtt;
pub mod retry;
pub mod settings;
pub mod status;
