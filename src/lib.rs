//! fhecam: encrypted-model CNN inference for city cameras.
//!
//! The blocks are crates (README, "Layout"): `fhecam-engine` (model, reference, encrypted
//! evaluation: no I/O), `fhecam-proto` (what the parties agree on), `fhecam-owner`,
//! `fhecam-edge` and `fhecam-agent`. This facade names them as one tree for the binary and
//! the integration tests; the arrows between them are the crates' own dependencies.

pub mod broker;

pub use fhecam_agent as agent;
pub use fhecam_edge as edge;
pub use fhecam_edge::preprocess;
pub use fhecam_engine::{fhe, layer, model, reference, testnet};
pub use fhecam_owner::{advise, data, fleet, npy, secret, store};
#[cfg(feature = "owner-tools")]
pub use fhecam_owner::{import, train, train_tables};
pub use fhecam_proto::{bundle, files, ids, mqtt, retry, settings, wire};
