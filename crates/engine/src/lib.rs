//! The engine: the model IR, the plaintext integer reference, and encrypted evaluation
//! (exact TFHE circuits, keys, encrypted formats). It knows nothing of tokio, MQTT,
//! GStreamer or files: the other crates bring the bytes and call it.

pub mod fhe;
pub mod lut;
pub mod model;
pub mod reference;
pub mod testnet;
