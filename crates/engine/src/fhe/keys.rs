//! The owner's keys, the public material a camera receives, and their containers.

use super::{
    bincode_opts, check_len, check_version, config, decode_container, decode_err, entropy, limits,
    to_safe_bytes, u32_le, FheError, COMPRESSION_PARAMS, COMPRESSION_PARAMS_NAME,
    KEY_FORMAT_VERSION, PARAMS, PARAMS_NAME,
};
use serde::{Deserialize, Serialize};
use tfhe::shortint::list_compression::CompressionPrivateKeys;
use tfhe::shortint::ClientKey;

/// The owner's keys: the secret `ClientKey` and the compression private key never leave
/// the owner's side.
pub struct OwnerKeys {
    hl: tfhe::ClientKey,
    /// The shortint key inside `hl`, which the circuits' blocks are encrypted under.
    pub client: ClientKey,
    /// The GLWE key the encrypted outputs are packed under; the owner decrypts them with it
    /// directly, with no bootstrapping and no decompression key.
    pub compression: CompressionPrivateKeys,
}

/// What an edge device receives: encrypts with the public key, evaluates with the server
/// key, packs its outputs with the compression key.
pub struct PublicMaterial {
    pub public_key: tfhe::CompactPublicKey,
    pub server_key: tfhe::CompressedServerKey,
    pub compression_key: tfhe::integer::compression_keys::CompressedCompressionKey,
}

/// Leading bytes of fhecam's key containers (owner keys, evaluation key), then a u32 version.
const OWNER_KEYS_MAGIC: &[u8; 8] = b"FHECAMOK";
const EVAL_KEY_MAGIC: &[u8; 8] = b"FHECAMEK";

#[derive(Serialize, Deserialize)]
struct KeyPair {
    /// tfhe safe serialization of the main key.
    main: Vec<u8>,
    /// tfhe safe serialization of the compression key that goes with it.
    compression: Vec<u8>,
}

fn encode_pair(magic: &[u8; 8], pair: &KeyPair, limit: u64) -> Result<Vec<u8>, FheError> {
    use bincode::Options;
    let mut out = magic.to_vec();
    out.extend_from_slice(&KEY_FORMAT_VERSION.to_le_bytes());
    bincode_opts(limit)
        .serialize_into(&mut out, pair)
        .map_err(|e| FheError::Decode {
            what: "key container",
            msg: e.to_string(),
        })?;
    Ok(out)
}

/// Checks only the leading magic and version of stored evaluation-key bytes (cheap: the
/// owner runs it before deploying a model protected by an older fhecam).
pub fn check_evaluation_key_format(bytes: &[u8]) -> Result<(), FheError> {
    check_pair_prefix("server key", EVAL_KEY_MAGIC, bytes).map(|_| ())
}

fn check_pair_prefix<'a>(
    what: &'static str,
    magic: &[u8; 8],
    bytes: &'a [u8],
) -> Result<&'a [u8], FheError> {
    let Some(rest) = bytes.strip_prefix(magic.as_slice()) else {
        return Err(FheError::Decode {
            what,
            msg: "written before fhecam's compressed encrypted outputs (or not a key at all): \
                  protect the model again (`fhecam protect`) and deploy the new version"
                .into(),
        });
    };
    if rest.len() < 4 {
        return Err(FheError::Decode {
            what,
            msg: "truncated".into(),
        });
    }
    check_version(what, u32_le(rest), KEY_FORMAT_VERSION)?;
    Ok(&rest[4..])
}

fn decode_pair(
    what: &'static str,
    magic: &[u8; 8],
    bytes: &[u8],
    limit: u64,
) -> Result<KeyPair, FheError> {
    check_len(what, bytes, limit)?;
    let body = check_pair_prefix(what, magic, bytes)?;
    decode_container(what, body, limit)
}

/// The shortint key inside a high-level client key.
fn shortint_key(hl: &tfhe::ClientKey) -> ClientKey {
    let (integer, ..) = hl.clone().into_raw_parts();
    integer.into()
}

