//! fhecam: encrypted-model CNN inference for city cameras.
//!
//! The engine (`model`, `reference`, `fhe`) knows nothing of tokio, MQTT or GStreamer.

pub mod bench;
pub mod data;
pub mod fhe;
pub mod model;
pub mod reference;
pub mod testnet;
pub mod train;
