//! Encrypted evaluation: keys, encrypted models, inputs and outputs, and the runtime that
//! evaluates a model whose every weight and bias is a TFHE ciphertext.
//!
//! Layers: `backend` (what a ciphertext arithmetic offers), `circuit` (exact integer
//! circuits with PBS and noise accounting), `eval` (a whole model graph), this module (keys,
//! serialization, the edge runtime and the owner's decryption).

pub mod backend;
pub mod circuit;
pub mod eval;
pub mod tfhe_backend;

use crate::model::{Model, Op};
use circuit::Engine;
use eval::{LayerParams, OutputLayout};
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tfhe::named::Named;
#[allow(unused_imports)]
use tfhe::prelude::*;
use tfhe::safe_serialization::{safe_deserialize_conformant, safe_serialize};
use tfhe::shortint::ciphertext::{CompactCiphertextList, CompressedCiphertext};
use tfhe::shortint::parameters::{
    CiphertextConformanceParams, ClassicPBSParameters, ShortintCompactCiphertextListCastingMode,
    PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128,
};
use tfhe::shortint::{Ciphertext, ClientKey, CompactPublicKey, ServerKey};
use tfhe_backend::TfheBackend;
use thiserror::Error;

/// tfhe's default parameter set: 2-bit message, 2-bit carry, 128-bit security,
/// p-fail ≤ 2^-129.6 per PBS.
pub const PARAMS: ClassicPBSParameters = PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128;
pub const PARAMS_NAME: &str = "PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128";

/// Version of the encrypted model and encrypted output layouts.
pub const ENCRYPTED_FORMAT_VERSION: u32 = 1;

