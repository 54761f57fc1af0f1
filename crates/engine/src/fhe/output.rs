//! The encrypted output: the logits' digits packed by list compression, and the owner's
//! decryption of them.

use super::eval::OutputLayout;
use super::{
    check_len, check_version, decode_container, encode, entropy, limits, u32_le, FheError,
    OwnerKeys, COMPRESSION_PARAMS, COMPRESSION_PARAMS_NAME, OUTPUT_FORMAT_VERSION, PARAMS,
};
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::prelude::compressed_modulus_switched_glwe_ciphertext::CompressedModulusSwitchedGlweCiphertext;
use tfhe::shortint::list_compression::CompressionKey;
use tfhe::shortint::Ciphertext;

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
        let file = EncryptedOutputFile {
            format_version: OUTPUT_FORMAT_VERSION,
            layout: self.layout.clone(),
            packed: self.packed.clone(),
        };
        encode("encrypted output", &file, limits::OUTPUT)
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
