//! Secret tables under TFHE: the owner encrypts each lookup-table accumulator as a seeded
//! GLWE under the GLWE secret key of its client key; the camera expands it and hands it to
//! shortint's PBS as the accumulator, which returns an encryption of the table's entry.
//!
//! The accumulator is exactly the one shortint builds for a clear table of the same
//! entries (`generate_lookup_table` / `generate_many_lookup_table`), so the blind rotation
//! and sample extraction are shortint's own; only its body is hidden under GLWE noise.

use serde::{Deserialize, Serialize};
use tfhe::core_crypto::prelude::{
    encrypt_seeded_glwe_ciphertext, CiphertextModulus, GlweSecretKey, GlweSize, PlaintextList,
    SeededGlweCiphertextOwned,
};
use tfhe::core_crypto::seeders::Seeder;
use tfhe::shortint::ciphertext::Degree;
use tfhe::shortint::client_key::atomic_pattern::AtomicPatternClientKey;
use tfhe::shortint::server_key::{LookupTableOwned, ManyLookupTableOwned};
use tfhe::shortint::{ClientKey, ServerKey};

use super::eval::ClearTable;
use super::tfhe_backend::SecretTable;
use super::{FheError, PARAMS};

/// One encrypted table as stored in the encrypted model: `k` tables packed for one
/// many-LUT PBS, the accumulator's GLWE with its mask given by a seed.
#[derive(Clone, Serialize, Deserialize)]
pub struct SeededTable {
    pub k: u8,
    pub glwe: SeededGlweCiphertextOwned<u64>,
}

/// The clear accumulator shortint would use for these `k` tables.
fn accumulator(sks: &ServerKey, tables: &ClearTable) -> Vec<u64> {
    let acc = match tables.as_slice() {
        [t] => sks.generate_lookup_table(|x| t[(x % 16) as usize]).acc,
        many => {
            let fns: Vec<Box<dyn Fn(u64) -> u64 + '_>> = many
                .iter()
                .map(|t| Box::new(move |x: u64| t[(x % 16) as usize]) as Box<dyn Fn(u64) -> u64>)
                .collect();
            let refs: Vec<&dyn Fn(u64) -> u64> = fns.iter().map(|f| f.as_ref()).collect();
            sks.generate_many_lookup_table(&refs).acc
        }
    };
    acc.get_body().as_ref().to_vec()
}

/// Encrypts the owner's tables (one PBS's worth each) under the client key's GLWE key.
/// `sks` only builds the clear accumulators; nothing of it is kept.
pub fn encrypt_tables(
    client: &ClientKey,
    sks: &ServerKey,
    tables: &[ClearTable],
) -> Result<Vec<SeededTable>, FheError> {
    let AtomicPatternClientKey::Standard(std) = &client.atomic_pattern else {
        return Err(FheError::Decode {
            what: "client key",
            msg: "secret tables need the standard (KS-PBS) atomic pattern".into(),
        });
    };
    let lwe = std.large_lwe_secret_key();
    let glwe_key = GlweSecretKey::from_container(lwe.as_ref(), PARAMS.polynomial_size);
    let mut seeder = super::entropy::seeder();
    Ok(tables
        .iter()
        .map(|t| {
            let body = accumulator(sks, t);
            let mut glwe = SeededGlweCiphertextOwned::new(
                0u64,
                PARAMS.glwe_dimension.to_glwe_size(),
                PARAMS.polynomial_size,
                seeder.seed().into(),
                CiphertextModulus::new_native(),
            );
            encrypt_seeded_glwe_ciphertext(
                &glwe_key,
                &mut glwe,
                &PlaintextList::from_container(body),
                PARAMS.glwe_noise_distribution,
                &mut seeder,
            );
            SeededTable {
                k: t.len() as u8,
                glwe,
            }
        })
        .collect())
}

/// Checks an untrusted table against the default parameters.
pub fn check_table(t: &SeededTable) -> Result<(), FheError> {
    let ok = matches!(t.k, 1 | 2 | 4)
        && t.glwe.glwe_size() == GlweSize(PARAMS.glwe_dimension.0 + 1)
        && t.glwe.polynomial_size() == PARAMS.polynomial_size
        && t.glwe.ciphertext_modulus() == CiphertextModulus::new_native()
        && t.glwe.as_ref().len() == PARAMS.polynomial_size.0;
    if !ok {
        return Err(FheError::Decode {
            what: "secret table",
            msg: format!(
                "not a table of {} (k = {}, GLWE size {:?}, N = {:?})",
                super::PARAMS_NAME,
                t.k,
                t.glwe.glwe_size(),
                t.glwe.polynomial_size()
            ),
        });
    }
    Ok(())
}

/// Expands a stored table into the accumulator the PBS reads (the camera side).
pub fn expand_table(sks: &ServerKey, t: &SeededTable) -> SecretTable {
    let acc = t.glwe.clone().decompress_into_glwe_ciphertext();
    match t.k {
        1 => SecretTable::One(LookupTableOwned {
            acc,
            degree: Degree::new(15),
        }),
        k => {
            // the layout metadata of a many-LUT with k functions; its accumulator is ours
            let id = |x: u64| x;
            let fns: Vec<&dyn Fn(u64) -> u64> = vec![&id; k as usize];
            let meta = sks.generate_many_lookup_table(&fns);
            SecretTable::Many(ManyLookupTableOwned { acc, ..meta })
        }
    }
}
