//! The integer network: a versioned, serde-serializable description of a quantized CNN.
//!
//! Values flowing between nodes are of two kinds:
//! - *activations*: small unsigned integers in `0..2^bits` (bits ≤ 4), the only thing a
//!   linear layer (Conv2d, Dense) may consume; the engine holds them as base-4 digits and
//!   multiplies digit by digit, one 4-bit PBS per (weight digit, activation digit) pair;
//! - *accumulators*: wide signed integers (sums of products plus a bias), turned back into
//!   activations by an `Activation` lookup table in which requantization is folded.
//!
//! BatchNorm has no node of its own: it is folded into the preceding linear layer before
//! anything is encrypted (see `import`/`train`).

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::layer::{
    ActTable, Activation, Add, Conv2d, Dense, Flatten, GroupSum, Layer, Linear, Lut, LutNeuron,
    MaxPool, SumPool,
};

/// Bumped whenever the serialized layout changes; older files are refused with a clear error.
pub const MODEL_FORMAT_VERSION: u32 = 1;

/// Largest activation width the encrypted engine handles. A product packs `4*w + x` in one
/// 4-bit block, so wider values are split into base-4 digits: a b-bit activation costs
/// ceil(b/2) PBS per multiply, a weight spanning more than 4 levels likewise.
pub const MAX_ACT_BITS: u8 = 4;

/// Largest input width: camera pixels may keep more levels than hidden activations (the
/// first layer pays one PBS per base-4 digit of them).
pub const MAX_INPUT_BITS: u8 = 8;

/// Largest number of levels a layer's weights may span (8-bit weights).
pub const MAX_WEIGHT_SPAN: i16 = 255;

#[derive(Debug, Error, PartialEq)]
pub enum ModelError {
    #[error("model format version {found} is not supported (this fhecam reads version {expected}); re-export the model with this version")]
    Version { found: u32, expected: u32 },
    #[error("node {node} ({op}): {msg}")]
    Node {
        node: usize,
        op: &'static str,
        msg: String,
    },
    #[error("model input: {0}")]
    Input(String),
    #[error("model output: {0}")]
    Output(String),
}

/// How a camera frame becomes the model's integer input.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Bits per input value (1..=4).
    pub bits: u8,
    /// A pixel intensity p in [0, 1] becomes clamp(round((p - zero) / scale), 0, 2^bits - 1).
    pub scale: f32,
    /// The value integer 0 stands for (imported models whose inputs are normalised).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub zero: f32,
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

impl InputSpec {
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Quantizes intensities in [0, 1] (row-major C,H,W) to the integer input.
    pub fn quantize(&self, pixels: &[f32]) -> Vec<u8> {
        let max = (1u32 << self.bits) - 1;
        pixels
            .iter()
            .map(|p| {
                // ties to even, as ONNX QuantizeLinear rounds
                (((p - self.zero) / self.scale)
                    .round_ties_even()
                    .clamp(0.0, max as f32)) as u8
            })
            .collect()
    }
}

/// A node's operation: one arm per layer kind, each kind a type of its own in `layer`.
/// Tensors are row-major (C, H, W) or flat.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Op {
    Conv2d(Conv2d),
    Dense(Dense),
    SumPool(SumPool),
    MaxPool(MaxPool),
    Activation(Activation),
    Add(Add),
    Flatten(Flatten),
    Lut(Lut),
    GroupSum(GroupSum),
}

/// `$body` with `$l` bound to the layer type behind whichever arm `$op` is: the one list of
/// arms that `Op::layer`, `Op::layer_mut` and the circuit dispatch (`fhe::eval`) expand.
macro_rules! each_kind {
    ($op:expr, $l:ident => $body:expr) => {
        match $op {
            $crate::model::Op::Conv2d($l) => $body,
            $crate::model::Op::Dense($l) => $body,
            $crate::model::Op::SumPool($l) => $body,
            $crate::model::Op::MaxPool($l) => $body,
            $crate::model::Op::Activation($l) => $body,
            $crate::model::Op::Add($l) => $body,
            $crate::model::Op::Flatten($l) => $body,
            $crate::model::Op::Lut($l) => $body,
            $crate::model::Op::GroupSum($l) => $body,
        }
    };
}
pub(crate) use each_kind;

impl Op {
    /// The layer kind behind the arm: every question the engine asks of a node that does
    /// not need ciphertexts goes through here.
    pub fn layer(&self) -> &dyn Layer {
        each_kind!(self, l => l)
    }

    /// [`Op::layer`], to change the parameters in place.
    pub fn layer_mut(&mut self) -> &mut dyn Layer {
        each_kind!(self, l => l)
    }

    /// Conv2d or Dense: the layers with (encrypted) weights.
    pub fn is_linear(&self) -> bool {
        self.linear().is_some()
    }

