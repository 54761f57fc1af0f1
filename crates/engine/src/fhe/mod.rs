//! Encrypted evaluation: keys, encrypted models, inputs and outputs, and the runtime that
//! evaluates a model whose every weight and bias is a TFHE ciphertext.
//!
//! Layers: `backend` (what a ciphertext arithmetic offers), `circuit` (exact integer
//! circuits with PBS and noise accounting), `eval` (a whole model graph). One module per
//! artefact: `keys` (keys and their containers), `encrypted_model`, `input` (frames),
//! `output` (packed encrypted logits and their decryption), `runtime` (the edge runtime);
//! this module holds the parameters, format versions, size limits and the errors they share,
//! and re-exports each artefact so callers keep the `fhe::` paths.

pub mod backend;
pub mod circuit;
mod encrypted_model;
pub mod entropy;
pub mod eval;
pub mod geometry;
mod input;
mod keys;
mod output;
mod runtime;
pub mod tables;
pub mod tfhe_backend;

pub use encrypted_model::{strip_parameters, EncryptedModel};
pub use input::{EncryptedInput, Frame, FrameInput};
pub use keys::{check_evaluation_key_format, OwnerKeys, PublicMaterial};
pub use output::{pack_digits, Decrypted, EncryptedOutput, MAX_OUTPUT_DIGITS};
pub use runtime::{EdgeRuntime, InferStats};

use serde::Serialize;
use tfhe::named::Named;
use tfhe::safe_serialization::safe_serialize;
use tfhe::shortint::parameters::{
    CiphertextConformanceParams, ClassicPBSParameters, CompressionParameters,
    COMP_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
    PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
};
use thiserror::Error;

/// tfhe's default parameter set: 2-bit message, 2-bit carry, 128-bit security,
/// p-fail ≤ 2^-129.6 per PBS.
pub const PARAMS: ClassicPBSParameters = PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128;
pub const PARAMS_NAME: &str = "PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128";

/// tfhe's list-compression parameters that go with [`PARAMS`]: up to 256 output blocks
/// packed into one GLWE (k = 4, N = 256) stored on 12 bits (p-fail 2^-129.3).
pub const COMPRESSION_PARAMS: CompressionParameters =
    COMP_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128;
pub const COMPRESSION_PARAMS_NAME: &str = "COMP_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128";

/// Version of the encrypted model layout.
/// 2 adds the clear tables of the layers that read the frame (device-clear input); 3 makes
/// their entries the base-4 digits of whole products (2 held one value 0..=9 per weight
/// digit and pixel digit); 4 adds every layer's secret tables (secret-table networks).
pub const ENCRYPTED_MODEL_FORMAT_VERSION: u32 = 4;
/// Version of the encrypted output layout: 2 is the logits' digits packed by list
/// compression (1 was one 16 KiB ciphertext per digit plus an encrypted label).
pub const OUTPUT_FORMAT_VERSION: u32 = 2;
/// Version of fhecam's key containers (owner keys, evaluation key).
pub const KEY_FORMAT_VERSION: u32 = 1;

/// Size limits for untrusted bytes (checked before anything is allocated).
pub mod limits {
    /// One serialized ciphertext (a big-key LWE is 16 KiB).
    pub const CIPHERTEXT: u64 = 64 << 10;
    /// An encrypted model file.
    pub const MODEL: u64 = 256 << 20;
    /// An encrypted input list.
    pub const INPUT: u64 = 16 << 20;
    /// An encrypted output: at most `MAX_OUTPUT_DIGITS` digits, 16 packed GLWEs of about
    /// 2 KB.
    pub const OUTPUT: u64 = 64 << 10;
    /// The compact public key.
    pub const PUBLIC_KEY: u64 = 16 << 20;
    /// The compressed server key (and the evaluation key holding it).
    pub const SERVER_KEY: u64 = 1 << 30;
    /// One secret table: a seeded GLWE body of N = 2048 coefficients (16 KiB) and its seed.
    pub const TABLE: u64 = 32 << 10;
    /// The compressed (seeded) compression key: 12.6 MB.
    pub const COMPRESSION_KEY: u64 = 64 << 20;
}

#[derive(Debug, Error)]
pub enum FheError {
    #[error("{what}: {msg}")]
    Decode { what: &'static str, msg: String },
    #[error("{what} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("{what}: format version {found}, this fhecam reads {expected}{}", if *.found < *.expected { ": it was made by an older fhecam; protect the model again with this one (`fhecam protect`, then `fhecam deploy`)" } else { ": update fhecam" })]
    Version {
        what: &'static str,
        found: u32,
        expected: u32,
    },
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("could not start the FHE thread pool: {0}")]
    Pool(String),
    #[error("decrypted output is inconsistent ({0}): wrong key or corrupted result")]
    WrongKey(String),
}

fn decode_err(what: &'static str) -> impl Fn(String) -> FheError {
    move |msg| FheError::Decode { what, msg }
}

/// Serializes a tfhe object with its versioned, size-limited header.
pub fn to_safe_bytes<T>(obj: &T, limit: u64) -> Result<Vec<u8>, FheError>
where
    T: Serialize + tfhe::Versionize + Named,
{
    let mut out = Vec::new();
    safe_serialize(obj, &mut out, limit).map_err(|e| FheError::Decode {
        what: T::NAME,
        msg: e.to_string(),
    })?;
    Ok(out)
}

/// Bincode with a size limit, for fhecam's own containers.
pub fn bincode_opts(limit: u64) -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(limit)
}

fn check_len(what: &'static str, bytes: &[u8], limit: u64) -> Result<(), FheError> {
    if bytes.len() as u64 > limit {
        return Err(FheError::TooLarge {
            what,
            size: bytes.len() as u64,
            limit,
        });
    }
    Ok(())
}

/// A bincode failure on (a part of) one of fhecam's own containers.
fn bincode_err(what: &'static str) -> impl Fn(bincode::Error) -> FheError {
    move |e| FheError::Decode {
        what,
        msg: e.to_string(),
    }
}

/// Bincode encoding of one of fhecam's own containers (or a part of one) within `limit`.
fn encode<T: Serialize + ?Sized>(
    what: &'static str,
    value: &T,
    limit: u64,
) -> Result<Vec<u8>, FheError> {
    use bincode::Options;
    bincode_opts(limit)
        .serialize(value)
        .map_err(bincode_err(what))
}

/// Bincode decoding of a part of a container (the container's size is checked already).
fn decode_part<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    limit: u64,
) -> Result<T, FheError> {
    use bincode::Options;
    bincode_opts(limit)
        .deserialize(bytes)
        .map_err(bincode_err(what))
}

/// Size-checked bincode decoding of one of fhecam's own containers.
fn decode_container<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    limit: u64,
) -> Result<T, FheError> {
    check_len(what, bytes, limit)?;
    decode_part(what, bytes, limit).map_err(|e| match e {
        FheError::Decode { what, msg } => FheError::Decode {
            what,
            msg: format!("{msg} (truncated or corrupt?)"),
        },
        e => e,
    })
}

fn check_version(what: &'static str, found: u32, expected: u32) -> Result<(), FheError> {
    if found != expected {
        return Err(FheError::Version {
            what,
            found,
            expected,
        });
    }
    Ok(())
}

fn ct_conformance() -> CiphertextConformanceParams {
    PARAMS.to_shortint_conformance_param()
}

/// tfhe's default configuration, without the dedicated OPRF key (fhecam draws no encrypted
/// randomness; it would double the server key the cameras download).
pub fn config() -> tfhe::Config {
    tfhe::ConfigBuilder::default()
        .use_dedicated_oprf_key(false)
        .build()
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