/// Size limits for untrusted bytes (checked before anything is allocated).
pub mod limits {
    /// One serialized ciphertext (a big-key LWE is 16 KiB).
    pub const CIPHERTEXT: u64 = 64 << 10;
    /// An encrypted model file.
    pub const MODEL: u64 = 256 << 20;
    /// An encrypted input list.
    pub const INPUT: u64 = 16 << 20;
    /// An encrypted output.
    pub const OUTPUT: u64 = 16 << 20;
    /// The compact public key.
    pub const PUBLIC_KEY: u64 = 16 << 20;
    /// The compressed server key.
    pub const SERVER_KEY: u64 = 1 << 30;
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
    #[error("{what}: format version {found}, this fhecam reads {expected}")]
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

fn check_version(what: &'static str, found: u32) -> Result<(), FheError> {
    if found != ENCRYPTED_FORMAT_VERSION {
        return Err(FheError::Version {
            what,
            found,
            expected: ENCRYPTED_FORMAT_VERSION,
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

/// The owner's keys: the secret `ClientKey` never leaves the owner's side.
pub struct OwnerKeys {
    hl: tfhe::ClientKey,
    /// The shortint key inside `hl`, which the circuits' blocks are encrypted under.
    pub client: ClientKey,
}

/// What an edge device receives: encrypts with the public key, evaluates with the server key.
pub struct PublicMaterial {
    pub public_key: tfhe::CompactPublicKey,
    pub server_key: tfhe::CompressedServerKey,
}

impl OwnerKeys {
    pub fn generate() -> Self {
        Self::from_hl(tfhe::ClientKey::generate(config()))
    }

    fn from_hl(hl: tfhe::ClientKey) -> Self {
        let (integer, ..) = hl.clone().into_raw_parts();
        OwnerKeys {
            hl,
            client: integer.into(),
        }
    }

    pub fn public_material(&self) -> PublicMaterial {
        PublicMaterial {
            public_key: tfhe::CompactPublicKey::new(&self.hl),
            server_key: tfhe::CompressedServerKey::new(&self.hl),
        }
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, FheError> {
        to_safe_bytes(&self.hl, limits::PUBLIC_KEY)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FheError> {
        check_len("client key", bytes, limits::PUBLIC_KEY)?;
        let hl: tfhe::ClientKey =
            tfhe::safe_serialization::safe_deserialize(bytes, limits::PUBLIC_KEY)
                .map_err(decode_err("client key"))?;
        let keys = Self::from_hl(hl);
        let p = keys.client.parameters();
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
        Ok(keys)
    }
}

impl PublicMaterial {
    pub fn public_key_bytes(&self) -> Result<Vec<u8>, FheError> {
        to_safe_bytes(&self.public_key, limits::PUBLIC_KEY)
    }
    pub fn server_key_bytes(&self) -> Result<Vec<u8>, FheError> {
        to_safe_bytes(&self.server_key, limits::SERVER_KEY)
    }
    /// Parses untrusted key material: size-limited, versioned (tfhe safe serialization);
    /// the parameters are checked when the runtime is built from it.
    pub fn from_bytes(public_key: &[u8], server_key: &[u8]) -> Result<Self, FheError> {
        check_len("public key", public_key, limits::PUBLIC_KEY)?;
        check_len("server key", server_key, limits::SERVER_KEY)?;
        let public_key = tfhe::safe_serialization::safe_deserialize(public_key, limits::PUBLIC_KEY)
            .map_err(decode_err("public key"))?;
        let server_key = tfhe::safe_serialization::safe_deserialize(server_key, limits::SERVER_KEY)
            .map_err(decode_err("server key"))?;
        Ok(PublicMaterial {
            public_key,
            server_key,
        })
    }
}

/// A model whose every weight and bias is encrypted; the architecture is public but
/// carries no parameter values (they are replaced by the range's lower bound).
#[derive(Clone)]
pub struct EncryptedModel {
    pub arch: Model,
    pub params: Vec<Option<LayerParams<CompressedCiphertext>>>,
}

#[derive(Serialize, Deserialize)]
struct EncryptedModelFile {
    format_version: u32,
    /// JSON: the model's internally tagged enums are not a bincode layout.
    arch: String,
    params: Vec<Option<LayerParams<Vec<u8>>>>,
}

/// Copy of the model with every weight and bias replaced by its public lower bound.
pub fn strip_parameters(model: &Model) -> Model {
    let mut arch = model.clone();
    for n in &mut arch.nodes {
        match &mut n.op {
            Op::Conv2d {
                weights,
                bias,
                weight_range,
                bias_range,
                ..
            }
            | Op::Dense {
                weights,
                bias,
                weight_range,
                bias_range,
                ..
            } => {
                weights.iter_mut().for_each(|w| *w = weight_range[0]);
                bias.iter_mut().for_each(|b| *b = bias_range[0]);
            }
            _ => {}
        }
    }
    arch
}

impl EncryptedModel {
    /// Encrypts every weight and bias digit with the secret key (seeded, compressed
    /// ciphertexts: a few dozen bytes each instead of 16 KiB).
    pub fn encrypt(model: &Model, keys: &OwnerKeys) -> Result<Self, FheError> {
        let params = eval::map_params(model, &mut |v| keys.client.encrypt_compressed(v))?;
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
        let params = self
            .params
            .iter()
            .map(|p| {
                p.as_ref()
                    .map(|p| -> Result<_, FheError> {
                        Ok(LayerParams {
                            weights: p.weights.iter().map(ser).collect::<Result<_, _>>()?,
                            bias: p
                                .bias
                                .iter()
                                .map(|d| d.iter().map(ser).collect::<Result<_, _>>())
                                .collect::<Result<_, _>>()?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let file = EncryptedModelFile {
            format_version: ENCRYPTED_FORMAT_VERSION,
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
        let file: EncryptedModelFile = decode_container("encrypted model", bytes, limits::MODEL)?;
        check_version("encrypted model", file.format_version)?;
        let arch: Model = serde_json::from_str(&file.arch).map_err(|e| FheError::Decode {
            what: "encrypted model architecture",
            msg: e.to_string(),
        })?;
        arch.infer()?;
        let conf = ct_conformance();
        // Seeded ciphertexts have no safe-serialization name in shortint: bincode with a
        // size limit, then tfhe's conformance check against the default parameters.
        let de = |b: &Vec<u8>| -> Result<CompressedCiphertext, FheError> {
            use bincode::Options;
            use tfhe::conformance::ParameterSetConformant;
            let c: CompressedCiphertext =
                bincode_opts(limits::CIPHERTEXT)
                    .deserialize(b)
                    .map_err(|e| FheError::Decode {
                        what: "encrypted parameter",
                        msg: e.to_string(),
                    })?;
            if !c.is_conformant(&conf) {
                return Err(FheError::Decode {
                    what: "encrypted parameter",
                    msg: format!("not a ciphertext of {PARAMS_NAME}"),
                });
            }
            Ok(c)
        };
        let params: Vec<Option<LayerParams<CompressedCiphertext>>> = file
            .params
            .iter()
            .map(|p| {
                p.as_ref()
                    .map(|p| -> Result<_, FheError> {
                        Ok(LayerParams {
                            weights: p.weights.iter().map(de).collect::<Result<_, _>>()?,
                            bias: p
                                .bias
                                .iter()
                                .map(|d| d.iter().map(de).collect::<Result<_, _>>())
                                .collect::<Result<_, _>>()?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        eval::check_params(&arch, &params)?;
        Ok(EncryptedModel { arch, params })
    }

    fn decompress(&self) -> Vec<Option<LayerParams<Ciphertext>>> {
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
                })
            })
            .collect()
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

/// The encrypted logits as base-4 digits plus their public layout.
#[derive(Serialize, Deserialize)]
struct EncryptedOutputFile {
    format_version: u32,
    layout: OutputLayout,
    digits: Vec<Vec<u8>>,
}

/// A decrypted inference.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decrypted {
    pub label: usize,
    pub logits: Vec<i64>,
}

pub struct EncryptedOutput {
    pub layout: OutputLayout,
    pub digits: Vec<Ciphertext>,
}

impl EncryptedOutput {
    pub fn to_bytes(&self) -> Result<Vec<u8>, FheError> {
        use bincode::Options;
        let file = EncryptedOutputFile {
            format_version: ENCRYPTED_FORMAT_VERSION,
            layout: self.layout.clone(),
            digits: self
                .digits
                .iter()
                .map(|c| to_safe_bytes(c, limits::CIPHERTEXT))
                .collect::<Result<_, _>>()?,
        };
        bincode_opts(limits::OUTPUT)
            .serialize(&file)
            .map_err(|e| FheError::Decode {
                what: "encrypted output",
                msg: e.to_string(),
            })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FheError> {
        let file: EncryptedOutputFile =
            decode_container("encrypted output", bytes, limits::OUTPUT)?;
        check_version("encrypted output", file.format_version)?;
        if file.layout.offsets.len() != file.layout.digits.len()
            || file.layout.ciphertexts() != file.digits.len()
            || file.layout.digits.iter().any(|&d| d == 0 || d > 32)
            || file.layout.label_digits > 8
        {
            return Err(FheError::Decode {
                what: "encrypted output",
                msg: "layout does not match the ciphertexts".into(),
            });
        }
        let conf = ct_conformance();
        let digits = file
            .digits
            .iter()
            .map(|b| {
                safe_deserialize_conformant(b.as_slice(), limits::CIPHERTEXT, &conf)
                    .map_err(decode_err("output ciphertext"))
            })
            .collect::<Result<_, _>>()?;
        Ok(EncryptedOutput {
            layout: file.layout,
            digits,
        })
    }

    /// Decrypts the logits and the label. Every digit must decrypt to 0..=3 and the
    /// encrypted label must be the argmax of the logits: anything else means the
    /// ciphertexts were not produced under this key for this model, or were tampered with.
    pub fn decrypt(&self, keys: &OwnerKeys) -> Result<Decrypted, FheError> {
        let vals: Vec<u64> = self
            .digits
            .iter()
            .map(|c| keys.client.decrypt_message_and_carry(c))
            .collect();
        if let Some(v) = vals.iter().find(|&&v| v > 3) {
            return Err(FheError::WrongKey(format!("a digit decrypted to {v}")));
        }
        let logits = self.layout.logits(&vals);
        let label = self.layout.label(&vals);
        let expected = crate::reference::argmax(&logits);
        if label.is_some_and(|l| l != expected) {
            return Err(FheError::WrongKey(format!(
                "encrypted label {} is not the argmax {expected} of the logits",
                label.unwrap()
            )));
        }
        Ok(Decrypted {
            label: label.unwrap_or(expected),
            logits,
        })
    }
}

/// Timing of one encrypted inference.
#[derive(Clone, Debug, Default, Serialize)]
pub struct InferStats {
    pub pbs: u64,
    pub pbs_per_node: Vec<u64>,
    pub expand_s: f64,
    pub eval_s: f64,
}

/// The edge runtime: the encrypted model, the public material and a dedicated FHE thread
/// pool. Nothing here can decrypt.
pub struct EdgeRuntime {
    pub arch: Model,
    params: Vec<Option<LayerParams<Ciphertext>>>,
    engine: Engine<TfheBackend>,
    public_key: CompactPublicKey,
    pool: rayon::ThreadPool,
    planned: Vec<u64>,
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
        let (server_key, params) = pool.install(|| {
            rayon::join(
                || {
                    let (integer, ..) = public.server_key.decompress().into_raw_parts();
                    ServerKey::from(integer)
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
        let public_key = public.public_key.into_raw_parts().0.into_raw_parts();
        Ok(EdgeRuntime {
            arch: model.arch.clone(),
            params,
            engine: Engine::new(TfheBackend::new(server_key)),
            public_key,
            pool,
            planned,
        })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// PBS per node, planned from the architecture alone.
    pub fn planned_pbs(&self) -> &[u64] {
        &self.planned
    }

    pub fn server_key(&self) -> &ServerKey {
        &self.engine.backend.server_key
    }

    /// Encrypts a quantized frame with the public key.
    pub fn encrypt(&self, input: &[u8]) -> EncryptedInput {
        let msgs = eval::input_digits(&self.arch, input);
        EncryptedInput(self.public_key.encrypt_slice(&msgs))
    }

    /// Runs the encrypted model on an encrypted frame.
    pub fn infer(&self, input: &EncryptedInput) -> Result<(EncryptedOutput, InferStats), FheError> {
        let t0 = Instant::now();
        let cts = input
            .0
            .expand(ShortintCompactCiphertextListCastingMode::NoCasting)
            .map_err(|e| FheError::Decode {
                what: "encrypted input",
                msg: e.to_string(),
            })?;
        let expand_s = t0.elapsed().as_secs_f64();
        let before = self.engine.pbs_count();
        let t1 = Instant::now();
        let out = self
            .pool
            .install(|| eval::run(&self.engine, &self.arch, &self.params, cts))?;
        let eval_s = t1.elapsed().as_secs_f64();
        let stats = InferStats {
            pbs: self.engine.pbs_count() - before,
            pbs_per_node: out.pbs_per_node.clone(),
            expand_s,
            eval_s,
        };
        let layout = out.layout();
        let mut digits = out.flatten();
        for d in &mut digits {
            // Leveled sums bypass shortint's bookkeeping; the circuits proved every output
            // digit is in 0..=3 within the noise budget, so record that for conformance.
            d.degree = tfhe::shortint::ciphertext::Degree::new(3);
            d.set_noise_level_to_nominal();
        }
        Ok((EncryptedOutput { layout, digits }, stats))
    }

    /// Runs `f` on the FHE pool (for benchmarks of single PBS on the same threads).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}
