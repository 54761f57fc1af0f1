//! The owner's secret key at rest: Argon2id derives a key from a passphrase, XChaCha20-Poly1305
//! seals the secret bytes. Salt, nonce and KDF cost travel with the ciphertext so that the cost
//! can be raised later without breaking old records; the plaintext only ever lives in memory
//! (zeroized on drop).

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use thiserror::Error;
use zeroize::Zeroizing;

/// Shortest passphrase accepted when sealing (opening accepts any, so that a policy change
/// never locks an owner out of existing records).
pub const MIN_PASSPHRASE_CHARS: usize = 8;
pub const SALT_LEN: usize = 16;
pub const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Largest sealed secret accepted (a shortint ClientKey is ~25 kB).
pub const MAX_SEALED_LEN: usize = 16 << 20;

#[derive(Debug, Error)]
pub enum SecretError {
    #[error("wrong passphrase, or the sealed key was altered (authenticated decryption failed)")]
    WrongPassphrase,
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    #[error("the passphrase is shorter than {MIN_PASSPHRASE_CHARS} characters")]
    WeakPassphrase,
    #[error("key derivation parameters {0}")]
    BadParams(String),
    #[error("sealed secret is malformed: {0}")]
    Malformed(String),
    #[error("passphrase: {0}")]
    Source(String),
}

/// The environment variable that holds the owner's passphrase when no file is given.
pub const PASSPHRASE_ENV: &str = "FHECAM_OWNER_PASSPHRASE";
/// Largest passphrase file read.
const PASSPHRASE_FILE_LIMIT: u64 = 4 << 10;

/// The owner's passphrase from `file` (mode 0600 or stricter, at most 4 KiB) or else from
/// [`PASSPHRASE_ENV`]: one rule for every command that unseals or seals a key, so a
/// passphrase that protected a model always opens it again.
pub fn load_passphrase(file: Option<&std::path::Path>) -> Result<Passphrase, SecretError> {
    let src = |m: String| SecretError::Source(m);
    let text = match file {
        Some(p) => {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(p).map_err(|e| src(format!("{}: {e}", p.display())))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(src(format!(
                    "{} has mode {mode:04o}: it holds a secret, make it 0600 (chmod 600)",
                    p.display()
                )));
            }
            let bytes = fhecam_proto::files::read_limited(p, PASSPHRASE_FILE_LIMIT)
                .map_err(|e| src(format!("{}: {e}", p.display())))?;
            String::from_utf8(bytes).map_err(|_| src(format!("{} is not UTF-8", p.display())))?
        }
        None => match std::env::var(PASSPHRASE_ENV) {
            Ok(s) => s,
            Err(std::env::VarError::NotPresent) => {
                return Err(src(format!(
                    "none given: set {PASSPHRASE_ENV} or name a passphrase file"
                )))
            }
            Err(e) => return Err(src(format!("{PASSPHRASE_ENV}: {e}"))),
        },
    };
    Passphrase::new(text)
}

/// A passphrase held in zeroized memory.
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Takes the passphrase as given; a single trailing newline (as `echo` and editors
    /// leave in a file) is not part of it.
    pub fn new(mut s: String) -> Result<Self, SecretError> {
        if s.ends_with('\n') {
            s.pop();
            if s.ends_with('\r') {
                s.pop();
            }
        }
        let s = Zeroizing::new(s);
        if s.is_empty() {
            return Err(SecretError::EmptyPassphrase);
        }
        Ok(Passphrase(s))
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Argon2id cost. The default follows RFC 9106's second recommendation (64 MiB, 3 passes)
/// with one lane: about half a second on a laptop core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Bounds on parameters read back from storage, so a tampered record cannot make the
    /// owner's machine allocate gigabytes or spin for hours.
    fn check(&self) -> Result<(), SecretError> {
        if !(8 * 1024..=2 * 1024 * 1024).contains(&self.m_cost_kib)
            || !(1..=64).contains(&self.t_cost)
            || !(1..=16).contains(&self.p_cost)
        {
            return Err(SecretError::BadParams(format!(
                "out of range: m={} KiB, t={}, p={}",
                self.m_cost_kib, self.t_cost, self.p_cost
            )));
        }
        Ok(())
    }

    fn derive(
        &self,
        pass: &Passphrase,
        salt: &[u8; SALT_LEN],
    ) -> Result<Zeroizing<[u8; 32]>, SecretError> {
        self.check()?;
        let params = Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| SecretError::BadParams(e.to_string()))?;
        let mut key = Zeroizing::new([0u8; 32]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(pass.bytes(), salt, key.as_mut())
            .map_err(|e| SecretError::BadParams(e.to_string()))?;
        Ok(key)
    }
}

/// A secret sealed under a passphrase. `aad` binds it to its context (the model id), so a
/// sealed key copied onto another record does not open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    pub kdf: KdfParams,
    pub salt: [u8; SALT_LEN],
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the 16-byte Poly1305 tag.
    pub ciphertext: Vec<u8>,
}

