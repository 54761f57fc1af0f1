//! fhecam: encrypted-model CNN inference for city cameras.
//!
//! The engine (`model`, `reference`, `fhe`) knows nothing of tokio, MQTT or GStreamer.

pub mod agent;
pub mod bench;
pub mod bundle;
pub mod data;
pub mod edge;
pub mod envelope;
pub mod fhe;
pub mod files;
pub mod fleet;
pub mod ids;
#[cfg(feature = "owner-tools")]
pub mod import;
pub mod model;
pub mod mqtt;
pub mod npy;
pub mod preprocess;
pub mod reference;
pub mod retry;
pub mod secret;
pub mod settings;
pub mod store;
pub mod testnet;
#[cfg(feature = "owner-tools")]
pub mod train;
