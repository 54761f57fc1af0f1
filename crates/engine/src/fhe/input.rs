//! A frame as the edge runtime takes it: encrypted, or held in the clear.

use super::{encode, limits, FheError};
use tfhe::shortint::ciphertext::CompactCiphertextList;

/// A frame prepared for one input mode (owned; see [`Frame`] for the borrowed view).
pub enum FrameInput {
    Encrypted(EncryptedInput),
    Clear(Vec<u8>),
}

impl FrameInput {
    pub fn as_frame(&self) -> Frame<'_> {
        match self {
            FrameInput::Encrypted(e) => Frame::Encrypted(e),
            FrameInput::Clear(x) => Frame::Clear(x),
        }
    }
}

/// An encrypted frame: the quantized pixels under the compact public key.
pub struct EncryptedInput(pub CompactCiphertextList);

impl EncryptedInput {
    /// Wire size of the list (it is produced and consumed on the device itself).
    pub fn to_bytes(&self) -> Result<Vec<u8>, FheError> {
        encode("encrypted input", &self.0, limits::INPUT)
    }
}

/// A frame as the runtime takes it: encrypted with the public key, or held in the clear by
/// the device ([`eval::InputMode::DeviceClear`]).
#[derive(Clone, Copy)]
pub enum Frame<'a> {
    Encrypted(&'a EncryptedInput),
    Clear(&'a [u8]),
}