impl OwnerKeys {
    pub fn generate() -> Self {
        entropy::seed_thread();
        let hl = tfhe::ClientKey::generate(config());
        let client = shortint_key(&hl);
        let compression = client.new_compression_private_key(COMPRESSION_PARAMS);
        OwnerKeys {
            hl,
            client,
            compression,
        }
    }

    pub fn public_material(&self) -> PublicMaterial {
        entropy::seed_thread();
        let compression_key =
            tfhe::integer::compression_keys::CompressedCompressionKey::from_raw_parts(
                self.client
                    .atomic_pattern
                    .new_compressed_compression_key(&self.compression),
            );
        PublicMaterial {
            public_key: tfhe::CompactPublicKey::new(&self.hl),
            server_key: tfhe::CompressedServerKey::new(&self.hl),
            compression_key,
        }
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, FheError> {
        let compression = tfhe::integer::compression_keys::CompressionPrivateKeys::from_raw_parts(
            self.compression.clone(),
        );
        let pair = KeyPair {
            main: to_safe_bytes(&self.hl, limits::PUBLIC_KEY)?,
            compression: to_safe_bytes(&compression, limits::PUBLIC_KEY)?,
        };
        encode_pair(OWNER_KEYS_MAGIC, &pair, limits::PUBLIC_KEY)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FheError> {
        let pair = decode_pair("client key", OWNER_KEYS_MAGIC, bytes, limits::PUBLIC_KEY)?;
        let hl: tfhe::ClientKey =
            tfhe::safe_serialization::safe_deserialize(pair.main.as_slice(), limits::PUBLIC_KEY)
                .map_err(decode_err("client key"))?;
        let compression: tfhe::integer::compression_keys::CompressionPrivateKeys =
            tfhe::safe_serialization::safe_deserialize(
                pair.compression.as_slice(),
                limits::PUBLIC_KEY,
            )
            .map_err(decode_err("compression private key"))?;
        let client = shortint_key(&hl);
        let p = client.parameters();
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
        let compression = compression.into_raw_parts();
        if compression.params != COMPRESSION_PARAMS {
            return Err(FheError::Decode {
                what: "compression private key",
                msg: format!("not a key for {COMPRESSION_PARAMS_NAME}"),
            });
        }
        Ok(OwnerKeys {
            hl,
            client,
            compression,
        })
    }
}

impl PublicMaterial {
    pub fn public_key_bytes(&self) -> Result<Vec<u8>, FheError> {
        to_safe_bytes(&self.public_key, limits::PUBLIC_KEY)
    }
    /// The evaluation key: the compressed server key and the compressed compression key.
    pub fn server_key_bytes(&self) -> Result<Vec<u8>, FheError> {
        let pair = KeyPair {
            main: to_safe_bytes(&self.server_key, limits::SERVER_KEY)?,
            compression: to_safe_bytes(&self.compression_key, limits::COMPRESSION_KEY)?,
        };
        encode_pair(EVAL_KEY_MAGIC, &pair, limits::SERVER_KEY)
    }
    /// Parses untrusted key material: size-limited, versioned (tfhe safe serialization);
    /// the parameters are checked when the runtime is built from it.
    pub fn from_bytes(public_key: &[u8], server_key: &[u8]) -> Result<Self, FheError> {
        check_len("public key", public_key, limits::PUBLIC_KEY)?;
        let public_key = tfhe::safe_serialization::safe_deserialize(public_key, limits::PUBLIC_KEY)
            .map_err(decode_err("public key"))?;
        let pair = decode_pair("server key", EVAL_KEY_MAGIC, server_key, limits::SERVER_KEY)?;
        let server_key =
            tfhe::safe_serialization::safe_deserialize(pair.main.as_slice(), limits::SERVER_KEY)
                .map_err(decode_err("server key"))?;
        let compression_key = tfhe::safe_serialization::safe_deserialize(
            pair.compression.as_slice(),
            limits::COMPRESSION_KEY,
        )
        .map_err(decode_err("compression key"))?;
        Ok(PublicMaterial {
            public_key,
            server_key,
            compression_key,
        })
    }
}
