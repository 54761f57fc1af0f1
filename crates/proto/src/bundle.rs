//! Signed deployment bundles: what an edge device receives for one model version. Nothing
//! secret is inside — the encrypted parameters, the compact public key and the compressed
//! server key — but the owner signs it (Ed25519) so a camera runs only what its owner
//! deployed.
//!
//! Layout (integers little endian):
//!
//! ```text
//! "FHECAMBD"           8 bytes magic
//! format version       u32
//! header length h      u32 (≤ MAX_HEADER_BYTES)
//! header               h bytes of JSON (`BundleHeader`)
//! sections             concatenated, in the header's order and sizes:
//!                      encrypted_model, public_key, evaluation_key
//! signature            64 bytes, Ed25519 over every preceding byte
//! ```
//!
//! A reader checks, in order: the size limit, the magic, the format version, the signature,
//! the header and section bounds, and only then lets tfhe parse anything.

use crate::files::{read_limited, ReadError};
use crate::ids::ModelId;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey, SIGNATURE_LENGTH};
use fhecam_engine::fhe::{self, EncryptedModel, PublicMaterial};
use fhecam_engine::model::InputSpec;
use serde::{Deserialize, Serialize};
use std::path::Path;
use thiserror::Error;

pub const MAGIC: &[u8; 8] = b"FHECAMBD";
/// 2: the evaluation key section carries the compression key for packed outputs.
pub const FORMAT_VERSION: u32 = 2;
/// Largest bundle accepted; checked before reading (a 2_2 bundle is ~43 MB).
pub const MAX_BUNDLE_BYTES: u64 = 256 << 20;
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Largest key file read (a hex key is 65 bytes).
pub const MAX_KEY_FILE_BYTES: u64 = 4 << 10;

pub const SECTION_MODEL: &str = "encrypted_model";
pub const SECTION_PUBLIC_KEY: &str = "public_key";
/// The compressed server key and the compression key (`PublicMaterial::server_key_bytes`).
pub const SECTION_SERVER_KEY: &str = "evaluation_key";
const SECTIONS: [&str; 3] = [SECTION_MODEL, SECTION_PUBLIC_KEY, SECTION_SERVER_KEY];
const PREFIX: usize = 16;

#[derive(Debug, Error)]
pub enum BundleError {
    #[error("bundle is {size} bytes, over the {MAX_BUNDLE_BYTES}-byte limit")]
    TooLarge { size: u64 },
    #[error("not an fhecam bundle (bad magic bytes)")]
    Magic,
    #[error("bundle format version {found}, this fhecam reads format version {FORMAT_VERSION}{}", if *.found < FORMAT_VERSION { ": the bundle predates compressed outputs, deploy the model again with this fhecam (`fhecam protect`, then `fhecam deploy`)" } else { "" })]
    Version { found: u32 },
    #[error("bundle signature does not verify with owner key {key_id}")]
    Signature { key_id: String },
    #[error("bundle truncated: section {section}{}", if *.signed { "" } else { " (so its signature cannot verify)" })]
    Truncated { section: String, signed: bool },
    #[error("bundle has {0} bytes after its last section")]
    Trailing(u64),
    #[error("bundle header: {0}")]
    Header(String),
    #[error(
        "bundle is for tfhe parameters {found}, this fhecam uses {}",
        fhe::PARAMS_NAME
    )]
    Params { found: String },
    #[error("bundle section {section}: {source}")]
    Content {
        section: &'static str,
        source: fhe::FheError,
    },
    #[error("bundle header does not match its encrypted model: {0}")]
    Mismatch(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    KeyFile { path: String, msg: String },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SectionInfo {
    pub name: String,
    pub bytes: u64,
}

/// What a bundle says about itself (signed with everything else).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleHeader {
    pub model_id: ModelId,
    pub name: String,
    pub version: u32,
    pub created_unix: i64,
    pub input: InputSpec,
    pub num_classes: usize,
    /// The tfhe parameter set every key and ciphertext inside uses.
    pub tfhe_params: String,
    pub sections: Vec<SectionInfo>,
}

/// The model-version facts the owner puts in a bundle.
pub struct BundleMeta {
    pub model_id: ModelId,
    pub name: String,
    pub version: u32,
    pub created_unix: i64,
    pub input: InputSpec,
    pub num_classes: usize,
}

