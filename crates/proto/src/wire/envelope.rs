//! The result envelope: one encrypted inference as an edge device sends it to the owner
//! (a file from `fhecam infer`, later an MQTT payload). Pure encoding, no I/O.
//!
//! Layout (integers little endian):
//!
//! ```text
//! "FHCR"               4 bytes magic
//! schema version       u16
//! device id            u8 length + bytes (1..=64 of [A-Za-z0-9._:-])
//! camera id            u8 length + bytes (same rules)
//! model id             16 bytes
//! model version        u32
//! sequence number      u64
//! camera epoch         u64
//! frame timestamp      u64, unix milliseconds
//! ciphertext           u32 length + bytes (`EncryptedOutput::to_bytes`)
//! ```
//!
//! Ids are restricted to characters that are safe in file names and MQTT topics. The
//! envelope is not authenticated: the owner's decryption checks the ciphertext itself
//! (layout, packing parameters, every digit's padding bit, every logit in the model's range).
//!
//! Schema 3 carries the packed output (`fhe::OUTPUT_FORMAT_VERSION` 2). Schemas 1 and 2
//! carried one 16 KiB ciphertext per digit: they are refused with that reason.

use crate::ids::ModelId;
use thiserror::Error;

pub const MAGIC: &[u8; 4] = b"FHCR";
pub const SCHEMA_VERSION: u16 = 3;
pub const MAX_ID_LEN: usize = 64;
/// Largest ciphertext carried (the encrypted output limit).
pub const MAX_CIPHERTEXT_BYTES: usize = fhecam_engine::fhe::limits::OUTPUT as usize;
const FIXED_BYTES: usize = 4 + 2 + 1 + 1 + 16 + 4 + 8 + 8 + 8 + 4;
/// Largest envelope: the fixed fields, two longest ids and the largest ciphertext.
pub const MAX_ENVELOPE_BYTES: usize = FIXED_BYTES + 2 * MAX_ID_LEN + MAX_CIPHERTEXT_BYTES;

#[derive(Debug, Error, PartialEq)]
pub enum EnvelopeError {
    #[error("not an fhecam result envelope (bad magic bytes)")]
    Magic,
    #[error(
        "result envelope schema version {found} is unknown (this fhecam reads {SCHEMA_VERSION})"
    )]
    UnknownSchema { found: u16 },
    #[error("result envelope schema {found} is from a camera running fhecam before compressed outputs (this fhecam reads {SCHEMA_VERSION}): update the camera and deploy the model again")]
    Superseded { found: u16 },
    #[error("result envelope truncated: {field}")]
    Truncated { field: &'static str },
    #[error("result envelope {what} is {size} bytes, over the {limit}-byte limit")]
    Oversized {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("result envelope has {0} trailing bytes")]
    Trailing(usize),
    #[error("{field} {value:?}: 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 . _ : -")]
    BadId { field: &'static str, value: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub device_id: String,
    pub camera_id: String,
    pub model_id: ModelId,
    pub model_version: u32,
    /// Per device and camera, increasing: lets the owner spot gaps and replays.
    pub sequence: u64,
    /// Random per outbox, drawn when the camera's outbox is created: a reset outbox (new
    /// disk, sequence back to 0) starts a new epoch, so its results are not taken for
    /// replays of the old ones.
    pub epoch: u64,
    /// When the frame was captured, unix milliseconds.
    pub frame_timestamp_ms: u64,
    /// `EncryptedOutput::to_bytes()`.
    pub ciphertext: Vec<u8>,
}

/// Checks a device or camera id.
pub fn check_id(field: &'static str, value: &str) -> Result<(), EnvelopeError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_ID_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(EnvelopeError::BadId {
            field,
            value: value.into(),
        })
    }
}

