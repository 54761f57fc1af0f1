//! What the circuits need from a ciphertext arithmetic, and a clear backend that models it.
//!
//! The circuits (see `circuit.rs`) are written once against [`Backend`]: the TFHE backend runs
//! them for real, [`ClearBackend`] runs the identical sequence of operations on plaintext
//! torus messages (fast, for exhaustive tests of the circuit logic), and [`PlanBackend`]
//! runs them on nothing at all to count PBS before any key exists.

/// Messages live in Z_32: 2 message bits, 2 carry bits and the padding bit of TFHE's
/// default 2_2 parameters. A lookup table reads values in `0..BLOCK`.
pub const TORUS: u64 = 32;
pub const BLOCK: u64 = 16;

/// A ciphertext arithmetic. Values are messages in Z_32; every call to `lut` or `many_lut`
/// is one programmable bootstrapping.
pub trait Backend: Sync {
    type Ct: Clone + Send + Sync;
    /// A lookup table the evaluator cannot read: on TFHE, an accumulator the owner encrypted
    /// under the GLWE secret key. It holds one table, or `k` tables for a many-LUT PBS.
    type Table: Clone + Send + Sync;
    /// A noiseless encryption of `v` (used for constants).
    fn trivial(&self, v: u64) -> Self::Ct;
    fn add_assign(&self, a: &mut Self::Ct, b: &Self::Ct);
    fn sub_assign(&self, a: &mut Self::Ct, b: &Self::Ct);
    fn scalar_mul_assign(&self, a: &mut Self::Ct, k: u64);
    /// Adds a clear constant (mod 32).
    fn add_const_assign(&self, a: &mut Self::Ct, k: u64);
    /// One PBS: `table[v]` for the input message v (< 16); outputs are taken mod 32.
    fn lut(&self, a: &Self::Ct, table: &[u64; BLOCK as usize]) -> Self::Ct;
    /// One PBS evaluating `tables.len()` functions; the input must be < 16 / tables.len().
    fn many_lut(&self, a: &Self::Ct, tables: &[[u64; BLOCK as usize]]) -> Vec<Self::Ct>;
    /// One PBS reading the padding bit too: `+c` for a message in 0..16, `-c` (mod 32) for
    /// one in 16..32 — the negacyclic half of a constant table.
    fn sign_lut(&self, a: &Self::Ct, c: u64) -> Self::Ct;
    /// One PBS with a secret table holding `k` tables: `[T_0[v], .., T_{k-1}[v]]` for the
    /// input message v < 16 / k. The input must not be a trivial ciphertext (tfhe would
    /// apply the table in the clear to it).
    fn secret_lut(&self, a: &Self::Ct, table: &Self::Table, k: usize) -> Vec<Self::Ct>;
}

/// Plaintext model of the TFHE arithmetic: exact on messages, no noise.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClearBackend;

impl Backend for ClearBackend {
    type Ct = u64;
    /// The tables themselves, 16 / k entries used of each.
    type Table = Vec<[u64; BLOCK as usize]>;
    fn trivial(&self, v: u64) -> u64 {
        v % TORUS
    }
    fn add_assign(&self, a: &mut u64, b: &u64) {
        *a = (*a + b) % TORUS;
    }
    fn sub_assign(&self, a: &mut u64, b: &u64) {
        *a = (*a + TORUS - b % TORUS) % TORUS;
    }
    fn scalar_mul_assign(&self, a: &mut u64, k: u64) {
        *a = (*a * (k % TORUS)) % TORUS;
    }
    fn add_const_assign(&self, a: &mut u64, k: u64) {
        *a = (*a + k % TORUS) % TORUS;
    }
    fn lut(&self, a: &u64, table: &[u64; BLOCK as usize]) -> u64 {
        // A message at or above 16 would hit the negacyclic half of the torus: the circuits
        // must never produce one, and the bound tracking guarantees it.
        assert!(*a < BLOCK, "PBS input {a} outside 0..16");
        table[*a as usize] % TORUS
    }
    fn many_lut(&self, a: &u64, tables: &[[u64; BLOCK as usize]]) -> Vec<u64> {
        assert!(
            *a < BLOCK / tables.len() as u64,
            "many-LUT input {a} too large"
        );
        tables.iter().map(|t| t[*a as usize] % TORUS).collect()
    }
    fn sign_lut(&self, a: &u64, c: u64) -> u64 {
        if *a < BLOCK {
            c % TORUS
        } else {
            (TORUS - c % TORUS) % TORUS
        }
    }
    fn secret_lut(&self, a: &u64, table: &Self::Table, k: usize) -> Vec<u64> {
        assert_eq!(
            table.len(),
            k,
            "secret table holds {} tables, not {k}",
            table.len()
        );
        self.many_lut(a, table)
    }
}

/// Runs a circuit on nothing: only the PBS counting of the wrapping [`super::circuit::Engine`]
/// and its bound checks happen.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanBackend;

impl Backend for PlanBackend {
    type Ct = ();
    type Table = ();
    fn trivial(&self, _: u64) {}
    fn add_assign(&self, _: &mut (), _: &()) {}
    fn sub_assign(&self, _: &mut (), _: &()) {}
    fn scalar_mul_assign(&self, _: &mut (), _: u64) {}
    fn add_const_assign(&self, _: &mut (), _: u64) {}
    fn lut(&self, _: &(), _: &[u64; BLOCK as usize]) {}
    fn many_lut(&self, _: &(), tables: &[[u64; BLOCK as usize]]) -> Vec<()> {
        vec![(); tables.len()]
    }
    fn sign_lut(&self, _: &(), _: u64) {}
    fn secret_lut(&self, _: &(), _: &(), k: usize) -> Vec<()> {
        vec![(); k]
    }
}
