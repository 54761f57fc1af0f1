//! Protecting a model: fresh TFHE keys, every weight and bias encrypted, the secret keys
//! sealed under the owner's passphrase, all stored as a new version in the model database.
//! The binary's `fhecam protect` adds the progress display and the summary lines.

use crate::secret::{KdfParams, Passphrase};
use crate::store::{self, NewModel, Store, StoreError};
use fhecam_engine::fhe::{EncryptedModel, FheError, OwnerKeys};
use fhecam_engine::model::Model;
use fhecam_proto::ids::ModelId;
use std::time::Instant;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProtectError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("encrypting the model: {0}")]
    Fhe(#[from] FheError),
}

/// The slow steps, announced before each starts (for a progress display).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Client, compact public, compressed server and compression keys (seconds).
    Keys,
    /// Every weight and bias digit, and the clear tables of layers that read the frame.
    Encrypt,
    /// Argon2id + XChaCha20-Poly1305 over the secret keys, then the database insert.
    SealAndStore,
}

/// What was stored, with sizes and times for the summary.
#[derive(Clone, Debug)]
pub struct Protected {
    pub id: ModelId,
    pub name: String,
    pub version: u32,
    /// Encrypted parameters (compressed ciphertexts).
    pub ciphertexts: usize,
    /// Secret tables: owner-encrypted GLWE accumulators, one per secret-table PBS.
    pub tables: usize,
    pub encrypted_model_bytes: usize,
    pub public_key_bytes: usize,
    /// The evaluation key: compressed server key and compression key.
    pub evaluation_key_bytes: usize,
    pub sealed_key_bytes: usize,
    pub keygen_s: f64,
    pub encrypt_s: f64,
    pub store_s: f64,
}

/// Protects `model` as a new version of `name` in `store`. The name is checked before any
/// key is generated.
pub fn protect(
    model: &Model,
    name: &str,
    store: &mut Store,
    pass: &Passphrase,
    kdf: KdfParams,
    on_step: &mut dyn FnMut(Step),
) -> Result<Protected, ProtectError> {
    store::validate_name(name)?;
    on_step(Step::Keys);
    let t = Instant::now();
    let keys = OwnerKeys::generate();
    let public = keys.public_material();
    let keygen_s = t.elapsed().as_secs_f64();

    on_step(Step::Encrypt);
    let t = Instant::now();
    let enc = EncryptedModel::encrypt(model, &keys)?;
    let ciphertexts = enc
        .params
        .iter()
        .flatten()
        .map(|p| p.weights.len() + p.bias.iter().map(Vec::len).sum::<usize>())
        .sum();
    let tables = enc.params.iter().flatten().map(|p| p.tables.len()).sum();
    let enc_bytes = enc.to_bytes()?;
    let pk_bytes = public.public_key_bytes()?;
    let sk_bytes = public.server_key_bytes()?;
    let encrypt_s = t.elapsed().as_secs_f64();

    on_step(Step::SealAndStore);
    let t = Instant::now();
    let id = ModelId::random();
    let sealed = store::seal_owner_keys(&keys, &id, pass, kdf)?;
    let version = store.insert(&NewModel {
        id,
        name,
        arch: &enc.arch,
        encrypted_model: &enc_bytes,
        public_key: &pk_bytes,
        server_key: &sk_bytes,
        sealed_key: &sealed,
    })?;
    Ok(Protected {
        id,
        name: name.into(),
        version,
        ciphertexts,
        tables,
        encrypted_model_bytes: enc_bytes.len(),
        public_key_bytes: pk_bytes.len(),
        evaluation_key_bytes: sk_bytes.len(),
        sealed_key_bytes: sealed.ciphertext.len(),
        keygen_s,
        encrypt_s,
        store_s: t.elapsed().as_secs_f64(),
    })
}
