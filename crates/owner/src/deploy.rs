//! Deploying a stored model version: its public record (architecture, encrypted
//! parameters, public key, evaluation key) as a bundle signed with the owner's key. The
//! binary writes it, pushes it to the fleet, and waits for cameras to confirm.

use crate::store::{PublicRecord, Store, StoreError};
use ed25519_dalek::SigningKey;
use fhecam_engine::fhe::{self, FheError};
use fhecam_proto::bundle::{self, BundleError, BundleMeta};
use fhecam_proto::ids::ModelId;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DeployError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("model {id} cannot be deployed as it is stored: {source}")]
    Stored { id: ModelId, source: FheError },
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// A signed bundle and the record it was built from.
pub struct Built {
    pub bytes: Vec<u8>,
    pub record: PublicRecord,
}

/// Builds and signs the bundle of model `id`, then verifies it with the key's public half
/// (framing and signature) before anything leaves the owner.
pub fn build_bundle(store: &Store, id: &ModelId, key: &SigningKey) -> Result<Built, DeployError> {
    let record = store.public_record(id)?;
    fhe::check_evaluation_key_format(&record.server_key)
        .map_err(|source| DeployError::Stored { id: *id, source })?;
    let s = &record.summary;
    let bytes = bundle::build(
        BundleMeta {
            model_id: s.id,
            name: s.name.clone(),
            version: s.version,
            created_unix: s.created_unix,
            input: record.arch.input.clone(),
            num_classes: record.arch.num_classes,
        },
        &record.encrypted_model,
        &record.public_key,
        &record.server_key,
        key,
    )?;
    bundle::verify(&bytes, &key.verifying_key())?;
    Ok(Built { bytes, record })
}