pub fn encode(e: &Envelope) -> Result<Vec<u8>, EnvelopeError> {
    check_id("device id", &e.device_id)?;
    check_id("camera id", &e.camera_id)?;
    if e.ciphertext.len() > MAX_CIPHERTEXT_BYTES {
        return Err(EnvelopeError::Oversized {
            what: "ciphertext",
            size: e.ciphertext.len(),
            limit: MAX_CIPHERTEXT_BYTES,
        });
    }
    let mut out = Vec::with_capacity(
        FIXED_BYTES + e.device_id.len() + e.camera_id.len() + e.ciphertext.len(),
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&SCHEMA_VERSION.to_le_bytes());
    for id in [&e.device_id, &e.camera_id] {
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
    }
    out.extend_from_slice(&e.model_id.0);
    out.extend_from_slice(&e.model_version.to_le_bytes());
    out.extend_from_slice(&e.sequence.to_le_bytes());
    out.extend_from_slice(&e.epoch.to_le_bytes());
    out.extend_from_slice(&e.frame_timestamp_ms.to_le_bytes());
    out.extend_from_slice(&(e.ciphertext.len() as u32).to_le_bytes());
    out.extend_from_slice(&e.ciphertext);
    Ok(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], EnvelopeError> {
        if self.0.len() < n {
            return Err(EnvelopeError::Truncated { field });
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], EnvelopeError> {
        Ok(self.take(N, field)?.try_into().unwrap())
    }
    fn id(&mut self, field: &'static str) -> Result<String, EnvelopeError> {
        let n = self.array::<1>(field)?[0] as usize;
        let b = self.take(n, field)?;
        let s = String::from_utf8_lossy(b).into_owned();
        check_id(field, &s)?;
        Ok(s)
    }
}

pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
    if bytes.len() > MAX_ENVELOPE_BYTES {
        return Err(EnvelopeError::Oversized {
            what: "envelope",
            size: bytes.len(),
            limit: MAX_ENVELOPE_BYTES,
        });
    }
    let mut r = Reader(bytes);
    let magic = r.take(MAGIC.len().min(bytes.len()), "magic")?;
    if magic != MAGIC {
        return Err(if MAGIC.starts_with(magic) && !magic.is_empty() {
            EnvelopeError::Truncated { field: "magic" }
        } else {
            EnvelopeError::Magic
        });
    }
    let version = u16::from_le_bytes(r.array("schema version")?);
    if version == 1 || version == 2 {
        return Err(EnvelopeError::Superseded { found: version });
    }
    if version != SCHEMA_VERSION {
        return Err(EnvelopeError::UnknownSchema { found: version });
    }
    let device_id = r.id("device id")?;
    let camera_id = r.id("camera id")?;
    let model_id = ModelId(r.array("model id")?);
    let model_version = u32::from_le_bytes(r.array("model version")?);
    let sequence = u64::from_le_bytes(r.array("sequence number")?);
    let epoch = u64::from_le_bytes(r.array("camera epoch")?);
    let frame_timestamp_ms = u64::from_le_bytes(r.array("frame timestamp")?);
    let n = u32::from_le_bytes(r.array("ciphertext length")?) as usize;
    if n > MAX_CIPHERTEXT_BYTES {
        return Err(EnvelopeError::Oversized {
            what: "ciphertext",
            size: n,
            limit: MAX_CIPHERTEXT_BYTES,
        });
    }
    let ciphertext = r.take(n, "ciphertext")?.to_vec();
    if !r.0.is_empty() {
        return Err(EnvelopeError::Trailing(r.0.len()));
    }
    Ok(Envelope {
        device_id,
        camera_id,
        model_id,
        model_version,
        sequence,
        epoch,
        frame_timestamp_ms,
        ciphertext,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            device_id: "cam-host-01".into(),
            camera_id: "north:gate_2".into(),
            model_id: ModelId([0xab; 16]),
            model_version: 3,
            sequence: u64::MAX - 1,
            epoch: 0x0123_4567_89ab_cdef,
            frame_timestamp_ms: 1_700_000_000_123,
            ciphertext: vec![1, 2, 3, 4, 5],
        }
    }

    #[test]
    fn round_trip() {
        let e = sample();
        let b = encode(&e).unwrap();
        assert_eq!(b.len(), FIXED_BYTES + 11 + 12 + 5);
        assert_eq!(decode(&b).unwrap(), e);
    }

    #[test]
    fn schemas_before_compressed_outputs_are_refused_with_the_reason() {
        let mut b = encode(&sample()).unwrap();
        for v in [1u8, 2] {
            b[4] = v;
            let err = decode(&b).unwrap_err();
            assert_eq!(err, EnvelopeError::Superseded { found: v as u16 });
            assert!(err.to_string().contains("update the camera"), "{err}");
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        let b = encode(&sample()).unwrap();
        for n in 1..b.len() {
            let err = decode(&b[..n]).unwrap_err();
            assert!(matches!(err, EnvelopeError::Truncated { .. }), "{n}: {err}");
        }
        assert_eq!(decode(&[]).unwrap_err(), EnvelopeError::Magic);
    }

    #[test]
    fn refusals() {
        let b = encode(&sample()).unwrap();
        let mut t = b.clone();
        t.push(0);
        assert_eq!(decode(&t).unwrap_err(), EnvelopeError::Trailing(1));
        let mut t = b.clone();
        t[4] = 4;
        assert_eq!(
            decode(&t).unwrap_err(),
            EnvelopeError::UnknownSchema { found: 4 }
        );
        assert_eq!(decode(b"PNG\0xxxx").unwrap_err(), EnvelopeError::Magic);
        let big = vec![0u8; MAX_ENVELOPE_BYTES + 1];
        assert!(matches!(
            decode(&big).unwrap_err(),
            EnvelopeError::Oversized {
                what: "envelope",
                ..
            }
        ));
        // a length field claiming more than the limit
        let mut t = b.clone();
        let at = b.len() - 5 - 4;
        t[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&t).unwrap_err(),
            EnvelopeError::Oversized {
                what: "ciphertext",
                ..
            }
        ));
        let mut e = sample();
        e.camera_id = "a/b".into();
        assert!(matches!(encode(&e), Err(EnvelopeError::BadId { .. })));
        e.camera_id = String::new();
        assert!(encode(&e).is_err());
        e.camera_id = "x".repeat(65);
        assert!(encode(&e).is_err());
    }
}
