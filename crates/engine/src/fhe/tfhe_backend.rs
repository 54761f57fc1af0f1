//! The real backend: tfhe shortint ciphertexts under the default 2_2 parameters.
//!
//! Leveled operations work on the raw LWE ciphertexts (the circuits track bounds and noise
//! themselves, tighter than shortint's degree bookkeeping); every `lut` is one
//! keyswitch + programmable bootstrapping by the server key.

use super::backend::{Backend, BLOCK};
use tfhe::core_crypto::prelude::{
    lwe_ciphertext_add_assign, lwe_ciphertext_cleartext_mul_assign,
    lwe_ciphertext_plaintext_add_assign, lwe_ciphertext_sub_assign, Cleartext, Plaintext,
};
use tfhe::shortint::ciphertext::Degree;
use tfhe::shortint::server_key::{LookupTableOwned, ManyLookupTableOwned};
use tfhe::shortint::{Ciphertext, ServerKey};

/// A lookup table the owner encrypted: the accumulator of one table, or of `k` tables for
/// a many-LUT PBS, as a GLWE under the client key's GLWE secret key.
#[derive(Clone)]
pub enum SecretTable {
    One(LookupTableOwned),
    Many(ManyLookupTableOwned),
}

/// Scaling of a message in Z_32 onto the 64-bit torus: 2^64 / 32.
const DELTA: u64 = 1 << 59;

pub struct TfheBackend {
    pub server_key: ServerKey,
}

impl TfheBackend {
    pub fn new(server_key: ServerKey) -> Self {
        TfheBackend { server_key }
    }
}

impl Backend for TfheBackend {
    type Ct = Ciphertext;
    type Table = SecretTable;

    fn trivial(&self, v: u64) -> Ciphertext {
        let mut ct = self.server_key.unchecked_create_trivial(0);
        lwe_ciphertext_plaintext_add_assign(&mut ct.ct, Plaintext(v.wrapping_mul(DELTA)));
        ct
    }

    fn add_assign(&self, a: &mut Ciphertext, b: &Ciphertext) {
        lwe_ciphertext_add_assign(&mut a.ct, &b.ct);
    }

    fn sub_assign(&self, a: &mut Ciphertext, b: &Ciphertext) {
        lwe_ciphertext_sub_assign(&mut a.ct, &b.ct);
    }

    fn scalar_mul_assign(&self, a: &mut Ciphertext, k: u64) {
        lwe_ciphertext_cleartext_mul_assign(&mut a.ct, Cleartext(k));
    }

    fn add_const_assign(&self, a: &mut Ciphertext, k: u64) {
        lwe_ciphertext_plaintext_add_assign(&mut a.ct, Plaintext(k.wrapping_mul(DELTA)));
    }

    fn lut(&self, a: &Ciphertext, table: &[u64; BLOCK as usize]) -> Ciphertext {
        let lut = self
            .server_key
            .generate_lookup_table(|x| table[(x % BLOCK) as usize]);
        let mut ct = a.clone();
        // the circuit checked the true bound; shortint's own degree may be stale
        ct.degree = Degree::new(BLOCK - 1);
        self.server_key.apply_lookup_table_assign(&mut ct, &lut);
        ct
    }

    fn many_lut(&self, a: &Ciphertext, tables: &[[u64; BLOCK as usize]]) -> Vec<Ciphertext> {
        let fns: Vec<Box<dyn Fn(u64) -> u64 + '_>> = tables
            .iter()
            .map(|t| Box::new(move |x: u64| t[(x % BLOCK) as usize]) as Box<dyn Fn(u64) -> u64>)
            .collect();
        let refs: Vec<&dyn Fn(u64) -> u64> = fns.iter().map(|f| f.as_ref()).collect();
        let lut = self.server_key.generate_many_lookup_table(&refs);
        let mut ct = a.clone();
        ct.degree = Degree::new(BLOCK / tables.len() as u64 - 1);
        self.server_key.apply_many_lookup_table(&ct, &lut)
    }

    fn sign_lut(&self, a: &Ciphertext, c: u64) -> Ciphertext {
        // A constant table: the blind rotation negates it for messages with the padding bit set.
        self.lut(a, &[c; BLOCK as usize])
    }

    fn secret_lut(&self, a: &Ciphertext, table: &SecretTable, k: usize) -> Vec<Ciphertext> {
        let mut ct = a.clone();
        ct.degree = Degree::new(BLOCK / k as u64 - 1);
        // shortint's apply functions: keyswitch, modulus switch with its noise reduction,
        // blind rotation of the (encrypted) accumulator, sample extraction
        match table {
            SecretTable::One(lut) => vec![self.server_key.apply_lookup_table(&ct, lut)],
            SecretTable::Many(lut) => self.server_key.apply_many_lookup_table(&ct, lut),
        }
    }
}
