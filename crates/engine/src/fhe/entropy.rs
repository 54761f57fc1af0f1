//! Where the randomness of keys and ciphertexts comes from.
//!
//! tfhe seeds each thread's engine from the CPU's RDSEED instruction whenever the CPU lists
//! it, and from the operating system only otherwise. A CPU whose RDSEED repeats itself (a
//! known fault of some parts and hypervisors) then gives every thread the same seed: keys
//! generated on two threads, or in two runs, come out equal, and every ciphertext's noise
//! can be replayed. One of our CI hosts did exactly that (a key "from another owner"
//! decrypted the camera's output). So every thread that draws a key or encrypts is
//! reseeded first from the OS (getrandom), mixed with RDSEED where there is one: the seed is
//! no weaker than the better of the two.

use std::cell::Cell;
use tfhe::core_crypto::seeders::UnixSeeder;
use tfhe::shortint::engine::ShortintEngine;

thread_local! {
    static SEEDED: Cell<bool> = const { Cell::new(false) };
}

/// Replaces this thread's tfhe engine with one seeded from the OS, once per thread. Call it
/// before the first key generation or encryption on a thread; it is a flag check afterwards.
pub fn seed_thread() {
    if SEEDED.with(Cell::get) {
        return;
    }
    let mut seeder = UnixSeeder::new(hardware_seed().unwrap_or(0));
    let engine = ShortintEngine::new_from_seeder(&mut seeder);
    ShortintEngine::with_thread_local_mut(|e| *e = engine);
    SEEDED.with(|s| s.set(true));
}

/// 128 bits from RDSEED, if this CPU has it.
/// A seeder for core_crypto's own encryptions (the owner's secret tables): the OS's
/// entropy mixed with RDSEED, like [`seed_thread`].
pub fn seeder() -> UnixSeeder {
    UnixSeeder::new(hardware_seed().unwrap_or(0))
}

fn hardware_seed() -> Option<u128> {
    #[cfg(target_arch = "x86_64")]
    {
        use tfhe::core_crypto::seeders::{RdseedSeeder, Seeder};
        if RdseedSeeder::is_available() {
            return Some(RdseedSeeder::new().seed().0);
        }
    }
    None
}

/// Whether this CPU's RDSEED gave the same 128 bits twice in a row (`None`: no RDSEED).
/// A working RDSEED repeats with probability 2^-128; fhecam does not depend on it either way,
/// but the owner tools say so, since other software on the machine may.
pub fn hardware_seed_repeats() -> Option<bool> {
    let a = hardware_seed()?;
    Some(hardware_seed()? == a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tfhe::core_crypto::seeders::Seeder;

    #[test]
    fn a_constant_hardware_seed_still_gives_distinct_seeds() {
        // what a faulty RDSEED hands over: the same secret each time
        let mut a = UnixSeeder::new(0);
        let mut b = UnixSeeder::new(0);
        assert_ne!(a.seed().0, b.seed().0);
    }

    #[test]
    fn threads_draw_distinct_keys() {
        let draw = || {
            std::thread::spawn(|| {
                seed_thread();
                let k = tfhe::shortint::ClientKey::new(super::super::PARAMS);
                bincode::serialize(&k).unwrap()
            })
        };
        let (a, b) = (draw(), draw());
        assert_ne!(a.join().unwrap(), b.join().unwrap());
    }
}