/// A bundle whose signature and framing are verified; tfhe data not parsed yet.
pub struct VerifiedBundle<'a> {
    pub header: BundleHeader,
    pub encrypted_model: &'a [u8],
    pub public_key: &'a [u8],
    pub server_key: &'a [u8],
}

/// A verified bundle with its tfhe contents parsed and checked for conformance.
pub struct LoadedBundle {
    pub header: BundleHeader,
    pub model: EncryptedModel,
    pub public: PublicMaterial,
    pub total_bytes: u64,
}

/// Short printable id of an owner key: the first 8 bytes of the public key, hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&key.as_bytes()[..8])
}

/// Builds and signs a bundle.
pub fn build(
    meta: BundleMeta,
    encrypted_model: &[u8],
    public_key: &[u8],
    server_key: &[u8],
    key: &SigningKey,
) -> Result<Vec<u8>, BundleError> {
    let parts = [encrypted_model, public_key, server_key];
    let header = BundleHeader {
        model_id: meta.model_id,
        name: meta.name,
        version: meta.version,
        created_unix: meta.created_unix,
        input: meta.input,
        num_classes: meta.num_classes,
        tfhe_params: fhe::PARAMS_NAME.into(),
        sections: SECTIONS
            .iter()
            .zip(parts)
            .map(|(n, p)| SectionInfo {
                name: (*n).into(),
                bytes: p.len() as u64,
            })
            .collect(),
    };
    let json = serde_json::to_vec(&header).map_err(|e| BundleError::Header(e.to_string()))?;
    if json.len() > MAX_HEADER_BYTES {
        return Err(BundleError::Header(format!(
            "{} bytes, over the {MAX_HEADER_BYTES}-byte limit",
            json.len()
        )));
    }
    let total = (PREFIX + json.len() + SIGNATURE_LENGTH) as u64
        + parts.iter().map(|p| p.len() as u64).sum::<u64>();
    if total > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge { size: total });
    }
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    for p in parts {
        out.extend_from_slice(p);
    }
    let sig = key.sign(&out);
    out.extend_from_slice(&sig.to_bytes());
    Ok(out)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Header and section framing of `body` (everything before the signature). `signed` only
/// words the truncation error.
fn frame(body: &[u8], signed: bool) -> Result<(BundleHeader, [&[u8]; 3]), BundleError> {
    let truncated = |s: &str| BundleError::Truncated {
        section: s.into(),
        signed,
    };
    let h = u32_at(body, 12) as usize;
    if h > MAX_HEADER_BYTES {
        return Err(BundleError::Header(format!(
            "{h} bytes, over the {MAX_HEADER_BYTES}-byte limit"
        )));
    }
    let json = body
        .get(PREFIX..PREFIX + h)
        .ok_or_else(|| truncated("header"))?;
    let header: BundleHeader =
        serde_json::from_slice(json).map_err(|e| BundleError::Header(e.to_string()))?;
    let names: Vec<&str> = header.sections.iter().map(|s| s.name.as_str()).collect();
    if names != SECTIONS {
        return Err(BundleError::Header(format!(
            "sections {names:?}, expected {SECTIONS:?}"
        )));
    }
    let mut at = PREFIX + h;
    let mut parts: [&[u8]; 3] = [&[]; 3];
    for (part, s) in parts.iter_mut().zip(&header.sections) {
        let end = usize::try_from(s.bytes)
            .ok()
            .and_then(|n| at.checked_add(n))
            .filter(|&e| e <= body.len())
            .ok_or_else(|| truncated(&s.name))?;
        *part = &body[at..end];
        at = end;
    }
    if at != body.len() {
        return Err(BundleError::Trailing((body.len() - at) as u64));
    }
    Ok((header, parts))
}

