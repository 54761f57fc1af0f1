//! Encrypted evaluation: keys, encrypted models, inputs and outputs, and the runtime that
//! evaluates a model whose every weight and bias is a TFHE ciphertext.
//!
//! Layers: `backend` (what a ciphertext arithmetic offers), `circuit` (exact integer
//! circuits with PBS and noise accounting), `eval` (a whole model graph), this module (keys,
//! serialization, the edge runtime and the owner's decryption).

pub mod backend;
pub mod circuit;
pub mod entropy;
pub mod eval;
pub mod geometry;
pub mod tables;
pub mod tfhe_backend;

use crate::model::Model;
use circuit::Engine;
use eval::{LayerParams, OutputLayout};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tfhe::core_crypto::prelude::compressed_modulus_switched_glwe_ciphertext::CompressedModulusSwitchedGlweCiphertext;
use tfhe::named::Named;
#[allow(unused_imports)]
use tfhe::prelude::*;
use tfhe::safe_serialization::safe_serialize;
use tfhe::shortint::ciphertext::{CompactCiphertextList, CompressedCiphertext};
use tfhe::shortint::list_compression::{CompressionKey, CompressionPrivateKeys};
use tfhe::shortint::parameters::{
    CiphertextConformanceParams, ClassicPBSParameters, CompressionParameters,
    ShortintCompactCiphertextListCastingMode, COMP_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
    PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
};
use tfhe::shortint::{Ciphertext, ClientKey, CompactPublicKey, ServerKey};
use tfhe_backend::TfheBackend;
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