pub fn seal(
    secret: &[u8],
    pass: &Passphrase,
    aad: &[u8],
    kdf: KdfParams,
) -> Result<Sealed, SecretError> {
    if pass.0.chars().count() < MIN_PASSPHRASE_CHARS {
        return Err(SecretError::WeakPassphrase);
    }
    if secret.len() + TAG_LEN > MAX_SEALED_LEN {
        return Err(SecretError::Malformed(format!(
            "{} bytes is over the {MAX_SEALED_LEN}-byte limit",
            secret.len()
        )));
    }
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    // 192-bit random nonces: no counter to keep, collisions are negligible.
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let key = kdf.derive(pass, &salt)?;
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key.as_ref()));
    let mut buf = Vec::with_capacity(secret.len() + TAG_LEN);
    buf.extend_from_slice(secret);
    cipher
        .encrypt_in_place(XNonce::from_slice(&nonce), aad, &mut buf)
        .map_err(|_| SecretError::Malformed("encryption failed".into()))?;
    Ok(Sealed {
        kdf,
        salt,
        nonce,
        ciphertext: buf,
    })
}

/// Opens a sealed secret; the plaintext is zeroized when dropped.
pub fn open(
    sealed: &Sealed,
    pass: &Passphrase,
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    if sealed.ciphertext.len() < TAG_LEN || sealed.ciphertext.len() > MAX_SEALED_LEN {
        return Err(SecretError::Malformed(format!(
            "{} bytes of ciphertext",
            sealed.ciphertext.len()
        )));
    }
    let key = sealed.kdf.derive(pass, &sealed.salt)?;
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key.as_ref()));
    // Decrypt in a buffer that is zeroized on drop and never reallocated.
    let mut buf = Zeroizing::new(sealed.ciphertext.clone());
    cipher
        .decrypt_in_place(XNonce::from_slice(&sealed.nonce), aad, &mut *buf)
        .map_err(|_| SecretError::WrongPassphrase)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Cheap parameters: the tests check the construction, not the cost.
    const FAST: KdfParams = KdfParams {
        m_cost_kib: 8 * 1024,
        t_cost: 1,
        p_cost: 1,
    };

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(s.into()).unwrap()
    }

    #[test]
    fn seal_open_round_trip_and_refusals() {
        let s = seal(b"the client key", &pass("correct horse"), b"id-1", FAST).unwrap();
        assert_ne!(&s.ciphertext[..14], b"the client key");
        let got = open(&s, &pass("correct horse\n"), b"id-1").unwrap();
        assert_eq!(&got[..], b"the client key");
        assert!(matches!(
            open(&s, &pass("wrong horse"), b"id-1"),
            Err(SecretError::WrongPassphrase)
        ));
        // bound to its record
        assert!(matches!(
            open(&s, &pass("correct horse"), b"id-2"),
            Err(SecretError::WrongPassphrase)
        ));
        let mut t = s.clone();
        t.ciphertext[3] ^= 1;
        assert!(open(&t, &pass("correct horse"), b"id-1").is_err());
        let mut t = s.clone();
        t.kdf.m_cost_kib = u32::MAX;
        assert!(matches!(
            open(&t, &pass("correct horse"), b"id-1"),
            Err(SecretError::BadParams(_))
        ));
    }

    #[test]
    fn passphrase_rules() {
        assert!(matches!(
            Passphrase::new("\n".into()),
            Err(SecretError::EmptyPassphrase)
        ));
        assert!(matches!(
            seal(b"x", &pass("short"), b"", FAST),
            Err(SecretError::WeakPassphrase)
        ));
    }

    #[test]
    fn a_passphrase_file_is_read_one_way_and_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("pass");
        // one trailing newline is not part of it; a second one is
        std::fs::write(&f, "correct horse\n\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let p = load_passphrase(Some(&f)).unwrap();
        assert_eq!(p.bytes(), b"correct horse\n");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_passphrase(Some(&f)).err().unwrap().to_string();
        assert!(
            err.contains("has mode 0640") && err.contains("chmod 600"),
            "{err}"
        );
        let missing = load_passphrase(Some(&d.path().join("none"))).err().unwrap();
        assert!(matches!(missing, SecretError::Source(_)));
    }
}