/// Checks size, magic, version and signature, then the framing. No tfhe parsing.
pub fn verify<'a>(
    bytes: &'a [u8],
    owner: &VerifyingKey,
) -> Result<VerifiedBundle<'a>, BundleError> {
    if bytes.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(BundleError::TooLarge {
            size: bytes.len() as u64,
        });
    }
    if !bytes.starts_with(MAGIC) {
        return Err(if MAGIC.starts_with(bytes) && !bytes.is_empty() {
            BundleError::Truncated {
                section: "magic".into(),
                signed: false,
            }
        } else {
            BundleError::Magic
        });
    }
    if bytes.len() < 12 {
        return Err(BundleError::Truncated {
            section: "format version".into(),
            signed: false,
        });
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(BundleError::Version { found: version });
    }
    if bytes.len() < PREFIX {
        return Err(BundleError::Truncated {
            section: "header length".into(),
            signed: false,
        });
    }
    let bad_signature = || {
        // A bad signature is the verdict; the unauthenticated framing only says why when the
        // file was cut short (then the "signature" read is really section data).
        match frame(bytes, false) {
            Err(e @ BundleError::Truncated { .. }) => e,
            Err(BundleError::Trailing(n)) if n < SIGNATURE_LENGTH as u64 => {
                BundleError::Truncated {
                    section: "signature".into(),
                    signed: false,
                }
            }
            _ => BundleError::Signature {
                key_id: key_id(owner),
            },
        }
    };
    if bytes.len() < PREFIX + SIGNATURE_LENGTH {
        return Err(bad_signature());
    }
    let (body, sig) = bytes.split_at(bytes.len() - SIGNATURE_LENGTH);
    let sig = Signature::from_bytes(sig.try_into().unwrap());
    // verify_strict: rejects small-order keys and non-canonical signatures.
    if owner.verify_strict(body, &sig).is_err() {
        return Err(bad_signature());
    }
    let (header, [encrypted_model, public_key, server_key]) = frame(body, true)?;
    if header.tfhe_params != fhe::PARAMS_NAME {
        return Err(BundleError::Params {
            found: header.tfhe_params,
        });
    }
    Ok(VerifiedBundle {
        header,
        encrypted_model,
        public_key,
        server_key,
    })
}

/// Verifies a bundle, then parses its tfhe contents with conformance checks.
pub fn load(bytes: &[u8], owner: &VerifyingKey) -> Result<LoadedBundle, BundleError> {
    load_verified(verify(bytes, owner)?, bytes.len() as u64)
}

/// Parses the tfhe contents of a bundle [`verify`] accepted (of `total_bytes`), with
/// conformance checks: a caller that judged the header first does not verify twice.
pub fn load_verified(v: VerifiedBundle<'_>, total_bytes: u64) -> Result<LoadedBundle, BundleError> {
    let model =
        EncryptedModel::from_bytes(v.encrypted_model).map_err(|source| BundleError::Content {
            section: SECTION_MODEL,
            source,
        })?;
    let public = PublicMaterial::from_bytes(v.public_key, v.server_key).map_err(|source| {
        BundleError::Content {
            section: "public_key/evaluation_key",
            source,
        }
    })?;
    if model.arch.input != v.header.input {
        return Err(BundleError::Mismatch(format!(
            "header input {:?}, model input {:?}",
            v.header.input, model.arch.input
        )));
    }
    if model.arch.num_classes != v.header.num_classes {
        return Err(BundleError::Mismatch(format!(
            "header has {} classes, model {}",
            v.header.num_classes, model.arch.num_classes
        )));
    }
    Ok(LoadedBundle {
        header: v.header,
        model,
        public,
        total_bytes,
    })
}

/// Reads a bundle file, refusing one over the limit before reading it.
pub fn read_file(path: &Path) -> Result<Vec<u8>, BundleError> {
    read_limited(path, MAX_BUNDLE_BYTES).map_err(|e| match e {
        ReadError::TooLarge { size, .. } => BundleError::TooLarge { size },
        ReadError::Io(source) => BundleError::Io {
            path: path.display().to_string(),
            source,
        },
    })
}

/// Reads and loads a bundle file.
pub fn load_file(path: &Path, owner: &VerifyingKey) -> Result<LoadedBundle, BundleError> {
    load(&read_file(path)?, owner)
}

