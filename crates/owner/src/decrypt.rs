//! Reading results as the owner: an envelope's ciphertext decrypted with the key of the
//! model and version it names, unsealed from the model database once per model.

use crate::secret::Passphrase;
use crate::store::{ModelSummary, Store, StoreError};
use fhecam_engine::fhe::{EncryptedOutput, FheError, OwnerKeys};
use fhecam_proto::ids::ModelId;
use fhecam_proto::wire::envelope::{self, Envelope, EnvelopeError};
use std::collections::HashMap;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum DecryptError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "result claims version {claimed} of model {id}, which is version {stored} in the database"
    )]
    Version {
        id: ModelId,
        claimed: u32,
        stored: u32,
    },
    /// Unsealing this model's key failed before (Argon2 is not run again for it).
    #[error("{0}")]
    Key(String),
    #[error(transparent)]
    Fhe(#[from] FheError),
}

/// A decrypted result and what its envelope said.
pub struct Decrypted {
    pub envelope: Envelope,
    pub model: ModelSummary,
    pub label: usize,
    pub logits: Vec<i64>,
}

/// Decrypts envelopes against a model database, unsealing each model's key at most once
/// (Argon2id costs about half a second), failures included.
pub struct Decryptor<'a> {
    store: &'a Store,
    pass: &'a Passphrase,
    keys: HashMap<ModelId, Result<OwnerKeys, String>>,
}

impl<'a> Decryptor<'a> {
    pub fn new(store: &'a Store, pass: &'a Passphrase) -> Self {
        Decryptor {
            store,
            pass,
            keys: HashMap::new(),
        }
    }

    /// Decodes an envelope (`envelope::decode`'s checks) and decrypts its result.
    pub fn decrypt(&mut self, envelope_bytes: &[u8]) -> Result<Decrypted, DecryptError> {
        let env = envelope::decode(envelope_bytes)?;
        let model = self.store.summary(&env.model_id)?;
        if model.version != env.model_version {
            return Err(DecryptError::Version {
                id: env.model_id,
                claimed: env.model_version,
                stored: model.version,
            });
        }
        let (store, pass) = (self.store, self.pass);
        let key = self.keys.entry(env.model_id).or_insert_with(|| {
            store
                .owner_keys(&env.model_id, pass)
                .map_err(|e| e.to_string())
        });
        let key = key.as_ref().map_err(|e| DecryptError::Key(e.clone()))?;
        let d = EncryptedOutput::from_bytes(&env.ciphertext)?.decrypt(key)?;
        Ok(Decrypted {
            envelope: env,
            model,
            label: d.label,
            logits: d.logits,
        })
    }
}
