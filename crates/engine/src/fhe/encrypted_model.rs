//! A model whose parameters are encrypted, and its file.

use super::eval::{self, LayerParams};
use super::{
    check_len, check_version, ct_conformance, decode_container, decode_part, encode, entropy,
    limits, tables, FheError, OwnerKeys, ENCRYPTED_MODEL_FORMAT_VERSION, PARAMS, PARAMS_NAME,
};
use crate::model::Model;
use serde::{Deserialize, Serialize};
use tfhe::shortint::ciphertext::CompressedCiphertext;
use tfhe::shortint::parameters::CiphertextConformanceParams;
use tfhe::shortint::{Ciphertext, ServerKey};

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
        let ser = |c: &CompressedCiphertext| encode("encrypted parameter", c, limits::CIPHERTEXT);
        let ser_table = |t: &tables::SeededTable| encode("secret table", t, limits::TABLE);
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
        encode("encrypted model", &file, limits::MODEL)
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
            use tfhe::conformance::ParameterSetConformant;
            let c: CompressedCiphertext =
                decode_part("encrypted parameter", b, limits::CIPHERTEXT)?;
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
            let t: tables::SeededTable = decode_part("secret table", b, limits::TABLE)?;
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
    pub(super) fn decompress(&self) -> Vec<Option<LayerParams<Ciphertext, tables::SeededTable>>> {
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