/// Parses a 32-byte key: 64 hex digits (surrounding whitespace ignored) or the raw bytes.
fn key_bytes(bytes: &[u8]) -> Option<[u8; 32]> {
    if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
        // 32 bytes of hex text would be 16-byte keys: raw wins only when it is not hex text.
        if !raw.iter().all(u8::is_ascii_hexdigit) {
            return Some(raw);
        }
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

fn read_key_file(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, BundleError> {
    let p = path.display().to_string();
    read_limited(path, MAX_KEY_FILE_BYTES)
        .map(zeroize::Zeroizing::new)
        .map_err(|e| match e {
            ReadError::TooLarge { size, .. } => BundleError::KeyFile {
                path: p,
                msg: format!("{size} bytes is not a key file"),
            },
            ReadError::Io(source) => BundleError::Io { path: p, source },
        })
}

/// Parses an owner's public (verifying) key.
pub fn parse_owner_key(bytes: &[u8]) -> Result<VerifyingKey, String> {
    let b = key_bytes(bytes).ok_or("not an Ed25519 public key (64 hex digits or 32 raw bytes)")?;
    VerifyingKey::from_bytes(&b).map_err(|e| format!("not a valid Ed25519 public key: {e}"))
}

/// Reads an owner's public key file (`owner.pub`).
pub fn read_owner_key(path: &Path) -> Result<VerifyingKey, BundleError> {
    let bytes = read_key_file(path)?;
    parse_owner_key(&bytes).map_err(|msg| BundleError::KeyFile {
        path: path.display().to_string(),
        msg,
    })
}

/// Reads an owner's signing key file, refusing one that group or others can read.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, BundleError> {
    use std::os::unix::fs::PermissionsExt;
    let p = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| BundleError::Io {
        path: p.clone(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(BundleError::KeyFile {
            path: p,
            msg: format!("signing key has mode {mode:04o}; it must not be readable by group or others (chmod 600 it)"),
        });
    }
    let bytes = read_key_file(path)?;
    let seed = zeroize::Zeroizing::new(key_bytes(&bytes).ok_or_else(|| BundleError::KeyFile {
        path: p,
        msg: "not an Ed25519 signing key (64 hex digits or 32 raw bytes)".into(),
    })?);
    Ok(SigningKey::from_bytes(&seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> BundleMeta {
        BundleMeta {
            model_id: ModelId([7; 16]),
            name: "m".into(),
            version: 2,
            created_unix: 1_700_000_000,
            input: InputSpec {
                channels: 1,
                height: 8,
                width: 8,
                bits: 2,
                scale: 1.0 / 3.0,
                zero: 0.0,
            },
            num_classes: 10,
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn framing_round_trip_and_refusals() {
        let k = key(1);
        let b = build(meta(), b"model", b"pk", b"server", &k).unwrap();
        let v = verify(&b, &k.verifying_key()).unwrap();
        assert_eq!(v.encrypted_model, b"model");
        assert_eq!(v.public_key, b"pk");
        assert_eq!(v.server_key, b"server");
        assert_eq!(v.header.version, 2);

        // every single flipped byte is refused
        for i in 0..b.len() {
            let mut t = b.clone();
            t[i] ^= 0x40;
            assert!(verify(&t, &k.verifying_key()).is_err(), "byte {i}");
        }
        let e = verify(&b, &key(2).verifying_key()).err().unwrap();
        assert!(matches!(e, BundleError::Signature { .. }), "{e}");
        assert!(e.to_string().contains(&key_id(&key(2).verifying_key())));

        // cut anywhere: a truncation error or (inside the signature) a bad signature
        for n in [3, 8, 11, 15, 40, b.len() - 70, b.len() - 1] {
            let e = verify(&b[..n], &k.verifying_key()).err().unwrap();
            assert!(
                matches!(
                    e,
                    BundleError::Truncated { .. } | BundleError::Signature { .. }
                ),
                "{n}: {e}"
            );
        }
        let e = verify(&b[..b.len() - 70], &k.verifying_key())
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .starts_with("bundle truncated: section evaluation_key"),
            "{e}"
        );
        let e = verify(&b[..b.len() - 1], &k.verifying_key()).err().unwrap();
        assert!(
            e.to_string()
                .starts_with("bundle truncated: section signature"),
            "{e}"
        );

        let mut t = b.clone();
        t[8] = 9;
        assert!(matches!(
            verify(&t, &k.verifying_key()),
            Err(BundleError::Version { found: 9 })
        ));
        t[8] = 1;
        let e = verify(&t, &k.verifying_key()).err().unwrap().to_string();
        assert!(e.contains("deploy the model again"), "{e}");
        assert!(matches!(
            verify(b"GIF89a..............", &k.verifying_key()),
            Err(BundleError::Magic)
        ));
    }

    #[test]
    fn key_parsing() {
        let k = key(3).verifying_key();
        let hexed = format!("{}\n", hex::encode(k.as_bytes()));
        assert_eq!(parse_owner_key(hexed.as_bytes()).unwrap(), k);
        assert_eq!(parse_owner_key(k.as_bytes()).unwrap(), k);
        assert!(parse_owner_key(b"abc").is_err());
    }
}
