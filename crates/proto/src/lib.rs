//! What the owner, the cameras and the backend agree on: ids, signed bundles, the MQTT
//! contract (topics and payloads: [`wire`]), size-limited file reads, the MQTT connection
//! settings (with TLS) and reconnect backoff, and the configuration files' environment
//! overrides.

pub mod bundle;
pub mod files;
pub mod ids;
pub mod mqtt;
pub mod retry;
pub mod settings;
pub mod wire;
