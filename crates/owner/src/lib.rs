//! The model owner's side: the digits data, quantization-aware training (feature `train`),
//! ONNX import and quantization (feature `import`), the protected-model database with its
//! sealed client keys, protecting a model, building its signed bundle, decrypting results,
//! and the fleet view built from the cameras' status reports.

pub mod advise;
pub mod data;
pub mod decrypt;
pub mod deploy;
pub mod fleet;
#[cfg(feature = "import")]
pub mod import;
pub mod npy;
pub mod protect;
pub mod secret;
pub mod store;
#[cfg(feature = "train")]
pub mod train;
#[cfg(feature = "train")]
pub mod train_tables;