/// Size-checked bincode decoding of one of fhecam's own containers.
fn decode_container<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    limit: u64,
) -> Result<T, FheError> {
    use bincode::Options;
    check_len(what, bytes, limit)?;
    bincode_opts(limit)
        .deserialize(bytes)
        .map_err(|e| FheError::Decode {
            what,
            msg: format!("{e} (truncated or corrupt?)"),
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

/// The owner's keys: the secret `ClientKey` and the compression private key never leave
/// the owner's side.
pub struct OwnerKeys {
    hl: tfhe::ClientKey,
    /// The shortint key inside `hl`, which the circuits' blocks are encrypted under.
    pub client: ClientKey,
    /// The GLWE key the encrypted outputs are packed under; the owner decrypts them with it
    /// directly, with no bootstrapping and no decompression key.
    pub compression: CompressionPrivateKeys,
}

/// What an edge device receives: encrypts with the public key, evaluates with the server
/// key, packs its outputs with the compression key.
pub struct PublicMaterial {
    pub public_key: tfhe::CompactPublicKey,
    pub server_key: tfhe::CompressedServerKey,
    pub compression_key: tfhe::integer::compression_keys::CompressedCompressionKey,
}

/// Leading bytes of fhecam's key containers (owner keys, evaluation key), then a u32 version.
const OWNER_KEYS_MAGIC: &[u8; 8] = b"FHECAMOK";
const EVAL_KEY_MAGIC: &[u8; 8] = b"FHECAMEK";

#[derive(Serialize, Deserialize)]
struct KeyPair {
    /// tfhe safe serialization of the main key.
    main: Vec<u8>,
    /// tfhe safe serialization of the compression key that goes with it.
    compression: Vec<u8>,
}

fn encode_pair(magic: &[u8; 8], pair: &KeyPair, limit: u64) -> Result<Vec<u8>, FheError> {
    use bincode::Options;
    let mut out = magic.to_vec();
    out.extend_from_slice(&KEY_FORMAT_VERSION.to_le_bytes());
    bincode_opts(limit)
        .serialize_into(&mut out, pair)
        .map_err(|e| FheError::Decode {
            what: "key container",
            msg: e.to_string(),
        })?;
    Ok(out)
}

/// Checks only the leading magic and version of stored evaluation-key bytes (cheap: the
/// owner runs it before deploying a model protected by an older fhecam).
pub fn check_evaluation_key_format(bytes: &[u8]) -> Result<(), FheError> {
    check_pair_prefix("server key", EVAL_KEY_MAGIC, bytes).map(|_| ())
}

fn check_pair_prefix<'a>(
    what: &'static str,
    magic: &[u8; 8],
    bytes: &'a [u8],
) -> Result<&'a [u8], FheError> {
    let Some(rest) = bytes.strip_prefix(magic.as_slice()) else {
        return Err(FheError::Decode {
            what,
            msg: "written before fhecam's compressed encrypted outputs (or not a key at all): \
                  protect the model again (`fhecam protect`) and deploy the new version"
                .into(),
        });
    };
    if rest.len() < 4 {
        return Err(FheError::Decode {
            what,
            msg: "truncated".into(),
        });
    }
    check_version(what, u32_le(rest), KEY_FORMAT_VERSION)?;
    Ok(&rest[4..])
}

fn decode_pair(
    what: &'static str,
    magic: &[u8; 8],
    bytes: &[u8],
    limit: u64,
) -> Result<KeyPair, FheError> {
    check_len(what, bytes, limit)?;
    let body = check_pair_prefix(what, magic, bytes)?;
    decode_container(what, body, limit)
}

/// The shortint key inside a high-level client key.
fn shortint_key(hl: &tfhe::ClientKey) -> ClientKey {
    let (integer, ..) = hl.clone().into_raw_parts();
    integer.into()
}

fn u32_le(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl OwnerKeys {
    pub fn generate() -> Self {
        entropy::seed_thread();
        let hl = tfhe::ClientKey::generate(config());
        let client = shortint_key(&hl);
        let compression = client.new_compression_private_key(COMPRESSION_PARAMS);
        OwnerKeys {
            hl,
            client,
            compression,
        }
    }

    pub fn public_material(&self) -> PublicMaterial {
        entropy::seed_thread();
        let compression_key =
            tfhe::integer::compression_keys::CompressedCompressionKey::from_raw_parts(
                self.client
                    .atomic_pattern
                    .new_compressed_compression_key(&self.compression),
            );
        PublicMaterial {
            public_key: tfhe::CompactPublicKey::new(&self.hl),
            server_key: tfhe::CompressedServerKey::new(&self.hl),
            compression_key,
        }
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, FheError> {
        let compression = tfhe::integer::compression_keys::CompressionPrivateKeys::from_raw_parts(
            self.compression.clone(),
        );
        let pair = KeyPair {
            main: to_safe_bytes(&self.hl, limits::PUBLIC_KEY)?,
            compression: to_safe_bytes(&compression, limits::PUBLIC_KEY)?,
        };
        encode_pair(OWNER_KEYS_MAGIC, &pair, limits::PUBLIC_KEY)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FheError> {
        let pair = decode_pair("client key", OWNER_KEYS_MAGIC, bytes, limits::PUBLIC_KEY)?;
        let hl: tfhe::ClientKey =
            tfhe::safe_serialization::safe_deserialize(pair.main.as_slice(), limits::PUBLIC_KEY)
                .map_err(decode_err("client key"))?;
        let compression: tfhe::integer::compression_keys::CompressionPrivateKeys =
            tfhe::safe_serialization::safe_deserialize(
                pair.compression.as_slice(),
                limits::PUBLIC_KEY,
            )
            .map_err(decode_err("compression private key"))?;
        let client = shortint_key(&hl);
        let p = client.parameters();
        if p.message_modulus() != PARAMS.message_modulus
            || p.carry_modulus() != PARAMS.carry_modulus
            || p.lwe_dimension() != PARAMS.lwe_dimension
            || p.polynomial_size() != PARAMS.polynomial_size
        {
            return Err(FheError::Decode {
                what: "client key",
                msg: format!("not a key for {PARAMS_NAME}"),
            });
        }
        let compression = compression.into_raw_parts();
        if compression.params != COMPRESSION_PARAMS {
            return Err(FheError::Decode {
                what: "compression private key",
                msg: format!("not a key for {COMPRESSION_PARAMS_NAME}"),
            });
        }
        Ok(OwnerKeys {
            hl,
            client,
            compression,
        })
    }
}

impl PublicMaterial {
    pub fn public_key_bytes(&self) -> Result<Vec<u8>, FheError> {
        to_safe_bytes(&self.public_key, limits::PUBLIC_KEY)
    }
    /// The evaluation key: the compressed server key and the compressed compression key.
    pub fn server_key_bytes(&self) -> Result<Vec<u8>, FheError> {
        let pair = KeyPair {
            main: to_safe_bytes(&self.server_key, limits::SERVER_KEY)?,
            compression: to_safe_bytes(&self.compression_key, limits::COMPRESSION_KEY)?,
        };
        encode_pair(EVAL_KEY_MAGIC, &pair, limits::SERVER_KEY)
    }
    /// Parses untrusted key material: size-limited, versioned (tfhe safe serialization);
    /// the parameters are checked when the runtime is built from it.
    pub fn from_bytes(public_key: &[u8], server_key: &[u8]) -> Result<Self, FheError> {
        check_len("public key", public_key, limits::PUBLIC_KEY)?;
        let public_key = tfhe::safe_serialization::safe_deserialize(public_key, limits::PUBLIC_KEY)
            .map_err(decode_err("public key"))?;
        let pair = decode_pair("server key", EVAL_KEY_MAGIC, server_key, limits::SERVER_KEY)?;
        let server_key =
            tfhe::safe_serialization::safe_deserialize(pair.main.as_slice(), limits::SERVER_KEY)
                .map_err(decode_err("server key"))?;
        let compression_key = tfhe::safe_serialization::safe_deserialize(
            pair.compression.as_slice(),
            limits::COMPRESSION_KEY,
        )
        .map_err(decode_err("compression key"))?;
        Ok(PublicMaterial {
            public_key,
            server_key,
            compression_key,
        })
    }
}

/// A model whose every weight and bias is encrypted; the architecture is public but
/// carries no parameter values (they are replaced by the range's lower bound).
#[derive(Clone)]
pub struct EncryptedModel {
    pub arch: Model,
    pub params: Vec<Option<LayerParams<CompressedCiphertext, tables::SeededTable>>>,
}

#[derive(Serialize, Deserialize)]
struct EncryptedModelFile {
    format_version: u32,
    /// JSON: the model's internally tagged enums are not a bincode layout.
    arch: String,
    params: Vec<Option<LayerParams<Vec<u8>, Vec<u8>>>>,
}

/// Copy of the model with every secret parameter replaced by a public placeholder
/// (weights and biases by their range's lower bound, secret tables by zeros).
pub fn strip_parameters(model: &Model) -> Model {
    let mut arch = model.clone();
    for n in &mut arch.nodes {
        n.op.layer_mut().strip();
    }
    arch
}

impl EncryptedModel {
    /// Encrypts every weight and bias digit with the secret key (seeded, compressed
    /// ciphertexts: a few dozen bytes each instead of 16 KiB), and the clear tables of the
    /// layers that read the frame (base-4 digits of products, like every other digit).
    pub fn encrypt(model: &Model, keys: &OwnerKeys) -> Result<Self, FheError> {
        entropy::seed_thread();
        let sixteen = tfhe::shortint::parameters::MessageModulus(16);
        let params = eval::map_params_with(
            model,
            &mut |v| keys.client.encrypt_compressed(v),
            // a picked entry holds a whole 4-bit block (message and carry)
            &mut |v| {
                keys.client
                    .encrypt_with_message_modulus_compressed(v, sixteen)
            },
        )?;
        // shortint builds a table's clear accumulator with a server key
        let has_tables = params.iter().flatten().any(|p| !p.tables.is_empty());
        let sks = has_tables.then(|| ServerKey::new(&keys.client));
        let params = params
            .into_iter()
            .map(|p| {
                p.map(|p| {
                    let tables = match &sks {
                        Some(sks) => tables::encrypt_tables(&keys.client, sks, &p.tables)?,
                        None => Vec::new(),
                    };
                    Ok::<_, FheError>(LayerParams {
                        tables,
                        ..p.with_tables(Vec::new())
                    })
                })
                .transpose()
            })
            .collect::<Result<_, _>>()?;
        Ok(EncryptedModel {
            arch: strip_parameters(model),
            params,
        })
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, FheError> {
        let ser = |c: &CompressedCiphertext| -> Result<Vec<u8>, FheError> {
            use bincode::Options;
            bincode_opts(limits::CIPHERTEXT)
                .serialize(c)
                .map_err(|e| FheError::Decode {
                    what: "encrypted parameter",
                    msg: e.to_string(),
                })
        };
        let ser_table = |t: &tables::SeededTable| -> Result<Vec<u8>, FheError> {
            use bincode::Options;
            bincode_opts(limits::TABLE)
                .serialize(t)
                .map_err(|e| FheError::Decode {
                    what: "secret table",
                    msg: e.to_string(),
                })
        };
        let params = self
            .params
            .iter()
            .map(|p| {
                p.as_ref()
                    .map(|p| p.try_map_all(ser, ser_table))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let file = EncryptedModelFile {
            format_version: ENCRYPTED_MODEL_FORMAT_VERSION,
            arch: serde_json::to_string(&self.arch).map_err(|e| FheError::Decode {
                what: "encrypted model",
                msg: e.to_string(),
            })?,
            params,
        };
        use bincode::Options;
        bincode_opts(limits::MODEL)
            .serialize(&file)
            .map_err(|e| FheError::Decode {
                what: "encrypted model",
                msg: e.to_string(),
            })
    }

    /// Parses an untrusted encrypted model: size-limited, every ciphertext checked for
    /// conformance with the default parameters, shapes checked against the architecture.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FheError> {
        // the version leads the container (fixint u32): an older layout is named before
        // its fields are read
        check_len("encrypted model", bytes, limits::MODEL)?;
        if let Some(v) = bytes.get(..4) {
            let found = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            check_version("encrypted model", found, ENCRYPTED_MODEL_FORMAT_VERSION)?;
        }
        let file: EncryptedModelFile = decode_container("encrypted model", bytes, limits::MODEL)?;
        check_version(
            "encrypted model",
            file.format_version,
            ENCRYPTED_MODEL_FORMAT_VERSION,
        )?;
        let arch: Model = serde_json::from_str(&file.arch).map_err(|e| FheError::Decode {
            what: "encrypted model architecture",
            msg: e.to_string(),
        })?;
        arch.infer()?;
        let digit_conf = ct_conformance();
        // Seeded ciphertexts have no safe-serialization name in shortint: bincode with a
        // size limit, then tfhe's conformance check against the default parameters.
        let de = |b: &Vec<u8>,
                  conf: &CiphertextConformanceParams|
         -> Result<CompressedCiphertext, FheError> {
            use bincode::Options;
            use tfhe::conformance::ParameterSetConformant;
            let c: CompressedCiphertext =
                bincode_opts(limits::CIPHERTEXT)
                    .deserialize(b)
                    .map_err(|e| FheError::Decode {
                        what: "encrypted parameter",
                        msg: e.to_string(),
                    })?;
            if !c.is_conformant(conf) {
                return Err(FheError::Decode {
                    what: "encrypted parameter",
                    msg: format!("not a ciphertext of {PARAMS_NAME}"),
                });
            }
            Ok(c)
        };
        // a device-clear secret-table entry is a whole 4-bit block
        let entry_conf = CiphertextConformanceParams {
            message_modulus: tfhe::shortint::parameters::MessageModulus(16),
            carry_modulus: tfhe::shortint::parameters::CarryModulus(1),
            degree: tfhe::shortint::ciphertext::Degree::new(15),
            ..digit_conf
        };
        let de_table = |b: &Vec<u8>| -> Result<tables::SeededTable, FheError> {
            use bincode::Options;
            let t: tables::SeededTable =
                bincode_opts(limits::TABLE)
                    .deserialize(b)
                    .map_err(|e| FheError::Decode {
                        what: "secret table",
                        msg: e.to_string(),
                    })?;
            tables::check_table(&t)?;
            Ok(t)
        };
        let params: Vec<Option<LayerParams<CompressedCiphertext, tables::SeededTable>>> = file
            .params
            .iter()
            .map(|p| {
                p.as_ref()
                    .map(|p| {
                        let conf = if p.tables.is_empty() {
                            &digit_conf
                        } else {
                            &entry_conf
                        };
                        p.try_map_all(|b| de(b, conf), de_table)
                    })
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        eval::check_params(&arch, &params)?;
        Ok(EncryptedModel { arch, params })
    }

    /// Expands every seeded ciphertext (tables stay seeded until the server key is there).
    fn decompress(&self) -> Vec<Option<LayerParams<Ciphertext, tables::SeededTable>>> {
        use rayon::prelude::*;
        self.params
            .iter()
            .map(|p| {
                p.as_ref().map(|p| LayerParams {
                    weights: p.weights.par_iter().map(|c| c.decompress()).collect(),
                    bias: p
                        .bias
                        .iter()
                        .map(|d| d.iter().map(|c| c.decompress()).collect())
                        .collect(),
                    clear_tables: p
                        .clear_tables
                        .par_iter()
                        .map(|c| {
                            let mut ct = c.decompress();
                            // entries are encrypted with the full block as message space
                            ct.message_modulus = PARAMS.message_modulus;
                            ct.carry_modulus = PARAMS.carry_modulus;
                            ct
                        })
                        .collect(),
                    tables: p.tables.clone(),
                })
            })
            .collect()
    }
}

/// A frame prepared for one input mode (owned; see [`Frame`] for the borrowed view).
pub enum FrameInput {
    Encrypted(EncryptedInput),
    Clear(Vec<u8>),
}

impl FrameInput {
    pub fn as_frame(&self) -> Frame<'_> {
        match self {
            FrameInput::Encrypted(e) => Frame::Encrypted(e),
            FrameInput::Clear(x) => Frame::Clear(x),
        }
    }
}

/// An encrypted frame: the quantized pixels under the compact public key.
pub struct EncryptedInput(pub CompactCiphertextList);

impl EncryptedInput {
    /// Wire size of the list (it is produced and consumed on the device itself).
    pub fn to_bytes(&self) -> Result<Vec<u8>, FheError> {
        use bincode::Options;
        bincode_opts(limits::INPUT)
            .serialize(&self.0)
            .map_err(|e| FheError::Decode {
                what: "encrypted input",
                msg: e.to_string(),
            })
    }
}

/// The encrypted logits' base-4 digits, packed by list compression, plus their public layout.
#[derive(Serialize, Deserialize)]
struct EncryptedOutputFile {
    format_version: u32,
    layout: OutputLayout,
    packed: Vec<CompressedModulusSwitchedGlweCiphertext<u64>>,
}

/// A decrypted inference: the logits, and the label the owner computes from them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decrypted {
    pub label: usize,
    pub logits: Vec<i64>,
}

/// The camera's output: every digit of every logit, coefficient `i` of packed GLWE `i / 256`.
pub struct EncryptedOutput {
    pub layout: OutputLayout,
    pub packed: Vec<CompressedModulusSwitchedGlweCiphertext<u64>>,
}

/// Where a digit sits once packed: list compression multiplies each block by the message
/// modulus, so a digit `m` in 0..=3 is read at `m · 2^61` (the top two bits under the
/// padding bit).
const PACKED_SHIFT: u32 = 61;

/// Packs output digits as tfhe's `compress_ciphertexts_into_list` does, with its
/// preconditions made ours: each digit holds 0..=3 and is a fresh PBS output or a constant
/// (the engine refreshes any other, see `eval::run`). Done with the public core_crypto
/// steps so the owner can decrypt the packed GLWEs directly.
pub fn pack_digits(
    key: &CompressionKey,
    digits: &[Ciphertext],
) -> Vec<CompressedModulusSwitchedGlweCiphertext<u64>> {
    use rayon::prelude::*;
    use tfhe::core_crypto::prelude::*;
    let pksk = &key.packing_key_switching_key;
    let lwe_size = pksk.input_key_lwe_dimension().to_lwe_size();
    digits
        .par_chunks(key.lwe_per_glwe.0)
        .map(|chunk| {
            let mut flat = Vec::with_capacity(chunk.len() * lwe_size.0);
            for c in chunk {
                let mut lwe = c.ct.clone();
                lwe_ciphertext_cleartext_mul_assign(&mut lwe, Cleartext(PARAMS.message_modulus.0));
                flat.extend_from_slice(lwe.as_ref());
            }
            let list = LweCiphertextList::from_container(flat, lwe_size, pksk.ciphertext_modulus());
            let mut glwe = GlweCiphertext::new(
                0u64,
                pksk.output_glwe_size(),
                pksk.output_polynomial_size(),
                pksk.ciphertext_modulus(),
            );
            par_keyswitch_lwe_ciphertext_list_and_pack_in_glwe_ciphertext(pksk, &list, &mut glwe);
            CompressedModulusSwitchedGlweCiphertext::compress(
                &glwe,
                key.storage_log_modulus,
                LweCiphertextCount(chunk.len()),
            )
        })
        .collect()
}

impl EncryptedOutput {
    pub fn to_bytes(&self) -> Result<Vec<u8>, FheError> {
        use bincode::Options;
        let file = EncryptedOutputFile {
            format_version: OUTPUT_FORMAT_VERSION,
            layout: self.layout.clone(),
            packed: self.packed.clone(),
        };
        bincode_opts(limits::OUTPUT)
            .serialize(&file)
            .map_err(|e| FheError::Decode {
                what: "encrypted output",
                msg: e.to_string(),
            })
    }

    /// Parses an untrusted output: size-limited, versioned, every packed GLWE checked
    /// against the compression parameters and the layout before anything is unpacked.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FheError> {
        check_len("encrypted output", bytes, limits::OUTPUT)?;
        // The version leads the file: read it first, so an old output gets that reason and
        // not a parse error.
        if bytes.len() >= 4 {
            let v = u32_le(bytes);
            if v == 1 {
                return Err(FheError::Decode {
                    what: "encrypted output",
                    msg: "format 1 (one ciphertext per digit and an encrypted label) is from a camera running fhecam before compressed outputs: update the camera and deploy the model again".into(),
                });
            }
            check_version("encrypted output", v, OUTPUT_FORMAT_VERSION)?;
        }
        let file: EncryptedOutputFile =
            decode_container("encrypted output", bytes, limits::OUTPUT)?;
        let bad = |msg: String| FheError::Decode {
            what: "encrypted output",
            msg,
        };
        let l = &file.layout;
        if l.offsets.len() != l.digits.len()
            || l.offsets.is_empty()
            || l.digits.iter().any(|&d| d == 0 || d > 32)
            || l.ciphertexts() > MAX_OUTPUT_DIGITS
        {
            return Err(bad("the layout is not one an fhecam model produces".into()));
        }
        let per = COMPRESSION_PARAMS.lwe_per_glwe().0;
        let want = l.ciphertexts().div_ceil(per);
        if file.packed.len() != want {
            return Err(bad(format!(
                "{} packed ciphertexts for {} digits (expected {want})",
                file.packed.len(),
                l.ciphertexts()
            )));
        }
        let conf = packed_conformance();
        for (i, g) in file.packed.iter().enumerate() {
            use tfhe::conformance::ParameterSetConformant;
            let bodies = per.min(l.ciphertexts() - i * per);
            if !g.is_conformant(&conf)
                || g.bodies_count().0 != bodies
                || g.packed_integers().log_modulus() != COMPRESSION_PARAMS.storage_log_modulus()
            {
                return Err(bad(format!(
                    "packed ciphertext {i} is not a {COMPRESSION_PARAMS_NAME} list of {bodies} digits"
                )));
            }
        }
        Ok(EncryptedOutput {
            layout: file.layout,
            packed: file.packed,
        })
    }

    /// Decrypts the digits with the compression private key (no bootstrapping) and
    /// reassembles the logits; the label is their argmax, ties to the lowest index, as the
    /// plaintext reference decides. A digit whose padding bit decrypts set cannot come from
    /// this key's camera: that is a wrong key or tampering (half of such digits show it, so
    /// an output of n digits slips through with probability about 2^-n).
    pub fn decrypt(&self, keys: &OwnerKeys) -> Result<Decrypted, FheError> {
        use tfhe::core_crypto::prelude::*;
        let key = &keys.compression.post_packing_ks_key;
        let mut vals = Vec::with_capacity(self.layout.ciphertexts());
        for g in &self.packed {
            let glwe = g.extract();
            let mut pt = PlaintextList::new(0u64, PlaintextCount(glwe.polynomial_size().0));
            decrypt_glwe_ciphertext(key, &glwe, &mut pt);
            for &v in &pt.as_ref()[..g.bodies_count().0] {
                let r = v.wrapping_add(1 << (PACKED_SHIFT - 1)) >> PACKED_SHIFT;
                if r > 3 {
                    return Err(FheError::WrongKey(format!(
                        "a digit decrypted to {r}, outside 0..=3"
                    )));
                }
                vals.push(r);
            }
        }
        let logits = self.layout.logits(&vals);
        Ok(Decrypted {
            label: crate::reference::argmax(&logits),
            logits,
        })
    }

    /// The owner side of a camera: packs the given digit values, each freshly encrypted
    /// under the owner's key, as a camera would publish them. For tests and tools that
    /// need an output with chosen values (a camera computes its digits, never chooses them).
    pub fn encrypt_digits(
        keys: &OwnerKeys,
        layout: OutputLayout,
        values: &[u64],
    ) -> Result<Self, FheError> {
        if values.len() != layout.ciphertexts() || values.iter().any(|&v| v > 3) {
            return Err(FheError::Decode {
                what: "output digits",
                msg: format!("{} digits in 0..=3 expected", layout.ciphertexts()),
            });
        }
        entropy::seed_thread();
        let key = keys.client.new_compression_key(&keys.compression);
        let cts: Vec<Ciphertext> = values.iter().map(|&v| keys.client.encrypt(v)).collect();
        Ok(EncryptedOutput {
            layout,
            packed: pack_digits(&key, &cts),
        })
    }
}

/// Most digits an output may declare (an fhecam model has at most a few hundred).
pub const MAX_OUTPUT_DIGITS: usize = 4096;

fn packed_conformance() -> tfhe::core_crypto::prelude::GlweCiphertextConformanceParams<u64> {
    use tfhe::core_crypto::prelude::*;
    GlweCiphertextConformanceParams {
        glwe_dim: COMPRESSION_PARAMS.packing_ks_glwe_dimension(),
        polynomial_size: COMPRESSION_PARAMS.packing_ks_polynomial_size(),
        ct_modulus: CiphertextModulus::new_native(),
    }
}

/// Timing of one encrypted inference.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InferStats {
    pub pbs: u64,
    pub pbs_per_node: Vec<u64>,
    pub expand_s: f64,
    pub eval_s: f64,
    /// Packing the output digits (keyswitch into one GLWE per 256 digits, no PBS).
    pub pack_s: f64,
}

/// The edge runtime: the encrypted model, the public material and a dedicated FHE thread
/// pool. Nothing here can decrypt.
pub struct EdgeRuntime {
    pub arch: Model,
    params: Vec<Option<LayerParams<Ciphertext, tfhe_backend::SecretTable>>>,
    engine: Engine<TfheBackend>,
    public_key: CompactPublicKey,
    compression: CompressionKey,
    pool: rayon::ThreadPool,
    planned: Vec<u64>,
    /// The plan with the frame held in the clear; `None` when the model cannot run so.
    planned_clear: Option<Vec<u64>>,
}

/// A frame as the runtime takes it: encrypted with the public key, or held in the clear by
/// the device ([`eval::InputMode::DeviceClear`]).
#[derive(Clone, Copy)]
pub enum Frame<'a> {
    Encrypted(&'a EncryptedInput),
    Clear(&'a [u8]),
}

impl EdgeRuntime {
    /// Decompresses the server key and the encrypted parameters (no PBS) and starts a
    /// pool of `threads` FHE workers (0 = one per core).
    pub fn new(
        model: &EncryptedModel,
        public: PublicMaterial,
        threads: usize,
    ) -> Result<Self, FheError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("fhe-{i}"))
            .build()
            .map_err(|e| FheError::Pool(e.to_string()))?;
        let (planned, _) = eval::plan(&model.arch)?;
        let planned_clear = eval::check_device_clear(&model.arch)
            .ok()
            .map(|_| eval::plan_mode(&model.arch, eval::InputMode::DeviceClear))
            .transpose()?
            .map(|(p, _)| p);
        let ((server_key, compression), params) = pool.install(|| {
            rayon::join(
                || {
                    let (integer, ..) = public.server_key.decompress().into_raw_parts();
                    (
                        ServerKey::from(integer),
                        public.compression_key.decompress().into_raw_parts(),
                    )
                },
                || model.decompress(),
            )
        });
        if server_key.message_modulus != PARAMS.message_modulus
            || server_key.carry_modulus != PARAMS.carry_modulus
            || server_key.ciphertext_lwe_dimension()
                != PARAMS
                    .glwe_dimension
                    .to_equivalent_lwe_dimension(PARAMS.polynomial_size)
        {
            return Err(FheError::Decode {
                what: "server key",
                msg: format!("not a key for {PARAMS_NAME}"),
            });
        }
        let pksk = &compression.packing_key_switching_key;
        if pksk.input_key_lwe_dimension() != server_key.ciphertext_lwe_dimension()
            || pksk.output_glwe_size()
                != COMPRESSION_PARAMS
                    .packing_ks_glwe_dimension()
                    .to_glwe_size()
            || pksk.output_polynomial_size() != COMPRESSION_PARAMS.packing_ks_polynomial_size()
            || pksk.decomposition_level_count() != COMPRESSION_PARAMS.packing_ks_level()
            || pksk.decomposition_base_log() != COMPRESSION_PARAMS.packing_ks_base_log()
            || compression.lwe_per_glwe != COMPRESSION_PARAMS.lwe_per_glwe()
            || compression.storage_log_modulus != COMPRESSION_PARAMS.storage_log_modulus()
        {
            return Err(FheError::Decode {
                what: "compression key",
                msg: format!("not a key for {COMPRESSION_PARAMS_NAME}"),
            });
        }
        let public_key = public.public_key.into_raw_parts().0.into_raw_parts();
        let params = params
            .into_iter()
            .map(|p| {
                p.map(|p| {
                    let t: Vec<_> = p
                        .tables
                        .iter()
                        .map(|t| tables::expand_table(&server_key, t))
                        .collect();
                    p.with_tables(t)
                })
            })
            .collect();
        Ok(EdgeRuntime {
            arch: model.arch.clone(),
            params,
            engine: Engine::new(TfheBackend::new(server_key)),
            public_key,
            compression,
            pool,
            planned,
            planned_clear,
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// PBS per node with encrypted input, planned from the architecture alone.
    pub fn planned_pbs(&self) -> &[u64] {
        &self.planned
    }

    /// PBS per node in an input mode; an error says why a model cannot run device-clear.
    pub fn planned_pbs_in(&self, mode: eval::InputMode) -> Result<&[u64], FheError> {
        match mode {
            eval::InputMode::Encrypted => Ok(&self.planned),
            eval::InputMode::DeviceClear => match &self.planned_clear {
                Some(p) => Ok(p),
                None => Err(eval::check_device_clear(&self.arch).unwrap_err().into()),
            },
        }
    }

    /// The frame as `mode` feeds it: encrypted with the public key, or kept in the clear.
    pub fn frame_input(&self, mode: eval::InputMode, x: &[u8]) -> FrameInput {
        match mode {
            eval::InputMode::Encrypted => FrameInput::Encrypted(self.encrypt(x)),
            eval::InputMode::DeviceClear => FrameInput::Clear(x.to_vec()),
        }
    }

    pub fn server_key(&self) -> &ServerKey {
        &self.engine.backend.server_key
    }

    /// Encrypts a quantized frame with the public key.
    pub fn encrypt(&self, input: &[u8]) -> EncryptedInput {
        entropy::seed_thread();
        let msgs = eval::input_digits(&self.arch, input);
        EncryptedInput(self.public_key.encrypt_slice(&msgs))
    }

    /// Runs the encrypted model on an encrypted frame.
    pub fn infer(&self, input: &EncryptedInput) -> Result<(EncryptedOutput, InferStats), FheError> {
        self.infer_frame(Frame::Encrypted(input))
    }

    /// Runs the encrypted model on a frame, encrypted or held in the clear.
    pub fn infer_frame(&self, frame: Frame<'_>) -> Result<(EncryptedOutput, InferStats), FheError> {
        let t0 = Instant::now();
        let cts = match frame {
            Frame::Encrypted(input) => Some(
                input
                    .0
                    .expand(ShortintCompactCiphertextListCastingMode::NoCasting)
                    .map_err(|e| FheError::Decode {
                        what: "encrypted input",
                        msg: e.to_string(),
                    })?,
            ),
            Frame::Clear(_) => {
                self.planned_pbs_in(eval::InputMode::DeviceClear)?;
                None
            }
        };
        let expand_s = t0.elapsed().as_secs_f64();
        let before = self.engine.pbs_count();
        let t1 = Instant::now();
        let out = self.pool.install(|| match (cts, frame) {
            (Some(cts), _) => eval::run(&self.engine, &self.arch, &self.params, cts),
            (None, Frame::Clear(x)) => {
                eval::run_device_clear(&self.engine, &self.arch, &self.params, x)
            }
            (None, Frame::Encrypted(_)) => unreachable!("expanded above"),
        })?;
        let eval_s = t1.elapsed().as_secs_f64();
        let layout = out.layout();
        let pbs_per_node = out.pbs_per_node.clone();
        let digits = out.flatten();
        let t2 = Instant::now();
        let packed = self
            .pool
            .install(|| pack_digits(&self.compression, &digits));
        let stats = InferStats {
            pbs: self.engine.pbs_count() - before,
            pbs_per_node,
            expand_s,
            eval_s,
            pack_s: t2.elapsed().as_secs_f64(),
        };
        Ok((EncryptedOutput { layout, packed }, stats))
    }

    /// [`Self::infer`], calling `tick(done, planned)` every `every` while it runs (and once
    /// at the end): PBS done since the call (frames running at the same time on this
    /// runtime count into it too) and PBS planned for one frame.
    pub fn infer_watched(
        &self,
        frame: Frame<'_>,
        every: std::time::Duration,
        tick: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(EncryptedOutput, InferStats), FheError> {
        let planned: u64 = match frame {
            Frame::Encrypted(_) => self.planned.iter().sum(),
            Frame::Clear(_) => self
                .planned_pbs_in(eval::InputMode::DeviceClear)?
                .iter()
                .sum(),
        };
        let base = self.engine.pbs_count();
        let done = std::sync::atomic::AtomicBool::new(false);
        let (lock, cv) = (std::sync::Mutex::new(()), std::sync::Condvar::new());
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    guard = cv
                        .wait_timeout(guard, every)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    if !done.load(std::sync::atomic::Ordering::Acquire) {
                        tick(self.engine.pbs_count() - base, planned);
                    }
                }
            });
            let r = self.infer_frame(frame);
            {
                let _g = lock.lock().unwrap_or_else(|e| e.into_inner());
                done.store(true, std::sync::atomic::Ordering::Release);
            }
            cv.notify_all();
            if r.is_ok() {
                tick(self.engine.pbs_count() - base, planned);
            }
            r
        })
    }

    /// Runs `f` on the FHE pool (for benchmarks of single PBS on the same threads).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}
