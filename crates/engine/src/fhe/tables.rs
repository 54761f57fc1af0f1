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

/// Output noise of secret-table PBS against clear-table PBS with the same keys, inputs and
/// tables (`fhecam bench --table-noise N`).
#[derive(Clone, Debug, Serialize)]
pub struct NoiseReport {
    pub evaluations: usize,
    /// Standard deviation of the output error, log2 of 64-bit torus units.
    pub std_log2_secret: f64,
    pub std_log2_clear: f64,
    /// (std secret / std clear)², the factor `layer::lut::SECRET_VAR` must cover.
    pub variance_ratio: f64,
    /// Outputs that decrypted to another value (for either table).
    pub wrong: usize,
}

/// Runs `n` secret-table PBS and `n` clear-table PBS on random 4-bit inputs and random
/// 4-bit tables (a fresh encrypted table each time) and measures each output's error with
/// the secret key. Uses the current rayon pool.
pub fn measure_noise(client: &ClientKey, n: usize) -> Result<NoiseReport, FheError> {
    use rand::Rng;
    use rayon::prelude::*;
    use tfhe::core_crypto::prelude::decrypt_lwe_ciphertext;
    let AtomicPatternClientKey::Standard(std) = &client.atomic_pattern else {
        return Err(FheError::Decode {
            what: "client key",
            msg: "secret tables need the standard (KS-PBS) atomic pattern".into(),
        });
    };
    let sks = ServerKey::new(client);
    let big = std.large_lwe_secret_key();
    const DELTA: u64 = 1 << 59;
    let err = |ct: &tfhe::shortint::Ciphertext, want: u64| {
        decrypt_lwe_ciphertext(&big, &ct.ct)
            .0
            .wrapping_sub(want * DELTA) as i64 as f64
    };
    let errs: Vec<(f64, f64)> = (0..n)
        .into_par_iter()
        .map(|_| {
            super::entropy::seed_thread();
            let mut rng = rand::thread_rng();
            let mut t = [0u64; 16];
            t.iter_mut().for_each(|v| *v = rng.gen_range(0..16));
            let x = rng.gen_range(0..16u64);
            let ct = client.unchecked_encrypt(x);
            let secret = encrypt_tables(client, &sks, &[vec![t]])?;
            let SecretTable::One(lut) = expand_table(&sks, &secret[0]) else {
                unreachable!("one table per PBS")
            };
            let clear = sks.generate_lookup_table(|v| t[(v % 16) as usize]);
            let want = t[x as usize];
            Ok((
                err(&sks.apply_lookup_table(&ct, &lut), want),
                err(&sks.apply_lookup_table(&ct, &clear), want),
            ))
        })
        .collect::<Result<_, FheError>>()?;
    let std = |f: &dyn Fn(&(f64, f64)) -> f64| {
        let mean = errs.iter().map(f).sum::<f64>() / n as f64;
        (errs.iter().map(|e| (f(e) - mean).powi(2)).sum::<f64>() / n as f64).sqrt()
    };
    let (s, c) = (std(&|e| e.0), std(&|e| e.1));
    let half = (DELTA / 2) as f64;
    Ok(NoiseReport {
        evaluations: n,
        std_log2_secret: s.log2(),
        std_log2_clear: c.log2(),
        variance_ratio: (s / c).powi(2),
        wrong: errs
            .iter()
            .filter(|e| e.0.abs() >= half || e.1.abs() >= half)
            .count(),
    })
}