    /// A Conv2d's or Dense's weights, bias and bounds.
    pub fn linear(&self) -> Option<Linear<'_>> {
        self.layer().linear()
    }

    pub fn name(&self) -> &'static str {
        self.layer().name()
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub op: Op,
    /// Value ids this node reads: 0 is the model input, k is the output of node k-1.
    pub inputs: Vec<usize>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub format_version: u32,
    pub name: String,
    pub input: InputSpec,
    pub nodes: Vec<Node>,
    /// Class names or count; the output value is the last node's (an accumulator of logits).
    pub num_classes: usize,
}

/// The static type of a value: its shape and whether it is an activation or an accumulator.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueInfo {
    /// (C, H, W); a flat vector is (n, 1, 1) with `flat` set.
    pub shape: [usize; 3],
    pub flat: bool,
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// Values in `0..=max`.
    Act { max: u8 },
    /// Values in `lo..=hi`.
    Acc { lo: i64, hi: i64 },
}

impl ValueInfo {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Channel of element `i` (for a flat value, the element itself).
    pub fn channel_of(&self, i: usize) -> usize {
        i / (self.shape[1] * self.shape[2])
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> (i64, i64) {
        match self.kind {
            Kind::Act { max } => (0, max as i64),
            Kind::Acc { lo, hi } => (lo, hi),
        }
    }
}

/// Output spatial size of a windowed op, or None when the window does not fit.
pub fn out_dim(inp: usize, k: usize, s: usize, p: usize) -> Option<usize> {
    if s == 0 || k == 0 || inp + 2 * p < k {
        return None;
    }
    Some((inp + 2 * p - k) / s + 1)
}

impl Model {
    /// Checks structure, shapes and bounds; returns the static type of every value
    /// (index 0 = input). Everything that loads a model calls this before using it.
    pub fn infer(&self) -> Result<Vec<ValueInfo>, ModelError> {
        let vals = self.infer_values()?;
        crate::layer::lut::places(self, &vals)?;
        let last = vals.last().unwrap();
        if self.nodes.is_empty() || last.len() != self.num_classes || self.num_classes < 2 {
            return Err(ModelError::Output(format!(
                "the last node must produce num_classes = {} values (>= 2), got {}",
                self.num_classes,
                last.len()
            )));
        }
        Ok(vals)
    }

    /// Like `infer`, without requiring the last node to be the classifier.
    pub fn infer_values(&self) -> Result<Vec<ValueInfo>, ModelError> {
        if self.format_version != MODEL_FORMAT_VERSION {
            return Err(ModelError::Version {
                found: self.format_version,
                expected: MODEL_FORMAT_VERSION,
            });
        }
        let i = &self.input;
        if i.is_empty()
            || !(1..=MAX_INPUT_BITS).contains(&i.bits)
            || i.scale.is_nan()
            || i.scale <= 0.0
            || !i.zero.is_finite()
        {
            return Err(ModelError::Input(format!(
                "need non-empty C,H,W, bits in 1..={MAX_INPUT_BITS} and a positive scale (got {}x{}x{}, {} bits, scale {})",
                i.channels, i.height, i.width, i.bits, i.scale
            )));
        }
        let mut vals = vec![ValueInfo {
            shape: [i.channels, i.height, i.width],
            flat: false,
            kind: Kind::Act {
                max: ((1u16 << i.bits) - 1) as u8,
            },
        }];
        for (n, node) in self.nodes.iter().enumerate() {
            let err = |msg: String| ModelError::Node {
                node: n,
                op: node.op.name(),
                msg,
            };
            let layer = node.op.layer();
            let want = layer.arity();
            if node.inputs.len() != want || node.inputs.iter().any(|&v| v > n) {
                return Err(err(format!(
                    "needs {want} input(s) among values 0..={n}, got {:?}",
                    node.inputs
                )));
            }
            let ins: Vec<&ValueInfo> = node.inputs.iter().map(|&v| &vals[v]).collect();
            let out = layer.infer(&ins).map_err(err)?;
            if let Kind::Acc { lo, hi } = out.kind {
                if lo < -(1 << 40) || hi > 1 << 40 {
                    return Err(err(format!(
                        "accumulator range {lo}..={hi} is out of range"
                    )));
                }
            }
            vals.push(out);
        }
        Ok(vals)
    }

    /// Number of ciphertext x ciphertext multiply-accumulates (padding taps excluded).
    pub fn macs(&self) -> Result<u64, ModelError> {
        let vals = self.infer()?;
        Ok(self
            .nodes
            .iter()
            .map(|node| {
                let ins: Vec<&ValueInfo> = node.inputs.iter().map(|&v| &vals[v]).collect();
                node.op.layer().macs(&ins)
            })
            .sum())
    }
}
